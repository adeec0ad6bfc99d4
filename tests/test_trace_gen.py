"""Tests for trace_gen.py: checkers, writers, edits, distributions, quality control, determinism, statistics."""

import json
import random
import re
from pathlib import Path

import pytest

import trace_gen as tg

HERE = Path(__file__).resolve().parent
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
FIXTURE = HERE / "fixtures" / "trace_eval_3items.jsonl"


def task_for(fam, rng, toy=False):
    """A task whose input kind suits the family (tables for table lookups, records for privacy, ...)."""
    while True:
        ctx = tg.make_task(rng, toy)
        if fam.needs in (None, ctx["input_kind"]):
            return ctx


def spec_for(fam, rng, ctx):
    return tg.make_spec(fam, fam.sample(rng, ctx), 0, 1)


def test_taxonomy_has_26_dimensions_each_with_a_family():
    """5 types, 26 dimensions as SPEC spells them; every dimension has a family, common ones several."""
    dims = [d for ds in tg.TAXONOMY.values() for d in ds]
    assert list(tg.TAXONOMY) == ["Content", "Situation", "Style", "Format", "Example"]
    assert len(dims) == 26 and len(set(dims)) == 26, f"{len(dims)} dimensions"
    per_dim = {d: [f for f in tg.FAMILIES.values() if f.dimension == d] for d in dims}
    missing = [d for d, fs in per_dim.items() if not fs]
    assert not missing, f"dimensions without a family: {missing}"
    for d in ["Inclusion", "Numerical", "Output Format", "Tone and Style"]:
        assert len(per_dim[d]) >= 2, f"{d} has {len(per_dim[d])} families"
    for fam in tg.FAMILIES.values():
        assert len(fam.phrasings) >= 2, f"{fam.name} has {len(fam.phrasings)} phrasings"


@pytest.mark.parametrize("name", sorted(tg.FAMILIES))
def test_family_accepts_compliant_and_rejects_violation(name):
    """The checker accepts the family's compliant response and rejects a spoiled one, over several samples."""
    fam = tg.FAMILIES[name]
    rng = random.Random(sum(map(ord, name)))
    for trial in range(6):
        ctx = task_for(fam, rng, toy=name in tg.TOY_FAMILIES and trial % 2 == 1)
        spec = spec_for(fam, rng, ctx)
        good = tg.write_response(ctx, [spec])
        bad = tg.write_response(ctx, [], spoil=[spec])
        assert tg.check(spec, good), f"{name} rejects its own response for {spec['params']}:\n{good}"
        assert not tg.check(spec, bad), f"{name} accepts a spoiled response for {spec['params']}:\n{bad}"
        assert not tg.check(spec, "   "), f"{name} accepts an empty response"


def test_a_rejected_answer_spoils_the_constraint_it_picks():
    """DPO's losing answer to a one-constraint instruction is that constraint spoiled, for every family with a
    spoil hook (the family's own writer used to undo some spoils, e.g. drop the excluded word again, and the
    answer that ignores every constraint stood in for about 1 in 10 toy losers)."""
    for name in sorted(n for n, f in tg.FAMILIES.items() if type(f).spoil is not tg.Family.spoil):
        fam = tg.FAMILIES[name]
        rng = random.Random(sum(map(ord, name)))
        for _ in range(4):
            ctx = task_for(fam, rng)
            spec = spec_for(fam, rng, ctx)
            got = tg.make_rejected(random.Random(0), ctx, [spec])
            want = tg.write_response(ctx, [spec], spoil=[spec])
            assert got == want and not tg.check(spec, got), f"{name} {spec['params']}: rejected answer\n{got}"


def test_eval_prompts_seen_in_training_are_counted():
    """stats count the evaluation items whose prompt is also a training prompt (x1 or x2), by constraint count."""
    data = tg.generate_data(300, 60, seed=3, toy=True, progress=False)
    trained = {r["prompt"][1]["content"] for r in data["sft"]} | {r["x2"][1]["content"] for r in data["iopo"]}
    seen = [r["constraints_num"] for r in data["eval"] if r["messages"][1]["content"] in trained]
    got = data["stats"]["eval_prompts_in_training"]
    assert seen and got == {"items": len(seen), "by_constraints": {c: seen.count(c) for c in sorted(set(seen))}}, got


@pytest.mark.parametrize("name", sorted(n for n, f in tg.FAMILIES.items() if f.revisable))
def test_revise_gives_valid_quadruple_for_family(name):
    """REVISE of this family's constraint gives x2 whose answer fails x1 and whose old answer fails x2."""
    fam = tg.FAMILIES[name]
    rng = random.Random(7)
    sampler = tg.Sampler([name], toy=False)
    made = 0
    for _ in range(5):
        ctx = task_for(fam, rng)
        spec = spec_for(fam, rng, ctx)
        y1 = tg.write_response(ctx, [spec])
        quad = tg.make_quadruple(rng, ctx, [spec], y1, sampler, ops=("REVISE",))
        if quad is None:
            continue
        specs2, y2, edit = quad
        new = specs2[0]
        verdicts = (tg.check(spec, y1), tg.check(new, y1), tg.check(new, y2), tg.check(spec, y2))
        assert verdicts == (True, False, True, False), f"{name}: {spec['params']} -> {new['params']}: {verdicts}"
        assert new["family"] == name and new["params"] != spec["params"]
        made += 1
    assert made >= 3, f"{name}: only {made} of 5 REVISE edits verified"


def test_a_revised_word_range_lies_above_the_old_one():
    """REVISE of word_range moves the range wholly above the old one, so that every answer the old range allowed
    (the longest included) fails the new one."""
    fam = tg.FAMILIES["word_range"]
    for seed in range(20):
        new = fam.revise(random.Random(seed), {"lo": 20, "hi": 80}, {}, y1="")
        assert 80 < new["lo"] <= new["hi"], f"seed {seed}: 20-80 revised to {new}"


