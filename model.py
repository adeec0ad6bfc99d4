"""The network every other script stands on: a Llama / Qwen2 / Mistral decoder that loads and saves Hugging Face
checkpoints, their tokenizer and chat template, and batched generation with a KV cache.

    python model.py --model runs/toy/seed0/iopo/final --prompt "Two sentences about rivers."  # after python iopo.py
    python model.py --model ~/models/Qwen2-0.5B-Instruct --prompt "Name three rivers."      # a real HF checkpoint

Papers: Llama (arXiv 2302.13971; RMSNorm, SwiGLU, rotary embeddings), GQA (arXiv 2305.13245), RoPE (arXiv
2104.09864), Mistral sliding-window attention (arXiv 2310.06825).

What we simplify or leave out:
1. Only the three architectures above, RoPE scaling "llama3" and "linear", and MLPs without bias; anything else
   in a config.json is refused with an error rather than silently run wrong.
2. The KV cache keeps every position, also outside a sliding window (the mask hides them); no rolling buffer.
3. The chat template is not run through jinja: we recognise the two families (ChatML, Llama 3) from the
   template string in tokenizer_config.json and render them in Python, with what the template adds by itself
   (Qwen2's default system message, Llama 3.1's date header). Tool turns, templates with <think>
   reasoning blocks (QwQ) and multimodal content are refused. Tests check our ids against the ids transformers
   produces from the real templates.
4. The forward pass returns final-norm hidden states, never logits: the losses need only the rows of
   `hidden @ lm_head.weight.T` at the response tokens, and iopo.py computes them chunk by chunk.
"""

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

