"""Generate answers with a model and score them: TRACE (IF-S / IF-M), CFBench-style CSR / ISR / PSR, IFEval.

Toy run on the CPU, then a real checkpoint (see `python eval.py <command> --help`):

    python iopo.py     # the toy reproduction: writes runs/toy/seed0/{data, sft, dpo, iopo}
    python eval.py trace  --data runs/toy/seed0/data/eval.jsonl --model runs/toy/seed0/iopo/final
        # -> runs/eval/trace-iopo
    python eval.py trace  --data runs/trace/eval.jsonl --model runs/q7/final --out runs/trace_q7
        # (trace_gen.py's paper-scale set: the released TRACE items carry no code checks to score with)
    python eval.py ifeval --input ../shared/data/ifeval_input_data.jsonl --model runs/q7/final --out runs/ifeval_q7
    python eval.py compare runs/trace_q7 runs/ifeval_q7   # Table 3 layout: one row per label (here: q7)

Follows: IOPO (arXiv 2411.06208) Table 3 for the metric set; CFBench (arXiv 2408.01122) for CSR / ISR / PSR;
IFEval (arXiv 2311.07911) for its 25 verifiable instruction types, strict and loose.

What we simplify or leave out:
1. TRACE constraints are judged by trace_gen.py's deterministic checkers, not by a GPT-4o judge as in the
   paper; our CFBench numbers are those formulas applied to the same per-constraint verdicts.
2. IFEval's official scorer calls langdetect and NLTK. We re-implement what it needs from scratch: a
   script-and-stopword language identifier, a Punkt-style English sentence splitter (on NLTK's learned
   English tables: abbreviations, sentence starters, collocations, and in punkt_english.txt which words it
   saw in lower case) and a Treebank-style tokenizer for counting capitalised words. Where these can
   disagree is listed in the README.
3. Two IFEval prompts ask for the frequency of "#" / "!" in `letter_frequency`; the official code swaps in a
   random letter there, so its verdict is random; we give the verdict it reaches for most letters.

Reading order: after the file helpers, about 370 lines of text tools that IFEval needs (language
identification, sentence splitting, word tokens) can be skipped on a first reading; the scoring starts at
"IFEval: the 25 instruction types", then TRACE and CFBench's metrics, generation, and the command line.
"""

import argparse
import collections
import functools
import inspect
import json
import re
import unicodedata
from pathlib import Path

from tqdm import tqdm

import model as M
import trace_gen

# -----------------------------------------------------------------------------
# Small file helpers


def read_numbered(path):
    """(line number, dict) for each record of a JSONL file; a bad line stops the command with its file and line."""
    try:
        return list(trace_gen.read_jsonl(path))
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def read_jsonl(path):
    """Read a JSONL file into a list of dicts; a bad line stops the command with its file and line."""
    return [rec for _, rec in read_numbered(path)]


