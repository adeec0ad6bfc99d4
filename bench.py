"""Benchmarks: speed and memory of the pieces that matter, each against a naive baseline in the same run.

    python bench.py --kernel      # fused log-prob kernel vs log_softmax + gather (iopo.py)
    python bench.py --generate    # generation with the KV cache vs recomputing the prefix; load time (model.py)
    python bench.py --train       # SFT vs DPO vs IOPO step time and peak memory (iopo.py)
    python bench.py --train --device cuda --quick   # the same for Qwen2-0.5B / 7B shapes (80-85 s on an H100)
    python bench.py --attention   # packed rows: two causal attention passes vs one explicit mask (model.py)
    python bench.py --padding     # padding share of batches, random vs --group-by-length (data.py)

Figures go into the README together with the command that produced them. Nothing here is asserted in a
test: timings depend on the machine.
"""

import argparse


# --- kernel: iopo.token_logprobs (chunked, fused) vs log_softmax + gather over the full logits
#
# What is measured: one forward + backward of sum(log p(labels)), with a trainable head (grad to hidden and
# weight) and with a frozen head (the LoRA case: grad to hidden only). "Extra peak" is the peak memory above
# what every method holds anyway: the inputs and the (V, D) weight gradient (the (N, D) hidden-state gradient
# counts as extra).
# CPU: each measurement runs in a fresh process and reads the peak resident memory (VmHWM) of that process.
# GPU: one process, torch.cuda.max_memory_allocated per method.

KERNEL_CPU_SHAPES = [(4096, 896, 151936), (4096, 896, 32000)]  # (tokens, D, V): Qwen2-0.5B's head and a 32k one
KERNEL_GPU_SHAPE = (16384, 3584, 152064)  # Qwen2-7B's head, bfloat16


def _peak_rss_bytes():
    """This process's peak resident memory so far (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss():
    """Linux: restart this process's peak-RSS count from the current RSS (so set-up transients do not count)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def kernel_cpu_worker(impl, n_tokens, dim, vocab, trainable, chunk_size, repeats):
    """Runs in a fresh process: time and extra peak RSS of forward + backward; prints one JSON line."""
    import json
    import time
    import torch
    import iopo

    torch.manual_seed(0)
    hidden = torch.randn(n_tokens, dim, requires_grad=True)
    weight = torch.randn(vocab, dim).mul_(0.05).requires_grad_(trainable)
    labels = torch.randint(0, vocab, (n_tokens,))
    stand_in = torch.ones(vocab, dim) if trainable else None  # the weight gradient, which every method holds
    _reset_peak_rss()
    baseline = _peak_rss_bytes()
    del stand_in  # freed now; the real gradient takes its place during the run
    wall, cpu = [], []  # the CPU time (all threads) is the steadier figure on a machine shared with others
    for _ in range(repeats):
        hidden.grad = weight.grad = None
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        iopo.token_logprobs(hidden, weight, labels, impl=impl, chunk_size=chunk_size).sum().backward()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    print(json.dumps({"time_s": min(wall), "cpu_s": min(cpu), "extra_peak_bytes": _peak_rss_bytes() - baseline}))