# -----------------------------------------------------------------------------
# Config

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
ROPE_TYPES = ("llama3", "linear")  # rope_type "default" is stored as rope_scaling=None
ROPE_FIELDS = {"linear": ("factor",),  # what each scaling reads (rope_frequencies)
               "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    model_type: str = "llama"  # "llama" | "qwen2" | "mistral" (same network; they differ in biases and windows)
    vocab_size: int = 512  # rows of the embedding and of lm_head
    hidden_size: int = 64  # D, the residual stream width
    intermediate_size: int = 172  # width of the SwiGLU MLP
    num_hidden_layers: int = 2  # number of transformer blocks
    num_attention_heads: int = 4  # query heads H
    num_key_value_heads: int = 2  # key/value heads; H must be a multiple (GQA; == H is plain multi-head)
    head_dim: int | None = None  # per-head width; None means hidden_size // num_attention_heads
    max_position_embeddings: int = 2048  # longest sequence the model was trained for (generate warns past it)
    rms_norm_eps: float = 1e-6  # epsilon inside RMSNorm
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: dict | None = None  # {"rope_type": "llama3"|"linear", "factor": ..., ...} or None
    attention_bias: bool = False  # bias on q/k/v projections, and on o_proj for Llama (always on for Qwen2)
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix
    sliding_window: int | None = None  # each query sees at most this many keys (itself included); None = all
    max_window_layers: int = 0  # Qwen2: only layers with index >= this one use the sliding window
    bos_token_id: int | None = None  # beginning of sequence token, if the tokenizer has one
    eos_token_id: int | list[int] | None = None  # token(s) that end generation
    torch_dtype: str = "float32"  # dtype of the weights: as stored, or as load_model placed them

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; expected one of {list(ARCHITECTURES)}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads"):
            value = getattr(self, key)
            if type(value) is not int or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                                 f"{self.num_attention_heads} (and no head_dim is given)")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if type(self.head_dim) is not int or self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"head_dim must be an even positive integer (RoPE rotates pairs), got {self.head_dim!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.sliding_window is not None and (type(self.sliding_window) is not int or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be a positive integer or null, got {self.sliding_window!r}")
        if self.model_type == "qwen2":
            self.attention_bias = True  # Qwen2 always has q/k/v biases; its config.json has no flag for it
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type")
            if kind not in ROPE_TYPES:
                raise ValueError(f"RoPE scaling {kind!r} is not supported; expected one of {ROPE_TYPES} or none")
            missing = [k for k in ROPE_FIELDS[kind] if not isinstance(self.rope_scaling.get(k), (int, float))]
            if missing:
                raise ValueError(f"RoPE scaling {kind!r} needs numbers for {missing}, got {self.rope_scaling}")

    def layer_uses_window(self, i):
        return self.sliding_window is not None and i >= self.max_window_layers

    @classmethod
    def from_hf(cls, path_or_dict):
        """Read a Hugging Face config.json (a dict, a file, or a folder holding one), in the legacy layout
        (rope_theta, rope_scaling, torch_dtype) or the transformers-5 one (rope_parameters, dtype)."""
        source = "config dict"
        if isinstance(path_or_dict, dict):
            hf = dict(path_or_dict)
        else:
            path = Path(path_or_dict)
            path = path / "config.json" if path.is_dir() else path
            source = str(path)
            hf = read_json(path)
        if not isinstance(hf, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ValueError(f"{source}: model_type {model_type!r} is not supported; expected one of {list(ARCHITECTURES)}")
        if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias", False):
            raise ValueError(f"{source}: only a bias-free SiLU MLP is supported (hidden_act={hf.get('hidden_act')!r}, "
                             f"mlp_bias={hf.get('mlp_bias')!r})")
        quant = hf.get("quantization_config")
        if quant:
            method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
            raise ValueError(f"{source}: quantized checkpoints ({method} in quantization_config) are not supported")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if key not in hf:
                raise ValueError(f"{source}: required field {key!r} is missing")

        # RoPE: transformers 5 puts everything in rope_parameters; older files use rope_theta + rope_scaling
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"{source}: rope_scaling / rope_parameters must be an object, got {rope!r}")
        rope = dict(rope)
        if rope and all(isinstance(v, dict) for v in rope.values()):
            raise ValueError(f"{source}: per-layer-type rope_parameters are not supported")
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        if rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError(f"{source}: partial_rotary_factor != 1 is not supported")
        if rope_type == "default" and "factor" in rope:
            raise ValueError(f"{source}: RoPE scaling has a factor but no type (rope_type / type); which scaling "
                             f"is meant is not known")
        if rope_type == "default":
            rope_scaling = None
        elif rope_type in ROPE_TYPES:
            rope_scaling = {"rope_type": rope_type, **rope}
            if rope_type == "llama3":
                rope_scaling.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 2048))
        else:
            raise ValueError(f"{source}: RoPE scaling {rope_type!r} is not supported; expected one of {ROPE_TYPES} or default")

        # Sliding window: Mistral uses it whenever it is set; Qwen2 only with use_sliding_window, and then only
        # in the layers from max_window_layers on (as transformers does)
        window = hf.get("sliding_window", 4096 if model_type == "mistral" else None)  # MistralConfig's default
        max_window_layers = 0
        if model_type == "qwen2":
            if not hf.get("use_sliding_window", False):
                window = None
            max_window_layers = hf.get("max_window_layers", 28)
        elif model_type == "llama":
            window = None
        # transformers >= 4.53 also writes the outcome per layer; a list that says otherwise is not supported
        types = hf.get("layer_types")
        if types is not None and isinstance(hf["num_hidden_layers"], int):
            want = ["sliding_attention" if window is not None and i >= max_window_layers else "full_attention"
                    for i in range(hf["num_hidden_layers"])]
            if types != want:
                raise ValueError(f"{source}: layer_types {types} differs from what sliding_window, use_sliding_window "
                                 f"and max_window_layers give ({want}); other per-layer patterns are not supported")

        heads = hf["num_attention_heads"]
        try:  # ModelConfig checks the values in __post_init__; say which file they came from
            return cls(
                model_type=model_type,
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_hidden_layers=hf["num_hidden_layers"],
                num_attention_heads=heads,
                num_key_value_heads=hf.get("num_key_value_heads") or heads,
                head_dim=hf.get("head_dim"),
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=rope_theta,
                rope_scaling=rope_scaling,
                attention_bias=bool(hf.get("attention_bias", False)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                sliding_window=window,
                max_window_layers=max_window_layers,
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=hf.get("eos_token_id"),
                torch_dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32").removeprefix("torch."),
            )
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_hf(self):
        """The legacy config.json layout, which both transformers 4 and 5 read."""
        hf = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.torch_dtype,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
        }
        if self.model_type == "llama":
            hf.update(attention_bias=self.attention_bias, mlp_bias=False)
        elif self.model_type == "qwen2":
            hf.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window,
                      max_window_layers=self.max_window_layers)
        else:
            hf.update(sliding_window=self.sliding_window)
        return hf


# Toy sizes for models trained from scratch on a CPU; the vocabulary comes from the tokenizer.
PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "toy": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "small": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4),
}


def toy_config(vocab_size, preset="toy", **overrides):
    """A tied-embedding Llama of one of the PRESETS sizes (toy: about 2.9M parameters plus 256 * vocab_size)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {list(PRESETS)}")
    kwargs = dict(PRESETS[preset], model_type="llama", vocab_size=vocab_size, tie_word_embeddings=True,
                  max_position_embeddings=2048, rms_norm_eps=1e-5)
    kwargs.update(overrides)
    return ModelConfig(**kwargs)


def read_json(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None


def write_atomic(path, write):
    """Call write(tmp_path), then rename onto path, so a crash never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path, obj):
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8"))


