"""From JSONL files to token ids, loss masks and batches for SFT, DPO and IOPO.

Print one encoded example and the counts for a file (scored tokens in colour, or between [[ ]]):

    python data.py ../shared/data/official_iopo_sample.json            # trains a toy tokenizer on the file
    python data.py train.jsonl --model ~/models/Qwen2-7B-Instruct --max-len 6000

Formats read (one JSON object per line, or a JSON array of objects as LLaMA-Factory's sharegpt files):
  SFT    {"messages": [{"role", "content"}, ..., assistant]}  or  {"prompt": str|messages, "response": str}
  DPO    {"prompt": str|messages, "chosen": str, "rejected": str}  (TRL's layout)
  IOPO   {"x1", "y1", "x2", "y2"}, or the authors' sharegpt layout: "conversations" = two human turns
         x1 and x2, "chosen" = y1, "rejected" = y2 (the correct answer to x2)
  TRACE  evaluation items: id, messages, description, constraints, input, constraints_num,
         constraints_splits, levels2, category (SPEC section 3), plus "checks"/"reference" from trace_gen.
  Sharegpt spellings are read too: "conversations" for SFT's "messages" and DPO's "prompt", turns as
  {"from": "human"|"gpt"|"system", "value"}, and an answer as one assistant message (or TRL's list of one).
  SFT, DPO and IOPO records may carry a top-level "system" string (sharegpt's field): it opens every prompt.

What a sequence looks like (ChatML): the prompt is rendered as the tokenizer's chat template would render
it (model.Tokenizer.render_chat writes ChatML or Llama 3 by hand, no jinja) with the generation header, then
the assistant text and its end-of-turn token follow:

    <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n | Hello!<|im_end|>
    ---------------------- labels -100 ----------------------- | ------ scored ------

Follows: IOPO (arXiv 2411.06208) as released on LLaMA-Factory; DPO (arXiv 2305.18290) as TRL lays out data.
Simplifications and departures:
  1. Only the last assistant turn of a conversation is scored; earlier turns are part of the prompt.
  2. The scored response ends at the end-of-turn token; LLaMA-Factory's Qwen template also scores the
     newline that follows `<|im_end|>`, which generation never produces, so we leave it out.
  3. No packing of several examples into one row (only the two answers to one prompt share a row, with
     the trainer's --pack: collate_packed), no multimodal inputs, no tool calls.
  4. Kept but counted, as LLaMA-Factory keeps them silently: ties (DPO pairs with equal answers, IOPO
     quadruples with equal prompts or answers: ReadStats.ties; and those that truncation makes:
     EncodeStats.cut_ties) and text that spells a special token, which the tokenizer reads as that token
     (EncodeStats.special_text).
"""

import argparse
import json
import math
import random
import sys
import tempfile
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import torch

from model import load_tokenizer, write_atomic, write_json_atomic

IGNORE_INDEX = -100  # label of a token that is not scored (what torch's cross_entropy ignores by default)
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system",
                  "user": "user", "assistant": "assistant"}
KINDS = ("sft", "dpo", "iopo", "trace")

# ChatML exactly as Qwen2 renders it, minus Qwen2's default system prompt: a plain list of turns.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Our toy tokenizer puts its special tokens first, so their ids (0, 1, 2) do not move with the vocab size.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2's pre-tokenizer split (from its tokenizer.json): it keeps runs of newlines together, so a
# response that starts with "\n" merges with the "\n" that ends the generation header (see `seam_merges`).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


# -----------------------------------------------------------------------------
# Errors and counters

class DataError(ValueError):
    """Bad input data; the message names the file, and the line (`file:line: problem`) when one is known."""


@dataclass
class ReadStats:
    """What a reader saw: filled while it runs, complete once it is exhausted."""
    path: str = ""
    kept: int = 0
    skipped: int = 0
    errors: list = field(default_factory=list)  # the first few skip messages, to show the user
    ties: int = 0  # kept DPO pairs with equal answers, IOPO quadruples with equal prompts or answers
    first_tie: str = ""  # file:line of the first one

    def __str__(self):
        text = f"{self.path}: examples {self.kept}, bad lines skipped {self.skipped}"
        if self.ties:  # not errors: kept, but their preference terms compare a sequence with itself
            text += (f", ties {self.ties} (equal answers or prompts, e.g. {self.first_tie}: their preference "
                     f"terms have no gradient)")
        return text + "".join(f"\n  {e}" for e in self.errors)


@dataclass
class EncodeStats:
    """Counts over the examples encoded so far."""
    examples: int = 0
    truncated: int = 0         # examples cut to max_len
    cut_ties: int = 0          # truncated DPO / IOPO examples in which two sequences are equal after the cut
    special_text: int = 0      # examples whose text spells a special token (the tokenizer reads it as that token)
    boundary_merges: int = 0   # sequences whose prompt/response seam merges when tokenized whole
    scored_tokens: int = 0     # over every sequence of a pair or quadruple
    masked_tokens: int = 0

    def __str__(self):
        return (f"examples {self.examples}, tokens scored {self.scored_tokens}, masked {self.masked_tokens}, "
                f"truncated examples {self.truncated} ({self.cut_ties} of them now compare equal sequences), "
                f"seams that merge when tokenized whole {self.boundary_merges}, "
                f"examples whose text spells a special token {self.special_text}")


# -----------------------------------------------------------------------------
# Reading and validating records

class _Bad(Exception):
    """A problem in one record; the reader adds the file and line."""


class _Fatal(_Bad):
    """A problem after which the rest of the file cannot be read (broken JSON inside an array)."""


def _type_name(value):
    return "null" if value is None else {dict: "object", list: "list", str: "string"}.get(type(value), type(value).__name__)


def _label(path):
    """("messages", 0, "role") -> '"messages"[0]["role"]', how a problem names the field."""
    return f'"{path[0]}"' + "".join(f"[{p}]" if isinstance(p, int) else f'["{p}"]' for p in path[1:])


def _get(rec, key, path=()):
    if key not in rec:
        raise _Bad(f"{_label(path + (key,))} is missing")
    return rec[key]


