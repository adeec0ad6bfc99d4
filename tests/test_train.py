"""Training (iopo.py): each method learns on a tiny model, LoRA, cached reference log-probs, exact resume, clean stops."""

import contextlib
import dataclasses
import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import iopo
import model as M
from data import BatchSampler, DataError, EncodedDataset, RecordFile

WORDS = "apple river mountain cloud green blue quick slow happy tiny large music garden story".split()


def write_data(folder, n=16, seed=0):
    """Small SFT, DPO and IOPO files about the same instructions: y2 uses the keyword that x2 asks for."""
    rng = random.Random(seed)
    rows = {"sft": [], "dpo": [], "iopo": []}
    for _ in range(n):
        a, b = rng.sample(WORDS, 2)
        x1, x2 = f"Write about {a}. Use the word {a}.", f"Write about {a}. Use the word {b}."
        y1, y2 = f"The {a} is {rng.choice(WORDS)}.", f"The {b} is {rng.choice(WORDS)}."
        rows["sft"].append({"prompt": x1, "response": y1})
        rows["dpo"].append({"prompt": x1, "chosen": y1, "rejected": y2})
        rows["iopo"].append({"x1": x1, "y1": y1, "x2": x2, "y2": y2})
    paths = {}
    for kind, items in rows.items():
        paths[kind] = Path(folder) / f"{kind}.jsonl"
        paths[kind].write_text("".join(json.dumps(r) + "\n" for r in items))
    return paths


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    """Data files plus a tiny from-scratch model and tokenizer trained on them (the --model toy path)."""
    folder = tmp_path_factory.mktemp("train")
    paths = write_data(folder)
    cfg = iopo.TrainConfig(method="sft", model="toy", data=str(paths["sft"]), out=str(folder / "toy"),
                           toy_preset="tiny", toy_vocab=300, max_steps=1, batch_size=2, grad_accum=1)
    iopo.train(cfg)
    return folder, paths, folder / "toy" / "base"


def config(base, data, out, method, **kw):
    defaults = dict(method=method, model=str(base), data=str(data), out=str(out), max_steps=4, batch_size=4,
                    grad_accum=1, lr=2e-3, warmup_ratio=0.0, max_grad_norm=0.0, seed=0)
    return iopo.TrainConfig(**{**defaults, **kw})


def losses(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["sft", "dpo", "iopo"])
def test_each_method_learns_and_moves_every_weight(toy_dir, tmp_path, method):
    """A few full fine-tuning steps on one fixed batch lower the loss, raise the margin and change every weight."""
    folder, paths, base = toy_dir
    cfg = config(base, paths[method], tmp_path / method, method, max_steps=6, batch_size=16)
    final = iopo.train(cfg)
    rows = losses(tmp_path / method)
    assert rows[-1]["loss"] < rows[0]["loss"], f"{method}: loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}"
    if method == "dpo":
        assert rows[-1]["margins"] > rows[0]["margins"], [r["margins"] for r in rows]
    if method == "iopo":
        margin = lambda r: r["margins/output_x1"] + r["margins/input_y1"]
        assert margin(rows[-1]) > margin(rows[0]), [margin(r) for r in rows]
    before, after = M.load_model(base).state_dict(), M.load_model(final).state_dict()
    unchanged = [k for k in before if torch.equal(before[k], after[k])]
    assert not unchanged, f"{method}: weights that did not move: {unchanged}"


def test_lora_disabled_equals_base_and_only_adapters_train(toy_dir, tmp_path):
    """With adapters switched off a LoRA model is the base model; IOPO with LoRA moves the adapters only."""
    folder, paths, base = toy_dir
    net = M.load_model(base)
    ids = torch.randint(3, 300, (2, 12))
    reference = net(ids)
    lora = iopo.add_lora(net, rank=4, alpha=8, dropout=0.0)
    for m in lora:  # a non-zero update, as after training
        torch.nn.init.normal_(m.lora_B, std=0.1)
    assert not torch.allclose(net(ids), reference), "the adapters should change the output"
    with iopo.adapters_disabled(net):
        torch.testing.assert_close(net(ids), reference, rtol=0, atol=0)
    merged = iopo.merged_copy(net)
    torch.testing.assert_close(merged(ids), net(ids), rtol=1e-5, atol=1e-5)

    cfg = config(base, paths["iopo"], tmp_path / "lora", "iopo", lora_rank=4, lora_alpha=8, lr=1e-2)
    final = iopo.train(cfg)
    rows = losses(tmp_path / "lora")
    assert rows[-1]["loss"] < rows[0]["loss"], [r["loss"] for r in rows]
    trained = M.load_model(final).state_dict()
    start = M.load_model(base).state_dict()
    moved = {k for k in start if not torch.equal(start[k], trained[k])}
    targets = {k for k in start if any(f".{t}." in k for t in iopo.LORA_TARGETS)}
    assert moved == targets, f"moved but not LoRA targets: {sorted(moved - targets)[:4]}; " \
                             f"LoRA targets that did not move: {sorted(targets - moved)[:4]}"


@pytest.mark.parametrize("method,lora_rank,variant", [("dpo", 0, "full"), ("dpo", 4, "full"), ("iopo", 0, "three_seq")])
def test_cached_reference_equals_on_the_fly(toy_dir, tmp_path, method, lora_rank, variant):
    """Reference log-probs computed once and cached give the same run (and held-out losses) as per-step ones
    (three_seq: the per-step reference needs the (x2, y2) rows that the policy's batch leaves out)."""
    folder, paths, base = toy_dir
    runs = {}
    for on_the_fly in (False, True):
        out = tmp_path / f"fly{on_the_fly}"
        iopo.train(config(base, paths[method], out, method, ref_on_the_fly=on_the_fly, lora_rank=lora_rank,
                          variant=variant, eval_every=2, eval_size=4))
        runs[on_the_fly] = [r[k] for r in losses(out) for k in ("loss", "eval/loss") if k in r]
    assert len(runs[True]) == 4 + 2, f"expected 4 losses and 2 held-out losses, got {runs[True]}"
    assert runs[False] == pytest.approx(runs[True], rel=1e-6, abs=1e-7), runs
    assert any((tmp_path / "ref_cache").glob(f"{method}-*.safetensors")), "the cache file should exist"


@pytest.mark.parametrize("method", ["sft", "iopo"])
def test_heldout_loss_does_not_depend_on_the_batch_size(toy_dir, method):
    """evaluate_loss over 7 examples gives the same loss and metrics in batches of 3 (3 + 3 + 1) as in one
    batch: DPO / IOPO average over examples, SFT over response tokens (a mean of batch means would not)."""
    folder, paths, base = toy_dir
    net = iopo.Scorer(M.load_model(base))
    dataset = EncodedDataset(RecordFile(str(paths[method]), method), method, M.load_tokenizer(base))
    subset = dataset.select(range(7))
    ref = None if method == "sft" else -30 * torch.rand(7, 4, generator=torch.Generator().manual_seed(0))
    got = {b: iopo.evaluate_loss(net, subset, ref, iopo.TrainConfig(method=method, batch_size=b), torch.device("cpu"),
                                 contextlib.nullcontext) for b in (3, 7)}
    assert got[3].keys() == got[7].keys() and got[3] == pytest.approx(got[7], rel=1e-5), got