def _in_fresh_process(worker, args, what):
    """Run bench.<worker>(*args) in a new Python process and return the JSON object it prints last, so that
    each measurement starts from an empty heap (peak RSS is per process)."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    proc = subprocess.run([sys.executable, "-c", f"import bench; bench.{worker}{tuple(args)!r}"],
                          cwd=Path(__file__).resolve().parent, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench: {what} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _kernel_cpu_run(impl, n_tokens, dim, vocab, trainable, chunk_size, repeats):
    return _in_fresh_process("kernel_cpu_worker", (impl, n_tokens, dim, vocab, trainable, chunk_size, repeats),
                             f"--kernel, the {impl} run (V={vocab})")


def bench_kernel_cpu(args):
    shapes = [(args.tokens or n, args.dim or d, args.vocab or v) for n, d, v in KERNEL_CPU_SHAPES]
    shapes = list(dict.fromkeys(shapes))  # one row per distinct shape when --vocab overrides both
    print(f"kernel, CPU float32, forward + backward, best of {args.repeats}, each run in a fresh process; "
          "wall and CPU (all threads) seconds; extra peak RSS beyond inputs and the weight gradient")
    print(f"{'tokens':>6} {'D':>4} {'V':>6} {'head':>9} | {'naive s':>7} {'fused s':>7} {'ratio':>5} | "
          f"{'naive cpu':>9} {'fused cpu':>9} {'ratio':>5} | {'naive MB':>8} {'fused MB':>8} {'ratio':>5}")
    for n_tokens, dim, vocab in shapes:
        for trainable in (True, False):
            naive = _kernel_cpu_run("naive", n_tokens, dim, vocab, trainable, None, args.repeats)
            fused = _kernel_cpu_run("torch", n_tokens, dim, vocab, trainable, args.chunk_size, args.repeats)
            naive_mb, fused_mb = naive["extra_peak_bytes"] / 2**20, fused["extra_peak_bytes"] / 2**20
            print(f"{n_tokens:>6} {dim:>4} {vocab:>6} {'trainable' if trainable else 'frozen':>9} | "
                  f"{naive['time_s']:>7.2f} {fused['time_s']:>7.2f} {fused['time_s'] / naive['time_s']:>5.2f} | "
                  f"{naive['cpu_s']:>9.2f} {fused['cpu_s']:>9.2f} {fused['cpu_s'] / naive['cpu_s']:>5.2f} | "
                  f"{naive_mb:>8.0f} {fused_mb:>8.0f} {fused_mb / max(naive_mb, 1e-9):>5.3f}", flush=True)


def bench_kernel_cuda(args, device="cuda"):
    """bfloat16 on one GPU: naive, torch.compile(naive), chunked PyTorch, Triton; tokens/s and extra peak GB.

    The command line always passes "cuda"; called from Python with device="cpu" (with TRITON_INTERPRET=1 and
    tiny args.tokens / dim / vocab) it only checks that the code runs.
    """
    import time
    import torch
    import iopo

    device = torch.device(device)
    on_gpu = device.type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("bench --kernel --device cuda: no CUDA device is visible")
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    n_tokens, dim, vocab = (args.tokens or KERNEL_GPU_SHAPE[0], args.dim or KERNEL_GPU_SHAPE[1],
                            args.vocab or KERNEL_GPU_SHAPE[2])
    torch.manual_seed(0)
    hidden = torch.randn(n_tokens, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    weight = (0.02 * torch.randn(vocab, dim, device=device)).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (n_tokens,), device=device)
    compiled_naive = torch.compile(iopo.token_logprobs_naive)
    methods = {
        "naive": lambda h, w: iopo.token_logprobs_naive(h, w, labels),
        "compile(naive)": lambda h, w: compiled_naive(h, w, labels),
        "torch chunked": lambda h, w: iopo.token_logprobs(h, w, labels, impl="torch", chunk_size=args.chunk_size),
        "triton": lambda h, w: iopo.token_logprobs(h, w, labels, impl="triton", chunk_size=args.chunk_size),
    }
    where = torch.cuda.get_device_name() if on_gpu else "CPU (logic check)"
    print(f"kernel, {where}, bfloat16, N={n_tokens} D={dim} V={vocab}, forward + backward, mean of {args.repeats} "
          "after 2 warm-ups; extra GB = peak allocated minus inputs and the weight gradient")
    print(f"{'method':>15} {'head':>9} | {'tokens/s':>10} {'ms':>8} {'extra GB':>9}")
    for trainable in (True, False):
        w = weight.detach().requires_grad_(trainable)
        grad_bytes = w.numel() * w.element_size() if trainable else 0
        for name, fn in methods.items():
            try:
                for _ in range(2):
                    hidden.grad = w.grad = None
                    fn(hidden, w).sum().backward()
                hidden.grad = w.grad = None
                sync()
                if on_gpu:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() if on_gpu else 0
                start = time.perf_counter()
                for _ in range(args.repeats):
                    hidden.grad = w.grad = None
                    fn(hidden, w).sum().backward()
                sync()
                seconds = (time.perf_counter() - start) / args.repeats
                peak = torch.cuda.max_memory_allocated() if on_gpu else float("nan")
                extra_gb = (peak - base - grad_bytes) / 2**30
                print(f"{name:>15} {'trainable' if trainable else 'frozen':>9} | {n_tokens / seconds:>10.0f} "
                      f"{1000 * seconds:>8.1f} {extra_gb:>9.2f}", flush=True)
            except torch.cuda.OutOfMemoryError:
                print(f"{name:>15} {'trainable' if trainable else 'frozen':>9} | out of memory", flush=True)
            hidden.grad = w.grad = None
            if on_gpu:
                torch.cuda.empty_cache()


def bench_kernel(args):
    if args.device == "cuda":
        bench_kernel_cuda(args)
    else:
        bench_kernel_cpu(args)


# --- generate: KV-cache generation vs recomputing the prefix; checkpoint load time and peak memory (model.py)
#
# Speed: a toy-preset model (random weights, float32, CPU), greedy, no EOS, so every run makes exactly
# --new-tokens tokens; "recompute" runs the full forward over prompt + everything generated at each step.
# Loading: checkpoints of three sizes written by model.save_model; each load runs in a fresh process that
# reports its peak resident memory (VmHWM) above what it held before loading. The naive baseline builds the
# model on the CPU (random init), reads the whole file with safetensors.torch.load_file and copies it in.
# The time and the peak include one read of every weight, so pages that load_model leaves memory-mapped count.

GEN_LOAD_SIZES = {  # name: (preset or explicit sizes, vocab)
    "toy": (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2), 8192),
    "small": (dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=4), 32000),
    "medium": (dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                    num_key_value_heads=4), 32000),
}


def generate_load_worker(path, how):
    """Runs in a fresh process: load `path` with model.load_model or the naive way; prints one JSON line."""
    import json
    import time
    import torch
    import model as M
    from safetensors.torch import load_file

    before = _peak_rss_bytes()
    start = time.perf_counter()
    if how == "load_model":
        m = M.load_model(path)
    else:
        m = M.Transformer(M.ModelConfig.from_hf(path))
        m.load_state_dict(load_file(f"{path}/model.safetensors"), strict=True)
    with torch.no_grad():  # read every weight once, so memory-mapped pages are counted (in time and memory)
        sum(float(p.sum()) for p in m.parameters())
    seconds = time.perf_counter() - start
    n_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    print(json.dumps({"time_s": seconds, "extra_peak_bytes": _peak_rss_bytes() - before, "param_bytes": n_bytes}))


def _generate_load_run(path, how):
    return _in_fresh_process("generate_load_worker", (str(path), how), f"--generate, loading {path} ({how})")


def bench_generate(args):
    import tempfile
    import time
    import torch
    import model as M

    torch.set_num_threads(args.gen_threads)
    torch.manual_seed(0)
    config = M.toy_config(vocab_size=8192, preset="toy")
    net = M.Transformer(config).eval()
    n_params = sum(p.numel() for p in net.parameters())
    print(f"generate, CPU float32, toy preset ({n_params / 1e6:.1f}M parameters, vocab {config.vocab_size}), "
          f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, greedy, {torch.get_num_threads()} threads")
    print(f"{'batch':>5} | {'cache tok/s':>11} {'recompute tok/s':>15} {'speed-up':>8} | same tokens")
    for batch in (1, 8):
        prompts = torch.randint(0, config.vocab_size, (batch, args.prompt_tokens)).tolist()
        seconds, outputs = {}, {}
        for use_cache in (True, False):
            M.generate(net, prompts, 4, use_cache=use_cache)  # warm-up
            start = time.perf_counter()
            outputs[use_cache] = M.generate(net, prompts, args.new_tokens, use_cache=use_cache)
            seconds[use_cache] = time.perf_counter() - start
        made = batch * args.new_tokens
        print(f"{batch:>5} | {made / seconds[True]:>11.0f} {made / seconds[False]:>15.0f} "
              f"{seconds[False] / seconds[True]:>7.1f}x | {outputs[True] == outputs[False]}", flush=True)

    print("\nload, CPU, float32 checkpoints (one file each), warm page cache, each load in a fresh process")
    print(f"{'size':>6} {'params':>8} {'file MB':>8} | {'load_model s':>12} {'peak MB':>8} {'peak/file':>9} | "
          f"{'naive s':>8} {'peak MB':>8} {'peak/file':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (sizes, vocab) in GEN_LOAD_SIZES.items():
            if name not in args.load_sizes.split(","):
                continue
            torch.manual_seed(0)
            m = M.Transformer(M.ModelConfig(vocab_size=vocab, tie_word_embeddings=False, **sizes))
            path = f"{tmp}/{name}"
            M.save_model(m, path)
            n_params = sum(p.numel() for p in m.parameters())
            del m
            file_mb = sum(f.stat().st_size for f in __import__("pathlib").Path(path).glob("*.safetensors")) / 2**20
            ours = _generate_load_run(path, "load_model")
            naive = _generate_load_run(path, "naive")
            row = f"{name:>6} {n_params / 1e6:>7.1f}M {file_mb:>8.0f} |"
            for r in (ours, naive):
                peak_mb = r["extra_peak_bytes"] / 2**20
                row += f" {r['time_s']:>{12 if r is ours else 8}.2f} {peak_mb:>8.0f} {peak_mb / file_mb:>9.2f} |"
            print(row.rstrip(" |"), flush=True)


# --- train: one optimizer step of SFT / DPO / IOPO at the same number of instructions (iopo.py)
#
# Each configuration runs iopo.py's own step (micro_batch, policy_loss, backward, clip, make_optimizer's
# AdamW) on synthetic token ids laid out by data.py's collators: B instructions per step, i.e. B rows for
# SFT, 2B for DPO, 4B for IOPO, or B (DPO) / 2B (IOPO) rows [x, y_a, y_b] with --pack. Lengths are
# TRACE-like: the prompt is longer than the answers. Reference log-probs are zeros (training reads them from
# its cache: no cost).
# Random weights: speed and memory do not depend on the values.
#
# Model FLOPs per step (what MFU counts; recomputation under gradient checkpointing is not counted):
#   body   (6 full fine-tuning, 4 LoRA: no weight gradients) x body matmul parameters x tokens in the rows
#          (LoRA's adapters are not counted: 6 r (in + out) per token and layer, under 3% here)
#   head   (6 or 4) x V x D x scored tokens (the kernel computes logits only where a label is scored)
#   attn   3 (forward + backward) x 4 (H hd) x the (query, key) pairs that causal attention needs, per layer:
#          QK^T and AV. A row of n tokens (padding not counted) needs n^2 / 2; a packed row [x, y_a, y_b] needs
#          [x, y_a]'s causal half plus y_b against x and itself, never y_b against y_a (what the mask and the
#          two passes of `rows` actually compute is more: implementation work, not counted)
# MFU = model FLOPs per second / the matmul rate measured in the same run (bf16 on CUDA, float32 on CPU).
# CPU: each configuration runs in a fresh process, memory is its peak RSS above the built model (VmHWM), and
# times are the process's CPU seconds with one thread, which other jobs on a shared machine disturb far less
# than wall time (the matmul rate is timed the same way).
# CUDA: one process, memory is torch.cuda.max_memory_allocated (everything: weights, optimizer, activations);
# "syncs" counts the host-device synchronisations of one step (torch.cuda.set_sync_debug_mode("warn")).

TRAIN_SHAPES = {  # name: (model.ModelConfig fields, prompt tokens, answer tokens, instructions per step)
    "tiny": (dict(model_type="llama", vocab_size=512, tie_word_embeddings=True, **{
        "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2}), 24, 8, 2),
    "toy": (dict(model_type="llama", vocab_size=2048, tie_word_embeddings=True, **{
        "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2}), 300, 100, 2),
    "qwen2-0.5b": (dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                        num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, attention_bias=True,
                        tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=32768), 1280, 768, 4),
    "qwen2-7b": (dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                      num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, attention_bias=True,
                      tie_word_embeddings=False, rope_theta=1e6, max_position_embeddings=32768), 1280, 768, 1),
}
# (method, packing): packed rows attend through the explicit (T x T) mask of data.packed_attention_mask
# ("mask", iopo.py's default on the CPU) or through model.PackedRows ("rows": two causal passes, its GPU default)
TRAIN_RUNS = [("sft", False), ("dpo", False), ("dpo", "mask"), ("dpo", "rows"), ("iopo", False), ("iopo", "mask"),
              ("iopo", "rows")]
RUN_NAMES = [m + {False: "", "mask": "-packed", "rows": "-rows"}[p] for m, p in TRAIN_RUNS]  # for --train-runs


def _synthetic_examples(method, n, prompt, answer, vocab, seed=0):
    """n encoded examples in data.py's format with random ids: the same instructions for every method."""
    import random
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        x1, x2 = ([rng.randrange(3, vocab) for _ in range(prompt)] for _ in range(2))
        y1, y2 = ([rng.randrange(3, vocab) for _ in range(answer)] for _ in range(2))
        seq = lambda x, y: {"input_ids": x + y, "labels": [-100] * len(x) + y}
        out.append({"sft": seq(x1, y1), "dpo": {"w": seq(x1, y1), "l": seq(x1, y2)},
                    "iopo": {"y1_x1": seq(x1, y1), "y2_x1": seq(x1, y2), "y2_x2": seq(x2, y2),
                             "y1_x2": seq(x2, y1)}}[method])
    return out


