"""VeCap's caption rules (curate/captions/vecap.py): cleaning, salient tokens, the repetition guard, the
caption and fusion judges in their documented order, the fusion prompt and the prompt hash."""

from __future__ import annotations

import pytest

from curate.captions.vecap import (
    CAPTION_EMPTY,
    CAPTION_REPETITION,
    DEFAULT_FUSION_PROMPT,
    FUSION_EMPTY,
    FUSION_LOST_ALT_FACTS,
    FUSION_REPETITION,
    FUSION_TOO_LONG,
    NOT_SALIENT,
    check_fusion_template,
    clean,
    fusion_prompt,
    judge_caption,
    judge_fusion,
    keeps_alt_facts,
    prompt_hash,
    repetition_loop,
    salient_tokens,
)

# clean -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, expected", [
    (None, ""),
    ("", ""),
    ("   \t\n ", ""),
    ("a dog\x00 on\x07 grass\x1b", "a dog on grass"),
    ("caf\ufffd\ufffd au lait", "caf au lait"),
    ("zero\u200bwidth \u00adsoft", "zerowidth soft"),
    ("a\tdog\n\non  \r\n grass", "a dog on grass"),
    ("  padded  ", "padded"),
    ("Caption: a dog", "a dog"),
    ("caption:a dog", "a dog"),
    ("CAPTION :   a dog", "a dog"),
    ("Description: a red bus", "a red bus"),
    ("description : a red bus", "a red bus"),
    ("New caption: a red bus", "a red bus"),
    ("Caption:", ""),
    ('"a dog on grass"', "a dog on grass"),
    ("'a dog on grass'", "a dog on grass"),
    ('" a dog "', "a dog"),
    ('Caption: "a dog on grass"', "a dog on grass"),
    ('""', ""),
    ('"', '"'),
    ('"a dog', '"a dog'),
    ('a "quoted" word', 'a "quoted" word'),
    ("The caption: a dog", "The caption: a dog"),
])
def test_clean(raw, expected):
    """clean drops control/format chars and U+FFFD, collapses whitespace, strips a leading label and wrapping quotes."""
    assert clean(raw) == expected


def test_clean_strips_wrapping_curly_quotes():
    """clean drops wrapping typographic quotes “...” like it drops straight ones."""
    assert clean("\u201ca dog on grass\u201d") == "a dog on grass"


def test_clean_vertical_whitespace_separates_words():
    """clean turns a form feed or vertical tab between words into a space, not nothing."""
    assert clean("a\x0cdog\x0bruns") == "a dog runs"


# salient_tokens ----------------------------------------------------------------------------------


@pytest.mark.parametrize("alt, expected", [
    ("", set()),
    (None, set()),
    ("built in 1889", {"1889"}),
    ("3.5 stars at 10:30", {"3.5", "10:30"}),
    ("1,000 people", {"1,000"}),
    ("a dog on a beach", set()),
    ("Eiffel Tower", {"eiffel", "tower"}),
    ("NASA launch", {"nasa"}),
    ("The dog. A cat. This house. Photo of Paris", {"paris"}),
    ("Image Picture Stock Close View Photograph Closeup", set()),
    ("Zürich at night", {"zürich"}),
    ("Ελλάδα και Αθήνα", {"ελλάδα", "αθήνα"}),
    ("Москва 2020", {"москва", "2020"}),
    ("Coca-Cola bottle", {"coca-cola"}),
])
def test_salient_tokens(alt, expected):
    """salient_tokens keeps numbers and lower-cased capitalised words, minus NOT_SALIENT and lower-case words."""
    assert salient_tokens(alt) == expected


@pytest.mark.parametrize("word", sorted(NOT_SALIENT))
def test_not_salient_words_excluded_when_capitalised(word):
    """Every NOT_SALIENT word, capitalised at a sentence start, is not salient."""
    assert salient_tokens(f"{word.capitalize()} Berlin") == {"berlin"}


def test_salient_tokens_decomposed_accent():
    """A capitalised word written with a combining accent is one salient token, as its composed form is."""
    assert salient_tokens("Zu\u0308rich at night") == salient_tokens("Zürich at night") == {"zürich"}