@pytest.mark.parametrize("method,lora_rank", [("iopo", 0), ("dpo", 4), ("sft", 0)])
def test_resume_equals_uninterrupted(toy_dir, tmp_path, method, lora_rank):
    """Stopping after step 3 and resuming from that checkpoint logs exactly the losses of the uninterrupted run
    (SFT with --group-by-length). The reference cache is deleted first, so the resumed run recomputes it from the
    starting weights (full fine-tuning) or with the loaded adapters switched off (LoRA), not from the moved policy."""
    folder, paths, base = toy_dir
    full = config(base, paths[method], tmp_path / "full", method, max_steps=6, batch_size=3, grad_accum=2,
                  save_every=3, lora_rank=lora_rank, lora_dropout=0.1 if lora_rank else 0.0, warmup_ratio=0.3,
                  group_by_length=method == "sft")  # SFT: batches of similar lengths, resumed in the same order
    iopo.train(full)
    if method == "sft":  # the grouping reaches the sampler: other batches, so other losses
        iopo.train(config(base, paths[method], tmp_path / "random", method, max_steps=6, batch_size=3, grad_accum=2,
                          warmup_ratio=0.3))
        first = [losses(tmp_path / out)[0]["loss"] for out in ("random", "full")]
        assert first[0] != first[1], f"grouped and random batches gave the same first loss {first}"
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "trainer_state.json").is_file()
    M.load_model(checkpoint)  # the checkpoint's weights are a plain Hugging Face folder
    shutil.rmtree(tmp_path / "ref_cache", ignore_errors=True)
    resumed = iopo.TrainConfig(method=method, data=str(paths[method]), out=str(tmp_path / "resumed"), resume=str(checkpoint))
    iopo.train(resumed)
    want = [r["loss"] for r in losses(tmp_path / "full")][3:]
    got = [r["loss"] for r in losses(tmp_path / "resumed")]
    assert got == want, f"resumed {got} != uninterrupted {want}"


def test_keep_checkpoints_deletes_only_older_ones(toy_dir, tmp_path):
    """--keep-checkpoints 2 with a checkpoint every step of 6 leaves the newest two (4 and 5; 6 is the final)."""
    folder, paths, base = toy_dir
    iopo.train(config(base, paths["sft"], tmp_path / "run", "sft", max_steps=6, save_every=1, keep_checkpoints=2))
    assert [p.name for p in iopo.checkpoints(tmp_path / "run")] == ["checkpoint-4", "checkpoint-5"]
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")) == [], "no temporary left"


def test_out_with_an_earlier_run_needs_resume_or_overwrite(toy_dir, tmp_path):
    """A second run into an --out that holds a run (metrics, checkpoints) stops and says how to go on;
    --overwrite starts over and removes the old checkpoints, which no longer match."""
    folder, paths, base = toy_dir
    iopo.train(config(base, paths["sft"], tmp_path / "run", "sft", max_steps=3, save_every=1))
    with pytest.raises(ValueError, match="holds an earlier run .* --resume .* --overwrite"):
        iopo.train(config(base, paths["sft"], tmp_path / "run", "sft", max_steps=1))
    assert len(iopo.checkpoints(tmp_path / "run")) == 2, "a refused run must not touch the old one"
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no usable sft examples"):  # --overwrite, but the data is unusable
        iopo.train(config(base, tmp_path / "empty.jsonl", tmp_path / "run", "sft", max_steps=1, overwrite=True))
    assert len(iopo.checkpoints(tmp_path / "run")) == 2, "nothing is deleted before the data has been read"
    iopo.train(config(base, paths["sft"], tmp_path / "other", "sft", max_steps=3, save_every=1))
    iopo.train(config(base, paths["sft"], tmp_path / "run", "sft", max_steps=1, overwrite=True))
    assert iopo.checkpoints(tmp_path / "run") == [] and len(losses(tmp_path / "run")) == 1
    # resuming another run into it is a new run there too
    again = iopo.TrainConfig(method="sft", out=str(tmp_path / "run"), resume=str(tmp_path / "other"))
    with pytest.raises(ValueError, match="holds an earlier run"):
        iopo.train(again)


@pytest.mark.parametrize("flags,message", [
    (["--grad-accum", "0"], "--grad-accum must be at least 1, got 0"),
    (["--max-len", "0"], "--max-len must be at least 1, got 0"),
    (["--max-steps", "-3"], "--max-steps must be at least 0, got -3"),
    (["--dtype", "float16"], "--dtype float32 or bfloat16"),
    (["--beta", "-1"], "--beta must be > 0"),
    (["--keep-checkpoints", "-1"], "--keep-checkpoints must be at least 0, got -1"),
    (["--dist-timeout", "0"], "--dist-timeout must be a positive number of minutes, got 0.0"),
    (["--log-every", "0"], "--log-every must be at least 1, got 0"),
    (["--ref-batch-size", "0"], "--ref-batch-size must be at least 1, got 0"),
    (["--eval-size", "4"], "--eval-every and --eval-size go together"),
    (["--eval-every", "2"], "--eval-every and --eval-size go together"),
    (["--warmup-ratio", "1.5"], r"--warmup-ratio must be in \[0, 1\], got 1.5"),
    (["--variant", "three_seq"], "--variant chooses among IOPO's losses: it applies to iopo, not sft"),
    (["--eval-size", "100000", "--eval-every", "1"], r"--eval-size 100000 would hold out all \d+ examples of"),
])
def test_bad_settings_stop_before_anything_is_written(toy_dir, tmp_path, flags, message):
    """Out-of-range settings stop with a message naming the flag, and leave no --out folder behind."""
    folder, paths, base = toy_dir
    with pytest.raises(SystemExit, match=message):
        iopo.main(["sft", "--model", str(base), "--data", str(paths["sft"]), "--out", str(tmp_path / "o"), *flags])
    assert not (tmp_path / "o").exists()


def test_toy_settings_are_checked_first(tmp_path):
    """The toy reproduction refuses a zero step count or an unknown preset before it generates anything."""
    for flags, message in ((["--sft-steps", "0"], "--sft-steps must be at least 1"),
                           (["--preset", "huge"], "--preset one of")):
        with pytest.raises(SystemExit, match=message):
            iopo.main(["toy", "--out", str(tmp_path / "toy"), *flags])
    assert not (tmp_path / "toy").exists()