# -----------------------------------------------------------------------------
# Building blocks: RMSNorm, RoPE, attention, MLP, block


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()  # the mean of squares in float32, also for bfloat16 weights
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config, device=None):
    """theta_i = base^(-2i/d) for i < d/2, with llama3 or linear scaling applied (as transformers computes them)."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3 scaling (introduced with Llama 3.1): wavelengths longer than old_len / low are slowed by `factor`,
    # those shorter than old_len / high are kept, and the band between is interpolated smoothly
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(config, position_ids, dtype):
    inv_freq = rope_inv_freq(config, position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # (B, 1, T, hd), broadcast over heads


def apply_rope(x, cos, sin):
    # Two layouts exist for the pairs that RoPE rotates. The original (and Meta's checkpoints) rotate adjacent
    # pairs (x0, x1), (x2, x3), ...; Hugging Face rotates (x_i, x_{i + d/2}), "rotate half", and permutes the
    # q/k weights on conversion to match. We use the HF layout so its checkpoints load with no permutation.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# On CUDA, torch may pick cuDNN attention, which builds a new plan for every new key length, i.e. at every
# decoding step (measured on an H100: 20 -> 84 tokens/s for a 25M-parameter bf16 model at batch 1 without it).
# The flash and memory-efficient kernels have no such cost; both keep the softmax in float32.
CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def repeat_kv(t, n):
    """GQA: (B, KV, S, hd) -> (B, KV * n, S, hd), each key/value head serving n consecutive query heads."""
    return t if n == 1 else t.repeat_interleave(n, dim=1)


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.hd, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv * self.hd, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv * self.hd, bias=bias)
        # Llama's attention_bias also puts a bias on o_proj; Qwen2 has biases on q/k/v only
        self.o_proj = nn.Linear(self.n_heads * self.hd, config.hidden_size, bias=bias and config.model_type == "llama")

    def forward(self, x, cos, sin, mask, kv_cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, KV, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, KV, S, hd), S = cached + T
        # mask is None (plain causal), "all" (one new token sees the whole cache), a (B, 1, T, S) bool tensor,
        # or PackedRows (shared-prompt rows [x, y_a, y_b])
        n = self.n_heads // self.n_kv
        with sdpa_kernel(CUDA_SDPA_BACKENDS) if q.is_cuda else contextlib.nullcontext():
            if isinstance(mask, PackedRows):  # training on packed rows: see the section after Block
                y = packed_rows_attention(q, k, v, mask)
            elif isinstance(mask, torch.Tensor):
                y = F.scaled_dot_product_attention(q, repeat_kv(k, n), repeat_kv(v, n), attn_mask=mask)
            else:
                y = F.scaled_dot_product_attention(q, repeat_kv(k, n), repeat_kv(v, n), is_causal=mask is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


# -----------------------------------------------------------------------------
# Packed rows (training only): shared-prompt rows [x, y_a, y_b] attended in two causal passes


@dataclass
class PackedRows:
    """Attention layout of shared-prompt rows [x, y_a, y_b] (data.collate_packed, data.packed_views).

    The other way to keep y_b from seeing y_a is an explicit (T x T) mask, which takes SDPA off its causal
    kernels (flash on the GPU). Here instead two causal passes, each over one answer's own [x, y]:
    [x, y_a] is a prefix of every packed row, so the first pass is the slice [:TA] (TA = a_index.shape[1],
    the longest [x, y_a]); [x, y_b] is gathered (b_index, (R, TB)), and its y_b outputs are written into the
    packed row (flat b_src -> b_dst). No mask is built; x's attention is computed twice, which is what an
    unpacked batch computes too, while everything else in the block sees x once. A sliding window (Mistral)
    applies to each pass as to an unpacked row; it needs a mask only in a pass longer than the window."""
    a_index: torch.Tensor  # (R, TA) 0..TA-1 per row: the positions of [x, y_a]. Only its shape is read: a
    # size that torch.compile can treat as dynamic, where a Python int would be specialised (a recompile per TA)
    b_index: torch.Tensor  # (R, TB) packed positions of [x, y_b], right-padded
    b_src: torch.Tensor  # (n,) row * TB + t of each y_b token in the gathered view
    b_dst: torch.Tensor  # (n,) row * T + t of the same token in the packed row
    window: int | None = None  # this layer's sliding window; Transformer.forward sets it per layer


def causal_pass(q, k, v, window):
    """Causal attention over right-padded [x, y] rows, each query seeing at most `window` keys (None: all)."""
    T = q.shape[2]
    if window is None or T <= window:  # the window cannot bind: SDPA's causal kernel (flash on the GPU)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # the causal window mask unpacked rows get too (attention_mask_for, defined with the KV cache below)
    band = attention_mask_for(torch.ones(1, T, dtype=torch.bool, device=q.device), 0, T, window)  # (1, 1, T, T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=band)


def packed_rows_attention(q, k, v, rows):
    """Causal attention for PackedRows: q (R, H, T, hd), k and v (R, KV, T, hd), RoPE applied -> (R, H, T, hd)."""
    R, H, T, hd = q.shape
    n, TA = H // k.shape[1], rows.a_index.shape[1]
    # Pass 1, [x, y_a]: the first TA positions of every row. Where a row's [x, y_a] is shorter, the positions
    # up to TA hold its y_b or padding: causality keeps [x, y_a] from seeing them, and their outputs are
    # replaced (y_b, by pass 2) or never read (padding). Outputs from TA on start as zeros.
    # (.contiguous: torch.compile's generated backward of this slice, a view that keeps the row stride T, assumed
    # the stride of the first batch it saw and failed at the next packed width; a copy has strides of TA alone)
    a = lambda t: t[:, :, :TA].contiguous()
    y = causal_pass(a(q), repeat_kv(a(k), n), repeat_kv(a(v), n), rows.window)
    y = F.pad(y, (0, 0, 0, T - TA))  # (R, H, T, hd)
    gather = lambda t: t.gather(2, rows.b_index[:, None, :, None].expand(R, t.shape[1], rows.b_index.shape[1], hd))
    # k and v are gathered before the GQA repeat: H / KV times fewer rows to copy
    y_b = causal_pass(gather(q), repeat_kv(gather(k), n), repeat_kv(gather(v), n), rows.window)
    flat = y.transpose(1, 2).reshape(R * T, H * hd)
    flat_b = y_b.transpose(1, 2).reshape(-1, H * hd)
    flat = flat.index_copy(0, rows.b_dst, flat_b.index_select(0, rows.b_src))  # y_b's rows from the second pass
    return flat.view(R, T, H, hd).transpose(1, 2)


# -----------------------------------------------------------------------------
# The model and its KV cache


class KVCache:
    """Preallocated keys and values for every layer, plus which slots hold real tokens (not padding).
    forward(..., kv_cache=cache) writes its T new positions at cache.pos and then advances cache.pos."""

    def __init__(self, model, batch_size, max_len, dtype=None, device=None):
        c, p = model.config, model.model.embed_tokens.weight
        shape = (batch_size, c.num_key_value_heads, max_len, c.head_dim)
        kw = dict(dtype=dtype or p.dtype, device=device or p.device)
        self.k = [torch.zeros(shape, **kw) for _ in range(c.num_hidden_layers)]
        self.v = [torch.zeros(shape, **kw) for _ in range(c.num_hidden_layers)]
        self.mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=kw["device"])  # (B, max_len)
        self.max_len, self.pos = max_len, 0

    def update(self, layer_idx, k, v):
        end = self.pos + k.shape[2]
        self.k[layer_idx][:, :, self.pos:end] = k
        self.v[layer_idx][:, :, self.pos:end] = v
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]


def attention_mask_for(key_mask, past, T, window):
    """(B, 1, T, S) bool, True where query t may attend key s: causal, not padding, and inside the window."""
    S = key_mask.shape[1]
    q_idx = torch.arange(past, past + T, device=key_mask.device)[:, None]
    k_idx = torch.arange(S, device=key_mask.device)[None, :]
    allowed = k_idx <= q_idx
    if window is not None:
        allowed = allowed & (k_idx > q_idx - window)
    mask = allowed[None, None] & key_mask[:, None, None, :]
    # A padding query can have no key at all (left padding); let it see every key so its row stays finite
    # (its output is never used, but a NaN there would poison sums that multiply it by zero)
    return mask | ~mask.any(-1, keepdim=True)


class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            # _weight skips Embedding's own random init: init_weights sets it, and on the meta device (load_model)
            # a normal_ call would import torch's compiler stack, seconds of start-up
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size,
                                      _weight=torch.empty(config.vocab_size, config.hidden_size)),
            layers=nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each block in backward: activations cost one block
        self.init_weights()
        self.tie_weights()

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _apply(self, fn, recurse=True):
        # .to() / .cuda() may replace Parameters instead of updating them in place; re-tie afterwards
        super()._apply(fn, recurse)
        self.tie_weights()
        return self

    @torch.no_grad()
    def init_weights(self):
        """Norm weights 1 and biases 0; matrices Normal(0, 0.02), and 0.02 / sqrt(2 * layers) for the two
        projections that write into the residual stream, so its variance does not grow with depth (GPT-2 paper,
        sec. 2.3)."""
        if self.lm_head.weight.is_meta:  # load_model builds on the meta device and assigns real tensors
            return
        std = 0.02
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.num_hidden_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_cache=None):
        """input_ids (B, T); attention_mask (B, T) with 1 for tokens, 0 for padding on either side, a
        (B, 1, T, T) bool mask, True where query t may see key s, or PackedRows (both need position_ids and no
        cache; a sliding window then counts positions, which restart after x in a packed row).
        Returns the final-norm hidden states (B, T, D); logits would be hidden @ self.lm_head.weight.T."""
        B, T = input_ids.shape
        packed = isinstance(attention_mask, PackedRows)
        full = packed or (attention_mask is not None and attention_mask.dim() == 4)
        if full and (kv_cache is not None or position_ids is None):
            raise ValueError("a (B, 1, T, T) or PackedRows attention_mask needs position_ids and no kv_cache")
        mask = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None or full
                else attention_mask.to(torch.bool))
        past = 0
        if kv_cache is not None:
            past = kv_cache.pos
            if past + T > kv_cache.max_len:
                raise ValueError(f"KV cache holds {kv_cache.max_len} positions; {past} used, {T} more requested")
            kv_cache.mask[:, past:past + T] = mask
            mask = kv_cache.mask[:, :past + T]  # (B, S) over every cached key
        if position_ids is None:  # count real tokens only, so padding never shifts positions
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # (B, T)

        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = rope_cos_sin(self.config, position_ids, x.dtype)
        windows = [self.config.sliding_window if self.config.layer_uses_window(i) else None
                   for i in range(self.config.num_hidden_layers)]
        if full:  # per window size: PackedRows told its window, or the mask cut to keys within the window
            masks = {}
            for window in set(windows):
                if packed:
                    masks[window] = dataclasses.replace(attention_mask, window=window)
                elif window is None:
                    masks[window] = attention_mask.to(torch.bool)
                else:  # by positions, so a packed row's y_b measures its distance to x as its unpacked row does
                    near = position_ids[:, None, None, :] > position_ids[:, None, :, None] - window  # (B, 1, T, T)
                    masks[window] = attention_mask.to(torch.bool) & near
        else:
            # Reading the mask waits for the GPU, so only when there is one to read (a training step passes none)
            padded = (attention_mask is not None or kv_cache is not None) and not bool(mask.all())
            # Per window size, what Attention gets: None, plain causal (training, or a prompt with no padding);
            # "all", one new token that sees the whole cache; or a (B, 1, T, S) tensor for padding, a window
            # shorter than the keys, or several new tokens after a cache
            masks = {}
            for window in set(windows):
                if padded or (window is not None and past + T > window) or (past > 0 and T > 1):
                    masks[window] = attention_mask_for(mask, past, T, window)
                else:
                    masks[window] = "all" if past > 0 else None  # no mask tensor: SDPA's own paths

        for layer, window in zip(self.model.layers, windows):
            layer_mask = masks[window]
            if self.gradient_checkpointing and self.training and kv_cache is None and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, layer_mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, layer_mask, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.model.norm(x)

    def logits(self, hidden):
        return hidden @ self.lm_head.weight.T  # (..., V)


# -----------------------------------------------------------------------------
# Checkpoints: Hugging Face folders of config.json + safetensors (one file, or shards with an index)

WEIGHTS_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"
SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")


def model_folder(path):
    """`path` as a Path, checked to be a folder: a mistyped --model or one naming a file inside the folder would
    otherwise be reported as a missing config.json or tokenizer.json under it."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: " + ("not a folder; a checkpoint is the folder that holds config.json, the "
                                               "safetensors and the tokenizer files" if path.exists() else
                                               "model folder not found"))
    return path