def _text(value, path):
    if not isinstance(value, str):
        raise _Bad(f"{_label(path)} should be a string, got {_type_name(value)}")
    if not value.strip():
        raise _Bad(f"{_label(path)} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\ud800" escapes can spell lone surrogates
        raise _Bad(f"{_label(path)} is not valid Unicode text ({e.reason} at character {e.start})") from None
    return value


def _message(msg, path):
    """One turn as {"role", "content"}; the sharegpt spelling {"from": "human", "value"} is accepted."""
    if not isinstance(msg, dict):
        raise _Bad(f'{_label(path)} should be an object with "role" and "content", got {_type_name(msg)}')
    if "from" in msg and "role" not in msg:
        role = msg["from"]
        if not isinstance(role, str) or role not in SHAREGPT_ROLES:
            raise _Bad(f'{_label(path + ("from",))} is {json.dumps(role)}; expected one of {", ".join(SHAREGPT_ROLES)}')
        return {"role": SHAREGPT_ROLES[role], "content": _text(_get(msg, "value", path), path + ("value",))}
    role = _get(msg, "role", path)
    if not isinstance(role, str) or role not in ROLES:
        raise _Bad(f'{_label(path + ("role",))} is {json.dumps(role)}; expected one of {", ".join(ROLES)}')
    return {"role": role, "content": _text(_get(msg, "content", path), path + ("content",))}


def _messages(value, key):
    """A prompt as a list of turns; a plain string becomes one user turn."""
    if isinstance(value, str):
        return [{"role": "user", "content": _text(value, (key,))}]
    if not isinstance(value, list):
        raise _Bad(f'"{key}" should be a string or a list of messages, got {_type_name(value)}')
    if not value:
        raise _Bad(f'"{key}" is empty')
    return [_message(m, (key, i)) for i, m in enumerate(value)]


def _a(role):
    return f"an {role}" if role == "assistant" else f"a {role}"


def _prompt(value, key):
    msgs = _messages(value, key)
    if msgs[-1]["role"] != "user":
        raise _Bad(f'"{key}" should end with a user turn, ends with {_a(msgs[-1]["role"])} turn')
    return msgs


def _response(value, key):
    """An answer: a string, one assistant message, or a list holding one assistant message (TRL)."""
    path = (key,)
    if isinstance(value, list):
        if len(value) != 1:
            raise _Bad(f'"{key}" should hold one assistant message, holds {len(value)}')
        value, path = value[0], (key, 0)
    if isinstance(value, dict):
        msg = _message(value, path)
        if msg["role"] != "assistant":
            raise _Bad(f'{_label(path)} should be an assistant message, is a {msg["role"]} message')
        return msg["content"]
    return _text(value, path)


def _extras(rec, used):
    return {k: v for k, v in rec.items() if k not in used and k != "system"}


def _with_system(rec, msgs):
    """LLaMA-Factory's sharegpt layout keeps the system prompt in a top-level "system" field ("" for none):
    it becomes the first turn."""
    if rec.get("system") in (None, ""):
        return msgs
    if msgs[0]["role"] == "system":
        raise _Bad('the system prompt is given twice: in "system" and as the first turn')
    return [{"role": "system", "content": _text(rec["system"], ("system",))}] + msgs


def normalize_sft(rec):
    """{"messages": [..., assistant]} from either SFT layout."""
    if "messages" in rec or "conversations" in rec:
        key = "messages" if "messages" in rec else "conversations"
        msgs = _messages(rec[key], key)
        if msgs[-1]["role"] != "assistant":
            raise _Bad(f'"{key}" should end with an assistant turn, ends with a {msgs[-1]["role"]} turn')
        if len(msgs) < 2:
            raise _Bad(f'"{key}" needs a prompt turn before the assistant turn')
        if msgs[-2]["role"] != "user":  # as a DPO / IOPO prompt must: the answer replies to a user turn
            raise _Bad(f'"{key}": the turn before the last assistant turn should be a user turn, is '
                       f'{_a(msgs[-2]["role"])} turn')
        return {"messages": _with_system(rec, msgs), **_extras(rec, {key})}
    if "prompt" in rec or "response" in rec:
        prompt = _with_system(rec, _prompt(_get(rec, "prompt"), "prompt"))
        response = _response(_get(rec, "response"), "response")
        return {"messages": prompt + [{"role": "assistant", "content": response}],
                **_extras(rec, {"prompt", "response"})}
    raise _Bad('expected "messages", or "prompt" and "response" (SFT); found keys ' + ", ".join(rec))


def normalize_dpo(rec):
    """{"prompt": messages, "chosen": str, "rejected": str}; sharegpt's "conversations" names the prompt."""
    key = "conversations" if "conversations" in rec and "prompt" not in rec else "prompt"
    return {"prompt": _with_system(rec, _prompt(_get(rec, key), key)),
            "chosen": _response(_get(rec, "chosen"), "chosen"),
            "rejected": _response(_get(rec, "rejected"), "rejected"),
            **_extras(rec, {key, "chosen", "rejected"})}


def normalize_iopo(rec):
    """{"x1", "y1", "x2", "y2"} from our layout or the authors' sharegpt layout."""
    if "conversations" in rec:
        turns = _with_system(rec, _messages(rec["conversations"], "conversations"))
        system = turns[:1] if turns[0]["role"] == "system" else []
        asks = turns[len(system):]
        if len(asks) != 2 or any(t["role"] != "user" for t in asks):
            raise _Bad(f'"conversations" should hold two human turns (x1 and x2), holds '
                       f'{", ".join(t["role"] for t in asks)}')
        return {"x1": system + asks[:1], "y1": _response(_get(rec, "chosen"), "chosen"),
                "x2": system + asks[1:], "y2": _response(_get(rec, "rejected"), "rejected"),
                **_extras(rec, {"conversations", "chosen", "rejected"})}
    return {"x1": _with_system(rec, _prompt(_get(rec, "x1"), "x1")), "y1": _response(_get(rec, "y1"), "y1"),
            "x2": _with_system(rec, _prompt(_get(rec, "x2"), "x2")), "y2": _response(_get(rec, "y2"), "y2"),
            **_extras(rec, {"x1", "y1", "x2", "y2"})}


def _is_tie(kind, ex):
    """A DPO pair with equal answers, or an IOPO quadruple with equal prompts or answers: the preference terms
    that compare the two are zero whatever the weights (IOPO's full loss entirely). Kept, and counted."""
    if kind == "dpo":
        return ex["chosen"] == ex["rejected"]
    return kind == "iopo" and (ex["x1"] == ex["x2"] or ex["y1"] == ex["y2"])


def normalize_trace(rec):
    """A TRACE evaluation item, checked field by field; all keys are kept."""
    if not isinstance(_get(rec, "id"), (str, int)) or isinstance(rec["id"], bool):
        raise _Bad(f'"id" should be a string or an integer, got {_type_name(rec["id"])}')
    out = dict(rec)
    out["messages"] = _prompt(_get(rec, "messages"), "messages")
    for key in ("description", "constraints", "category"):
        _text(_get(rec, key), (key,))
    if not isinstance(_get(rec, "input"), str):  # "NULL" when the task has no input
        raise _Bad(f'"input" should be a string, got {_type_name(rec["input"])}')
    n = _get(rec, "constraints_num")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise _Bad(f'"constraints_num" should be a positive integer, got {json.dumps(n)}')
    for key in ("constraints_splits", "levels2"):
        items = _get(rec, key)
        if not isinstance(items, list):
            raise _Bad(f'"{key}" should be a list of strings, got {_type_name(items)}')
        for i, s in enumerate(items):
            _text(s, (key, i))
        if len(items) != n:
            raise _Bad(f'"{key}" has {len(items)} entries but "constraints_num" is {n}')
    if "reference" in rec:
        _text(rec["reference"], ("reference",))
    return out


NORMALIZERS = {"sft": normalize_sft, "dpo": normalize_dpo, "iopo": normalize_iopo, "trace": normalize_trace}


def _raw_records(path):
    """Yield (line, byte offset or None, parsed object or _Bad) for each record, streaming a JSONL file.

    A file whose first character is "[" is one JSON array (the sharegpt layout): it is parsed whole,
    element by element, so that each element still gets the line it starts on."""
    with open(path, "rb") as f:
        head = f.read(64).removeprefix(b"\xef\xbb\xbf").lstrip()  # a UTF-8 byte order mark may come first
        while not head and (chunk := f.read(64)):  # blank lines before the first character
            head = chunk.lstrip()
        f.seek(0)
        if head[:1] != b"[":
            yield from _jsonl_records(f)
            return
        try:
            text = f.read().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8 ({e})") from None
    yield from _array_records(text)


def _jsonl_records(f):
    """(line, byte offset, object or _Bad) for each non-blank line of an open binary JSONL file."""
    offset = 0
    for line, raw in enumerate(f, start=1):
        start, offset = offset, offset + len(raw)
        if not raw.strip():
            continue
        try:
            yield line, start, json.loads(raw.rstrip(b"\r\n"))  # so an error's column is on this line
        except ValueError as e:  # bad UTF-8, bad JSON, an integer of more than 4,300 digits
            where = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else e
            yield line, start, _Bad(f"not valid JSON ({where})")


def _array_records(text):
    """(line, None, object) for each element of the JSON array `text`, each with the line it starts on; a
    broken array ends with one _Fatal (nothing after the break can be trusted)."""
    decoder, pos = json.JSONDecoder(), text.index("[") + 1
    line, counted, after_element = 1, 0, False
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if after_element and text[pos:pos + 1] == ",":  # one comma after each element
            pos, after_element = pos + 1, False
            continue
        line, counted = line + text.count("\n", counted, pos), pos  # the line each element starts on
        if pos >= len(text):
            yield line, None, _Fatal("not valid JSON (the array is not closed with ])")
            return
        if text[pos] == "]":
            if text[pos + 1:].strip():  # a second array (two files concatenated) would be lost
                yield line, None, _Fatal("not valid JSON (more text after the array's closing ])")
            return
        if after_element:
            yield line, None, _Fatal("not valid JSON (expected , or ] after an element)")
            return
        after_element = True
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except ValueError as e:
            yield line, None, _Fatal(f"not valid JSON ({getattr(e, 'msg', e)}); the rest of the array cannot be read")
            return
        yield line, None, obj


def _parse(kind, raw):
    if isinstance(raw, _Bad):
        raise raw
    if not isinstance(raw, dict):
        raise _Bad(f"expected a JSON object, got {_type_name(raw)}")
    return NORMALIZERS[kind](raw)


def _read(path, kind, skip_bad, stats, with_position=False):
    if kind not in NORMALIZERS:
        raise ValueError(f"kind should be one of {', '.join(KINDS)}, got {kind!r}")
    stats = stats if stats is not None else ReadStats()
    stats.path = str(path)
    if not Path(path).is_file():  # records are read again by byte offset: a pipe or a folder will not do
        raise DataError(f"{path}: not a file" if Path(path).exists() else f"{path}: file not found")
    for line, offset, raw in _raw_records(path):
        try:
            ex = _parse(kind, raw)
        except _Bad as e:
            message = f"{path}:{line}: {e}"
            if not skip_bad or isinstance(e, _Fatal):
                raise DataError(message) from None
            stats.skipped += 1
            if len(stats.errors) < 5:
                stats.errors.append(message)
            continue
        stats.kept += 1
        if _is_tie(kind, ex):
            stats.ties += 1
            stats.first_tie = stats.first_tie or f"{path}:{line}"
        yield (line, offset, ex) if with_position else ex


def read_sft(path, skip_bad=False, stats=None):
    """Stream SFT examples {"messages": [..., assistant turn]}; pass a ReadStats to count skips."""
    return _read(path, "sft", skip_bad, stats)


def read_dpo(path, skip_bad=False, stats=None):
    """Stream DPO examples {"prompt": messages, "chosen": str, "rejected": str}."""
    return _read(path, "dpo", skip_bad, stats)


def read_iopo(path, skip_bad=False, stats=None):
    """Stream IOPO examples {"x1": messages, "y1": str, "x2": messages, "y2": str}."""
    return _read(path, "iopo", skip_bad, stats)


def read_trace(path, skip_bad=False, stats=None):
    """Stream validated TRACE evaluation items."""
    return _read(path, "trace", skip_bad, stats)


def read_any(path, kind=None, skip_bad=False, stats=None):
    """Stream examples of `kind`, or of the kind `sniff_kind` finds when kind is None."""
    return _read(path, kind or sniff_kind(path, skip_bad), skip_bad, stats)


def sniff_kind(path, skip_bad=False):
    """Tell the format of a file from the keys of its first record (with skip_bad: its first JSON object)."""
    for line, _, raw in _raw_records(path):
        if skip_bad and not isinstance(raw, (dict, _Fatal)):  # a bad line: the next one may tell
            continue
        if isinstance(raw, _Bad):
            raise DataError(f"{path}:{line}: {raw}")
        if not isinstance(raw, dict):
            raise DataError(f"{path}:{line}: expected a JSON object, got {_type_name(raw)}; cannot tell the format")
        keys = set(raw)
        if keys & {"x1", "y1", "x2", "y2"}:
            return "iopo"
        if "constraints_splits" in keys:
            return "trace"
        if keys & {"chosen", "rejected"}:
            # the authors' IOPO layout: two human turns (x1, x2) and no answer between them
            roles = [t.get("from", t.get("role")) for t in raw.get("conversations") or [] if isinstance(t, dict)]
            two_asks = sum(r in ("human", "user") for r in roles) == 2 and not {"gpt", "assistant"} & set(roles)
            return "iopo" if two_asks else "dpo"
        if keys & {"messages", "conversations", "prompt"}:
            return "sft"
        raise DataError(f"{path}:{line}: cannot tell the format from the keys {', '.join(keys)}; pass --kind")
    raise DataError(f"{path}: no JSON object found to tell the format from; pass --kind")


class RecordFile:
    """Random access to the validated records of a file without holding them in memory.

    One streaming pass checks every line and keeps its byte offset, its line number and a rough length
    (characters of the longest prompt plus the longest response, for grouping by length): 24 bytes a
    record. `rf[i]` reads record i again from its byte offset. The JSON-array layout cannot be read line by
    line, so its records are kept in memory."""

    def __init__(self, path, kind, skip_bad=False, stats=None):
        self.path, self.kind = str(path), kind
        self.stats = stats if stats is not None else ReadStats()
        self.offsets, self.lines, self.char_lengths = array("q"), array("q"), array("q")
        self.records = []  # only for JSON arrays
        for line, offset, ex in _read(path, kind, skip_bad, self.stats, with_position=True):
            self.lines.append(line)
            self.char_lengths.append(_char_length(kind, ex))
            if offset is None:
                self.records.append(ex)
            else:
                self.offsets.append(offset)

    def __len__(self):
        return len(self.lines)

    def __getitem__(self, i):
        if self.records:
            return self.records[i]
        with open(self.path, "rb") as f:
            f.seek(self.offsets[i])
            return NORMALIZERS[self.kind](json.loads(f.readline()))

    def where(self, i):
        return f"{self.path}:{self.lines[i]}"


def _char_length(kind, ex):
    chars = lambda msgs: sum(len(m["content"]) for m in msgs)
    if kind == "sft":
        return chars(ex["messages"])
    if kind == "dpo":
        return chars(ex["prompt"]) + max(len(ex["chosen"]), len(ex["rejected"]))
    if kind == "iopo":
        return max(chars(ex["x1"]), chars(ex["x2"])) + max(len(ex["y1"]), len(ex["y2"]))
    return chars(ex["messages"]) + len(ex.get("reference", ""))


# -----------------------------------------------------------------------------
# Token ids and loss masks

def infer_seqlen(source_len, target_len, cutoff_len):
    """Lengths (prompt, response) after cutting a sequence to cutoff_len tokens, as LLaMA-Factory does.

    Three cases, tried in order:
      - the response takes less than half the budget: it stays whole, the prompt gets the rest;
      - else the prompt takes less than half: the prompt stays whole, the response gets the rest;
      - else both are cut in proportion to their lengths; the response gets
        floor(cutoff * target / (source + target)) tokens and the prompt what is left.
    Nothing is cut when source + target <= cutoff. Worked cases: (10, 30, 100) -> (10, 30);
    (90, 30, 100) -> (70, 30); (30, 90, 100) -> (30, 70); (300, 100, 100) -> (75, 25)."""
    if target_len * 2 < cutoff_len:
        max_target = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target = cutoff_len - source_len
    else:
        max_target = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target = min(max_target, target_len)
    new_source = min(max(cutoff_len - new_target, 0), source_len)
    return new_source, new_target


def prompt_ids(tok, messages):
    """The prompt as the model sees it at generation time: chat template plus the assistant header."""
    return list(tok.apply_chat_template(messages, add_generation_prompt=True))


def rendered_response(tok, messages, response):
    """The assistant text exactly as the chat template writes it after `messages`, without end-of-turn.

    ChatML writes it unchanged; Llama 3's template trims surrounding whitespace, and the model should
    learn the text as the template shows it. The check below guards the split: the two renderers that
    model.py has never render the earlier turns differently once an answer follows."""
    head = tok.render_chat(messages, add_generation_prompt=True)
    full = tok.render_chat(messages + [{"role": "assistant", "content": response}], add_generation_prompt=False)
    end = full.rfind(tok.end_of_turn)  # the last one: an answer may itself spell the end-of-turn text
    if not full.startswith(head) or end < len(head):
        at = next((i for i, (a, b) in enumerate(zip(head, full)) if a != b), len(head))
        raise DataError(f"the chat template renders the prompt differently once an answer follows (at "
                        f"character {at}: {head[at:at + 30]!r} becomes {full[at:at + 30]!r}), so the prompt "
                        f"and response cannot be split")
    return full[len(head):end]


def response_ids(tok, text):
    """The scored part: the assistant text tokenized on its own, then the end-of-turn token."""
    return list(tok.encode(text)) + [tok.end_of_turn_id]


def seam_merges(tok, messages, response, p_ids, r_ids):
    """True when the conversation tokenized whole differs from prompt ids + response ids at the seam.

    We train on the two tokenized apart, because that is what the model meets at generation time: the
    prompt ends at the header, then the model emits the response's tokens. The text is the same either
    way (rendered_response took it from the template), but a BPE merge can cross the seam: with Qwen2's
    pre-tokenizer a response that starts with "\\n" joins the header's "\\n" into one "\\n\\n" token when
    the whole conversation is tokenized. Such sequences are counted (EncodeStats.boundary_merges)."""
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                   add_generation_prompt=False)
    ours = p_ids + r_ids
    return list(full[:len(ours)]) != ours


