"""Synthetic TRACE: complex instructions whose every constraint is checked by code, with SFT, DPO and IOPO data.

    python trace_gen.py --out runs/toy_data --n-train 2000 --n-eval 200 --seed 0 --toy   # tiny-model preset
    python trace_gen.py --out runs/trace --n-train 119345 --n-eval 1042 --seed 0         # paper scale
    python trace_gen.py --stats ../shared/data/trace_eval_sample.jsonl --json             # Table 1/2 statistics

Follows the TRACE construction of IOPO (arXiv 2411.06208, Section 3 and Tables 1, 2, 6): a taxonomy of
5 types and 26 dimensions, a simple task expanded to C constraints, structuring into task description /
numbered constraints / input, quality control, and responses kept only if they satisfy every constraint.
Where the paper prompts a 72B model and judges with GPT-4o, we sample from small pools and check with code:

1. Every constraint comes from a "family" (a small class): English phrasings, a parameter sampler, an exact
   checker, a writer hook that makes a draft comply, a spoil hook that makes it violate (writing what it
   forbids; leaving the writer out violates a constraint that asks for something), and a REVISE edit.
2. Subjective dimensions get verifiable proxies that the constraint text itself states:
   Theme: the topic is named at least k times.  Exclusion: a listed word never appears / no commas.
   Inclusion: keywords, a keyword k times, an exact phrase.  Value: a line starting with a responsibility label
   that names someone qualified to ask, where the wording promises that.
   Privacy: e-mails and phones of the input records never appear, the given mask at least once per secret.
   Numerical: word-count range, word ceiling, sentence minimum.  Role-Playing: the words "As a <role>".
   Target Audience: the audience is named and no sentence exceeds N words.  Prior Condition: a conditional
   line whose right value depends on the topic's category.  Natural-language / Markdown Process Background:
   the input's steps are named in the given (or reverse) order.  Table / Text Background: the answer states
   the value the input holds for the asked key.  Tone and Style: formal (no contractions, no "!"), casual
   (>= 2 contractions), enthusiastic (>= 2 "!"), or >= k hedging words from a list.  Emotion: >= k words of a
   listed lexicon.  Linguistic Characteristics: >= k questions / a simile with "like a" or "as ... as".
   Multilingual: one of three given sentences in the named language.  Output Format: JSON object with one
   key, double quotes, a <<title>>, >= k **bold** spans.  Text Pattern: first word, final phrase, letter case.
   Grammar Structure: >= k sentences beginning with "If".  Citation: >= k distinct [n] markers before a label
   line.  Numbering and List: exactly n "- " bullets / "1." items.  Hierarchical Structure: exactly n "## "
   headings.  Template: labelled lines in order / a postscript.  Positive Example: the example's two labels
   in order.  Negative Example: the bad example's opening phrase never appears.
3. IOPO edits. Under exact per-constraint checks a pure ADD (x2 = x1 + c) always lets y2 satisfy x1, and a
   pure DELETE (x2 = x1 - c) always lets y1 satisfy x2, so neither alone can give the paper's quadruple
   (both crossed pairs failing). REVISE changes one constraint's parameters (same family and wording). ADD
   inserts a new constraint that y1 violates and DELETE removes one that y2 then violates on purpose; each is
   paired with the other as a companion step (recorded in `edit`), so every quadruple verifies 4 ways; the
   two differ only in which step is the primary one named by `op`. y2 violates the edited-away constraint
   only when needed (a revised keyword already makes it fail; a deleted one needs a spoil).
4. DPO's rejected answer is written to the same instruction with one or two constraints spoiled on purpose
   (the paper asks a model to "comply worse"); it is verified to fail at least one check. Only if no spoil
   takes is it the answer that ignores every constraint.
5. --toy (for a few-million-parameter model trained on a CPU): only the surface families in TOY_FAMILIES and
   the first two phrasings of each, training C uniform on 1..3 (evaluation: the real set's C table cut at
   3), one templated sentence plus what the constraints add (6-27 words, 17 on average, for seed 0). That
   space is small: about 430 distinct one-constraint prompts, so most one-constraint evaluation prompts also
   occur in training (stats.json counts them: eval_prompts_in_training).
6. Answers are templated English sentences, not fluent prose: enough for exact checking and for a small
   model to learn which constraint asks for what, not a substitute for a strong model's answers.
7. Priority for CFBench's PSR: Content, Situation and Format constraints are primary; Style and Example are
   secondary (the paper gives no rule). An empty response fails every check, as in IFEval.
8. Counting as a reader counts: words are whitespace-separated tokens with a letter or digit (a lone dash is
   none); sentences leave out headings, titles, labels, source entries and list items without a full stop; a
   one-key JSON answer is judged on its text; curly quotes read as straight ones and labels may be bold;
   "Wow!!" is one exclamation and "Really??" one question; a line break or several spaces inside a phrase read
   as one space, both where the phrase must appear and where it must not; a look-up reads "4,512" as 4512.
   Still looser than a person: the adviser on a responsible-use line is found by a word list, so "I am not an
   expert" passes (see the README).

Outputs (--out DIR). Every record carries its checks, each a self-contained spec {"dimension", "type",
"family", "params", "priority", "phrasing", "text"} that `check(spec, response)` re-verifies ("phrasing" is
the index of the family's wording, which value_line's check reads: the order of phrasings is part of the format):
  sft.jsonl   {"prompt": [system, user], "response", "checks"}
  dpo.jsonl   {"prompt", "chosen", "rejected", "checks"}
  iopo.jsonl  {"x1", "y1", "x2", "y2", "checks_x1", "checks_x2",
               "edit": {"op", "index", "before", "after", "companion"}}   (index: in x1 for DELETE and
               REVISE, in x2 for ADD; before / after: the specs, or null)
  eval.jsonl  the real set's fields (id, messages, type, description, constraints, input, constraints_num,
              constraints_splits, levels2 in English, category) plus "reference" and "checks"
  stats.json  C histograms, type shares and dimension counts per split, QC rejections by reason, edit ops,
              and how many evaluation prompts also occur in training (as x1 or x2).
"""

import argparse
import functools
import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
import random

from tqdm import tqdm

# -----------------------------------------------------------------------------
# Taxonomy (SPEC section 3, paper Table 6)

TAXONOMY = {
    "Content": ["Theme", "Exclusion", "Inclusion", "Value", "Privacy", "Numerical"],
    "Situation": ["Role-Playing", "Target Audience", "Prior Condition", "Natural-Language Process Background",
                  "Markdown Process Background", "Table Background", "Text Background"],
    "Style": ["Tone and Style", "Emotion", "Linguistic Characteristics", "Multilingual"],
    "Format": ["Output Format", "Text Pattern", "Grammar Structure", "Citation", "Numbering and List",
               "Hierarchical Structure", "Template"],
    "Example": ["Positive Example", "Negative Example"],
}
DIMENSION_TYPE = {d: t for t, dims in TAXONOMY.items() for d in dims}

# sampling weight per dimension, close to the label shares of the real evaluation set (SPEC section 3)
DIMENSION_WEIGHT = {
    "Theme": 3, "Exclusion": 4, "Inclusion": 20, "Value": 2, "Privacy": 1.5, "Numerical": 16.5,
    "Role-Playing": 2.5, "Target Audience": 2.5, "Prior Condition": 1.5, "Natural-Language Process Background": 1.5,
    "Markdown Process Background": 1, "Table Background": 1, "Text Background": 1,
    "Tone and Style": 7, "Emotion": 1, "Linguistic Characteristics": 1, "Multilingual": 1,
    "Output Format": 11, "Text Pattern": 6, "Grammar Structure": 2, "Citation": 2, "Numbering and List": 5,
    "Hierarchical Structure": 2, "Template": 3, "Positive Example": 0.5, "Negative Example": 0.5,
}

# Chinese level-2 labels of the released evaluation set -> our names. Exact names first; KEYWORD_LABELS
# catches spelling variants; anything else is reported as unmapped by --stats.
CHINESE_LABELS = {
    "主题约束": "Theme", "排除约束": "Exclusion", "包含约束": "Inclusion", "价值观约束": "Value",
    "隐私约束": "Privacy", "数值约束": "Numerical", "角色扮演约束": "Role-Playing", "受众目标约束": "Target Audience",
    "目标受众约束": "Target Audience", "前置条件约束": "Prior Condition",
    "自然语言流程背景信息约束": "Natural-Language Process Background",
    "Markdown流程背景信息约束": "Markdown Process Background", "表格背景信息约束": "Table Background",
    "文本背景信息约束": "Text Background", "语气风格约束": "Tone and Style", "情感约束": "Emotion",
    "语言特征约束": "Linguistic Characteristics", "多语言约束": "Multilingual", "输出格式约束": "Output Format",
    "文本样式约束": "Text Pattern", "语法结构约束": "Grammar Structure", "引用约束": "Citation",
    "编号和列表约束": "Numbering and List", "层次结构约束": "Hierarchical Structure", "模板约束": "Template",
    "模版约束": "Template", "正例约束": "Positive Example", "负例约束": "Negative Example",
}
KEYWORD_LABELS = [
    ("markdown", "Markdown Process Background"), ("表格", "Table Background"), ("自然语言", "Natural-Language Process Background"),
    ("文本背景", "Text Background"), ("角色", "Role-Playing"), ("受众", "Target Audience"), ("前置", "Prior Condition"),
    ("情感", "Emotion"), ("多语", "Multilingual"), ("语言特征", "Linguistic Characteristics"), ("语气", "Tone and Style"),
    ("风格", "Tone and Style"), ("格式", "Output Format"), ("样式", "Text Pattern"), ("语法", "Grammar Structure"),
    ("引用", "Citation"), ("列表", "Numbering and List"), ("编号", "Numbering and List"), ("层次", "Hierarchical Structure"),
    ("层级", "Hierarchical Structure"), ("模板", "Template"), ("模版", "Template"), ("正例", "Positive Example"),
    ("负例", "Negative Example"), ("反例", "Negative Example"), ("主题", "Theme"), ("排除", "Exclusion"),
    ("包含", "Inclusion"), ("价值", "Value"), ("隐私", "Privacy"), ("数值", "Numerical"), ("数量", "Numerical"),
]


def english_dimension(label):
    """Our dimension name for a levels2 label (English or Chinese), or None when it cannot be mapped."""
    if label in DIMENSION_TYPE:
        return label
    if label in CHINESE_LABELS:
        return CHINESE_LABELS[label]
    low = label.lower()
    for key, dim in KEYWORD_LABELS:
        if key in low:
            return dim
    return None


# sizes from SPEC section 3 (paper Tables 1-2): count of instructions with C = 1..15 constraints
TRAIN_C_COUNTS = [991, 8003, 26421, 34155, 26327, 13858, 5882, 2185, 999, 464, 8, 20, 20, 8, 4]
EVAL_C_COUNTS = [200, 100, 100, 100, 100, 100, 100, 100, 100, 10, 10, 10, 4, 4, 4]

# -----------------------------------------------------------------------------
# Text measurements shared by the checkers (each checker's docstring says which it uses)

WORD_RE = re.compile(r"[A-Za-z0-9\u00c0-\u024f]+(?:'[A-Za-z]+)?")
SENT_SPLIT_RE = re.compile(r"(?<=[.!?])\s+|\n+")
CONTRACTION_RE = re.compile(r"\b(?:[A-Za-z]+n't|(?:could|would|should|might|must)'ve|(?:i|you|we|they|he|she|it|"
                            r"that|there|here|what|who|where|when|why|how|let)'(?:s|re|ve|ll|d|m))\b", re.I)
EXPANSIONS = {"don't": "do not", "doesn't": "does not", "isn't": "is not", "can't": "cannot", "won't": "will not",
              "it's": "it is", "that's": "that is", "you'll": "you will", "you're": "you are", "let's": "let us",
              "there's": "there is", "we're": "we are", "i'm": "I am", "aren't": "are not", "you've": "you have"}
EXPAND_RE = re.compile(r"\b(" + "|".join(re.escape(k) for k in EXPANSIONS) + r")\b", re.I)


# Lines that are not prose: headings, a <<title>> alone, source entries "[1] ...", rules, labels ending in ":",
# and list items that do not end like a sentence
NOT_PROSE_RE = re.compile(r"\s*(?:#|<<[^\n]*>>\s*$|\[\d+\]|[-*_]{3,}\s*$|[^.!?\n]*:\s*$"
                          r"|(?:[-*]|\d+[.)])\s[^\n]*[^.!?\s]\s*$)")
