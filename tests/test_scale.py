"""Scaling up (iopo.py, data.py, model.py): DDP and FSDP on 2 CPU processes, shared-prompt packing, checkpointing."""

import contextlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from torch.utils._python_dispatch import TorchDispatchMode

import iopo
import model as M
from data import (COLLATORS, EncodedDataset, RecordFile, collate_packed, pack_pair, packed_attention_mask,
                  packed_views)
from test_train import write_data


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, argv_list):
    # What torchrun does for each process, minus a fresh interpreter: the environment that
    # iopo.setup_distributed reads. One process group per iopo.main call, each on its own port.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    for argv, p in zip(argv_list, port):
        os.environ["MASTER_PORT"] = str(p)
        iopo.main(argv)


def run_ranks(argv_list, world=2, timeout=120):
    """Run iopo.main(argv) for each argv in turn on `world` forked processes (gloo): torchrun's environment,
    without paying for a fresh Python and torch import per process. A hang fails the test after `timeout` s."""
    ports = [free_port() for _ in argv_list]
    ctx = mp.start_processes(_rank_main, args=(world, ports, argv_list), nprocs=world, start_method="fork", join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):  # raises if a process failed
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"{world} processes did not finish {argv_list} within {timeout} s")


def argv(method, base, data, out, **kw):
    opts = {**dict(model=base, data=data, out=out, max_steps=2, batch_size=4, grad_accum=2, lr=2e-3,
                   warmup_ratio=0.0, max_grad_norm=0.0, device="cpu"), **kw}
    args = [method]
    for k, v in opts.items():
        if v is True:
            args.append("--" + k.replace("_", "-"))
        elif v is not False:
            args += ["--" + k.replace("_", "-"), str(v)]
    return args


def losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Data files plus a tiny from-scratch model and tokenizer (as tests/test_train.py builds them)."""
    folder = tmp_path_factory.mktemp("scale")
    paths = write_data(folder)
    iopo.train(iopo.TrainConfig(method="sft", model="toy", data=str(paths["sft"]), out=str(folder / "toy"),
                                toy_preset="tiny", toy_vocab=300, max_steps=1, batch_size=2, grad_accum=1))
    return folder, {k: str(v) for k, v in paths.items()}, str(folder / "toy" / "base")


# --- data parallel


def test_ddp_two_processes_log_the_losses_of_one(toy, tmp_path):
    """2 gloo processes with half of each global batch log the 1-process losses (SFT, DPO, IOPO) within 1e-5."""
    folder, paths, base = toy
    methods = ("sft", "dpo", "iopo")
    run_ranks([argv(m, base, paths[m], tmp_path / f"ddp_{m}") for m in methods])
    for m in methods:
        iopo.main(argv(m, base, paths[m], tmp_path / f"one_{m}"))
        one, two = losses(tmp_path / f"one_{m}"), losses(tmp_path / f"ddp_{m}")
        assert len(two) == 2 and two == pytest.approx(one, abs=1e-5), f"{m}: 2 processes {two} vs 1 process {one}"


def test_ddp_held_out_loss_with_the_reference_per_step(toy, tmp_path):
    """Under DDP only rank 0 evaluates: with --ref-on-the-fly it scores the held-out reference alone (a pass shared
    with the other process would wait for it forever) and logs the held-out losses of one process."""
    folder, paths, base = toy
    kw = dict(ref_on_the_fly=True, max_steps=2, eval_every=1, eval_size=4, grad_accum=1)
    run_ranks([argv("dpo", base, paths["dpo"], tmp_path / "ddp", **kw)], timeout=60)
    iopo.main(argv("dpo", base, paths["dpo"], tmp_path / "one", **kw))
    logged = lambda out: [json.loads(line)[k] for line in (out / "metrics.jsonl").read_text().splitlines()
                          for k in ("loss", "eval/loss")]
    one, two = logged(tmp_path / "one"), logged(tmp_path / "ddp")
    assert len(two) == 4 and two == pytest.approx(one, abs=1e-5), f"2 processes {two} vs 1 process {one}"


def test_ddp_processes_draw_their_own_dropout(toy, tmp_path, monkeypatch):
    """2 DDP processes each draw their own dropout (seeded with seed + rank): their first steps differ."""
    folder, paths, base = toy
    real = iopo.policy_loss

    def recording(*args, **kwargs):  # runs in the forked processes: what the step's dropout would draw next
        with torch.random.fork_rng(devices=[]):
            draw = torch.rand(4).tolist()
        (tmp_path / f"rank{torch.distributed.get_rank()}.json").write_text(json.dumps(draw))
        return real(*args, **kwargs)

    monkeypatch.setattr(iopo, "policy_loss", recording)
    run_ranks([argv("sft", base, paths["sft"], tmp_path / "run", max_steps=1, grad_accum=1, lora_rank=4,
                    lora_dropout=0.3)])
    draws = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert draws[0] != draws[1], f"both processes drew {draws[0]}: their dropout masks would be identical"


def test_uneven_last_micro_batch_matches_one_process(toy, tmp_path):
    """Across an epoch's end, where the last global micro-batch does not split evenly over 2 processes (19
    examples in batches of 4: 3 left, shares of 2 and 1) or leaves one process nothing (17: 1 left), the losses
    and metrics logged equal one process's: each share is weighted by its size, and an empty share runs one
    example weighted 0 so that the gradient reduction still has every process (DDP, and FSDP for one case)."""
    folder, paths, base = toy
    cases = (("sft", 17, False), ("dpo", 17, False), ("iopo", 19, False), ("iopo", 17, False), ("dpo", 17, True))
    run = lambda method, n, out, **kw: argv(method, base, write_data(tmp_path / f"{method}{n}", n=n)[method],
                                             tmp_path / out, max_steps=6, grad_accum=1, **kw)
    for method, n, _ in cases:
        (tmp_path / f"{method}{n}").mkdir(exist_ok=True)
    run_ranks([run(m, n, f"two_{m}{n}_{f}", fsdp=f) for m, n, f in cases])
    logged = lambda out: [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
                          for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
    for m, n, f in cases:
        if not (tmp_path / f"one_{m}{n}").exists():
            iopo.main(run(m, n, f"one_{m}{n}"))
        one, two = logged(f"one_{m}{n}"), logged(f"two_{m}{n}_{f}")
        assert len(two) == 6 and [r.keys() for r in two] == [r.keys() for r in one], (m, n, f, two, one)
        for r1, r2 in zip(one, two):
            assert r2 == pytest.approx(r1, rel=1e-6, abs=1e-5), \
                f"{m} on {n} examples, fsdp={f}, step {r1['step']}: 2 processes {r2} vs 1 process {r1}"


@pytest.mark.parametrize("fsdp", [False, True])
def test_reference_pass_is_shared(toy, tmp_path, fsdp):
    """The reference table that 2 processes write for 15 examples (shares of 8 and 7, the shorter one topped up
    so that FSDP's sharded forwards stay in step) equals one process's, row for row."""
    folder, paths, base = toy
    data = tmp_path / "dpo15.jsonl"
    data.write_text("".join(Path(paths["dpo"]).read_text().splitlines(keepends=True)[:15]))
    run_ranks([argv("dpo", base, data, tmp_path / "two" / "run", max_steps=1, fsdp=fsdp, ref_batch_size=2)],
              timeout=60)
    iopo.main(argv("dpo", base, data, tmp_path / "one" / "run", max_steps=1))
    tables = {}
    for name in ("one", "two"):
        [cache] = (tmp_path / name / "ref_cache").glob("dpo-*.safetensors")
        with safe_open(cache, "pt") as f:
            tables[name] = f.get_tensor("ref_logps")
    assert tables["one"].shape == (15, 2)
    torch.testing.assert_close(tables["two"], tables["one"], rtol=0, atol=1e-4)


@pytest.mark.parametrize("fsdp", [False, True])
def test_ddp_resume_continues_the_run(toy, tmp_path, fsdp):
    """Under 2 processes (LoRA with dropout: each its own random masks), resuming from the step-2 checkpoint
    logs exactly the uninterrupted run's later losses; with --fsdp too, where rank 0 builds the whole model
    to save it (which must not move its random generator)."""
    folder, paths, base = toy
    full = argv("iopo", base, paths["iopo"], tmp_path / "full", max_steps=4, save_every=2, lora_rank=4,
                lora_dropout=0.3, fsdp=fsdp)
    resumed = ["iopo", "--data", paths["iopo"], "--out", str(tmp_path / "resumed"),
               "--resume", str(tmp_path / "full" / "checkpoint-2")]
    run_ranks([full, resumed])
    want, got = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert len(want) == 4 and got == want[2:], f"resumed {got} vs uninterrupted {want}"
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == \
        ["checkpoint-2", "config.json", "final", "metrics.jsonl"], sorted((tmp_path / "full").iterdir())


# --- sharded parameters (FSDP2)


@pytest.mark.parametrize("ref_on_the_fly,lora_rank", [(False, 0), (True, 0), (False, 4), (True, 4)])
def test_fsdp_two_processes_match_one(toy, tmp_path, ref_on_the_fly, lora_rank):
    """--fsdp on 2 gloo processes logs the 1-process losses and held-out losses (3 steps, evaluated after each)
    and saves full weights equal to the 1-process run's; the reference from the cache (computed by the sharded
    policy before its first step), or per step (LoRA: adapters off; full fine-tuning: a sharded frozen copy)."""
    folder, paths, base = toy
    kw = dict(lora_rank=lora_rank, max_steps=3, eval_every=1, eval_size=4)
    run_ranks([argv("dpo", base, paths["dpo"], tmp_path / "fsdp", fsdp=True, ref_on_the_fly=ref_on_the_fly, **kw)])
    iopo.main(argv("dpo", base, paths["dpo"], tmp_path / "one", **kw))
    logged = lambda out: [json.loads(line)[k] for line in (out / "metrics.jsonl").read_text().splitlines()
                          for k in ("loss", "eval/loss")]
    one, two = logged(tmp_path / "one"), logged(tmp_path / "fsdp")
    assert len(two) == 6 and two == pytest.approx(one, abs=1e-5), f"FSDP {two} vs 1 process {one}"
    a, b = M.load_model(tmp_path / "fsdp" / "final").state_dict(), M.load_model(tmp_path / "one" / "final").state_dict()
    worst = max((a[k] - b[k]).abs().max().item() for k in b)
    assert a.keys() == b.keys() and worst < 1e-4, f"FSDP final weights differ from 1 process by {worst}"


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_fsdp_resume_continues_the_run(toy, tmp_path, lora_rank):
    """Under --fsdp a checkpoint is gathered whole: resuming from it on 2 sharded processes logs the
    uninterrupted run's later losses exactly, one process without FSDP continues it to 1e-5, and it holds what
    one process's checkpoint of the same run holds (weights and Adam moments under the same names, equal to
    rounding)."""
    folder, paths, base = toy
    run = lambda out, **kw: argv("iopo", base, paths["iopo"], tmp_path / out, max_steps=4, save_every=2,
                                 lora_rank=lora_rank, **kw)
    resumed = ["iopo", "--data", paths["iopo"], "--out", str(tmp_path / "resumed"),
               "--resume", str(tmp_path / "full" / "checkpoint-2")]
    run_ranks([run("full", fsdp=True), resumed])
    want = losses(tmp_path / "full")
    assert len(want) == 4 and losses(tmp_path / "resumed") == want[2:], (losses(tmp_path / "resumed"), want)
    # one process resumes it too: --no-fsdp is one of the settings a resume may change
    iopo.main(["iopo", "--out", str(tmp_path / "alone"), "--resume", str(tmp_path / "full"), "--no-fsdp"])
    assert losses(tmp_path / "alone") == pytest.approx(want[2:], abs=1e-5), (losses(tmp_path / "alone"), want)
    iopo.main(run("one"))  # the same run in one process, without FSDP
    for name in ("trainer_state.safetensors", "model.safetensors"):
        with safe_open(tmp_path / "full" / "checkpoint-2" / name, "pt") as a, \
                safe_open(tmp_path / "one" / "checkpoint-2" / name, "pt") as b:
            keys = {k for k in b.keys() if not k.startswith("rng.")}  # generators: 2 processes vs 1
            assert {k for k in a.keys() if not k.startswith("rng.")} == keys and keys, f"{name}: {sorted(a.keys())[:4]}"
            for k in keys:
                got, ref = a.get_tensor(k), b.get_tensor(k)
                # Adam turns the runs' rounding differences into weights 6e-5 apart and moments 4e-4 of their
                # size apart; a tensor stored under the wrong id or name would be off by its own size
                worst, scale = (got - ref).abs().max().item(), ref.abs().max().item()
                assert got.shape == ref.shape and worst <= (1e-3 * scale if "state." in k else 1e-4), \
                    f"{name} {k}: FSDP vs one process differ by {worst} (largest value {scale})"


def test_fsdp_with_compiled_blocks(toy, tmp_path, monkeypatch):
    """--fsdp --compile on 2 processes (each block compiled, then sharded, so dynamo traces FSDP2's hooks) logs
    the losses of one eager process. The aot_eager backend, as in test_compiled_blocks_match_eager (the forked
    processes inherit the patch)."""
    folder, paths, base = toy
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_(self, **{**kw, "backend": "aot_eager"}))
    run_ranks([argv("sft", base, paths["sft"], tmp_path / "fsdp", fsdp=True, compile=True)])
    iopo.main(argv("sft", base, paths["sft"], tmp_path / "one"))
    one, two = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    assert len(two) == 2 and two == pytest.approx(one, abs=1e-5), f"FSDP + compile {two} vs 1 eager process {one}"


def test_a_gpu_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    """Under torchrun on GPUs a process joins with NCCL and takes the GPU numbered by LOCAL_RANK (its place on its
    node; RANK counts over all nodes); on the CPU it joins with gloo and keeps its device; outside torchrun it is
    process 0 of 1. The process group is faked: no GPU is needed."""
    joined, chosen = [], []
    monkeypatch.setattr(iopo.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(iopo.dist, "init_process_group", lambda backend, timeout: joined.append((backend, timeout)))
    monkeypatch.setattr(iopo.dist, "get_rank", lambda: 5)
    monkeypatch.setattr(iopo.dist, "get_world_size", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert iopo.setup_distributed(torch.device("cpu")) == ((0, 1), torch.device("cpu")) and not joined
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "8")
    got = iopo.setup_distributed(torch.device("cuda"), timeout_minutes=2)
    assert got == ((5, 8), torch.device("cuda", 1)) and chosen == [torch.device("cuda", 1)], (got, chosen)
    assert iopo.setup_distributed(torch.device("cpu")) == ((5, 8), torch.device("cpu")), "the CPU keeps its device"
    assert [b for b, _ in joined] == ["nccl", "gloo"] and joined[0][1].total_seconds() == 120, joined


def test_fsdp_needs_torchrun():
    """--fsdp in a single process stops with a message that says to run it under torchrun."""
    with pytest.raises(SystemExit, match="torchrun"):
        iopo.main(["dpo", "--data", "unused.jsonl", "--fsdp", "--device", "cpu"])


def test_packed_attention_choice_is_checked():
    """An unknown --packed-attention value stops before anything is loaded, naming the choices."""
    with pytest.raises(ValueError, match="--packed-attention must be mask, rows or auto"):
        iopo.train(iopo.TrainConfig(method="dpo", data="unused.jsonl", pack=True, packed_attention="flash",
                                    device="cpu"))


# --- shared-prompt packing


def test_pack_pair_layout():
    """A packed row by hand: prompt once, y_b's positions restart after x, y_b's first label follows the prompt."""
    P = -100
    a = {"input_ids": [5, 6, 7, 8, 9], "labels": [P, P, P, 8, 9]}  # x = 5 6 7, y_a = 8 9
    b = {"input_ids": [5, 6, 7, 3, 4, 2], "labels": [P, P, P, 3, 4, 2]}  # y_b = 3 4 2
    row = pack_pair(a, b)
    assert row == {"input_ids": [5, 6, 7, 8, 9, 3, 4, 2],
                   "labels": [P, P, P, 8, 9, P, P, P],
                   "labels_b": [P, P, P, 3, P, P, 4, 2],
                   "position_ids": [0, 1, 2, 3, 4, 3, 4, 5],
                   "segment_ids": [1, 1, 1, 2, 2, 3, 3, 3]}, row
    mask = packed_attention_mask(torch.tensor([row["segment_ids"] + [0, 0]]))[0, 0].int()  # (T, T)
    assert mask[6].tolist() == [1, 1, 1, 0, 0, 1, 1, 0, 0, 0], f"y_b's 2nd token sees x and y_b only: {mask[6]}"
    assert mask[4].tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0, 0], f"y_a is plain causal: {mask[4]}"
    with pytest.raises(ValueError, match="different prompts"):
        pack_pair(a, {"input_ids": [5, 6, 1, 2], "labels": [P, P, P, 2]})
    # y_b's second attention pass reads [x, y_b] = packed positions 0 1 2 5 6 7; a shorter second row pads
    view = packed_views(torch.tensor([row["segment_ids"] + [0, 0], [1, 1, 2, 3, 0, 0, 0, 0, 0, 0]]))
    assert view["b_index"].tolist() == [[0, 1, 2, 5, 6, 7], [0, 1, 3, 0, 0, 0]], view["b_index"]
    assert view["b_src"].tolist() == [3, 4, 5, 6 + 2] and view["b_dst"].tolist() == [5, 6, 7, 10 + 3], view
    # the first pass is the prefix [x, y_a] of the longest one (3 + 2 tokens in the first row)
    assert view["a_index"].tolist() == [list(range(5))] * 2, view["a_index"]


@pytest.fixture(scope="module")
def encoded(toy):
    """The toy model and the DPO / IOPO examples of the test data, encoded with its tokenizer."""
    folder, paths, base = toy
    tok = M.load_tokenizer(base)
    data = {kind: EncodedDataset(RecordFile(paths[kind], kind), kind, tok, max_len=64) for kind in ("dpo", "iopo")}
    return M.load_model(base), tok, data, base


def _step(net, cfg, batch, ref, packed_attention="mask"):
    net.zero_grad(set_to_none=True)
    scorer = iopo.Scorer(net, packed_attention)
    token_logps = scorer(**batch)
    assert token_logps._base is None, "the Scorer returned a view (FSDP2 warns: in-place ops on one skip its hooks)"
    loss, metrics = iopo.method_loss(cfg, token_logps, batch["labels"], ref, labels_b=batch.get("labels_b"))
    loss.backward()
    grads = {k: p.grad.clone() for k, p in net.named_parameters()}
    sums = token_logps.sum(-1)
    return sums, loss.detach(), grads


def _sums64(net, batch, layout="rows"):
    """Per-row (y_a, y_b) log-prob sums in float64 from the full log-softmax: exact to rounding, (2, R).
    Packed rows attend through M.PackedRows (layout "rows") or the explicit (R, 1, T, T) mask ("mask")."""
    if "segment_ids" not in batch:
        mask = batch["attention_mask"]
    elif layout == "rows":
        mask = M.PackedRows(batch["a_index"], batch["b_index"], batch["b_src"], batch["b_dst"])
    else:
        mask = packed_attention_mask(batch["segment_ids"])
    hidden = net(batch["input_ids"], attention_mask=mask, position_ids=batch.get("position_ids"))
    logps = torch.log_softmax(hidden[:, :-1] @ net.lm_head.weight.T, dim=-1)  # (R, T-1, V)
    out = []
    for labels in (batch["labels"], batch.get("labels_b", batch["labels"])):
        y = labels[:, 1:]
        out.append((logps.gather(-1, y.clamp(min=0)[..., None])[..., 0] * (y != -100)).sum(-1))
    return torch.stack(out)


@pytest.mark.parametrize("layout", ["rows", "mask"])
@pytest.mark.parametrize("kind", ["dpo", "iopo"])
def test_packed_logprobs_equal_unpacked_float64(encoded, kind, layout):
    """In float64, each answer's log-prob in a packed row equals its unpacked row's to 1e-10, whether y_b's
    attention runs as a second causal pass (PackedRows) or under an explicit mask."""
    _, tok, data, base = encoded
    net = M.load_model(base, dtype=torch.float64)
    examples = [data[kind][i] for i in range(6)]
    plain = _sums64(net, COLLATORS[kind](examples, tok.pad_token_id))[0]  # (kB,) in the collator's row order
    batch = collate_packed(examples, kind, tok.pad_token_id)
    a_lens = ((batch["segment_ids"] == 1) | (batch["segment_ids"] == 2)).sum(1)
    assert (a_lens < batch["a_index"].shape[1]).any(), "needs a row whose y_b starts inside the first pass's prefix"
    packed = _sums64(net, batch, layout)  # (2, R)
    order = packed.flatten() if kind == "dpo" else torch.cat([packed[0, :6], packed[1, :6], packed[0, 6:], packed[1, 6:]])
    worst = (order - plain).abs().max().item()
    assert worst < 1e-10, f"{kind}: packed vs unpacked log-probs differ by {worst} (float64); {order} vs {plain}"


@pytest.mark.parametrize("layout", ["rows", "mask"])
def test_packed_logprobs_equal_unpacked_under_a_sliding_window(encoded, layout):
    """Under a 12-position sliding window (in every layer, as Mistral; from layer 1 on, as Qwen2) packed IOPO rows
    still give each answer its unpacked log-prob in float64: the window counts positions, which restart after x."""
    _, tok, data, base = encoded
    examples = [data["iopo"][i] for i in range(6)]
    plain_batch = COLLATORS["iopo"](examples, tok.pad_token_id)
    batch = collate_packed(examples, "iopo", tok.pad_token_id)
    assert min(batch["a_index"].shape[1], batch["b_index"].shape[1]) > 12, "both passes should be longer than the window"
    for max_window_layers in (0, 1):
        net = M.load_model(base, dtype=torch.float64)
        no_window = _sums64(net, plain_batch)[0]
        net.config.sliding_window, net.config.max_window_layers = 12, max_window_layers
        plain = _sums64(net, plain_batch)[0]  # (4B,) unpacked, windowed through the padding mask
        moved = (plain - no_window).abs().max().item()
        assert moved > 1e-3, f"the window should change the log-probs of these longer rows; it moved them by {moved}"
        packed = _sums64(net, batch, layout)  # (2, 2B)
        order = torch.cat([packed[0, :6], packed[1, :6], packed[0, 6:], packed[1, 6:]])
        worst = (order - plain).abs().max().item()
        assert worst < 1e-10, f"window from layer {max_window_layers}: packed vs unpacked differ by {worst}"


@pytest.mark.parametrize("packed_attention", ["mask", "rows"])
@pytest.mark.parametrize("kind,variant", [("dpo", "full"), ("iopo", "full"), ("iopo", "three_seq")])
def test_packed_equals_unpacked(encoded, kind, variant, packed_attention):
    """Through Scorer and method_loss in float32, packed rows give the unpacked log-probs, answer lengths, loss
    (with the SFT term, which divides by those lengths) and gradients, with y_b kept from y_a by the mask or by
    the two causal passes."""
    net, tok, data, _ = encoded
    examples = [data[kind][i] for i in range(6)]
    cfg = iopo.TrainConfig(method=kind, variant=variant, beta=0.5, ftx=0.5)
    k = iopo.SEQS_PER_EXAMPLE[kind]
    ref = -20 * torch.rand(len(examples), k, generator=torch.Generator().manual_seed(0))  # (B, k) made-up reference
    plain = iopo.policy_rows(cfg, COLLATORS[kind](examples, tok.pad_token_id))
    packed = collate_packed(examples, kind, tok.pad_token_id)
    assert packed["input_ids"].numel() < plain["input_ids"].numel(), "packing should make the batch smaller"
    sums_plain, loss_plain, grads_plain = _step(net, cfg, plain, ref)
    sums_packed, loss_packed, grads_packed = _step(net, cfg, packed, ref, packed_attention)
    # rows [x, y_w, y_l]; IOPO rows [x1, y1, y2] then [x2, y2, y1], back into the unpacked order
    order = {"dpo": sums_packed.flatten(),
             "iopo": torch.cat([sums_packed[0, :6], sums_packed[1, :6], sums_packed[0, 6:], sums_packed[1, 6:]])}[kind]
    if variant == "three_seq":
        order = torch.cat([order[:12], order[18:]])
    torch.testing.assert_close(order, sums_plain, rtol=0, atol=1e-5,
                               msg=lambda m: f"{kind}: packed vs unpacked sequence log-probs: {m}")
    no_logps = lambda b: torch.zeros(*b["labels"][:, 1:].shape)  # noqa: E731  (R, T-1): only the counts matter
    _, n_plain = iopo.sequence_sums(cfg, no_logps(plain), plain["labels"])
    _, n_packed = iopo.sequence_sums(cfg, torch.stack([no_logps(packed)] * 2), packed["labels"], packed["labels_b"])
    if variant == "three_seq":
        n_packed = torch.cat([n_packed[:12], n_packed[18:]])
    assert n_packed.tolist() == n_plain.tolist(), \
        f"{kind}/{variant}: scored tokens per answer, packed {n_packed.tolist()} vs unpacked {n_plain.tolist()}"
    torch.testing.assert_close(loss_packed, loss_plain, rtol=1e-6, atol=1e-6)
    worst = max((grads_packed[n] - grads_plain[n]).abs().max().item() for n in grads_plain)
    scale = max(g.abs().max().item() for g in grads_plain.values())
    assert worst <= 1e-4 * scale, f"{kind}/{variant}: gradients differ by {worst} (largest gradient {scale})"


def test_packed_training_logs_the_unpacked_losses(toy, tmp_path):
    """iopo.py iopo --pack, with either packed attention, logs the losses of the unpacked run (2 steps). The
    reference log-probs come from packed rows too: cached (one pass before training) or per step."""
    folder, paths, base = toy
    runs = {"plain": {}, "mask": dict(pack=True), "rows": dict(pack=True, packed_attention="rows"),
            "per-step": dict(pack=True, packed_attention="rows", ref_on_the_fly=True)}
    got = {}
    for name, kw in runs.items():
        out = tmp_path / name / "run"  # each run its own reference cache (out's parent folder)
        iopo.main(argv("iopo", base, paths["iopo"], str(out), grad_accum=1, **kw))
        got[name] = losses(out)
    for name in ("mask", "rows", "per-step"):
        assert len(got[name]) == 2 and max(abs(a - b) for a, b in zip(got[name], got["plain"])) < 1e-5, got


# --- gradient checkpointing


@pytest.mark.parametrize("pack", [False, True])
def test_gradient_checkpointing_leaves_gradients_unchanged(encoded, pack):
    """An IOPO step with each block recomputed in backward gives the same loss and gradients as without."""
    net, tok, data, _ = encoded
    net.train()
    examples = [data["iopo"][i] for i in range(4)]
    batch = collate_packed(examples, "iopo", tok.pad_token_id) if pack else COLLATORS["iopo"](examples, tok.pad_token_id)
    ref = torch.zeros(4, 4)
    cfg = iopo.TrainConfig(method="iopo")
    results = {}
    for flag in (False, True):
        net.gradient_checkpointing = flag
        results[flag] = _step(net, cfg, batch, ref, "rows" if pack else "mask")
    net.gradient_checkpointing = False
    torch.testing.assert_close(results[True][1], results[False][1], rtol=0, atol=0)
    for name, g in results[False][2].items():
        torch.testing.assert_close(results[True][2][name], g, rtol=0, atol=1e-7,
                                   msg=lambda m: f"{name}: gradient with checkpointing differs: {m}")


def test_compiled_blocks_match_eager(encoded):
    """Blocks compiled as iopo.train --compile does (each block, dynamic shapes; here with the aot_eager backend:
    dynamo and AOTAutograd without code generation, so no C compiler is needed) give eager's IOPO loss and
    gradients under checkpointing, unpacked and packed (PackedRows), at two batch shapes; one graph per
    attention layout serves every layer and every shape."""
    _, tok, data, base = encoded
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = M.load_model(base), M.load_model(base)
    for net in (eager, compiled):
        net.train()
        net.gradient_checkpointing = True
    for layer in compiled.model.layers:
        layer.compile(backend="aot_eager", dynamic=True)
    cfg = iopo.TrainConfig(method="iopo")
    try:
        for n, pack in ((4, False), (3, False), (3, True)):
            examples = [data["iopo"][i] for i in range(n)]
            batch = (collate_packed(examples, "iopo", tok.pad_token_id) if pack
                     else COLLATORS["iopo"](examples, tok.pad_token_id))
            want = _step(eager, cfg, batch, torch.zeros(n, 4), "rows")
            got = _step(compiled, cfg, batch, torch.zeros(n, 4), "rows")
            torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-6)
            for name, g in want[2].items():
                torch.testing.assert_close(got[2][name], g, rtol=0, atol=1e-6,
                                           msg=lambda m: f"{name} (pack={pack}, {n} examples): {m}")
        # One graph per layout, plus at most one recompile where a batch size first equals a model dimension
        # (dynamo then guesses it is that dimension, here 16 rows = head_dim 16); a graph per layer would be 4+
        graphs, layers = counters["stats"]["unique_graphs"], len(compiled.model.layers)
        assert graphs < 2 * layers, f"{graphs} graphs for {layers} layers x 2 layouts: one per layer, not shared"
    finally:
        torch._dynamo.reset()


def test_inductor_compiled_packed_rows_at_two_widths(encoded):
    """With inductor (what --compile uses), blocks compiled once run packed rows of two different widths and give
    eager's gradients: the generated backward once assumed the first batch's row stride and failed at the next."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("torch.compile's inductor backend needs a C++ compiler on the CPU")
    _, tok, data, base = encoded
    by_length = sorted(range(len(data["iopo"])), key=lambda i: len(data["iopo"][i]["y1_x1"]["input_ids"]))
    batches = [collate_packed([data["iopo"][i] for i in chosen], "iopo", tok.pad_token_id)
               for chosen in (by_length[:3], by_length[-3:])]
    widths = [(b["input_ids"].shape[1], b["a_index"].shape[1]) for b in batches]
    assert widths[0] != widths[1], f"needs two packed widths, got {widths}"
    eager, compiled = M.load_model(base), M.load_model(base)
    torch._dynamo.reset()
    for layer in compiled.model.layers:
        layer.compile(dynamic=True)
    cfg = iopo.TrainConfig(method="iopo")
    try:
        for batch in batches:
            want = _step(eager, cfg, batch, torch.zeros(3, 4), "rows")
            got = _step(compiled, cfg, batch, torch.zeros(3, 4), "rows")
            worst = max((got[2][n] - g).abs().max().item() for n, g in want[2].items())
            assert worst < 1e-5, f"packed rows of width {batch['input_ids'].shape[1]}: gradients differ by {worst}"
    finally:
        torch._dynamo.reset()

# --- the GPU step without host-device synchronisation


def test_scored_index_from_the_cpu_gives_the_same_logprobs(encoded):
    """scored_positions (CPU) handed to the Scorer gives the log-probs the kernel finds on its own, packed or
    not; labels outside the vocabulary are caught there with a clear message."""
    net, tok, data, _ = encoded
    examples = [data["iopo"][i] for i in range(3)]
    for batch in (COLLATORS["iopo"](examples, tok.pad_token_id), collate_packed(examples, "iopo", tok.pad_token_id)):
        scorer = iopo.Scorer(net)
        with torch.no_grad():
            found = scorer(**batch)
            given = scorer(**batch, scored_index=iopo.scored_positions(batch, net.config.vocab_size))
        assert torch.equal(found, given), (found - given).abs().max()
    bad = dict(batch, labels=batch["labels"].clone())
    bad["labels"][0, -1] = net.config.vocab_size
    with pytest.raises(ValueError, match=rf"must lie in \[0, {net.config.vocab_size}\)"):
        iopo.scored_positions(bad, net.config.vocab_size)


def test_scorer_runs_right_padded_rows_without_a_mask(encoded):
    """Right-padded rows score as with the padding mask (causality hides the padding); left padding is refused."""
    net, tok, data, _ = encoded
    batch = COLLATORS["dpo"]([data["dpo"][i] for i in range(4)], tok.pad_token_id)
    assert not bool(batch["attention_mask"].all()), "the test needs rows of different lengths"
    with torch.no_grad():
        hidden = net(batch["input_ids"], attention_mask=batch["attention_mask"])
        masked = iopo.token_logprobs(hidden[:, :-1], net.lm_head.weight, batch["labels"][:, 1:])
        got = iopo.Scorer(net)(**batch)
    torch.testing.assert_close(got, masked, rtol=0, atol=1e-5)
    flipped = {k: v.flip(1) for k, v in batch.items()}
    with pytest.raises(ValueError, match="right-padded"):
        iopo.scored_positions(flipped, net.config.vocab_size)


def test_scorer_head_runs_in_the_autocast_dtype(encoded):
    """Under autocast the head's matmuls take bfloat16 views of the float32 hidden states and weight (as a
    Linear would), not the float32 that the final norm returns; the gradient still reaches the float32 weight."""
    net, tok, data, _ = encoded
    batch = COLLATORS["dpo"]([data["dpo"][i] for i in range(2)], tok.pad_token_id)
    net.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = iopo.Scorer(net)(**batch)
        with torch.no_grad():
            hidden = net(batch["input_ids"])
    assert hidden.dtype == torch.float32  # the residual stream of float32 weights stays float32
    want = iopo.token_logprobs(hidden[:, :-1].bfloat16(), net.lm_head.weight.bfloat16(), batch["labels"][:, 1:])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.sum().backward()
    grad = net.lm_head.weight.grad
    assert grad is not None and grad.dtype == torch.float32 and grad.abs().sum() > 0
    net.zero_grad(set_to_none=True)


class _WaitingOps(TorchDispatchMode):
    """Records the operators that make the CPU wait for the GPU: reading a value (item, bool, int) or ops
    whose output size depends on the data (nonzero, masked_select, unique)."""
    NAMES = ("_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "_unique2", "unique_dim",
             "unique_consecutive")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.NAMES:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind,pack", [("sft", False), ("dpo", False), ("iopo", False), ("dpo", "mask"),
                                       ("iopo", "mask"), ("iopo", "rows")])
def test_training_step_never_waits_for_the_device(encoded, kind, pack):
    """Scorer forward, loss, backward and gradient clipping use no operator that reads values back from the
    device (run on the CPU, where the same operators would be synchronisations on a GPU)."""
    net, tok, data, _ = encoded
    source = data["dpo" if kind == "sft" else kind]
    examples = [source[i]["w"] if kind == "sft" else source[i] for i in range(3)]
    cfg = iopo.TrainConfig(method=kind, pack=bool(pack))
    batch = iopo.micro_batch(cfg, examples, tok.pad_token_id, net.config.vocab_size)  # on the CPU, before the step
    ref = None if kind == "sft" else torch.zeros(3, iopo.SEQS_PER_EXAMPLE[kind])
    n_total = (batch["labels"][:, 1:] != -100).sum().float() if kind == "sft" else None
    net.zero_grad(set_to_none=True)
    watch = _WaitingOps()
    with watch:
        loss, _ = iopo.policy_loss(cfg, iopo.Scorer(net, pack or "mask"), batch, ref, contextlib.nullcontext, n_total)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], 1.0)
    assert not watch.seen, f"{kind} pack={pack}: operators that wait for the device: {watch.seen}"