def _join(p_ids, r_ids):
    return {"input_ids": p_ids + r_ids, "labels": [IGNORE_INDEX] * len(p_ids) + r_ids}


def _encode_group(tok, prompts, responses, pairs, max_len, stats, check):
    """Encode the (prompt, response) pairs of one example, truncated together.

    LLaMA-Factory's pairwise processor (src/llamafactory/data/processors/pairwise.py, the code the
    authors' IOPO fork builds on) tokenizes the prompt once and each response apart, calls infer_seqlen
    with the prompt length and the LONGER of the two responses, then keeps the first source_len prompt
    tokens and the first target_len tokens of each response. Keeping the head means a cut prompt loses
    its end, generation header included, and a cut response loses its end-of-turn token; we follow the same
    rule (our targets can be one token shorter: data.py's departure 2). For IOPO quadruples we use the
    longer prompt and the longer response of the four: one shared budget, so a short answer stays whole
    while a long one may be cut. The authors' IOPO processor is not in the public release we could read; this
    is the pairwise rule extended."""
    # Text that spells a special token ("<|im_end|>" inside an answer) is read as that token, a turn boundary,
    # as transformers' chat templates read it too; it is kept and counted (EncodeStats.special_text)
    written = [m["content"] for msgs in prompts for m in msgs] + list(responses)  # as the file has them
    special = any(t in text for t in getattr(tok, "special_tokens", ()) for text in written)
    # as the template writes them; after prompts[0] only: the answer's rendering does not depend on the prompt
    # in either template family (rendered_response checks the split), so x2's answers read the same
    answers = [rendered_response(tok, prompts[0], y) for y in responses]
    x_ids = [prompt_ids(tok, m) for m in prompts]
    y_ids = [response_ids(tok, a) for a in answers]
    merges = sum(seam_merges(tok, prompts[i], answers[j], x_ids[i], y_ids[j]) for i, j in pairs) if check else 0
    x_len, y_len = max(map(len, x_ids)), max(map(len, y_ids))  # cut by the longest prompt and answer
    truncated = max_len is not None and x_len + y_len > max_len
    if truncated:
        x_len, y_len = infer_seqlen(x_len, y_len, max_len)
    seqs = [_join(x_ids[i][:x_len], y_ids[j][:y_len]) for i, j in pairs]
    if stats is not None:
        stats.examples += 1
        stats.truncated += truncated
        # Keeping heads can make two sequences equal (IOPO prompts differing only in their last constraint)
        stats.cut_ties += truncated and len({tuple(s["input_ids"]) for s in seqs}) < len(seqs)
        stats.special_text += special
        stats.boundary_merges += merges
        for s in seqs:
            scored = sum(label != IGNORE_INDEX for label in s["labels"])
            stats.scored_tokens += scored
            stats.masked_tokens += len(s["labels"]) - scored
    return seqs


