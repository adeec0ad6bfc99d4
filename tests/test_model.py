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
    old_key = {**legacy, "rope_scaling": {"type": "linear", "factor": 4.0}}  # pre-4.45 files say "type"
    assert M.ModelConfig.from_hf(old_key).rope_scaling == {"rope_type": "linear", "factor": 4.0}
    # and to_hf -> from_hf is the identity
    c = M.ModelConfig.from_hf(FIXTURES / "qwen2_window")
    assert M.ModelConfig.from_hf(c.to_hf()) == c


@pytest.mark.parametrize("change,message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling 'yarn' is not supported"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "RoPE scaling 'dynamic' is not supported"),
    ({"hidden_act": "gelu"}, "only a bias-free SiLU MLP"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
    ({"num_attention_heads": 6, "head_dim": None}, "hidden_size=32 is not a multiple of num_attention_heads=6"),
    ({"head_dim": 7}, "head_dim must be an even positive integer"),
    ({"vocab_size": "512"}, "vocab_size must be a positive integer, got '512'"),
    ({"model_type": "mistral", "sliding_window": 0}, "sliding_window must be a positive integer or null, got 0"),
    ({"rope_scaling": {"rope_type": "linear"}}, r"RoPE scaling 'linear' needs numbers for \['factor'\]"),
    ({"rope_scaling": "linear"}, "rope_scaling / rope_parameters must be an object"),
    ({"rope_scaling": {"factor": 4.0}}, "RoPE scaling has a factor but no type"),
    ({"quantization_config": {"quant_method": "fp8"}}, r"quantized checkpoints \(fp8 in quantization_config\)"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0,
      "layer_types": ["full_attention", "sliding_attention"]}, "layer_types .* differs from what sliding_window"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor != 1 is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}},
     r"RoPE scaling 'llama3' needs numbers for \['low_freq_factor'\]"),
])
def test_config_errors(change, message, tmp_path):
    """Unsupported or inconsistent config.json contents are refused with a message naming the file and field."""
    hf = {**json.loads((FIXTURES / "llama_gqa_untied" / "config.json").read_text()), **change}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=f"config.json: .*{message}"):
        M.ModelConfig.from_hf(tmp_path)


def test_config_must_be_an_object(tmp_path):
    """A config.json holding a JSON list is refused by name."""
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json: expected a JSON object, got list"):
        M.ModelConfig.from_hf(tmp_path)


def test_config_defaults_follow_transformers():
    """Fields a config.json leaves out take transformers' defaults: rope_theta 10000, as many KV heads as query
    heads, an untied head, Qwen2's window off unless use_sliding_window and then from layer 28 on; Llama has no
    window; Mistral's is 4096 when the key is missing; llama3 scaling without original_max_position_embeddings
    takes max_position_embeddings (transformers 5.24 too, with a warning). Ours: a "torch." prefix is cut off the
    dtype."""
    base = json.loads((FIXTURES / "llama_gqa_untied" / "config.json").read_text())
    for key in ("rope_theta", "num_key_value_heads", "tie_word_embeddings"):
        del base[key]
    c = M.ModelConfig.from_hf({**base, "sliding_window": 4, "torch_dtype": "torch.bfloat16"})
    got = (c.rope_theta, c.num_key_value_heads, c.tie_word_embeddings, c.sliding_window, c.torch_dtype)
    assert got == (10000.0, base["num_attention_heads"], False, None, "bfloat16"), got
    qwen2 = {**base, "model_type": "qwen2", "sliding_window": 4}
    assert M.ModelConfig.from_hf(qwen2).sliding_window is None, "Qwen2 without use_sliding_window has no window"
    c = M.ModelConfig.from_hf({**qwen2, "use_sliding_window": True})
    assert (c.sliding_window, c.max_window_layers) == (4, 28), (c.sliding_window, c.max_window_layers)
    mistral = M.ModelConfig.from_hf({**base, "model_type": "mistral"})
    assert mistral.sliding_window == 4096, f"Mistral without a sliding_window key: {mistral.sliding_window}"
    assert M.ModelConfig.from_hf({**base, "model_type": "mistral", "sliding_window": None}).sliding_window is None
    llama3 = {**base, "max_position_embeddings": 96,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}}
    got = M.ModelConfig.from_hf(llama3).rope_scaling["original_max_position_embeddings"]
    assert got == 96, f"original_max_position_embeddings {got}, expected max_position_embeddings 96"


