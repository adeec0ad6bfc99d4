"""eval.py: IFEval checkers (strict / loose), CFBench metrics, TRACE scoring, generation and the command line."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as E  # noqa: E402
import trace_gen  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "eval_fixtures"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

# (instruction id, kwargs, response, strict verdict, loose verdict); the edge cases follow ../shared/IFEVAL.md
IFEVAL_CASES = [
    ("keywords:existence", {"keywords": ["cat", "dog"]}, "I concatenate DOGS.", True, True),  # regex substring
    ("keywords:existence", {"keywords": ["cat", "dog"]}, "Only a cat here.", False, False),
    ("keywords:frequency", {"keyword": "the", "frequency": 3, "relation": "at least"}, "The theme of the day", True, True),
    ("keywords:frequency", {"keyword": "the", "frequency": 3, "relation": "less than"}, "The theme of the day", False, False),
    ("keywords:forbidden_words", {"forbidden_words": ["cat"]}, "A scathing concatenation.", True, True),  # \b bounds
    ("keywords:forbidden_words", {"forbidden_words": ["cat"]}, "My Cat sleeps.", False, False),
    ("keywords:letter_frequency", {"letter": "A", "let_frequency": 3, "let_relation": "at least"}, "Banana", True, True),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 1, "let_relation": "less than"}, "Zebra", False, False),
    # "#" is not a letter: the official code checks a random letter, we give its most likely verdict
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 1, "let_relation": "at least"},
     "The quick brown fox jumps over the lazy dog", True, True),
    # 13 of the 26 letters is a tie, not most of them: not followed; 14 letters are most
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 1, "let_relation": "at least"}, "abcdefghijklm",
     False, False),
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 1, "let_relation": "at least"}, "abcdefghijklmn",
     True, True),
    ("keywords:letter_frequency", {"letter": "#", "let_frequency": 1, "let_relation": "at least"}, "#####", False, False),
    ("language:response_language", {"language": "ko"}, "날씨가 좋아서 우리는 시장에 갔습니다.", True, True),
    ("language:response_language", {"language": "ko"}, "The weather was nice so we went out.", False, False),
    ("language:response_language", {"language": "de"}, "1234 !!! ???", True, True),  # no letters: followed
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "Mr. Smith went to Washington. He arrived at 5 p.m. on Friday!", True, True),  # abbreviations do not split
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"},
     "Apples, pears, etc. and more. Done.", True, True),  # "etc" is not in Punkt's English list: it splits
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at least"},
     "See the U.S. map on p. 4 now", False, False),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "*** First. *** Second. ***", True, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "First.\n***\n***\nSecond.", False, False),
    ("length_constraints:number_words", {"num_words": 5, "relation": "at least"}, "it's a well-known fact", True, True),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "one two three four five", False, False),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "First part.\n\n\"Then, the second.", True, True),  # leading quote and trailing comma are dropped
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "\n\nFirst part.\n\nThen the second.", False, True),  # the empty leading piece is paragraph #1
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "First.\n\nThen second.\n\nThird.", False, True),  # 3 paragraphs, not 2; loose drops the third
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], see [address].", True, True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name].", False, False),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[a], [b] and [c]", True, True),  # at least
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\np.s. bye", True, True),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "Hi.\nP. P. S. later", True, True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi. PS bye", False, False),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\np.s bye", False, False),  # needs "s."
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\nP.S. bye\nSee you.", True, True),  # not last line
    ("detectable_format:number_bullet_lists", {"num_bullets": 3}, "* a\n  - b\n---", True, True),  # "---" counts
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "**Bold**\n* a\n* b\n1. c", True, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "Intro\n* a\n* b\n* c", False, True),  # loose: last line
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "  * a\n  * b", True, True),  # indented "*"
    ("detectable_format:constrained_response", {}, "Well. My answer is maybe.", True, True),
    ("detectable_format:constrained_response", {}, "my answer is yes.", False, False),  # case-sensitive
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and **two**", True, True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 1}, "** ** and *\n*", False, False),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nfoo\nSECTION 2\nbar", True, True),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "Section 1\nfoo\nSection 2\nbar", False, False),  # case-sensitive
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\na\nSECTION 2\nb\nSECTION 3\nc", True, True),  # at least
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nonly one", False, False),  # split gives 2 pieces: the text before the first marker is no section
    ("detectable_format:json_format", {}, "```json\n{\"a\": 1}\n```", True, True),
    ("detectable_format:json_format", {}, "Here you go:\n{\"a\": 1}", False, True),  # loose drops the first line
    ("detectable_format:json_format", {}, "[" * 5000, False, False),  # too deep for the parser: not JSON, no crash
    ("language:response_language", {"language": "ru"},
     "Москва — столица России. В Москве на улицах много людей, и не всегда легко найти место.", True, True),
    ("detectable_format:title", {}, "<<My Title>>\nbody", True, True),
    ("detectable_format:title", {}, "<<  >>\nbody", False, False),
    ("combination:two_responses", {}, "Answer one.\n******\nAnswer two.", True, True),
    ("combination:two_responses", {}, "Same.\n******\nSame.", False, False),
    ("combination:two_responses", {}, "A.\n******\n******\nB.", False, False),  # an empty answer between dividers
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "  say HI. Hello!", True, True),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi."}, "Sure! Say hi. Hello!", False, False),
    ("startend:end_checker", {"end_phrase": "Any questions?"}, "Done. any questions?\"  ", True, True),
    ("startend:end_checker", {"end_phrase": "Any questions?"}, "Any questions? Bye.", False, False),
    ("startend:quotation", {}, "  \"quoted\" ", True, True),
    ("startend:quotation", {}, "Here:\n\"quoted\"", False, True),
    ("startend:quotation", {}, "\u201ccurly\u201d", False, False),  # only the ASCII double quote counts
    ("change_case:capital_word_frequency", {"capital_frequency": 8, "capital_relation": "at least"},
     "I'm SURE the USA's GDP isn't HIGH. DON'T PANIC!", True, True),  # I, SURE, USA, GDP, HIGH, DO, N'T, PANIC
    ("change_case:capital_word_frequency", {"capital_frequency": 4, "capital_relation": "less than"},
     "The NASA-JPL team (AI) met CANNOT", False, False),  # NASA-JPL, AI, CAN, NOT
    ("change_case:english_capital", {}, "THIS IS ALL IN CAPITAL LETTERS AND IT IS WRITTEN IN ENGLISH.", True, True),
    ("change_case:english_capital", {}, "THIS IS MOSTLY CAPITAL but not all.", False, False),
    ("change_case:english_lowercase", {}, "this answer is written in lowercase english only.", True, True),
    ("change_case:english_lowercase", {}, "Title\nthis answer is written in lowercase english only.", False, True),
    # One to three words in capitals, or without a function word: langdetect rarely calls them English.
    ("change_case:english_capital", {}, "YES", False, False),
    ("change_case:english_lowercase", {}, "etchings", False, False),
    ("punctuation:no_comma", {}, "No commas here\uff0c only a full-width one.", True, True),
    ("punctuation:no_comma", {}, "Sure, here it is:\nno commas below", False, True),
]


@pytest.mark.parametrize("inst_id,kwargs,response,strict,loose", IFEVAL_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(IFEVAL_CASES)])
def test_ifeval_checker(inst_id, kwargs, response, strict, loose):
    """Each IFEval instruction type gives the official verdict on crafted responses, strict and loose."""
    got = (E.check_instruction(inst_id, kwargs, response), E.check_instruction(inst_id, kwargs, response, loose=True))
    assert got == (strict, loose), f"{inst_id} {kwargs} on {response!r}: got {got}, expected {(strict, loose)}"


def test_every_ifeval_type_is_covered():
    """The case table exercises all 25 registered instruction types, each with a passing and a failing answer."""
    outcomes = {}
    for inst_id, _, _, strict, _ in IFEVAL_CASES:
        outcomes.setdefault(inst_id, set()).add(strict)
    assert set(outcomes) == set(E.IFEVAL_CHECKS), f"uncovered: {set(E.IFEVAL_CHECKS) - set(outcomes)}"
    assert len(E.IFEVAL_CHECKS) == 25, f"{len(E.IFEVAL_CHECKS)} types registered"
    one_sided = sorted(i for i, s in outcomes.items() if s != {True, False})
    assert not one_sided, f"types without both a pass and a fail case: {one_sided}"


def test_word_count_keeps_indic_vowel_signs():
    """Words are r"\\w+" runs as NLTK's regex engine matches them: vowel signs and joiners stay inside a word."""
    cases = {"ಹೌದು, ಹ್ಯಾಂಬರ್ಗರ್ಗಳು ಸ್ಯಾಂಡ್\u200cವಿಚ್": 3, "नमस्ते दुनिया": 2, "it's well-known_fact 3.5": 6}
    got = {text: E.count_words(text) for text in cases}
    assert got == cases, got