def encode(tok, prompt_messages, response, max_len=None, stats=None, check=True):
    """{"input_ids", "labels"} for one prompt and its answer; labels are -100 on the prompt.

    input_ids = prompt_ids (template + header) + the answer as the template writes it + end-of-turn,
    cut to max_len as _encode_group describes; check=True also tokenizes the whole conversation to
    count seams that merge (seam_merges). Labels are aligned with input_ids, NOT shifted: labels[t] ==
    input_ids[t] where token t is scored. The trainer shifts: hidden[:, :-1] predicts labels[:, 1:]."""
    return _encode_group(tok, [prompt_messages], [response], [(0, 0)], max_len, stats, check)[0]


def encode_sft(tok, ex, max_len=None, stats=None, check=True):
    """Encode {"messages"}: everything before the last assistant turn is the prompt."""
    return encode(tok, ex["messages"][:-1], ex["messages"][-1]["content"], max_len, stats, check)


def encode_dpo(tok, ex, max_len=None, stats=None, check=True):
    """{"w": seq, "l": seq}: the chosen and rejected answers after one prompt, cut with one shared budget
    (_encode_group)."""
    w, l = _encode_group(tok, [ex["prompt"]], [ex["chosen"], ex["rejected"]], [(0, 0), (0, 1)],
                         max_len, stats, check)
    return {"w": w, "l": l}