def checkpoint_files(path):
    """{tensor name: file} for a folder, reading only the safetensors headers (never the data)."""
    path = Path(path)
    if (path / WEIGHTS_NAME).is_file():  # one file: its header is the list (preferred to an index, as by transformers)
        where = dict.fromkeys(safetensors_keys(path / WEIGHTS_NAME), path / WEIGHTS_NAME)
    elif (path / INDEX_NAME).is_file():
        index = read_json(path / INDEX_NAME)
        if not isinstance(index.get("weight_map"), dict):
            raise ValueError(f"{path / INDEX_NAME}: no 'weight_map' object")
        where = {}
        for name, shard in index["weight_map"].items():
            if not isinstance(shard, str) or Path(shard).name != shard:
                raise ValueError(f"{path / INDEX_NAME}: shard {shard!r} of tensor {name!r} is not a file name in "
                                 f"that folder")
            where[name] = path / shard
        for name, file in where.items():
            if not file.is_file():
                raise FileNotFoundError(f"{file}: shard not found (listed in {path / INDEX_NAME} for tensor {name!r})")
        for file in set(where.values()):  # every tensor the index promises must be in its shard
            present = set(safetensors_keys(file))
            for name in (n for n, f in where.items() if f == file and n not in present):
                raise ValueError(f"missing tensor {name!r}: not in {file} (where {INDEX_NAME} says it is)")
    else:
        raise FileNotFoundError(f"{path}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found")
    return where


