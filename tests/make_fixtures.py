"""Make the reference fixtures in tests/fixtures/ with transformers (run by hand, never by pytest).

    /work/refenv/bin/python tests/make_fixtures.py        # a venv with torch 2.13.0, transformers 5, jinja2
    /work/refenv/bin/python tests/make_fixtures.py chat   # only one part: checkpoints | chat | roundtrip

1. Tiny random checkpoints of every kind model.py must load, written by transformers' save_pretrained (some
   rewritten into the legacy config.json layout), with transformers' float32 logits on fixed ids, unpadded and
   left-padded (positions passed explicitly as cumsum(mask) - 1), in expected.safetensors.
2. Chat-template parity: small byte-level BPE tokenizers carrying the real special tokens and the real chat
   templates of Qwen2, SmolLM2, Llama 3 and Llama 3.1, and the ids transformers' apply_chat_template gives.
3. One check that folders written by our save_model load in transformers with the same logits
   (transformers_roundtrip.json records the differences).
"""

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
sys.path.insert(0, str(HERE.parent))
import model as ours  # noqa: E402

VOCAB, T = 128, 16
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

CHECKPOINTS = {
    # name: (transformers config class, kwargs, write the legacy config layout?, save dtype, max shard size)
    "llama_gqa_untied": ("LlamaConfig", dict(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), True, torch.float32, None),
    "qwen2_bias_tied_linear": ("Qwen2Config", dict(tie_word_embeddings=True, sliding_window=4, use_sliding_window=False,
                                                   rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}), False, torch.float32, None),
    "qwen2_window": ("Qwen2Config", dict(tie_word_embeddings=True, sliding_window=5, use_sliding_window=True, max_window_layers=1,
                                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), True, torch.float32, None),
    "mistral_head_dim_window": ("MistralConfig", dict(head_dim=16, sliding_window=6, tie_word_embeddings=False,
                                                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), False, torch.float32, None),
    "llama3_rope": ("LlamaConfig", dict(tie_word_embeddings=True, attention_bias=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}), True, torch.float32, None),
    "llama_sharded_bf16": ("LlamaConfig", dict(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
                           False, torch.bfloat16, "20KB"),
}


def legacy_layout(cfg):
    """transformers-5 config.json -> the older layout (rope_theta + rope_scaling + torch_dtype)."""
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    cfg["rope_scaling"] = None if rope_type == "default" else {"rope_type": rope_type, **rope}
    cfg["torch_dtype"] = cfg.pop("dtype")
    return cfg


