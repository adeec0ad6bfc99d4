"""model.py: logit parity with transformers on committed fixtures, checkpoints, padding, cache, tokenizer, generate."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as M

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CHECKPOINTS = ["llama_gqa_untied", "qwen2_bias_tied_linear", "qwen2_window", "mistral_head_dim_window",
               "llama3_rope", "llama_sharded_bf16"]


def logits_of(model, ids, mask=None):
    with torch.no_grad():
        return model.logits(model(ids, attention_mask=mask)).float()


def copy_fixture(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


# -----------------------------------------------------------------------------
# Parity with transformers (fixtures written by tests/make_fixtures.py)


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_logits_match_transformers(name):
    """Float32 logits on fixed ids equal transformers' within 1e-4, for every checkpoint kind."""
    expected = load_file(FIXTURES / name / "expected.safetensors")
    model = M.load_model(FIXTURES / name, dtype=torch.float32)
    diff = (logits_of(model, expected["input_ids"]) - expected["logits"]).abs().max().item()
    assert diff <= 1e-4, f"{name}: max abs logit diff {diff:.3g}"


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_left_and_right_padding_match_transformers(name):
    """Left- and right-padded batches give transformers' per-sequence logits at every real token."""
    e = load_file(FIXTURES / name / "expected.safetensors")
    model = M.load_model(FIXTURES / name, dtype=torch.float32)
    mask = e["padded_mask"]
    left = logits_of(model, e["padded_ids"], mask)
    diff_left = ((left - e["padded_logits"]).abs() * mask[..., None]).max().item()
    right_ids, right_mask = torch.zeros_like(e["padded_ids"]), torch.zeros_like(mask)
    for i, n in enumerate(mask.sum(1).tolist()):
        right_ids[i, :n], right_mask[i, :n] = e["padded_ids"][i, -n:], 1
    right = logits_of(model, right_ids, right_mask)
    diff_right = max((right[i, :n] - e["padded_logits"][i, -n:]).abs().max().item()
                     for i, n in enumerate(mask.sum(1).tolist()))
    # the longest row is unpadded, so it must also equal the plain unpadded run
    diff_unpadded = (left[0] - e["logits"][0]).abs().max().item()
    assert max(diff_left, diff_right, diff_unpadded) <= 1e-4, \
        f"{name}: left {diff_left:.3g}, right {diff_right:.3g}, unpadded row {diff_unpadded:.3g}"


def test_fixture_checkpoints_cover_the_features():
    """The fixtures hold what the parity tests claim: both config layouts, window, tying, head_dim, shards, bf16."""
    raw = {n: json.loads((FIXTURES / n / "config.json").read_text()) for n in CHECKPOINTS}
    assert "rope_parameters" in raw["qwen2_bias_tied_linear"] and "dtype" in raw["qwen2_bias_tied_linear"]
    assert "rope_scaling" in raw["llama3_rope"] and "torch_dtype" in raw["llama3_rope"]
    configs = {n: M.ModelConfig.from_hf(FIXTURES / n) for n in CHECKPOINTS}
    assert configs["llama3_rope"].rope_scaling["rope_type"] == "llama3"
    assert configs["qwen2_bias_tied_linear"].rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert configs["qwen2_bias_tied_linear"].sliding_window is None  # set in the file, but use_sliding_window is false
    assert (configs["qwen2_window"].sliding_window, configs["qwen2_window"].max_window_layers) == (5, 1)
    mistral = configs["mistral_head_dim_window"]
    assert mistral.head_dim * mistral.num_attention_heads != mistral.hidden_size and mistral.sliding_window == 6
    assert configs["llama_gqa_untied"].num_key_value_heads < configs["llama_gqa_untied"].num_attention_heads
    assert len(list((FIXTURES / "llama_sharded_bf16").glob("model-*.safetensors"))) == 3
    assert M.load_model(FIXTURES / "llama_sharded_bf16").lm_head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("name,change", [
    ("mistral_head_dim_window", dict(sliding_window=None)),
    ("qwen2_window", dict(max_window_layers=0)),
    ("llama3_rope", dict(rope_scaling=None)),
    ("qwen2_bias_tied_linear", dict(rope_scaling=None)),
])
def test_fixtures_are_sensitive_to_the_feature(name, change):
    """Dropping the window, the per-layer window choice or the RoPE scaling moves logits far from the reference."""
    e = load_file(FIXTURES / name / "expected.safetensors")
    model = M.load_model(FIXTURES / name, dtype=torch.float32)
    for key, value in change.items():
        setattr(model.config, key, value)
    diff = (logits_of(model, e["input_ids"]) - e["logits"]).abs().max().item()
    assert diff > 1e-2, f"{name} with {change}: diff only {diff:.3g}"