def test_empty_response_fails_everything():
    """An answer that is blank after strip() follows no instruction, strict or loose (even 'no comma')."""
    for inst_id in ("punctuation:no_comma", "keywords:forbidden_words", "language:response_language"):
        kwargs = {"forbidden_words": ["x"]} if "forbidden" in inst_id else {"language": "en"} if "language" in inst_id else {}
        for loose in (False, True):
            assert E.check_instruction(inst_id, kwargs, "  \n ", loose=loose) is False, (inst_id, loose)


def test_loose_variants_order_and_count():
    """The 8 loose variants: as is, without '*', minus first / last / both lines, and those without '*'."""
    v = E.loose_variants("*a*\nb\n*c*")
    assert v == ["*a*\nb\n*c*", "a\nb\nc", "b\n*c*", "*a*\nb", "b", "b\nc", "a\nb", "b"], v


@pytest.mark.parametrize("text,n", [
    ("Mr. Smith went to Washington. He arrived at 5 p.m. on Friday!", 2),
    ("Prices rose 3.5% in the U.S. The Fed acted.", 2),
    ("Wait... what? Really!? Yes.", 3),
    ("1. Buy milk.\n2. Call Mom.\n3. rest", 5),
    ('He said "Stop." Then he left.', 2),
    ("See Fig. 3 for details. Thanks.", 3),
    ("Dr. J. Doe arrived. The end.", 2),
    ("", 0),
    # An initial followed by a capitalised word: a break when NLTK's table saw the word in lower case.
    ("I live in o. Let's check the weather.", 2),
    ("I. Introduction\n   A. Brief history\n   B. Overview of the plan", 3),  # "overview" is not in the table
    ("Pick option B. Exploration comes first.", 2),
    ("See vitamin C. Oranges have it.", 1),
    ("The book by J. Smith was long. We read it.", 2),
    ("George W. Bush spoke.", 1),
    ("We like Apple Inc.\n\nPros: fast.", 1),  # after an abbreviation only a sure sentence starter breaks
])
def test_sentence_counts_match_punkt(text, n):
    """Sentence counts equal what NLTK's English Punkt gives on the same text (values taken from NLTK 3.10)."""
    got = E.split_sentences(text)
    assert len(got) == n, f"{text!r}: {len(got)} sentences {got}, NLTK gives {n}"


def test_a_number_and_its_learned_collocate_are_not_a_break():
    """Punkt's collocation rule (Kiss & Strunk 4.1.2): "5. Notable" is a pair NLTK's English table learned, so no
    break follows the "5."; a number before another capitalised word still ends a sentence (NLTK 3.10.4's
    sent_tokenize splits both texts so)."""
    assert ("##number##", "notable") in E._PUNKT_COLLOCATIONS
    got = E.split_sentences("It rose 5. Notable gains followed."), E.split_sentences("It rose 5. Prices fell.")
    assert got == (["It rose 5. Notable gains followed."], ["It rose 5.", "Prices fell."]), got


def test_word_table_loads_and_bad_tables_name_the_line(tmp_path):
    """punkt_english.txt parses into its two sets; a malformed table is an error naming the file and line."""
    start, lower = E.read_word_table(ROOT / "punkt_english.txt")
    assert len(start) > 10000 and len(lower) > 2000 and not start & lower, (len(start), len(lower))
    assert {"let", "brief", "introduction"} <= start | lower and "overview" not in start | lower
    bad = tmp_path / "table.txt"
    bad.write_text("# header\nword\n[start]\nmore\n")
    with pytest.raises(ValueError, match=r"table.txt:2: words before"):
        E.read_word_table(bad)
    bad.write_text("[start]\na b\n")
    with pytest.raises(ValueError, match=r"\[start\] and \[lower\]"):
        E.read_word_table(bad)