@pytest.mark.parametrize("op", ["ADD", "DELETE", "REVISE"])
def test_edit_operator_yields_valid_quadruple(op):
    """Each edit operator gives quadruples whose matched pairs pass and crossed pairs fail, with a full edit record."""
    rng = random.Random(11)
    sampler = tg.Sampler(list(tg.FAMILIES), toy=False)
    made = 0
    for _ in range(40):
        ctx = tg.make_task(rng, False)
        specs = sampler.instruction(rng, ctx, rng.randint(1, 6))
        if specs is None:
            continue
        y1 = tg.write_response(ctx, specs)
        if not all(tg.verified(specs, y1)):
            continue
        quad = tg.make_quadruple(rng, ctx, specs, y1, sampler, ops=(op,))
        if quad is None:
            continue
        specs2, y2, edit = quad
        assert all(tg.verified(specs, y1)) and all(tg.verified(specs2, y2)), "a matched pair fails"
        assert not all(tg.verified(specs2, y1)), f"{op}: y1 satisfies x2"
        assert not all(tg.verified(specs, y2)), f"{op}: y2 satisfies x1"
        assert edit["op"] == op and set(edit) >= {"op", "index", "before", "after", "companion"}, f"edit {edit}"
        if op == "REVISE":
            assert edit["before"]["family"] == edit["after"]["family"] and len(specs2) == len(specs)
            assert edit["before"]["params"] != edit["after"]["params"], "REVISE kept the params"
        else:
            assert edit["companion"]["op"] == ({"ADD", "DELETE"} - {op}).pop(), f"companion {edit['companion']}"
        made += 1
    assert made >= 15, f"only {made} of 40 {op} edits verified"


def test_c_distributions():
    """Train and eval C counts follow Tables 1-2 exactly at paper size and in proportion when scaled."""
    assert tg.c_counts(tg.TRAIN_C_COUNTS, 119345) == tg.TRAIN_C_COUNTS
    assert tg.c_counts(tg.EVAL_C_COUNTS, 1042) == tg.EVAL_C_COUNTS
    half = tg.c_counts(tg.EVAL_C_COUNTS, 521)
    assert sum(half) == 521 and half[:9] == [100] + [50] * 8, f"scaled eval counts {half}"
    assert tg.c_counts(tg.TRAIN_C_COUNTS, 100, max_c=3) == [3, 22, 75], tg.c_counts(tg.TRAIN_C_COUNTS, 100, max_c=3)
    data = tg.generate_data(120, 104, seed=5, progress=False)
    want = tg.c_counts(tg.TRAIN_C_COUNTS, 120)
    got = data["stats"]["train"]["hist"]
    assert {int(c): k for c, k in got.items()} == {c + 1: k for c, k in enumerate(want) if k}, f"train {got} vs {want}"
    order = [len(r["checks"]) for r in data["sft"]]
    assert order != sorted(order), f"train items should come in shuffled C order, got {order[:20]}..."
    ev = [r["constraints_num"] for r in data["eval"]]
    assert ev.count(1) == 20 and ev.count(2) == 10 and ev.count(9) == 10, f"eval C counts {sorted(set(ev))}"


def test_c_tables_are_spec_section_3():
    """The C tables are SPEC section 3's (paper Tables 1-2), copied here by hand: 119,345 train items with mean
    4.36 and 1,042 evaluation items with mean 4.89."""
    spec_train = [991, 8003, 26421, 34155, 26327, 13858, 5882, 2185, 999, 464, 8, 20, 20, 8, 4]
    spec_eval = [200, 100, 100, 100, 100, 100, 100, 100, 100, 10, 10, 10, 4, 4, 4]
    assert (tg.TRAIN_C_COUNTS, tg.EVAL_C_COUNTS) == (spec_train, spec_eval), (tg.TRAIN_C_COUNTS, tg.EVAL_C_COUNTS)
    for table, n, mean in ((tg.TRAIN_C_COUNTS, 119345, 4.36), (tg.EVAL_C_COUNTS, 1042, 4.89)):
        got = (sum(table), round(sum((c + 1) * k for c, k in enumerate(table)) / sum(table), 2))
        assert got == (n, mean), f"{got}, SPEC says {(n, mean)}"


