"""Benchmarks: speed and memory of the pieces that matter, each against a naive baseline in the same run.

    python bench.py --kernel      # fused log-prob kernel vs log_softmax + gather (iopo.py)
    python bench.py --generate    # generation with the KV cache vs recomputing the prefix; load time (model.py)
    python bench.py --train       # SFT vs DPO vs IOPO step time and peak memory (iopo.py)

Figures go into the README together with the command that produced them. Nothing here is asserted in a
test: timings depend on the machine.
"""

import argparse


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", action="store_true", help="benchmark the fused log-prob kernel")
    parser.add_argument("--generate", action="store_true", help="benchmark KV-cache generation and loading")
    parser.add_argument("--train", action="store_true", help="benchmark SFT / DPO / IOPO training steps")
    args, rest = parser.parse_known_args()
    if not (args.kernel or args.generate or args.train):
        parser.error("choose at least one of --kernel, --generate, --train")
    raise SystemExit("no benchmark is implemented yet")


if __name__ == "__main__":
    main()