def safetensors_keys(file):
    try:
        with safe_open(file, framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error type for a bad header or a truncated file
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def load_model(path, dtype=None, device="cpu"):
    """Load a Hugging Face checkpoint folder into a Transformer, in the checkpoint's dtype unless `dtype` says
    otherwise. The module is built on the meta device (no memory) and each tensor is read from its memory-mapped
    file, converted and placed on its own, so the peak stays near one copy of the weights."""
    path = model_folder(path)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; expected one of {list(DTYPES)}")
        dtype = DTYPES[dtype]
    config = ModelConfig.from_hf(path / "config.json")
    where = checkpoint_files(path)
    if "lm_head.weight" not in where and not config.tie_word_embeddings:
        # transformers would start such a head from random numbers and only warn; guessing "tied" would be no better
        raise ValueError(f"missing tensor 'lm_head.weight' in {path}, and {path / 'config.json'} does not say "
                         f"\"tie_word_embeddings\": true; set it there if the head is the embedding matrix")
    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
        where.pop("lm_head.weight", None)  # a tied checkpoint may still store a copy; transformers ignores it too
    for name in where.keys() - expected.keys():
        raise ValueError(f"unexpected tensor {name!r} in {where[name]} (not part of a {config.model_type} model "
                         f"with {config.num_hidden_layers} layers)")
    for name in expected.keys() - where.keys():
        listing = path / WEIGHTS_NAME if (path / WEIGHTS_NAME).is_file() else path / INDEX_NAME  # as checkpoint_files
        raise ValueError(f"missing tensor {name!r}: not found in {listing}")

    if dtype is None:  # the checkpoint's own dtype: the embedding's (every model has one)
        with safe_open(where["model.embed_tokens.weight"], framework="pt") as f:
            stored = f.get_slice("model.embed_tokens.weight").get_dtype()
        dtype = SAFETENSORS_FLOATS.get(stored, torch.float32)
    state = {}
    for file in sorted(set(where.values())):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in (n for n in where if where[n] == file):
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(expected[name]):
                    raise ValueError(f"tensor {name!r} in {file} has shape {list(shape)}, expected {list(expected[name])}")
                try:
                    t = f.get_tensor(name)
                except Exception as e:
                    raise ValueError(f"tensor {name!r} in {file} cannot be read ({e})") from None
                if not t.is_floating_point():
                    raise ValueError(f"tensor {name!r} in {file} has dtype {t.dtype}, expected a floating-point one "
                                     f"(quantised checkpoints are not supported)")
                state[name] = t.to(device=device, dtype=dtype)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    config.torch_dtype = str(dtype).removeprefix("torch.")
    return model.eval()


def save_model(model, path, tokenizer_dir=None, max_shard_bytes=2 * 1024**3):
    """Write a folder that both load_model and transformers read: config.json, generation_config.json and the
    weights (one model.safetensors, or shards plus an index above max_shard_bytes; a tied head is stored once),
    plus the tokenizer files from tokenizer_dir. Everything is first written to a folder beside `path`; only
    when all of it is complete are the files moved in (config.json last) and an earlier save's weight files
    removed, so a failure while writing (a full disk, a missing tokenizer) leaves a model already at `path`
    as it was. Other files in `path` are left alone."""
    path = Path(os.path.abspath(path))  # "." has no name to stage beside
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path}: a file is in the way of the model folder")
    if tokenizer_dir is not None and not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{Path(tokenizer_dir) / 'tokenizer.json'}: file not found")
    config = model.config
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        del tensors["lm_head.weight"]
    dtype = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")

    shards, size = [{}], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    names = [WEIGHTS_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    stage = path.with_name(f".{path.name}.saving")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        for name, shard in zip(names, shards):
            save_file(shard, stage / name, metadata={"format": "pt"})
        if len(shards) > 1:
            weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            write_json_atomic(stage / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        if tokenizer_dir is not None:  # the tokenizer folder's generation_config.json, if any, replaces ours
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copyfile(Path(tokenizer_dir) / name, stage / name)
        if not (stage / "generation_config.json").exists():
            write_json_atomic(stage / "generation_config.json",
                              {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id})
        write_json_atomic(stage / "config.json", {**config.to_hf(), "torch_dtype": dtype})
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    path.mkdir(parents=True, exist_ok=True)
    weights = names + ([INDEX_NAME] if len(shards) > 1 else [])
    for name in weights:
        os.replace(stage / name, path / name)
    for stale in [path / WEIGHTS_NAME, path / INDEX_NAME, *path.glob("model-*-of-*.safetensors")]:
        if stale.name not in weights:
            stale.unlink(missing_ok=True)  # weights of an earlier save would shadow or mix with these
    for file in sorted(stage.iterdir(), key=lambda f: f.name == "config.json"):  # config.json last
        os.replace(file, path / file.name)
    stage.rmdir()


# -----------------------------------------------------------------------------
# Tokenizer and chat template (ChatML and Llama 3 families, rendered without jinja)

JINJA_STRING = re.compile(r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"")  # a quoted literal, escapes kept
CHATML_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.S)
LLAMA31_DATE = re.compile(r"set date_string = \"([^\"]+)\"")


def chatml_default_system(template):
    """The system message a ChatML template writes when the conversation has none (Qwen2's "You are a helpful
    assistant."), or None. It is the first string literal in the template that holds a whole system turn;
    the literal's escapes are read as jinja reads them (\\n, \\\\, \\', ...), so any text fits, braces included."""
    for single, double in JINJA_STRING.findall(template):
        text = re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "r": "\r"}.get(m[1], m[1]), single or double)
        found = CHATML_DEFAULT_SYSTEM.search(text)
        if found:
            return found[1]
    return None