def test_config_keeps_an_eos_list():
    """An eos_token_id list (Llama 3.1 writes [128001, 128008, 128009]) is kept whole, and to_hf writes it back."""
    hf = {**json.loads((FIXTURES / "llama_gqa_untied" / "config.json").read_text()), "eos_token_id": [2, 7]}
    c = M.ModelConfig.from_hf(hf)
    assert (c.eos_token_id, c.to_hf()["eos_token_id"]) == ([2, 7], [2, 7]), (c.eos_token_id, c.to_hf()["eos_token_id"])


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_to_hf_round_trip_every_fixture(name):
    """to_hf then from_hf gives back the same ModelConfig for every fixture (windows, biases, RoPE scaling)."""
    c = M.ModelConfig.from_hf(FIXTURES / name)
    again = M.ModelConfig.from_hf(c.to_hf())
    diff = {k: (v, getattr(again, k)) for k, v in vars(c).items() if getattr(again, k) != v}
    assert not diff, f"{name}: fields changed by the round trip (before, after): {diff}"


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


def test_full_4d_mask_equals_padding_mask(tiny_model, tiny_config):
    """A (B, 1, T, T) bool mask (packed rows) that spells out causal + right padding gives the 2-D mask's result."""
    ids = torch.randint(0, tiny_config.vocab_size, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    full = torch.ones(7, 7, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]
    full = full | ~full.any(-1, keepdim=True)
    with torch.no_grad():
        diff = ((tiny_model(ids, full, positions) - tiny_model(ids, mask)).abs() * mask[..., None]).max().item()
    assert diff < 1e-6, diff
    with pytest.raises(ValueError, match=r"a \(B, 1, T, T\) or PackedRows attention_mask needs position_ids"):
        tiny_model(ids, full)


def test_fully_padded_row_stays_finite(tiny_model, tiny_config):
    """A row that is all padding gives finite hidden states and gradients (no NaN leaking into a masked loss)."""
    ids = torch.randint(0, tiny_config.vocab_size, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]])
    h = tiny_model(ids, mask)
    (h * mask[..., None]).sum().backward()
    bad = [n for n, p in tiny_model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert torch.isfinite(h).all() and not bad, bad


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


def test_failed_save_leaves_the_old_model(tiny_model, tmp_path, monkeypatch):
    """A save that fails midway (the second of three shards, as on a full disk) or before it starts (no
    tokenizer.json) leaves the model already in the folder loadable and unchanged, and no staging folder."""
    M.save_model(tiny_model, tmp_path / "m", max_shard_bytes=20_000)
    before = {k: v.clone() for k, v in M.load_model(tmp_path / "m").state_dict().items()}
    changed = M.Transformer(tiny_model.config)
    with torch.no_grad():
        for p in changed.parameters():
            p.add_(1.0)
    real, calls = M.save_file, []

    def failing(tensors, file, **kw):
        calls.append(file)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return real(tensors, file, **kw)

    monkeypatch.setattr(M, "save_file", failing)
    with pytest.raises(OSError, match="No space left"):
        M.save_model(changed, tmp_path / "m", max_shard_bytes=20_000)
    monkeypatch.setattr(M, "save_file", real)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        M.save_model(changed, tmp_path / "m", tokenizer_dir=tmp_path / "nowhere")
    after = M.load_model(tmp_path / "m").state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "the old weights changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"], sorted(tmp_path.iterdir())