def test_quality_control_rejects_conflicts():
    """Contradictory, redundant and incomplete combinations are rejected with a reason."""
    rng = random.Random(0)
    ctx = tg.make_task(rng, False)
    while ctx["input_kind"] is not None:
        ctx = tg.make_task(rng, False)
    spec = lambda fam, **p: tg.make_spec(tg.FAMILIES[fam], p, 0, 1)
    cases = [
        (spec("letter_case", case="lower"), spec("letter_case", case="upper"), "contradiction"),
        (spec("word_range", lo=20, hi=80), spec("word_max", n=200), "redundant"),
        (spec("word_range", lo=60, hi=80), spec("word_max", n=50), "contradiction"),
        (spec("word_range", lo=20, hi=80), spec("word_range", lo=100, hi=200), "contradiction"),
        (spec("word_range", lo=60, hi=80), spec("word_max", n=60), "redundant"),  # 60 words meet both
        (spec("start_word", word="Sure"), spec("start_word", word="Well"), "contradiction"),
        (spec("include_keywords", keywords=["river"]), spec("include_keywords", keywords=["river"]), "redundant"),
        (spec("include_keywords", keywords=["very"]), spec("exclude_words", words=["very"]), "contradiction"),
        (spec("json_wrap", key="answer"), spec("bullet_list", n=3), "contradiction"),
        (spec("end_phrase", phrase="Thanks for reading."), spec("postscript", marker="P.S."), "contradiction"),
        (spec("theme_repeat", topic="chess", k=2), spec("theme_repeat", topic="chess", k=3), "redundant"),
        (spec("exclude_words", words=["very"]), spec("exclude_words", words=["very"]), "redundant"),
        (spec("exclude_words", words=["just"]), spec("negative_example", phrase="Just saying"), None),
        (spec("exclude_words", words=["very"]), spec("include_keywords", keywords=["very"]), "contradiction"),
        (spec("bullet_list", n=3), spec("json_wrap", key="answer"), "contradiction"),
        (spec("bullet_list", n=3), spec("numbered_list", n=3), "contradiction"),
    ]
    for a, b, kind in cases:
        reason = tg.qc_reason(ctx, [a], b)
        assert (reason or "").startswith(kind or "") and bool(reason) == bool(kind), \
            f"{a['family']} + {b['family']}: {reason!r}, wanted {kind}"
    table = spec("table_lookup", question="the price of A", value="12")
    assert tg.qc_reason(ctx, [], table).startswith("incomplete"), "table constraint accepted without a table"
    stats = tg.generate_data(60, 10, seed=1, progress=False)["stats"]
    assert stats["qc_rejected_total"] > 0 and all(":" in r for r in stats["qc_rejected"]), stats["qc_rejected"]
    kinds = {r.split(":")[0] for r in stats["qc_rejected"]}
    assert {"incomplete", "redundant", "contradiction"} <= kinds, f"rejection kinds seen: {kinds}"


def test_priority_is_primary_for_content_situation_and_format():
    """CFBench's priority: Content, Situation and Format constraints are primary, Style and Example secondary."""
    want = {"word_max": "primary", "role_intro": "primary", "letter_case": "primary", "tone_register": "secondary",
            "emotion_lexicon": "secondary", "negative_example": "secondary", "positive_example": "secondary"}
    rng = random.Random(0)
    got = {name: spec_for(tg.FAMILIES[name], rng, task_for(tg.FAMILIES[name], rng))["priority"] for name in want}
    assert got == want, got


def test_sampler_boosts_a_family_on_tasks_with_its_input():
    """A family that needs an input is weighted 1 / P(input kind) on tasks with that input (table: 1 / 0.1), so its
    dimension keeps its share; a family that needs none keeps its weight (Inclusion 20 over 3 families)."""
    sampler = tg.Sampler(list(tg.FAMILIES), toy=False)
    weight = {kind: dict(zip((f.name for f in fams), ws)) for kind, (fams, ws) in sampler.by_kind.items()}
    got = (weight["table"]["table_lookup"], weight[None]["table_lookup"], weight["table"]["include_keywords"],
           weight["records"]["privacy_mask"])
    assert got == pytest.approx((10.0, 1.0, 20 / 3, 1.5 / 0.07)), got
    assert tg.Sampler(["letter_case"], toy=False).kinds == [k for k, _ in tg.INPUT_KIND_WEIGHTS], "inputs kept"
    assert tg.Sampler(["table_lookup", "letter_case"], toy=False).kinds == [k for k, _ in tg.INPUT_KIND_WEIGHTS]
    assert tg.Sampler(["table_lookup"], toy=False).kinds == ["table"], tg.Sampler(["table_lookup"], toy=False).kinds


def test_task_facts_are_what_the_input_says():
    """Every fact a lookup constraint may ask about holds the value the task's table or passage gives for it."""
    rng = random.Random(0)
    for _ in range(20):
        ctx = tg.make_task(rng, False, kinds=["table"])
        header, _, *rows = [[c.strip() for c in line.strip("|").split("|")] for line in ctx["input"].splitlines()]
        cells = {(row[0], col): value for row in rows for col, value in zip(header[1:], row[1:])}
        for question, value in ctx["facts"]:
            col, row = re.fullmatch(r'the value in the "(.+)" column for (.+)', question).groups()
            assert cells[row, col] == value, f"{question}: {value}, the table says {cells[row, col]}\n{ctx['input']}"
        assert len(ctx["facts"]) == len(cells), (len(ctx["facts"]), len(cells))
        ctx = tg.make_task(rng, False, kinds=["passage"])
        text = ctx["input"]
        said = {"the year": re.search(r"founded in (\d+)", text)[1],
                "how many members": re.search(r"has (\d+) members", text)[1],
                "how many programs": re.search(r"runs (\d+) programs", text)[1],
                "the town": re.search(r"town of (\w+)", text)[1]}
        for question, value in ctx["facts"]:
            key = next(k for k in said if question.startswith(k))
            assert value == said[key], f"{question}: {value}, the passage says {said[key]}: {text}"