def write_atomic(path, text):
    """Write text to path through a temporary file in the same folder (model.write_atomic), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    M.write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def jsonl_text(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def json_text(obj):
    return json.dumps(obj, ensure_ascii=False, indent=2) + "\n"


def write_jsonl(path, rows):
    write_atomic(path, jsonl_text(rows))


# -----------------------------------------------------------------------------
# Language identification (stands in for langdetect in IFEval's language checks)
#
# langdetect scores character n-grams against 55 Wikipedia-trained profiles. We decide in two steps that
# rarely disagree with it on real answers: the writing system with the most letters picks a group of
# languages, and inside a group that several languages share (Latin, Cyrillic, Arabic, Devanagari) each
# sentence votes, with its length, for the language whose common function words (and telling letters and word
# endings) it holds most; the language with the longest share of the text wins. Like langdetect, URLs and
# e-mail addresses are ignored, Latin letters are ignored when characters above U+0300 outnumber them more
# than two to one, and a text without any letter from a known script has no answer (IFEval then counts the
# instruction as followed).
#
# Very short Latin texts are a lottery for langdetect: it picks among 55 languages from a handful of letter
# n-grams (an all-capitals word only shows it its first and last letters; the README gives examples). For
# such texts (at most three words, in capitals or with no function word, telling letter or ending) we answer
# "und", undetermined, which is not English, rather than guess.

_SCRIPTS = [  # (first, last code point, script group, or for a one-language script its langdetect code);
    # ASCII and the Latin blocks are handled apart
    (0x0370, 0x03FF, "greek"), (0x0400, 0x052F, "cyrillic"), (0x0590, 0x05FF, "hebrew"),
    (0x0600, 0x06FF, "arabic"), (0x0750, 0x077F, "arabic"), (0x0900, 0x097F, "devanagari"),
    (0x0980, 0x09FF, "bn"), (0x0A00, 0x0A7F, "pa"), (0x0A80, 0x0AFF, "gu"), (0x0B80, 0x0BFF, "ta"),
    (0x0C00, 0x0C7F, "te"), (0x0C80, 0x0CFF, "kn"), (0x0D00, 0x0D7F, "ml"), (0x0E00, 0x0E7F, "th"),
    (0x1100, 0x11FF, "ko"), (0x3040, 0x30FF, "ja"), (0x3130, 0x318F, "ko"), (0x4E00, 0x9FFF, "zh-cn"),
    (0xAC00, 0xD7AF, "ko"), (0xFB50, 0xFDFF, "arabic"), (0xFE70, 0xFEFF, "arabic"),
]

# Frequent function words per language (our own short lists). Latin-script languages outside IFEval's set
# (es, fr, nl) are there so that, say, Spanish is not called Portuguese just because pt is the only option.
_STOPWORDS = {
    "latin": {
        "en": "the and of to a in is that it for was on are with as be this have not but by from they you or an "
              "at his her we can will which their there all would so if more what about one do also has been "
              "were when how your these some into other only than then its our them may just like should "
              "could because most such each many much very who",
        "de": "der die das und ist nicht ein eine zu den von mit sich des auf für im dem auch es als an wird "
              "werden sind bei oder wie aus nach noch ich sie er wir ihr aber einen einer kann zum zur über "
              "dass nur um hat haben wenn sehr",
        "it": "il di che la è e per un una non in del della le dei delle sono con si da al alla lo gli anche "
              "come più ma questo questa nel nella ha essere ci mi io ti loro può tra sul molto",
        "pt": "de que o a do da em um uma para é com não os as dos das no na por mais se ao como mas foi ele "
              "ela seu sua ou são também pelo pela isso está muito você nos já eu",
        "es": "el la de que y en los las del se por un una con no es para al lo como más pero sus le ya o "
              "este si porque esta entre cuando muy sin sobre también me hasta hay donde",
        "fr": "le la les de des et un une est en du que qui dans pour pas sur au avec ce il elle ne se sont "
              "plus par mais nous vous ou aux cette été être fait comme",
        "nl": "de het een en van is dat op te zijn niet met voor die er maar om als ook aan door bij wordt "
              "naar dit werd kan hij ze zij nog wel geen",
        "sw": "na ya wa za kwa ni la katika kuwa cha vya ili hii kama lakini pia au huu hiyo sana yake wako "
              "zaidi kila mimi wewe yeye sisi wao hakuna kutoka watu ndani baada kabla",
        "fi": "ja on ei se että oli ovat mutta kun tai myös joka hän ne kuin jos niin tämä sen voi olla mitä "
              "vain ole siitä sekä minä sinä me te he kanssa jo nyt",
        "vi": "và của là có không những được các cho một người trong với này đã để từ khi như đến cũng thì "
              "nhưng rất sẽ ra đó làm nhiều",
    },
    "devanagari": {
        "hi": "है के में की और का को से हैं यह एक पर भी नहीं कि था लिए ने हो तो इस कर जो गया या होता वह आप हम थे रहा",
        "mr": "आहे आणि या च्या हे ते की व ला मध्ये आहेत होते करण्यासाठी तो ती त्या काही म्हणून पण असे नाही होता "
              "आपण तुम्ही झाले",
        "ne": "छ र मा हो गर्न पनि यो त्यो लागि भएको गरेको छन् थियो तथा भने हुन्छ हुने गरी रहेको तपाईं हामी",
    },
    "arabic": {
        "ar": "في من على إلى أن عن مع هذا هذه التي الذي كان ما لا هو هي كل بين أو قد ذلك ثم لم عند",
        "fa": "و در به از که این را با است برای آن یک تا می خود هم بر شد شده کرد نیز ها او اما یا",
        "ur": "کے میں کی ہے اور سے کا کو یہ ہیں نے پر بھی ایک تھا کہ جو ہو گا وہ لیے کر تو",
    },
    "cyrillic": {
        "ru": "и в на не с что это как по но о от к из он она они для у же так все его был было быть мы вы я "
              "только",
        "bg": "е да се за че са това той тя те ще към си след което му беше бъде",
        "uk": "і в на не що з та до у як це для від але він вона вони бути є так або",
    },
}
_STOPWORDS = {group: {lang: set(words.split()) for lang, words in langs.items()}
              for group, langs in _STOPWORDS.items()}
_WORD_EDGES = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~«»“”‘’،؛؟।॥…—–0123456789"
_URL_RE = re.compile(r"https?://[-_.?&~;+=/#0-9A-Za-z]{1,2076}")
_EMAIL_RE = re.compile(r"[-_.0-9A-Za-z]{1,64}@[-_0-9A-Za-z]{1,255}[-_.0-9A-Za-z]{1,255}")


def _script_of(ch):
    cp = ord(ch)
    if ch.isascii():
        return "latin" if ch.isalpha() else None
    if cp < 0x250 or 0x1E00 <= cp <= 0x1EFF:  # Latin-1, Latin Extended A/B and Additional (Vietnamese)
        return "latin" if ch.isalpha() else None
    for lo, hi, script in _SCRIPTS:
        if lo <= cp <= hi:  # vowel signs and other marks count with their script, as in langdetect's n-grams
            return script
    return None


# Letters (and word endings) that tell apart languages sharing a script, with the weight of each hit.
_LETTER_HINTS = {
    "latin": {"fi": ("äöÄÖ", 1), "de": ("üßÜ", 1), "pt": ("ãõÃÕ", 1)},
    "cyrillic": {"ru": ("ыэёЫЭЁ", 3), "uk": ("іїєґІЇЄҐ", 3), "bg": ("ъЪ", 2)},
    "arabic": {"ur": ("ٹڈڑںےۓھہۃ", 3), "fa": ("پچژگکی", 1), "ar": ("يكةىأإ", 1)},
}
_ENDING_HINTS = {
    "latin": {"fi": ("ssa", "ssä", "sta", "stä", "lla", "llä", "lle", "ksi", "nen", "aan", "ään", "isi", "ssaan")},
    "cyrillic": {"bg": ("ата", "ото", "ите", "ът", "ят", "ета", "ия"),
                 "ru": ("ый", "ой", "ая", "ое", "ые", "ого", "ему", "ться", "ешь", "ие")},
    "devanagari": {"ne": ("को", "मा", "हरू", "हरु", "छ", "छन्", "ियो"), "mr": ("च्या", "ची", "चा", "चे", "ांना", "ाची", "ून", "ले")},
}


_SENTENCE_OR_LINE_RE = re.compile(r"(?<=[.!?。！？।۔؟])\s+|\n+")


def _function_word_votes(text, script):
    """{language: evidence in text} inside one script group: function words, telling letters, word endings."""
    words = [w.strip(_WORD_EDGES) for w in text.lower().split()]  # not \w+: it breaks Indic words at vowel signs
    score = {lang: sum(w in stop for w in words) for lang, stop in _STOPWORDS[script].items()}
    for lang, (letters, weight) in _LETTER_HINTS.get(script, {}).items():
        score[lang] += weight * sum(text.count(c) for c in letters)
    for lang, endings in _ENDING_HINTS.get(script, {}).items():
        score[lang] += sum(1 for w in words if len(w) > 3 and w.endswith(endings))
    return score


def detect_language(text):
    """ISO 639-1 code of the main language of text (langdetect's codes); "und" for a Latin text of at most
    three words in capitals or with no function word, telling letter or ending (see above: counted as not
    English); None when it has no usable letters."""
    text = _EMAIL_RE.sub(" ", _URL_RE.sub(" ", text))
    # langdetect drops Latin letters when characters above U+0300 (marks and symbols included) outnumber them
    # more than two to one; its "Latin" is the range A..z.
    n_latin = sum(1 for ch in text if "A" <= ch <= "z")
    n_other = sum(1 for ch in text if ch >= "\u0300" and not 0x1E00 <= ord(ch) <= 0x1EFF)
    counts = collections.Counter(_script_of(ch) for ch in text)
    counts.pop(None, None)
    if n_latin * 2 < n_other:
        counts.pop("latin", None)
    if not counts:
        return None
    script = max(counts, key=lambda s: (counts[s], s == "latin"))
    if script == "latin" and sum(1 for ch in text if 0x1EA0 <= ord(ch) <= 0x1EF9 or ch in "ơưđƠƯĐ") * 20 >= counts["latin"]:
        return "vi"  # Vietnamese tone marks (Latin Extended Additional) are not used by any other language
    if script not in _STOPWORDS:
        return {"greek": "el", "hebrew": "he"}.get(script, script)
    words = [w for w in (w.strip(_WORD_EDGES) for w in text.lower().split()) if w]
    if script == "latin" and len(words) <= 3 and (not any(_function_word_votes(text, script).values())
                                                  or text.isupper()):
        return "und"  # too little evidence for langdetect to settle on English: see the note above
    # Each sentence (or line) votes for its language with its length, so that one English sentence among
    # Swahili ones does not win on English's denser function words; langdetect, too, reads the whole text.
    share = collections.Counter()
    for part in _SENTENCE_OR_LINE_RE.split(text):
        votes = _function_word_votes(part, script)
        if any(votes.values()):
            share[max(votes, key=votes.get)] += len(part)  # ties go to the first listed language
    if not share:
        votes = _function_word_votes(text, script)
        return max(votes, key=votes.get)
    return max(share, key=share.get)


# -----------------------------------------------------------------------------
# English sentence splitting (stands in for NLTK's Punkt, which IFEval uses to count sentences)
#
# Punkt (Kiss & Strunk 2006) marks a token ending in "." as a sentence break unless the word is a known
# abbreviation, then revisits each "." with the token after it: a numbered item ("3.") or an initial ("J.")
# followed by a lower-case word is not a break, an abbreviation followed by a typical sentence starter is.
# The three tables below are the learned English parameters that NLTK ships (punkt_tab/english); the fourth,
# how each of 20k words was written (lower case, capitalised inside or at the start of a sentence), is too big
# to list here: punkt_english.txt keeps the two word sets that the decisions need. Like NLTK, the splitter
# learns nothing from the text it splits, so a sentence count depends on that text alone.

_PUNKT_ABBREVIATIONS = set("""
a.a a.c a.d a.g a.h a.m a.m.e a.s a.t adm ala ariz aug ave b.f b.v bros c c.i.t c.o.m.b c.v calif chg cie co
col colo conn corp cos ct d d.c d.h d.w dec dr e e.f e.h e.l e.m f f.g f.j feb fla fri ft g g.d g.f g.k ga gen
h h.c h.f h.m i.m.s ill inc j.b j.c j.j j.k j.p j.r jan jr k kan ky l l.a l.f l.p lt ltd m m.b.a m.d.c m.j maj
messrs mg mich minn mr mrs ms n n.c n.d n.h n.j n.m n.v n.y nev nov oct ok okla ore p p.a.m p.m pa ph.d prof r
r.a r.h r.i r.j r.k r.t rep reps s s.a s.a.y s.c s.g s.p.a s.s sen sep sept sr st sw t t.j tenn tues u.k u.n
u.s u.s.a u.s.s.r v va vs vt w w.c w.r w.va w.w wash wed wis yr
""".split()) | {". . "}  # the last one: the type Punkt learned for a spaced ellipsis ". . ."
_PUNKT_SENT_STARTERS = set("""
according although among both but despite even he however i if in indeed instead it many meanwhile moreover
most nevertheless nonetheless nor sales separately similarly since so some the there these they this though
thus under when while yet
""".split())
_PUNKT_COLLOCATIONS = {("##number##", w) for w in """abreast aes business cbot colgate commodities cooper
corrections credit dividend financing genentech henley insider international leisure letters notable pay-fone
pegasus pepper review rj wedgestone who zimmer""".split()} | {
    ("b", "edelman"), ("b", "levine"), ("b", "smith"), ("b", "stewart"), ("b", "wigton"), ("i", "magnin"),
    ("i", "toussie"), ("j", "aron"), ("j", "fialka"), ("j", "walter"), ("o", "ludcke")}

_NON_WORD = r"(?:[)\";}\]\*:@\'\({\[\u2018\u2019\u201c\u201d\xab\xbb?!])"  # chars that end a word token
_MULTI_PUNCT = r"(?:\-{2,}|\.{2,}|(?:\.\s){2,}\.)"  # dashes "--" and ellipses
_PUNKT_WORD_RE = re.compile(
    rf"{_MULTI_PUNCT}|(?=[^\(\"\`{{\[:;&\#\*@\)}}\]\-,])\S+?(?=\s|$|{_NON_WORD}|{_MULTI_PUNCT}"
    rf"|,(?=$|\s|{_NON_WORD}|{_MULTI_PUNCT}))|\S")
_PERIOD_CONTEXT_RE = re.compile(rf"[.?!](?=(?P<after_tok>{_NON_WORD}|\s+(?P<next_tok>\S+)))")
_REALIGN_RE = re.compile(r'["\')\]}\u2018\u2019\u201c\u201d\xab\xbb]+?(?:\s+|(?=--)|$)', re.MULTILINE)
_NUMBER_RE = re.compile(r"^-?[\.,]?\d[\d,\.-]*\.?$")


class _PunktToken:
    """One word of a candidate break's context, with the flags Punkt sets on it."""

    def __init__(self, tok):
        self.tok = tok
        self.type = _NUMBER_RE.sub("##number##", tok.lower())
        self.period_final = tok.endswith(".")
        self.is_initial = re.match(r"[^\W\d]\.$", tok) is not None
        self.first_upper, self.first_lower = tok[0].isupper(), tok[0].islower()
        self.sentbreak = self.abbr = self.ellipsis = False

    def type_no_period(self):
        return self.type[:-1] if len(self.type) > 1 and self.type.endswith(".") else self.type

    def type_no_sentperiod(self):
        return self.type_no_period() if self.sentbreak else self.type


def read_word_table(path):
    """The [start] and [lower] word sets of punkt_english.txt: words that NLTK's English Punkt model saw in lower
    case and capitalised only at sentence starts, and words it saw in lower case and also capitalised inside."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the word table of the sentence splitter is missing (it ships with eval.py)")
    sections, current = {}, None
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("#") or not line.strip():
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[] "), set())
        elif current is None:
            raise ValueError(f"{path}:{lineno}: words before the first [section] header")
        else:
            current.update(line.split())
    if set(sections) != {"start", "lower"}:
        raise ValueError(f"{path}: expected the sections [start] and [lower], found {sorted(sections)}")
    return sections["start"], sections["lower"]


@functools.lru_cache(maxsize=None)
def _punkt_lowercase_words():
    """(sure sentence starters, every word seen in lower case), read once."""
    start, lower = read_word_table(Path(__file__).with_name("punkt_english.txt"))
    return frozenset(start), frozenset(start | lower)


def _ortho_says_start(tok):
    """Punkt's orthographic heuristic: True / False / 'unknown' for 'tok starts a sentence'.

    A capitalised word that NLTK's corpus only ever capitalised at sentence starts surely starts one; a
    lower-case word never does (NLTK also answers 'unknown' for 4 odd words of its table that were never seen
    capitalised, such as "b-week"; we ignore them).
    """
    if tok.tok in (";", ":", ",", ".", "!", "?"):
        return False
    if tok.first_lower:
        return False
    sure_starters, _ = _punkt_lowercase_words()
    return True if tok.type_no_sentperiod() in sure_starters else "unknown"


def _seen_lowercase(word_type):
    return word_type in _punkt_lowercase_words()[1]


def _contains_sentbreak(context):
    """Annotate the words of one candidate break's context; True if a break is followed by another token."""
    toks = []
    for line in context.split("\n"):
        toks.extend(_PunktToken(t) for t in _PUNKT_WORD_RE.findall(line))
    for t in toks:  # first pass: what each token looks like on its own
        if t.tok in (".", "?", "!"):
            t.sentbreak = True
        elif re.match(r"\.\.+$", t.tok):
            t.ellipsis = True
        elif t.period_final and not t.tok.endswith(".."):
            stem = t.tok[:-1].lower()
            if stem in _PUNKT_ABBREVIATIONS or stem.split("-")[-1] in _PUNKT_ABBREVIATIONS:
                t.abbr = True
            else:
                t.sentbreak = True
    for t, nxt in zip(toks, toks[1:]):  # second pass: revisit a final "." in the light of the next token
        if not t.period_final:
            continue
        typ, next_typ = t.type_no_period(), nxt.type_no_sentperiod()
        if (typ, next_typ) in _PUNKT_COLLOCATIONS:  # (Punkt also marks t an abbreviation here; nothing reads it)
            t.sentbreak = False
        elif (t.abbr or t.ellipsis) and not t.is_initial:
            if _ortho_says_start(nxt) is True or (nxt.first_upper and next_typ in _PUNKT_SENT_STARTERS):
                t.sentbreak = True
        elif t.is_initial or typ == "##number##":
            says = _ortho_says_start(nxt)
            if says is False or (says == "unknown" and t.is_initial and nxt.first_upper
                                 and not _seen_lowercase(next_typ)):
                t.sentbreak = False
    return any(t.sentbreak for t in toks[:-1])


def _candidate_breaks(text):
    """Each '.', '?' or '!' that may end a sentence, with its context: the word before it and the token after."""
    prev_match, prev_span = None, (0, 0)
    for m in _PERIOD_CONTEXT_RE.finditer(text):
        before = text[prev_span[1]:m.start()]
        last_space = max((i for i, c in enumerate(before) if c in " \t\n\r\x0b\x0c"), default=0)
        # NLTK treats a space at offset 0 like no space at all; we keep that quirk to count the same.
        start = last_space + prev_span[1] + 1 if last_space else prev_span[0]
        if prev_match is not None and prev_span[1] <= start:  # overlapping runs like "!!!" keep the last one
            yield prev_match, text[prev_span[0]:prev_span[1]] + prev_match.group() + prev_match.group("after_tok")
        prev_match, prev_span = m, (start, m.start())
    if prev_match is not None:
        yield prev_match, text[prev_span[0]:prev_span[1]] + prev_match.group() + prev_match.group("after_tok")


def split_sentences(text):
    """Split English text into sentences the way NLTK's Punkt does (closing quotes and brackets stay behind)."""
    spans, last = [], 0
    for m, context in _candidate_breaks(text):
        if _contains_sentbreak(context):
            spans.append((last, m.end()))
            last = m.start("next_tok") if m.group("next_tok") else m.end()
    spans.append((last, len(text.rstrip())))
    sentences, shift = [], 0
    for i, (start, end) in enumerate(spans):
        start += shift
        if i + 1 < len(spans):
            m = _REALIGN_RE.match(text[spans[i + 1][0]:spans[i + 1][1]])
            if m:  # a closing quote or bracket after the break belongs to this sentence
                sentences.append(text[start:spans[i + 1][0] + len(m.group(0).rstrip())])
                shift = m.end()
                continue
            shift = 0
        if text[start:end]:
            sentences.append(text[start:end])
    return sentences


# -----------------------------------------------------------------------------
# Word tokens for counting capitalised words (stands in for nltk.word_tokenize, Penn Treebank conventions)
#
# Only which tokens are fully upper-case matters, and punctuation is never upper-case, so we only need the
# rules that cut a word in two: clitics ("DON'T" -> "DO" "N'T", "I'm" -> "I" "'m"), ":" or "," glued
# between words, symbols such as ;@#$%&*?! and brackets, dashes, curly quotes, and a few fused words
# ("CANNOT" -> "CAN" "NOT").

_TREEBANK_SPLITS = [  # (pattern, replacement), applied in order, exactly as NLTK's tokenizer orders them
    (r"([«“‘„]|[`]+)", r" \1 "),
    (r"(?i)(?<!\w)(\')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)", r"\1 "),  # an opening single quote
    (r"([^\.])(\.)([\]\)}>\"'»”’ ]*)\s*$", r"\1 \2 \3 "),  # the sentence's final period
    (r"([:,])([^\d])", r" \1 \2"), (r"([:,])$", r" \1 "), (r"\.{2,}", r" \g<0> "), (r"[;@#$%&]", r" \g<0> "),
    (r"[\u2012-\u2015]", r" \g<0> "), (r"[?!]", r" \g<0> "), (r"([^'])' ", r"\1 ' "), (r"[*]", r" \g<0> "),
    (r"[\]\[\(\)\{\}\<\>]", r" \g<0> "), (r"--", r" -- "),
]
_TREEBANK_CLITICS = [  # applied to the text padded with spaces
    (r"([»”’])", r" \1 "), (r"''", " '' "), (r'"', " '' "), (r"\s+", " "),
    (r"([^' ])('[sS]|'[mM]|'[dD]|') ", r"\1 \2 "), (r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", r"\1 \2 "),
    (r"(?i)\b(can)(not)\b", r" \1 \2 "), (r"(?i)\b(d)('ye)\b", r" \1 \2 "), (r"(?i)\b(gim)(me)\b", r" \1 \2 "),
    (r"(?i)\b(gon)(na)\b", r" \1 \2 "), (r"(?i)\b(got)(ta)\b", r" \1 \2 "), (r"(?i)\b(lem)(me)\b", r" \1 \2 "),
    (r"(?i)\b(more)('n)\b", r" \1 \2 "), (r"(?i)\b(wan)(na)(?=\s)", r" \1 \2 "),
    (r"(?i) ('t)(is)\b", r" \1 \2 "), (r"(?i) ('t)(was)\b", r" \1 \2 "),
]
_TREEBANK_SPLITS = [(re.compile(p), r) for p, r in _TREEBANK_SPLITS]
_TREEBANK_CLITICS = [(re.compile(p), r) for p, r in _TREEBANK_CLITICS]


def word_tokens(text):
    """Treebank-style word tokens, good enough to count all-capital words as nltk.word_tokenize would."""
    tokens = []
    for sentence in split_sentences(text):  # anchored rules ("^", "$") see one sentence at a time, as in NLTK
        for pattern, repl in _TREEBANK_SPLITS:
            sentence = pattern.sub(repl, sentence)
        sentence = " " + sentence + " "
        for pattern, repl in _TREEBANK_CLITICS:
            sentence = pattern.sub(repl, sentence)
        tokens.extend(sentence.split())
    return tokens


# -----------------------------------------------------------------------------
# IFEval: the 25 instruction types
#
# Each checker takes the response and the instruction's kwargs and returns True when it is followed. The
# semantics follow the official instructions.py, quirks included (documented in ../shared/IFEVAL.md): the
# keyword checks treat keywords as regular expressions, the bullet count also counts "-" lines, and so on.


def _is_word_char(ch):
    # NLTK (3.9+) matches its r"\w+" with the `regex` engine, whose \w also takes combining marks and the
    # zero-width (non-)joiners; Python's re would cut Indic words at every vowel sign.
    return ch.isalnum() or ch == "_" or unicodedata.category(ch) in ("Mn", "Mc", "Me") or ch in "\u200c\u200d"


def count_words(text):
    """Number of word-character runs (NLTK's r"\\w+" RegexpTokenizer), IFEval's word count. Not TRACE's:
    trace_gen.count_words keeps "don't" as one word, and its split_sentences is simpler than Punkt's."""
    count, inside = 0, False
    for ch in text:
        word = _is_word_char(ch)
        count += word and not inside
        inside = word
    return count


def _compare(actual, relation, n):
    if relation == "less than":
        return actual < n
    if relation == "at least":
        return actual >= n
    raise ValueError(f"relation must be 'less than' or 'at least', got {relation!r}")


def _count_highlights(r):
    single = [h for h in re.findall(r"\*[^\n\*]*\*", r) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", r) if h.removeprefix("**").removesuffix("**").strip()]
    return len(single) + len(double)


def _paragraphs_ok(r, num_paragraphs):
    pieces = re.split(r"\s?\*\*\*\s?", r)
    count = len(pieces)
    for i, piece in enumerate(pieces):
        if not piece.strip():
            if i in (0, len(pieces) - 1):
                count -= 1
            else:
                return False  # an empty paragraph between two dividers
    return count == num_paragraphs


def _nth_paragraph_ok(r, num_paragraphs, nth_paragraph, first_word):
    pieces = r.split("\n\n")
    count = sum(1 for p in pieces if p.strip())
    if nth_paragraph > count:
        return False
    paragraph = pieces[nth_paragraph - 1].strip()  # indexes the raw pieces, empty ones included
    if not paragraph:
        return False
    word = paragraph.split()[0].strip().lstrip("'").lstrip('"')
    word = re.split(r"[.,?!'\"]", word)[0].lower()
    return count == num_paragraphs and word == first_word.lower()


def _two_responses_ok(r):
    pieces = r.split("******")
    kept = []
    for i, piece in enumerate(pieces):
        if piece.strip():
            kept.append(piece)
        elif i not in (0, len(pieces) - 1):
            return False
    return len(kept) == 2 and kept[0].strip() != kept[1].strip()


def _json_ok(r):
    r = r.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        r = r.removeprefix(fence)
    r = r.removesuffix("```").strip()
    try:
        json.loads(r)
    except (ValueError, RecursionError):  # thousands of "[" nest deeper than the parser goes
        return False
    return True


def _postscript_ok(r, postscript_marker):
    marker = postscript_marker.strip()
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + marker.lower() + r".*$"
    return bool(re.findall(pattern, r.lower(), flags=re.MULTILINE))


def _letter_frequency_ok(r, letter, let_frequency, let_relation):
    counts = collections.Counter(r.lower())
    letter = letter.strip().lower()
    if len(letter) == 1 and "a" <= letter <= "z":
        return _compare(counts[letter], let_relation, let_frequency)
    # Not a letter (keys 1122 "#" and 1129 "!"): the official code checks a random letter instead, so we give
    # the verdict it reaches for most of the 26 letters, which is the one it most likely gives.
    return sum(_compare(counts[c], let_relation, let_frequency) for c in "abcdefghijklmnopqrstuvwxyz") > 13


def _language_is(r, language):
    found = detect_language(r)
    return found is None or found == language  # no usable letters: counted as followed, like the official code


IFEVAL_CHECKS = {  # instruction id -> check(response, **kwargs) -> bool
    "keywords:existence": lambda r, keywords: all(re.search(k, r, flags=re.IGNORECASE) for k in keywords),
    "keywords:frequency": lambda r, keyword, frequency, relation: _compare(
        len(re.findall(keyword.strip(), r, flags=re.IGNORECASE)), relation, frequency),
    "keywords:forbidden_words": lambda r, forbidden_words: not any(
        re.search(r"\b" + w + r"\b", r, flags=re.IGNORECASE) for w in forbidden_words),
    "keywords:letter_frequency": _letter_frequency_ok,
    "language:response_language": _language_is,
    "length_constraints:number_sentences": lambda r, num_sentences, relation: _compare(
        len(split_sentences(r)), relation, num_sentences),
    "length_constraints:number_paragraphs": _paragraphs_ok,
    "length_constraints:number_words": lambda r, num_words, relation: _compare(count_words(r), relation, num_words),
    "length_constraints:nth_paragraph_first_word": _nth_paragraph_ok,
    "detectable_content:number_placeholders": lambda r, num_placeholders: len(
        re.findall(r"\[.*?\]", r)) >= num_placeholders,
    "detectable_content:postscript": _postscript_ok,
    "detectable_format:number_bullet_lists": lambda r, num_bullets: len(
        re.findall(r"^\s*\*[^\*].*$", r, flags=re.MULTILINE)) + len(
        re.findall(r"^\s*-.*$", r, flags=re.MULTILINE)) == num_bullets,
    "detectable_format:constrained_response": lambda r: any(
        a in r.strip() for a in ("My answer is yes.", "My answer is no.", "My answer is maybe.")),
    "detectable_format:number_highlighted_sections": lambda r, num_highlights: _count_highlights(r) >= num_highlights,
    "detectable_format:multiple_sections": lambda r, section_spliter, num_sections: len(
        re.split(r"\s?" + section_spliter.strip() + r"\s?\d+\s?", r)) - 1 >= num_sections,
    "detectable_format:json_format": _json_ok,
    "detectable_format:title": lambda r: any(
        t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", r)),
    "combination:two_responses": _two_responses_ok,
    "combination:repeat_prompt": lambda r, prompt_to_repeat: r.strip().lower().startswith(
        prompt_to_repeat.strip().lower()),
    "startend:end_checker": lambda r, end_phrase: r.strip().strip('"').lower().endswith(end_phrase.strip().lower()),
    "startend:quotation": lambda r: len(r.strip()) > 1 and r.strip()[0] == '"' and r.strip()[-1] == '"',
    "change_case:capital_word_frequency": lambda r, capital_frequency, capital_relation: _compare(
        sum(t.isupper() for t in word_tokens(r)), capital_relation, capital_frequency),
    "change_case:english_capital": lambda r: r.isupper() and _language_is(r, "en"),
    "change_case:english_lowercase": lambda r: r.islower() and _language_is(r, "en"),
    "punctuation:no_comma": lambda r: "," not in r,
}


def loose_variants(response):
    """IFEval's 8 loose variants: as is / no first line / no last line / neither, each also without '*'."""
    lines = response.split("\n")
    cut = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [response, response.replace("*", "")] + cut + [c.replace("*", "") for c in cut]


def check_instruction(instruction_id, kwargs, response, loose=False):
    """Verdict for one IFEval instruction; an answer that is empty after strip() follows nothing."""
    if instruction_id not in IFEVAL_CHECKS:
        raise ValueError(f"unknown IFEval instruction id {instruction_id!r}")
    check = IFEVAL_CHECKS[instruction_id]
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    candidates = loose_variants(response) if loose else [response]
    try:
        return any(c.strip() and check(c, **kwargs) for c in candidates)
    except (TypeError, re.error) as e:  # a missing or mistyped argument, a keyword that is not a valid pattern
        params = dict(list(inspect.signature(check).parameters.items())[1:])  # after the response
        missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in kwargs]
        unknown = sorted(set(kwargs) - set(params))
        if missing or unknown:
            raise ValueError(f"{instruction_id}: expects arguments {list(params)}; missing {missing}, "
                             f"unknown {unknown}") from None
        raise ValueError(f"{instruction_id}: bad argument values {kwargs} ({e})") from None
    except ValueError as e:
        raise ValueError(f"{instruction_id}: {e}") from None


def score_ifeval(inputs, responses):
    """Score IFEval prompts. responses: prompt text -> answer (a missing prompt fails all its instructions).

    Returns (strict_rows, loose_rows, report): rows in the official eval_results_*.jsonl format.
    """
    rows = {"strict": [], "loose": []}
    missing = []
    for n, inp in enumerate(inputs):
        name = f"IFEval input with key {inp['key']}" if "key" in inp else f"IFEval input #{n + 1} (no key)"
        for field, kind in (("prompt", str), ("instruction_id_list", list), ("kwargs", list)):
            if not isinstance(inp.get(field), kind):
                raise ValueError(f"{name}: {field!r} must be a {kind.__name__}, got {inp.get(field)!r:.80}")
        if not all(isinstance(kw, dict) for kw in inp["kwargs"]):
            raise ValueError(f"{name}: 'kwargs' must hold one object per instruction, got {inp['kwargs']!r:.80}")
        if len(inp["kwargs"]) != len(inp["instruction_id_list"]):
            raise ValueError(f"{name}: {len(inp['instruction_id_list'])} instructions but {len(inp['kwargs'])} kwargs")
        response = responses.get(inp["prompt"])
        if response is None:
            missing.append(inp.get("key", inp["prompt"][:60]))
        for mode in ("strict", "loose"):
            try:
                verdicts = [response is not None and check_instruction(i, kw, response, loose=mode == "loose")
                            for i, kw in zip(inp["instruction_id_list"], inp["kwargs"])]
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            rows[mode].append({"instruction_id_list": inp["instruction_id_list"], "prompt": inp["prompt"],
                               "response": response if response is not None else "",
                               "follow_all_instructions": all(verdicts), "follow_instruction_list": verdicts})
    report = {"n_prompts": len(inputs), "n_instructions": sum(len(r["instruction_id_list"]) for r in rows["strict"]),
              "missing_responses": len(missing), "missing_keys": missing[:20]}
    for mode in ("strict", "loose"):
        verdicts = [v for r in rows[mode] for v in r["follow_instruction_list"]]
        prompts = [r["follow_all_instructions"] for r in rows[mode]]
        report[f"prompt_level_{mode}"] = sum(prompts) / len(prompts) if prompts else None  # no prompts, no score
        report[f"instruction_level_{mode}"] = sum(verdicts) / len(verdicts) if verdicts else None
        per_type = collections.defaultdict(list)
        for r in rows[mode]:
            for i, v in zip(r["instruction_id_list"], r["follow_instruction_list"]):
                per_type[i].append(v)
        report[f"per_type_{mode}"] = {i: sum(v) / len(v) for i, v in sorted(per_type.items())}
    return rows["strict"], rows["loose"], report


# -----------------------------------------------------------------------------
# TRACE: per-constraint verdicts from trace_gen's checkers, IF-S / IF-M, and CFBench's CSR / ISR / PSR


def _share(flags):
    """Mean of 0/1 (or fractional) scores in percent; None for an empty set, which has no score."""
    return 100 * sum(flags) / len(flags) if flags else None


def cfbench_scores(verdict_lists, priority_lists):
    """CFBench (arXiv 2408.01122) over items, each a list of 0/1 verdicts with 'primary'/'secondary' priorities.

    CSR = mean over items of the share of constraints met;  ISR = share of items meeting all constraints;
    PSR_i = 0 if a primary constraint fails, else 1 if every constraint is primary,
            else 1[CSR_i > 0.8] if every constraint is secondary, else 1[0.5 + 0.5 * mean(secondary) > 0.8].
    Returned in percent, with n_items.
    """
    if len(verdict_lists) != len(priority_lists):
        raise ValueError(f"{len(verdict_lists)} verdict lists but {len(priority_lists)} priority lists")
    csr, isr, psr = [], [], []
    for i, (verdicts, priorities) in enumerate(zip(verdict_lists, priority_lists)):
        if not verdicts or len(verdicts) != len(priorities):
            raise ValueError(f"item {i}: {len(verdicts)} verdicts and {len(priorities)} priorities (need >= 1, equal)")
        if any(p not in ("primary", "secondary") for p in priorities):
            raise ValueError(f"item {i}: priorities must be 'primary' or 'secondary', got {priorities}")
        csr_i = sum(map(bool, verdicts)) / len(verdicts)
        primary = [bool(v) for v, p in zip(verdicts, priorities) if p == "primary"]
        secondary = [bool(v) for v, p in zip(verdicts, priorities) if p == "secondary"]
        if not all(primary):
            psr_i = 0.0
        elif not secondary:
            psr_i = 1.0
        elif not primary:
            psr_i = float(csr_i > 0.8)
        else:
            psr_i = float(0.5 + 0.5 * sum(secondary) / len(secondary) > 0.8)
        csr.append(csr_i)
        isr.append(float(csr_i == 1.0))
        psr.append(psr_i)
    return {"CSR": _share(csr), "ISR": _share(isr), "PSR": _share(psr), "n_items": len(csr)}  # None when no items


def item_key(item, n):
    """An item's id as responses are keyed: its "id", or its position n in the file when it has none."""
    return str(item.get("id", n))


def judge_trace(items, responses, linenos=None):
    """Per-item rows: the verdict of every constraint in item['checks'] on the matching response.

    responses: a list aligned with items, or a dict id -> response; None (or an absent id) is a missing answer,
    which fails every constraint and is flagged in the row. linenos: the items' lines in their file, for errors.
    """
    if isinstance(responses, dict):
        responses = [responses.get(item_key(item, n)) for n, item in enumerate(items)]
    if len(responses) != len(items):
        raise ValueError(f"{len(items)} items but {len(responses)} responses")
    rows = []
    for n, (item, response) in enumerate(zip(items, responses)):
        item_id = item_key(item, n)
        where = f"item {item_id}" if linenos is None else f"line {linenos[n]} (item {item_id})"
        checks = item.get("checks")
        if not isinstance(checks, list) or not checks:
            raise ValueError(f"{where}: needs a non-empty 'checks' list (trace_gen.py eval items carry one)")
        verdicts = []
        for j, spec in enumerate(checks):
            if not isinstance(spec, dict) or not {"dimension", "type", "family", "params"} <= spec.keys():
                raise ValueError(f"{where}, constraint {j + 1}: a spec needs dimension, type, family and "
                                 f"params, got {spec!r:.200}")
            if spec.get("priority", "primary") not in ("primary", "secondary"):
                raise ValueError(f"{where}, constraint {j + 1}: priority must be 'primary' or 'secondary', "
                                 f"got {spec['priority']!r}")
            try:
                verdicts.append(response is not None and trace_gen.check(spec, response))
            except ValueError as e:
                raise ValueError(f"{where}, constraint {j + 1}: {e}") from None
        rows.append({"id": item_id, "constraints_num": len(checks), "follow_all": all(verdicts),
                     "verdicts": verdicts, "types": [s["type"] for s in checks],
                     "dimensions": [s["dimension"] for s in checks],
                     "priorities": [s.get("priority", "primary") for s in checks],
                     "missing": response is None, "empty": response is not None and not response.strip(),
                     "response": response if response is not None else ""})
    return rows


def trace_report(rows):
    """Metrics of judged rows: IF-S, IF-M, CSR / ISR / PSR, and breakdowns by type, dimension and count."""
    single = [r["follow_all"] for r in rows if r["constraints_num"] == 1]
    multi = [r["follow_all"] for r in rows if r["constraints_num"] > 1]
    cf = cfbench_scores([r["verdicts"] for r in rows], [r["priorities"] for r in rows])
    by = {"type": collections.defaultdict(list), "dimension": collections.defaultdict(list)}
    by_count = collections.defaultdict(list)
    for r in rows:
        for v, t, d in zip(r["verdicts"], r["types"], r["dimensions"]):
            by["type"][t].append(v)
            by["dimension"][d].append(v)
        by_count[r["constraints_num"]].append(r["follow_all"])
    return {
        "metrics": {"IF-S": _share(single), "IF-M": _share(multi), "IF": _share([r["follow_all"] for r in rows]),
                    "CSR": cf["CSR"], "ISR": cf["ISR"], "PSR": cf["PSR"]},
        "n_items": len(rows), "n_single": len(single), "n_multi": len(multi),
        "n_constraints": sum(r["constraints_num"] for r in rows),
        "missing_responses": sum(r["missing"] for r in rows), "empty_responses": sum(r["empty"] for r in rows),
        "missing_ids": [r["id"] for r in rows if r["missing"]][:20],
        "by_type": {k: {"pass": _share(v), "n": len(v)} for k, v in sorted(by["type"].items())},
        "by_dimension": {k: {"pass": _share(v), "n": len(v)} for k, v in sorted(by["dimension"].items())},
        "by_constraint_count": {str(k): {"IF": _share(v), "n": len(v)} for k, v in sorted(by_count.items())},
    }


def score_trace(items, responses):
    """Report dict (see trace_report) for TRACE items with `checks` and their responses (list or id -> str)."""
    return trace_report(judge_trace(items, responses))


def _fmt(x):
    return "" if x is None else f"{x:.1f}"


def trace_markdown(report):
    m = report["metrics"]
    lines = ["| IF-S | IF-M | IF | CSR | ISR | PSR |", "|---|---|---|---|---|---|",
             "| " + " | ".join(_fmt(m[k]) for k in ("IF-S", "IF-M", "IF", "CSR", "ISR", "PSR")) + " |", "",
             f"{report['n_items']} items ({report['n_single']} single-, {report['n_multi']} multi-constraint), "
             f"{report['n_constraints']} constraints; missing responses: {report['missing_responses']}, "
             f"empty: {report['empty_responses']}.", ""]
    for key, title in (("by_type", "type"), ("by_dimension", "dimension")):
        lines += [f"| {title} | constraints met (%) | n |", "|---|---|---|"]
        lines += [f"| {k} | {_fmt(v['pass'])} | {v['n']} |" for k, v in report[key].items()] + [""]
    lines += ["| constraints per item | IF (%) | n |", "|---|---|---|"]
    lines += [f"| {k} | {_fmt(v['IF'])} | {v['n']} |" for k, v in report["by_constraint_count"].items()]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# Generation: the model's chat template on each item's messages, batched KV-cache decoding


def item_messages(item):
    """Chat messages of an item: TRACE items carry 'messages' (system + user), IFEval inputs only a 'prompt'."""
    if isinstance(item.get("messages"), list) and item["messages"]:
        M.check_messages(item["messages"])  # what rendering will need, checked before any model loads
        return item["messages"]
    if isinstance(item.get("prompt"), str):
        return [{"role": "user", "content": item["prompt"]}]
    raise ValueError(f"item {item.get('id', item.get('key', '?'))} has neither 'messages' nor 'prompt'")


def generate_responses(model, tok, items, max_new_tokens=512, batch_size=8, temperature=0.0, top_p=1.0, seed=None,
                       progress=True, counts=None):
    """One answer per item (greedy by default). Items are batched by prompt length to waste little padding.
    counts, a dict if given, gets "cut_at_limit": the answers that used all max_new_tokens (likely cut short)."""
    prompts = [tok.apply_chat_template(item_messages(item), add_generation_prompt=True) for item in items]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [None] * len(prompts)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    generator = None
    if seed is not None:  # one stream for the whole run: seeded per batch, every batch would draw the same numbers
        import torch
        generator = torch.Generator(device=model.model.embed_tokens.weight.device).manual_seed(seed)
    for batch in tqdm(batches, desc="answers", unit="batch", disable=not progress):
        new_tokens = M.generate(model, [prompts[i] for i in batch], max_new_tokens, temperature=temperature,
                                top_p=top_p, eos_token_ids=tok.eos_token_ids, seed=generator,
                                pad_token_id=tok.pad_token_id)
        for i, ids in zip(batch, new_tokens):
            answers[i] = tok.decode(ids, skip_special_tokens=True)
            if counts is not None:
                counts["cut_at_limit"] = counts.get("cut_at_limit", 0) + (len(ids) == max_new_tokens)
    return answers


def _load_for_generation(args):
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = M.load_model(args.model, dtype=args.dtype, device=device)
    return model, M.load_tokenizer(args.model)


# -----------------------------------------------------------------------------
# Command line


def _read_records(path, what):
    """(line number, record) pairs of a JSONL file that must hold at least one record."""
    numbered = read_numbered(path)
    if not numbered:
        raise SystemExit(f"error: {path} holds no {what}")
    return numbered


def _no_duplicates(path, what, numbered_keys):
    """Stop at the first key seen twice, naming both lines: a duplicate would silently shadow the other."""
    first = {}
    for lineno, key in numbered_keys:
        if key in first:
            raise SystemExit(f"error: {path}:{lineno}: duplicate {what} {key!r:.80} (first on line {first[key]})")
        first[key] = lineno


def _read_responses(path, key):
    """key -> response from a JSONL file of {key, "response"} rows, each key at most once."""
    numbered = _read_records(path, "responses")
    for lineno, row in numbered:
        if key not in row or not isinstance(row.get("response"), str):
            raise SystemExit(f"error: {path}:{lineno}: needs {key!r} and a string 'response' (got keys {sorted(row)})")
        if not isinstance(row[key], (str, int) if key == "id" else str):
            kind = "a string or integer" if key == "id" else "a string"
            raise SystemExit(f"error: {path}:{lineno}: {key!r} must be {kind}, got {row[key]!r:.80}")
    keys = [(lineno, str(row[key]) if key == "id" else row[key]) for lineno, row in numbered]
    _no_duplicates(path, key, keys)
    return {k: row["response"] for (_, k), (_, row) in zip(keys, numbered)}


def _source(args):
    """What a run scores: the model that answers, or the file of answers (as an absolute path)."""
    if args.model:
        return {"model": str(Path(args.model).resolve())}
    return {"responses": str(Path(args.responses).resolve())}


def _out_folder(path, args):
    """The output folder, checked before any work: not a file, and not holding the report of another run (whose
    files this one would replace: runs a/iopo/final and b/iopo/final both get the default label iopo, hence the
    same runs/eval/trace-iopo, and would otherwise overwrite each other)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SystemExit(f"error: --out {path} is a file, expected a folder")
    if (path / "report.json").is_file():
        try:
            earlier = json.loads((path / "report.json").read_text(encoding="utf-8")).get("source")
        except (ValueError, AttributeError):
            earlier = None
        source = _source(args)
        own_answers = Path(source.get("responses", "/")).parent == path.resolve()  # re-scoring its own answers
        if isinstance(earlier, dict) and earlier != source and not own_answers:
            what = ", ".join(f"{k} {v}" for k, v in earlier.items())
            raise SystemExit(f"error: --out {path} holds the report of another run ({what}); choose another "
                             f"--out (or --label), or delete it")
    return path


def _generate(args, items):
    """Answers from --model, and what report.json records about how they were made."""
    model, tok = _load_for_generation(args)
    counts = {}
    answers = generate_responses(model, tok, items, args.max_new_tokens, args.batch_size, args.temperature,
                                 args.top_p, args.seed, counts=counts)
    settings = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_p", "seed", "batch_size")}
    generation = {**settings, "cut_at_limit": counts.get("cut_at_limit", 0)}
    if generation["cut_at_limit"]:
        print(f"warning: {generation['cut_at_limit']} of {len(items)} answers used all --max-new-tokens "
              f"{args.max_new_tokens} and may have been cut short")
    return answers, generation


def write_outputs(out_dir, files):
    """Write {name: text} into out_dir all or nothing: staged beside it, moved in once complete (write_folder)."""
    trace_gen.write_folder(out_dir, {name: [text] for name, text in files.items()})


def _label(args):
    if args.label:
        return args.label
    if not args.model:
        return Path(args.responses).stem
    path = Path(args.model).resolve()
    if path.name == "final":  # iopo.py's output layout: RUN/final and RUN/checkpoint-N are named after RUN
        return path.parent.name
    return f"{path.parent.name}/{path.name}" if path.name.startswith("checkpoint-") else path.name


def _judge_or_exit(path, numbered, responses):
    """(rows, report) of judge_trace and trace_report on (line, item) pairs; a malformed item stops the command
    naming the file and the line."""
    try:
        rows = judge_trace([item for _, item in numbered], responses, [lineno for lineno, _ in numbered])
        return rows, trace_report(rows)
    except ValueError as e:
        raise SystemExit(f"error: {path}: {e}") from None


def cmd_trace(args):
    numbered = _read_records(args.data, "items")
    items = [item for _, item in numbered]
    _no_duplicates(args.data, "item id", [(lineno, item_key(item, n)) for n, (lineno, item) in enumerate(numbered)])
    out = _out_folder(args.out or Path("runs") / "eval" / f"trace-{_label(args)}", args)
    generation = None
    if args.model:
        _judge_or_exit(args.data, numbered, ["x"] * len(items))  # every spec checked before the slow generation
        for lineno, item in numbered:  # and every prompt, before the model loads
            try:
                item_messages(item)
            except ValueError as e:
                raise SystemExit(f"error: {args.data}:{lineno}: {e}") from None
        answers, generation = _generate(args, items)
        responses = {item_key(item, n): a for n, (item, a) in enumerate(zip(items, answers))}
        # kept at once: generation is the slow part, and --responses can score them again
        write_outputs(out, {"responses.jsonl": jsonl_text({"id": k, "response": v} for k, v in responses.items())})
        print(f"wrote {out}/responses.jsonl")
    else:
        responses = _read_responses(args.responses, "id")
        ids = [item_key(item, n) for n, item in enumerate(items)]
        unknown = set(responses) - set(ids)
        if len(unknown) == len(responses):
            raise SystemExit(f"error: no response in {args.responses} matches an item id in {args.data} "
                             f"(response ids e.g. {sorted(unknown)[:3]}, item ids e.g. {ids[:3]})")
        if unknown:
            print(f"warning: {len(unknown)} responses match no item id in {args.data} (e.g. {sorted(unknown)[:3]})")
    rows, report = _judge_or_exit(args.data, numbered, responses)
    report.update(benchmark="trace", label=_label(args), data=str(args.data), source=_source(args),
                  **({"generation": generation} if generation else {}))
    table = trace_markdown(report)
    files = {"results.jsonl": jsonl_text(rows), "report.json": json_text(report), "report.md": table}
    write_outputs(out, files)
    print(table)
    if report["missing_responses"]:
        print(f"warning: {report['missing_responses']} items had no response (counted as failures), e.g. "
              f"{report['missing_ids'][:5]}")
    print(f"wrote {out}/" + ", ".join(files))


def _score_or_exit(path, inputs, responses):
    """score_ifeval's (strict, loose, report); a malformed input stops the command naming the file and key."""
    try:
        return score_ifeval(inputs, responses)
    except ValueError as e:
        raise SystemExit(f"error: {path}: {e}") from None


def _percent(x):
    return None if x is None else 100 * x


def cmd_ifeval(args):
    numbered = _read_records(args.input, "prompts")
    inputs = [inp for _, inp in numbered]
    # the official scorer would judge a repeated input twice and keys answers by prompt (the last duplicate
    # wins): refuse duplicates instead
    keys = [(lineno, inp["key"]) for lineno, inp in numbered if isinstance(inp.get("key"), (str, int))]
    _no_duplicates(args.input, "key", keys)
    prompts = [(lineno, inp["prompt"]) for lineno, inp in numbered if isinstance(inp.get("prompt"), str)]
    _no_duplicates(args.input, "prompt", prompts)
    out = _out_folder(args.out, args)
    generation = None
    if args.model:
        _score_or_exit(args.input, inputs, {p: "x" for _, p in prompts})  # every kwarg checked before generation
        answers, generation = _generate(args, inputs)
        responses = {inp["prompt"]: a for inp, a in zip(inputs, answers)}
        # kept at once: generation is the slow part, and --responses can score them again
        write_outputs(out, {"input_response_data.jsonl":
                            jsonl_text({"prompt": p, "response": r} for p, r in responses.items())})
        print(f"wrote {out}/input_response_data.jsonl")
    else:
        responses = _read_responses(args.responses, "prompt")
        unknown = sorted(set(responses) - {p for _, p in prompts})
        if len(unknown) == len(responses):
            raise SystemExit(f"error: no response in {args.responses} matches a prompt in {args.input} "
                             f"(e.g. {unknown[0][:60]!r})")
        if unknown:
            print(f"warning: {len(unknown)} responses match no prompt in {args.input} (e.g. {unknown[0][:60]!r})")
    strict, loose, report = _score_or_exit(args.input, inputs, responses)
    report["metrics"] = {"S-Acc": _percent(report["prompt_level_strict"]),
                         "L-Acc": _percent(report["prompt_level_loose"]),
                         "I-Acc strict": _percent(report["instruction_level_strict"]),
                         "I-Acc loose": _percent(report["instruction_level_loose"])}
    report.update(benchmark="ifeval", label=_label(args), input=str(args.input), source=_source(args),
                  **({"generation": generation} if generation else {}))
    files = {"eval_results_strict.jsonl": jsonl_text(strict), "eval_results_loose.jsonl": jsonl_text(loose),
             "report.json": json_text(report)}
    write_outputs(out, files)
    for mode in ("strict", "loose"):
        p, i = report[f"prompt_level_{mode}"], report[f"instruction_level_{mode}"]
        print(f"prompt-level {mode}: {p:.4f}   instruction-level {mode}: " + ("n/a" if i is None else f"{i:.4f}"))
    if report["missing_responses"]:
        print(f"warning: {report['missing_responses']} prompts had no response (counted as failures), e.g. keys "
              f"{report['missing_keys'][:5]}")
    print(f"wrote {out}/" + ", ".join(files))


TABLE3 = ("IF-S", "IF-M", "S-Acc", "L-Acc", "CSR", "ISR", "PSR")


def compare_table(reports):
    """Markdown table in the layout of the paper's Table 3; reports with the same label (one TRACE, one IFEval)
    share one row."""
    rows = {}
    for report in reports:
        rows.setdefault(report.get("label", "?"), {}).update(report.get("metrics", {}))
    lines = ["| run | " + " | ".join(TABLE3) + " |", "|---|" + "---|" * len(TABLE3)]
    for label, metrics in rows.items():
        lines.append(f"| {label} | " + " | ".join(_fmt(metrics.get(k)) for k in TABLE3) + " |")
    return "\n".join(lines) + "\n"


def cmd_compare(args):
    reports, seen = [], {}
    for arg in args.reports:
        path = Path(arg)
        path = path / "report.json" if path.is_dir() else path
        if not path.is_file():
            raise SystemExit(f"error: {path} does not exist")
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise SystemExit(f"error: {path} is not valid JSON ({e.msg})")
        except UnicodeDecodeError as e:
            raise SystemExit(f"error: {path} is not valid UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start})")
        if not isinstance(report, dict) or "metrics" not in report:
            raise SystemExit(f"error: {path} is not a report written by eval.py (no 'metrics')")
        # a hand-edited report would otherwise fail deep in the table code with a TypeError
        metrics, source = report["metrics"], report.get("source")
        if not isinstance(metrics, dict) or not all(
                v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in metrics.values()):
            raise SystemExit(f"error: {path}: 'metrics' should map names to percentages (or null), "
                             f"got {metrics!r:.120}")
        if source is not None and not isinstance(source, dict):
            raise SystemExit(f"error: {path}: 'source' should be an object ({{\"model\": ...}} or "
                             f"{{\"responses\": ...}}), got {source!r:.80}")
        # two runs of one benchmark under one label (say two responses.jsonl) would silently share a row
        key = (str(report.get("label", "?")), str(report.get("benchmark", "")))
        if key in seen:
            raise SystemExit(f"error: {seen[key]} and {arg} are both {key[1] or 'reports'} runs labelled {key[0]!r}; "
                             f"score them again with different --label values")
        seen[key] = arg
        reports.append(report)
    models = {}  # a label's TRACE and IFEval reports share a row: they must come from the same model
    for arg, report in zip(args.reports, reports):
        model = (report.get("source") or {}).get("model")
        label = str(report.get("label", "?"))
        if model and models.setdefault(label, (model, arg))[0] != model:
            raise SystemExit(f"error: {models[label][1]} and {arg} share the label {label!r} but come from different "
                             f"models ({models[label][0]} and {model}); score them again with different --label values")
    print(compare_table(reports), end="")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def answers_source(sp, budget, note=""):
        src = sp.add_mutually_exclusive_group(required=True)
        src.add_argument("--responses", help="JSONL of answers to score (TRACE: {id, response}; IFEval: {prompt, response})")
        src.add_argument("--model", help="checkpoint folder (model.py format) to generate the answers with first")
        sp.add_argument("--label", help="name of this run in reports and `compare`, unique per benchmark "
                        "(default: RUN for a model at RUN/final, RUN/checkpoint-N for a checkpoint, else the model "
                        "folder's name, or the responses file's name without its extension)")
        sp.add_argument("--max-new-tokens", type=int, default=budget, help=f"token budget per answer (default "
                        f"{budget}{note})")
        sp.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (default 8)")
        sp.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
        sp.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when temperature > 0 "
                        "(default 1.0: no cut)")
        sp.add_argument("--seed", type=int, default=None, help="sampling seed, only used when temperature > 0 "
                        "(default: none, so each run samples anew)")
        sp.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
        sp.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: the checkpoint's)")

    t = sub.add_parser("trace", help="score TRACE items that carry trace_gen.py checks")
    t.add_argument("--data", required=True, help="eval JSONL written by trace_gen.py (items with 'checks')")
    answers_source(t, 512)
    t.add_argument("--out", help="output folder (default runs/eval/trace-<label>)")
    t.set_defaults(func=cmd_trace)

    f = sub.add_parser("ifeval", help="score IFEval answers, strict and loose, in the official output format")
    f.add_argument("--input", required=True, help="IFEval input_data.jsonl (key, prompt, instruction_id_list, kwargs)")
    answers_source(f, 1280, ", lm-eval's: some prompts ask for 600 words or more")
    f.add_argument("--out", required=True, help="output folder")
    f.set_defaults(func=cmd_ifeval)

    c = sub.add_parser("compare", help="print reports side by side (IF-S IF-M S-Acc L-Acc CSR ISR PSR)")
    c.add_argument("reports", nargs="+", help="report.json files or the folders that hold them")
    c.set_defaults(func=cmd_compare)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (OSError, ValueError) as e:  # a folder in the way, a full disk, a bad checkpoint: one line, no traceback
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