LABEL_MARKUP_RE = re.compile(r"(?:\*\*|__|\*|_)?\s*(:)|(?<=\w)(?:\*\*|__)")  # "**Label** :" -> "Label:"
CURLY = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})
CURLY_RE = re.compile("[\u2018\u2019\u201c\u201d]")
TOKEN_RE = re.compile(r"\S*[A-Za-z0-9\u00c0-\u024f]\S*")  # a whitespace-free run holding a letter or digit
NO_BREAK_RE = re.compile(r"\b(?:P\.P\.S\.|P\.S\.|e\.g\.|i\.e\.)", re.I)  # periods that end no sentence
END_MARKS_RE = re.compile(r"[!?]+")
URL_RE = re.compile(r"\b(?:https?://|www\.)\S+", re.I)  # a query's "?" in a link ends no sentence
# "4,512" and "1,234,567": a lead of 1-3 digits, then groups of exactly three after a comma with no space, so
# that "1, 2, 3", "1,2" and "1,2345" stay apart
GROUPED_NUMBER_RE = re.compile(r"(?<![\d,.])\d{1,3}(?:,\d{3})+(?!\d|,\d)")


def count_words(text):
    """Words = whitespace-separated tokens holding a letter or digit ("don't", "555-0142", "P.S." and an e-mail
    address are one word each; a dash alone is none)."""
    return len(TOKEN_RE.findall(text))


def split_sentences(text):
    """Sentences of the prose: lines that are headings, titles, source entries, rules, labels or list items
    not ending in . ! ? (NOT_PROSE_RE) are left out; the rest is cut after . ! ? followed by a space, and at
    line breaks, except after "P.S.", "e.g." and "i.e."; each piece holds a letter or digit."""
    prose = "\n".join(line for line in text.split("\n") if not NOT_PROSE_RE.match(line))
    if any(a in prose.lower() for a in ("p.s.", "e.g.", "i.e.")):  # (a scan of the text is cheaper than the regex)
        prose = NO_BREAK_RE.sub(lambda m: m[0].replace(".", "\0"), prose)
    return [s.replace("\0", ".") for s in SENT_SPLIT_RE.split(prose) if WORD_RE.search(s)]


def count_end_marks(text, mark):
    """Sentence ends marked with `mark` ("!" or "?"): a run of "!" and "?" ends one sentence, so "Wow!!" is one
    exclamation, as a reader counts it, and "Really?!" one question and one exclamation. Links are skipped."""
    if mark not in text:
        return 0
    return sum(1 for run in END_MARKS_RE.findall(URL_RE.sub(" ", text)) if mark in run)


@functools.lru_cache(maxsize=4096)
def _word_re(word):
    # any whitespace run between a phrase's words, a line break included, reads as the one space it stands for
    return re.compile(r"(?<![A-Za-z0-9])" + r"\s+".join(map(re.escape, word.split())) + r"(?![A-Za-z0-9])", re.I)


def _may_hold(text, word):
    """False when the phrase's first word is not even a substring of text (saves the regex on most texts)."""
    return (word.split() or [""])[0].lower() in text.lower()


def count_word(text, word):
    """Case-insensitive occurrences of a word or phrase, not inside a longer word; a line break or several
    spaces between the phrase's words count as one space ("in the long\\nrun" is "in the long run")."""
    return len(_word_re(word).findall(text)) if _may_hold(text, word) else 0


def has_word(text, word):
    """count_word(text, word) > 0, without counting."""
    return _may_hold(text, word) and _word_re(word).search(text) is not None


def ungrouped(text):
    """text with thousands separators dropped from grouped numbers (GROUPED_NUMBER_RE): "4,512" -> "4512"."""
    return GROUPED_NUMBER_RE.sub(lambda m: m[0].replace(",", ""), text) if "," in text else text


def one_spaced(text):
    """text with each whitespace run, line breaks included, as one space and none at either end: what the
    substring checks (process steps, foreign sentences, end phrases) compare, as a reader would."""
    return " ".join(text.split())


def _line_starts(text, label):
    """Indices of the lines (ignoring leading spaces, quotes, '-', '*', '#'; bold or italic marks and spaces
    before a colon) that start with `label` (case-insensitive): "**Disclaimer** : ..." starts with "Disclaimer:"."""
    label = label.lower()
    return [i for i, line in enumerate(text.split("\n")) if _unmarked(line).lstrip(" \t\"'-*#").lower().startswith(label)]


def _unmarked(text):
    """text without bold or italic marks around labels and without spaces before a colon (LABEL_MARKUP_RE)."""
    return LABEL_MARKUP_RE.sub(r"\1", text) if "*" in text or "_" in text or " :" in text or "\t:" in text else text


def _expand(match):
    word = match.group(0)
    full = EXPANSIONS[word.lower()]
    return full[0].upper() + full[1:] if word[0].isupper() else full


def _sentence(text):
    return text[0].upper() + text[1:]


# -----------------------------------------------------------------------------
# Pools: topics, inputs, lexicons (all invented or generic, so no world knowledge is needed)

TOPICS = [("green tea", "food"), ("sourdough bread", "food"), ("meal planning", "food"), ("urban gardening", "nature"),
          ("bird watching", "nature"), ("composting", "nature"), ("remote work", "work"), ("time management", "work"),
          ("job interviews", "work"), ("budget travel", "travel"), ("train journeys", "travel"), ("camping", "travel"),
          ("home workouts", "health"), ("better sleep", "health"), ("daily walking", "health"), ("solar panels", "technology"),
          ("password managers", "technology"), ("electric bikes", "technology"), ("saving money", "money"),
          ("household budgets", "money"), ("language learning", "learning"), ("public libraries", "learning"),
          ("chess", "learning"), ("watercolor painting", "art"), ("street photography", "art"), ("pottery", "art")]
CATEGORIES = sorted({c for _, c in TOPICS})
TOY_TOPICS = [("tea", "food"), ("bread", "food"), ("rain", "nature"), ("trees", "nature"), ("trains", "travel"),
              ("chess", "learning"), ("music", "art"), ("bikes", "technology")]

DESCRIPTIONS = {
    None: ["Write a short note about {t}.", "Explain {t} to a friend who has never tried it.",
           "Give practical advice on {t}.", "Describe why {t} matters today.", "Write a brief blog paragraph about {t}.",
           "Summarize the key ideas behind {t}.", "Draft a short newsletter item about {t}.",
           "Offer a few tips for getting started with {t}."],
    "table": ["Write a short report on {t} that uses the table in the input.",
              "Look at the table in the input and comment on it for a newsletter about {t}."],
    "passage": ["Read the passage in the input and write a short comment that links it to {t}.",
                "Write a brief reply to the passage in the input for readers interested in {t}."],
    "nl_process": ["Explain the process described in the input to someone interested in {t}.",
                   "Rewrite the process in the input as friendly guidance for a {t} club."],
    "md_process": ["Explain the process described in the input to someone interested in {t}.",
                   "Turn the checklist in the input into a short explanation for a {t} group."],
    "records": ["Write a short contact summary of the people in the input, who all work on {t}.",
                "Prepare a brief note introducing the team members in the input to a {t} project."],
    "numbers": ["Comment briefly on the numbers in the input, which come from a survey about {t}.",
                "Describe what the values in the input suggest about interest in {t}."],
}
INPUT_KIND_WEIGHTS = [(None, 0.48), ("table", 0.1), ("passage", 0.1), ("nl_process", 0.07), ("md_process", 0.06),
                      ("records", 0.07), ("numbers", 0.12)]
OPENINGS = ["Here is a short answer about {t}.", "This note looks at {t}, a really good subject.",
            "Let me walk through {t} briefly.", "The short version on {t} is also simple."]
# filler sentences: each mentions the topic; several carry habit words, commas, contractions or "!"
# on purpose, so that an unconstrained answer naturally breaks Exclusion and formal-tone constraints
FILLERS = ["{T} is a very useful subject to understand.", "It's easier than it looks, and it pays off.",
           "Many people find {t} really rewarding!", "A simple plan makes {t} much easier.",
           "It is also important to stay patient with {t}.", "Small daily habits make {t} work.",
           "You don't need expensive tools to begin with {t}.", "Good results with {t} come from steady practice.",
           "Most newcomers just need a clear first step.", "Learning about {t} can be a great adventure!",
           "Questions are normal, so keep notes on {t}.", "Progress with {t} comes in small steps.",
           "Sharing what you learn about {t} helps others too.", "The basics of {t} are easy to review."]
TOY_FILLERS = ["It is very calm.", "It is really fun.", "It is just nice.", "It is very good.", "It is really simple."]
HABIT_WORDS = ["very", "really", "also", "just", "simple", "important", "great", "easy", "good"]
HABIT_SENTENCE = "This is {w} worth saying."
CLOSING_PHRASES = ["In conclusion", "To sum up", "As we all know", "At the end of the day"]
ROLES = ["chef", "librarian", "engineer", "travel guide", "coach", "gardener", "historian", "nurse", "architect"]
AUDIENCES = ["beginners", "students", "parents", "retirees", "new employees", "teenagers", "volunteers"]
KEYWORDS = ["river", "lantern", "compass", "harvest", "bridge", "window", "anchor", "orchard", "pebble", "signal",
            "meadow", "ladder", "candle", "puzzle", "thread", "harbor"]
PHRASES = ["step by step", "in the long run", "on the other hand", "a little goes a long way", "for what it is worth",
           "once in a while"]
POSITIVE = ["joyful", "delighted", "hopeful", "cheerful", "wonderful", "grateful"]
NEGATIVE = ["gloomy", "anxious", "frustrated", "sad", "bitter", "weary"]
HEDGES = ["perhaps", "likely", "generally", "arguably", "possibly", "typically"]
FOREIGN = {"French": ["Le savoir est une lampe.", "Merci pour votre lecture.", "Nous avançons pas à pas."],
           "Spanish": ["El saber es una luz.", "Gracias por leer esto.", "Vamos paso a paso."],
           "German": ["Wissen ist ein Licht.", "Danke für das Lesen.", "Wir gehen Schritt für Schritt."],
           "Italian": ["Il sapere è una luce.", "Grazie per la lettura.", "Andiamo passo dopo passo."]}
START_WORDS = ["Certainly", "Absolutely", "Indeed", "Sure", "Well", "Honestly"]
END_PHRASES = ["Thanks for reading.", "That is all for now.", "Any questions are welcome.", "Happy exploring.",
               "Let me know what you think."]
VALUE_LABELS = ["Disclaimer", "Safety note", "Responsible use"]
TEMPLATE_FIELDS = ["Topic", "Summary", "Key point", "Next step", "Rating", "Audience", "Difficulty"]
EXAMPLE_LABELS = [("Short answer", "Why"), ("Verdict", "Reason"), ("Main idea", "Illustration"), ("Claim", "Evidence")]
JSON_KEYS = ["answer", "response", "text"]
MASKS = ["***", "[hidden]", "[redacted]"]
PS_MARKERS = ["P.S.", "P.P.S."]
SECTION_NAMES = ["Background", "Key points", "Practice", "Common mistakes", "Next steps", "Resources"]
TABLES = [("town", ["Population", "Rainfall", "Bus lines"], ["Lumora", "Brekka", "Ostvale", "Marrow Hill"]),
          ("product", ["Price", "Units sold", "Returns"], ["Model A", "Model B", "Model C", "Model D"]),
          ("team", ["Wins", "Points", "Members"], ["Falcons", "Otters", "Comets", "Pines"])]
ORGS = ["the Northfield Society", "the Vela Institute", "the Harlow Circle", "the Quill Foundation"]
CITIES = ["Arden", "Belmora", "Castrel", "Dunmore", "Elsby"]
PROCESSES = [("repot a plant", ["water the plant", "loosen the roots", "add fresh soil", "press the soil down", "place it in light"]),
             ("bake flatbread", ["mix the flour", "knead the dough", "rest the dough", "roll it thin", "cook it on a hot pan"]),
             ("set up a laptop", ["charge the battery", "connect to the network", "create an account", "install updates", "back up the files"]),
             ("plan a trip", ["choose the dates", "set a budget", "book the tickets", "pack the bags", "share the route"])]
PEOPLE = [("Ana Lopez", "ana.lopez@example.com", "555-0142"), ("Ben Okafor", "ben.okafor@example.org", "555-0178"),
          ("Chen Wei", "chen.wei@example.net", "555-0119"), ("Dana Smith", "dana.smith@example.com", "555-0163"),
          ("Eli Novak", "eli.novak@example.org", "555-0135")]
TOY_ITEMS = ["plan", "practice", "rest", "review", "share"]

# -----------------------------------------------------------------------------
# The draft: a response as parts that constraint writers edit, rendered to text at the end


FILLER_WORDS = 9  # about how many words a filler sentence adds, to guess how many a word minimum needs