def test_saved_folder_loaded_by_transformers_record():
    """The committed record of make_fixtures.py: transformers read our save_model output with equal logits."""
    record = json.loads((FIXTURES / "transformers_roundtrip.json").read_text())
    assert len(record["cases"]) >= 4, record
    for name, case in record["cases"].items():
        assert case["max_abs_logit_diff"] <= 1e-4, f"{name}: {case}"
    assert any("model.safetensors.index.json" in c["files"] for c in record["cases"].values())


# -----------------------------------------------------------------------------
# Config


def test_config_layouts_agree():
    """The legacy and transformers-5 layouts of the same config parse to the same ModelConfig."""
    legacy = json.loads((FIXTURES / "llama3_rope" / "config.json").read_text())
    new = {k: v for k, v in legacy.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    new["rope_parameters"] = {**legacy["rope_scaling"], "rope_theta": legacy["rope_theta"]}
    new["dtype"] = legacy["torch_dtype"]
    assert M.ModelConfig.from_hf(legacy) == M.ModelConfig.from_hf(new)
    # and to_hf -> from_hf is the identity
    c = M.ModelConfig.from_hf(FIXTURES / "qwen2_window")
    assert M.ModelConfig.from_hf(c.to_hf()) == c


@pytest.mark.parametrize("change,message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling 'yarn' is not supported"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "RoPE scaling 'dynamic' is not supported"),
    ({"hidden_act": "gelu"}, "only a bias-free SiLU MLP"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
])
def test_config_errors(change, message):
    """Unsupported config.json contents are refused with a message naming the field."""
    hf = {**json.loads((FIXTURES / "llama_gqa_untied" / "config.json").read_text()), **change}
    with pytest.raises(ValueError, match=message):
        M.ModelConfig.from_hf(hf)


def test_toy_presets_size_and_init():
    """toy_config gives a few million parameters, std-0.02 weights and smaller residual projections."""
    config = M.toy_config(vocab_size=512)
    torch.manual_seed(0)
    model = M.Transformer(config)
    n = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < n < 10_000_000, n
    q_std = model.model.layers[0].self_attn.q_proj.weight.std().item()
    o_std = model.model.layers[0].self_attn.o_proj.weight.std().item()
    assert abs(q_std - 0.02) < 0.002 and o_std < 0.6 * q_std, (q_std, o_std)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        M.toy_config(512, preset="huge")


# -----------------------------------------------------------------------------
# The module


def test_forward_returns_hidden_states_and_keeps_default_dtype(tiny_model, tiny_config):
    """forward gives (B, T, D) final-norm hidden states; a bf16 model runs without touching the default dtype."""
    ids = torch.randint(0, tiny_config.vocab_size, (2, 7))
    h = tiny_model(ids)
    assert h.shape == (2, 7, tiny_config.hidden_size), h.shape
    rms = h.pow(2).mean(-1).sqrt() / tiny_model.model.norm.weight.pow(2).mean().sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=0.05), rms  # RMSNorm output with unit weights
    hb = tiny_model.to(torch.bfloat16)(ids)
    assert hb.dtype == torch.bfloat16 and torch.get_default_dtype() == torch.float32
    assert tiny_model.lm_head.weight is tiny_model.model.embed_tokens.weight, "tie lost by .to()"


def test_gradient_checkpointing_same_gradients(tiny_model, tiny_config):
    """With gradient_checkpointing the loss and gradients equal the plain backward pass."""
    ids = torch.randint(0, tiny_config.vocab_size, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    grads = []
    for flag in (False, True):
        tiny_model.zero_grad()
        tiny_model.gradient_checkpointing = flag
        tiny_model.train()
        loss = tiny_model.logits(tiny_model(ids, mask)).logsumexp(-1).mean()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in tiny_model.parameters()]))
    diff = (grads[0] - grads[1]).abs().max().item()
    assert diff < 1e-6, diff