def test_bad_data_leaves_no_out_folder(toy_dir, tmp_path):
    """A data file that cannot be used stops the run before --out is created; a folder as --data is named."""
    folder, paths, base = toy_dir
    (tmp_path / "empty.jsonl").write_text("")
    for data, message in ((tmp_path / "empty.jsonl", "no usable sft examples"), (tmp_path, "not a file")):
        with pytest.raises(SystemExit, match=message):
            iopo.main(["sft", "--model", str(base), "--data", str(data), "--out", str(tmp_path / "o")])
        assert not (tmp_path / "o").exists()


def test_metrics_log_at_the_start_of_a_run(tmp_path):
    """A new run has no metrics.jsonl until its first step, so a run that fails before then can be started
    again without --overwrite; a resumed run keeps the lines up to its checkpoint's step and drops the rest."""
    cfg = iopo.TrainConfig(method="sft", data="d.jsonl", out=str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps({"step": i}) + "\n" for i in (1, 2, 3)))
    iopo.start_log(tmp_path / "run", cfg, 2)
    assert [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["out"] == cfg.out
    iopo.start_log(tmp_path / "run", cfg, 0)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert iopo.stale_outputs(cfg, None, 0) == [], "a folder whose run never logged a step holds no earlier run"


def test_damaged_trainer_state_is_an_error_naming_the_file(tmp_path):
    """A resume stops on a damaged trainer_state.json or .safetensors with the file's name, not a traceback."""
    ckpt = tmp_path / "checkpoint-1"
    ckpt.mkdir()
    state = ckpt / "trainer_state.json"
    for text, message in (('{"step": 1, "sampl', "not valid JSON"), ("[1, 2]", "expected a JSON object, got list"),
                          ('{"step": 1}', "'sampler' should be an object, got None")):
        state.write_text(text)
        with pytest.raises(ValueError) as info:
            iopo.read_trainer_state(ckpt)
        assert str(info.value).startswith(f"{state}: {message}"), str(info.value)
    tensors = ckpt / "trainer_state.safetensors"
    save_file({"rng.torch": torch.get_rng_state(), "state.0.exp_avg": torch.zeros(64)}, tensors)
    assert set(iopo.read_trainer_tensors(ckpt)) == {"rng.torch", "state.0.exp_avg"}
    tensors.write_bytes(tensors.read_bytes()[:200])  # cut short
    with pytest.raises(ValueError) as info:
        iopo.read_trainer_tensors(ckpt)
    assert str(info.value).startswith(f"{tensors}: not a readable safetensors file"), str(info.value)


def test_damaged_reference_cache_is_computed_again(tmp_path, capsys):
    """A reference cache that is cut short, misses its tensor, has the wrong shape or holds a NaN (one is enough) is
    reported and recomputed (usable_cache says no), instead of a safetensors traceback or a run that stops at a NaN
    loss."""
    cache = tmp_path / "dpo-key.safetensors"
    assert not iopo.usable_cache(cache, 4, 2), "no file: nothing to use"
    save_file({"ref_logps": torch.full((4, 2), -3.0)}, cache)
    assert iopo.usable_cache(cache, 4, 2) and capsys.readouterr().out == ""
    good = cache.read_bytes()
    one_nan = torch.full((4, 2), -3.0)
    one_nan[2, 1] = float("nan")
    damaged = {"cut short": good[:40], "no tensor": None, "shape": {"ref_logps": torch.zeros(3, 2)},
               "columns": {"ref_logps": torch.zeros(4, 3)}, "nan": {"ref_logps": torch.full((4, 2), float("nan"))},
               "one nan": {"ref_logps": one_nan}}
    for what, content in damaged.items():
        if isinstance(content, bytes):
            cache.write_bytes(content)
        else:
            save_file(content or {"other": torch.zeros(1)}, cache)
        assert not iopo.usable_cache(cache, 4, 2), f"{what}: accepted"
        out = capsys.readouterr().out
        assert out.startswith(f"warning: reference cache {cache} ") and "computing it again" in out, (what, out)


def test_out_holding_a_model_or_a_final_model_is_refused_untouched(tmp_path):
    """--out that is a model folder (say the same as --model) or holds an earlier run's final/ is refused, even a
    model with --overwrite (the run would replace its config.json); --out that is a file is named as one."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "llama"}')
    (model_dir / "model.safetensors").write_bytes(b"weights")
    for overwrite in (False, True):
        cfg = iopo.TrainConfig(method="sft", data="d.jsonl", out=str(model_dir), overwrite=overwrite)
        with pytest.raises(ValueError, match="holds a model .* whose config.json this run would overwrite"):
            iopo.stale_outputs(cfg, None, 0)
    (tmp_path / "run" / "final").mkdir(parents=True)
    with pytest.raises(ValueError) as info:
        iopo.stale_outputs(iopo.TrainConfig(method="sft", data="d.jsonl", out=str(tmp_path / "run")), None, 0)
    assert "holds an earlier run (final): start over with --overwrite" in str(info.value), str(info.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, expected a folder"):
        iopo.stale_outputs(iopo.TrainConfig(method="sft", data="d.jsonl", out=str(tmp_path / "file")), None, 0)
    assert (model_dir / "config.json").read_text() == '{"model_type": "llama"}', "the model folder was changed"


def test_resume_drops_a_torn_last_metrics_line(tmp_path):
    """A metrics.jsonl whose last line was cut short (the run killed mid-append) resumes, dropping it; a broken
    line before the end is an error naming file:line, not a bare JSON message."""
    cfg = iopo.TrainConfig(method="sft", data="d.jsonl", out=str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    log = tmp_path / "run" / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    iopo.start_log(tmp_path / "run", cfg, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n', log.read_text()
    log.write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(ValueError) as info:
        iopo.start_log(tmp_path / "run", cfg, 2)
    assert str(info.value).startswith(f"{log}:2: not valid JSON"), str(info.value)


def test_resume_restores_the_cuda_generators_device_by_device(tmp_path, monkeypatch):
    """A checkpoint of GPU processes holds per-device states (rng.cuda.0 ... rng.cuda.10) and per-process ones
    (rng.cuda.rank0, rng.cuda.rank1): set_rng_state_all gets the per-device ones only, in device order, and no
    more than this machine has (were 13 states, in string order: an IndexError past the last device)."""
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.AdamW(params)
    sampler = BatchSampler(4, 2, seed=0)
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    state = {"step": 1, "sampler": sampler.state_dict(), "param_groups": optimizer.state_dict()["param_groups"],
             "python_rng": random.getstate(), "config": {}}
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    tensors = {f"rng.cuda.{i}": torch.full((4,), i, dtype=torch.uint8) for i in range(11)}
    tensors.update({f"rng.cuda.rank{r}": torch.full((4,), 100 + r, dtype=torch.uint8) for r in range(2)})
    save_file({"rng.torch": torch.get_rng_state(), **tensors}, checkpoint / "trainer_state.safetensors")
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append([int(s[0]) for s in states]))
    for devices in (11, 2):
        monkeypatch.setattr(torch.cuda, "device_count", lambda n=devices: n)
        assert iopo.load_trainer_state(checkpoint, optimizer, sampler) == 1
        got = restored.pop()
        assert got == list(range(devices)), f"{devices} devices: restored the states of {got}"


def lora_adapters(model):
    """Adds rank-2 LoRA to `model` and returns its adapter tensors, as a checkpoint's adapter.safetensors holds them."""
    iopo.add_lora(model, 2, 16.0, 0.0)
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if ".lora_" in k}