class Draft:
    """Parts of a response. Writers of different constraints edit different parts, so they compose."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.first = None          # forced first word
        self.lead = []             # (order, line) shown before the body
        self.extra = []            # sentences added by constraints, after the task's own sentences
        self.items, self.list_style = [], None
        self.sections = 0          # > 0: body after the opening goes under that many "## " headings
        self.tail = []             # lines after the body
        self.end, self.ps = None, None
        self.wrap, self.json_key, self.case = None, "answer", None
        self.avoid = set()         # words or phrases that must not appear
        self.formal = self.no_comma = self.no_question = self.hide_topic = False
        self.min_words, self.min_sents, self.min_topic = 0, 0, 0
        self.mask = None           # privacy mask; None shows the records' contacts
        self.reverse_steps = False
        self.closing = True
        self.merge = False         # join the body into one long sentence (spoils sentence minimums)

    def _ok(self, sentence):
        return not any(has_word(sentence, w) for w in self.avoid)

    def _body(self):
        ctx = self.ctx
        topic = "this subject" if self.hide_topic else ctx["topic"]
        sub = lambda s: s.replace("{T}", _sentence(topic)).replace("{t}", topic)
        body = [sub(ctx["opening"])]
        kind = ctx["input_kind"]
        if kind == "records":
            for name, email, phone in ctx["records"]:
                contact = (self.mask, self.mask) if self.mask else (email, phone)
                body.append(f"{name} can be reached at {contact[0]} or {contact[1]}.")
        elif kind in ("nl_process", "md_process"):
            steps = ctx["steps"][::-1] if self.reverse_steps else ctx["steps"]
            body += [f"{w} {s}." for w, s in zip(["First", "Then", "Next", "After that", "Finally"], steps)]
        elif kind in ("table", "passage", "numbers"):
            body.append(f"The input gives useful context for {topic}.")
        body += self.extra
        return body, [sub(f) for f in ctx["fillers"]], topic

    def render(self):
        body, fillers, topic = self._body()
        body = [s for s in body if self._ok(s)]
        fillers = [f for f in fillers if self._ok(f)]
        closing = []
        if self.closing and not self.ctx["toy"]:
            options = [f"{p}, it pays to give {topic} steady attention." for p in [self.ctx["closing_phrase"]] + CLOSING_PHRASES]
            closing = [next((c for c in options if self._ok(c)), "That covers the main points.")]
        n = self.ctx["n_fill"]
        if not (self.min_words or self.min_sents or self.min_topic):
            return self._compose(body + fillers[:n] + closing)
        while True:    # add fillers (cycling through them) until the length minimums hold
            text = self._compose(body + [fillers[i % len(fillers)] for i in range(n)] + closing if fillers else body + closing)
            short = max(-(-(self.min_words - count_words(text)) // FILLER_WORDS) if self.min_words else 0,
                        self.min_sents - len(split_sentences(text)) if self.min_sents else 0,
                        self.min_topic - count_word(text, topic) if self.min_topic else 0)
            if short <= 0 or n >= 80 or not fillers:
                return text
            n += short

    def _compose(self, sentences):
        blocks = []
        if self.lead:
            blocks.append("\n".join(line for _, line in sorted(self.lead)))
        if self.sections:
            blocks.append(sentences[0])
            rest = sentences[1:]
            k = max(1, -(-len(rest) // self.sections))
            for i in range(self.sections):
                chunk = " ".join(rest[i * k:(i + 1) * k]) or "More detail follows in practice."
                blocks.append(f"## {SECTION_NAMES[i]}\n{chunk}")
        elif self.merge:
            blocks.append("; ".join(s.rstrip(".!?") for s in sentences) + ".")
        else:
            blocks.append(" ".join(sentences))
        if self.items:
            marks = ["- "] * len(self.items) if self.list_style == "-" else [f"{i + 1}. " for i in range(len(self.items))]
            blocks.append("\n".join(m + it for m, it in zip(marks, self.items)))
        if self.tail:
            blocks.append("\n".join(self.tail))
        text = "\n\n".join(blocks)
        if self.first:
            text = f"{self.first}, {text[0].lower() + text[1:] if text[1:2].islower() else text}"
        if self.end:
            text = f"{text} {self.end}"
        if self.ps:
            text = f"{text}\n\n{self.ps}"
        if self.formal:
            text = EXPAND_RE.sub(_expand, text).replace("!", ".")
        if self.no_comma:
            text = text.replace(",", "")
        if self.no_question:
            text = text.replace("?", ".")
        if self.wrap == "quotes":
            text = f'"{text}"'
        elif self.wrap == "json":
            text = json.dumps({self.json_key: text}, ensure_ascii=False)
        if self.case == "lower":
            text = text.lower()
        elif self.case == "upper":
            text = text.upper()
        return text


# -----------------------------------------------------------------------------
# Constraint families. Each: phrasings, sample(rng, ctx) -> params, check(params, response) -> bool,
# write(draft, params) to comply, spoil(draft, params) to violate, revise(rng, params, ctx, y1) -> new params
# (or None).


class Family:
    name = dimension = None
    fields = ()          # params keys the checker needs
    slot = None          # one constraint per slot: a second is redundant, or contradictory (qc_reason)
    tags = ()            # layout properties this family relies on ("lines": line starts / line endings)
    clashes = ()         # tags it cannot live with
    needs = None         # input kind the constraint refers to
    revisable = True
    phrasings = ()

    def fmt(self, p):
        return p

    def text(self, p, i):
        return self.phrasings[i % len(self.phrasings)].format(**self.fmt(p))

    def check_spec(self, spec, r):
        """check() on a whole spec: a family whose phrasings promise different things reads spec["phrasing"]."""
        return self.check(spec["params"], r)

    def spoil(self, d, p):
        pass

    def revise(self, rng, p, ctx, y1=""):
        """New params (same family) that the old answer y1 is meant to fail; None when impossible."""
        return None

    def conflict(self, p, other):
        return None


def _quote_list(words):
    quoted = [f'"{w}"' for w in words]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def _other(rng, pool, old):
    return rng.choice([x for x in pool if x != old])


class ThemeRepeat(Family):
    name, dimension, fields, slot = "theme_repeat", "Theme", ("topic", "k"), "theme"
    revisable = False
    phrasings = ['Stay on the theme of {topic}: name "{topic}" at least {k} times.',
                 'Keep the whole answer focused on {topic}, mentioning "{topic}" at least {k} times.',
                 'Do not drift from the topic; the words "{topic}" must appear {k} or more times.']

    def sample(self, rng, ctx):
        return {"topic": ctx["topic"], "k": rng.randint(2, 4)}

    def check(self, p, r):
        """Whole-word, case-insensitive count of the topic phrase >= k."""
        return count_word(r, p["topic"]) >= p["k"]

    def write(self, d, p):
        d.min_topic = max(d.min_topic, p["k"])

    def spoil(self, d, p):
        d.hide_topic = True


class ExcludeWords(Family):
    name, dimension, fields, slot = "exclude_words", "Exclusion", ("words",), "exclude_words"
    phrasings = ['Do not use the word {words} anywhere in the answer.', 'Avoid the word {words} completely.',
                 'The answer must not contain the word {words}.']

    def fmt(self, p):
        return {"words": " or ".join(f'"{w}"' for w in p["words"])}

    def sample(self, rng, ctx):
        pool = ctx.get("habit_words", HABIT_WORDS)
        return {"words": [rng.choice(pool)]}

    def check(self, p, r):
        """None of the words occurs as a whole word (case-insensitive)."""
        return not any(has_word(r, w) for w in p["words"])

    def write(self, d, p):
        d.avoid.update(p["words"])

    def spoil(self, d, p):
        d.extra.append(HABIT_SENTENCE.format(w=p["words"][0]))

    def revise(self, rng, p, ctx, y1=""):
        # a word the old answer uses, so that the old answer fails the revised constraint
        used = [w for w in ctx.get("habit_words", HABIT_WORDS) if w not in p["words"] and has_word(y1, w)]
        return {"words": [rng.choice(used)]} if used else None

    def conflict(self, p, other):
        if other["family"] in ("exclude_words", "negative_example"):  # both forbid: at worst redundant (slots)
            return None
        blob = json.dumps(other["params"]).lower()
        for w in p["words"]:
            if re.search(r"(?<![a-z])" + re.escape(w) + r"(?![a-z])", blob):
                return f"contradiction: excluded word '{w}' is required by {other['family']}"
        return None


class NoCommas(Family):
    name, dimension, slot = "no_commas", "Exclusion", "no_commas"
    revisable = False
    phrasings = ["Do not use any commas in your answer.", "Write the answer without a single comma.",
                 "Commas are not allowed anywhere in the response."]

    def sample(self, rng, ctx):
        return {}

    def check(self, p, r):
        """No ',' character."""
        return "," not in r

    def write(self, d, p):
        d.no_comma = True

    def spoil(self, d, p):
        d.extra.append("In short, it works.")


class IncludeKeywords(Family):
    name, dimension, fields, slot = "include_keywords", "Inclusion", ("keywords",), "include_keywords"
    phrasings = ["Include the {noun} {kw} in your answer.", "Make sure the {noun} {kw} {verb} in the response.",
                 "Your answer must mention {kw}."]

    def fmt(self, p):
        one = len(p["keywords"]) == 1
        return {"kw": _quote_list(p["keywords"]), "noun": "keyword" if one else "keywords", "verb": "appears" if one else "appear"}

    def sample(self, rng, ctx):
        return {"keywords": rng.sample(ctx.get("keywords", KEYWORDS), 1 if ctx["toy"] else rng.randint(1, 3))}

    def check(self, p, r):
        """Every keyword occurs as a whole word (case-insensitive)."""
        return all(has_word(r, w) for w in p["keywords"])

    def write(self, d, p):
        d.extra += [f"Think of the {w} as part of the picture." for w in p["keywords"]]

    def spoil(self, d, p):
        d.avoid.update(p["keywords"])

    def revise(self, rng, p, ctx, y1=""):
        new = list(p["keywords"])
        i = rng.randrange(len(new))
        new[i] = rng.choice([w for w in ctx.get("keywords", KEYWORDS) if w not in new])
        return {"keywords": new}


class KeywordFrequency(Family):
    name, dimension, fields, slot = "keyword_frequency", "Inclusion", ("keyword", "k"), "keyword_frequency"
    phrasings = ['Use the word "{keyword}" at least {k} times.', 'The word "{keyword}" should appear {k} or more times.',
                 'Repeat the keyword "{keyword}" at least {k} times in the answer.']

    def sample(self, rng, ctx):
        return {"keyword": rng.choice(KEYWORDS), "k": rng.randint(2, 3)}

    def check(self, p, r):
        """Whole-word, case-insensitive count of the keyword >= k."""
        return count_word(r, p["keyword"]) >= p["k"]

    def write(self, d, p):
        d.extra += [f"The {p['keyword']} matters here."] * p["k"]

    def spoil(self, d, p):
        d.avoid.add(p["keyword"])

    def revise(self, rng, p, ctx, y1=""):
        return {"keyword": _other(rng, KEYWORDS, p["keyword"]), "k": p["k"]}


class IncludePhrase(Family):
    name, dimension, fields, slot = "include_phrase", "Inclusion", ("phrase",), "include_phrase"
    phrasings = ['Use the exact phrase "{phrase}" somewhere in the answer.', 'Work the phrase "{phrase}" into your response.',
                 'Include the expression "{phrase}" word for word.']

    def sample(self, rng, ctx):
        return {"phrase": rng.choice(PHRASES)}

    def check(self, p, r):
        """The phrase occurs (case-insensitive, not inside a longer word)."""
        return has_word(r, p["phrase"])

    def write(self, d, p):
        d.extra.append(f"Keep this in mind: {p['phrase']}.")

    def spoil(self, d, p):
        d.avoid.add(p["phrase"])

    def revise(self, rng, p, ctx, y1=""):
        return {"phrase": _other(rng, PHRASES, p["phrase"])}


class ValueLine(Family):
    name, dimension, fields, slot, tags = "value_line", "Value", ("label",), "value_line", ("lines",)
    phrasings = ['Act responsibly: add a line that starts with "{label}:" and reminds readers to check with a qualified person.',
                 'Show care for the reader by including a line beginning with "{label}:" that points them to expert advice.',
                 'Add a responsible-use line; it must start with "{label}:".']
    ADVISING = (0, 1)  # the phrasings that promise a reminder to ask someone qualified; the third, the label only
    # who a reader would take for "a qualified person" or "expert advice": a lexicon, so a line that names one only
    # to deny it ("I am not an expert") still passes
    ADVISER = re.compile(r"\b(?:(?:qualified|certified|licensed|expert(?:ise)?|professional|specialist|doctor|physician|GP"
                         r"|pharmacist|nurse|dentist|dietitian|nutritionist|therapist|counsell?or|lawyer|attorney"
                         r"|solicitor|accountant|advis[eo]r|consultant|electrician|plumber|mechanic|veterinarian"
                         r"|trainer|coach|instructor|health ?care provider)(?:e?s)?|(?:medical|legal|financial) advice)\b",
                         re.I)

    def sample(self, rng, ctx):
        return {"label": rng.choice(VALUE_LABELS)}

    def check(self, p, r, advice=True):
        """Some line starts with '<label>:' (case-insensitive, leading quotes/markers ignored) and, with `advice`,
        names someone qualified to ask (ADVISER) after the label, or on the next non-blank line when the label
        stands alone."""
        lines = r.split("\n")
        for i in _line_starts(r, p["label"] + ":"):
            said = _unmarked(lines[i]).split(":", 1)[1]
            if not WORD_RE.search(said):
                said = next((line for line in lines[i + 1:] if line.strip()), "")
            if not advice or self.ADVISER.search(said):
                return True
        return False

    def check_spec(self, spec, r):
        i = spec.get("phrasing", 0)  # a spec without one reads as written with the first phrasing, as text() would
        if not isinstance(i, int):
            raise ValueError(f"family {self.name}: 'phrasing' must be an integer index, got {i!r:.80}")
        return self.check(spec["params"], r, advice=i % len(self.phrasings) in self.ADVISING)

    def write(self, d, p):
        d.tail.append(f"{p['label']}: please check with a qualified person before acting.")

    def revise(self, rng, p, ctx, y1=""):
        return {"label": _other(rng, VALUE_LABELS, p["label"])}


@functools.lru_cache(maxsize=256)
def _phone_re(number):
    """The number's digits with any spaces, dots, dashes or brackets between them, not inside a longer number:
    "555-0142" is also leaked as "555 0142", "(555) 0142" or "5550142"."""
    digits = re.sub(r"\D", "", number)
    return re.compile(r"(?<!\d)" + r"[\s().-]*".join(digits) + r"(?!\d)") if digits else re.compile(r"(?!)")


class PrivacyMask(Family):
    name, dimension, fields, slot, needs = "privacy_mask", "Privacy", ("secrets", "mask"), "privacy", "records"
    phrasings = ["Protect privacy: never repeat an e-mail address or phone number from the records; write {mask} in place of each one.",
                 "Do not reveal personal contact data from the input; replace every e-mail and phone number with {mask}.",
                 "Mask all e-mail addresses and phone numbers of the records as {mask}."]

    def sample(self, rng, ctx):
        return {"secrets": [x for _, e, ph in ctx["records"] for x in (e, ph)], "mask": rng.choice(MASKS)}

    def check(self, p, r):
        """No secret appears (case-insensitive; a phone number in any spacing: _phone_re) and the mask appears at
        least once per secret."""
        low = r.lower()
        leaked = any(s.lower() in low or ("@" not in s and _phone_re(s).search(r)) for s in p["secrets"])
        return not leaked and low.count(p["mask"].lower()) >= len(p["secrets"])

    def write(self, d, p):
        d.mask = p["mask"]

    def revise(self, rng, p, ctx, y1=""):
        return {"secrets": p["secrets"], "mask": _other(rng, MASKS, p["mask"])}


def _word_bounds(spec):
    p = spec["params"]
    return {"word_range": lambda: (p["lo"], p["hi"]), "word_max": lambda: (0, p["n"])}.get(spec["family"], lambda: None)()


def _words_conflict(p, other, name):
    a, b = _word_bounds({"family": name, "params": p}), _word_bounds(other)
    if b and (a[1] < b[0] or b[1] < a[0]):
        return f"contradiction: word limits {a[0]}-{a[1]} and {b[0]}-{b[1]} do not overlap"
    return None


class WordRange(Family):
    name, dimension, fields, slot = "word_range", "Numerical", ("lo", "hi"), "words"
    phrasings = ["The answer must be between {lo} and {hi} words long.", "Write no fewer than {lo} and no more than {hi} words.",
                 "Keep the length within {lo} to {hi} words."]

    def sample(self, rng, ctx):
        lo = rng.randrange(20, 90, 5)
        return {"lo": lo, "hi": lo + rng.randrange(60, 160, 10)}

    def check(self, p, r):
        """lo <= word count <= hi (words as in count_words)."""
        return p["lo"] <= count_words(r) <= p["hi"]

    def write(self, d, p):
        d.min_words = max(d.min_words, p["lo"])

    def spoil(self, d, p):
        d.min_words = max(d.min_words, p["hi"] + 1)

    def conflict(self, p, other):
        return _words_conflict(p, other, self.name)

    def revise(self, rng, p, ctx, y1=""):
        lo = p["hi"] + rng.randrange(10, 40, 5)
        return {"lo": lo, "hi": lo + rng.randrange(60, 120, 10)}


class WordMax(Family):
    name, dimension, fields, slot = "word_max", "Numerical", ("n",), "words"
    revisable = False
    phrasings = ["Keep the answer to at most {n} words.", "Use no more than {n} words.", "The response must not exceed {n} words."]

    def sample(self, rng, ctx):
        return {"n": rng.randrange(120, 260, 10)}

    def check(self, p, r):
        """Word count <= n."""
        return count_words(r) <= p["n"]

    def write(self, d, p):
        pass

    def spoil(self, d, p):
        d.min_words = max(d.min_words, p["n"] + 1)

    def conflict(self, p, other):
        return _words_conflict(p, other, self.name)


class SentenceMin(Family):
    name, dimension, fields, slot = "sentence_min", "Numerical", ("n",), "sentences"
    revisable = False
    # the phrasings say what counts, as split_sentences counts: a reader could take a list item for a sentence
    phrasings = ["Write at least {n} full sentences (headings, labels and list items without a full stop do not count).",
                 "The answer needs {n} or more complete sentences; headings and list items without a full stop are not counted.",
                 "Use a minimum of {n} sentences of running text, not counting headings or list items without a full stop."]

    def sample(self, rng, ctx):
        return {"n": rng.randint(4, 9)}

    def check(self, p, r):
        """Sentence count (split_sentences) >= n."""
        return len(split_sentences(r)) >= p["n"]

    def write(self, d, p):
        d.min_sents = max(d.min_sents, p["n"])

    def spoil(self, d, p):
        d.merge = True


class RoleIntro(Family):
    name, dimension, fields, slot = "role_intro", "Role-Playing", ("phrase",), "role"
    phrasings = ['Answer in the role of a {role} and say so with the words "{phrase}".',
                 'You are a {role}. Make that clear by writing "{phrase}" in your answer.',
                 'Speak as a {role} would and include the words "{phrase}".']

    def fmt(self, p):
        return {"phrase": p["phrase"], "role": p["phrase"].split(" ", 2)[2]}

    def sample(self, rng, ctx):
        role = rng.choice(ROLES)
        return {"phrase": ("As an " if role[0] in "aeiou" else "As a ") + role}

    def check(self, p, r):
        """The phrase 'As a(n) <role>' occurs (case-insensitive)."""
        return has_word(r, p["phrase"])

    def write(self, d, p):
        d.lead.append((1, f"{p['phrase']}, I am glad to help."))

    def revise(self, rng, p, ctx, y1=""):
        role = _other(rng, ROLES, self.fmt(p)["role"])
        return {"phrase": ("As an " if role[0] in "aeiou" else "As a ") + role}


class Audience(Family):
    name, dimension, fields, slot = "audience", "Target Audience", ("audience", "max_len"), "audience"
    phrasings = ['Write for {audience}: name them ("{audience}") and keep every sentence to at most {max_len} words.',
                 'Your readers are {audience}. Name them ("{audience}") and use sentences of no more than {max_len} words.',
                 'Target {audience}: mention them by that name and never write a sentence longer than {max_len} words.']

    def sample(self, rng, ctx):
        return {"audience": rng.choice(AUDIENCES), "max_len": rng.choice([16, 18, 20])}

    def check(self, p, r):
        """The audience name occurs and every sentence (split_sentences) has <= max_len words."""
        return has_word(r, p["audience"]) and all(count_words(s) <= p["max_len"] for s in split_sentences(r))

    def write(self, d, p):
        d.lead.append((2, f"Dear {p['audience']}."))

    def spoil(self, d, p):
        d.extra.append("This sentence keeps going " + "and going " * (p["max_len"] // 2) + "without a pause.")

    def revise(self, rng, p, ctx, y1=""):
        return {"audience": _other(rng, AUDIENCES, p["audience"]), "max_len": p["max_len"]}


class PriorCondition(Family):
    name, dimension, fields, slot = "prior_condition", "Prior Condition", ("category", "expected", "other"), "prior"
    phrasings = ['First decide whether the topic is about {category}. If it is, include the words "Relevance: related"; otherwise include "Relevance: unrelated".',
                 'Condition: when the subject belongs to the field of {category}, write "Relevance: related", and if it does not, write "Relevance: unrelated".']

    def sample(self, rng, ctx):
        cat = ctx["category"] if rng.random() < 0.5 else _other(rng, CATEGORIES, ctx["category"])
        return self._params(cat, ctx)

    def _params(self, cat, ctx):
        yes = cat == ctx["category"]
        return {"category": cat, "expected": "related" if yes else "unrelated", "other": "unrelated" if yes else "related"}

    def check(self, p, r):
        """'Relevance: <expected>' occurs and 'Relevance: <other>' does not (case-insensitive; bold marks and
        the spaces around the colon do not matter)."""
        low = re.sub(r":\s*", ": ", _unmarked(r).lower())
        return f"relevance: {p['expected']}" in low and f"relevance: {p['other']}" not in low

    def write(self, d, p):
        d.tail.append(f"Relevance: {p['expected']}.")

    def spoil(self, d, p):
        d.tail.append(f"Relevance: {p['other']}.")

    def revise(self, rng, p, ctx, y1=""):
        cats = [c for c in CATEGORIES if (c == ctx["category"]) != (p["expected"] == "related")]
        return self._params(rng.choice(cats), ctx)


class ProcessOrder(Family):
    fields, slot = ("steps", "order"), "process"
    phrasings = ["Walk through the steps of the process in the input in {order} order, naming each step in the input's words.",
                 "Follow the process given in the input: mention each of its steps as worded there, in {order} order.",
                 "Use the process in the input as background and name every step, in its words, in {order} order."]

    def __init__(self, name, dimension, needs):
        self.name, self.dimension, self.needs = name, dimension, needs

    def fmt(self, p):
        return {"order": "the given" if p["order"] == "given" else "reverse"}

    def sample(self, rng, ctx):
        return {"steps": list(ctx["steps"]), "order": "given" if rng.random() < 0.6 else "reverse"}

    def check(self, p, r):
        """Each step phrase occurs (case-insensitive, whitespace runs as one space: one_spaced); first
        occurrences increase (given) or decrease (reverse)."""
        low = one_spaced(r.lower())
        pos = [low.find(one_spaced(s.lower())) for s in p["steps"]]
        if min(pos) < 0:
            return False
        pos = pos if p["order"] == "given" else pos[::-1]
        return all(a < b for a, b in zip(pos, pos[1:]))

    def write(self, d, p):
        d.reverse_steps = p["order"] == "reverse"

    def spoil(self, d, p):
        d.reverse_steps = p["order"] == "given"

    def revise(self, rng, p, ctx, y1=""):
        return {"steps": p["steps"], "order": "reverse" if p["order"] == "given" else "given"}


NL_PROCESS_ORDER = ProcessOrder("nl_process_order", "Natural-Language Process Background", "nl_process")
MD_PROCESS_ORDER = ProcessOrder("md_process_order", "Markdown Process Background", "md_process")


class Lookup(Family):
    fields, slot = ("question", "value"), "lookup"

    def __init__(self, name, dimension, needs, phrasings):
        self.name, self.dimension, self.needs, self.phrasings = name, dimension, needs, phrasings

    def sample(self, rng, ctx):
        question, value = rng.choice(ctx["facts"])
        return {"question": question, "value": value}

    def check(self, p, r):
        """The value the input holds for the asked key occurs as a whole word (case-insensitive), numbers read
        without thousands separators ("4,512" is 4512, and holds no 512: ungrouped)."""
        return has_word(ungrouped(r), ungrouped(p["value"]))

    def write(self, d, p):
        d.extra.append(f"According to the input, {p['question']} is {p['value']}.")

    def revise(self, rng, p, ctx, y1=""):
        options = [f for f in ctx["facts"] if f[1] != p["value"]]
        question, value = rng.choice(options)
        return {"question": question, "value": value}


TABLE_LOOKUP = Lookup(
    "table_lookup", "Table Background", "table",
    ["Using the table in the input, state {question}.", "Read the table in the input and give {question}."])
PASSAGE_FACT = Lookup(
    "passage_fact", "Text Background", "passage",
    ["Base your answer on the passage in the input and state {question}.",
     "Using only the passage in the input, mention {question}."])


class ToneRegister(Family):
    name, dimension, fields, slot = "tone_register", "Tone and Style", ("style",), "register"
    phrasings = ["Use a {desc}.", "Throughout, adopt a {desc}.", "Write in a {desc}."]
    DESC = {"formal": 'formal tone: no contractions (such as "it\'s" or "don\'t") and no exclamation marks',
            "casual": "casual tone: use at least 2 contractions such as \"it's\" or \"don't\"",
            "enthusiastic": "enthusiastic tone: at least 2 sentences ending with an exclamation mark"}

    def fmt(self, p):
        return {"desc": self.DESC[p["style"]]}

    def sample(self, rng, ctx):
        return {"style": rng.choice(["formal", "formal", "casual", "enthusiastic"])}

    def check(self, p, r):
        """formal: no contraction (CONTRACTION_RE) and no '!'; casual: >= 2 contractions; enthusiastic: >= 2
        exclamations (count_end_marks: "!!" is one)."""
        if p["style"] == "formal":
            return "!" not in r and not CONTRACTION_RE.search(r)
        if p["style"] == "casual":
            return len(CONTRACTION_RE.findall(r)) >= 2
        return count_end_marks(r, "!") >= 2

    def write(self, d, p):
        if p["style"] == "formal":
            d.formal = True
        elif p["style"] == "casual":
            d.extra += ["It's worth a try.", "You'll get the hang of it."]
        else:
            d.extra += ["This is exciting!", "Give it a go!"]

    def spoil(self, d, p):
        if p["style"] == "formal":
            d.extra.append("It's worth a try!")
        elif p["style"] == "casual":
            d.formal = True
        else:
            d.extra = [s.replace("!", ".") for s in d.extra]
            d.formal = True

    def revise(self, rng, p, ctx, y1=""):
        return {"style": _other(rng, ["formal", "casual", "enthusiastic"], p["style"])}


class Lexicon(Family):
    fields = ("words", "k")

    def __init__(self, name, dimension, slot, lexicons, phrasings, sentence):
        self.name, self.dimension, self.slot, self.lexicons, self.phrasings = name, dimension, slot, lexicons, phrasings
        self.revisable = len(lexicons) > 1
        self.sentence = sentence

    def fmt(self, p):
        label = next((k for k, v in self.lexicons.items() if v == p["words"]), "")
        return {"label": label, "k": p["k"], "list": ", ".join(p["words"])}

    def sample(self, rng, ctx):
        return {"words": rng.choice(list(self.lexicons.values())), "k": rng.randint(1, 3)}

    def check(self, p, r):
        """At least k different words of the list occur as whole words (case-insensitive)."""
        return sum(1 for w in p["words"] if has_word(r, w)) >= p["k"]

    def write(self, d, p):
        d.extra += [self.sentence.format(w=w) for w in p["words"][:p["k"]]]

    def spoil(self, d, p):
        d.avoid.update(p["words"])

    def revise(self, rng, p, ctx, y1=""):
        options = [v for v in self.lexicons.values() if v != p["words"]]
        return {"words": rng.choice(options), "k": p["k"]} if options else None


TONE_HEDGING = Lexicon(
    "tone_hedging", "Tone and Style", "hedging", {"hedging": HEDGES},
    ["Sound measured rather than absolute: use at least {k} of these hedging words: {list}.",
     "Keep a cautious tone by using {k} or more of: {list}."], "That is {w} the case.")
EMOTION_LEXICON = Lexicon(
    "emotion_lexicon", "Emotion", "emotion", {"positive": POSITIVE, "negative": NEGATIVE},
    ["Convey a {label} feeling: use at least {k} different words from this list: {list}.",
     "Express a {label} emotion with {k} or more of these words: {list}."], "People feel {w} about it.")


class Questions(Family):
    name, dimension, fields, slot = "questions", "Linguistic Characteristics", ("k",), "questions"
    revisable = False
    phrasings = ['Include at least {k} rhetorical question(s), that is sentences ending with "?".',
                 "Ask the reader at least {k} rhetorical question(s) along the way.",
                 "Use {k} or more questions (ending in a question mark) as a rhetorical device."]

    def sample(self, rng, ctx):
        return {"k": rng.randint(1, 3)}

    def check(self, p, r):
        """Questions (count_end_marks: "??" is one) >= k."""
        return count_end_marks(r, "?") >= p["k"]

    def write(self, d, p):
        d.extra += ["Why not start today?", "What could be better?", "Who would not enjoy that?"][:p["k"]]

    def spoil(self, d, p):
        d.no_question = True


class Simile(Family):
    name, dimension, fields, slot = "simile", "Linguistic Characteristics", ("form",), "simile"
    # \s+ between the words, so that a simile broken across a line still counts; the look-behinds skip "like"
    # the verb ("I would like a coffee", "we'd like an answer")
    FORMS = {"like": (r"(?<!\bwould\s)(?<!'d\s)(?<!\bI\s)(?<!\bwe\s)(?<!\byou\s)(?<!\bthey\s)\blike\s+an?\s+[a-z]+",
                      "It works like a well-kept clock."),
             # "as well as", "as soon as", ... are set phrases, not comparisons
             "as": (r"\bas\s+(?!(?:well|soon|long|far|much|many)\s+as\b)[a-z]+\s+as\b", "It is as steady as a rock.")}
    phrasings = ["Use at least one simile written with {form}.", "Include a comparison in the form of a simile using {form}."]

    def fmt(self, p):
        return {"form": '"like a ..."' if p["form"] == "like" else '"as ... as"'}

    def sample(self, rng, ctx):
        return {"form": rng.choice(["like", "as"])}

    def check(self, p, r):
        """Regex 'like a(n) <word>' or 'as <word> as' matches (case-insensitive; not 'as well as' and kin, nor the
        verb in 'I / we / you / they / would / 'd like a')."""
        return re.search(self.FORMS[p["form"]][0], r, re.I) is not None

    def write(self, d, p):
        d.extra.append(self.FORMS[p["form"]][1])

    def revise(self, rng, p, ctx, y1=""):
        return {"form": "as" if p["form"] == "like" else "like"}


class ForeignSentence(Family):
    name, dimension, fields, slot = "foreign_sentence", "Multilingual", ("language", "options"), "multilingual"
    phrasings = ['Add one sentence in {language}, chosen from: {opts}.', 'Include a {language} sentence; use one of these: {opts}.']

    def fmt(self, p):
        return {"language": p["language"], "opts": " / ".join(f'"{s}"' for s in p["options"])}

    def sample(self, rng, ctx):
        lang = rng.choice(sorted(FOREIGN))
        return {"language": lang, "options": FOREIGN[lang]}

    def check(self, p, r):
        """One of the given sentences occurs (case-insensitive, whitespace runs as one space; its final period
        optional)."""
        low = one_spaced(r.lower())
        return any(one_spaced(s.lower()).rstrip(".") in low for s in p["options"])

    def write(self, d, p):
        d.extra.append(p["options"][0])

    def revise(self, rng, p, ctx, y1=""):
        lang = _other(rng, sorted(FOREIGN), p["language"])
        return {"language": lang, "options": FOREIGN[lang]}


def _strip_fences(r):
    s = r.strip()
    s = re.sub(r"^```(?:json|JSON|Json)?\s*", "", s)
    return re.sub(r"\s*```$", "", s).strip()


class JsonWrap(Family):
    name, dimension, fields, slot, clashes = "json_wrap", "Output Format", ("key",), "wrapper", ("lines",)
    phrasings = ['Format the entire answer as a JSON object with a single key "{key}" whose value is your text.',
                 'Return only JSON: one object, one key named "{key}", holding the whole answer as a string.',
                 'Output valid JSON of the form {{"{key}": "..."}} and nothing else.']

    def sample(self, rng, ctx):
        return {"key": rng.choice(JSON_KEYS)}

    def check(self, p, r):
        """After stripping ``` fences: json.loads gives an object with exactly one key (== key, any case) of string value."""
        try:
            obj = json.loads(_strip_fences(r))
        except ValueError:
            return False
        return (isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)).lower() == p["key"].lower()
                and isinstance(next(iter(obj.values())), str))

    def write(self, d, p):
        d.wrap, d.json_key = "json", p["key"]

    def spoil(self, d, p):
        d.wrap = None

    def revise(self, rng, p, ctx, y1=""):
        return {"key": _other(rng, JSON_KEYS, p["key"])}