def test_dtype_and_float_checks(tmp_path):
    """The checkpoint's dtype is its embedding's (not whichever tensor sorts first), and an integer tensor is
    refused by name."""
    d = copy_fixture("llama_gqa_untied", tmp_path)
    weights = load_file(d / "model.safetensors")
    save_file({**weights, "lm_head.weight": weights["lm_head.weight"].half()}, d / "model.safetensors")
    assert M.load_model(d).model.embed_tokens.weight.dtype == torch.float32
    save_file({**weights, "model.norm.weight": weights["model.norm.weight"].long()}, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensor 'model.norm.weight' in .*model.safetensors has dtype torch.int64"):
        M.load_model(d)


def test_single_file_wins_over_an_index(tiny_model, tmp_path):
    """A folder holding both model.safetensors and a shard index loads the single file, as transformers does."""
    M.save_model(tiny_model, tmp_path / "sharded", max_shard_bytes=20_000)
    other = M.load_model(tmp_path / "sharded")
    with torch.no_grad():
        other.model.norm.weight.fill_(3.0)
    M.save_model(other, tmp_path / "single")
    shutil.copy(tmp_path / "single" / M.WEIGHTS_NAME, tmp_path / "sharded" / M.WEIGHTS_NAME)
    loaded = M.load_model(tmp_path / "sharded")
    assert bool((loaded.model.norm.weight == 3.0).all()), "the shards were loaded, not model.safetensors"


def test_index_shards_stay_in_the_folder(tmp_path):
    """An index that points a tensor outside its folder is refused."""
    d = copy_fixture("llama_sharded_bf16", tmp_path)
    index = json.loads((d / M.INDEX_NAME).read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../elsewhere.safetensors"
    (d / M.INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match="is not a file name in that folder"):
        M.load_model(d)


def test_index_must_point_at_the_shard_holding_the_tensor(tmp_path):
    """An index that lists a tensor in a shard that does not hold it is refused, naming the tensor and the shard."""
    d = copy_fixture("llama_sharded_bf16", tmp_path)
    index = json.loads((d / M.INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == shards[0])
    index["weight_map"][name] = shards[1]
    (d / M.INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"missing tensor '{name}': not in .*{shards[1]} \(where"):
        M.load_model(d)


def test_missing_lm_head_needs_tied_config(tmp_path):
    """A checkpoint without lm_head.weight is refused unless config.json ties the head, then loads tied."""
    d = copy_fixture("llama_gqa_untied", tmp_path)
    weights = load_file(d / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, d / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensor 'lm_head.weight'.*tie_word_embeddings"):
        M.load_model(d)
    hf = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**hf, "tie_word_embeddings": True}))
    model = M.load_model(d)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight


def test_load_dtype_argument(tmp_path):
    """load_model keeps the checkpoint dtype by default, converts when asked, and a bf16 save stays bf16."""
    assert M.load_model(FIXTURES / "llama_gqa_untied").lm_head.weight.dtype == torch.float32
    m = M.load_model(FIXTURES / "llama_gqa_untied", dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16} and m.config.torch_dtype == "bfloat16"
    assert not m.training, "load_model returns the model in eval mode, as transformers' from_pretrained does"
    M.save_model(m, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = M.load_model(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), m.parameters()))
    assert M.load_model(tmp_path, dtype="float32").lm_head.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        M.load_model(tmp_path, dtype="int8")


def edit_weights(d, fn, file="model.safetensors"):
    weights = load_file(d / file)
    fn(weights)
    save_file(weights, d / file)


def test_tied_checkpoint_may_store_a_head_copy(tmp_path):
    """A tied checkpoint that also stores lm_head.weight loads and ignores the copy (as transformers does): the head
    is the embedding matrix, and the logits stay transformers'."""
    d = copy_fixture("qwen2_bias_tied_linear", tmp_path)
    edit_weights(d, lambda w: w.__setitem__("lm_head.weight", torch.zeros_like(w["model.embed_tokens.weight"])))
    model = M.load_model(d)
    expected = load_file(d / "expected.safetensors")
    diff = (logits_of(model, expected["input_ids"]) - expected["logits"]).abs().max().item()
    assert model.lm_head.weight is model.model.embed_tokens.weight and diff <= 1e-4, f"max abs logit diff {diff:.3g}"