def test_damaged_lora_adapters_are_an_error_naming_the_file(tiny_model, tmp_path):
    """A LoRA checkpoint whose adapter.safetensors is missing, cut short or of another rank stops the resume with
    the file's name (were an errno message, a SafetensorError traceback and a RuntimeError traceback)."""
    adapters = lora_adapters(tiny_model)
    file = tmp_path / "adapter.safetensors"
    with pytest.raises(FileNotFoundError, match=f"{file}: file not found"):
        iopo.load_adapters(tmp_path, tiny_model)
    save_file(adapters, file)
    iopo.load_adapters(tmp_path, tiny_model)
    file.write_bytes(file.read_bytes()[:300])
    with pytest.raises(ValueError, match=f"{file}: not a readable safetensors file"):
        iopo.load_adapters(tmp_path, tiny_model)
    name = next(iter(adapters))
    save_file({**adapters, name: torch.zeros(3, adapters[name].shape[1])}, file)
    with pytest.raises(ValueError, match=f"{file}: adapters do not match the model .*size mismatch for {name}"):
        iopo.load_adapters(tmp_path, tiny_model)


def test_resume_in_place_from_an_older_checkpoint(toy_dir, tmp_path):
    """Continuing in the same --out from checkpoint-1 of 3 removes the later, abandoned checkpoints, and
    --keep-checkpoints 1 then keeps the new checkpoint-2 (it used to keep the stale checkpoint-3)."""
    folder, paths, base = toy_dir
    iopo.train(config(base, paths["sft"], tmp_path / "run", "sft", max_steps=4, save_every=1))
    assert [p.name for p in iopo.checkpoints(tmp_path / "run")] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    iopo.main(["sft", "--out", str(tmp_path / "run"), "--resume", str(tmp_path / "run" / "checkpoint-1"),
               "--save-every", "2", "--keep-checkpoints", "1"])
    assert [p.name for p in iopo.checkpoints(tmp_path / "run")] == ["checkpoint-2"]
    assert [r["step"] for r in losses(tmp_path / "run")] == [1, 2, 3, 4]


def test_resume_refuses_to_change_the_run(toy_dir, tmp_path):
    """On --resume the command line may change how the run executes (--grad-checkpointing here), not what it
    computes: another --lr or method stops with a message naming both values; the same values are fine."""
    folder, paths, base = toy_dir
    iopo.train(config(base, paths["dpo"], tmp_path / "run", "dpo", max_steps=2, save_every=1))
    resume = ["--out", str(tmp_path / "more"), "--resume", str(tmp_path / "run"), "--data", str(paths["dpo"])]
    with pytest.raises(SystemExit, match=r"continues the saved run, which has lr=0.002 \(given: 0.1\); only device"):
        iopo.main(["dpo", *resume, "--lr", "0.1"])
    with pytest.raises(SystemExit, match="method='dpo' \\(given: 'iopo'\\)"):
        iopo.main(["iopo", *resume])
    assert not (tmp_path / "more" / "metrics.jsonl").exists()
    iopo.main(["dpo", *resume, "--grad-checkpointing", "--lr", "0.002"])
    assert [r["step"] for r in losses(tmp_path / "more")] == [2], "resumed from checkpoint-1: one step left"
    assert json.loads((tmp_path / "more" / "config.json").read_text())["grad_checkpointing"] is True


def test_resume_accepts_the_original_command(toy_dir, tmp_path):
    """The first run's own command plus --resume is accepted: --model toy and --lr 0 match what they resolved to,
    and the resumed run keeps the saved run's toy model instead of building another."""
    folder, paths, base = toy_dir
    first = ["sft", "--model", "toy", "--toy-preset", "tiny", "--toy-vocab", "300", "--data", str(paths["sft"]),
             "--max-steps", "2", "--save-every", "1", "--batch-size", "2", "--grad-accum", "1", "--lr", "0"]
    iopo.main([*first, "--out", str(tmp_path / "run")])
    iopo.main([*first, "--out", str(tmp_path / "more"), "--resume", str(tmp_path / "run")])
    assert [r["step"] for r in losses(tmp_path / "more")] == [2]
    assert losses(tmp_path / "more")[0]["loss"] == losses(tmp_path / "run")[1]["loss"]
    model = json.loads((tmp_path / "more" / "config.json").read_text())["model"]
    assert model == str(tmp_path / "run" / "base") and not (tmp_path / "more" / "base").exists(), \
        f"the resumed run built a new toy model: its model is {model}"


def test_non_finite_loss_stops_and_keeps_last_checkpoint(toy_dir, tmp_path):
    """A learning rate that blows the weights up stops the run with a message; the last good checkpoint survives."""
    folder, paths, base = toy_dir
    cfg = config(base, paths["sft"], tmp_path / "nan", "sft", lr=1e30, max_steps=6, save_every=1)
    with pytest.raises(iopo.TrainingStopped, match=r"non-finite .* Last good checkpoint: .*checkpoint-\d"):
        iopo.train(cfg)
    kept = sorted((tmp_path / "nan").glob("checkpoint-*"))
    assert kept, "no checkpoint was kept"
    M.load_model(kept[-1])  # loads: it was written completely
    assert not list((tmp_path / "nan").glob(".checkpoint-*")), "temporary folders were left behind"


def test_bad_data_fails_before_training(toy_dir, tmp_path):
    """A malformed data file stops with data.py's file:line message before any model is built or loaded."""
    folder, paths, base = toy_dir
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"x1": "a", "y1": "b", "x2": "c", "y2": "d"}) + "\n" + json.dumps({"x1": "a", "y1": "b", "x2": "c"}) + "\n")
    with pytest.raises(DataError, match=r'bad\.jsonl:2: .*"y2"'):
        iopo.train(iopo.TrainConfig(method="iopo", model="toy", data=str(bad), out=str(tmp_path / "out")))
    assert not (tmp_path / "out" / "base").exists(), "nothing should be built for a bad file"