IOPO_ORDER = ("y1_x1", "y2_x1", "y2_x2", "y1_x2")  # (x1,y1), (x1,y2), (x2,y2), (x2,y1): SPEC section 1


def encode_iopo(tok, ex, max_len=None, stats=None, check=True):
    """The four sequences of a quadruple, keyed like the loss's log-probs: y1_x1 is y1 after x1."""
    seqs = _encode_group(tok, [ex["x1"], ex["x2"]], [ex["y1"], ex["y2"]], [(0, 0), (0, 1), (1, 1), (1, 0)],
                         max_len, stats, check)
    return dict(zip(IOPO_ORDER, seqs))


ENCODERS = {"sft": encode_sft, "dpo": encode_dpo, "iopo": encode_iopo}


# -----------------------------------------------------------------------------
# Datasets: encode on first access, then keep the ids compactly

class EncodedDataset:
    """`ds[i]` is example i encoded for `kind` (what encode_sft/dpo/iopo return).

    `examples` is any sequence of normalized records (a list, or a RecordFile that reads the file on
    demand), so nothing is tokenized before it is used. Encoded sequences are cached as int32 arrays
    plus their prompt length (labels follow from those two), 4 bytes a token. `stats` counts what has
    been encoded so far; `scan()` encodes everything and returns the totals."""

    def __init__(self, examples, kind, tokenizer, max_len=None, cache=True, check=True, indices=None):
        if kind not in ENCODERS:
            raise ValueError(f"kind should be one of {', '.join(ENCODERS)}, got {kind!r}")
        self.examples, self.kind, self.tokenizer = examples, kind, tokenizer
        self.max_len, self.check = max_len, check
        self.indices = list(range(len(examples))) if indices is None else list(indices)
        self.cache = {} if cache else None
        self.stats = EncodeStats()

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        j = self.indices[i]
        if self.cache is not None and j in self.cache:
            hit = self.cache[j]
            return _expand(hit) if self.kind == "sft" else {k: _expand(v) for k, v in hit.items()}
        try:
            out = ENCODERS[self.kind](self.tokenizer, self.examples[j], self.max_len, self.stats, self.check)
        except DataError as e:
            where = self.examples.where(j) if hasattr(self.examples, "where") else f"example {j}"
            raise DataError(f"{where}: {e}") from None
        if self.cache is not None:
            self.cache[j] = _compact(out) if self.kind == "sft" else {k: _compact(v) for k, v in out.items()}
        return out

    def select(self, positions):
        """A view of some positions of this dataset; it shares the cache and the counters."""
        view = EncodedDataset(self.examples, self.kind, self.tokenizer, self.max_len, False, self.check,
                              [self.indices[p] for p in positions])
        view.cache, view.stats = self.cache, self.stats
        return view

    def lengths(self):
        """Rough lengths (characters) for grouping by length, known without tokenizing."""
        if hasattr(self.examples, "char_lengths"):
            return [self.examples.char_lengths[j] for j in self.indices]
        return [_char_length(self.kind, self.examples[j]) for j in self.indices]

    def scan(self):
        for i in range(len(self)):
            self[i]
        return self.stats