def test_error_missing_tensor(tmp_path):
    """A missing tensor is named together with the folder."""
    d = copy_fixture("llama_gqa_untied", tmp_path)
    edit_weights(d, lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight': not found in .*llama_gqa_untied/model.safetensors"):
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


def test_error_model_folder_missing_or_a_file(tmp_path):
    """A --model that does not exist, or names a file, is reported as such (not as config.json / tokenizer.json
    missing under it)."""
    for load in (M.load_model, M.load_tokenizer):
        with pytest.raises(FileNotFoundError) as info:
            load(tmp_path / "nope")
        assert str(info.value) == f"{tmp_path / 'nope'}: model folder not found", str(info.value)
        weights = copy_fixture("llama_gqa_untied", tmp_path / load.__name__) / "model.safetensors"
        with pytest.raises(FileNotFoundError) as info:
            load(weights)
        assert str(info.value).startswith(f"{weights}: not a folder"), str(info.value)


# -----------------------------------------------------------------------------
# Tokenizer and chat templates (expected ids from transformers' apply_chat_template on the real templates)

CHAT_KINDS = ["chatml", "qwen2", "qwen2_5", "smollm2", "llama3", "llama3_1"]


@pytest.mark.parametrize("kind", CHAT_KINDS)
def test_chat_template_ids_match_transformers(kind):
    """apply_chat_template and render_chat equal transformers' output for every committed conversation."""
    tok = M.load_tokenizer(FIXTURES / "chat" / kind)
    cases = json.loads((FIXTURES / "chat" / kind / "expected.json").read_text())
    assert len(cases) == 8
    for case in cases:
        ids = tok.apply_chat_template(case["messages"], add_generation_prompt=case["add_generation_prompt"])
        text = tok.render_chat(case["messages"], add_generation_prompt=case["add_generation_prompt"])
        assert text == case["text"], f"{kind}: {text!r} != {case['text']!r}"
        assert ids == case["ids"], f"{kind}: {ids} != {case['ids']}"


@pytest.mark.parametrize("kind,family,default_system,end_of_turn", [
    ("chatml", "chatml", None, "<|im_end|>"),
    ("qwen2", "chatml", "You are a helpful assistant.", "<|im_end|>"),
    ("qwen2_5", "chatml", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", "<|im_end|>"),
    ("smollm2", "chatml", "You are a helpful AI assistant named SmolLM, trained by Hugging Face", "<|im_end|>"),
    ("llama3", "llama3", None, "<|eot_id|>"),
    ("llama3_1", "llama3", None, "<|eot_id|>"),
])
def test_tokenizer_family_and_specials(kind, family, default_system, end_of_turn):
    """Family, default system prompt, end-of-turn and eos/pad ids are read from the tokenizer's own files."""
    tok = M.load_tokenizer(FIXTURES / "chat" / kind)
    assert (tok.family, tok.default_system, tok.end_of_turn) == (family, default_system, end_of_turn)
    assert tok.end_of_turn_id == tok.tokenizer.token_to_id(end_of_turn) and tok.end_of_turn_id in tok.eos_token_ids
    assert tok.pad_token_id is not None and len(tok) == tok.vocab_size > 256
    if kind == "llama3_1":  # generation_config.json adds <|end_of_text|> as a second stop token
        assert tok.eos_token_ids == [tok.tokenizer.token_to_id("<|eot_id|>"), tok.tokenizer.token_to_id("<|end_of_text|>")]
        assert (tok.bos_token_id, tok.date_header) == (0, "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n")


def tokenizer_variant(tmp_path, kind, config_changes, generation_config=None):
    """A copy of the chat fixture `kind` with tokenizer_config.json keys replaced (None deletes a key) and
    generation_config.json replaced (None: removed), loaded."""
    d = tmp_path / kind
    shutil.copytree(FIXTURES / "chat" / kind, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config.update(config_changes)
    config = {k: v for k, v in config.items() if v is not None}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "generation_config.json").unlink(missing_ok=True)
    if generation_config is not None:
        (d / "generation_config.json").write_text(json.dumps(generation_config))
    return M.load_tokenizer(d)


def test_eos_and_pad_defaults(tmp_path):
    """Without an eos_token the first eos of generation_config is eos, else the end-of-turn token; pad defaults
    to eos; eos_token_ids keep every eos generation_config lists, in its order after the tokenizer's own."""
    eot, end_of_text = 4, 1  # <|eot_id|> and <|end_of_text|> in the llama3 fixtures
    tok = M.load_tokenizer(FIXTURES / "chat" / "llama3")  # no pad_token in its tokenizer_config.json
    assert (tok.eos_token_id, tok.pad_token_id) == (eot, eot), (tok.eos_token_id, tok.pad_token_id)
    tok = tokenizer_variant(tmp_path / "a", "llama3_1", {"eos_token": None}, {"eos_token_id": [end_of_text, eot]})
    assert (tok.eos_token_id, tok.pad_token_id) == (end_of_text, end_of_text), (tok.eos_token_id, tok.pad_token_id)
    tok = tokenizer_variant(tmp_path / "b", "llama3", {"eos_token": None})
    assert (tok.eos_token_id, tok.eos_token_ids) == (eot, [eot]), (tok.eos_token_id, tok.eos_token_ids)
    tok = tokenizer_variant(tmp_path / "c", "llama3_1", {}, {"eos_token_id": [eot, end_of_text]})
    assert tok.eos_token_ids == [eot, end_of_text], tok.eos_token_ids


def test_special_tokens_in_added_token_form(tmp_path):
    """Older tokenizer_config.json files write special tokens as AddedToken objects; their "content" is the token."""
    added = lambda t: {"__type": "AddedToken", "content": t, "lstrip": False, "rstrip": False}  # noqa: E731
    tok = tokenizer_variant(tmp_path, "qwen2", {"eos_token": added("<|im_end|>"), "pad_token": added("<|endoftext|>")})
    want = ("<|im_end|>", tok.tokenizer.token_to_id("<|im_end|>"), tok.tokenizer.token_to_id("<|endoftext|>"))
    got = (tok.eos_token, tok.eos_token_id, tok.pad_token_id)
    assert got == want, f"(eos, eos id, pad id) {got}, expected {want}"


def test_family_from_special_tokens_without_a_template(tmp_path):
    """A tokenizer with no chat template is placed in its family by the turn markers in its vocabulary."""
    families = {kind: tokenizer_variant(tmp_path, kind, {"chat_template": None}).family for kind in ("llama3", "qwen2")}
    assert families == {"llama3": "llama3", "qwen2": "chatml"}, families


def test_llama31_and_32_date_header(tmp_path, monkeypatch):
    """Llama 3.1's header carries the template's date_string; Llama 3.2's (strftime_now) today's date as
    "%d %b %Y", as transformers passes it."""
    template = json.loads((FIXTURES / "chat" / "templates.json").read_text())["llama3_1"]
    literal = '{%- set date_string = "26 Jul 2024" %}'
    assert literal in template, "the fixture template no longer sets date_string this way"
    llama31 = template.replace("26 Jul 2024", "01 Jan 2025")
    tok = tokenizer_variant(tmp_path / "a", "llama3_1", {"chat_template": llama31})
    assert tok.date_header == "Cutting Knowledge Date: December 2023\nToday Date: 01 Jan 2025\n\n", tok.date_header

    class Today(M.datetime.date):
        @classmethod
        def today(cls):
            return M.datetime.date(2025, 3, 7)

    monkeypatch.setattr(M, "datetime", type("datetime_module", (), {"date": Today}))
    llama32 = template.replace(literal, '{%- set date_string = strftime_now("%d %b %Y") %}')
    tok = tokenizer_variant(tmp_path / "b", "llama3_1", {"chat_template": llama32})
    assert tok.date_header == "Cutting Knowledge Date: December 2023\nToday Date: 07 Mar 2025\n\n", tok.date_header


def test_default_system_message_with_braces_and_escapes(tmp_path):
    """A default system message holding braces and escapes (Qwen2.5-Math's "... within \\boxed{}.", put into
    the Qwen2.5 template) is read as jinja reads the literal, and rendered when no system turn is given."""
    template = json.loads((FIXTURES / "chat" / "templates.json").read_text())["qwen2_5"]
    math = template.replace("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                            "Please reason step by step, and put your final answer within \\\\boxed{}.")
    assert math != template, "the fixture template no longer holds Qwen2.5's default system message"
    shutil.copytree(FIXTURES / "chat" / "qwen2_5", tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": math}))
    tok = M.load_tokenizer(tmp_path / "tok")
    want = ("<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
            "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.render_chat([{"role": "user", "content": "What is 1+1?"}]) == want


def test_llama31_system_message_is_trimmed():
    """Llama 3.1's template trims the system message (|trim) as it trims every turn: spaces around it change nothing."""
    tok = M.load_tokenizer(FIXTURES / "chat" / "llama3_1")
    plain = tok.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    spaced = tok.render_chat([{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": "Hi"}])
    assert spaced == plain, f"{spaced!r} != {plain!r}"


def test_chat_template_jinja_file_wins_over_the_config(tmp_path):
    """chat_template.jinja replaces tokenizer_config.json's chat_template, as transformers loads them."""
    templates = json.loads((FIXTURES / "chat" / "templates.json").read_text())
    shutil.copytree(FIXTURES / "chat" / "qwen2", tmp_path / "tok")  # its config holds Qwen2's template
    (tmp_path / "tok" / "chat_template.jinja").write_text(templates["chatml"], encoding="utf-8")
    tok = M.load_tokenizer(tmp_path / "tok")
    assert tok.chat_template == templates["chatml"] and tok.default_system is None, tok.default_system
    want = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"  # no default system turn: the file's template
    assert tok.render_chat([{"role": "user", "content": "Hi"}]) == want


def test_chatml_fixture_tokenizer(chatml_tokenizer_dir):
    """The conftest tokenizer: encode/decode round trip, ChatML ids, no BOS added, pad and eos as documented."""
    tok = M.load_tokenizer(chatml_tokenizer_dir)
    text = "The river flows north, 12 times!"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_start|>") == [tok.tokenizer.token_to_id("<|im_start|>")]
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 2, None)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(ids) == "user\nHi\nassistant\n"


def test_tokenizer_errors(tmp_path):
    """Missing tokenizer.json, an unknown special token, a bad message, a tool turn and a <think> template are
    errors naming the file or field."""
    with pytest.raises(FileNotFoundError, match="tokenizer.json: file not found"):
        M.load_tokenizer(tmp_path)
    shutil.copy(FIXTURES / "chat" / "qwen2" / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eos|>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json eos_token: token '<\|eos\|>' is not in the vocabulary"):
        M.load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(ValueError, match="tokenizer.json: not a readable tokenizer.json"):
        M.load_tokenizer(tmp_path)
    tok = M.load_tokenizer(FIXTURES / "chat" / "qwen2")
    with pytest.raises(ValueError, match="message 0 needs string 'role' and 'content'"):
        tok.apply_chat_template([{"role": "user"}])
    with pytest.raises(ValueError, match="message 1 has role 'tool'; only system, user and assistant"):
        tok.render_chat([{"role": "user", "content": "Weather?"}, {"role": "tool", "content": "sunny"}])
    shutil.copytree(FIXTURES / "chat" / "qwen2", tmp_path / "qwq")
    config = json.loads((tmp_path / "qwq" / "tokenizer_config.json").read_text())
    config["chat_template"] += "{{- '<|im_start|>assistant\\n<think>\\n' }}"  # as QwQ's generation prompt ends
    (tmp_path / "qwq" / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="qwq: the chat template writes <think> reasoning blocks"):
        M.load_tokenizer(tmp_path / "qwq").render_chat([{"role": "user", "content": "Hi"}])


# -----------------------------------------------------------------------------
# KV cache and generation


def test_cache_forward_equals_full_forward(tiny_model, tiny_config):
    """Prefill plus one-token steps through KVCache give the hidden states of one full forward, with left padding."""
    torch.manual_seed(1)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        full = tiny_model(ids, mask)
        cache = M.KVCache(tiny_model, 2, 16)
        parts = [tiny_model(ids[:, :8], mask[:, :8], kv_cache=cache)]
        parts += [tiny_model(ids[:, t:t + 1], mask[:, t:t + 1], kv_cache=cache) for t in range(8, 10)]
        parts.append(tiny_model(ids[:, 10:], mask[:, 10:], kv_cache=cache))  # a two-token chunk too
    stepped = torch.cat(parts, 1)
    diff = ((stepped - full).abs() * mask[..., None]).max().item()
    assert diff < 1e-5 and cache.pos == 12, (diff, cache.pos)
    with pytest.raises(ValueError, match="KV cache holds 16 positions; 12 used, 5 more requested"):
        tiny_model(ids[:, :5], kv_cache=cache)


def test_sliding_window_cache_matches_full(tmp_path):
    """With a window shorter than the sequence, cached decoding equals the full forward (Mistral fixture)."""
    model = M.load_model(FIXTURES / "mistral_head_dim_window", dtype=torch.float32)
    ids = load_file(FIXTURES / "mistral_head_dim_window" / "expected.safetensors")["input_ids"]
    with torch.no_grad():
        full = model(ids)
        cache = M.KVCache(model, 2, 16)
        stepped = torch.cat([model(ids[:, :3], kv_cache=cache)] +
                            [model(ids[:, t:t + 1], kv_cache=cache) for t in range(3, 16)], 1)
    diff = (stepped - full).abs().max().item()
    assert diff < 1e-5, diff


def context_model(config):
    """An untied model whose greedy tokens depend on the whole context. tiny_model (0.02 init, tied head) greedily
    repeats the last prompt token even with N(0, 1) embeddings, so a generation test on it passes whatever the
    attention, the padding mask or the cache do."""
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = M.Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 if "embed_tokens" in name else p.shape[1] ** -0.5)
    return model


def test_cache_chunk_without_padding_stays_causal(tiny_config):
    """With no padding mask, a prefill then a four-token chunk through the cache give the full forward's hidden
    states: inside the chunk each token sees only the ones before it."""
    model = context_model(tiny_config)
    ids = torch.randint(0, tiny_config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        cache = M.KVCache(model, 2, 10)
        stepped = torch.cat([model(ids[:, :6], kv_cache=cache), model(ids[:, 6:], kv_cache=cache)], 1)
    diff = (stepped - full).abs().max().item()
    assert diff < 1e-5, f"prefill 6 + chunk 4 vs one full forward: max abs diff {diff:.3g}"


def test_generate_cache_equals_no_cache(tiny_config):
    """Greedy generation with the KV cache gives the same tokens as recomputing the prefix, for ragged prompts."""
    model = context_model(tiny_config)
    torch.manual_seed(2)
    prompts = [torch.randint(3, tiny_config.vocab_size, (n,)).tolist() for n in (5, 9, 1)]
    cached = M.generate(model, prompts, 12)
    plain = M.generate(model, prompts, 12, use_cache=False)
    assert cached == plain, (cached, plain)
    assert [len(r) for r in cached] == [12, 12, 12]
    # each row alone (no padding) gives the same tokens as inside the batch
    alone = [M.generate(model, [p], 12)[0] for p in prompts]
    assert alone == cached, (alone, cached)
    edited = M.generate(model, [[prompts[1][0] + 1] + prompts[1][1:]], 12)[0]  # another first token
    assert edited != cached[1], f"the model must read its whole context: {edited} after either first token"


def test_generate_stops_before_eos(tiny_config):
    """The first EOS ends a row and is not returned; other rows go on."""
    model = context_model(tiny_config)
    prompts = [[5, 6, 7], [9, 10]]
    free = M.generate(model, prompts, 12)
    stop = free[0][4]
    first = free[0].index(stop)
    assert first > 0, f"the row should not stop at once: {free[0]}"
    out = M.generate(model, prompts, 12, eos_token_ids=[stop])
    assert out[0] == free[0][:first], (out[0], free[0])
    expected_1 = free[1][:free[1].index(stop)] if stop in free[1] else free[1]
    assert out[1] == expected_1, (out[1], free[1])


def test_generate_stops_at_any_of_several_eos(tiny_config):
    """With two eos ids, each row ends before the first of either (both ids matter in this case)."""
    model = context_model(tiny_config)
    prompts = [[5, 6, 7], [9, 10]]
    free = M.generate(model, prompts, 12)
    cut = lambda row, stops: row[:next((i for i, t in enumerate(row) if t in stops), len(row))]  # noqa: E731
    a, b = free[0][4], free[1][2]
    want = [cut(row, {a, b}) for row in free]
    assert want != [cut(row, {a}) for row in free] and want != [cut(row, {b}) for row in free], (free, a, b)
    out = M.generate(model, prompts, 12, eos_token_ids=[a, b])
    assert out == want, f"eos {a}, {b}: got {out}, expected {want} (free run {free})"


def test_generate_zero_tokens_and_keeps_the_mode(tiny_model):
    """max_new_tokens=0 gives an empty answer per prompt; generate leaves train / eval mode as it found it."""
    out = M.generate(tiny_model, [[5, 6, 7], [9]], 0)
    assert out == [[], []], out
    for training in (True, False):
        tiny_model.train(training)
        M.generate(tiny_model, [[5, 6, 7]], 2)
        assert tiny_model.training == training, f"model.training {tiny_model.training} after generate, was {training}"


def test_generate_sampling_is_seeded(tiny_model):
    """Sampling with the same seed repeats; another seed differs; top_p near 0 reduces to greedy."""
    prompts = [[5, 6, 7], [9, 10]]
    a = M.generate(tiny_model, prompts, 16, temperature=1.0, seed=7)
    b = M.generate(tiny_model, prompts, 16, temperature=1.0, seed=7)
    c = M.generate(tiny_model, prompts, 16, temperature=1.0, seed=8)
    assert a == b and a != c, (a, c)
    greedy = M.generate(tiny_model, prompts, 16)
    assert M.generate(tiny_model, prompts, 16, temperature=1.0, top_p=1e-6, seed=9) == greedy


def test_generate_checks_its_arguments(tiny_model):
    """top_p outside (0, 1], a negative length or temperature, and token ids beyond the vocabulary are refused."""
    for kw in (dict(top_p=0.0), dict(temperature=-1.0), dict(max_new_tokens=-1)):
        with pytest.raises(ValueError, match="0 < top_p <= 1"):
            M.generate(tiny_model, [[1, 2]], **{"max_new_tokens": 2, **kw})
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        M.generate(tiny_model, [[1, tiny_model.config.vocab_size]], 2)


def test_top_p_keeps_the_nucleus():
    """sample_next never draws a token outside the top-p nucleus."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    drawn = M.sample_next(logits, 1.0, 0.75, gen)
    counts = torch.bincount(drawn, minlength=4).tolist()
    assert counts[2] == counts[3] == 0 and counts[0] > counts[1] > 0, counts


def test_temperature_divides_the_logits_and_a_full_nucleus_stops():
    """Temperature 0.25 on logits (0, 1) draws token 1 with p = 1 / (1 + e^-4) = 0.982; top_p = 0.5 over two tokens
    of 0.5 keeps one (its mass already reaches top_p)."""
    gen = torch.Generator().manual_seed(0)
    share = M.sample_next(torch.tensor([[0.0, 1.0]]).repeat(4000, 1), 0.25, 1.0, gen).float().mean().item()
    assert abs(share - 0.982) < 0.01, f"token 1 drawn {share:.3f} of the time at temperature 0.25, expected 0.982"
    drawn = M.sample_next(torch.zeros(1000, 2), 1.0, 0.5, gen)
    assert len(drawn.unique()) == 1, f"top_p 0.5 over two tokens of 0.5 drew {torch.bincount(drawn).tolist()}"


def test_attention_mask_for_by_hand():
    """attention_mask_for, window 2: a query sees itself and the key before it, never a padding key; a padding query
    left with no key (left padding) sees every key, so its softmax row stays finite on every SDPA backend."""
    key_mask = torch.tensor([[False, True, True, True, True]])
    got = M.attention_mask_for(key_mask, 0, 5, 2)[0, 0].int().tolist()
    expected = [[1, 1, 1, 1, 1], [0, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]
    assert got == expected, f"mask {got}, expected {expected}"
    got = M.attention_mask_for(key_mask, 3, 2, 2)[0, 0].int().tolist()  # two new queries after 3 cached positions
    assert got == expected[3:], f"mask with past=3 {got}, expected {expected[3:]}"
    got = M.attention_mask_for(key_mask, 0, 5, None)[0, 0].int().tolist()
    assert got[4] == [0, 1, 1, 1, 1], f"no window: the last query sees every real key, got {got[4]}"


def test_cli_prints_reply(tiny_model, chatml_tokenizer_dir, tmp_path, capsys, monkeypatch):
    """python model.py --model DIR --prompt ... prints the decoded greedy reply."""
    M.save_model(tiny_model, tmp_path, tokenizer_dir=chatml_tokenizer_dir)
    monkeypatch.setattr("sys.argv", ["model.py", "--model", str(tmp_path), "--prompt", "Hi", "--max-new-tokens", "5",
                                     "--device", "cpu"])
    M.main()
    tok = M.load_tokenizer(tmp_path)
    ids = M.generate(tiny_model, [tok.apply_chat_template([{"role": "user", "content": "Hi"}])], 5,
                     eos_token_ids=tok.eos_token_ids)[0]
    assert capsys.readouterr().out == tok.decode(ids) + "\n"


def test_save_keeps_the_tokenizer_folders_generation_config(tiny_model, chatml_tokenizer_dir, tmp_path):
    """A tokenizer folder's generation_config.json (Llama 3.1's lists two stop tokens) is copied as it is, not
    replaced by one written from the model config's single eos id."""
    tok_dir = tmp_path / "tok"
    shutil.copytree(chatml_tokenizer_dir, tok_dir)
    wanted = {"bos_token_id": 0, "eos_token_id": [2, 5]}
    (tok_dir / "generation_config.json").write_text(json.dumps(wanted))
    M.save_model(tiny_model, tmp_path / "m", tokenizer_dir=tok_dir)
    got = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    assert got == wanted, f"saved generation_config {got}, the tokenizer folder's {wanted}"


def test_save_moves_config_json_in_last(tiny_model, chatml_tokenizer_dir, tmp_path, monkeypatch):
    """Into the model folder save_model moves config.json after every other file (shards, index, tokenizer files),
    so that a folder whose config.json is new already holds the rest of the new save."""
    real, moved = M.os.replace, []

    def recording(src, dst):
        if Path(dst).parent == tmp_path / "m":
            moved.append(Path(dst).name)
        return real(src, dst)

    monkeypatch.setattr(M.os, "replace", recording)
    M.save_model(tiny_model, tmp_path / "m", tokenizer_dir=chatml_tokenizer_dir, max_shard_bytes=20_000)
    in_folder = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert moved[-1] == "config.json" and sorted(moved) == in_folder, f"moved in this order: {moved}"


def test_failed_move_leaves_the_earlier_weights(tiny_model, tmp_path, monkeypatch):
    """When moving the new weights into the folder fails (a permission error), the earlier save's shards are still
    there and load unchanged: they are removed only after the new weights are in place."""
    M.save_model(tiny_model, tmp_path / "m", max_shard_bytes=20_000)
    changed = M.Transformer(tiny_model.config)
    real = M.os.replace

    def failing(src, dst):
        if Path(dst) == tmp_path / "m" / M.WEIGHTS_NAME:
            raise PermissionError("denied")
        return real(src, dst)

    monkeypatch.setattr(M.os, "replace", failing)
    with pytest.raises(PermissionError):
        M.save_model(changed, tmp_path / "m")
    monkeypatch.undo()
    after, before = M.load_model(tmp_path / "m").state_dict(), tiny_model.state_dict()
    worst = max((after[k] - before[k]).abs().max().item() for k in before)
    assert worst == 0.0, f"the earlier weights changed by {worst}"