def randomize(model, gen):
    """Weights large enough that logits spread over several units (the default init gives near-zero logits)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5 * (3.0 if "embed" in name else 1.0))


def padded_batch(ids):
    """Three sequences of lengths 16, 11, 6 taken from ids, left-padded with token 0."""
    lengths = [T, 11, 6]
    padded = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        padded[i, T - n:] = ids[i % 2, :n]
        mask[i, T - n:] = 1
    return padded, mask


def hf_logits(model, ids, mask=None):
    with torch.no_grad():
        if mask is None:
            return model(input_ids=ids).logits.float()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()


def make_checkpoints():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, T), generator=gen)
    for name, (cls_name, extra, legacy, dtype, shard) in CHECKPOINTS.items():
        out = FIXTURES / name
        shutil.rmtree(out, ignore_errors=True)
        config = getattr(transformers, cls_name)(**SMALL, **extra)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        randomize(model, gen)
        model.to(dtype).save_pretrained(out, max_shard_size=shard or "100MB")
        cfg = json.loads((out / "config.json").read_text())
        if legacy:
            (out / "config.json").write_text(json.dumps(legacy_layout(cfg), indent=2))
        (out / "generation_config.json").unlink(missing_ok=True)
        # reload from disk (so transformers reads the layout we just wrote), in float32
        ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        padded, mask = padded_batch(ids)
        save_file({"input_ids": ids, "logits": hf_logits(ref, ids), "padded_ids": padded, "padded_mask": mask,
                   "padded_logits": hf_logits(ref, padded, mask)}, out / "expected.safetensors")
        print(name, "files:", sorted(p.name for p in out.iterdir()))


# -----------------------------------------------------------------------------
# Chat templates, copied from the tokenizer_config.json of each model on the Hugging Face Hub

TEMPLATE_FILE = FIXTURES / "chat" / "templates.json"
TEMPLATES = json.loads(TEMPLATE_FILE.read_text()) if TEMPLATE_FILE.exists() else {}
CONVERSATIONS = [
    [{"role": "user", "content": "Hello there!"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Name a river."}],
    [{"role": "user", "content": "  Two plus two?  "}, {"role": "assistant", "content": "Four."},
     {"role": "user", "content": "And times three?\nShow work."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
]


def make_tokenizer(specials, bos, eos, pad, template, out):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [c["content"] for conv in CONVERSATIONS for c in conv] + ["You are a helpful assistant. system user"] * 3
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": pad,
              "chat_template": template, "model_max_length": 4096}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def make_chat_fixtures():
    chatml = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    llama3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    kinds = {
        "chatml": (chatml, None, "<|im_end|>", "<|endoftext|>"),
        "qwen2": (chatml, None, "<|im_end|>", "<|endoftext|>"),
        "qwen2_5": (chatml, None, "<|im_end|>", "<|endoftext|>"),
        "smollm2": (chatml, "<|im_start|>", "<|im_end|>", "<|im_end|>"),
        "llama3": (llama3, "<|begin_of_text|>", "<|eot_id|>", None),
        "llama3_1": (llama3, "<|begin_of_text|>", "<|eot_id|>", None),
    }
    for name, (specials, bos, eos, pad) in kinds.items():
        out = FIXTURES / "chat" / name
        shutil.rmtree(out, ignore_errors=True)
        make_tokenizer(specials, bos, eos, pad, TEMPLATES[name], out)
        if name == "llama3_1":  # as Llama 3.1 Instruct: generation also stops at <|end_of_text|>
            (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 4]}))
        tok = transformers.AutoTokenizer.from_pretrained(out)
        cases = []
        for conv in CONVERSATIONS:
            for gen_prompt in (True, False):
                ids = tok.apply_chat_template(conv, add_generation_prompt=gen_prompt, tokenize=True)
                if hasattr(ids, "keys"):
                    ids = ids["input_ids"]
                text = tok.apply_chat_template(conv, add_generation_prompt=gen_prompt, tokenize=False)
                cases.append({"messages": conv, "add_generation_prompt": gen_prompt, "ids": list(ids), "text": text})
        (out / "expected.json").write_text(json.dumps(cases, indent=1))
        print(name, len(cases), "cases")


def check_save_model_in_transformers():
    """Our save_model output, loaded by transformers, must give the logits our model gives."""
    record = {"transformers": transformers.__version__, "torch": torch.__version__, "cases": {}}
    for name, max_shard_bytes in [("llama_gqa_untied", None), ("qwen2_bias_tied_linear", None),
                                  ("mistral_head_dim_window", 30_000), ("llama3_rope", None)]:
        m = ours.load_model(FIXTURES / name, dtype=torch.float32)
        ids = load_file(FIXTURES / name / "expected.safetensors")["input_ids"]
        with tempfile.TemporaryDirectory() as tmp:
            ours.save_model(m, tmp, **({"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}))
            ref = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
            files = sorted(p.name for p in Path(tmp).iterdir())
            with torch.no_grad():
                diff = (hf_logits(ref, ids) - m.logits(m(ids))).abs().max().item()
        record["cases"][name] = {"files": files, "max_abs_logit_diff": diff}
        print(name, files, diff)
        assert diff <= 1e-4, (name, diff)
    (FIXTURES / "transformers_roundtrip.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    parts = sys.argv[1:] or ["checkpoints", "chat", "roundtrip"]  # or name some of them
    FIXTURES.mkdir(exist_ok=True)
    if "checkpoints" in parts:
        make_checkpoints()
    if "chat" in parts:
        make_chat_fixtures()
    if "roundtrip" in parts:
        check_save_model_in_transformers()