def _compact(seq):  # the cache keeps the ids and the prompt length; the labels follow from them (_join)
    return array("i", seq["input_ids"]), len(_split_prompt(seq)[0])


def _expand(compact):
    ids, n_prompt = compact
    ids = ids.tolist()
    return _join(ids[:n_prompt], ids[n_prompt:])


def holdout_split(ds, n_heldout, seed=0):
    """(train, heldout): n_heldout examples drawn with `seed` are held out, the rest kept in order."""
    if not 0 <= n_heldout <= len(ds):
        raise ValueError(f"cannot hold out {n_heldout} of {len(ds)} examples")
    held = set(random.Random(seed).sample(range(len(ds)), n_heldout))
    train = [p for p in range(len(ds)) if p not in held]
    held = sorted(held)
    if hasattr(ds, "select"):
        return ds.select(train), ds.select(held)
    return [ds[p] for p in train], [ds[p] for p in held]


# -----------------------------------------------------------------------------
# Batches: a resumable, seeded order, and padding into tensors

class BatchSampler:
    """Batches of positions 0..n-1 in an order fixed by (seed, epoch), resumable mid-epoch.

    Iterating yields the remaining batches of the current epoch, then moves to the next epoch, whose
    order is drawn afresh. `state_dict()` holds the epoch and how many of its batches were handed out:
    save it with the checkpoint after training on a batch, and a restarted run continues with the next
    batch, exactly. With group_by_length, each chunk of 50 batches' worth of shuffled positions is sorted
    by length before it is cut into batches (so rows in a batch have similar lengths and little padding),
    then the order of the batches is shuffled, so that lengths do not rise or fall through the epoch. A
    state saved after the last batch of an epoch resumes with an empty pass over that epoch, then the next
    one."""

    def __init__(self, n, batch_size, seed=0, shuffle=True, drop_last=False, lengths=None, group_by_length=False):
        if batch_size < 1 or n < 1:
            raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
        if group_by_length and (lengths is None or len(lengths) != n):
            raise ValueError(f"group_by_length needs one length per example ({n}), got "
                             f"{None if lengths is None else len(lengths)}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.shuffle, self.drop_last, self.group_by_length = shuffle, drop_last, group_by_length
        self.lengths = lengths
        self.epoch, self.position = 0, 0

    def __len__(self):
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def epoch_batches(self, epoch):
        rng = random.Random(f"{self.seed}:{epoch}")  # a str seed is hashed the same on every platform
        order = list(range(self.n))
        if self.shuffle:
            rng.shuffle(order)
        if self.group_by_length:
            chunk = self.batch_size * 50
            order = [i for c in range(0, self.n, chunk)
                     for i in sorted(order[c:c + chunk], key=lambda i: -self.lengths[i])]
        out = [order[b:b + self.batch_size] for b in range(0, self.n, self.batch_size)]
        if self.drop_last and len(out[-1]) < self.batch_size:
            out.pop()
        if self.group_by_length and self.shuffle:
            rng.shuffle(out)
        return out

    def __iter__(self):
        batches = self.epoch_batches(self.epoch)
        while self.position < len(batches):
            self.position += 1  # counted before the yield: the caller holds this batch from now on
            yield batches[self.position - 1]
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "n": self.n, "batch_size": self.batch_size,
                "seed": self.seed, "shuffle": self.shuffle, "drop_last": self.drop_last,
                "group_by_length": self.group_by_length}

    def load_state_dict(self, state):
        for key in ("n", "batch_size", "seed", "shuffle", "drop_last", "group_by_length"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]!r} but this sampler has "
                                 f"{getattr(self, key)!r}; the resumed order would differ")
        self.epoch, self.position = state["epoch"], state["position"]