def test_generated_records_verify_and_render_like_trace():
    """Every emitted pair verifies, DPO losers fail, IOPO crosses fail, and eval items render like the real set."""
    data = tg.generate_data(40, 30, seed=2, progress=False)
    assert len(data["sft"]) == len(data["dpo"]) == len(data["iopo"]) == 40 and len(data["eval"]) == 30
    for r, d, q in zip(data["sft"], data["dpo"], data["iopo"]):
        assert all(tg.verified(r["checks"], r["response"])), r["prompt"]
        assert r["prompt"] == d["prompt"] == q["x1"] and r["response"] == d["chosen"] == q["y1"]
        assert [m["role"] for m in r["prompt"]] == ["system", "user"] and r["prompt"][0]["content"] == "You are a helpful assistant."
        assert "\n" + "\n".join(s["text"] for s in r["checks"]) + "\n" in r["prompt"][1]["content"], "constraints not rendered"
    for r in data["dpo"]:
        assert not all(tg.verified(r["checks"], r["rejected"])), "DPO rejected satisfies every constraint"
    for q in data["iopo"]:
        block1, block2 = ("\n" + "\n".join(s["text"] for s in q[f"checks_{x}"]) + "\n" for x in ("x1", "x2"))
        x1, x2 = q["x1"][1]["content"], q["x2"][1]["content"]
        assert block1 in x1 and x1 != x2, f"x1 lacks its constraints or equals x2:\n{x1}"
        assert x1.replace(block1, block2) == x2, f"x2 is not x1 with x2's constraints:\n{x2}"
        ok = (all(tg.verified(q["checks_x1"], q["y1"])), all(tg.verified(q["checks_x2"], q["y2"])),
              all(tg.verified(q["checks_x2"], q["y1"])), all(tg.verified(q["checks_x1"], q["y2"])))
        assert ok == (True, True, False, False), f"quadruple verdicts {ok} for edit {q['edit']['op']}"
    assert [item["id"] for item in data["eval"]] == [str(i) for i in range(30)], [item["id"] for item in data["eval"]]
    for item in data["eval"]:
        assert all(tg.verified(item["checks"], item["reference"])), item["id"]
        expect = item["description"] + "\n" + item["constraints"] + "\n"
        expect += "" if item["input"] == "NULL" else "# Inputs:\n" + item["input"] + "\n"
        assert item["messages"] == [{"role": "system", "content": "You are a helpful assistant."},
                                    {"role": "user", "content": expect}]
        assert item["constraints_num"] == len(item["constraints_splits"]) == len(item["levels2"]) == len(item["checks"])
        assert all(s.startswith(f"{i + 1}. ") for i, s in enumerate(item["constraints_splits"]))
        assert json.loads(json.dumps(item["checks"])) == item["checks"], "checks not JSON-serialisable"


def test_real_fixture_matches_our_rendering_and_labels():
    """The committed real items render by our formula and their Chinese labels all map to our dimensions."""
    items = [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]
    assert len(items) == 3
    for item in items:
        expect = item["description"] + "\n" + item["constraints"] + "\n"
        expect += "" if item["input"] == "NULL" else "# Inputs:\n" + item["input"] + "\n"
        assert item["messages"][1]["content"] == expect, item["id"]
    s = tg.file_stats(FIXTURE)
    assert s["n"] == 3 and s["unmapped_labels"] == {}, s
    assert s["hist"] == {"1": 1, "3": 1, "11": 1} and s["mean_constraints"] == pytest.approx(5.0), s["hist"]


def test_summary_and_printed_table_by_hand(capsys):
    """summarize and print_stats on four label lists worked by hand: mean C 7 / 4, shares of 7 labels in percent."""
    labels = [["Theme"], ["Theme"], ["Theme", "Inclusion", "Numerical"], ["语气风格约束", "Positive Example"]]
    s = tg.summarize(labels)
    assert (s["n"], s["mean_constraints"], s["hist"]) == (4, 1.75, {"1": 2, "2": 1, "3": 1}), s
    tg.print_stats(s)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == ["instructions: 4   mean constraints: 1.75", "C:          1      2      3",
                         "count:      2      1      1", "Content     71.4%   Theme 3, Inclusion 1, Numerical 1"], lines
    assert lines[5] == "Style       14.3%   Tone and Style 1", lines
    assert lines[7] == "Example     14.3%   Positive Example 1", lines