LANGUAGE_SAMPLES = {  # one sentence per language that IFEval asks for (langdetect agrees on each)
    "en": "The weather was pleasant, so we walked to the market and bought some fresh bread for the family.",
    "de": "Das Wetter war schön, deshalb sind wir zum Markt gegangen und haben frisches Brot für die Familie gekauft.",
    "it": "Il tempo era bello, quindi siamo andati al mercato e abbiamo comprato del pane fresco per la famiglia.",
    "pt": "O tempo estava agradável, então fomos ao mercado e compramos pão fresco para a família.",
    "fi": "Sää oli kaunis, joten kävelimme torille ja ostimme tuoretta leipää koko perheelle.",
    "sw": "Hali ya hewa ilikuwa nzuri, kwa hiyo tulitembea hadi sokoni na kununua mkate kwa ajili ya familia.",
    "vi": "Thời tiết rất đẹp, vì vậy chúng tôi đã đi bộ đến chợ và mua bánh mì tươi cho cả gia đình.",
    "ru": "Погода была хорошая, поэтому мы пошли на рынок и купили свежий хлеб для всей семьи.",
    "bg": "Времето беше хубаво, затова отидохме на пазара и купихме пресен хляб за цялото семейство.",
    "hi": "मौसम अच्छा था, इसलिए हम बाज़ार गए और परिवार के लिए ताज़ी रोटी खरीदी।",
    "mr": "हवामान छान होते, म्हणून आम्ही बाजारात गेलो आणि कुटुंबासाठी ताजी भाकरी विकत घेतली.",
    "ne": "मौसम राम्रो थियो, त्यसैले हामी बजार गयौं र परिवारका लागि ताजा रोटी किनेका थियौं।",
    "ar": "كان الطقس جميلا، لذلك ذهبنا إلى السوق واشترينا خبزا طازجا للعائلة.",
    "fa": "هوا خوب بود، بنابراین به بازار رفتیم و برای خانواده نان تازه خریدیم.",
    "ur": "موسم اچھا تھا، اس لیے ہم بازار گئے اور گھر والوں کے لیے تازہ روٹی خریدی۔",
    "bn": "আবহাওয়া ভালো ছিল, তাই আমরা বাজারে গিয়ে পরিবারের জন্য তাজা রুটি কিনলাম।",
    "pa": "ਮੌਸਮ ਵਧੀਆ ਸੀ, ਇਸ ਲਈ ਅਸੀਂ ਬਾਜ਼ਾਰ ਗਏ ਅਤੇ ਪਰਿਵਾਰ ਲਈ ਤਾਜ਼ੀ ਰੋਟੀ ਖਰੀਦੀ।",
    "gu": "હવામાન સરસ હતું, તેથી અમે બજારમાં ગયા અને પરિવાર માટે તાજી રોટલી ખરીદી.",
    "ta": "வானிலை நன்றாக இருந்தது, அதனால் நாங்கள் சந்தைக்குச் சென்று குடும்பத்திற்கு புதிய ரொட்டி வாங்கினோம்.",
    "te": "వాతావరణం బాగుంది, అందుకే మేము మార్కెట్‌కు వెళ్లి కుటుంబం కోసం తాజా రొట్టె కొన్నాము.",
    "kn": "ಹವಾಮಾನ ಚೆನ್ನಾಗಿತ್ತು, ಆದ್ದರಿಂದ ನಾವು ಮಾರುಕಟ್ಟೆಗೆ ಹೋಗಿ ಕುಟುಂಬಕ್ಕಾಗಿ ತಾಜಾ ಬ್ರೆಡ್ ಖರೀದಿಸಿದೆವು.",
    "th": "อากาศดีมาก เราจึงเดินไปตลาดและซื้อขนมปังสดให้ครอบครัว",
    "ko": "날씨가 좋아서 우리는 시장에 걸어가서 가족을 위해 신선한 빵을 샀습니다.",
}


def test_language_identification():
    """Each of IFEval's 22 languages and English is recognised; a Latin-only quote inside Hindi is ignored."""
    wrong = {lang: E.detect_language(text) for lang, text in LANGUAGE_SAMPLES.items()
             if E.detect_language(text) != lang}
    assert not wrong, f"misidentified: {wrong}"
    mixed = LANGUAGE_SAMPLES["hi"] * 3 + " (see https://example.com/page, written by Bob)"
    assert E.detect_language(mixed) == "hi", E.detect_language(mixed)
    assert E.detect_language("42 + 7 = 49 !!!") is None


def test_language_is_the_one_most_of_the_text_is_in():
    """Four Swahili sentences and one English one are Swahili (English's denser function words outvoted them
    when the whole text voted at once, unlike langdetect); four English and one Swahili are English."""
    sw = ("Habari za asubuhi. Leo tunajifunza kuhusu historia ya Afrika Mashariki na utamaduni wake. Watu "
          "wengi wanapenda kusoma vitabu vya hadithi. Kila siku ninaenda sokoni kununua matunda na mboga.")
    en_line = "This is the last sentence and it is written in English for the readers of the text."
    en = " ".join([en_line, "The market was busy in the morning.", "We bought bread for all of them.",
                   "It was a good day for a walk."])
    got = E.detect_language(sw + "\n" + en_line), E.detect_language(en + " " + LANGUAGE_SAMPLES["sw"])
    assert got == ("sw", "en"), got
    # votes are weighed by length: one long English sentence outweighs two short Swahili ones
    long_en = ("The committee spent the whole of the long afternoon in the old library discussing how the new rules "
               "would work for all of the members.")
    got = E.detect_language(long_en + " Habari za asubuhi. Watu wengi wapo sokoni.")
    assert got == "en", f"134 English characters against 41 Swahili ones gave {got!r}"


def test_latin_letters_count_until_other_characters_outnumber_them_two_to_one():
    """Like langdetect, Latin letters are dropped only when characters above U+0300 are more than twice as many:
    17 letters with 34 arrows are still English, with 35 arrows the text has no usable letters."""
    text = "the cat sat on the mat "  # 17 Latin letters
    got = E.detect_language(text + "\u2192" * 34), E.detect_language(text + "\u2192" * 35)
    assert got == ("en", None), f"17 letters with 34 / 35 arrows: {got}"


def test_short_latin_texts_are_undetermined():
    """At most three words, all in capitals or without any function word: 'und'; a function word decides."""
    for text in ("YES", "A", "etchings", '"coastal elegance properties"', "THE END"):
        assert E.detect_language(text) == "und", (text, E.detect_language(text))
    for text in ("the end", "this is it", "FOUR WORDS IN CAPITALS", "glistening emerald hills and valleys"):
        assert E.detect_language(text) == "en", (text, E.detect_language(text))
    assert E.detect_language("ich bin hier") == "de"


def test_score_ifeval_format_and_missing_response():
    """Official result rows and the four accuracies; a prompt without a response fails and is reported."""
    inputs = E.read_jsonl(FIXTURES / "ifeval_mini.jsonl")
    responses = {r["prompt"]: r["response"] for r in E.read_jsonl(FIXTURES / "ifeval_mini_responses.jsonl")}
    strict, loose, report = E.score_ifeval(inputs, responses)
    assert [r["follow_instruction_list"] for r in strict] == [[True, False], [True, True], [False], [False]], strict
    assert [r["follow_instruction_list"] for r in loose] == [[True, True], [True, True], [True], [False]], loose
    assert set(strict[0]) == {"instruction_id_list", "prompt", "response", "follow_all_instructions",
                              "follow_instruction_list"}, sorted(strict[0])
    assert report["missing_responses"] == 1 and report["missing_keys"] == [4], report
    assert report["prompt_level_strict"] == 0.25 and report["prompt_level_loose"] == 0.75, report
    assert report["instruction_level_strict"] == 3 / 6 and report["instruction_level_loose"] == 5 / 6, report
    # per instruction type: the share of that type's instructions followed (each type occurs once here)
    met = {"punctuation:no_comma": 1.0, "change_case:english_lowercase": 1.0, "keywords:existence": 1.0,
           "startend:quotation": 0.0, "detectable_format:number_bullet_lists": 0.0, "detectable_format:title": 0.0}
    assert report["per_type_strict"] == met, report["per_type_strict"]
    met.update({"startend:quotation": 1.0, "detectable_format:number_bullet_lists": 1.0})
    assert report["per_type_loose"] == met, report["per_type_loose"]