def test_toy_reproduction_end_to_end(tmp_path, capsys):
    """`python iopo.py toy` at a tiny scale: data, tokenizer, SFT, DPO, IOPO and the ablations (DPO on the
    quadruples' (x1, y1 > y2) among them), scored and tabled."""
    iopo.main(["toy", "--out", str(tmp_path), "--n-train", "40", "--n-eval", "10", "--vocab", "300",
               "--sft-steps", "3", "--sft-batch", "4", "--pref-steps", "2", "--pref-batch", "2",
               "--max-new-tokens", "8", "--ablations"])
    results = json.loads((tmp_path / "seed0" / "results.json").read_text())
    labels = ["SFT", "DPO", "IOPO", "IOPO w/o input pref", "IOPO w/o output pref", "DPO with y2 as loser"]
    assert list(results) == labels, list(results)
    for label, metrics in results.items():
        assert set(metrics) >= {"IF-S", "IF-M", "CSR", "ISR", "PSR"}, (label, metrics)
        assert all(0.0 <= metrics[k] <= 100.0 for k in ("IF-S", "IF-M", "CSR", "ISR", "PSR")), (label, metrics)
    table = capsys.readouterr().out
    assert all(f"| {label} |" in table for label in labels), table
    trained_on = json.loads((tmp_path / "seed0" / "dpo_with_y2_as_loser" / "config.json").read_text())["data"]
    assert trained_on.endswith("dpo_y2_first4.jsonl"), trained_on
    pairs = [json.loads(l) for l in (tmp_path / "seed0" / "data" / "dpo_y2_first4.jsonl").read_text().splitlines()]
    quads = [json.loads(l) for l in (tmp_path / "seed0" / "data" / "iopo_first4.jsonl").read_text().splitlines()]
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [(q["x1"], q["y1"], q["y2"]) for q in quads]
    iopo_rows = [json.loads(l) for l in (tmp_path / "seed0" / "iopo" / "metrics.jsonl").read_text().splitlines()]
    assert len(iopo_rows) == 2 and "accuracy/input" in iopo_rows[0], iopo_rows
    sft_final = str(tmp_path / "seed0" / "sft" / "final")
    runs = {"dpo": ("dpo", "full"), "iopo": ("iopo", "full"), "iopo_wo_input_pref": ("iopo", "no_input_pref"),
            "iopo_wo_output_pref": ("iopo", "no_output_pref"), "dpo_with_y2_as_loser": ("dpo", "full")}
    for folder, (method, variant) in runs.items():  # every preference run starts from the SFT model
        saved = json.loads((tmp_path / "seed0" / folder / "config.json").read_text())
        got = {k: saved[k] for k in ("method", "variant", "model", "lr", "max_steps", "batch_size", "beta")}
        assert got == {"method": method, "variant": variant, "model": sft_final, "lr": 1e-4, "max_steps": 2,
                       "batch_size": 2, "beta": 0.1}, (folder, got)


def test_toy_summary_over_seeds(tmp_path, capsys):
    """`toy --summary` averages the seeds' results.json (sample standard deviation) and compares every pair of
    methods seed by seed; numbers worked by hand. Folders that are not seed<N> are ignored."""
    metrics = lambda v: {k: v for k in ("IF-S", "IF-M", "CSR", "ISR", "PSR")}  # noqa: E731
    for seed, (sft, dpo, iopo_) in {0: (60, 50, 70), 1: (70, 80, 70), 2: (80, 60, 90)}.items():
        (tmp_path / f"seed{seed}").mkdir()
        (tmp_path / f"seed{seed}" / "results.json").write_text(json.dumps(
            {"SFT": metrics(sft), "DPO": metrics(dpo), "IOPO": metrics(iopo_)}))
    for other in ("seedling", "seed01"):  # not folders that toy_reproduction writes
        (tmp_path / other).mkdir()
        (tmp_path / other / "results.json").write_text("not json")
    iopo.main(["toy", "--summary", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "Seeds: 0, 1, 2;" in out, out
    assert "| SFT | 3 | 70.0 ± 10.0 |" in out and "| DPO | 3 | 63.3 ± 15.3 |" in out, out  # sd of 50, 80, 60
    assert "| IOPO | 3 | 76.7 ± 11.5 |" in out, out
    # IOPO - SFT: 10, 0, 10 -> 6.7 ± 5.8, ahead on 2, behind on 0; IOPO - DPO: 20, -10, 30 -> 13.3 ± 20.8, 2:1
    assert "| IOPO | +6.7 ± 5.8 (2:0 of 3) | +13.3 ± 20.8 (2:1 of 3) |  |" in out, out
    assert "| SFT |  | +6.7 ± 15.3 (2:1 of 3) | -6.7 ± 5.8 (0:2 of 3) |" in out, out  # SFT - DPO: 10, -10, 20
    with pytest.raises(SystemExit, match="no seed\\*/results.json"):
        iopo.main(["toy", "--summary", "--out", str(tmp_path / "empty")])
    (tmp_path / "one" / "seed4").mkdir(parents=True)
    (tmp_path / "one" / "seed4" / "results.json").write_text(json.dumps({"SFT": metrics(60), "IOPO": metrics(70)}))
    iopo.main(["toy", "--summary", "--out", str(tmp_path / "one")])
    out = capsys.readouterr().out  # one seed: no spread to show
    assert "| SFT | 1 | 60.0 | 60.0 |" in out and "| IOPO | +10.0 (1:0 of 1) |  |" in out, out
    (tmp_path / "one" / "seed6").mkdir()  # a method that no other seed ran: no pair to compare
    (tmp_path / "one" / "seed6" / "results.json").write_text(json.dumps({"DPO": metrics(50)}))
    iopo.main(["toy", "--summary", "--out", str(tmp_path / "one")])
    out = capsys.readouterr().out
    assert "| DPO | 1 | 50.0 |" in out and "| DPO |  |  |  |" in out, out
    for seed, (sft, iopo_) in ((10, (80, 60)), (2, (60, 70)), (1, (70, 80))):  # made in this order on purpose
        (tmp_path / "tie" / f"seed{seed}").mkdir(parents=True)
        (tmp_path / "tie" / f"seed{seed}" / "results.json").write_text(
            json.dumps({"SFT": metrics(sft), "IOPO": metrics(iopo_)}))
    iopo.main(["toy", "--summary", "--out", str(tmp_path / "tie")])
    out = capsys.readouterr().out  # seeds in numeric order; IOPO - SFT: 10, 10, -20, a mean of 0 (no sign), sd 17.3
    assert out.startswith("Seeds: 1, 2, 10;"), out
    assert "| SFT |  | 0.0 ± 17.3 (1:2 of 3) |" in out and "| IOPO | 0.0 ± 17.3 (2:1 of 3) |  |" in out, out
    (tmp_path / "one" / "seed5").mkdir()
    for bad, message in (("{", "not JSON"), ("{}", "not a toy results.json"), ('{"SFT": {"IF-S": 1.0}}', "not a toy"),
                         (json.dumps({"SFT": {**metrics(1), "IF-M": "x"}}), "not a toy results.json")):
        (tmp_path / "one" / "seed5" / "results.json").write_text(bad)
        with pytest.raises(SystemExit, match=rf"seed5.results\.json: {message}"):
            iopo.main(["toy", "--summary", "--out", str(tmp_path / "one")])


def test_build_network_loads_the_weights_the_settings_ask_for(toy_dir, tmp_path):
    """build_network: full fine-tuning keeps float32 weights under --dtype bfloat16 (autocast does the rest), LoRA
    freezes a bfloat16 base; --grad-checkpointing reaches the model; LoRA's A matrices are drawn from --seed alone."""
    folder, paths, base = toy_dir
    a_matrices = []
    for lora_rank, want in ((0, torch.float32), (4, torch.bfloat16), (4, torch.bfloat16)):
        torch.manual_seed(len(a_matrices))  # whatever ran before must not change the adapters
        cfg = config(base, paths["dpo"], tmp_path, "dpo", dtype="bfloat16", lora_rank=lora_rank,
                     grad_checkpointing=True)
        model, lora, scorer, load_dtype = iopo.build_network(cfg, None, torch.device("cpu"), "mask")
        dtype = model.model.embed_tokens.weight.dtype
        assert load_dtype == want and dtype == want, f"lora_rank {lora_rank}: loaded {load_dtype}, weights {dtype}"
        assert model.gradient_checkpointing is True and scorer.model is model
        if lora_rank:
            a_matrices.append(torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith("lora_A")]))
    assert torch.equal(*a_matrices), "LoRA's A matrices differ between two builds with the same --seed"


