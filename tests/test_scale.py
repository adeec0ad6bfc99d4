"""Scaling up (iopo.py, data.py, model.py): DDP and FSDP on 2 CPU processes, shared-prompt packing, checkpointing."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import iopo
import model as M
from data import IOPO_ORDER, collate_dpo, collate_iopo
from test_train import write_data

REPO = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, argv_list):
    # What torchrun does for each process, minus a fresh interpreter: the environment that
    # iopo.setup_distributed reads. One process group per iopo.main call, each on its own port.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    for argv, p in zip(argv_list, port):
        os.environ["MASTER_PORT"] = str(p)
        iopo.main(argv)


def run_ranks(argv_list, world=2):
    """Run iopo.main(argv) for each argv in turn on `world` forked processes (gloo): torchrun's environment,
    without paying for a fresh Python and torch import per process."""
    ports = [free_port() for _ in argv_list]
    mp.start_processes(_rank_main, args=(world, ports, argv_list), nprocs=world, start_method="fork")


def argv(method, base, data, out, **kw):
    opts = {**dict(model=base, data=data, out=out, max_steps=3, batch_size=4, grad_accum=2, lr=2e-3,
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
        assert len(two) == 3 and two == pytest.approx(one, abs=1e-5), f"{m}: 2 processes {two} vs 1 process {one}"


def test_ddp_resume_continues_the_run(toy, tmp_path):
    """Under 2 processes, resuming from the step-2 checkpoint logs the uninterrupted run's later losses."""
    folder, paths, base = toy
    full = argv("iopo", base, paths["iopo"], tmp_path / "full", max_steps=4, save_every=2)
    resumed = ["iopo", "--data", paths["iopo"], "--out", str(tmp_path / "resumed"),
               "--resume", str(tmp_path / "full" / "checkpoint-2")]
    run_ranks([full, resumed])
    want, got = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert len(want) == 4 and got == want[2:], f"resumed {got} vs uninterrupted {want}"
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == \
        ["checkpoint-2", "config.json", "final", "metrics.jsonl"], sorted((tmp_path / "full").iterdir())


# --- sharded parameters (FSDP2)


def test_fsdp_two_processes_match_one(toy, tmp_path):
    """--fsdp on 2 gloo processes logs the 1-process losses and saves full weights equal to the 1-process run's."""
    folder, paths, base = toy
    run_ranks([argv("dpo", base, paths["dpo"], tmp_path / "fsdp", fsdp=True)])
    one = iopo.main(argv("dpo", base, paths["dpo"], tmp_path / "one")) or losses(tmp_path / "one")
    two = losses(tmp_path / "fsdp")
    assert len(two) == 3 and two == pytest.approx(one, abs=1e-5), f"FSDP {two} vs 1 process {one}"
    a, b = M.load_model(tmp_path / "fsdp" / "final").state_dict(), M.load_model(tmp_path / "one" / "final").state_dict()
    worst = max((a[k] - b[k]).abs().max().item() for k in b)
    assert a.keys() == b.keys() and worst < 1e-4, f"FSDP final weights differ from 1 process by {worst}"