def test_ifeval_bad_kwargs_name_the_instruction():
    """A missing argument is an error that names the instruction id and the argument, not a silent random value."""
    with pytest.raises(ValueError, match=r"keywords:frequency: expects .*missing \['frequency', 'relation'\]"):
        E.check_instruction("keywords:frequency", {"keyword": "a"}, "a a a")
    with pytest.raises(ValueError, match="unknown IFEval instruction"):
        E.check_instruction("keywords:nope", {}, "a")


@pytest.mark.skipif(not (SHARED / "ifeval_input_data.jsonl").is_file(), reason="../shared/data not present")
def test_real_ifeval_inputs_build():
    """Every instruction of the 541 real prompts runs with its kwargs (834 verdicts, none raising)."""
    inputs = E.read_jsonl(SHARED / "ifeval_input_data.jsonl")
    strict, _, report = E.score_ifeval(inputs[:200], {inp["prompt"]: inp["prompt"] for inp in inputs})
    assert len(inputs) == 541, len(inputs)
    assert report["missing_responses"] == 0 and len(strict) == 200, report["missing_responses"]


# -----------------------------------------------------------------------------
# CFBench metrics and TRACE scoring


def test_cfbench_psr_three_cases():
    """CSR / ISR / PSR on hand-made items: a primary failure, all-secondary, and mixed priorities."""
    P, S = "primary", "secondary"
    verdicts = [[1, 1], [0, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0], [1, 1, 1, 0]]
    priorities = [[P, P], [P, S], [S] * 5, [S] * 4, [P, S, S], [P, S, S, S]]
    # PSR_i: all primary met -> 1; a primary fails -> 0; all secondary: CSR 0.8 is not > 0.8 -> 0, CSR 1 -> 1;
    # mixed: 0.5 + 0.5 * 1/2 = 0.75 -> 0, 0.5 + 0.5 * 2/3 = 0.833 -> 1
    got = E.cfbench_scores(verdicts, priorities)
    csr = (1 + 0.5 + 0.8 + 1 + 2 / 3 + 0.75) / 6
    assert got["CSR"] == pytest.approx(100 * csr), got
    assert got["ISR"] == pytest.approx(100 * 2 / 6), got
    assert got["PSR"] == pytest.approx(100 * 3 / 6), got
    with pytest.raises(ValueError, match="priorities"):
        E.cfbench_scores([[1]], [["important"]])


def test_cfbench_psr_edges():
    """PSR is 0 when one of two primaries fails (the other passing does not save it), and the mixed rule is strict:
    3 of 5 secondaries met gives 0.5 + 0.5 * 0.6 = 0.8 exactly, which is not > 0.8."""
    P, S = "primary", "secondary"
    got = E.cfbench_scores([[1, 0, 1]], [[P, P, S]])
    assert got["PSR"] == 0.0, f"a failed primary must give PSR 0, got {got}"
    got = E.cfbench_scores([[1, 1, 1, 1, 0, 0]], [[P] + [S] * 5])
    assert got["PSR"] == 0.0, f"0.5 + 0.5 * 3/5 = 0.8 is not > 0.8, got {got}"
    got = E.cfbench_scores([[1, 1, 1, 1, 1, 0]], [[P] + [S] * 5])
    assert got["PSR"] == 100.0, f"0.5 + 0.5 * 4/5 = 0.9 > 0.8, got {got}"


@pytest.fixture(scope="module")
def toy_trace():
    return trace_gen.generate_data(40, 40, seed=3, toy=True, progress=False)


def test_trace_references_score_100_and_dpo_losers_below(toy_trace):
    """trace_gen's references satisfy every check; DPO rejected answers score lower on every metric."""
    items = toy_trace["eval"]
    report = E.score_trace(items, [it["reference"] for it in items])
    assert all(v == 100.0 for v in report["metrics"].values()), report["metrics"]
    assert report["n_single"] + report["n_multi"] == len(items) and report["n_single"] > 0, report
    dpo = [{"id": str(i), "messages": [{"role": "user", "content": r["prompt"]}], "checks": r["checks"]}
           for i, r in enumerate(toy_trace["dpo"])]
    chosen = E.score_trace(dpo, [r["chosen"] for r in toy_trace["dpo"]])["metrics"]
    rejected = E.score_trace(dpo, [r["rejected"] for r in toy_trace["dpo"]])["metrics"]
    assert chosen["IF"] == 100.0 and rejected["IF"] == 0.0, (chosen, rejected)
    for key in ("CSR", "ISR", "PSR"):
        assert rejected[key] < chosen[key], (key, chosen, rejected)


def test_trace_breakdowns_and_missing(toy_trace):
    """Missing answers fail and are counted; breakdowns by type, dimension and count add up."""
    items = toy_trace["eval"]
    responses = {it["id"]: it["reference"] for it in items[2:]}
    rows = E.judge_trace(items, responses)
    report = E.trace_report(rows)
    assert report["missing_responses"] == 2 and report["missing_ids"] == ["0", "1"], report["missing_ids"]
    assert rows[0]["missing"] and not any(rows[0]["verdicts"]), rows[0]
    assert sum(v["n"] for v in report["by_type"].values()) == report["n_constraints"], report["by_type"]
    assert sum(v["n"] for v in report["by_dimension"].values()) == report["n_constraints"]
    dimensions = {spec["dimension"] for item in items for spec in item["checks"]}
    assert set(report["by_dimension"]) == dimensions, (sorted(report["by_dimension"]), sorted(dimensions))
    assert sum(v["n"] for v in report["by_constraint_count"].values()) == len(items)
    expected_if = 100 * (len(items) - 2) / len(items)
    assert report["metrics"]["IF"] == pytest.approx(expected_if), report["metrics"]


# a check spec as trace_gen writes it, less its priority
NO_COMMAS = {"dimension": "Exclusion", "type": "Content", "family": "no_commas", "params": {}}