def _matmul_rate(device, dtype, n, repeats=5):
    """Measured FLOP/s of one n x n x n matmul in `dtype` on `device` (best of `repeats`)."""
    import time
    import torch
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    best = float("inf")
    for _ in range(repeats + 1):
        sync()
        start = clock()
        a @ b
        sync()
        best = min(best, clock() - start)
    return 2 * n ** 3 / best


def _model_flops(config, batch, lora):
    """Model FLOPs of one training step on `batch` (see the banner)."""
    c = config
    hd = c.head_dim or c.hidden_size // c.num_attention_heads
    attn = c.hidden_size * hd * (c.num_attention_heads * 2 + c.num_key_value_heads * 2)  # q, o, k, v
    body = c.num_hidden_layers * (attn + 3 * c.hidden_size * c.intermediate_size)
    k = 4 if lora else 6
    tokens = int(batch["attention_mask"].sum())
    scored = len(batch["scored_index"])  # iopo.scored_positions: every scored label, y_a and y_b alike
    attention = 3 * 4 * _attention_pairs(batch) * c.num_attention_heads * hd * c.num_hidden_layers
    return k * body * tokens + k * c.vocab_size * c.hidden_size * scored + attention, tokens


def _attention_pairs(batch):
    """(query, key) pairs per head and layer that causal attention needs for `batch` (see the banner)."""
    from data import ANSWER_A, ANSWER_B, PROMPT
    if "segment_ids" in batch:  # packed rows [x, y_a, y_b]: y_b sees x and its own past, not y_a
        x, a, b = ((batch["segment_ids"] == s).sum(1).double() for s in (PROMPT, ANSWER_A, ANSWER_B))
        return float(((x + a) ** 2 / 2 + b * x + b ** 2 / 2).sum())
    n = batch["attention_mask"].sum(1).double()  # right-padded rows: the real tokens of each
    return float((n ** 2 / 2).sum())