def test_lora_layer_by_hand():
    """A LoRA layer computes x W^T + b + (alpha / r) x A^T B^T, and its merged weight is W + (alpha / r) B A."""
    torch.manual_seed(0)
    base = torch.nn.Linear(3, 2)
    layer = iopo.LoRALinear(base, rank=2, alpha=6.0, dropout=0.0)  # scale alpha / r = 3
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, -1.0, 1.0]]))
        layer.lora_B.copy_(torch.tensor([[0.5, 0.0], [1.0, -2.0]]))
    x = torch.tensor([[1.0, 2.0, 3.0]])
    # A x = (7, 1); B A x = (3.5, 7 - 2) = (3.5, 5); times 3: (10.5, 15)
    expected = base(x) + torch.tensor([[10.5, 15.0]])
    got = layer(x)
    assert torch.allclose(got, expected), f"LoRA output {got.tolist()}, expected {expected.tolist()}"
    merged = x @ layer.merged_weight().T + base.bias
    assert torch.allclose(merged, expected), f"merged-weight output {merged.tolist()}, expected {expected.tolist()}"


def test_lora_dropout_acts_on_the_update_only():
    """LoRA dropout (training mode) drops inputs of the adapter path only: with B = 0 the layer is exactly the base
    layer, and with B != 0 training-mode outputs differ from eval-mode ones."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8)
    layer = iopo.LoRALinear(base, rank=4, alpha=4.0, dropout=0.5).train()
    x = torch.randn(32, 16)
    diff = (layer(x) - base(x)).abs().max().item()
    assert diff == 0.0, f"B = 0, yet the training-mode output moved by {diff}: dropout reached the base path"
    torch.nn.init.normal_(layer.lora_B)
    noisy, clean = layer(x), layer.eval()(x)
    gap = (noisy - clean).abs().max().item()
    assert gap > 1e-3, f"training and eval outputs differ by only {gap}: the update saw no dropout"


def test_lr_schedule_by_hand():
    """10 steps, warmup ratio 0.25: ceil(2.5) = 3 warmup steps (1/3, 2/3, 1), then 0.5 (1 + cos(pi k / 7)), k = 0..6;
    with no warmup the first step runs at the peak."""
    expected = [1 / 3, 2 / 3, 1.0, 1.0, 0.9504844340, 0.8117449009, 0.6112604670, 0.3887395330, 0.1882550991,
                0.0495155660]
    got = [iopo.lr_at(step, 10, 1.0, 0.25) for step in range(10)]
    assert got == pytest.approx(expected, abs=1e-9), f"lr {got}, expected {expected}"
    assert iopo.lr_at(0, 4, 2e-3, 0.0) == 2e-3, iopo.lr_at(0, 4, 2e-3, 0.0)


def test_optimizer_decays_matrices_only(tiny_model):
    """AdamW (betas 0.9, 0.999): weight decay on every 2-D weight, none on the 1-D norm weights."""
    params = list(tiny_model.parameters())
    opt = iopo.make_optimizer(params, iopo.TrainConfig(weight_decay=0.1, lr=1e-3))
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    wrong = [(tuple(p.shape), decay[id(p)]) for p in params if decay[id(p)] != (0.1 if p.dim() >= 2 else 0.0)]
    assert len(decay) == len(params) and not wrong, f"(shape, weight decay) on the wrong side: {wrong}"
    assert any(p.dim() == 1 for p in params), "the fixture should have norm weights"
    betas = [g["betas"] for g in opt.param_groups]
    assert all(b == (0.9, 0.999) for b in betas), betas


def _rows(counts, width=8):
    """Token log-probs (R, width - 1) and labels (R, width): row r scores counts[r] tokens, each with log-prob -(r + 1)."""
    labels = torch.full((len(counts), width), -100)
    for r, n in enumerate(counts):
        labels[r, 1:1 + n] = 5
    token_logps = (labels[:, 1:] != -100).float() * -(torch.arange(len(counts)) + 1.0)[:, None]
    return token_logps, labels


def test_ftx_term_divides_by_the_matched_answers_own_length():
    """method_loss adds ftx * ftx_term with each matched sequence's own scored-token count: DPO y_w (2 tokens, not
    y_l's 3); IOPO y1 after x1 (2) and y2 after x2 (4), not y2 after x1 (3)."""
    token_logps, labels = _rows([2, 3])  # DPO rows: y_w, y_l; sums -2 and -6
    ref = torch.tensor([[-2.5, -5.0]])
    loss, _ = iopo.method_loss(iopo.TrainConfig(method="dpo", ftx=0.5), token_logps, labels, ref)
    expected = iopo.dpo_loss(torch.tensor([-2.0]), torch.tensor([-6.0]), ref[:, 0], ref[:, 1])[0] + 0.5 * (2.0 / 2)
    assert abs(loss.item() - expected.item()) < 1e-6, f"dpo + ftx {loss.item()}, expected {expected.item()}"
    token_logps, labels = _rows([2, 3, 4, 5])  # IOPO_ORDER; sums -2, -6, -12, -20
    ref = torch.tensor([[-3.0, -5.0, -11.0, -21.0]])
    loss, _ = iopo.method_loss(iopo.TrainConfig(method="iopo", ftx=0.5), token_logps, labels, ref)
    sums = [torch.tensor([s]) for s in (-2.0, -6.0, -12.0, -20.0)]
    expected = iopo.iopo_loss(*sums, *ref.unbind(1))[0] + 0.5 * (2.0 / 2 + 12.0 / 4)
    assert abs(loss.item() - expected.item()) < 1e-6, f"iopo + ftx {loss.item()}, expected {expected.item()}"