# -----------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize("max_shard_bytes", [2 * 1024**3, 20_000])
def test_save_load_round_trip(tiny_model, tiny_config, chatml_tokenizer_dir, tmp_path, max_shard_bytes):
    """save_model then load_model gives the same logits; tied head stored once; sharding and tokenizer files."""
    save_dir = tmp_path / "ckpt"
    M.save_model(tiny_model, save_dir, tokenizer_dir=chatml_tokenizer_dir, max_shard_bytes=max_shard_bytes)
    loaded = M.load_model(save_dir)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 11))
    diff = (logits_of(loaded, ids) - logits_of(tiny_model, ids)).abs().max().item()
    assert diff == 0.0, diff
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    names = sorted(p.name for p in save_dir.iterdir())
    sharded = max_shard_bytes < 2**20
    assert ("model.safetensors.index.json" in names) == sharded and ("model.safetensors" in names) != sharded, names
    stored = {}
    for f in save_dir.glob("*.safetensors"):
        stored.update(load_file(f))
    assert "lm_head.weight" not in stored and len(stored) == len(tiny_model.state_dict()) - 1, sorted(stored)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"} <= set(names)
    assert not [n for n in names if ".tmp" in n], names
    assert json.loads((save_dir / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_save_over_sharded_removes_stale_weights(tiny_model, tmp_path):
    """Saving unsharded over a sharded folder leaves only the new weights file."""
    M.save_model(tiny_model, tmp_path, max_shard_bytes=20_000)
    M.save_model(tiny_model, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]


def test_missing_lm_head_means_tied(tmp_path):
    """A checkpoint without lm_head.weight loads with the head tied to the embedding."""
    d = copy_fixture("llama_gqa_untied", tmp_path)
    weights = load_file(d / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, d / "model.safetensors")
    model = M.load_model(d)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight


def test_load_dtype_argument():
    """load_model keeps the checkpoint dtype by default and converts when asked."""
    assert M.load_model(FIXTURES / "llama_gqa_untied").lm_head.weight.dtype == torch.float32
    m = M.load_model(FIXTURES / "llama_gqa_untied", dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16} and m.config.torch_dtype == "bfloat16"


def edit_weights(d, fn, file="model.safetensors"):
    weights = load_file(d / file)
    fn(weights)
    save_file(weights, d / file)


def test_error_missing_tensor(tmp_path):
    """A missing tensor is named together with the folder."""
    d = copy_fixture("llama_gqa_untied", tmp_path)
    edit_weights(d, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'.*llama_gqa_untied"):
        M.load_model(d)


def test_error_unexpected_tensor(tmp_path):
    """An extra tensor is named together with its file."""
    d = copy_fixture("llama_gqa_untied", tmp_path)
    edit_weights(d, lambda w: w.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model.layers.2.mlp.up_proj.weight' in .*model.safetensors"):
        M.load_model(d)


def test_error_wrong_shape(tmp_path):
    """A mis-shaped tensor is named with its file, its shape and the expected one."""
    d = copy_fixture("llama_gqa_untied", tmp_path)
    edit_weights(d, lambda w: w.update({"model.norm.weight": torch.ones(31)}))
    with pytest.raises(ValueError, match=r"tensor 'model.norm.weight' in .*model.safetensors has shape \[31\], expected \[32\]"):
        M.load_model(d)


def test_error_corrupt_file(tmp_path):
    """A truncated safetensors file is reported by name."""
    d = copy_fixture("llama_gqa_untied", tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file"):
        M.load_model(d)


def test_error_missing_shard(tmp_path):
    """A shard listed in the index but absent is named with a tensor it should hold."""
    d = copy_fixture("llama_sharded_bf16", tmp_path)
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00003.safetensors: shard not found .*for tensor"):
        M.load_model(d)


def test_error_no_weights_and_bad_config(tmp_path):
    """A folder without weights, and a config.json that is not JSON, are errors naming the path."""
    d = copy_fixture("llama_gqa_untied", tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        M.load_model(d)
    (d / "config.json").write_text('{"model_type": "llama",\n oops}')
    with pytest.raises(ValueError, match=r"config.json: not valid JSON \(line 2"):
        M.load_model(d)