def test_trace_metrics_on_hand_judged_items():
    """IF-S, IF-M, IF and CFBench's scores on five items judged by hand; a spec without a priority is primary.

    s1 [pass], s2 [fail, no priority], m1 [pass P, fail S], m2 [pass, pass], m3 [fail, fail]:
    IF-S 1/2, IF-M 1/3, IF 2/5, CSR (1 + 0 + 0.5 + 1 + 0) / 5, ISR 2/5, PSR (1 + 0 + 0 + 1 + 0) / 5.
    """
    quotes = {"dimension": "Output Format", "type": "Format", "family": "quotes_wrap", "params": {}}
    P, S = dict(NO_COMMAS, priority="primary"), dict(quotes, priority="secondary")
    items = [{"id": "s1", "checks": [P]}, {"id": "s2", "checks": [NO_COMMAS]}, {"id": "m1", "checks": [P, S]},
             {"id": "m2", "checks": [P, S]}, {"id": "m3", "checks": [P, S]}]
    rows = E.judge_trace(items, ["Plain text.", "a, b.", "Plain text.", '"Plain."', "a, b."])
    assert [r["verdicts"] for r in rows] == [[True], [False], [True, False], [True, True], [False, False]], rows
    assert rows[1]["priorities"] == ["primary"], rows[1]["priorities"]
    got = E.trace_report(rows)["metrics"]
    want = {"IF-S": 50.0, "IF-M": 100 / 3, "IF": 40.0, "CSR": 50.0, "ISR": 40.0, "PSR": 40.0}
    assert got == pytest.approx(want), got
    table = E.trace_markdown(E.trace_report(rows)).splitlines()  # report.md: each number under its own heading
    assert table[:3] == ["| IF-S | IF-M | IF | CSR | ISR | PSR |", "|---|---|---|---|---|---|",
                         "| 50.0 | 33.3 | 40.0 | 50.0 | 40.0 | 40.0 |"], table[:3]


def test_trace_malformed_spec_names_item():
    """A spec with an unknown family or without params is an error naming the item and the constraint."""
    good = dict(NO_COMMAS, priority="primary")
    bad = dict(good, family="no_such_family")
    with pytest.raises(ValueError, match=r"item 7, constraint 2: unknown constraint family"):
        E.judge_trace([{"id": "7", "checks": [good, bad]}], ["hello"])
    with pytest.raises(ValueError, match=r"item 7, constraint 1: a spec needs"):
        E.judge_trace([{"id": "7", "checks": [{"family": "no_commas"}]}], ["hello"])
    with pytest.raises(ValueError, match="non-empty 'checks'"):
        E.judge_trace([{"id": "7", "checks": []}], ["hello"])


# -----------------------------------------------------------------------------
# Generation and the command line


@pytest.fixture
def tiny_checkpoint(tiny_model, chatml_tokenizer_dir, tmp_path):
    import model as M
    path = tmp_path / "ckpt"
    M.save_model(tiny_model, path, tokenizer_dir=chatml_tokenizer_dir)
    return path


def test_trace_cli_generates_then_rescores(tiny_checkpoint, toy_trace, tmp_path, capsys):
    """--model generates (greedy, batched) and writes responses that --responses re-scores to the same report."""
    data = tmp_path / "eval.jsonl"
    E.write_jsonl(data, toy_trace["eval"][:6])
    out1, out2 = tmp_path / "gen", tmp_path / "rescored"
    E.main(["trace", "--data", str(data), "--model", str(tiny_checkpoint), "--out", str(out1),
            "--max-new-tokens", "6", "--batch-size", "4", "--label", "tiny"])
    responses = E.read_jsonl(out1 / "responses.jsonl")
    assert [r["id"] for r in responses] == [it["id"] for it in toy_trace["eval"][:6]], responses
    E.main(["trace", "--data", str(data), "--responses", str(out1 / "responses.jsonl"), "--out", str(out2),
            "--label", "tiny"])
    r1, r2 = (json.loads((o / "report.json").read_text()) for o in (out1, out2))
    assert r1["metrics"] == r2["metrics"] and r1["n_items"] == 6, (r1["metrics"], r2["metrics"])
    assert len(E.read_jsonl(out2 / "results.jsonl")) == 6
    assert "| IF-S | IF-M |" in capsys.readouterr().out
    # how the answers were made is recorded (6 new tokens: the tiny model never stops, so all 6 are cut)
    assert r1["generation"] == {"max_new_tokens": 6, "temperature": 0.0, "top_p": 1.0, "seed": None,
                                "batch_size": 4, "cut_at_limit": 6}, r1["generation"]
    assert r1["source"] == {"model": str(tiny_checkpoint.resolve())} and "generation" not in r2, r2
    # another run may not write into a folder that holds this one's report; re-scoring its own answers may
    with pytest.raises(SystemExit, match=r"rescored holds the report of another run \(responses .*gen/responses"):
        E.main(["trace", "--data", str(data), "--model", str(tiny_checkpoint), "--out", str(out2)])
    # nor may compare put two models' reports on one row
    (tmp_path / "other.json").write_text(json.dumps({**r1, "benchmark": "ifeval", "source": {"model": "/elsewhere"}}))
    with pytest.raises(SystemExit, match="share the label 'tiny' but come from different models"):
        E.main(["compare", str(out1), str(tmp_path / "other.json")])
    E.main(["trace", "--data", str(data), "--responses", str(out1 / "responses.jsonl"), "--out", str(out1)])


def test_generate_responses_batching_is_order_free(tiny_model, chatml_tokenizer_dir):
    """Answers come back in item order and do not depend on the batch size (left padding is masked)."""
    import model as M
    tok = M.load_tokenizer(chatml_tokenizer_dir)
    items = [{"prompt": p} for p in ("The river flows.", "Write exactly three sentences and end with a question?",
                                     "Numbers like 12 appear here too.")]
    one = E.generate_responses(tiny_model, tok, items, max_new_tokens=5, batch_size=1, progress=False)
    three = E.generate_responses(tiny_model, tok, items, max_new_tokens=5, batch_size=3, progress=False)
    assert one == three, (one, three)
    assert len(one) == 3 and all(isinstance(a, str) for a in one), one


def test_sampled_answers_draw_one_stream_across_batches(tiny_model, chatml_tokenizer_dir):
    """With a seed, batches continue one random stream: the same prompt answered in 4 batches of 1 gets
    different samples (seeded per batch, all 4 were equal), and the run repeats for the same seed."""
    import model as M
    tok = M.load_tokenizer(chatml_tokenizer_dir)
    items = [{"prompt": "The river flows."}] * 4
    run = lambda: E.generate_responses(tiny_model, tok, items, max_new_tokens=8, batch_size=1, temperature=1.5,
                                       seed=0, progress=False)
    first = run()
    assert len(set(first)) > 1 and run() == first, first