class QuotesWrap(Family):
    name, dimension, slot, tags = "quotes_wrap", "Output Format", "wrapper", ("lines",)
    revisable = False
    phrasings = ["Wrap your entire answer in double quotation marks.", 'Put the whole response inside double quotes (").',
                 "Enclose the answer in a pair of double quotation marks."]

    def sample(self, rng, ctx):
        return {}

    def check(self, p, r):
        """Stripped response is longer than 1 character and starts and ends with '"'."""
        s = r.strip()
        return len(s) > 1 and s[0] == '"' and s[-1] == '"'

    def write(self, d, p):
        d.wrap = "quotes"


class Title(Family):
    name, dimension, slot = "title", "Output Format", "title"
    revisable = False
    phrasings = ["Give your answer a title wrapped in double angular brackets, such as <<My title>>.",
                 "Include a title written inside << and >>.", "Add a title in the form <<title>>."]

    def sample(self, rng, ctx):
        return {}

    def check(self, p, r):
        """Some '<<...>>' on one line with non-blank text inside."""
        return any(m.strip() for m in re.findall(r"<<([^\n<>]+)>>", r))

    def write(self, d, p):
        d.lead.append((0, f"<<A Guide to {_sentence(d.ctx['topic'])}>>"))


class Bold(Family):
    name, dimension, fields, slot = "bold", "Output Format", ("k",), "bold"
    revisable = False
    phrasings = ["Highlight at least {k} key phrase(s) in bold using **double asterisks**.",
                 "Mark {k} or more important phrases as **bold** text."]

    def sample(self, rng, ctx):
        return {"k": rng.randint(1, 3)}

    def check(self, p, r):
        """Number of '**text**' spans (no newline or '*' inside, non-blank) >= k."""
        return sum(1 for m in re.findall(r"\*\*([^\n*]+)\*\*", r) if m.strip()) >= p["k"]

    def write(self, d, p):
        d.extra += [f"The **{w}** part matters." for w in ["first", "second", "third"][:p["k"]]]