def test_sequence_sums_count_a_row_scored_to_its_last_position():
    """A row scored up to its last position (a template with nothing after the end-of-turn token, or an answer cut
    by --max-len) counts all 7 of its labels, not 6: sums -7 and -4, counts 7 and 2."""
    token_logps, labels = _rows([7, 2])
    sums, n = iopo.sequence_sums(iopo.TrainConfig(method="dpo"), token_logps, labels)
    assert sums.tolist() == [-7.0, -4.0] and n.tolist() == [7, 2], f"sums {sums.tolist()}, counts {n.tolist()}"


def test_sft_training_loss_counts_a_row_scored_to_its_last_position():
    """SFT's training loss and its denominator read the labels after the first position: rows scoring 7 tokens of
    log-prob -1 and 2 of -2 give (7 + 4) / 9, and sft_denominator counts 9."""
    token_logps, labels = _rows([7, 2])
    loss, _ = iopo.method_loss(iopo.TrainConfig(method="sft"), token_logps, labels, None)
    assert abs(loss.item() - 11 / 9) < 1e-6, f"sft loss {loss.item()}, expected {11 / 9}"
    n = iopo.sft_denominator({"labels": labels}, 1.0, 1).item()
    assert n == 9.0, f"sft denominator {n}, expected 9 scored tokens"


def test_gradient_accumulation_averages_the_micro_batches(toy_dir, tmp_path):
    """One DPO step over 4 examples as 2 micro-batches of 2 logs the loss and gradient norm of 1 micro-batch of 4:
    each micro-batch's loss is divided by --grad-accum before backward (a summed gradient is clipped differently)."""
    folder, paths, base = toy_dir
    rows = {}
    for accum in (1, 2):
        iopo.train(config(base, paths["dpo"], tmp_path / f"accum{accum}", "dpo", max_steps=1, batch_size=4 // accum,
                          grad_accum=accum))
        rows[accum] = losses(tmp_path / f"accum{accum}")[0]
    for key in ("loss", "grad_norm"):
        assert rows[2][key] == pytest.approx(rows[1][key], rel=1e-5), \
            f"{key}: {rows[2][key]} with 2 micro-batches of 2, {rows[1][key]} with 1 of 4"


def test_scorer_scores_each_token_from_the_tokens_before_it(tiny_model):
    """Scorer's log-prob of label t is log_softmax of the logits after a forward pass over ids[:t] alone (the hidden
    state of position t - 1); prompt positions give 0."""
    ids = torch.randint(3, 320, (1, 10), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt
    with torch.no_grad():
        got = iopo.Scorer(tiny_model)(ids, torch.ones_like(ids), labels)[0]  # (T-1,)
        for t in range(4, 10):
            want = torch.log_softmax(tiny_model.logits(tiny_model(ids[:, :t]))[0, -1], -1)[ids[0, t]].item()
            assert abs(got[t - 1].item() - want) < 1e-5, f"label {t}: Scorer {got[t - 1].item()}, prefix pass {want}"
    assert got[:3].tolist() == [0.0] * 3, f"prompt positions {got[:3].tolist()}"


@pytest.mark.parametrize("method", ["sft", "dpo", "iopo"])
def test_first_logged_loss_is_the_loss_of_the_starting_model(toy_dir, tmp_path, method):
    """Step 1 logs the starting model's loss: DPO / IOPO ln 2 (policy == reference; 2 micro-batches are averaged,
    not summed), SFT the NLL per scored response token that evaluate_loss gives over the same 16 examples."""
    folder, paths, base = toy_dir
    accum = 1 if method == "sft" else 2
    iopo.train(config(base, paths[method], tmp_path / method, method, max_steps=1, batch_size=16 // accum,
                      grad_accum=accum))
    logged = losses(tmp_path / method)[0]["loss"]
    if method == "sft":
        dataset = EncodedDataset(RecordFile(str(paths[method]), method), method, M.load_tokenizer(base))
        expected = iopo.evaluate_loss(iopo.Scorer(M.load_model(base)), dataset, None,
                                      iopo.TrainConfig(method=method, batch_size=16), torch.device("cpu"),
                                      contextlib.nullcontext)["eval/loss"]
    else:
        expected = math.log(2)
    assert abs(logged - expected) < 1e-5, f"{method}: first logged loss {logged}, expected {expected}"


def test_reference_cache_key_follows_what_the_reference_depends_on(tmp_path):
    """The reference-cache key is stable, ignores settings the reference does not read (lr, seed), and changes with
    each thing it does: data, tokenizer, chat template, config and weight files, cut length, dtype, packing, method,
    LoRA."""
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "data.jsonl").write_text("{}\n")
    cfg = iopo.TrainConfig(method="dpo", model=str(tmp_path), data=str(tmp_path / "data.jsonl"))
    key = lambda c: iopo.reference_cache_key(c, tmp_path)
    start = key(cfg)
    assert key(dataclasses.replace(cfg, lr=1.0, seed=3)) == start, "lr and seed must not change the key"
    changed = {name: key(dataclasses.replace(cfg, **{name: value})) for name, value in (
        ("max_len", 512), ("dtype", "bfloat16"), ("pack", True), ("method", "iopo"), ("lora_rank", 8))}
    for name in ("data.jsonl", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json",
                 "model.safetensors"):
        old = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(old + b" ")
        changed[name] = key(cfg)
        (tmp_path / name).write_bytes(old)
    assert key(cfg) == start, "the same files and settings must give the same key"
    ignored = [name for name, k in changed.items() if k == start]
    assert not ignored, f"the key does not change with {ignored}"


def test_epochs_round_up_to_whole_steps(toy_dir, tmp_path):
    """16 examples in batches of 5 are 4 micro-batches an epoch; with 3 per step one epoch is ceil(4 / 3) = 2 steps."""
    folder, paths, base = toy_dir
    iopo.train(config(base, paths["sft"], tmp_path / "run", "sft", max_steps=0, epochs=1.0, batch_size=5, grad_accum=3))
    steps = [r["step"] for r in losses(tmp_path / "run")]
    assert steps == [1, 2], f"logged steps {steps}, expected [1, 2]"


def test_max_grad_norm_clips_the_update(toy_dir, tmp_path):
    """A gradient clipped to norm 1e-12 is far below AdamW's eps (1e-8), so one step barely moves the weights; without
    clipping the same step moves the largest weight by about the learning rate."""
    folder, paths, base = toy_dir
    moved = {}
    for cap in (1e-12, 0.0):
        final = iopo.train(config(base, paths["sft"], tmp_path / str(cap), "sft", max_steps=1, max_grad_norm=cap))
        before, after = M.load_model(base).state_dict(), M.load_model(final).state_dict()
        moved[cap] = max((after[k] - before[k]).abs().max().item() for k in before)
    assert moved[1e-12] < 1e-5 < 1e-3 < moved[0.0], f"largest weight change with / without clipping: {moved}"