def test_generate_responses_renders_prompts_batches_by_length_and_counts_cut_answers(
        tiny_model, chatml_tokenizer_dir, monkeypatch):
    """Each item reaches M.generate as its chat turns plus the assistant header (a bare prompt as a user turn),
    batched shortest first; answers come back in item order without special tokens, and cut_at_limit counts
    only the answers that used the whole token budget."""
    import model as M
    tok = M.load_tokenizer(chatml_tokenizer_dir)
    system = {"role": "system", "content": "You are a helpful assistant."}
    items = [{"prompt": "Write exactly three sentences and end with a question?"},
             {"messages": [system, {"role": "user", "content": "The river flows."}]},
             {"prompt": "Hi."}, {"prompt": "Numbers like 12 appear here too."}]
    turns = [[("user", items[0]["prompt"])], [("system", system["content"]), ("user", "The river flows.")],
             [("user", "Hi.")], [("user", items[3]["prompt"])]]
    rendered = [tok.encode("".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in t) + "<|im_start|>assistant\n")
                for t in turns]
    im_start, im_end = tok.token_id("<|im_start|>", "test"), tok.token_id("<|im_end|>", "test")
    budget = 5
    answers = [tok.encode("river") + [im_end], tok.encode("The river flows north through")[:budget],
               [im_start] + tok.encode("hi"), tok.encode("blue")]
    assert len(answers[1]) == budget and all(len(a) < budget for a in answers[:1] + answers[2:]), answers
    batches = []

    def fake_generate(model, prompts, max_new_tokens, **kw):
        batches.append([len(p) for p in prompts])
        for p in prompts:
            assert list(p) in rendered, f"prompt {tok.decode(p, skip_special_tokens=False)!r} is not a rendered item"
        return [answers[rendered.index(list(p))] for p in prompts]

    monkeypatch.setattr(M, "generate", fake_generate)
    counts = {}
    got = E.generate_responses(tiny_model, tok, items, max_new_tokens=budget, batch_size=2, progress=False,
                               counts=counts)
    assert got == ["river", tok.decode(answers[1]), "hi", "blue"], got
    assert counts == {"cut_at_limit": 1}, counts
    lengths = [n for batch in batches for n in batch]
    assert len(batches) == 2 and lengths == sorted(map(len, rendered)), f"batches of prompt lengths {batches}"


def _echo_generation(monkeypatch, answer):
    """eval.py's --model path without a model: every item is answered by answer(item)."""
    monkeypatch.setattr(E, "_load_for_generation", lambda args: (None, None))
    monkeypatch.setattr(E, "generate_responses", lambda model, tok, items, *a, **kw: [answer(it) for it in items])


def test_model_answers_are_kept_with_their_own_items(tmp_path, toy_trace, monkeypatch):
    """--model: each answer is stored and judged with the item it answers. TRACE items without an 'id' are keyed
    by their 0-based position, and a --responses file may give those ids as integers; IFEval answers are paired
    with their prompts."""
    items = [{k: v for k, v in it.items() if k != "id"} for it in toy_trace["eval"][:3]]
    data = tmp_path / "eval.jsonl"
    E.write_jsonl(data, items)
    _echo_generation(monkeypatch, lambda it: it["reference"])
    E.main(["trace", "--data", str(data), "--model", str(tmp_path / "m"), "--out", str(tmp_path / "gen")])
    saved = E.read_jsonl(tmp_path / "gen" / "responses.jsonl")
    assert saved == [{"id": str(n), "response": it["reference"]} for n, it in enumerate(items)], saved
    report = json.loads((tmp_path / "gen" / "report.json").read_text())
    assert report["missing_responses"] == 0 and report["metrics"]["IF"] == 100.0, report
    as_ints = tmp_path / "ints.jsonl"
    E.write_jsonl(as_ints, [{"id": n, "response": it["reference"]} for n, it in enumerate(items)])
    E.main(["trace", "--data", str(data), "--responses", str(as_ints), "--out", str(tmp_path / "ints")])
    report = json.loads((tmp_path / "ints" / "report.json").read_text())
    assert report["missing_responses"] == 0 and report["metrics"]["IF"] == 100.0, report
    _echo_generation(monkeypatch, lambda inp: f"answer to {inp['prompt']}")
    E.main(["ifeval", "--input", str(FIXTURES / "ifeval_mini.jsonl"), "--model", str(tmp_path / "m"),
            "--out", str(tmp_path / "if")])
    prompts = [inp["prompt"] for inp in E.read_jsonl(FIXTURES / "ifeval_mini.jsonl")]
    want = [{"prompt": p, "response": f"answer to {p}"} for p in prompts]
    assert E.read_jsonl(tmp_path / "if" / "input_response_data.jsonl") == want
    strict = E.read_jsonl(tmp_path / "if" / "eval_results_strict.jsonl")
    assert [(r["prompt"], r["response"]) for r in strict] == [(w["prompt"], w["response"]) for w in want], strict


def test_blank_answers_are_empty_and_only_absent_ones_missing():
    """An answer of "" or only whitespace is empty (and fails), not missing; only an absent answer is missing."""
    items = [{"id": str(n), "checks": [NO_COMMAS]} for n in range(4)]
    rows = E.judge_trace(items, ["", " \n\t", None, "Plain text."])
    flags = [(r["missing"], r["empty"], r["follow_all"]) for r in rows]
    assert flags == [(False, True, False), (False, True, False), (True, False, False), (False, False, True)], flags
    report = E.trace_report(rows)
    assert (report["missing_responses"], report["empty_responses"]) == (1, 2), report