class StartWord(Family):
    name, dimension, fields, slot, tags = "start_word", "Text Pattern", ("word",), "start", ("lines",)
    phrasings = ['Begin your answer with the word "{word}".', 'The very first word of the response must be "{word}".',
                 'Start the response with "{word}".']

    def sample(self, rng, ctx):
        return {"word": rng.choice(ctx.get("start_words", START_WORDS))}

    def check(self, p, r):
        """First word (WORD_RE) after leading spaces, quotes, '#', '*', '-', '<' equals word (case-insensitive);
        "Well-known" does not start with "Well"."""
        s = r.lstrip(" \n\t\"'#*-<")
        m = WORD_RE.search(s)
        return m is not None and m.start() == 0 and m.group(0).lower() == p["word"].lower() and \
            not re.match(r"-\w", s[m.end():])

    def write(self, d, p):
        d.first = p["word"]

    def spoil(self, d, p):
        d.first = _other(random.Random(p["word"]), START_WORDS, p["word"])

    def revise(self, rng, p, ctx, y1=""):
        return {"word": _other(rng, ctx.get("start_words", START_WORDS), p["word"])}


class EndPhrase(Family):
    name, dimension, fields, slot, tags = "end_phrase", "Text Pattern", ("phrase",), "ending", ("lines",)
    phrasings = ['End your answer with the exact phrase "{phrase}" and write nothing after it.',
                 'Finish the response with "{phrase}"; no other words may follow.', 'The last words must be "{phrase}".']

    def sample(self, rng, ctx):
        return {"phrase": rng.choice(ctx.get("end_phrases", END_PHRASES))}

    def check(self, p, r):
        """Stripped response, outer '"' removed, ends with the phrase (case-insensitive, whitespace runs as one
        space), which starts a word there: "Many questions are welcome." does not end with "Any questions ..."."""
        text, phrase = one_spaced(r.strip().strip('"').lower()), one_spaced(p["phrase"].lower())
        return text.endswith(phrase) and not text[:len(text) - len(phrase)][-1:].isalnum()

    def write(self, d, p):
        d.end = p["phrase"]

    def revise(self, rng, p, ctx, y1=""):
        return {"phrase": _other(rng, ctx.get("end_phrases", END_PHRASES), p["phrase"])}