def collate_sft(batch, pad_id, multiple=8):
    """Right-pad sequences into tensors; the width is rounded up to a multiple of `multiple`.

    Worked two-row batch (pad_id 0): row a = prompt [5, 6] + response [7, 2], row b = prompt [5] + [9, 2]

        input_ids      = [[5, 6, 7, 2, 0, 0, 0, 0],        (B, T) long, T = 8
                          [5, 9, 2, 0, 0, 0, 0, 0]]
        labels         = [[-100, -100, 7, 2, -100, -100, -100, -100],
                          [-100,    9, 2, -100, -100, -100, -100, -100]]
        attention_mask = [[1, 1, 1, 1, 0, 0, 0, 0],
                          [1, 1, 1, 0, 0, 0, 0, 0]]

    Labels are aligned with input_ids (not shifted): the log-prob of token t comes from position t-1,
    so the trainer pairs hidden[:, :-1] with labels[:, 1:]."""
    for s in batch:
        if len(s["input_ids"]) != len(s["labels"]):
            raise ValueError(f"input_ids has {len(s['input_ids'])} tokens but labels has {len(s['labels'])}")
    width = max(len(s["input_ids"]) for s in batch)
    width = -(-width // multiple) * multiple
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for b, s in enumerate(batch):
        n = len(s["input_ids"])
        input_ids[b, :n] = torch.tensor(s["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(s["labels"], dtype=torch.long)
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def collate_dpo(batch, pad_id, multiple=8):
    """2B rows: the B chosen sequences, then the B rejected ones (row b and row B + b share a prompt)."""
    return collate_sft([ex["w"] for ex in batch] + [ex["l"] for ex in batch], pad_id, multiple)


def collate_iopo(batch, pad_id, multiple=8):
    """4B rows in blocks of B: (x1,y1), (x1,y2), (x2,y2), (x2,y1), i.e. IOPO_ORDER.

    Per-row log-probs reshaped with .view(4, B) give logp_y1_x1, logp_y2_x1, logp_y2_x2, logp_y1_x2."""
    return collate_sft([ex[key] for key in IOPO_ORDER for ex in batch], pad_id, multiple)


COLLATORS = {"sft": collate_sft, "dpo": collate_dpo, "iopo": collate_iopo}


# -----------------------------------------------------------------------------
# Shared-prompt packing: two answers after one prompt in one row
#
# DPO's (x, y_w), (x, y_l) and IOPO's (x1, y1), (x1, y2) / (x2, y2), (x2, y1) repeat each prompt twice. A
# packed row holds the prompt once and both answers: [x, y_a, y_b]. y_b must not see y_a, and its
# positions continue from the end of x as if y_a were not there, so every token of y_b sees exactly what
# it sees in the unpacked row (x, y_b) and gets the same log-prob:
#
#     tokens       x0 x1 x2 | a0 a1 | b0 b1 b2      segment ids 1 = prompt, 2 = y_a, 3 = y_b, 0 = padding
#     position_ids  0  1  2 |  3  4 |  3  4  5
#     labels        .  .  . | a0 a1 |  .  .  .      y_a scored as usual: token t from position t - 1
#     labels_b      .  .  . | b0  . |  . b1 b2      y_b: b0 is predicted from x2 (the last prompt token),
#                                                   so it sits one step after x2, where a0 sits in `labels`
# Labels are aligned like collate_sft's (the trainer pairs hidden[:, :-1] with labels[:, 1:]).

PROMPT, ANSWER_A, ANSWER_B = 1, 2, 3  # segment ids; 0 is padding


def _split_prompt(seq):
    """(prompt ids, answer ids) of an encoded sequence: the prompt is everything before the first scored label."""
    n = next((t for t, label in enumerate(seq["labels"]) if label != IGNORE_INDEX), len(seq["labels"]))
    return seq["input_ids"][:n], seq["input_ids"][n:]


def pack_pair(seq_a, seq_b):
    """One packed row (lists) from two encoded sequences that share their prompt: input_ids, labels, labels_b,
    position_ids, segment_ids."""
    x, y_a = _split_prompt(seq_a)
    x_b, y_b = _split_prompt(seq_b)
    if x != x_b:
        raise ValueError(f"pack_pair: the two sequences have different prompts ({len(x)} and {len(x_b)} tokens); "
                         "only answers to the same prompt can share a row")
    if not x:
        raise ValueError("pack_pair: an empty prompt leaves nothing to predict the first answer token from")
    p, la, lb = len(x), len(y_a), len(y_b)
    labels_b = [IGNORE_INDEX] * (p + la + lb)
    if lb:
        labels_b[p] = y_b[0]  # predicted from position p - 1, the last prompt token
        labels_b[p + la + 1:] = y_b[1:]  # the rest from the previous y_b token, as usual
    return {"input_ids": x + y_a + y_b,
            "labels": [IGNORE_INDEX] * p + y_a + [IGNORE_INDEX] * lb,
            "labels_b": labels_b,
            "position_ids": list(range(p + la)) + list(range(p, p + lb)),
            "segment_ids": [PROMPT] * p + [ANSWER_A] * la + [ANSWER_B] * lb}


# Which two sequences share a row, in row-block order: DPO one block [x, y_w, y_l]; IOPO two blocks
# [x1, y1, y2] and [x2, y2, y1]. The trainer reads the per-sequence sums back in this order.
PACKED_PAIRS = {"dpo": (("w", "l"),), "iopo": (("y1_x1", "y2_x1"), ("y2_x2", "y1_x2"))}


def collate_packed(batch, kind, pad_id, multiple=8):
    """Packed rows for DPO (B rows) or IOPO (2B rows, blocks of B: x1 rows then x2 rows), right-padded.

    Returns input_ids, labels, labels_b, position_ids, segment_ids, attention_mask (1 on tokens), all
    (R, T) long, and packed_views' a_index, b_index, b_src, b_dst, which model.PackedRows turns into attention
    that keeps y_b from seeing y_a. packed_attention_mask(segment_ids) gives the same rule as an (R, 1, T, T)
    mask."""
    if kind not in PACKED_PAIRS:
        raise ValueError(f"collate_packed: kind must be dpo or iopo, got {kind!r}")
    rows = [pack_pair(ex[a], ex[b]) for a, b in PACKED_PAIRS[kind] for ex in batch]
    width = -(-max(len(r["input_ids"]) for r in rows) // multiple) * multiple
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX, "labels_b": IGNORE_INDEX, "position_ids": 0,
            "segment_ids": 0}
    out = {k: torch.full((len(rows), width), v, dtype=torch.long) for k, v in fill.items()}
    for i, r in enumerate(rows):
        for k in fill:
            out[k][i, :len(r[k])] = torch.tensor(r[k], dtype=torch.long)
    out["attention_mask"] = (out["segment_ids"] != 0).long()
    out.update(packed_views(out["segment_ids"]))
    return out


def packed_views(segment_ids):
    """Where each answer's attention reads from, for model.PackedRows (computed on the CPU: the step never waits).

    Each answer must see [x, y] with its own y only. [x, y_a] is the start of every packed row, so its view is
    a prefix: a_index (R, TA), 0..TA-1 per row, TA the longest [x, y_a] (only the shape is used). [x, y_b]
    is gathered: b_index (R, TB), the packed positions of [x, y_b] per row, right-padded with 0 (padding
    sits after every real token, so causality keeps it unseen); b_src and b_dst (n,): each y_b token's flat
    index in that view (row * TB + t) and in the packed batch (row * T + t)."""
    R, T = segment_ids.shape
    a_len = int(((segment_ids == PROMPT) | (segment_ids == ANSWER_A)).sum(1).max())
    keep = [((row == PROMPT) | (row == ANSWER_B)).nonzero().squeeze(1) for row in segment_ids]
    width = max(len(k) for k in keep)
    b_index = torch.zeros(R, width, dtype=torch.long)
    src, dst = [], []
    for r, (row, k) in enumerate(zip(segment_ids, keep)):
        b_index[r, :len(k)] = k
        in_view = (row[k] == ANSWER_B).nonzero().squeeze(1)  # y_b's places inside [x, y_b]
        src.append(r * width + in_view)
        dst.append(r * T + k[in_view])
    return {"a_index": torch.arange(a_len).expand(R, a_len).contiguous(), "b_index": b_index,
            "b_src": torch.cat(src), "b_dst": torch.cat(dst)}


def packed_attention_mask(segment_ids):
    """(R, 1, T, T) bool from (R, T) segment ids: causal, except that y_b never sees y_a.

    Padding sits at the end of a row, so causality alone keeps real tokens from seeing it; a padding
    query keeps its causal row (never used, but finite)."""
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()  # (T, T)
    blocked = (segment_ids == ANSWER_B)[:, :, None] & (segment_ids == ANSWER_A)[:, None, :]  # (R, T, T)
    return (causal & ~blocked)[:, None]  # (R, 1, T, T)


# -----------------------------------------------------------------------------
# A toy tokenizer

def train_tokenizer(texts, vocab_size, out_dir, model_max_length=32768):
    """Train a byte-level BPE on `texts` and write tokenizer.json + tokenizer_config.json to out_dir.

    Ids 0, 1, 2 are <|endoftext|> (padding), <|im_start|>, <|im_end|> (end of turn and eos), then the
    256 byte symbols, then the merges. Text is split like Qwen2 before BPE, no BOS is added, and the
    chat template is CHATML_TEMPLATE, so Hugging Face's AutoTokenizer reads the folder as it reads a
    Qwen2 checkpoint's. A few MB of text train in seconds. Returns out_dir as a Path."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size should be at least {len(SPECIAL_TOKENS) + 256} (specials + bytes), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length, "split_special_tokens": False,
        "added_tokens_decoder": {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "rstrip": False,
                                                            "normalized": False, "single_word": False, "special": True}
                                 for t in SPECIAL_TOKENS},
        "chat_template": CHATML_TEMPLATE,
    }
    write_atomic(out_dir / "tokenizer.json", lambda tmp: tok.save(str(tmp)))
    write_json_atomic(out_dir / "tokenizer_config.json", config)
    return out_dir


def example_texts(kind, ex):
    """Every string of a normalized example (to train a tokenizer on)."""
    if kind == "sft" or kind == "trace":
        yield from (m["content"] for m in ex["messages"])
        if "reference" in ex:
            yield ex["reference"]
    elif kind == "dpo":
        yield from (m["content"] for m in ex["prompt"])
        yield from (ex["chosen"], ex["rejected"])
    else:
        yield from (m["content"] for m in ex["x1"] + ex["x2"])
        yield from (ex["y1"], ex["y2"])


# -----------------------------------------------------------------------------
# Command line: show what is trained on

def show_sequence(tok, seq, colour=False):
    """The decoded sequence with scored tokens marked: green in a terminal, else between [[ and ]]."""
    ids, labels = seq["input_ids"], seq["labels"]
    parts, start = [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or (labels[t] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            text = tok.decode(ids[start:t], skip_special_tokens=False)
            scored = labels[start] != IGNORE_INDEX
            if colour:
                parts.append(("\033[1;32m" if scored else "\033[2m") + text + "\033[0m")
            else:
                parts.append(f"[[{text}]]" if scored else text)
            start = t
    return "".join(parts)


def _trace_sequence(tok, ex, max_len, stats):
    """A TRACE item: its reference answer scored after the prompt, or the prompt alone, all masked."""
    if "reference" in ex:
        return encode(tok, ex["messages"], ex["reference"], max_len, stats)
    ids = prompt_ids(tok, ex["messages"])
    stats.examples += 1
    stats.truncated += max_len is not None and len(ids) > max_len
    ids = ids[:max_len]
    stats.masked_tokens += len(ids)
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids)}


def main(argv=None, out=None):
    parser = argparse.ArgumentParser(description="Print one encoded example of a data file, its scored and "
                                     "masked tokens shown apart, and counts over the whole file.")
    parser.add_argument("file", help="a .jsonl file, or a JSON array file (sharegpt layout)")
    parser.add_argument("--model", help="a folder with tokenizer.json + tokenizer_config.json; "
                        "without it a small tokenizer is trained on the file itself")
    parser.add_argument("--kind", choices=KINDS, help="the format; guessed from the first record if left out")
    parser.add_argument("--index", type=int, default=0, help="which example to print (0-based, default 0)")
    parser.add_argument("--max-len", type=int, default=None, help="cut sequences to this many tokens as the "
                        "authors' code does (default: no cut)")
    parser.add_argument("--skip-bad", action="store_true", help="skip bad lines and count them instead of stopping")
    parser.add_argument("--vocab-size", type=int, default=2000, help="vocab size of the tokenizer trained "
                        "when --model is not given (default 2000)")
    args = parser.parse_args(argv)
    out = out or sys.stdout
    if args.max_len is not None and args.max_len < 1:
        raise SystemExit(f"data.py: --max-len must be at least 1, got {args.max_len}")

    kind = args.kind or sniff_kind(args.file, args.skip_bad)
    records = RecordFile(args.file, kind, args.skip_bad)
    if not 0 <= args.index < len(records):
        raise SystemExit(f"{args.file}: --index {args.index} is out of range ({len(records)} examples)")
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            tok = load_tokenizer(args.model)
        else:
            texts = (t for i in range(len(records)) for t in example_texts(kind, records[i]))
            tok = load_tokenizer(train_tokenizer(texts, args.vocab_size, tmp))
    colour = out.isatty() if hasattr(out, "isatty") else False
    legend = "scored tokens in green, masked dim" if colour else "scored tokens between [[ ]], the rest masked (-100)"
    print(f"{args.file}: {kind}, tokenizer {args.model or f'trained on the file (vocab {len(tok)})'}; {legend}", file=out)

    if kind == "trace":
        stats = EncodeStats()
        example = _trace_sequence(tok, records[args.index], args.max_len, EncodeStats())
        seqs = {"": example}
        for i in range(len(records)):
            _trace_sequence(tok, records[i], args.max_len, stats)
    else:
        ds = EncodedDataset(records, kind, tok, args.max_len)
        example = ds[args.index]
        seqs = {"": example} if kind == "sft" else example
        stats = ds.scan()
    for name, seq in seqs.items():
        scored = sum(label != IGNORE_INDEX for label in seq["labels"])
        title = f" {name} " if name else " "
        print(f"\n---{title}example {args.index} ({records.where(args.index)}): {len(seq['input_ids'])} tokens, "
              f"{scored} scored", file=out)
        print(show_sequence(tok, seq, colour), file=out)
    print(f"\n{stats}", file=out)
    print(records.stats, file=out)


if __name__ == "__main__":
    try:
        main()
    except (DataError, OSError, ValueError) as e:
        sys.exit(f"data.py: {e}")