def test_stats_reads_a_file_with_a_byte_order_mark(tmp_path, capsys):
    """--stats reads a JSONL file that starts with a UTF-8 byte order mark, as some editors write it."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"levels2": ["Theme", "数值约束"]}\n{"levels2": ["Theme"]}\n'.encode())
    tg.main(["--stats", str(path), "--json"])
    s = json.loads(capsys.readouterr().out)
    assert (s["n"], s["dimension_counts"]) == (2, {"Theme": 2, "Numerical": 1}), s


def test_check_errors_name_the_problem():
    """Unknown families and malformed params raise ValueError naming the family and field."""
    with pytest.raises(ValueError, match="no_such_family"):
        tg.check({"family": "no_such_family", "params": {}}, "text")
    with pytest.raises(ValueError, match="keywords"):
        tg.check({"family": "include_keywords", "params": {}}, "text")
    with pytest.raises(ValueError, match="word_max"):
        tg.check({"family": "word_max", "params": {"n": "many"}}, "text")


def test_checkers_on_hand_written_answers():
    """A few exact verdicts written by hand, including IFEval-like edge cases."""
    c = lambda fam, r, **p: tg.check({"family": fam, "params": p}, r)
    assert c("start_word", '"Sure, here it is."', word="Sure") and not c("start_word", "Surely not.", word="Sure")
    assert c("end_phrase", '"...Thanks for reading."', phrase="Thanks for reading.")
    assert c("bullet_list", "- a\n- b\n* c", n=3) and not c("bullet_list", "**bold**\n- a", n=2)
    assert not c("bullet_list", "- a\n* * *\n- b", n=3), "a '* * *' rule counted as a bullet"
    for text in ("Who's ready?", "We could've gone.", "Where's the key?"):
        assert not c("tone_register", text, style="formal"), f"{text!r} passed as formal (no contractions)"
    assert not c("simile", "I would like a coffee.", form="like") and not c("simile", "We'd like an answer.", form="like")
    assert c("simile", "It hums like a bee.", form="like")
    cite = lambda r: c("citations", r, k=2, label="Sources")
    assert cite("As shown [1] and [2].\nSources:\n[1] a\n[2] b"), "well-formed citations rejected"
    assert not cite("I have no Sources: sorry.\n[1] a\n[2] b"), "the list's own numbers counted as citing"
    assert not cite("As shown [1] and [2]. See the Sources: list."), "a label inside a sentence accepted"
    assert c("json_wrap", '```json\n{"Answer": "x"}\n```', key="answer") and not c("json_wrap", '{"a": 1}', key="a")
    assert not c("tone_register", "I don't know.", style="formal") and c("tone_register", "I do not know.", style="formal")
    assert c("exclude_words", "Everything is fine.", words=["very"]), "'very' matched inside 'Everything'"
    assert c("nl_process_order", "b then a", steps=["a", "b"], order="reverse")
    assert c("privacy_mask", "x *** y ***", secrets=["a@b.c", "555"], mask="***")
    assert not c("privacy_mask", "a@b.c *** ***", secrets=["a@b.c", "555"], mask="***")


# (family, params, answer, verdict, what it pins): one case per promise in a checker's docstring or phrasing that
# the family's own writer never tests, because the writer and the checker agree by construction
SECRETS = {"secrets": ["ana@example.com", "555-0142"], "mask": "[hidden]"}
STEPS = {"steps": ["mix the flour", "knead the dough"], "order": "given"}
HAND_VERDICTS = [
    ("sentence_min", {"n": 2}, "Is it ready? Yes it is.", True, "a question mark ends a sentence"),
    ("include_keywords", {"keywords": ["river"]}, "The riverbank is calm.", False, "a keyword inside a longer word"),
    ("value_line", {"label": "Disclaimer"}, "Tea is calm.\n- Disclaimer: ask a doctor first.", True,
     "a label after a leading '- '"),
    ("exclude_words", {"words": ["very", "really"]}, "It is really fine.", False, "any one excluded word breaks it"),
    ("privacy_mask", SECRETS, "Mail ANA@Example.com or [hidden], [hidden].", False, "an e-mail in other case leaks"),
    ("privacy_mask", SECRETS, "Write to [hidden] for details.", False, "one mask for two secrets"),
    ("word_range", {"lo": 2, "hi": 5}, "one two three four five", True, "hi words are within the range"),
    ("word_range", {"lo": 2, "hi": 5}, "one two", True, "lo words are within the range"),
    ("word_max", {"n": 3}, "one two three", True, "exactly n words is at most n"),
    ("audience", {"audience": "students", "max_len": 8}, "Dear students. This one sentence runs on for far more "
     "than eight words.", False, "one long sentence breaks it"),
    ("audience", {"audience": "students", "max_len": 8}, "Dear students, this line has exactly eight words.", True,
     "a sentence of exactly max_len words"),
    ("prior_condition", {"category": "food", "expected": "related", "other": "unrelated"},
     "Relevance: related.\nRelevance: unrelated.", False, "both answers given"),
    ("nl_process_order", STEPS, "Then knead the dough.", False, "a step left out"),
    ("tone_register", {"style": "formal"}, "This is a great idea!", False, "formal allows no exclamation mark"),
    ("tone_register", {"style": "casual"}, "It's fine. It is good.", False, "casual needs two contractions"),
    ("emotion_lexicon", {"words": ["joyful", "hopeful", "cheerful"], "k": 2}, "I am hopeful, so hopeful.", False,
     "one word twice is not two different words"),
    ("simile", {"form": "like"}, "Like a bird, it sings.", True, "a simile opening a sentence (capital L)"),
    ("foreign_sentence", {"language": "French", "options": ["Merci pour votre lecture."]},
     "Bye. Merci pour votre lecture!", True, "the final period is optional"),
    ("json_wrap", {"key": "answer"}, '{"answer": "x", "extra": "y"}', False, "a second key"),
    ("quotes_wrap", {}, '"', False, "one quote mark is not a pair"),
    ("title", {}, "<<   >>\nBody.", False, "a blank title"),
    ("bold", {"k": 2}, "A ** ** b **x**.", False, "a blank bold span"),
    ("if_sentences", {"k": 1}, "Iffy weather today.", False, "'Iffy' is not the word 'If'"),
    ("citations", {"k": 2, "label": "Sources"}, "As shown [1] and again [1].\nSources:\n[1] a", False,
     "one number cited twice is one citation"),
    ("numbered_list", {"n": 2}, "1) a\n2) b", True, "items numbered '1)'"),
    ("sections", {"n": 2}, "## A\nx\n### Sub\ny\n## B\nz", True, "a '### ' heading is not level 2"),
    ("template_fields", {"labels": ["Topic", "Summary", "Rating"]}, "Summary: x\nRating: y", False,
     "the first label left out"),
    ("table_lookup", {"question": "the population", "value": "4,512"}, "It has 4512 people.", True,
     "a value given with a thousands separator"),
    ("end_phrase", {"phrase": "Any questions are welcome."}, "Tea is calm. Many questions are welcome.", False,
     "the phrase must start a word: 'Many' is not 'Any'"),
    ("end_phrase", {"phrase": "Any questions are welcome."}, '"Tea is calm. Any questions\nare welcome."', True,
     "the phrase across a line break, inside quotes"),
    ("start_word", {"word": "Well"}, "Well-known tips follow.", False, "'Well-known' does not start with 'Well'"),
    ("json_wrap", {"key": "Answer"}, '{"answer": "x"}', True, "the key in any case, the spec's too"),
    ("start_word", {"word": "Sure"}, "...Sure, here it is.", False,
     "only spaces, quotes and markdown marks may come before the first word"),
    ("template_fields", {"labels": ["Topic", "Summary", "Rating"]}, "Topic: tea\nSummary: x\nRating: y", True,
     "the first label on the very first line"),
    ("exclude_words", {"words": ["very"]}, '{"answer": "Fine.", "note": "very"}', False,
     "a JSON answer with two keys is judged as written, all of it"),
]


@pytest.mark.parametrize("fam,params,answer,want,why", HAND_VERDICTS, ids=[f"{c[0]}-{c[4]}" for c in HAND_VERDICTS])
def test_checker_verdict_on_a_hand_written_edge_case(fam, params, answer, want, why):
    """One checker on one hand-written answer gives the verdict its docstring and phrasing promise."""
    got = tg.check({"family": fam, "params": params}, answer)
    assert got == want, f"{fam} {params} on {answer!r} ({why}): {got}, expected {want}"


def test_words_and_sentences_are_counted_as_a_reader_counts_them():
    """An e-mail, a phone number and "P.S." are one word each; headings, titles, labels, source entries and list
    items without a full stop are not sentences, and "P.S." ends none; a one-key JSON answer is judged on its
    text (its escaped line breaks would glue "Intro.\\nVery" into one word)."""
    assert tg.count_words("Write to ana@example.com or call 555-0142. P.S. thanks — done") == 9
    text = "<<A Guide>>\n## Steps\nFirst one. Second one!\n- apples\n- Pears keep well.\nSources:\n[1] Notes.\nP.S. Go on."
    assert tg.split_sentences(text) == ["First one.", "Second one!", "- Pears keep well.", "P.S. Go on."]
    for abbr in ("e.g.", "i.e."):  # each on its own: the other's presence must not be what protects it
        got = tg.split_sentences(f"Drink tea, {abbr} green tea. It is calm.")
        assert got == [f"Drink tea, {abbr} green tea.", "It is calm."], f"{abbr}: {got}"
    c = lambda fam, r, **p: tg.check({"family": fam, "params": p}, r)
    answer = '{"answer": "Intro.\\nVery nice indeed."}'
    assert not c("exclude_words", answer, words=["very"]) and c("sentence_min", answer, n=2)
    assert c("json_wrap", answer, key="answer") and tg.json_content("not json") == "not json"
    # curly quotes read as straight ones, bold or spaced labels as plain ones
    assert c("quotes_wrap", "\u201cHello there.\u201d") and not c("tone_register", "I don\u2019t know.", style="formal")
    assert not c("json_wrap", '{\u201canswer\u201d: \u201cx\u201d}', key="answer"), "curly quotes are not JSON"
    assert tg._line_starts("Intro.\n**Disclaimer** : ask a doctor.", "disclaimer:") == [1]
    assert c("prior_condition", "**Relevance**:related.", category="x", expected="related", other="unrelated")
    assert c("citations", "As shown [1] and [2].\n**Sources**:\n[1] a\n[2] b", k=2, label="Sources")
    assert c("simile", "It is as steady as a rock.", form="as") and not c("simile", "Tea as well as coffee.", form="as")
    assert c("postscript", "Body.\n\nP.S. Bye.", marker="P.S.") and not c("postscript", "P.S. Hi.\n\nBody.", marker="P.S.")


def test_a_run_of_end_marks_counts_once():
    """"Wow!!" is one exclamation and "Really??" one question, as a reader counts them; "Really?!" is one of each;
    the "?" of a link's query is none."""
    c = lambda fam, r, **p: tg.check({"family": fam, "params": p}, r)
    for r, want in [("Wow!! Tea is nice.", False), ("Wow! Tea is nice!", True), ("Really?! Great!", True)]:
        got = c("tone_register", r, style="enthusiastic")
        assert got == want, f"enthusiastic (>= 2 exclamations) on {r!r}: {got}, expected {want}"
    for r, want in [("Really?? Yes.", False), ("Really?! Why not?", True), ("Why??? Why not?!", True),
                    ("See https://example.com/find?q=tea today. Why not?", False)]:
        got = c("questions", r, k=2)
        assert got == want, f"questions k=2 on {r!r}: {got}, expected {want}"