# keeps_alt_facts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("alt, fused, expected", [
    ("a dog on a beach", "a cat in a box", True),
    ("", "anything", True),
    ("The Photo", "anything", True),
    ("Eiffel Tower in Paris", "a tall iron tower in paris at dusk", True),
    ("Eiffel Tower in Paris", "A TOWER at dusk", True),
    ("opened in 1889", "the tower, opened in 1889.", True),
    ("Eiffel Tower in Paris", "a tall iron structure at dusk", False),
    ("Paris", "a Parisian street", False),
    ("Paris", "paris-style cafe", False),
    ("built in 1889", "built in 18890", False),
    ("3.5 stars", "3 stars", False),
    ("Zürich", "the old town of zürich", True),
])
def test_keeps_alt_facts(alt, fused, expected):
    """keeps_alt_facts: no salient token -> True; else True iff one appears case-insensitively as a whole token."""
    assert keeps_alt_facts(alt, fused) is expected


# repetition_loop ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("the cat sat the cat sat the cat sat", True),
    ("The cat sat, THE CAT SAT and the Cat Sat", True),
    ("the cat sat the cat sat", False),
    ("dog dog dog dog dog", True),
    ("a big dog dog dog dog dog here", True),
    ("Dog DOG dog Dog dOg", True),
    ("dog dog dog dog", False),
    ("a dog dog dog dog runs", False),
    ("A brown dog runs across a sunny beach next to the blue sea.", False),
    ("", False),
])
def test_repetition_loop(text, expected):
    """repetition_loop: a 3-gram three times or one word five times in a row, case-insensitively."""
    assert repetition_loop(text) is expected


def test_repetition_loop_custom_n_and_times():
    """repetition_loop honours n and times."""
    assert repetition_loop("red car red car", n=2, times=2) is True
    assert repetition_loop("red car red car", n=2, times=3) is False


# judge_caption -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ('Caption: "A dog\non a beach."', ("A dog on a beach.", None)),
    (None, (None, CAPTION_EMPTY)),
    ("", (None, CAPTION_EMPTY)),
    ("\x00\ufffd \n", (None, CAPTION_EMPTY)),
    ("Description:", (None, CAPTION_EMPTY)),
    ("a dog and a dog and a dog and a dog", (None, CAPTION_REPETITION)),
])
def test_judge_caption(text, expected):
    """judge_caption returns (cleaned, None), (None, caption_empty) or (None, caption_repetition)."""
    assert judge_caption(text) == expected


# judge_fusion ------------------------------------------------------------------------------------

ALT = "Eiffel Tower in Paris"
SYN = "a tall iron tower against a pink sky"
LOOP = "near paris now near paris now near paris now"


@pytest.mark.parametrize("fused, kwargs, expected", [
    # passes every guard: returned cleaned
    ('Caption: "The Eiffel Tower\nagainst a pink sky."', {}, ("The Eiffel Tower against a pink sky.", None)),
    # empty after cleaning
    (None, {}, (SYN, FUSION_EMPTY)),
    ("", {}, (SYN, FUSION_EMPTY)),
    (" \n\x00", {}, (SYN, FUSION_EMPTY)),
    ("Caption: ", {}, (SYN, FUSION_EMPTY)),
    # too long: over max_words, or truncated
    ("Paris " + "word " * 5, {"max_words": 5}, (SYN, FUSION_TOO_LONG)),
    ("Paris one two three four", {"max_words": 5}, ("Paris one two three four", None)),
    ("Paris at dusk", {"truncated": True}, (SYN, FUSION_TOO_LONG)),
    # repetition
    (LOOP, {}, (SYN, FUSION_REPETITION)),
    # lost alt facts
    ("a tall iron structure at dusk", {}, (SYN, FUSION_LOST_ALT_FACTS)),
])
def test_judge_fusion_paths(fused, kwargs, expected):
    """judge_fusion returns the cleaned fusion and None, or the synthetic caption and the guard's code."""
    assert judge_fusion(ALT, SYN, fused, **kwargs) == expected


@pytest.mark.parametrize("fused, kwargs, expected_code", [
    # empty beats too long (truncated)
    ("", {"truncated": True}, FUSION_EMPTY),
    # too long beats repetition and lost facts (both by word count and by truncation)
    ("it is so it is so it is so here", {"max_words": 3}, FUSION_TOO_LONG),
    ("it is so it is so it is so here", {"truncated": True}, FUSION_TOO_LONG),
    # repetition beats lost facts
    ("it is so it is so it is so here", {}, FUSION_REPETITION),
])
def test_judge_fusion_guard_order(fused, kwargs, expected_code):
    """judge_fusion reports the first failing guard in order: empty, too long, repetition, lost alt facts."""
    assert judge_fusion(ALT, SYN, fused, **kwargs) == (SYN, expected_code)