def test_heldout_loss_runs_without_dropout(toy_dir, tmp_path):
    """The held-out loss is computed in eval mode: with LoRA dropout 0.5 it equals evaluate_loss of the saved (merged)
    model on the same held-out examples."""
    folder, paths, base = toy_dir
    final = iopo.train(config(base, paths["sft"], tmp_path / "run", "sft", max_steps=2, lora_rank=4, lora_dropout=0.5,
                              lr=5e-2, eval_every=2, eval_size=4))
    logged = losses(tmp_path / "run")[-1]["eval/loss"]
    dataset = EncodedDataset(RecordFile(str(paths["sft"]), "sft"), "sft", M.load_tokenizer(base))
    _, heldout = iopo.holdout_split(dataset, 4, seed=0)
    expected = iopo.evaluate_loss(iopo.Scorer(M.load_model(final)), heldout, None, iopo.TrainConfig(method="sft"),
                                  torch.device("cpu"), contextlib.nullcontext)["eval/loss"]
    assert abs(logged - expected) < 1e-4, f"logged held-out loss {logged}, the saved model's {expected}"


def test_checkpoint_saved_again_at_the_same_step_replaces_the_old_one(tiny_model, chatml_tokenizer_dir, tmp_path):
    """Saving checkpoint-2 over an existing checkpoint-2 swaps the new folder in once it is complete: its step and
    weights are read back, and no temporary or old folder is left beside it."""
    opt = torch.optim.AdamW(tiny_model.parameters())
    sampler, cfg = BatchSampler(8, 2, seed=0), iopo.TrainConfig(method="sft", data="d.jsonl")
    path = tmp_path / "checkpoint-2"
    iopo.save_checkpoint(path, tiny_model, chatml_tokenizer_dir, opt.state_dict(), sampler, 1, cfg, None)
    with torch.no_grad():
        tiny_model.model.norm.weight.fill_(2.0)
    iopo.save_checkpoint(path, tiny_model, chatml_tokenizer_dir, opt.state_dict(), sampler, 2, cfg, None)
    step, norm = iopo.read_trainer_state(path)["step"], M.load_model(path).model.norm.weight
    assert step == 2 and bool((norm == 2.0).all()), f"read back step {step}, norm weights {norm[:3].tolist()}"
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["checkpoint-2"], f"folders left: {left}"


def test_lora_adapters_missing_or_unknown_are_refused(tiny_model, tmp_path):
    """An adapter file without some of the model's adapters (the B matrices) or with one the model lacks is refused,
    naming them: loaded with strict=False, the missing ones would silently keep their fresh values."""
    adapters = lora_adapters(tiny_model)
    file = tmp_path / "adapter.safetensors"
    save_file({k: v for k, v in adapters.items() if ".lora_A" in k}, file)
    with pytest.raises(ValueError, match=r"adapters do not match the model \(unexpected \[\], missing \['.*lora_B'"):
        iopo.load_adapters(tmp_path, tiny_model)
    save_file({**adapters, "model.layers.7.mlp.up_proj.lora_A": torch.zeros(2, 64)}, file)
    with pytest.raises(ValueError, match=r"unexpected \['model.layers.7.mlp.up_proj.lora_A'\], missing \[\]"):
        iopo.load_adapters(tmp_path, tiny_model)


def test_checkpoints_sort_by_step_and_skip_incomplete_folders(tmp_path):
    """checkpoints() orders checkpoint-N folders by N as a number (9 before 10), and leaves out one without a
    trainer_state.json (half deleted, or copied in part) and other names; --resume OUT takes checkpoint-10."""
    for name in ("checkpoint-10", "checkpoint-2", "checkpoint-9", "checkpoint-11", "checkpoint-best"):
        (tmp_path / name).mkdir()
        if name != "checkpoint-11":
            (tmp_path / name / "trainer_state.json").write_text("{}")
    got = [p.name for p in iopo.checkpoints(tmp_path)]
    assert got == ["checkpoint-2", "checkpoint-9", "checkpoint-10"], got
    latest = iopo.latest_checkpoint(tmp_path)
    assert latest == tmp_path / "checkpoint-10", f"--resume of the folder took {latest.name}"
    assert iopo.latest_checkpoint(tmp_path / "checkpoint-2") == tmp_path / "checkpoint-2"


def test_settings_at_the_edges_of_their_ranges():
    """--beta 0 and --label-smoothing 0.5 are refused (both make the preference loss a constant ln 2), --warmup-ratio
    1 is accepted; --eval-size without --eval-every and an IOPO --variant with DPO are refused for a new run but
    accepted on resume (older runs saved them)."""
    cfg = iopo.TrainConfig(method="dpo", data="d.jsonl")
    for change, message in (({"beta": 0.0}, "--beta must be > 0"), ({"label_smoothing": 0.5}, "--label-smoothing in"),
                            ({"eval_size": 4}, "--eval-every and --eval-size go together"),
                            ({"variant": "three_seq"}, "--variant chooses among IOPO's losses")):
        with pytest.raises(ValueError, match=message):
            iopo.check_settings(dataclasses.replace(cfg, **change), resuming=False)
    for change, resuming in (({"warmup_ratio": 1.0, "label_smoothing": 0.49, "beta": 1e-6}, False),
                             ({"eval_size": 4}, True), ({"variant": "three_seq"}, True)):
        iopo.check_settings(dataclasses.replace(cfg, **change), resuming=resuming)  # no error


def test_resume_in_place_recognises_out_however_it_is_spelt(tmp_path, monkeypatch):
    """--out run (relative) and --resume /abs/run/checkpoint-1 are the same folder: the later checkpoint-2 is listed
    for removal, instead of the folder being refused as one that holds an earlier run."""
    monkeypatch.chdir(tmp_path)
    for n in (1, 2):
        (tmp_path / "run" / f"checkpoint-{n}").mkdir(parents=True)
        (tmp_path / "run" / f"checkpoint-{n}" / "trainer_state.json").write_text("{}")
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    cfg = iopo.TrainConfig(method="sft", data="d.jsonl", out="run")
    stale = iopo.stale_outputs(cfg, tmp_path / "run" / "checkpoint-1", 1)
    assert [p.name for p, _ in stale] == ["checkpoint-2"], stale


def test_reference_cache_key_reads_every_weight_shard(tmp_path):
    """A sharded reference model's key changes when any of its shards does, the second one included."""
    names = ("config.json", "tokenizer.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
             "model-00002-of-00002.safetensors")
    for name in names:
        (tmp_path / name).write_text(name)
    (tmp_path / "data.jsonl").write_text("{}\n")
    cfg = iopo.TrainConfig(method="dpo", model=str(tmp_path), data=str(tmp_path / "data.jsonl"))
    start = iopo.reference_cache_key(cfg, tmp_path)
    (tmp_path / names[-1]).write_text("other weights")
    assert iopo.reference_cache_key(cfg, tmp_path) != start, "the key ignores the second shard"