def test_a_phrase_written_across_a_line_break_is_read_as_on_one_line():
    """A whitespace run (line break, double space) inside a phrase reads as one space, for phrases the answer must
    include (it counts) and for those it must not (it breaks the constraint)."""
    c = lambda fam, r, **p: tg.check({"family": fam, "params": p}, r)
    cases = [("include_phrase", "Save a little,\nin the long\nrun it adds up.", {"phrase": "in the long run"}, True),
             ("role_intro", "As a\nchef, I cook.", {"phrase": "As a chef"}, True),
             ("theme_repeat", "Green\ntea is calm. Green  tea is warm.", {"topic": "green tea", "k": 2}, True),
             ("nl_process_order", "First mix the\nflour, then knead the dough.", {"steps": ["mix the flour", "knead the dough"],
                                                                                  "order": "given"}, True),
             ("foreign_sentence", "Bye. Merci pour\nvotre lecture.", {"language": "French",
                                                                      "options": ["Merci pour votre lecture."]}, True),
             ("end_phrase", "That was all. Thanks for\nreading.", {"phrase": "Thanks for reading."}, True),
             ("negative_example", "And at the end\nof the day, it is fine.", {"phrase": "At the end of the day"}, False),
             ("exclude_words", "It was, as a matter\nof fact, fine.", {"words": ["as a matter of fact"]}, False),
             ("simile", "It works like a\nclock.", {"form": "like"}, True),
             ("simile", "It is as steady\nas a rock.", {"form": "as"}, True),
             ("simile", "Tea as well\nas coffee.", {"form": "as"}, False)]
    for fam, r, params, want in cases:
        got = c(fam, r, **params)
        assert got == want, f"{fam} {params} on {r!r}: {got}, expected {want}"