def check_messages(messages):
    """A chat that render_chat can write: at least one message, each {"role", "content"} with string values
    and a system, user or assistant role (templates render tool turns their own way)."""
    if not messages:
        raise ValueError("a chat needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} needs string 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ("system", "user", "assistant"):
            raise ValueError(f"message {i} has role {m['role']!r}; only system, user and assistant turns are "
                             f"rendered (tools are not supported)")


class Tokenizer:
    """tokenizer.json through the `tokenizers` library, plus the special tokens and chat format described by
    tokenizer_config.json and generation_config.json. encode never adds BOS: chat templates place it."""

    def __init__(self, path):
        path = model_folder(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"{file}: file not found")
        try:
            from tokenizers import Tokenizer as HFTokenizer
            self.tokenizer = HFTokenizer.from_file(str(file))
        except Exception as e:
            raise ValueError(f"{file}: not a readable tokenizer.json ({e})") from None
        config = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
        gen = read_json(path / "generation_config.json") if (path / "generation_config.json").is_file() else {}
        self.source = path

        template = config.get("chat_template") or ""
        if isinstance(template, list):  # several named templates: use the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), "")
        if (path / "chat_template.jinja").is_file():  # where newer transformers save it; it wins there too
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        self.chat_template = template
        self.thinks = "<think>" in template  # QwQ's opens a reasoning block after the prompt: not rendered here

        def special(key):
            token = config.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            return token, self.token_id(token, f"{path / 'tokenizer_config.json'} {key}") if token else None

        self.bos_token, self.bos_token_id = special("bos_token")
        self.eos_token, self.eos_token_id = special("eos_token")
        gen_eos = gen.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        if self.eos_token_id is None and gen_eos:
            self.eos_token_id = gen_eos[0]
        self.pad_token, self.pad_token_id = special("pad_token")  # defaults to eos, once eos is final (below)

        # The family comes from the template; a tokenizer without one is recognised by its special tokens
        vocab_has = lambda t: self.tokenizer.token_to_id(t) is not None  # noqa: E731
        if "<|start_header_id|>" in template or (not template and vocab_has("<|start_header_id|>")):
            self.family, self.end_of_turn = "llama3", "<|eot_id|>"
        elif "<|im_start|>" in template or (not template and vocab_has("<|im_start|>")):
            self.family, self.end_of_turn = "chatml", "<|im_end|>"
        else:
            self.family, self.end_of_turn = None, None
        self.end_of_turn_id = self.token_id(self.end_of_turn, str(file)) if self.end_of_turn else None
        if self.eos_token_id is None:
            self.eos_token_id = self.end_of_turn_id
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_id
        # Special tokens (turn markers, end of text): a message's text that spells one would be read as that
        # control token, not as text (data.py counts such training data: EncodeStats.special_text)
        self.special_tokens = sorted(t.content for t in self.tokenizer.get_added_tokens_decoder().values()
                                     if t.special)
        # Generation stops at the end of a turn as well as at every eos the configs name
        self.eos_token_ids = list(dict.fromkeys(
            i for i in [self.eos_token_id, *gen_eos, self.end_of_turn_id] if i is not None))

        # What the template adds on its own: ChatML's default system message (Qwen2, SmolLM2), and the
        # knowledge-date system header of Llama 3.1 (always present; "Today Date" as the template sets it)
        self.default_system = chatml_default_system(template) if self.family == "chatml" else None
        self.date_header = None
        if self.family == "llama3" and "Cutting Knowledge Date" in template:
            if "strftime_now" in template:  # Llama 3.2: transformers passes today's date
                date = datetime.date.today().strftime("%d %b %Y")
            else:
                date = LLAMA31_DATE.search(template).group(1) if LLAMA31_DATE.search(template) else "26 Jul 2024"
            self.date_header = f"Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"

    def token_id(self, token, where):
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"{where}: token {token!r} is not in the vocabulary")
        return i

    @property
    def vocab_size(self):
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __len__(self):
        return self.vocab_size

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=True):
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages, add_generation_prompt=True):
        """The text the model's own chat template produces for `messages` ([{"role", "content"}, ...])."""
        check_messages(messages)
        if self.thinks:
            raise ValueError(f"{self.source}: the chat template writes <think> reasoning blocks, which this "
                             f"renderer does not reproduce; only plain ChatML and Llama 3 templates are rendered")
        if self.family == "chatml":
            text = ""
            if self.default_system is not None and messages[0]["role"] != "system":
                text += f"<|im_start|>system\n{self.default_system}<|im_end|>\n"
            text += "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        if self.family == "llama3":
            header = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"  # noqa: E731
            text = self.bos_token or ""
            if self.date_header is not None:  # Llama 3.1: the system turn is always there
                system = messages[0]["content"].strip() if messages[0]["role"] == "system" else ""
                messages = messages[1:] if messages[0]["role"] == "system" else messages
                text += header("system") + self.date_header + system + "<|eot_id|>"
            text += "".join(header(m["role"]) + m["content"].strip() + "<|eot_id|>" for m in messages)  # jinja trim
            return text + (header("assistant") if add_generation_prompt else "")
        found = f"a template that starts {self.chat_template[:60]!r}" if self.chat_template else "no template"
        raise ValueError(f"{self.source}: the chat template is neither ChatML nor Llama 3 ({found}, in "
                         f"tokenizer_config.json or chat_template.jinja); only those two families are rendered")

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return self.encode(self.render_chat(messages, add_generation_prompt))