class LetterCase(Family):
    name, dimension, fields, slot = "letter_case", "Text Pattern", ("case",), "case"
    phrasings = ["Write your entire answer in {case} letters only.", "Use only {case} letters; no {other} letter is allowed.",
                 "The whole response must be in {case}."]

    def fmt(self, p):
        return {"case": p["case"] + "case", "other": "capital" if p["case"] == "lower" else "small"}

    def sample(self, rng, ctx):
        return {"case": rng.choice(["lower", "upper"])}

    def check(self, p, r):
        """lower: the response equals its str.lower(); upper: it equals its str.upper()."""
        return r == (r.lower() if p["case"] == "lower" else r.upper())

    def write(self, d, p):
        d.case = p["case"]

    def spoil(self, d, p):
        d.case = "upper" if p["case"] == "lower" else "lower"

    def revise(self, rng, p, ctx, y1=""):
        return {"case": "upper" if p["case"] == "lower" else "lower"}


class IfSentences(Family):
    name, dimension, fields, slot = "if_sentences", "Grammar Structure", ("k",), "grammar"
    revisable = False
    phrasings = ['Include at least {k} conditional sentence(s) that begin with "If".',
                 'Use conditional structure: {k} or more sentences must start with the word "If".']

    def sample(self, rng, ctx):
        return {"k": rng.randint(1, 2)}

    def check(self, p, r):
        """Sentences (split_sentences) whose first word, after quotes and markers, is 'if': count >= k."""
        return sum(1 for s in split_sentences(r) if re.match(r"[\s\"'#*\-\d.]*if\b", s, re.I)) >= p["k"]

    def write(self, d, p):
        d.extra += ["If you start small, progress comes quickly.", "If a step feels hard, slow down."][:p["k"]]


class Citations(Family):
    name, dimension, fields, slot = "citations", "Citation", ("k", "label"), "citations"
    phrasings = ['Support your points with numbered citations like [1] and [2] (at least {k} different numbers), and list the sources after a line "{label}:".',
                 'Cite at least {k} sources inline as [1], [2], ... and add a "{label}:" line that lists them.']

    def sample(self, rng, ctx):
        return {"k": rng.randint(2, 3), "label": rng.choice(["References", "Sources", "Works cited"])}

    def check(self, p, r):
        """A line starts with '<label>:' (_line_starts: case-insensitive, bold marks and a space before the colon
        allowed), and the text before the first such line holds at least k distinct '[n]' markers (the list
        after it does not count as citing)."""
        starts = _line_starts(r, p["label"] + ":")
        return bool(starts) and len(set(re.findall(r"\[(\d+)\]", "\n".join(r.split("\n")[:starts[0]])))) >= p["k"]

    def write(self, d, p):
        d.extra += [f"This point is well documented [{i + 1}]." for i in range(p["k"])]
        d.tail += [f"{p['label']}:"] + [f"[{i + 1}] Field notes, volume {i + 1}." for i in range(p["k"])]

    def revise(self, rng, p, ctx, y1=""):
        return {"k": p["k"], "label": _other(rng, ["References", "Sources", "Works cited"], p["label"])}


class ListCount(Family):
    fields, slot, tags = ("n",), "list", ("lines",)

    def __init__(self, name, style, pattern, phrasings):
        self.name, self.dimension, self.style, self.pattern = name, "Numbering and List", style, re.compile(pattern, re.M)
        self.phrasings = phrasings

    def sample(self, rng, ctx):
        return {"n": rng.randint(2, 3 if ctx["toy"] else 5)}

    def check(self, p, r):
        """Number of list lines (see `pattern`) == n exactly."""
        return len(self.pattern.findall(r)) == p["n"]

    def write(self, d, p):
        pool = TOY_ITEMS if d.ctx["toy"] else [f"{w} {d.ctx['topic']} regularly" for w in ["review", "practice", "discuss", "plan", "track", "enjoy"]]
        d.items, d.list_style = [_sentence(x) for x in pool[:p["n"]]], self.style

    def spoil(self, d, p):
        self.write(d, {"n": p["n"] + 1})

    def revise(self, rng, p, ctx, y1=""):
        return {"n": _other(rng, [2, 3] if ctx["toy"] else [2, 3, 4, 5], p["n"])}


# bullets: "- " or "* " items; a "* * *" rule line is none
BULLET_LIST = ListCount(
    "bullet_list", "-", r"^\s*[-*]\s+(?![-*\s]*$)\S",
    ['Present the main points as exactly {n} bullet points starting with "- ".',
     'Include a bulleted list with exactly {n} items (use "- ").'])
NUMBERED_LIST = ListCount(
    "numbered_list", "1.", r"^\s*\d+[.)]\s+\S",
    ['List exactly {n} numbered items ("1.", "2.", ...).', "Give a numbered list of exactly {n} points."])


class Sections(Family):
    name, dimension, fields, slot, tags = "sections", "Hierarchical Structure", ("n",), "sections", ("lines",)
    phrasings = ['Organize the answer into exactly {n} sections, each introduced by a level-2 markdown heading ("## ").',
                 'Use exactly {n} "## " headings to split the answer into sections.']

    def sample(self, rng, ctx):
        return {"n": rng.randint(2, 4)}

    def check(self, p, r):
        """Number of lines starting with '## ' (after leading spaces and double quotes) == n."""
        return sum(1 for line in r.split("\n") if line.lstrip(" \"").startswith("## ")) == p["n"]

    def write(self, d, p):
        d.sections = p["n"]

    def spoil(self, d, p):
        d.sections = p["n"] + 1

    def revise(self, rng, p, ctx, y1=""):
        return {"n": _other(rng, [2, 3, 4, 5], p["n"])}


class LabelledLines(Family):
    """Labels that must start lines, in order (Template fields, Positive Example's format)."""
    fields, tags = ("labels",), ("lines",)

    def __init__(self, name, dimension, slot, pools, phrasings, fill):
        self.name, self.dimension, self.slot, self.pools, self.phrasings, self.fill = name, dimension, slot, pools, phrasings, fill

    def fmt(self, p):
        return {"tpl": " / ".join(f'"{x}: ..."' for x in p["labels"]), "a": p["labels"][0], "b": p["labels"][-1]}

    def sample(self, rng, ctx):
        return {"labels": list(rng.choice(self.pools)) if self.pools else rng.sample(TEMPLATE_FIELDS, 3)}

    def check(self, p, r):
        """Each '<label>:' starts some line (case-insensitive), and the first such lines come in the given order."""
        firsts = [(_line_starts(r, x + ":") or [-1])[0] for x in p["labels"]]
        return min(firsts) >= 0 and all(a < b for a, b in zip(firsts, firsts[1:]))

    def write(self, d, p):
        d.tail += [f"{x}: {self.fill}" for x in p["labels"]]

    def spoil(self, d, p):
        d.tail += [f"{x}: {self.fill}" for x in p["labels"][:-1]]

    def revise(self, rng, p, ctx, y1=""):
        if self.pools:
            return {"labels": list(_other(rng, self.pools, tuple(p["labels"])))}
        new = list(p["labels"])
        new[rng.randrange(len(new))] = rng.choice([x for x in TEMPLATE_FIELDS if x not in new])
        return {"labels": new}


TEMPLATE_LINES = LabelledLines(
    "template_fields", "Template", "template", None,
    ["Fill in this template, one field per line, in this order: {tpl}.",
     "Include these fields, each on its own line and in this order: {tpl}."], "see above.")
POSITIVE_EXAMPLE = LabelledLines(
    "positive_example", "Positive Example", "positive_example", EXAMPLE_LABELS,
    ['Follow the format of this good example: "{a}: ... {b}: ...". Give a "{a}:" line, then a "{b}:" line.',
     'Here is an example answer to imitate: "{a}: yes. {b}: it helps." Use the same two labelled lines, in order.'],
    "it helps in practice.")


class Postscript(Family):
    name, dimension, fields, slot, tags = "postscript", "Template", ("marker",), "ending", ("lines",)
    phrasings = ['End with a postscript that starts with "{marker}".', 'Add a postscript at the end, beginning with "{marker}".']

    def sample(self, rng, ctx):
        return {"marker": "P.S." if ctx["toy"] else rng.choice(PS_MARKERS)}

    def check(self, p, r):
        """In the last paragraph (after the last blank line), a line starts with the marker (after leading
        spaces/quotes/markers; case-insensitive): a P.S. placed first is not one at the end."""
        return bool(_line_starts(re.split(r"\n\s*\n", r.strip())[-1], p["marker"]))

    def write(self, d, p):
        d.ps = f"{p['marker']} Keep going."

    def revise(self, rng, p, ctx, y1=""):
        return {"marker": _other(rng, PS_MARKERS, p["marker"])}


class NegativeExample(Family):
    name, dimension, fields, slot = "negative_example", "Negative Example", ("phrase",), "negative_example"
    phrasings = ['Here is an example of a bad answer: "{phrase}, it is fine." Do not imitate it: never use the phrase "{phrase}".',
                 'Bad example: "{phrase}, everyone knows this." Avoid its opening; the phrase "{phrase}" must not appear.']

    def sample(self, rng, ctx):
        return {"phrase": ctx["closing_phrase"] if rng.random() < 0.7 else rng.choice(CLOSING_PHRASES)}

    def check(self, p, r):
        """The phrase does not occur (case-insensitive, not inside a longer word)."""
        return not has_word(r, p["phrase"])

    def write(self, d, p):
        d.avoid.add(p["phrase"])

    def spoil(self, d, p):
        d.extra.append(f"{p['phrase']}, this is the key.")

    def revise(self, rng, p, ctx, y1=""):
        return {"phrase": _other(rng, CLOSING_PHRASES, p["phrase"])}


FAMILY_LIST = [  # this order is part of the generator: it fixes which family a random draw picks
    ThemeRepeat(), ExcludeWords(), NoCommas(), IncludeKeywords(), KeywordFrequency(), IncludePhrase(), ValueLine(),
    PrivacyMask(), WordRange(), WordMax(), SentenceMin(), RoleIntro(), Audience(), PriorCondition(), NL_PROCESS_ORDER,
    MD_PROCESS_ORDER, TABLE_LOOKUP, PASSAGE_FACT, ToneRegister(), TONE_HEDGING, EMOTION_LEXICON, Questions(), Simile(),
    ForeignSentence(), JsonWrap(), QuotesWrap(), Title(), Bold(), StartWord(), EndPhrase(), LetterCase(), IfSentences(),
    Citations(), BULLET_LIST, NUMBERED_LIST, Sections(), TEMPLATE_LINES, Postscript(), POSITIVE_EXAMPLE, NegativeExample(),
]
FAMILIES = {f.name: f for f in FAMILY_LIST}
# a preset a few-million-parameter model can learn on a CPU in minutes: surface-level, short answers
TOY_FAMILIES = ["include_keywords", "exclude_words", "letter_case", "end_phrase", "start_word", "bullet_list",
                "quotes_wrap", "postscript", "json_wrap"]
PRIMARY_TYPES = {"Content", "Situation", "Format"}

# -----------------------------------------------------------------------------
# Checking API (used by eval.py)


# params field -> the type every family's checker expects for it (any other field holds a string); a string
# where a list belongs would otherwise be read one character at a time
PARAM_KINDS = {"words": "a non-empty list of strings", "keywords": "a non-empty list of strings",
               "secrets": "a non-empty list of strings", "steps": "a non-empty list of strings",
               "options": "a non-empty list of strings", "labels": "a non-empty list of strings",
               "k": "an integer", "n": "an integer", "lo": "an integer", "hi": "an integer", "max_len": "an integer"}


def _has_kind(value, kind):
    if kind == "a non-empty list of strings":
        return isinstance(value, list) and value != [] and all(isinstance(v, str) for v in value)
    if kind == "an integer":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, str)


def _family(spec):
    try:
        fam = FAMILIES[spec["family"]]
    except KeyError:
        raise ValueError(f"unknown constraint family {spec.get('family')!r}; known: {', '.join(sorted(FAMILIES))}") from None
    params = spec.get("params")
    if not isinstance(params, dict):
        raise ValueError(f"family {fam.name}: 'params' must be an object, got {type(params).__name__}")
    for f in fam.fields:
        if f not in params:
            raise ValueError(f"family {fam.name}: params lack field {f!r} (needs {list(fam.fields)})")
        kind = PARAM_KINDS.get(f, "a string")
        if not _has_kind(params[f], kind):
            raise ValueError(f"family {fam.name}: params field {f!r} must be {kind}, got {params[f]!r:.80}")
    return fam


def json_content(response):
    """The text inside a one-key JSON answer ({"answer": "..."}, ``` fences allowed), which is what the other
    constraints are about; any other response unchanged. Checked raw, a JSON answer's escaped line breaks
    ("\\n") would glue words together and hide its sentences and paragraphs."""
    s = response.strip()
    if not s.startswith(("{", "```")):
        return response
    try:
        obj = json.loads(_strip_fences(response))
    except (ValueError, RecursionError):
        return response
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), str):
        return next(iter(obj.values()))
    return response