def test_a_number_with_thousands_separators_is_one_number():
    """"4,512" reads as 4512 (and no longer holds a 512), while "1, 2, 3", "1,2" and "1,2345" are not merged."""
    c = lambda fam, r, **p: tg.check({"family": fam, "params": p}, r)
    cases = [("table_lookup", "Lumora has 4,512 people.", "4512", True),
             ("table_lookup", "Lumora has 4,512 people.", "512", False),
             ("passage_fact", "It has 1,234,567 members.", "1234567", True),
             ("passage_fact", "Values: 1, 234 and 5.", "1234", False),
             ("passage_fact", "Values: 1,2345 and 5.", "12345", False),
             ("passage_fact", "Values: 12,34 and 5.", "34", True)]
    for fam, r, value, want in cases:
        got = c(fam, r, question="the value", value=value)
        assert got == want, f"{fam} value {value!r} on {r!r}: {got}, expected {want}"


def test_value_line_points_to_an_adviser_when_its_phrasing_promises_it():
    """Phrasings 0 and 1 promise a reminder to ask someone qualified, so the labelled line must name one; phrasing 2
    asks only for the label."""
    spec = lambda i: {"family": "value_line", "params": {"label": "Disclaimer"}, "phrasing": i}
    bare = "Tea is calm.\nDisclaimer: tea can be hot."
    advised = ["Tea is calm.\n**Disclaimer:** ask your doctor before changing your diet.",
               "Tea is calm.\nDisclaimer:\nPlease check with a qualified person before acting.",
               "TEA IS CALM.\nDISCLAIMER: SEEK PROFESSIONAL ADVICE."]
    for i, want in [(0, False), (1, False), (2, True)]:
        got = tg.check(spec(i), bare)
        assert got == want, f"phrasing {i} on {bare!r}: {got}, expected {want}"
    for r in advised:
        got = [tg.check(spec(i), r) for i in range(3)]
        assert got == [True] * 3, f"phrasings 0-2 on {r!r}: {got}"
    elsewhere = "Ask a doctor first.\nDisclaimer: tea can be hot."
    assert not tg.check(spec(0), elsewhere), f"an adviser outside the labelled line counted: {elsewhere!r}"


def test_determinism_same_seed_same_output():
    """The same seed gives byte-identical data; another seed does not."""
    a = tg.generate_data(30, 12, seed=9, progress=False)
    b = tg.generate_data(30, 12, seed=9, progress=False)
    c = tg.generate_data(30, 12, seed=10, progress=False)
    dump = lambda d: json.dumps({k: d[k] for k in ("sft", "dpo", "iopo", "eval")})
    assert dump(a) == dump(b), "same seed, different data"
    assert dump(a) != dump(c), "different seeds, same data"


def test_toy_preset_is_short_and_surface_level():
    """Toy data: preset families only, C in 1..3, short responses, and REVISE edits among the ops."""
    data = tg.generate_data(150, 30, seed=3, toy=True, progress=False)
    fams = {s["family"] for r in data["sft"] for s in r["checks"]}
    assert fams <= set(tg.TOY_FAMILIES) and len(fams) >= 6, fams
    cs = [len(r["checks"]) for r in data["sft"]]
    assert set(cs) == {1, 2, 3}, set(cs)
    words = [tg.count_words(r["response"]) for r in data["sft"]]
    assert max(words) <= 45 and sum(words) / len(words) <= 30, f"toy response words max {max(words)}"
    assert data["stats"]["iopo_ops"].get("REVISE", 0) > 20, data["stats"]["iopo_ops"]
    phrasings = {s["phrasing"] for r in data["sft"] + data["eval"] for s in r.get("checks", [])}
    assert phrasings == {0, 1}, f"toy constraints use the first two phrasings of a family, got {sorted(phrasings)}"
    sub = tg.generate_data(20, 5, seed=3, families=["letter_case", "start_word"], toy=True, progress=False)
    assert {s["family"] for r in sub["sft"] for s in r["checks"]} <= {"letter_case", "start_word"}