def test_judge_fusion_alt_without_salient_tokens_puts_no_constraint():
    """An alt-text without salient tokens never causes fusion_lost_alt_facts."""
    assert judge_fusion("a dog on a beach", SYN, "a cat in a box") == ("a cat in a box", None)


@pytest.mark.parametrize("fused", [None, "", "x " * 200, LOOP, "nothing relevant"])
def test_judge_fusion_fallback_returns_given_synthetic(fused):
    """Every fallback returns exactly the synthetic caption it was given, uncleaned."""
    synthetic = '  "Raw\tsynthetic"  '
    out, code = judge_fusion(ALT, synthetic, fused)
    assert code is not None
    assert out is synthetic


# fusion_prompt / check_fusion_template -----------------------------------------------------------


def test_fusion_prompt_fills_both_placeholders():
    """fusion_prompt substitutes every occurrence of both placeholders."""
    t = "A: {alt_text} | D: {synthetic_caption} | again {alt_text}"
    assert fusion_prompt(t, "alt", "syn") == "A: alt | D: syn | again alt"


def test_fusion_prompt_braces_stay_literal():
    """Braces in alt-text and caption are text: no format(), and an alt's '{alt_text}' is not re-substituted."""
    t = "A: {alt_text} D: {synthetic_caption}"
    # alt_text is replaced first, and str.replace never rescans what it inserted
    assert fusion_prompt(t, "{x} {alt_text} {0}", "SYN") == "A: {x} {alt_text} {0} D: SYN"
    # the caption is inserted last, so an '{alt_text}' in it stays literal too
    assert fusion_prompt(t, "ALT", "a {alt_text} {}") == "A: ALT D: a {alt_text} {}"


def test_fusion_prompt_alt_with_synthetic_placeholder_stays_literal():
    """An alt-text containing '{synthetic_caption}' stays literal text in the prompt."""
    t = "A: {alt_text} D: {synthetic_caption}"
    assert fusion_prompt(t, "see {synthetic_caption}", "SYN") == "A: see {synthetic_caption} D: SYN"


def test_check_fusion_template_accepts_valid():
    """check_fusion_template returns a template that has both placeholders (the default included)."""
    assert check_fusion_template(DEFAULT_FUSION_PROMPT) is DEFAULT_FUSION_PROMPT
    assert check_fusion_template("{synthetic_caption}{alt_text}") == "{synthetic_caption}{alt_text}"


@pytest.mark.parametrize("template, missing, present", [
    ("only {alt_text}", "{synthetic_caption}", "{alt_text}"),
    ("only {synthetic_caption}", "{alt_text}", "{synthetic_caption}"),
    ("neither {alt} {caption}", "{alt_text}", None),
    ("neither {alt} {caption}", "{synthetic_caption}", None),
])
def test_check_fusion_template_names_missing(template, missing, present):
    """check_fusion_template raises ValueError naming each missing placeholder (and not a present one)."""
    with pytest.raises(ValueError) as err:
        check_fusion_template(template)
    assert missing in str(err.value)
    if present is not None:
        assert present not in str(err.value)


# prompt_hash -------------------------------------------------------------------------------------

BASE = ("Describe this image.", "model-x", 0.0, 128)


def test_prompt_hash_stable():
    """prompt_hash is deterministic: a fixed value, equal across calls, 16 hex chars."""
    h = prompt_hash(*BASE)
    assert h == prompt_hash(*BASE) == "b7ecd20685909731"
    assert len(h) == 16 and int(h, 16) >= 0


@pytest.mark.parametrize("i, other", [(0, "Describe this image!"), (1, "model-y"), (2, 0.7), (3, 129)])
def test_prompt_hash_changes_with_any_part(i, other):
    """Changing any one part of the prompt or settings changes the hash."""
    parts = list(BASE)
    parts[i] = other
    assert prompt_hash(*parts) != prompt_hash(*BASE)


def test_prompt_hash_part_boundaries_matter():
    """Moving the boundary between parts, or dropping a part, changes the hash."""
    assert prompt_hash("ab", "c") != prompt_hash("a", "bc")
    assert prompt_hash("a", "b") != prompt_hash("ab")
    assert prompt_hash(*BASE) != prompt_hash(*BASE[:-1])


def test_possessives_keep_the_name_salient():
    """A possessive 's is dropped before matching: Obama's names Obama, It's is a sentence start."""
    assert salient_tokens("It's Obama's dog") == {"obama"}
    assert judge_fusion("Obama's speech", "a man at a podium", "Barack Obama giving a speech at a podium") == \
        ("Barack Obama giving a speech at a podium", None)