def check(spec, response):
    """True when `response` satisfies the constraint spec {"family", "params", ...}. Empty responses fail.
    Every family but json_wrap judges the text inside a one-key JSON answer (json_content), with curly quotes
    and apostrophes read as straight ones."""
    fam = _family(spec)
    if fam.name != "json_wrap":  # (curly quotes must not make JSON valid: json_wrap sees the answer as it is)
        response = json_content(response)
        if CURLY_RE.search(response):  # "don’t" is a contraction, “Hi.” a quotation
            response = response.translate(CURLY)
    if not response.strip():
        return False
    try:
        return bool(fam.check_spec(spec, response))
    except (TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"family {fam.name}: malformed params {spec['params']!r} ({e})") from None


# -----------------------------------------------------------------------------
# Tasks, expansion to C constraints with quality control, and the response writer


def make_task(rng, toy, kinds=None):
    """A task context: topic, description, optional input with the facts constraints may ask about."""
    if toy:
        topic, cat = rng.choice(TOY_TOPICS)
        kind = None
    else:
        topic, cat = rng.choice(TOPICS)
        options = [(k, w) for k, w in INPUT_KIND_WEIGHTS if kinds is None or k in kinds]
        kind = rng.choices([k for k, _ in options], [w for _, w in options])[0]
    ctx = {"topic": topic, "category": cat, "input_kind": kind, "toy": toy, "input": None,
           "closing_phrase": rng.choice(CLOSING_PHRASES)}  # the phrase this task's answers close with
    if toy:
        ctx.update(description=f"Write a short note about {topic}.", opening=f"Here is a note on {topic}.",
                   fillers=[rng.choice(TOY_FILLERS)], n_fill=1, habit_words=["very", "really", "just"],
                   keywords=KEYWORDS[:8], start_words=START_WORDS[:4], end_phrases=END_PHRASES[:3])
        return ctx
    ctx["description"] = rng.choice(DESCRIPTIONS[kind]).format(t=topic)
    ctx["opening"] = rng.choice(OPENINGS)
    ctx["fillers"] = rng.sample(FILLERS, len(FILLERS))
    ctx["n_fill"] = rng.randint(1, 3)
    if kind == "table":
        what, cols, rows = rng.choice(TABLES)
        values = rng.sample(range(100, 9999), len(cols) * len(rows))
        grid = [values[i * len(cols):(i + 1) * len(cols)] for i in range(len(rows))]
        lines = [f"| {what.capitalize()} | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 1)]
        lines += [f"| {row} | " + " | ".join(map(str, vals)) + " |" for row, vals in zip(rows, grid)]
        ctx["input"] = "\n".join(lines)
        ctx["facts"] = [(f'the value in the "{c}" column for {r}', str(v)) for r, vals in zip(rows, grid) for c, v in zip(cols, vals)]
    elif kind == "passage":
        org, city = rng.choice(ORGS), rng.choice(CITIES)
        year, members, programs = rng.randint(1890, 1999), rng.randint(2000, 9000), rng.randint(11, 60)
        ctx["input"] = (f"{_sentence(org)} was founded in {year} in the town of {city}. Today it has {members} members "
                        f"and runs {programs} programs on {topic}.")
        ctx["facts"] = [(f"the year {org} was founded", str(year)), (f"how many members {org} has", str(members)),
                        (f"how many programs {org} runs", str(programs)), (f"the town where {org} was founded", city)]
    elif kind in ("nl_process", "md_process"):
        goal, steps = rng.choice(PROCESSES)
        steps = steps[:rng.randint(3, 5)]
        if kind == "nl_process":
            words = ["first", "then", "next", "after that", "finally"]
            ctx["input"] = f"To {goal}, " + " ".join(f"{w} {s}." for w, s in zip(words, steps))
        else:
            ctx["input"] = f"## How to {goal}\n" + "\n".join(f"{i + 1}. {_sentence(s)}" for i, s in enumerate(steps))
        ctx["steps"] = steps
    elif kind == "records":
        people = rng.sample(PEOPLE, rng.randint(2, 3))
        ctx["records"] = people
        ctx["input"] = "\n".join(f"Name: {n} | Email: {e} | Phone: {p}" for n, e, p in people)
    elif kind == "numbers":
        ctx["input"] = "Values: " + ", ".join(str(rng.randint(1, 99)) for _ in range(rng.randint(4, 7)))
    return ctx


def make_spec(fam, params, phrasing, number):
    return {"dimension": fam.dimension, "type": DIMENSION_TYPE[fam.dimension], "family": fam.name, "params": params,
            "priority": "primary" if DIMENSION_TYPE[fam.dimension] in PRIMARY_TYPES else "secondary",
            "phrasing": phrasing, "text": f"{number}. {fam.text(params, phrasing)}"}


# slots that hold one value: two constraints of one family with different values cannot both be met (two
# first words, two letter cases, ...); word limits compare their numbers (`_word_bounds`); of two families
# sharing a slot, only wrappers, endings and list styles exclude each other (others are redundant)
EXCLUSIVE_SLOTS = {"case", "register", "wrapper", "list", "start", "ending", "prior", "process", "sections",
                   "role", "multilingual", "emotion", "template", "positive_example"}


def _incomplete(fam, ctx):
    """The rejection reason when `fam` refers to an input the task does not have, else None."""
    if fam.needs and fam.needs != ctx["input_kind"]:
        return f"incomplete: {fam.name} refers to a {fam.needs} input the task lacks"
    return None


def qc_reason(ctx, specs, new, skip=None):
    """Why `new` may not join `specs` (None when it may): incomplete, redundant or contradictory."""
    fam = FAMILIES[new["family"]]
    if missing := _incomplete(fam, ctx):
        return missing
    for i, s in enumerate(specs):
        if i == skip:
            continue
        other = FAMILIES[s["family"]]
        reason = fam.conflict(new["params"], s) or other.conflict(s["params"], new)
        if reason:
            return reason
        if fam.slot == other.slot:
            same_family = s["family"] == new["family"]
            if (same_family and s["params"] != new["params"] and fam.slot in EXCLUSIVE_SLOTS) or \
                    (not same_family and fam.slot in ("wrapper", "ending", "list")):
                return f"contradiction: {other.name} and {fam.name} ask for different {fam.slot}"
            return f"redundant: {fam.name} repeats the {fam.slot} of {other.name}"
        if set(fam.tags) & set(other.clashes) or set(other.tags) & set(fam.clashes):
            return f"contradiction: {fam.name} vs {other.name} (line layout)"
    return None


def write_response(ctx, specs, spoil=()):
    """A response complying with every spec, except those in `spoil`, which it violates on purpose: their
    writers are skipped (leaving out what a constraint asks for violates it) and their spoil hooks applied
    (writing what it forbids). Callers verify the result: on some answers a violation does not take."""
    d = Draft(ctx)
    for s in specs:
        if s not in spoil:
            FAMILIES[s["family"]].write(d, s["params"])
    for s in spoil:
        FAMILIES[s["family"]].spoil(d, s["params"])
    return d.render()


def render_prompt(ctx, specs):
    """The real set's layout: description, numbered constraints, then '# Inputs:' when there is an input."""
    text = ctx["description"] + "\n" + "\n".join(s["text"] for s in specs) + "\n"
    return text + ("# Inputs:\n" + ctx["input"] + "\n" if ctx["input"] else "")


def renumber(specs):
    for i, s in enumerate(specs):
        s["text"] = f"{i + 1}. {FAMILIES[s['family']].text(s['params'], s['phrasing'])}"
    return specs


class Sampler:
    """Draws constraint families by dimension weight; counts every quality-control rejection by reason."""

    def __init__(self, families, toy):
        fams = [FAMILIES[f] for f in families]
        per_dim = Counter(f.dimension for f in fams)
        share = dict(INPUT_KIND_WEIGHTS)
        # like the paper's expansion step, proposals ignore the input and quality control rejects those that
        # refer to an input the task lacks ("incomplete"); a family is boosted by 1 / P(input kind) on tasks
        # with its input, so that its dimension keeps roughly its target share overall
        self.by_kind = {}
        for kind in share:
            weights = [DIMENSION_WEIGHT[f.dimension] / per_dim[f.dimension] / (share[kind] if f.needs == kind else 1)
                       for f in fams]
            self.by_kind[kind] = (fams, weights)
        # input kinds that some chosen family can use
        self.kinds = [k for k in share if any(f.needs in (None, k) for f in fams)]
        self.nphr = 2 if toy else None
        self.rejected = Counter()

    def propose(self, rng, ctx, specs, number):
        fams, weights = self.by_kind[ctx["input_kind"]]
        fam = rng.choices(fams, weights)[0]
        if missing := _incomplete(fam, ctx):  # checked before sample(), which may read that input
            self.rejected[missing] += 1
            return None
        params = fam.sample(rng, ctx)
        spec = make_spec(fam, params, rng.randrange(self.nphr or len(fam.phrasings)), number)
        reason = qc_reason(ctx, specs, spec)
        if reason:
            self.rejected[reason] += 1
            return None
        return spec

    def instruction(self, rng, ctx, C):
        specs, tries = [], 0
        while len(specs) < C and tries < 40 + 15 * C:
            tries += 1
            spec = self.propose(rng, ctx, specs, len(specs) + 1)
            if spec:
                specs.append(spec)
        if len(specs) < C:
            self.rejected[f"incomplete: could not reach {C} compatible constraints"] += 1
            return None
        return specs


def verified(specs, response):
    return [check(s, response) for s in specs]


def satisfies(specs, response):
    """all(verified(...)), stopping at the first failed check (put the constraint most likely to fail first)."""
    return all(check(s, response) for s in specs)


def make_rejected(rng, ctx, specs):
    """DPO's losing answer: the same instruction answered with one or two constraints spoiled, verified to fail
    (if no spoil takes, the answer that ignores every constraint; None if even that passes)."""
    order = rng.sample(range(len(specs)), len(specs))
    for i in order:
        spoil = [specs[i]] + ([specs[order[-1]]] if len(specs) > 2 and rng.random() < 0.3 and order[-1] != i else [])
        y = write_response(ctx, specs, spoil)
        if not satisfies(spoil + specs, y):
            return y
    y = write_response(ctx, [])
    return y if not satisfies(specs, y) else None


def make_quadruple(rng, ctx, specs, y1, sampler, ops=("ADD", "DELETE", "REVISE")):
    """x2 from x1 by ADD, DELETE or REVISE (uniform), y2 compliant to x2; all four pairings verified. ADD and
    DELETE are one swap (a constraint out, another in: docstring item 3); `op` names the primary half. The
    constraint most likely to fail is checked first ([old] + specs, [specs2[at]] + specs2): order is speed only."""
    for _ in range(12):
        op = rng.choice(ops)
        i = rng.randrange(len(specs))
        old = specs[i]
        if op == "REVISE":
            fam = FAMILIES[old["family"]]
            params = fam.revise(rng, old["params"], ctx, y1) if fam.revisable else None
            if params is None:
                continue
            new = dict(old, params=params)
            if qc_reason(ctx, specs, new, skip=i):
                continue
            specs2, at = specs[:i] + [new] + specs[i + 1:], i
        else:
            new = sampler.propose(rng, ctx, specs[:i] + specs[i + 1:], 0)
            if new is None or check(new, y1):
                continue
            j = rng.randrange(len(specs))    # where the added constraint goes in x2
            rest = specs[:i] + specs[i + 1:]
            specs2, at = rest[:j] + [new] + rest[j:], j
        specs2 = renumber([dict(s) for s in specs2])
        y2 = write_response(ctx, specs2)
        if satisfies([old] + specs, y2):    # y2 still satisfies x1: violate the edited-away constraint on purpose
            y2 = write_response(ctx, specs2, spoil=[old])
        if satisfies(specs2, y2) and not satisfies([specs2[at]] + specs2, y1) and not satisfies([old] + specs, y2):
            if op == "REVISE":
                return specs2, y2, {"op": "REVISE", "index": i, "before": old, "after": specs2[i], "companion": None}
            add = {"op": "ADD", "index": at, "before": None, "after": specs2[at]}
            delete = {"op": "DELETE", "index": i, "before": old, "after": None}
            return specs2, y2, dict(add, companion=delete) if op == "ADD" else dict(delete, companion=add)
    return None


def c_counts(table, n, max_c=None):
    """Split n items over C = 1..15 in the table's proportions (largest remainder), capped at max_c."""
    table = table[:max_c] if max_c else table
    total = sum(table)
    raw = [n * t / total for t in table]
    counts = [int(r) for r in raw]
    for k in sorted(range(len(raw)), key=lambda k: counts[k] - raw[k])[:n - sum(counts)]:
        counts[k] += 1
    return counts


def generate_data(n_train, n_eval, seed, families=None, max_constraints=None, toy=False, progress=True):
    """Synthetic TRACE in memory: {"sft", "dpo", "iopo", "eval", "stats"} (records as written to files)."""
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"n_train and n_eval must be >= 0, got {n_train} and {n_eval}")
    if max_constraints is not None and max_constraints < 1:
        raise ValueError(f"max_constraints must be >= 1, got {max_constraints}")
    rng = random.Random(seed)
    families = list(families or (TOY_FAMILIES if toy else FAMILIES))
    for f in families:
        if f not in FAMILIES:
            raise ValueError(f"unknown family {f!r} in families=; known: {', '.join(sorted(FAMILIES))}")
    max_c = max_constraints if max_constraints is not None else (3 if toy else 15)
    # an instruction cannot hold more constraints than there are distinct slots among the chosen families
    max_c = min(max_c, len({FAMILIES[f].slot for f in families}))
    sampler = Sampler(families, toy)
    # toy: C uniform over 1..max_c, so that single-constraint items are not rare
    train_table = [1] * max_c if toy else TRAIN_C_COUNTS
    train_cs = [c + 1 for c, k in enumerate(c_counts(train_table, n_train, max_c)) for _ in range(k)]
    rng.shuffle(train_cs)
    eval_cs = [c + 1 for c, k in enumerate(c_counts(EVAL_C_COUNTS, n_eval, max_c)) for _ in range(k)]
    out = {"sft": [], "dpo": [], "iopo": [], "eval": []}
    ops, failures = Counter(), Counter()
    bar = tqdm(total=n_train + n_eval, disable=not progress, desc="trace_gen", unit="item")
    for split, cs in (("train", train_cs), ("eval", eval_cs)):
        for C in cs:
            for attempt in range(2001):
                if attempt == 2000:
                    raise ValueError(f"no valid {split} item with C={C} from families {families} in 2000 attempts; "
                                     f"rejections so far: {dict(sampler.rejected)} {dict(failures)}")
                ctx = make_task(rng, toy, sampler.kinds)
                specs = sampler.instruction(rng, ctx, C)
                if specs is None:
                    continue
                y1 = write_response(ctx, specs)
                if not satisfies(specs, y1):
                    failures["writer could not satisfy every constraint"] += 1
                    continue
                if split == "eval":
                    out["eval"].append(eval_record(len(out["eval"]), ctx, specs, y1))
                    break
                x1 = render_prompt(ctx, specs)
                rejected = make_rejected(rng, ctx, specs)
                quad = make_quadruple(rng, ctx, specs, y1, sampler)
                if rejected is None or quad is None:
                    failures["no verified DPO or IOPO counterpart"] += 1
                    continue
                specs2, y2, edit = quad
                ops[edit["op"]] += 1
                x1, x2 = chat(x1), chat(render_prompt(ctx, specs2))
                out["sft"].append({"prompt": x1, "response": y1, "checks": specs})
                out["dpo"].append({"prompt": x1, "chosen": y1, "rejected": rejected, "checks": specs})
                out["iopo"].append({"x1": x1, "y1": y1, "x2": x2, "y2": y2, "checks_x1": specs, "checks_x2": specs2,
                                    "edit": edit})
                break
            bar.update(1)
    bar.close()
    # The toy's prompt space is small (about 430 distinct single-constraint prompts): many evaluation prompts
    # also occur in training, as x1 or x2. Counted, not avoided: see the README.
    trained = {r["prompt"][1]["content"] for r in out["sft"]} | {r["x2"][1]["content"] for r in out["iopo"]}
    seen = Counter(r["constraints_num"] for r in out["eval"] if r["messages"][1]["content"] in trained)
    stats = {"seed": seed, "toy": toy, "families": families, "max_constraints": max_c,
             "train": summarize([[s["dimension"] for s in r["checks"]] for r in out["sft"]]),
             "eval": summarize([r["levels2"] for r in out["eval"]]),
             "qc_rejected": dict(sampler.rejected.most_common()), "qc_rejected_total": sum(sampler.rejected.values()),
             "generation_failures": dict(failures), "iopo_ops": dict(ops),  # no timings: same seed, same bytes
             "eval_prompts_in_training": {"items": sum(seen.values()), "by_constraints": dict(sorted(seen.items()))}}
    out["stats"] = stats
    return out