def test_write_outputs_and_stats_cli(tmp_path, capsys):
    """write_outputs writes the five files; --stats --json on our eval file reports the documented keys."""
    data = tg.generate_data(10, 12, seed=4, progress=False)
    tg.write_outputs(data, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dpo.jsonl", "eval.jsonl", "iopo.jsonl", "sft.jsonl", "stats.json"]
    tg.main(["--stats", str(tmp_path / "eval.jsonl"), "--json"])
    s = json.loads(capsys.readouterr().out)
    assert {"n", "mean_constraints", "hist", "type_shares", "dimension_counts"} <= set(s) and s["n"] == 12, s
    assert abs(sum(s["type_shares"].values()) - 1) < 1e-3, s["type_shares"]


@pytest.mark.skipif(not (SHARED / "trace_eval_sample.jsonl").exists(), reason="shared/data not present")
def test_real_sample_file_parses_with_stats(capsys):
    """The released 9-item sample parses with --stats: every Chinese label maps, counts as in the file."""
    tg.main(["--stats", str(SHARED / "trace_eval_sample.jsonl"), "--json"])
    s = json.loads(capsys.readouterr().out)
    assert s["n"] == 9 and s["unmapped_labels"] == {}, s
    assert s["hist"] == {"1": 3, "3": 2, "11": 3, "14": 1}, s["hist"]
    assert s["dimension_counts"]["Numerical"] == 17, s["dimension_counts"]


@pytest.mark.parametrize("content,message", [
    ('{"levels2": "Theme"}\n', r"s.jsonl:1: 'levels2' must be a list of strings, got 'Theme'"),  # not 5 letters
    ('\n{"levels2": null}\n', r"s.jsonl:2: 'levels2' must be a list of strings, got None"),
    ('{"checks": [{"type": "Content"}]}\n', r"s.jsonl:1: checks\[0\] needs a string 'dimension'"),
    ('[\n{"levels2": ["Theme"]}\n]\n', r"s.jsonl:1 is not valid JSON .*one JSON object per line"),
    ('[{"levels2": ["Theme"]}]\n', r"s.jsonl:1 should hold a JSON object, got list \(JSONL"),
    ("\n", r"s.jsonl holds no records"),
])
def test_stats_bad_files_are_errors_with_file_and_line(tmp_path, content, message):
    """--stats on a malformed record, a JSON array or an empty file prints error: FILE:LINE, not a traceback."""
    (tmp_path / "s.jsonl").write_text(content)
    with pytest.raises(SystemExit, match="error: .*" + message):
        tg.main(["--stats", str(tmp_path / "s.jsonl")])


def test_stats_on_a_folder_says_folder(tmp_path):
    """A folder given to --stats is reported as a folder, not as a missing file."""
    with pytest.raises(SystemExit, match=r"error: .* is a folder, expected a JSONL file"):
        tg.main(["--stats", str(tmp_path)])


def test_same_seed_same_files(tmp_path, monkeypatch):
    """Two CLI runs with one seed write byte-identical files, even when the clock moves between them."""
    clock = iter(range(10**6))
    monkeypatch.setattr(tg.time, "time", lambda: float(next(clock) ** 2))  # each run takes longer than the last
    for run in ("a", "b"):
        tg.main(["--out", str(tmp_path / run), "--n-train", "8", "--n-eval", "4", "--seed", "0", "--toy",
                 "--no-progress"])
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    differ = [n for n in names if (tmp_path / "a" / n).read_bytes() != (tmp_path / "b" / n).read_bytes()]
    assert len(names) == 5 and not differ, f"files {names}, differing {differ}"


def test_write_outputs_is_all_or_nothing(tmp_path):
    """A failure midway through writing (an unserialisable value in eval.jsonl, the fourth of five files, after
    sft, dpo and iopo are written) leaves the earlier five files as they were and nothing else."""
    out = tmp_path / "data"
    tg.write_outputs(tg.generate_data(6, 3, seed=0, toy=True, progress=False), out)
    assert [p.name for p in tmp_path.iterdir()] == ["data"], f"after a good write: {sorted(tmp_path.iterdir())}"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    data = tg.generate_data(6, 3, seed=1, toy=True, progress=False)
    data["eval"][-1]["bad"] = {1, 2}  # a set: json.dumps fails inside the writing of eval.jsonl
    with pytest.raises(TypeError):
        tg.write_outputs(data, out)
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    changed = sorted(n for n in set(before) | set(after) if before.get(n) != after.get(n))
    assert not changed, f"changed or added: {changed}"
    assert [p.name for p in tmp_path.iterdir()] == ["data"], sorted(p.name for p in tmp_path.iterdir())


def test_bad_params_and_counts_are_rejected(tmp_path, capsys):
    """A string where a list or integer belongs, --max-constraints 0, a negative count or a file as --out: errors."""
    with pytest.raises(ValueError, match=r"include_keywords: params field 'keywords' must be a non-empty list"):
        tg.check({"family": "include_keywords", "params": {"keywords": "cat"}}, "c a t")  # was: each letter a keyword
    with pytest.raises(ValueError, match=r"bold: params field 'k' must be an integer, got '2'"):
        tg.check({"family": "bold", "params": {"k": "2"}}, "**a** **b**")
    for flag, value, least in (("--max-constraints", "0", 1), ("--n-train", "-2", 0), ("--n-eval", "-1", 0)):
        with pytest.raises(SystemExit):
            tg.main(["--out", str(tmp_path / "o"), "--toy", "--no-progress", flag, value])
        err = capsys.readouterr().err
        assert f"{flag} must be at least {least}, got {value}" in err, err
    with pytest.raises(ValueError, match="max_constraints must be >= 1"):
        tg.generate_data(2, 2, seed=0, max_constraints=0, progress=False)
    (tmp_path / "f").write_text("keep")
    with pytest.raises(SystemExit, match=r"error: --out .*f is a file"):
        tg.main(["--out", str(tmp_path / "f"), "--n-train", "2", "--n-eval", "2", "--toy", "--no-progress"])
    assert (tmp_path / "f").read_text() == "keep" and not (tmp_path / "o").exists()


def test_a_phone_number_leaks_in_any_spacing():
    """privacy_mask: "555-0142" written as "555 0142", "(555) 0142", "5550142" or with a country code is still
    the secret; 15550142 is another number."""
    spec = lambda: {"family": "privacy_mask", "params": {"secrets": ["ana@example.com", "555-0142"], "mask": "[hidden]"}}
    for shown, leaked in [("555 0142", True), ("(555) 0142", True), ("5550142", True), ("555.01 42", True),
                          ("+1 555 0142", True), ("15550142", False), ("[hidden]", False)]:
        r = f"Write to [hidden] or call {shown}. Thanks, [hidden]."
        got = tg.check(spec(), r)
        assert got == (not leaked), f"{r!r}: check {got}, expected {not leaked}"


def test_a_family_set_that_cannot_make_quadruples_is_a_one_line_error(tmp_path):
    """--families title alone (not revisable, so no x2 that y1 fails) stops with error: ..., not a traceback."""
    with pytest.raises(SystemExit, match=r"error: no valid train item with C=1 from families \['title'\]"):
        tg.main(["--out", str(tmp_path / "o"), "--families", "title", "--n-train", "1", "--n-eval", "0",
                 "--no-progress"])
    assert not (tmp_path / "o").exists()