def _build_train_model(shape, device, lora, grad_checkpointing, bf16, compile=False):
    """A random-weight model of `shape` on `device`: float32 weights for full fine-tuning (with bf16 autocast,
    as iopo.train --dtype bfloat16 does), a bfloat16 base + float32 adapters for LoRA when bf16."""
    import torch
    import iopo
    import model as M
    fields, *_ = TRAIN_SHAPES[shape]
    config = M.ModelConfig(**fields)
    dtype = torch.bfloat16 if lora and bf16 else torch.float32
    with torch.device("meta"):
        net = M.Transformer(config)
    net = net.to(dtype).to_empty(device=device)  # allocated once, in its final dtype
    torch.manual_seed(0)
    net.init_weights()  # (to_empty re-tied the head: Transformer._apply)
    net.gradient_checkpointing = grad_checkpointing
    if compile:  # as iopo.train --compile: each block on its own, dynamic shapes
        for layer in net.model.layers:
            layer.compile(dynamic=True)
    if lora:
        iopo.add_lora(net, rank=16, alpha=32, dropout=0.0)
    return net


def train_step_run(net, shape, method, pack, lora, device, warmup, steps, bf16, n_instr=None, profile=False):
    """Time `steps` optimizer steps after `warmup` ones; returns a dict of figures (or raises OOM)."""
    import time
    import contextlib
    import torch
    import iopo

    _, prompt, answer, default_n = TRAIN_SHAPES[shape]
    n_instr = n_instr or default_n
    examples = _synthetic_examples(method, n_instr, prompt, answer, net.config.vocab_size)
    cfg = iopo.TrainConfig(method=method, pack=bool(pack), lr=1e-6, max_grad_norm=1.0)
    cpu_batch = iopo.micro_batch(cfg, examples, 0, net.config.vocab_size)
    batch = iopo.to_device(cpu_batch, device)
    ref = None if method == "sft" else torch.zeros(n_instr, iopo.SEQS_PER_EXAMPLE[method], device=device)
    scorer = iopo.Scorer(net, pack or "mask")
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = iopo.make_optimizer(trainable, cfg)
    on_gpu = device.type == "cuda"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)

    def step():  # iopo.train's step for one micro-batch, without its logging
        loss, _ = iopo.policy_loss(cfg, scorer, batch, ref, autocast)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(warmup):
            step()
        sync()
        syncs = None
        if on_gpu:  # count the host-device synchronisations of one step (the goal is none)
            import warnings
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                step()
            torch.cuda.set_sync_debug_mode("default")
            syncs = sum("synchroniz" in str(w.message) for w in caught)
            sync()
        if profile:  # where one step's time goes, by operator (GPU time on CUDA)
            from torch.profiler import ProfilerActivity
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
            with torch.profiler.profile(activities=activities) as prof:
                step()
                sync()
            key = "cuda_time_total" if on_gpu else "cpu_time_total"
            print(f"profile of one {method.upper()}{' packed ' + pack if pack else ''} step:\n"
                  + prof.key_averages().table(sort_by=key, row_limit=25), flush=True)
        times = []
        clock = time.perf_counter if on_gpu else time.process_time  # CPU: see the banner
        for _ in range(steps):
            start = clock()
            step()
            sync()
            times.append(clock() - start)
        flops, tokens = _model_flops(net.config, cpu_batch, lora)
        step_s = sorted(times)[len(times) // 2]  # the median: one slow step on a shared machine does not count
        return {"step_s": step_s, "tokens": tokens, "rows": len(cpu_batch["input_ids"]),
                "width": cpu_batch["input_ids"].shape[1], "flops": flops, "syncs": syncs,
                "peak_bytes": torch.cuda.max_memory_allocated() if on_gpu else 0}
    finally:
        del optimizer, scorer, batch
        net.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.empty_cache()


def packing_check(net, shape, device, bf16, n_instr=None):
    """One line comparing the sequence log-prob sums of packed rows (mask and rows) with the unpacked ones, for
    DPO and IOPO on the weights about to be timed: the tests check this in float32 on the CPU, this checks the
    kernels the timings use (bf16, flash attention). Forward only, no gradient."""
    import contextlib
    import torch
    import iopo
    _, prompt, answer, default_n = TRAIN_SHAPES[shape]
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    parts = []
    for method in ("dpo", "iopo"):
        examples = _synthetic_examples(method, n_instr or default_n, prompt, answer, net.config.vocab_size)
        cfgs = {pack: iopo.TrainConfig(method=method, pack=pack) for pack in (False, True)}
        batches = {pack: iopo.to_device(iopo.micro_batch(cfg, examples, 0, net.config.vocab_size), device)
                   for pack, cfg in cfgs.items()}  # one plain and one packed batch; the packed one read two ways
        sums = {}
        for how in (False, "mask", "rows"):
            with torch.no_grad(), autocast():
                sums[how] = iopo.reference_sums(cfgs[bool(how)], iopo.Scorer(net, how or "mask"),
                                                batches[bool(how)])  # (B, k)
        scale = sums[False].abs().mean().item()
        parts.append(f"{method.upper()} mean |sum| {scale:.1f}, max |packed - unpacked| " + ", ".join(
            f"{how} {(sums[how] - sums[False]).abs().max().item():.3g}" for how in ("mask", "rows")))
    return "packed vs unpacked log-prob sums (forward): " + "; ".join(parts)


def train_cpu_worker(shape, method, pack, lora, warmup, steps, threads):
    """Runs in a fresh process: one CPU configuration; prints one JSON line (peak RSS above the built model)."""
    import json
    import torch
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    net = _build_train_model(shape, device, lora, grad_checkpointing=False, bf16=False)
    _reset_peak_rss()  # the baseline is the built model, not a transient of building it
    baseline = _peak_rss_bytes()
    out = train_step_run(net, shape, method, pack, lora, device, warmup, steps, bf16=False)
    out["rate"] = _matmul_rate(device, torch.float32, 1024)  # with this process's threads
    out["peak_bytes"] = _peak_rss_bytes() - baseline
    print(json.dumps(out))


def _train_cpu_run(*args):
    return _in_fresh_process("train_cpu_worker", args, f"--train, the run {args}")


def _print_train_table(title, rows, rate):
    """rows: (label, method, pack, figures or None for OOM); ratios against SFT and DPO of the same block."""
    print(title)
    print(f"{'config':>22} | {'rows x T':>9} {'step s':>7} {'tokens/s':>9} {'peak GB':>8} {'MFU %':>6} | "
          f"{'time/SFT':>8} {'time/DPO':>8} {'mem/SFT':>7} {'mem/DPO':>7} {'syncs':>5}")
    base = {(m, p): r for _, m, p, r in rows if r is not None}
    sft, dpo = base.get(("sft", False)), base.get(("dpo", False))
    for label, method, pack, r in rows:
        if r is None:
            print(f"{label:>22} | out of memory", flush=True)
            continue
        ratio = lambda ref, key: f"{r[key] / ref[key]:.2f}" if ref and ref[key] else "-"
        mfu = 100 * r["flops"] / r["step_s"] / (rate or r["rate"])
        print(f"{label:>22} | {str(r['rows']) + 'x' + str(r['width']):>9} {r['step_s']:>7.3f} "
              f"{r['tokens'] / r['step_s']:>9.0f} {r['peak_bytes'] / 2**30:>8.2f} {mfu:>6.1f} | "
              f"{ratio(sft, 'step_s'):>8} {ratio(dpo, 'step_s'):>8} {ratio(sft, 'peak_bytes'):>7} "
              f"{ratio(dpo, 'peak_bytes'):>7} {'-' if r.get('syncs') is None else r['syncs']:>5}", flush=True)


def bench_train(args):
    import torch
    label = lambda m, p: m.upper() + {False: "", "mask": " packed", "rows": " packed, rows"}[p]
    wanted = args.train_runs.split(",")
    if set(wanted) - set(RUN_NAMES):
        raise SystemExit(f"bench --train-runs: unknown {sorted(set(wanted) - set(RUN_NAMES))}; choose from {RUN_NAMES}")
    runs = [run for run, name in zip(TRAIN_RUNS, RUN_NAMES) if name in wanted]
    modes = args.train_modes.split(",")
    if not modes or set(modes) - {"full", "lora"}:
        raise SystemExit(f"bench --train-modes: expected full and/or lora, got {args.train_modes!r}")
    if args.device == "cpu":
        if args.shapes not in ("tiny", "toy", None):
            raise SystemExit(f"bench --train on the CPU runs --shapes tiny or toy, not {args.shapes} (that one needs "
                             "--device cuda)")
        if args.quick and "full" not in modes:
            raise SystemExit("bench --train --quick on the CPU runs full fine-tuning only; drop --quick for LoRA")
        shape = args.shapes or "toy"
        warmup, steps = (1, 3) if args.quick else (2, 7)
        _, prompt, answer, n_instr = TRAIN_SHAPES[shape]
        print(f"train, CPU float32, {args.train_threads} thread(s), {shape} model, {n_instr} instructions per step, "
              f"prompt {prompt} + answers of {answer} tokens, median CPU seconds of {steps} steps after {warmup}, each "
              "configuration in a fresh process; memory = peak RSS above the built model; MFU against a "
              "1024^3 float32 matmul timed in the same process")
        for lora in ((False,) if args.quick else (False, True)):
            if ("lora" if lora else "full") not in modes:
                continue
            rows = [(label(m, p), m, p, _train_cpu_run(shape, m, p, lora, warmup, steps, args.train_threads))
                    for m, p in runs]
            _print_train_table("full fine-tuning" if not lora else "LoRA rank 16", rows, None)
        return
    on_gpu = torch.cuda.is_available()
    if not on_gpu and args.shapes != "tiny":
        raise SystemExit("bench --train --device cuda: no CUDA device is visible (--shapes tiny runs the same "
                         "code on the CPU as a logic check)")
    device = torch.device("cuda" if on_gpu else "cpu")
    shapes = {"tiny": ["tiny"], "qwen2-0.5b": ["qwen2-0.5b"], "qwen2-7b": ["qwen2-7b"]}.get(
        args.shapes, ["qwen2-0.5b", "qwen2-7b"])
    warmup, steps = (2 + 2 * args.train_compile, 3) if args.quick else (3 + 2 * args.train_compile, 10)
    rate = _matmul_rate(device, torch.bfloat16, 8192 if on_gpu else 256)
    where = torch.cuda.get_device_name() if on_gpu else "CPU (logic check of the CUDA path)"
    checkpointing = "no gradient checkpointing" if args.train_no_checkpointing else "gradient checkpointing"
    print(f"train, {where}, bf16 autocast, {checkpointing}, median of {steps} steps after {warmup}; "
          f"measured bf16 matmul rate {rate / 1e12:.1f} TFLOP/s; memory = max_memory_allocated", flush=True)
    for shape in shapes:
        _, prompt, answer, n_instr = TRAIN_SHAPES[shape]
        n_instr = args.train_batch or n_instr
        for lora in ((False, True) if shape != "qwen2-7b" else (True,)):
            if ("lora" if lora else "full") not in modes and shape != "qwen2-7b":
                continue
            if on_gpu:
                torch.cuda.empty_cache()
            try:
                net = _build_train_model(shape, device, lora, grad_checkpointing=not args.train_no_checkpointing,
                                         bf16=True, compile=args.train_compile)
            except torch.cuda.OutOfMemoryError:
                print(f"{shape} {'LoRA' if lora else 'full'}: out of memory while building the model", flush=True)
                continue
            if not args.train_compile:  # (compiled blocks would compile again for a no-grad forward)
                print(packing_check(net, shape, device, bf16=True, n_instr=n_instr), flush=True)
            rows = []
            for m, p in runs:
                try:
                    r = train_step_run(net, shape, m, p, lora, device, warmup, steps, bf16=True, n_instr=n_instr,
                                       profile=args.profile and m == "iopo")
                except torch.cuda.OutOfMemoryError:
                    r = None
                if on_gpu:
                    torch.cuda.empty_cache()
                rows.append((label(m, p), m, p, r))
            kind = "LoRA rank 16 (bf16 base)" if lora else "full fine-tuning (fp32 weights, bf16 autocast)"
            _print_train_table(f"{shape}, {kind}, {n_instr} instruction(s) per step, prompt {prompt} + answers "
                               f"of {answer} tokens", rows, rate)
            del net


# --- attention of packed rows: model.PackedRows (two causal passes) vs the explicit (T x T) mask
#
# Forward + backward of the attention call alone for rows [x, y_a, y_b], and, as the floor, the same prompts
# unpacked (two causal rows [x, y] each). CPU: float32, one thread, CPU seconds. CUDA: bfloat16, GPU seconds.

ATTENTION_SHAPES = [(4, 4, 2, 64, 304, 100), (4, 8, 2, 64, 640, 384),  # rows, heads, kv heads, hd, |x|, |y|
                    (8, 14, 2, 64, 1280, 768)]  # the last: Qwen2-0.5B's heads at the --train lengths


def bench_attention(args):
    import time
    import torch
    import torch.nn.functional as F
    import model as M
    from data import packed_attention_mask, packed_views
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench --attention --device cuda: no CUDA device is visible")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.set_num_threads(1)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    print(f"packed attention, forward + backward, {dtype}, median of 5 after 1 ({device.type})")
    print(f"{'rows x H/KV x hd':>16} {'|x| + 2|y|':>12} | {'mask s':>8} {'rows s':>8} {'unpacked s':>10} | "
          f"{'rows/mask':>9}")
    shapes = ATTENTION_SHAPES if device.type == "cuda" else ATTENTION_SHAPES[:2]
    for R, H, KV, hd, P, A in shapes:
        seg = torch.tensor([[1] * P + [2] * A + [3] * A] * R)
        rows = M.PackedRows(**{k: t.to(device) for k, t in packed_views(seg).items()})
        mask = packed_attention_mask(seg).to(device)
        q = torch.randn(R, H, P + 2 * A, hd, device=device, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(R, KV, P + 2 * A, hd, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        full = lambda t: M.repeat_kv(t, H // KV)  # what the mask and unpacked layouts attend over
        plain = lambda t: t[:, :, :P + A].repeat(2, 1, 1, 1)  # (2R, heads, P + A, hd): [x, y] twice per prompt
        calls = {"mask": lambda: F.scaled_dot_product_attention(q, full(k), full(v), attn_mask=mask),
                 "rows": lambda: M.packed_rows_attention(q, k, v, rows),
                 "unpacked": lambda: F.scaled_dot_product_attention(plain(q), full(plain(k)), full(plain(v)),
                                                                    is_causal=True)}
        took = {}
        for name, call in calls.items():
            times = []
            with M.sdpa_kernel(M.CUDA_SDPA_BACKENDS) if device.type == "cuda" else M.contextlib.nullcontext():
                for _ in range(6):
                    sync()
                    start = clock()
                    call().float().sum().backward()
                    sync()
                    times.append(clock() - start)
            took[name] = sorted(times[1:])[2]
        print(f"{f'{R} x {H}/{KV} x {hd}':>16} {f'{P} + 2x{A}':>12} | {took['mask']:>8.4f} {took['rows']:>8.4f} "
              f"{took['unpacked']:>10.4f} | {took['rows'] / took['mask']:>9.2f}", flush=True)


# --- padding: the share of a batch that is padding, random batches vs --group-by-length (data.BatchSampler)
#
# No timing: every padded position is work that every layer does for nothing, so the share is what grouping
# can save (at the price of batches less random). Synthetic TRACE from trace_gen.py (full families, or
# --padding-toy), a byte-level BPE trained on it, one epoch of each method's batches, right-padded as the
# trainer pads them (to a multiple of 8).

def bench_padding(args):
    import contextlib
    import io
    import tempfile
    import trace_gen
    from data import COLLATORS, BatchSampler, EncodedDataset, RecordFile, example_texts, load_tokenizer, train_tokenizer
    print(f"padding share of one epoch's batches: {args.padding_n} synthetic TRACE instructions"
          f"{' (toy preset)' if args.padding_toy else ''}, a 2,000-token BPE, max_len 4096")
    print(f"{'method':>6} {'batch':>5} | {'random':>7} {'grouped':>7} | positions random / grouped (grouped / random)")
    with tempfile.TemporaryDirectory() as tmp:  # the records are read from their files again as they are used
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            trace_gen.main(["--out", tmp, "--n-train", str(args.padding_n), "--n-eval", "0", "--no-progress"]
                           + ["--toy"] * args.padding_toy)
        data = {kind: RecordFile(f"{tmp}/{kind}.jsonl", kind) for kind in ("sft", "dpo", "iopo")}
        texts = (t for i in range(len(data["sft"])) for t in example_texts("sft", data["sft"][i]))
        tok = load_tokenizer(train_tokenizer(texts, 2000, f"{tmp}/tok"))
        for kind in ("sft", "dpo", "iopo"):
            ds = EncodedDataset(data[kind], kind, tok, max_len=4096, check=False)
            for batch_size in (4, 16):
                shares = []
                for group in (False, True):
                    sampler = BatchSampler(len(ds), batch_size, seed=0, group_by_length=group,
                                           lengths=ds.lengths() if group else None)
                    padded = total = 0
                    for positions in sampler:
                        mask = COLLATORS[kind]([ds[p] for p in positions], tok.pad_token_id)["attention_mask"]
                        padded, total = padded + int((mask == 0).sum()), total + mask.numel()
                    shares.append((padded / total, total))
                (r, rt), (g, gt) = shares
                print(f"{kind:>6} {batch_size:>5} | {100 * r:6.1f}% {100 * g:6.1f}% | {rt:,} / {gt:,} "
                      f"({gt / rt:.2f}x)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", action="store_true", help="benchmark the fused log-prob kernel")
    parser.add_argument("--generate", action="store_true", help="benchmark KV-cache generation and loading")
    parser.add_argument("--train", action="store_true", help="benchmark SFT / DPO / IOPO training steps")
    parser.add_argument("--attention", action="store_true", help="benchmark the attention of packed rows")
    parser.add_argument("--padding", action="store_true", help="padding share of batches, random vs grouped by length")
    parser.add_argument("--padding-n", type=int, default=2000, help="--padding: synthetic instructions")
    parser.add_argument("--padding-toy", action="store_true", help="--padding: the toy preset's short answers")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where --kernel, --train and --attention run (--kernel: cpu = float32 table, cuda = "
                             "bfloat16 table); --generate and --padding always run on the CPU")
    parser.add_argument("--tokens", type=int, default=None, help="--kernel: tokens N (default: the standard shapes)")
    parser.add_argument("--dim", type=int, default=None, help="--kernel: hidden size D")
    parser.add_argument("--vocab", type=int, default=None, help="--kernel: vocabulary size V")
    parser.add_argument("--chunk-size", type=int, default=None, help="--kernel: tokens per chunk (default: iopo's)")
    parser.add_argument("--repeats", type=int, default=2, help="--kernel: timed repetitions per measurement")
    parser.add_argument("--new-tokens", type=int, default=256, help="--generate: tokens generated per prompt")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="--generate: prompt length in tokens")
    parser.add_argument("--gen-threads", type=int, default=1,
                        help="--generate: torch threads for the speed table (1: stable on a shared machine)")
    parser.add_argument("--load-sizes", default="toy,small,medium",
                        help="--generate: checkpoint sizes to load, from toy (27 MB), small (214 MB), medium (766 MB)")
    parser.add_argument("--shapes", default=None, choices=["tiny", "toy", "qwen2", "qwen2-0.5b", "qwen2-7b"],
                        help="--train: model sizes (CPU default toy; CUDA default qwen2 = Qwen2-0.5B and 7B shapes; "
                             "tiny checks the logic in seconds, also of --device cuda on a machine without a GPU)")
    parser.add_argument("--train-runs", default=",".join(RUN_NAMES),
                        help="--train: which rows, comma-separated from " + ", ".join(RUN_NAMES))
    parser.add_argument("--train-modes", default="full,lora",
                        help="--train: full and/or lora (Qwen2-7B is always LoRA; on the CPU --quick runs full only)")
    parser.add_argument("--quick", action="store_true",
                        help="--train: fewer steps (CPU 1 + 3, CUDA 2 warm-up + 3 timed; full fine-tuning only on CPU)")
    parser.add_argument("--train-threads", type=int, default=1, help="--train: torch threads on the CPU")
    parser.add_argument("--train-batch", type=int, default=0,
                        help="--train --device cuda: instructions per step (default: 4 for Qwen2-0.5B, 1 for 7B)")
    parser.add_argument("--train-compile", action="store_true",
                        help="--train --device cuda: torch.compile each block (adds compile time and 2 warm-up steps)")
    parser.add_argument("--train-no-checkpointing", action="store_true",
                        help="--train --device cuda: keep all activations instead of recomputing each block")
    parser.add_argument("--profile", action="store_true",
                        help="--train --device cuda: print torch.profiler's operator table for one step of each IOPO run")
    args = parser.parse_args()
    if not (args.kernel or args.generate or args.train or args.attention or args.padding):
        parser.error("choose at least one of --kernel, --generate, --train, --attention, --padding")
    for name in ("tokens", "dim", "vocab", "chunk_size", "repeats", "new_tokens", "prompt_tokens", "gen_threads",
                 "train_threads", "train_batch", "padding_n"):
        value, least = getattr(args, name), 0 if name == "train_batch" else 1  # --train-batch 0: the default
        if value is not None and value < least:
            parser.error(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
    if args.kernel:
        bench_kernel(args)
    if args.generate:
        bench_generate(args)
    if args.train:
        bench_train(args)
    if args.attention:
        bench_attention(args)
    if args.padding:
        bench_padding(args)


if __name__ == "__main__":
    main()
