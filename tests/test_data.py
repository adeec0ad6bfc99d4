"""Tests for data.py: readers and their errors, encoding and masks, truncation, collation, batching, tokenizer."""

import io
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data as D  # noqa: E402
from model import load_tokenizer  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "data_fixtures"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

CORPUS = [
    "The river flows north through the old town.\n\nIt is cold.",
    "Write exactly three sentences and end with a question?",
    "Answer in lowercase letters only, please.\n\n- one\n- two",
    "Numbers like 12, 345 and 6789 appear here too.",
    "为一篇关于高中生备考的论文提供一个标题\n1. 标题长度控制在10至15个字之间；\n",
    "You are a helpful assistant.",
    "Dear reader\n\nthank you\n\nbye",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A toy tokenizer folder written by train_tokenizer (vocab 400) on a few sentences."""
    return D.train_tokenizer(CORPUS * 20, 400, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    """The toy tokenizer as model.py loads it."""
    return load_tokenizer(tok_dir)


class CharTok:
    """A fake tokenizer with one id per character, so lengths can be counted by hand.

    Specials are single ids; a prompt with one user turn of P characters renders as
    <|im_start|> "user\\n" P <|im_end|> "\\n" <|im_start|> "assistant\\n" = P + 19 ids."""
    end_of_turn, end_of_turn_id = "<|im_end|>", 2

    def encode(self, text):
        ids = []
        for piece in text.replace("<|im_start|>", "\x01").replace("<|im_end|>", "\x02"):
            ids.append(ord(piece) if piece in "\x01\x02" else ord(piece) + 10)
        return ids

    def render_chat(self, messages, add_generation_prompt=True):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return self.encode(self.render_chat(messages, add_generation_prompt))


def write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("".join(json.dumps(x) + "\n" if not isinstance(x, str) else x + "\n" for x in lines),
                    encoding="utf-8")
    return path


# -----------------------------------------------------------------------------
# Readers

def test_read_sft_both_layouts(tmp_path):
    """SFT: a messages list and a prompt/response pair give the same normalized record; extra keys stay."""
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}]
    path = write(tmp_path, "sft.jsonl", [{"messages": msgs, "checks": [1]}, "",
                                         {"prompt": "Hi", "response": "Hello!"}])
    a, b = list(D.read_sft(path))
    assert a == {"messages": msgs, "checks": [1]}, a
    assert b == {"messages": msgs[1:]}, b


def test_read_dpo_layouts(tmp_path):
    """DPO: string prompt, message-list prompt and TRL's one-message answers all normalize alike."""
    user = [{"role": "user", "content": "Hi"}]
    path = write(tmp_path, "dpo.jsonl", [
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
        {"prompt": user, "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "Go away."}]}])
    want = {"prompt": user, "chosen": "Hello!", "rejected": "Go away."}
    assert list(D.read_dpo(path)) == [want, want]


def test_read_iopo_ours_and_authors_layout(tmp_path):
    """IOPO: our x1/y1/x2/y2 layout and the authors' sharegpt JSON array (chosen = y1, rejected = y2)."""
    path = write(tmp_path, "iopo.jsonl", [{"x1": "A?", "y1": "a", "x2": [{"role": "user", "content": "B?"}],
                                           "y2": "b", "checks": {"x1": []}}])
    (ex,) = list(D.read_iopo(path))
    assert ex == {"x1": [{"role": "user", "content": "A?"}], "y1": "a",
                  "x2": [{"role": "user", "content": "B?"}], "y2": "b", "checks": {"x1": []}}, ex
    first, second = list(D.read_iopo(FIXTURES / "iopo_sharegpt.json"))
    assert first["x1"][0]["content"].endswith("3 to 5 words;\n") and first["x2"][0]["content"].endswith("8 to 10 words;\n")
    assert first["y1"] == "Calm Before The Exams" and first["y2"].startswith("How Careful"), first
    assert [m["role"] for m in second["x2"]] == ["system", "user"], second["x2"]
    assert (second["y1"], second["y2"]) == ("the nile", "THE NILE")


def test_top_level_system_field_becomes_the_first_turn(tmp_path):
    """LLaMA-Factory's sharegpt "system" field opens every prompt of the record ("" means none); a system prompt
    given both ways is an error."""
    conv = [{"from": "human", "value": "A?"}, {"from": "human", "value": "B?"}]
    path = write(tmp_path, "s.jsonl", [
        {"conversations": conv, "chosen": "a", "rejected": "b", "system": "Be brief."},
        {"conversations": conv, "chosen": "a", "rejected": "b", "system": ""}])
    first, second = list(D.read_iopo(path))
    system = {"role": "system", "content": "Be brief."}
    assert first["x1"] == [system, {"role": "user", "content": "A?"}] and first["x2"][0] == system, first
    assert "system" not in first and second["x1"] == [{"role": "user", "content": "A?"}], second
    (dpo,) = list(D.read_dpo(write(tmp_path, "d.jsonl", [{"prompt": "Hi", "chosen": "a", "rejected": "b",
                                                          "system": "Be brief."}])))
    assert dpo["prompt"] == [system, {"role": "user", "content": "Hi"}], dpo
    twice = {"messages": [system, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
             "system": "Be kind."}
    with pytest.raises(D.DataError, match=r"s2.jsonl:1: the system prompt is given twice"):
        list(D.read_sft(write(tmp_path, "s2.jsonl", [twice])))


def test_system_field_in_every_layout_opens_every_prompt(tmp_path):
    """The top-level "system" string opens SFT's prompt/response prompt and both prompts of our x1/x2 IOPO layout."""
    system = {"role": "system", "content": "Be brief."}
    (sft,) = list(D.read_sft(write(tmp_path, "s.jsonl", [{"prompt": "Hi", "response": "Yo", "system": "Be brief."}])))
    assert sft == {"messages": [system, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}, sft
    (quad,) = list(D.read_iopo(write(tmp_path, "q.jsonl", [{**GOOD["iopo"], "system": "Be brief."}])))
    assert quad["x1"] == [system, {"role": "user", "content": "A"}], quad["x1"]
    assert quad["x2"] == [system, {"role": "user", "content": "B"}], quad["x2"]


def test_read_dpo_sharegpt_layout(tmp_path):
    """DPO in sharegpt spelling: "conversations" is the prompt (its key not kept as an extra), gpt messages are the
    answers, and "system" opens the prompt."""
    rec = {"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "Hello!"},
           "rejected": {"from": "gpt", "value": "Go away."}, "system": "Be brief.", "id": 3}
    (ex,) = list(D.read_dpo(write(tmp_path, "d.jsonl", [rec])))
    want = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "chosen": "Hello!", "rejected": "Go away.", "id": 3}
    assert ex == want, ex


def test_read_trace_fixture():
    """TRACE items keep every field, including trace_gen's checks and reference."""
    a, b = list(D.read_trace(FIXTURES / "trace_items.jsonl"))
    assert a["id"] == "7" and a["constraints_num"] == 1 and a["type"] == "trace", a
    assert b["checks"] == [{"type": "lowercase"}] and b["reference"].startswith("- the nile"), b
    assert b["messages"] == [{"role": "user", "content": "Name two rivers\n1. Answer in lowercase;\n2. Use a list;\n"}]


GOOD = {"sft": {"prompt": "Hi", "response": "Yo"}, "dpo": {"prompt": "Hi", "chosen": "Yo", "rejected": "No"},
        "iopo": {"x1": "A", "y1": "a", "x2": "B", "y2": "b"}}
BAD_LINES = [
    ("iopo", '{"x1": "A", "y1": "a", "x2": "B"', "not valid JSON (Expecting ',' delimiter at column 33)"),
    ("iopo", {"x1": "A", "y1": "a", "x2": "B"}, '"y2" is missing'),
    ("dpo", {"prompt": [{"role": "system", "content": "Be brief."}], "chosen": "Yo", "rejected": "No"},
     '"prompt" should end with a user turn, ends with a system turn'),
    ("dpo", {"prompt": "Hi", "chosen": " ", "rejected": "No"}, '"chosen" is empty'),
    ("dpo", {"prompt": 3, "chosen": "Yo", "rejected": "No"}, '"prompt" should be a string or a list of messages, got int'),
    ("dpo", {"prompt": "Hi", "chosen": "Yo", "rejected": 7}, '"rejected" should be a string, got int'),
    ("sft", {"messages": [{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
     '"messages"[0]["role"] is "robot"; expected one of system, user, assistant'),
    ("sft", {"messages": [{"role": "user", "content": "Hi"}]}, '"messages" should end with an assistant turn'),
    ("sft", {"messages": [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Yo"}]},
     '"messages": the turn before the last assistant turn should be a user turn, is a system turn'),
    ("sft", {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                          {"role": "assistant", "content": "Yo"}]},
     '"messages": the turn before the last assistant turn should be a user turn, is an assistant turn'),
    ("sft", {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
     '"messages"[1]["content"] is empty'),
    ("sft", {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant"}]},
     '"messages"[1]["content"] is missing'),
    ("dpo", {"prompt": "Hi", "chosen": [{"role": "user", "content": "Yo"}], "rejected": "No"},
     '"chosen"[0] should be an assistant message, is a user message'),
    ("dpo", {"prompt": "Hi", "chosen": [{"role": "assistant", "content": "Yo"},
                                     {"role": "assistant", "content": "Hey"}],
             "rejected": "No"}, '"chosen" should hold one assistant message, holds 2'),
    ("sft", {"text": "Hi"}, 'expected "messages", or "prompt" and "response"'),
    ("sft", ["Hi"], "expected a JSON object, got list"),
    ("iopo", {"conversations": [{"from": "human", "value": "A"}], "chosen": "a", "rejected": "b"},
     '"conversations" should hold two human turns (x1 and x2), holds user'),
    ("iopo", {"conversations": [{"from": "human", "value": "A"}, {"from": "human", "value": "B"},
                                {"from": "human", "value": "C"}], "chosen": "a", "rejected": "b"},
     '"conversations" should hold two human turns (x1 and x2), holds user, user, user'),
    ("iopo", {"conversations": [{"from": "human", "value": "A"}, {"from": "gpt", "value": "B"}], "chosen": "a",
              "rejected": "b"}, '"conversations" should hold two human turns (x1 and x2), holds user, assistant'),
    ("iopo", {"conversations": [{"from": "bot", "value": "A"}], "chosen": "a", "rejected": "b"},
     '"conversations"[0]["from"] is "bot"; expected one of human, gpt, system, user, assistant'),
    ("iopo", {"conversations": [{"from": ["human"], "value": "A"}], "chosen": "a", "rejected": "b"},
     '"conversations"[0]["from"] is ["human"]; expected one of human, gpt, system, user, assistant'),
    ("sft", '{"prompt": "Hi", "response": "\\ud800"}', '"response" is not valid Unicode text (surrogates not allowed'),
    ("sft", '{"prompt": "Hi", "response": "Yo", "n": ' + "9" * 5000 + "}", "not valid JSON (Exceeds the limit"),
]


@pytest.mark.parametrize("kind,bad,message", BAD_LINES)
def test_error_names_file_line_and_problem(tmp_path, kind, bad, message):
    """A bad record on line 2 raises DataError 'file:2: problem'."""
    path = write(tmp_path, "data.jsonl", [GOOD[kind], bad])
    with pytest.raises(D.DataError) as err:
        list(D.read_any(path, kind))
    assert str(err.value).startswith(f"{path}:2: {message}"), str(err.value)


def test_trace_errors(tmp_path):
    """TRACE: a constraint count that disagrees with its lists and a non-string input are errors."""
    good = json.loads((FIXTURES / "trace_items.jsonl").read_text().splitlines()[0])
    path = write(tmp_path, "t.jsonl", [good, {**good, "constraints_num": 2}, {**good, "input": None}])
    stats = D.ReadStats()
    assert len(list(D.read_trace(path, skip_bad=True, stats=stats))) == 1
    assert stats.errors == [f'{path}:2: "constraints_splits" has 1 entries but "constraints_num" is 2',
                            f'{path}:3: "input" should be a string, got null'], stats.errors


def test_skip_bad_counts_lines(tmp_path):
    """skip_bad=True keeps the good records and counts the bad ones with their messages."""
    lines = [GOOD["dpo"], "{oops", GOOD["dpo"], {"prompt": "Hi"}, GOOD["dpo"]]
    path = write(tmp_path, "d.jsonl", lines)
    stats = D.ReadStats()
    kept = list(D.read_dpo(path, skip_bad=True, stats=stats))
    assert (len(kept), stats.kept, stats.skipped) == (3, 3, 2), (len(kept), stats)
    assert stats.errors[0].startswith(f"{path}:2: not valid JSON") and stats.errors[1] == f'{path}:4: "chosen" is missing'


def test_skip_bad_keeps_five_messages_and_counts_all(tmp_path):
    """With seven bad lines, every one is counted as skipped but only the first five messages are kept."""
    path = write(tmp_path, "d.jsonl", [GOOD["dpo"]] + [{"prompt": "Hi"}] * 7 + [GOOD["dpo"]])
    stats = D.ReadStats()
    kept = list(D.read_dpo(path, skip_bad=True, stats=stats))
    assert (len(kept), stats.kept, stats.skipped) == (2, 2, 7), (len(kept), stats)
    assert stats.errors == [f'{path}:{n}: "chosen" is missing' for n in range(2, 7)], stats.errors


def test_read_any_without_kind_sniffs_past_a_bad_line(tmp_path):
    """read_any(kind=None, skip_bad=True) tells the format from the first good record and counts the bad first line."""
    path = write(tmp_path, "d.jsonl", ['{"prompt": 1', GOOD["dpo"]])
    stats = D.ReadStats()
    got = list(D.read_any(path, skip_bad=True, stats=stats))
    assert got == [{"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Yo", "rejected": "No"}], got
    assert (stats.kept, stats.skipped) == (1, 1), stats


def test_record_file_offsets_skip_blank_and_crlf_lines(tmp_path):
    """RecordFile reads each record back from its byte offset, after blank lines, CRLF endings and non-ASCII text."""
    rows = [{"prompt": f"Frage {i} über Flüsse?", "chosen": "Ja." * (i + 1), "rejected": "Nein."} for i in range(4)]
    path = tmp_path / "d.jsonl"
    text = "\r\n" + json.dumps(rows[0], ensure_ascii=False) + "\r\n\n  \n" + json.dumps(rows[1]) + "\n\n"
    text += json.dumps(rows[2], ensure_ascii=False) + "\r\n" + json.dumps(rows[3])  # no newline at the end
    path.write_bytes(text.encode("utf-8"))
    rf = D.RecordFile(path, "dpo")
    want = list(D.read_dpo(path))
    assert len(rf) == 4 and [rf[i] for i in range(4)] == want, [rf[i]["chosen"] for i in range(len(rf))]
    assert [rf.where(i) for i in range(4)] == [f"{path}:{n}" for n in (2, 5, 7, 8)], [rf.where(i) for i in range(4)]


def test_json_array_error_has_line(tmp_path):
    """In a JSON array file an element's error names the line the element starts on."""
    items = json.loads((FIXTURES / "iopo_sharegpt.json").read_text())
    del items[1]["rejected"]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(items, indent=1))
    start = path.read_text().splitlines().index(" {", 2) + 1  # second element's opening brace
    with pytest.raises(D.DataError, match=rf'a.json:{start}: "rejected" is missing'):
        list(D.read_iopo(path))


def test_broken_json_array_is_fatal_even_when_skipping(tmp_path):
    """A syntax error inside a JSON array stops the read even with skip_bad (the rest cannot be found)."""
    path = tmp_path / "a.json"
    path.write_text('[\n{"x1": "A", "y1": "a", "x2": "B", "y2": "b"},\n{"x1": "A" "y1"}\n]')
    with pytest.raises(D.DataError, match=r"a.json:3: not valid JSON .*the rest of the array cannot be read"):
        list(D.read_iopo(path, skip_bad=True))
    good = '{"x1": "A", "y1": "a", "x2": "B", "y2": "b"}'
    for text, message in ((f"[{good}]\n[{good}]", r"a.json:1: not valid JSON \(more text after the array's closing"),
                          (f"[{good}\n{good}]", r"a.json:2: not valid JSON \(expected , or \] after an element")):
        path.write_text(text)  # two arrays concatenated; a missing comma
        with pytest.raises(D.DataError, match=message):
            list(D.read_iopo(path, skip_bad=True))
    path.write_text(f"[{good},\n{good},]")  # a trailing comma is let through
    assert len(list(D.read_iopo(path))) == 2
    path.write_text(f"[{good},\n{good}\n")  # a file cut short: its records are not taken as the whole file
    with pytest.raises(D.DataError, match=r"a.json:3: not valid JSON \(the array is not closed with \]\)"):
        list(D.read_iopo(path, skip_bad=True))


def test_byte_order_mark_and_folders(tmp_path):
    """A JSON array file that starts with a UTF-8 byte order mark reads; a folder given as data is refused."""
    items = json.loads((FIXTURES / "iopo_sharegpt.json").read_text())
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(items).encode())
    assert len(list(D.read_iopo(path))) == len(items)
    with pytest.raises(D.DataError, match=f"{tmp_path}: not a file"):
        list(D.read_iopo(tmp_path))


def test_json_array_after_many_blank_lines(tmp_path):
    """A JSON array whose "[" follows more than 64 bytes of blank lines is still read as an array."""
    good = '{"x1": "A", "y1": "a", "x2": "B", "y2": "b"}'
    path = tmp_path / "a.json"
    path.write_text("\n" * 100 + f"[{good},\n{good}]")
    assert D.sniff_kind(path) == "iopo"
    assert [line for line, _, _ in D._raw_records(path)] == [101, 102]


def test_sniff_kind(tmp_path):
    """The format is told from the first record's keys."""
    for kind, rec in GOOD.items():
        assert D.sniff_kind(write(tmp_path, f"{kind}.jsonl", [rec])) == kind
    assert D.sniff_kind(write(tmp_path, "half.jsonl", [{"prompt": "Hi", "chosen": "Yo"}])) == "dpo"
    assert D.sniff_kind(FIXTURES / "iopo_sharegpt.json") == "iopo"
    multi_turn = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"},
                                    {"from": "human", "value": "And?"}], "chosen": "a", "rejected": "b"}
    assert D.sniff_kind(write(tmp_path, "mt.jsonl", [multi_turn])) == "dpo", "a DPO conversation, not x1 and x2"
    assert D.sniff_kind(FIXTURES / "trace_items.jsonl") == "trace"
    with pytest.raises(D.DataError, match="cannot tell the format"):
        D.sniff_kind(write(tmp_path, "x.jsonl", [{"foo": 1}]))
    with pytest.raises(D.DataError, match=r"n.jsonl:2: expected a JSON object, got int"):
        D.sniff_kind(write(tmp_path, "n.jsonl", ["", "42"]))


# -----------------------------------------------------------------------------
# Encoding, masks, truncation

def test_encode_masks_prompt_and_matches_full_render(tok):
    """Prompt ids get -100; response + <|im_end|> are scored; ids equal the whole conversation's prefix."""
    prompt = [{"role": "user", "content": "Write exactly three sentences."}]
    seq = D.encode(tok, prompt, "The river flows north.")
    p = tok.apply_chat_template(prompt, add_generation_prompt=True)
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "The river flows north."}],
                                   add_generation_prompt=False)
    n = len(seq["input_ids"])
    assert seq["input_ids"] == full[:n], (seq["input_ids"], full)
    assert seq["labels"][:len(p)] == [-100] * len(p), seq["labels"]
    assert seq["labels"][len(p):] == seq["input_ids"][len(p):] and seq["input_ids"][-1] == tok.end_of_turn_id
    assert tok.decode(seq["input_ids"][len(p):], skip_special_tokens=False) == "The river flows north.<|im_end|>"


def test_seam_merge_is_counted_and_tokenized_apart(tok):
    """A response starting with '\\n' merges with the header's '\\n' when tokenized whole; we keep them apart."""
    prompt = [{"role": "user", "content": "Hi"}]
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "\nIt is cold."}], add_generation_prompt=False)
    p = tok.apply_chat_template(prompt, add_generation_prompt=True)
    assert full[:len(p)] != p, "the toy tokenizer should merge '\\n\\n' across the seam for this test to mean anything"
    stats = D.EncodeStats()
    seq = D.encode(tok, prompt, "\nIt is cold.", stats=stats)
    assert seq["input_ids"][:len(p)] == p and seq["input_ids"][len(p):] == tok.encode("\nIt is cold.") + [tok.end_of_turn_id]
    assert stats.boundary_merges == 1, stats


class Trimming:
    """The toy tokenizer with a template that trims every turn's text, as Llama 3's does."""

    def __init__(self, tok):
        self.tok = tok

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def render_chat(self, messages, add_generation_prompt=True):
        return self.tok.render_chat([{**m, "content": m["content"].strip()} for m in messages], add_generation_prompt)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return self.tok.encode(self.render_chat(messages, add_generation_prompt))


def test_response_is_taken_as_the_template_writes_it(tok):
    """A template that trims the answer (Llama 3) gets the trimmed text scored, not the raw one."""
    seq = D.encode(Trimming(tok), [{"role": "user", "content": "Hi "}], " Cold. \n")
    scored = [i for i, label in zip(seq["input_ids"], seq["labels"]) if label != -100]
    assert tok.decode(scored, skip_special_tokens=False) == "Cold.<|im_end|>", tok.decode(scored, skip_special_tokens=False)


def test_template_that_changes_the_prompt_is_an_error(tok):
    """A template that renders the prompt differently once an answer follows cannot be split: DataError."""
    class Thinking(Trimming):
        def render_chat(self, messages, add_generation_prompt=True):
            text = self.tok.render_chat(messages, add_generation_prompt)
            return text if add_generation_prompt else text.replace("user", "USER")

    with pytest.raises(D.DataError, match="renders the prompt differently once an answer follows"):
        D.encode(Thinking(tok), [{"role": "user", "content": "Hi"}], "Cold.")


def test_iopo_masks_on_all_four_sequences(tok):
    """Each of the four sequences is its prompt (masked) then its response + <|im_end|> (scored)."""
    ex = {"x1": [{"role": "user", "content": "Answer in lowercase."}], "y1": "the nile",
          "x2": [{"role": "user", "content": "Answer in uppercase letters only, please."}], "y2": "THE NILE"}
    seqs = D.encode_iopo(tok, ex)
    assert list(seqs) == ["y1_x1", "y2_x1", "y2_x2", "y1_x2"]
    for key, seq in seqs.items():
        y, x = key.split("_")
        p, r = D.prompt_ids(tok, ex[x]), tok.encode(ex[y]) + [tok.end_of_turn_id]
        assert seq["input_ids"] == p + r, key
        assert seq["labels"] == [-100] * len(p) + r, (key, seq["labels"])


@pytest.mark.parametrize("source,target,cutoff,expected", [
    (10, 30, 100, (10, 30)),     # fits: nothing cut
    (90, 30, 100, (70, 30)),     # response under half the budget: prompt cut
    (30, 90, 100, (30, 70)),     # prompt under half: response cut
    (300, 100, 100, (75, 25)),   # both over half: floor(100 * 100/400) = 25 for the response
    (60, 50, 100, (55, 45)),     # floor(100 * 50/110) = 45
    (50, 90, 100, (36, 64)),     # a prompt of exactly half is not under half: floor(100 * 90/140) = 64
    (60, 70, 100, (47, 53)),     # floor(100 * 70/130) = floor(53.8) = 53: floored, not rounded
])
def test_infer_seqlen_hand_cases(source, target, cutoff, expected):
    """infer_seqlen follows LLaMA-Factory's three cases."""
    assert D.infer_seqlen(source, target, cutoff) == expected


def test_dpo_truncation_cuts_both_to_equal_lengths():
    """DPO: prompt 100, chosen 60, rejected 30 ids, max_len 128: target 60 kept, both prompts cut to 68."""
    ex = {"prompt": [{"role": "user", "content": "a" * 81}], "chosen": "b" * 59, "rejected": "c" * 29}
    stats = D.EncodeStats()
    out = D.encode_dpo(CharTok(), ex, max_len=128, stats=stats)
    lengths = [(s["labels"].count(-100), len(s["input_ids"])) for s in (out["w"], out["l"])]
    assert lengths == [(68, 128), (68, 98)], lengths
    assert out["w"]["input_ids"][67] == ord("a") + 10, "the prompt keeps its head"
    assert stats.truncated == 1 and stats.examples == 1, stats
    D.encode_dpo(CharTok(), ex, max_len=190, stats=stats)
    assert stats.truncated == 1, "160 ids fit in 190: no cut"
    D.encode_dpo(CharTok(), ex, max_len=160, stats=stats)
    assert stats.truncated == 1, f"160 ids fit in exactly 160: no cut, but {stats.truncated - 1} counted"


def test_iopo_truncation_cuts_both_prompts_and_both_responses():
    """IOPO: prompts 100/90, responses 40/70 ids, max_len 100 -> prompts 59, responses up to 41 (hand count)."""
    ex = {"x1": [{"role": "user", "content": "a" * 81}], "x2": [{"role": "user", "content": "d" * 71}],
          "y1": "b" * 39, "y2": "c" * 69}
    stats = D.EncodeStats()
    out = D.encode_iopo(CharTok(), ex, max_len=100, stats=stats)
    got = {k: (s["labels"].count(-100), len(s["input_ids"]) - s["labels"].count(-100)) for k, s in out.items()}
    assert got == {"y1_x1": (59, 40), "y2_x1": (59, 41), "y2_x2": (59, 41), "y1_x2": (59, 40)}, got
    assert (stats.truncated, stats.cut_ties) == (1, 0), f"cut prompts still differ, so no tie: {stats}"
    assert out["y1_x1"]["input_ids"][-1] == CharTok.end_of_turn_id and out["y2_x1"]["input_ids"][-1] != 2


def test_encode_stats_count_every_sequence_of_a_pair(tok):
    """EncodeStats sums scored and masked tokens over both answers of a DPO pair (CharTok: prompt 5 + 19 ids,
    answers 2 + 1 and 1 + 1 ids), and counts a seam merge in the rejected answer as well as in the chosen one."""
    stats = D.EncodeStats()
    ex = {"prompt": [{"role": "user", "content": "aaaaa"}], "chosen": "bb", "rejected": "c"}
    D.encode_dpo(CharTok(), ex, stats=stats)
    assert (stats.scored_tokens, stats.masked_tokens) == (3 + 2, 24 + 24), stats
    merged = D.EncodeStats()
    D.encode_dpo(tok, {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "It is cold.",
                       "rejected": "\nIt is cold."}, stats=merged)
    assert merged.boundary_merges == 1, f"the rejected answer starts with '\\n' and merges: {merged}"


def test_truncation_that_makes_sequences_equal_is_counted():
    """Prompts that differ only in their last characters become equal once their heads are kept: counted."""
    ex = {"x1": [{"role": "user", "content": "a" * 81 + "X"}], "x2": [{"role": "user", "content": "a" * 81 + "Y"}],
          "y1": "b" * 39, "y2": "c" * 39}
    stats = D.EncodeStats()
    out = D.encode_iopo(CharTok(), ex, max_len=100, stats=stats)
    assert out["y1_x1"]["input_ids"] == out["y1_x2"]["input_ids"], "the cut should have removed the difference"
    assert (stats.truncated, stats.cut_ties) == (1, 1) and "1 of them now compare equal" in str(stats), stats
    D.encode_iopo(CharTok(), ex, max_len=200, stats=stats)
    assert (stats.truncated, stats.cut_ties) == (1, 1), stats


# -----------------------------------------------------------------------------
# Collation and batching

def seq(prompt, response):
    return {"input_ids": prompt + response, "labels": [-100] * len(prompt) + response}


def test_collate_worked_example_from_docstring():
    """collate_sft gives exactly the two-row batch written in its docstring."""
    b = D.collate_sft([seq([5, 6], [7, 2]), seq([5], [9, 2])], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 2, 0, 0, 0, 0], [5, 9, 2, 0, 0, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, -100, 7, 2, -100, -100, -100, -100], [-100, 9, 2, -100, -100, -100, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
    assert all(t.dtype == torch.long for t in b.values())


def test_collate_pads_to_multiple_of_8_and_stacks_blocks():
    """Widths round up to 8; DPO stacks [w; l] and IOPO stacks the four blocks in IOPO_ORDER."""
    assert D.collate_sft([seq([1] * 5, [2] * 11)], 0)["input_ids"].shape == (1, 16)
    assert D.collate_sft([seq([1] * 4, [2] * 4)], 0)["input_ids"].shape == (1, 8)
    dpo = [{"w": seq([b], [10 + b]), "l": seq([b], [20 + b])} for b in range(3)]
    d = D.collate_dpo(dpo, pad_id=0)
    assert d["input_ids"].shape == (6, 8) and d["input_ids"][:, 1].tolist() == [10, 11, 12, 20, 21, 22], d["input_ids"]
    iopo = [{k: seq([b], [100 * i + b]) for i, k in enumerate(D.IOPO_ORDER)} for b in range(2)]
    q = D.collate_iopo(iopo, pad_id=0)
    assert q["labels"][:, 1].view(4, 2).tolist() == [[0, 1], [100, 101], [200, 201], [300, 301]], q["labels"]


def test_batch_sampler_seeded_and_reshuffled_per_epoch():
    """Same seed gives the same order; each epoch covers every index once in a new order."""
    a, b, c = (D.BatchSampler(23, 4, seed=s) for s in (7, 7, 8))
    e0a, e0b, e0c = list(a), list(b), list(c)
    assert e0a == e0b and e0a != e0c
    assert sorted(i for batch in e0a for i in batch) == list(range(23)) and len(e0a) == len(a) == 6
    e1 = list(a)
    assert e1 != e0a and sorted(sum(e1, [])) == list(range(23)) and a.epoch == 2


def test_batch_sampler_resume_mid_epoch_and_at_epoch_end():
    """A sampler restored from state_dict continues with exactly the batches the original would give."""
    ref = D.BatchSampler(20, 3, seed=1)
    want = list(ref) + list(ref)
    run = D.BatchSampler(20, 3, seed=1)
    got = []
    it = iter(run)
    for _ in range(3):
        got.append(next(it))
    state = json.loads(json.dumps(run.state_dict()))  # it must survive a JSON round trip
    resumed = D.BatchSampler(20, 3, seed=1)
    resumed.load_state_dict(state)
    got += list(resumed) + list(resumed)
    assert got == want, (len(got), len(want))
    for _ in range(4):  # hand out the rest of epoch 0 without asking for more
        next(it)
    at_end = D.BatchSampler(20, 3, seed=1)
    at_end.load_state_dict(run.state_dict())
    assert (at_end.epoch, at_end.position) == (0, 7)
    assert list(at_end) == [] and list(at_end) == want[7:], "epoch 0 is spent; the next pass is epoch 1"
    with pytest.raises(ValueError, match="seed=1"):
        D.BatchSampler(20, 3, seed=2).load_state_dict(state)


def test_drop_last_drops_the_short_batch():
    """drop_last: 10 examples in batches of 3 give three full batches (the lone tenth is left out), as len() says."""
    sampler = D.BatchSampler(10, 3, seed=0, drop_last=True)
    sizes = [len(b) for b in sampler]
    assert sizes == [3, 3, 3] and len(sampler) == 3, (sizes, len(sampler))
    whole = D.BatchSampler(9, 3, seed=0, drop_last=True)
    sizes = [len(b) for b in whole]
    assert sizes == [3, 3, 3] and len(whole) == 3, f"9 in batches of 3 leave no short batch to drop: {sizes}"


def test_holdout_split_draws_with_its_seed():
    """holdout_split holds out a seeded random draw (not the first n): seeds 0 and 1 give other examples, the rest
    keep their order."""
    held = {seed: D.holdout_split(list(range(40)), 5, seed=seed)[1] for seed in (0, 1)}
    assert held[0] != held[1] and held[0] != list(range(5)), held
    train, again = D.holdout_split(list(range(40)), 5, seed=0)
    assert again == held[0] and train == sorted(set(range(40)) - set(again)), (train, again)


def test_group_by_length_cuts_padding():
    """Grouping by length yields fewer padded positions than a plain shuffle, and covers every index."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 500, (400,), generator=g).tolist()
    def padded(sampler):
        return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in sampler)
    plain = padded(D.BatchSampler(400, 8, seed=3))
    grouped_sampler = D.BatchSampler(400, 8, seed=3, lengths=lengths, group_by_length=True)
    order = grouped_sampler.epoch_batches(0)
    grouped = padded(order)
    assert sorted(sum(order, [])) == list(range(400))
    assert grouped * 5 < plain, (grouped, plain)
    longest = [max(lengths[i] for i in b) for b in order]  # one chunk of 400 here: sorted, then batches shuffled
    assert longest != sorted(longest, reverse=True), "batches should not run from longest to shortest"


# -----------------------------------------------------------------------------
# Datasets, tokenizer, real samples, command line

def test_encoded_dataset_is_lazy_and_caches(tmp_path, tok):
    """Nothing is tokenized until accessed; a second access comes from the cache; select and holdout share it."""
    rows = [{"prompt": f"Question {i}?", "chosen": "Yes." * (i + 1), "rejected": "No."} for i in range(6)]
    path = write(tmp_path, "d.jsonl", rows)
    ds = D.EncodedDataset(D.RecordFile(path, "dpo"), "dpo", tok)
    assert len(ds) == 6 and ds.stats.examples == 0
    first = ds[2]
    assert first == D.encode_dpo(tok, next(x for i, x in enumerate(D.read_dpo(path)) if i == 2))
    assert ds[2] == first and ds.stats.examples == 1, ds.stats
    train, held = D.holdout_split(ds, 2, seed=0)
    assert len(train) == 4 and len(held) == 2 and sorted(train.indices + held.indices) == list(range(6))
    assert ds.select(range(3)).indices == [0, 1, 2] and ds.lengths()[5] > ds.lengths()[0]
    assert ds.scan().examples == 6


def test_select_of_a_selection_keeps_its_examples(tok):
    """Selecting from a view (as holdout_split of a train split does) indexes the view, not the whole dataset."""
    examples = [{"prompt": [{"role": "user", "content": f"Question {i}?"}], "chosen": "Yes.", "rejected": "No."}
                for i in range(6)]
    ds = D.EncodedDataset(examples, "dpo", tok)
    view = ds.select([3, 4, 5]).select([0, 2])
    assert view.indices == [3, 5] and view[1] == ds[5], f"positions 0 and 2 of [3, 4, 5] gave {view.indices}"


def test_rough_lengths_take_the_longer_prompt_and_answer(tmp_path):
    """lengths() for grouping counts the longer of the two prompts and of the two answers: here the second ones."""
    dpo = {"prompt": "Hi", "chosen": "Yo", "rejected": "No way, never."}  # 2 + max(2, 14)
    iopo = {"x1": "A", "y1": "a", "x2": "Longer B?", "y2": "bbbbbb", "system": "Sys"}  # 3 + max(1, 9) + max(1, 6)
    for kind, rec, want in (("dpo", dpo, 16), ("iopo", iopo, 18)):
        rf = D.RecordFile(write(tmp_path, f"{kind}.jsonl", [rec]), kind)
        got = (list(rf.char_lengths), D.EncodedDataset([rf[0]], kind, None).lengths())
        assert got == ([want], [want]), f"{kind}: RecordFile and list lengths {got}, expected {want}"


def test_a_selection_counts_into_the_parent_stats(tok):
    """Encoding through a selected view (a holdout split) adds to the parent dataset's counters."""
    examples = [{"prompt": [{"role": "user", "content": f"Question {i}?"}], "chosen": "Yes.", "rejected": "No."}
                for i in range(4)]
    ds = D.EncodedDataset(examples, "dpo", tok)
    train, held = D.holdout_split(ds, 1, seed=0)
    train.scan()
    assert (ds.stats.examples, train.stats.examples) == (3, 3), (ds.stats, train.stats)
    assert held.scan().examples == 4 and ds.stats.examples == 4, ds.stats


def test_dataset_error_names_the_line(tmp_path, tok):
    """An encoding error inside the dataset names the file and line of the record."""
    class NoEndOfTurn(Trimming):
        def render_chat(self, messages, add_generation_prompt=True):
            return self.tok.render_chat(messages, add_generation_prompt).replace("<|im_end|>", "")

    path = write(tmp_path, "s.jsonl", [GOOD["sft"], GOOD["sft"]])
    ds = D.EncodedDataset(D.RecordFile(path, "sft"), "sft", NoEndOfTurn(tok))
    with pytest.raises(D.DataError, match=r"s.jsonl:2: the chat template"):
        ds[1]


def test_special_token_text_is_counted(tmp_path, tok):
    """A message that spells a special token ("<|im_end|>" inside an answer) is encoded as that token, as
    transformers would, and counted, so that training and `python data.py` can report it."""
    path = write(tmp_path, "s.jsonl", [GOOD["sft"], {"prompt": "Hi", "response": "x<|im_end|>y"}])
    ds = D.EncodedDataset(D.RecordFile(path, "sft"), "sft", tok)
    assert "<|im_end|>" in tok.special_tokens, tok.special_tokens
    stats = ds.scan()
    assert (stats.examples, stats.special_text) == (2, 1), stats
    scored = [i for i, label in zip(ds[1]["input_ids"], ds[1]["labels"]) if label != -100]
    assert tok.decode(scored, skip_special_tokens=False) == "x<|im_end|>y<|im_end|>", "the whole answer is scored"


def test_ties_are_kept_and_counted(tmp_path):
    """DPO pairs with equal answers and IOPO quadruples with equal prompts or answers are read, and counted with
    the line of the first (their preference terms have no gradient)."""
    path = write(tmp_path, "d.jsonl", [GOOD["dpo"], {"prompt": "Hi", "chosen": "Yo", "rejected": "Yo"}])
    stats = D.ReadStats()
    assert len(list(D.read_dpo(path, stats=stats))) == 2
    assert (stats.ties, stats.first_tie) == (1, f"{path}:2") and "ties 1" in str(stats), stats
    quads = [GOOD["iopo"], {"x1": "A", "y1": "a", "x2": "A", "y2": "b"}, {"x1": "A", "y1": "a", "x2": "B", "y2": "a"}]
    stats = D.ReadStats()
    path = write(tmp_path, "q.jsonl", quads)
    assert len(list(D.read_iopo(path, stats=stats))) == 3
    assert (stats.ties, stats.first_tie) == (2, f"{path}:2"), f"the first of two ties is on line 2: {stats}"


def test_tokenizer_round_trips_text_and_specials(tok_dir, tok):
    """The toy tokenizer decodes what it encodes, and ChatML specials are single ids 0, 1, 2."""
    for text in ["The river flows north.\n\nIt is cold.", "标题长度控制在10至15个字之间；", "tabs\tand  spaces 🙂"]:
        assert tok.decode(tok.encode(text)) == text, text
    assert tok.encode("<|endoftext|><|im_start|><|im_end|>") == [0, 1, 2]
    assert tok.end_of_turn_id == 2 and tok.pad_token_id == 0
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (None, "<|im_end|>", "<|endoftext|>")
    assert config["chat_template"] == D.CHATML_TEMPLATE and len(tok) == 400
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_real_samples():
    """The released IOPO example and the TRACE sample read and encode (skipped without ../shared/data)."""
    if not SHARED.is_dir():
        pytest.skip("../shared/data is absent")
    (ex,) = list(D.read_iopo(SHARED / "official_iopo_sample.json"))
    assert ex["y1"].startswith('"高考前夜') and ex["y2"].startswith('"高考征程'), ex
    assert "10至15" in ex["x1"][0]["content"] and "16至20" in ex["x2"][0]["content"]
    items = list(D.read_trace(SHARED / "trace_eval_sample.jsonl"))
    assert [it["id"] for it in items] == ["0", "1", "2", "431", "700", "1038", "1039", "1040", "1041"]
    assert D.sniff_kind(SHARED / "official_iopo_sample.json") == "iopo"
    seqs = D.encode_iopo(CharTok(), ex, max_len=120)
    assert all(len(s["input_ids"]) <= 120 for s in seqs.values())


def test_cli_prints_scored_tokens_and_counts():
    """python data.py FILE prints the four sequences with [[scored]] text and the counts."""
    out = io.StringIO()
    D.main([str(FIXTURES / "iopo_sharegpt.json"), "--index", "1", "--vocab-size", "300"], out=out)
    text = out.getvalue()
    assert "[[the nile<|im_end|>]]" in text and "[[THE NILE<|im_end|>]]" in text, text
    assert text.count("--- y") == 4 and "examples 2, tokens scored" in text and "bad lines skipped 0" in text, text
    assert "<|im_start|>user\nName a river.\n1. Answer in uppercase;\n<|im_end|>" in text, text


def test_cli_counts_cut_prompts_and_skips_a_bad_first_line(tmp_path):
    """TRACE items without a reference are prompts alone: cutting them is counted too. With --skip-bad a
    bad first line does not stop the format from being told from the next one."""
    out = io.StringIO()
    D.main([str(FIXTURES / "trace_items.jsonl"), "--max-len", "5", "--vocab-size", "300"], out=out)
    n = len((FIXTURES / "trace_items.jsonl").read_text().splitlines())
    assert f"examples {n}," in out.getvalue() and f"truncated examples {n} " in out.getvalue(), out.getvalue()
    path = write(tmp_path, "d.jsonl", ['{"prompt": 1', GOOD["dpo"]])
    out = io.StringIO()
    D.main([str(path), "--skip-bad", "--vocab-size", "300"], out=out)
    assert "examples 1, bad lines skipped 1" in out.getvalue(), out.getvalue()


def test_show_sequence_colours_scored_text(tok):
    """In a terminal the scored run is green and the masked run dim; otherwise [[ ]] marks the scored run."""
    seq = D.encode(tok, [{"role": "user", "content": "Hi"}], "Yes.")
    assert D.show_sequence(tok, seq).endswith("<|im_start|>assistant\n[[Yes.<|im_end|>]]")
    coloured = D.show_sequence(tok, seq, colour=True)
    assert coloured.startswith("\033[2m<|im_start|>user") and coloured.endswith("\033[1;32mYes.<|im_end|>\033[0m"), coloured


def test_batch_sampler_state_of_another_grouping_is_refused():
    """A sampler state saved with group_by_length cannot be loaded into a sampler without it (nor the reverse): the
    resumed order of batches would differ."""
    grouped = D.BatchSampler(20, 3, seed=1, lengths=list(range(20)), group_by_length=True)
    with pytest.raises(ValueError, match="group_by_length=True"):
        D.BatchSampler(20, 3, seed=1).load_state_dict(grouped.state_dict())
    with pytest.raises(ValueError, match="group_by_length=False"):
        grouped.load_state_dict(D.BatchSampler(20, 3, seed=1).state_dict())


def test_batch_sampler_resumes_in_a_later_epoch():
    """A state saved two batches into epoch 1 resumes with the rest of epoch 1, in epoch 1's own order (not epoch 0's
    from the same position)."""
    ref = D.BatchSampler(10, 3, seed=4)
    want = list(ref) + list(ref)  # epochs 0 and 1, 4 batches each
    assert want[:4] != want[4:], "the two epochs should have different orders"
    run = D.BatchSampler(10, 3, seed=4)
    list(run)
    it = iter(run)
    next(it), next(it)
    resumed = D.BatchSampler(10, 3, seed=4)
    resumed.load_state_dict(json.loads(json.dumps(run.state_dict())))
    got = list(resumed)
    assert got == want[6:], f"resumed with {got}, expected the rest of epoch 1 {want[6:]}"