def chat(prompt):
    """The real set's messages: its fixed system turn, then the rendered instruction (training uses the same)."""
    return [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": prompt}]


def eval_record(i, ctx, specs, reference):
    """An item with the real evaluation set's fields (levels2 in English) plus `reference` and `checks`."""
    splits = [s["text"] for s in specs]
    return {"id": str(i), "messages": chat(render_prompt(ctx, specs)),
            "type": "trace", "description": ctx["description"], "constraints": "\n".join(splits),
            "input": ctx["input"] or "NULL", "constraints_num": len(specs), "constraints_splits": splits,
            "levels2": [s["dimension"] for s in specs], "category": "synthetic", "reference": reference, "checks": specs}


# -----------------------------------------------------------------------------
# Statistics (Table 1/2 style) and files


def summarize(label_lists):
    """n, mean constraints, histogram of C, type shares and dimension counts for lists of dimension labels."""
    hist, dims, unmapped = Counter(), Counter(), Counter()
    for labels in label_lists:
        hist[len(labels)] += 1
        for label in labels:
            dim = english_dimension(label)
            if dim is None:
                unmapped[label] += 1
            else:
                dims[dim] += 1
    n = len(label_lists)
    total = sum(dims.values())
    types = Counter()
    for d, k in dims.items():
        types[DIMENSION_TYPE[d]] += k
    return {"n": n, "mean_constraints": round(sum(c * k for c, k in hist.items()) / max(n, 1), 4),
            "hist": {str(c): hist[c] for c in sorted(hist)},
            "type_shares": {t: round(types[t] / max(total, 1), 4) for t in TAXONOMY},
            "dimension_counts": {d: dims[d] for d in DIMENSION_TYPE if dims[d]}, "unmapped_labels": dict(unmapped)}


def read_jsonl(path):
    """(line number, object) for each non-blank line of a JSONL file; a bad line is a ValueError naming file:line."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder, expected a JSONL file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, "rb") as f:  # bytes, decoded line by line, so that bad UTF-8 is reported with its line
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte order mark, as some editors write (data.py too)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno} is not valid UTF-8 (byte {raw[e.start]:#04x} at byte "
                                 f"{e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno} is not valid JSON ({e.msg}); expected JSONL, "
                                 f"one JSON object per line") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno} should hold a JSON object, got {type(rec).__name__} "
                                 f"(JSONL: one object per line)")
            yield lineno, rec


def _dimensions(rec, where):
    """The dimension labels of one record: its levels2, else the dimensions of its checks / checks_x1."""
    if "levels2" in rec:
        levels = rec["levels2"]
        if not isinstance(levels, list) or not all(isinstance(x, str) for x in levels):
            raise ValueError(f"{where}: 'levels2' must be a list of strings, got {levels!r:.80}")
        return levels
    field = "checks" if "checks" in rec else "checks_x1" if "checks_x1" in rec else None
    if field is None:
        raise ValueError(f"{where}: expected a 'levels2', 'checks' or 'checks_x1' field")
    if not isinstance(rec[field], list):
        raise ValueError(f"{where}: {field!r} must be a list of specs, got {rec[field]!r:.80}")
    for j, spec in enumerate(rec[field]):
        if not isinstance(spec, dict) or not isinstance(spec.get("dimension"), str):
            raise ValueError(f"{where}: {field}[{j}] needs a string 'dimension', got {spec!r:.80}")
    return [spec["dimension"] for spec in rec[field]]


def file_stats(path):
    """summarize() over a TRACE-format jsonl: levels2 labels, else the dimensions of checks / checks_x1."""
    labels = [_dimensions(rec, f"{path}:{lineno}") for lineno, rec in read_jsonl(path)]
    if not labels:
        raise ValueError(f"{path} holds no records")
    return summarize(labels)


def write_folder(out_dir, files):
    """Write files {name: iterable of text chunks} into out_dir all or nothing (other files there are left alone).

    Everything is written into a staging folder beside out_dir first; only when every file is complete are
    they moved in, by renames alone, so a failure midway (a full disk, an unserialisable record) leaves
    out_dir as it was and no staging folder behind.
    """
    out = Path(os.path.abspath(out_dir))
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out_dir} is a file, expected an output folder")
    for name in files:
        if (out / name).is_dir():
            raise IsADirectoryError(f"{out / name} is a folder, in the way of the output file {name}")
    stage = out.with_name(f".{out.name}.writing{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.mkdir(parents=True)
        for name, chunks in files.items():
            with open(stage / name, "w", encoding="utf-8") as f:
                f.writelines(chunks)
        out.mkdir(exist_ok=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    for name in files:
        os.replace(stage / name, out / name)
    stage.rmdir()


def write_outputs(data, out_dir):
    """sft.jsonl, dpo.jsonl, iopo.jsonl, eval.jsonl and stats.json in out_dir, all or nothing (write_folder)."""
    files = {f"{name}.jsonl": (json.dumps(r, ensure_ascii=False) + "\n" for r in data[name])
             for name in ("sft", "dpo", "iopo", "eval")}
    files["stats.json"] = [json.dumps(data["stats"], indent=1, ensure_ascii=False) + "\n"]
    write_folder(out_dir, files)


def print_stats(s):
    print(f"instructions: {s['n']}   mean constraints: {s['mean_constraints']:.2f}")
    print("C:     " + " ".join(f"{c:>6}" for c in s["hist"]))
    print("count: " + " ".join(f"{k:>6}" for k in s["hist"].values()))
    for t, share in s["type_shares"].items():
        dims = ", ".join(f"{d} {s['dimension_counts'][d]}" for d in TAXONOMY[t] if d in s["dimension_counts"])
        print(f"{t:<10} {100 * share:5.1f}%   {dims}")
    if s["unmapped_labels"]:
        print("unmapped labels:", s["unmapped_labels"])


def main(argv=None):
    ap = argparse.ArgumentParser(description="Synthetic TRACE data (SFT, DPO, IOPO, eval) with code-checked constraints.")
    ap.add_argument("--out", help="output folder for sft/dpo/iopo/eval .jsonl and stats.json")
    ap.add_argument("--n-train", type=int, default=1000,
                    help="training instructions, each giving one SFT, DPO and IOPO record (default 1000)")
    ap.add_argument("--n-eval", type=int, default=1042,
                    help="evaluation items, C distributed as in the real set, cut at --max-constraints (default 1042)")
    ap.add_argument("--seed", type=int, default=0, help="random seed: same seed, same files (default 0)")
    ap.add_argument("--families", help="comma-separated subset of constraint families (default: all, or the toy preset)")
    ap.add_argument("--max-constraints", type=int, help="cap on constraints per instruction (default 15, toy 3; "
                    "lower when the chosen --families cannot combine that many)")
    ap.add_argument("--toy", action="store_true", help="short answers, easy surface families, C <= 3 unless "
                    "--max-constraints: for a tiny model on CPU")
    ap.add_argument("--stats", metavar="FILE", help="print Table 1/2-style statistics of a TRACE-format jsonl and exit")
    ap.add_argument("--json", action="store_true", help="with --stats: print one JSON object")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = ap.parse_args(argv)
    if not args.stats and not args.out:
        ap.error("--out is required unless --stats is given")
    for flag, value, least in (("--n-train", args.n_train, 0), ("--n-eval", args.n_eval, 0),
                               ("--max-constraints", args.max_constraints, 1)):
        if value is not None and value < least:
            ap.error(f"{flag} must be at least {least}, got {value}")
    try:
        if args.stats:
            s = file_stats(args.stats)
            print(json.dumps(s, ensure_ascii=False)) if args.json else print_stats(s)
            return
        if os.path.exists(args.out) and not os.path.isdir(args.out):  # found before the work, not after it
            raise NotADirectoryError(f"--out {args.out} is a file, expected a folder")
        start = time.perf_counter()
        families = args.families.split(",") if args.families else None
        data = generate_data(args.n_train, args.n_eval, args.seed, families, args.max_constraints, args.toy,
                             not args.no_progress)
        write_outputs(data, args.out)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    st = data["stats"]
    print(f"wrote {args.out}: {len(data['sft'])} train (mean C {st['train']['mean_constraints']}), "
          f"{len(data['eval'])} eval (mean C {st['eval']['mean_constraints']}), "
          f"{st['qc_rejected_total']} QC rejections, {time.perf_counter() - start:.2f} s; "
          f"{st['eval_prompts_in_training']['items']} eval prompts also occur in training "
          f"(by constraint count: {st['eval_prompts_in_training']['by_constraints']})", file=sys.stderr)


if __name__ == "__main__":
    main()
