"""Compare eval.py's IFEval verdicts with the official checker code, instruction by instruction.

Not part of the test suite (it needs a side environment with the official code and its libraries):

    python -m venv /work/venvs/ifeval && /work/venvs/ifeval/bin/pip install --no-deps lm-eval
    /work/venvs/ifeval/bin/pip install langdetect nltk immutabledict absl-py
    # NLTK's punkt_tab/english tables under $NLTK_DATA/tokenizers/punkt_tab/english
    /work/venvs/ifeval/bin/python tests/compare_ifeval_official.py --input ../shared/data/ifeval_input_data.jsonl \
        --responses responses.jsonl [--cross 50]

lm-eval ships a copy of google-research's instruction_following_eval checkers (lm_eval/tasks/ifeval); we load
those three files directly. langdetect is seeded (DetectorFactory.seed = 0) so that its answers repeat.
--cross N also judges every instruction of every prompt against N other prompts' responses (more texts,
same checkers), which multiplies the number of verdicts compared.
"""

import argparse
import collections
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_official():
    import lm_eval  # only to find the package folder; its __init__ is light
    folder = Path(lm_eval.__file__).parent / "tasks" / "ifeval"
    pkg = types.ModuleType("lm_eval.tasks.ifeval")
    pkg.__path__ = [str(folder)]
    sys.modules.setdefault("lm_eval.tasks", types.ModuleType("lm_eval.tasks"))
    sys.modules["lm_eval.tasks.ifeval"] = pkg
    mods = {}
    for name in ("instructions_util", "instructions", "instructions_registry"):
        spec = importlib.util.spec_from_file_location(f"lm_eval.tasks.ifeval.{name}", folder / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        setattr(pkg, name, mod)
        spec.loader.exec_module(mod)
        mods[name] = mod
    from nltk.tokenize.punkt import PunktTokenizer
    english = PunktTokenizer("english")  # the same tables as the english.pickle that the official code names
    mods["instructions_util"]._get_sentence_tokenizer = lambda: english
    import langdetect
    langdetect.DetectorFactory.seed = 0
    return mods["instructions_registry"].INSTRUCTION_DICT


def official_verdict(registry, inst_id, kwargs, response, loose):
    import eval as ours
    cands = ours.loose_variants(response) if loose else [response]
    inst = registry[inst_id](inst_id)
    inst.build_description(**{k: v for k, v in kwargs.items() if v})
    return any(c.strip() and inst.check_following(c) for c in cands)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--input", required=True)
    ap.add_argument("--responses", required=True, nargs="+")
    ap.add_argument("--cross", type=int, default=0, help="also judge each prompt's instructions on N of the responses")
    ap.add_argument("--show", type=int, default=5, help="print up to N disagreements per type")
    args = ap.parse_args()
    import logging
    logging.disable(logging.CRITICAL)
    registry = load_official()
    import eval as ours
    inputs = [json.loads(l) for l in open(args.input)]
    responses = {}
    for path in args.responses:
        for l in open(path):
            if l.strip():
                r = json.loads(l)
                responses.setdefault(r["prompt"], r["response"])
    pairs = [(inp, responses[inp["prompt"]], True) for inp in inputs if inp["prompt"] in responses]
    texts = [t for t in responses.values()]
    if args.cross:
        for i, inp in enumerate(inputs):
            for j in range(args.cross):
                pairs.append((inp, texts[(i + j) % len(texts)], False))
    agree = collections.defaultdict(lambda: [0, 0])
    shown = collections.Counter()
    for inp, resp, matched in pairs:
        for inst_id, kw in zip(inp["instruction_id_list"], inp["kwargs"]):
            for loose in (False, True):
                ref = official_verdict(registry, inst_id, kw, resp, loose)
                got = ours.check_instruction(inst_id, kw, resp, loose=loose)
                tag = ("matched" if matched else "cross", "loose" if loose else "strict")
                if inst_id == "keywords:letter_frequency" and not kw["letter"].isalpha():
                    tag = ("random-letter",) + tag[1:]  # the official code draws a random letter here
                for key in (tag, tag + (inst_id,)):
                    agree[key][0] += ref == got
                    agree[key][1] += 1
                if ref != got and shown[inst_id] < args.show:
                    shown[inst_id] += 1
                    print(f"DIFF {inst_id} {tag} key={inp['key']} official={ref} ours={got} kwargs={kw} "
                          f"response={resp[:300]!r}")
    for key in sorted(k for k in agree if len(k) == 2):
        a, n = agree[key]
        print(f"{key[0]:8s} {key[1]:6s} agreement {a}/{n} = {100 * a / max(n, 1):.2f}%")
    for key in sorted(k for k in agree if len(k) == 3):
        a, n = agree[key]
        if a != n:
            print(f"  {key[0]:8s} {key[1]:6s} {key[2]:45s} {a}/{n} = {100 * a / n:.2f}%")


if __name__ == "__main__":
    main()