def test_ifeval_cli_and_compare(tmp_path, capsys):
    """ifeval writes the official files; compare prints Table 3 with blanks for metrics a report lacks."""
    out = tmp_path / "if"
    E.main(["ifeval", "--input", str(FIXTURES / "ifeval_mini.jsonl"),
            "--responses", str(FIXTURES / "ifeval_mini_responses.jsonl"), "--out", str(out), "--label", "run"])
    rows = E.read_jsonl(out / "eval_results_loose.jsonl")
    assert len(rows) == 4 and rows[0]["follow_all_instructions"] is True, rows[0]
    assert "1 prompts had no response" in capsys.readouterr().out  # reported, not dropped
    trace_report = {"label": "run", "metrics": {"IF-S": 50.0, "IF-M": 25.0, "CSR": 60.0, "ISR": 20.0, "PSR": 30.0}}
    (tmp_path / "t.json").write_text(json.dumps(trace_report))
    other = {"label": "base", "metrics": {"IF-S": 10.0}}
    (tmp_path / "o.json").write_text(json.dumps(other))
    E.main(["compare", str(tmp_path / "t.json"), str(out), str(tmp_path / "o.json")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| run | IF-S | IF-M | S-Acc | L-Acc | CSR | ISR | PSR |", lines
    assert lines[2] == "| run | 50.0 | 25.0 | 25.0 | 75.0 | 60.0 | 20.0 | 30.0 |", lines
    assert lines[3] == "| base | 10.0 |  |  |  |  |  |  |", lines


def test_cli_bad_inputs(tmp_path):
    """A missing file, a bad JSON line and a response row without 'response' are clear errors."""
    with pytest.raises(SystemExit, match="does not exist"):
        E.main(["ifeval", "--input", str(tmp_path / "nope.jsonl"), "--responses", "x", "--out", str(tmp_path)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{oops\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:2 is not valid JSON"):
        E.read_jsonl(bad)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a"}\n')
    with pytest.raises(SystemExit, match="needs 'prompt' and a string 'response'"):
        E.main(["ifeval", "--input", str(FIXTURES / "ifeval_mini.jsonl"), "--responses", str(rows),
                "--out", str(tmp_path / "o")])


def test_read_jsonl_bad_utf8_names_the_line_and_a_bom_is_read(tmp_path):
    """Invalid UTF-8 is an error naming file:line (not a bare codec error); a leading byte order mark is skipped."""
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"id": "0"}\n\n{"id": "\xff"}\n')
    with pytest.raises(SystemExit) as info:
        E.read_jsonl(bad)
    assert f"{bad}:3 is not valid UTF-8 (byte 0xff" in str(info.value), str(info.value)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"id": "0"}\r\n{"id": "1"}\r\n')
    assert E.read_jsonl(bom) == [{"id": "0"}, {"id": "1"}], E.read_jsonl(bom)


def test_write_jsonl_creates_the_folder_and_replaces_the_file_whole(tmp_path):
    """write_jsonl creates missing folders, writes non-ASCII text as is, and leaves no temporary file."""
    path = tmp_path / "new" / "deeper" / "rows.jsonl"
    E.write_jsonl(path, [{"id": "0", "response": "caf\u00e9"}])
    E.write_jsonl(path, [{"id": "1", "response": "ok"}])
    assert path.read_text(encoding="utf-8") == '{"id": "1", "response": "ok"}\n', path.read_text(encoding="utf-8")
    E.write_jsonl(path, [{"id": "2", "response": "caf\u00e9"}])
    assert "caf\u00e9" in path.read_text(encoding="utf-8") and E.read_jsonl(path)[0]["response"] == "caf\u00e9"
    assert [p.name for p in path.parent.iterdir()] == ["rows.jsonl"], list(path.parent.iterdir())


def test_trace_with_model_checks_every_prompt_before_loading_it(tmp_path):
    """--model: a malformed 'messages' list stops at file:line before the model loads (was an AttributeError)."""
    item = {"id": "0", "messages": [{"role": "user", "content": "Say hi in quotes."}],
            "checks": [{"dimension": "Output Format", "type": "Format", "family": "quotes_wrap", "params": {}}]}
    needs = r"message 0 needs string 'role' and 'content'"
    for messages, message in (([["user", "hi"]], needs), ([{"role": "user"}], needs + r", got \{'role': 'user'\}")):
        data = tmp_path / "items.jsonl"
        data.write_text(json.dumps(item) + "\n" + json.dumps({**item, "id": "other", "messages": messages}) + "\n")
        with pytest.raises(SystemExit, match=f"error: {data}:2: {message}"):
            E.main(["trace", "--data", str(data), "--model", str(tmp_path / "never_loaded"),
                    "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_compare_names_a_malformed_report(tmp_path):
    """compare: a report.json whose metrics or source have the wrong type, or that is not UTF-8, is an error
    naming the file (these were TypeError / AttributeError tracebacks)."""
    good = {"benchmark": "trace", "label": "a", "metrics": {"IF-S": 50.0, "IF-M": None}, "source": {"model": "m"}}
    cases = {"list": ({**good, "metrics": [1, 2]}, "'metrics' should map names to percentages"),
             "text": ({**good, "metrics": {"IF-S": "high"}}, "'metrics' should map names to percentages"),
             "source": ({**good, "source": "m"}, "'source' should be an object")}
    for name, (report, message) in cases.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps(report))
        with pytest.raises(SystemExit) as info:
            E.main(["compare", str(tmp_path / name)])
        assert str(info.value).startswith(f"error: {tmp_path / name / 'report.json'}: {message}"), str(info.value)
    (tmp_path / "bytes.json").write_bytes(b'{"metrics": "\xff"}')
    with pytest.raises(SystemExit, match="bytes.json is not valid UTF-8"):
        E.main(["compare", str(tmp_path / "bytes.json")])


def test_ifeval_answers_get_lm_evals_token_budget():
    """IFEval's default budget is lm-eval's 1,280 tokens (prompts ask for 600+ words); TRACE keeps 512."""
    parse = E.build_parser().parse_args
    assert parse(["ifeval", "--input", "i", "--responses", "r", "--out", "o"]).max_new_tokens == 1280
    assert parse(["trace", "--data", "d", "--responses", "r"]).max_new_tokens == 512


def test_default_labels_name_the_run_not_its_final_folder(tmp_path, monkeypatch):
    """Without --label, RUN/final is labelled RUN and RUN/checkpoint-N RUN/checkpoint-N, so compare keeps runs apart."""
    from argparse import Namespace
    import eval as E
    label = lambda model: E._label(Namespace(label=None, model=str(model), responses=None))
    assert label(tmp_path / "sft" / "final") == "sft"
    assert label(tmp_path / "iopo" / "checkpoint-40") == "iopo/checkpoint-40"
    assert label(tmp_path / "Qwen2-7B-Instruct") == "Qwen2-7B-Instruct"
    assert E._label(Namespace(label=None, model=None, responses="runs/gpt4.jsonl")) == "gpt4"
    (tmp_path / "dpo" / "final").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "dpo")  # a relative path is named after the folder it resolves to
    assert (label("final"), label("final/."), label(".")) == ("dpo", "dpo", "dpo"), (label("final"), label("."))


def _trace_files(tmp_path, toy_trace, n=4):
    """An eval.jsonl of n toy items and a responses file holding their references."""
    data, responses = tmp_path / "eval.jsonl", tmp_path / "refs.jsonl"
    E.write_jsonl(data, toy_trace["eval"][:n])
    E.write_jsonl(responses, [{"id": it["id"], "response": it["reference"]} for it in toy_trace["eval"][:n]])
    return data, responses


def test_compare_refuses_two_runs_with_one_label(tmp_path, toy_trace, capsys):
    """Two trace runs both labelled 'responses' (A/ and B/responses.jsonl) are an error naming both, not one row."""
    data, refs = _trace_files(tmp_path, toy_trace)
    for run in ("A", "B"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "responses.jsonl").write_bytes(refs.read_bytes())
        E.main(["trace", "--data", str(data), "--responses", str(tmp_path / run / "responses.jsonl"),
                "--out", str(tmp_path / f"out{run}")])
    with pytest.raises(SystemExit, match=r"outA and .*outB are both trace runs labelled 'responses'.*--label"):
        E.main(["compare", str(tmp_path / "outA"), str(tmp_path / "outB")])


def test_no_matching_or_empty_input_is_an_error(tmp_path, toy_trace):
    """Responses that match no item or prompt, and empty files, stop the command; empty sets score None, not 0."""
    data, _ = _trace_files(tmp_path, toy_trace)
    stray, empty = tmp_path / "stray.jsonl", tmp_path / "empty.jsonl"
    E.write_jsonl(stray, [{"id": "x9", "response": "hi"}])
    empty.write_text("\n")
    with pytest.raises(SystemExit, match=r"no response in .*stray.jsonl matches an item id in .*eval.jsonl"):
        E.main(["trace", "--data", str(data), "--responses", str(stray), "--out", str(tmp_path / "o1")])
    with pytest.raises(SystemExit, match=r"empty.jsonl holds no items"):
        E.main(["trace", "--data", str(empty), "--responses", str(stray), "--out", str(tmp_path / "o2")])
    with pytest.raises(SystemExit, match=r"empty.jsonl holds no responses"):
        E.main(["trace", "--data", str(data), "--responses", str(empty), "--out", str(tmp_path / "o3")])
    stray.write_text(json.dumps({"prompt": "Not asked.", "response": "hi"}) + "\n")
    with pytest.raises(SystemExit, match=r"no response in .*stray.jsonl matches a prompt in .*ifeval_mini.jsonl"):
        E.main(["ifeval", "--input", str(FIXTURES / "ifeval_mini.jsonl"), "--responses", str(stray),
                "--out", str(tmp_path / "o4")])
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5)), sorted(p.name for p in tmp_path.iterdir())
    cf = E.cfbench_scores([], [])
    assert (cf["CSR"], cf["ISR"], cf["PSR"]) == (None, None, None), cf
    _, _, report = E.score_ifeval([], {})
    assert report["prompt_level_strict"] is None and report["instruction_level_loose"] is None, report


def test_duplicates_are_errors_naming_both_lines(tmp_path, toy_trace):
    """A response id, an item id or an IFEval prompt given twice is an error with file:line, not a silent pick."""
    data, refs = _trace_files(tmp_path, toy_trace)
    dup = tmp_path / "dup.jsonl"
    dup.write_text(refs.read_text() + json.dumps({"id": "0", "response": "again"}) + "\n")
    with pytest.raises(SystemExit, match=r"dup.jsonl:5: duplicate id '0' \(first on line 1\)"):
        E.main(["trace", "--data", str(data), "--responses", str(dup), "--out", str(tmp_path / "o")])
    items = tmp_path / "items.jsonl"
    E.write_jsonl(items, [toy_trace["eval"][0], toy_trace["eval"][0]])
    with pytest.raises(SystemExit, match=r"items.jsonl:2: duplicate item id '0' \(first on line 1\)"):
        E.main(["trace", "--data", str(items), "--responses", str(refs), "--out", str(tmp_path / "o")])
    inputs = E.read_jsonl(FIXTURES / "ifeval_mini.jsonl")
    twice = tmp_path / "twice.jsonl"
    E.write_jsonl(twice, inputs + [dict(inputs[1], key=99)])
    with pytest.raises(SystemExit, match=r"twice.jsonl:5: duplicate prompt 'Answer in all lowercase.*first on line 2"):
        E.main(["ifeval", "--input", str(twice), "--responses", str(FIXTURES / "ifeval_mini_responses.jsonl"),
                "--out", str(tmp_path / "o")])


def test_cli_errors_name_item_key_line_and_out(tmp_path, toy_trace):
    """A mis-cased priority (named by its line and item), a bad IFEval relation, a bad response line and a file as
    --out are one-line errors."""
    data, refs = _trace_files(tmp_path, toy_trace, n=1)
    item = toy_trace["eval"][0]
    E.write_jsonl(data, [dict(item, checks=[dict(item["checks"][0], priority="Primary")] + item["checks"][1:])])
    with pytest.raises(SystemExit, match=r"eval.jsonl: line 1 \(item 0\), constraint 1: priority must be .*got 'Primary'"):
        E.main(["trace", "--data", str(data), "--responses", str(refs), "--out", str(tmp_path / "o")])
    inputs = E.read_jsonl(FIXTURES / "ifeval_mini.jsonl")
    inputs[2] = dict(inputs[2], instruction_id_list=["keywords:frequency"],
                     kwargs=[{"keyword": "point", "frequency": 2, "relation": "more than"}])
    bad = tmp_path / "bad_input.jsonl"
    E.write_jsonl(bad, inputs)
    with pytest.raises(SystemExit, match=r"bad_input.jsonl: IFEval input with key 3: keywords:frequency: relation"):
        E.main(["ifeval", "--input", str(bad), "--responses", str(FIXTURES / "ifeval_mini_responses.jsonl"),
                "--out", str(tmp_path / "o")])
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c"}\n')  # the third line is the second record
    with pytest.raises(SystemExit, match=r"rows.jsonl:3: needs 'prompt'"):
        E.main(["ifeval", "--input", str(FIXTURES / "ifeval_mini.jsonl"), "--responses", str(rows),
                "--out", str(tmp_path / "o")])
    (tmp_path / "a_file").write_text("keep me")
    with pytest.raises(SystemExit, match=r"--out .*a_file is a file"):
        E.main(["ifeval", "--input", str(FIXTURES / "ifeval_mini.jsonl"),
                "--responses", str(FIXTURES / "ifeval_mini_responses.jsonl"), "--out", str(tmp_path / "a_file")])
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_trace_outputs_are_all_or_nothing(tmp_path, toy_trace, monkeypatch):
    """When the disk fills while the second output is written, the earlier results and report stay as they
    were and no staging folder is left; a folder in the way of an output is refused up front."""
    data, refs = _trace_files(tmp_path, toy_trace)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("results.jsonl", "report.json", "report.md"):
        (out / name).write_text("old\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    real_open, opened = open, []

    def full_disk(file, mode="r", *args, **kwargs):  # the second file opened for writing fails
        if "w" in mode:
            opened.append(file)
            if len(opened) == 2:
                raise OSError("No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(trace_gen, "open", full_disk, raising=False)
    with pytest.raises(SystemExit, match="No space left on device"):
        E.main(["trace", "--data", str(data), "--responses", str(refs), "--out", str(out)])
    monkeypatch.undo()
    kept = {p.name: p.read_text() for p in out.iterdir()}
    assert kept == {"results.jsonl": "old\n", "report.json": "old\n", "report.md": "old\n"}, kept
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a staging folder was left behind"
    (out / "report.md").unlink()
    (out / "report.md").mkdir()
    with pytest.raises(SystemExit, match=r"report.md is a folder"):
        E.main(["trace", "--data", str(data), "--responses", str(refs), "--out", str(out)])