def load_tokenizer(path):
    return Tokenizer(path)


# -----------------------------------------------------------------------------
# Generation


def sample_next(logits, temperature, top_p, generator):
    """logits (B, V) float32 -> next token ids (B,). Greedy when temperature is 0, else nucleus sampling:
    keep the smallest set of most likely tokens whose probability reaches top_p (Holtzman et al. 2019)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # probability mass ranked above each token
        sorted_probs[before >= top_p] = 0.0  # the top token always survives (before == 0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=0.0, top_p=1.0, eos_token_ids=None, seed=None,
             pad_token_id=0, progress=False, use_cache=True):
    """Continue each prompt (a list of token ids) by up to max_new_tokens tokens; returns the new tokens of each,
    cut before its first EOS. Prompts are left-padded into one batch. With use_cache=False every step recomputes
    the whole prefix (the baseline bench.py compares against); both give the same greedy tokens. seed: an int
    (sampling starts a generator of its own), or a torch.Generator on the model's device that successive calls
    keep drawing from (so that batch after batch does not repeat the same draws)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs a non-empty list of non-empty prompts")
    if max_new_tokens < 0 or temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"generate needs max_new_tokens >= 0, temperature >= 0 and 0 < top_p <= 1; got "
                         f"{max_new_tokens}, {temperature}, {top_p}")
    V = model.config.vocab_size
    for i, p in enumerate(prompts):
        if not all(0 <= t < V for t in p):
            raise ValueError(f"prompt {i} has token ids outside the model's vocabulary of {V} "
                             f"(min {min(p)}, max {max(p)}): is the tokenizer the model's?")
    if max(len(p) for p in prompts) + max_new_tokens > model.config.max_position_embeddings:
        warnings.warn(f"prompt + max_new_tokens exceeds the model's max_position_embeddings "
                      f"({model.config.max_position_embeddings}): positions beyond it were never trained")
    device = model.model.embed_tokens.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, P), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros(B, P, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):] = 1
    eos = torch.tensor(sorted(set(eos_token_ids or [])), dtype=torch.long, device=device)
    generator = seed if isinstance(seed, torch.Generator) else (
        torch.Generator(device=device).manual_seed(seed) if seed is not None else None)
    cache = KVCache(model, B, P + max_new_tokens) if use_cache else None
    was_training = model.training
    model.eval()

    out = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step_ids, step_mask = ids, mask
    long_run = B * max_new_tokens >= 16384
    bar = tqdm(range(max_new_tokens), desc="generate", leave=False,
               disable=False if progress else (None if long_run else True))  # None: only on a terminal
    n = 0
    for n in bar:
        hidden = model(step_ids, attention_mask=step_mask, kv_cache=cache)[:, -1]  # (B, D)
        token = sample_next(model.logits(hidden).float(), temperature, top_p, generator)  # (B,)
        token = torch.where(done, torch.full_like(token, pad_token_id), token)
        out[:, n] = token
        done |= torch.isin(token, eos)
        if bool(done.all()):
            break
        if use_cache:
            step_ids, step_mask = token[:, None], torch.ones(B, 1, dtype=torch.long, device=device)
        else:
            ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            step_ids, step_mask = ids, mask
    bar.close()
    model.train(was_training)

    results, stop_ids = [], set(eos.tolist())
    for row in out[:, :n + 1].tolist():
        stop = next((j for j, t in enumerate(row) if t in stop_ids), len(row))
        results.append(row[:stop])
    return results


# -----------------------------------------------------------------------------
# Command line: chat with a checkpoint


def main():
    parser = argparse.ArgumentParser(description="Answer one prompt with a checkpoint folder, using its chat template.")
    parser.add_argument("--model", required=True, help="checkpoint folder (config.json, safetensors, tokenizer files)")
    parser.add_argument("--prompt", required=True, help="the user message")
    parser.add_argument("--system", default=None, help="optional system message")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="upper bound on the reply length in tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 means greedy decoding")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with temperature > 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="weights dtype (default: the checkpoint's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but this machine has no CUDA device")
    try:
        tok = load_tokenizer(args.model)
        model = load_model(args.model, dtype=DTYPES.get(args.dtype), device=args.device)
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
        reply = generate(model, [prompt], args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         eos_token_ids=tok.eos_token_ids, seed=args.seed, pad_token_id=tok.pad_token_id,
                         progress=True)[0]
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    print(tok.decode(reply))


if __name__ == "__main__":
    main()
