"""Benchmarks: speed and memory of the pieces that matter, each against a naive baseline in the same run.

    python bench.py --kernel      # fused log-prob kernel vs log_softmax + gather (iopo.py)
    python bench.py --generate    # generation with the KV cache vs recomputing the prefix; load time (model.py)
    python bench.py --train       # SFT vs DPO vs IOPO step time and peak memory (iopo.py)

Figures go into the README together with the command that produced them. Nothing here is asserted in a
test: timings depend on the machine.
"""

import argparse


# --- kernel: iopo.token_logprobs (chunked, fused) vs log_softmax + gather over the full logits
#
# What is measured: one forward + backward of sum(log p(labels)), with a trainable head (grad to hidden and
# weight) and with a frozen head (the LoRA case: grad to hidden only). "Extra peak" is the peak memory above
# what every method holds anyway: the inputs, the hidden-state gradient's inputs and the (V, D) weight gradient.
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


def kernel_cpu_worker(impl, n_tokens, dim, vocab, trainable, chunk_size, repeats):
    """Runs in a fresh process: time and extra peak RSS of forward + backward; prints one JSON line."""
    import json
    import time
    import torch
    import iopo

    torch.manual_seed(0)
    hidden = torch.randn(n_tokens, dim, requires_grad=True)
    weight = (0.05 * torch.randn(vocab, dim)).requires_grad_(trainable)
    labels = torch.randint(0, vocab, (n_tokens,))
    stand_in = torch.ones(vocab, dim) if trainable else None  # the weight gradient, which every method holds
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


def _kernel_cpu_run(impl, n_tokens, dim, vocab, trainable, chunk_size, repeats):
    import json
    import subprocess
    import sys
    from pathlib import Path

    call = (f"import bench; bench.kernel_cpu_worker({impl!r}, {n_tokens}, {dim}, {vocab}, {trainable}, "
            f"{chunk_size}, {repeats})")
    proc = subprocess.run([sys.executable, "-c", call], cwd=Path(__file__).resolve().parent,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench --kernel: the {impl} run (V={vocab}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


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

    device="cpu" (with TRITON_INTERPRET=1 and tiny --tokens/--dim/--vocab) only checks that the code runs.
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
    print(f"kernel, {torch.cuda.get_device_name() if on_gpu else 'CPU (logic check)'}, bfloat16, N={n_tokens} D={dim} V={vocab}, forward + backward, "
          f"mean of {args.repeats} after 2 warm-ups; extra GB = peak allocated minus inputs and the weight gradient")
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
    import json
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.run([sys.executable, "-c", f"import bench; bench.generate_load_worker({str(path)!r}, {how!r})"],
                          cwd=Path(__file__).resolve().parent, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench --generate: loading {path} ({how}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


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

    print(f"\nload, CPU, float32 checkpoints (one file each), warm page cache, each load in a fresh process")
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", action="store_true", help="benchmark the fused log-prob kernel")
    parser.add_argument("--generate", action="store_true", help="benchmark KV-cache generation and loading")
    parser.add_argument("--train", action="store_true", help="benchmark SFT / DPO / IOPO training steps")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where to run (--kernel: cpu = float32 table, cuda = bfloat16 table)")
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
    args, rest = parser.parse_known_args()
    if not (args.kernel or args.generate or args.train):
        parser.error("choose at least one of --kernel, --generate, --train")
    if args.kernel:
        bench_kernel(args)
    if args.generate:
        bench_generate(args)
    if args.train:
        print("bench --train: not implemented yet")


if __name__ == "__main__":
    main()
