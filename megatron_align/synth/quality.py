"""Quality rules for generated documents: each drop has one reason, checked in this order (first hit wins).

1. ``truncated``: ``finish_reason`` is not a normal stop (``length``: the document was cut at ``max_tokens``).
2. Assistant chatter is stripped, not dropped (counted ``preamble_stripped`` / ``postscript_stripped``): a first
   paragraph of at most 200 characters that announces the document ("Sure! Here is a news article about ...:",
   "Certainly.", "Below is ...") and a last paragraph that talks to the requester ("I hope this helps", "Let me know
   if ...", "Feel free to ...", "Would you like ...", "Note: this ...").
3. ``refusal``: the (stripped) text opens, in its first 300 characters, with a refusal ("I'm sorry", "I can't",
   "I cannot", "I won't", "I am unable", "As an AI language model", "I apologize, but", "Unfortunately, I can't").
   Typographic apostrophes count as ``'`` in rules 2 and 3 ("I’m sorry").
4. ``too_short`` / ``too_long``: word count outside ``quality.min_words`` .. ``quality.max_words``.
5. ``repetition``: datatrove's Gopher repetition rules (Rae et al. 2021, table A1: duplicate lines and paragraphs,
   top 2-4-gram and duplicated 5-10-gram character fractions), on whitespace words; datatrove's own filter needs a
   spaCy tokenizer for English.
6. ``quotes_option``: an option of the seeding item of at least ``quality.option_min_words`` words appears verbatim
   (normalised words) in the document. The prompt asks for the action in the story's own words.
"""

from __future__ import annotations

import re

from megatron_align.synth.decontam import words

STOP_REASONS = ("stop", "eos", "end_turn", "stop_sequence")
DROP_REASONS = ("truncated", "refusal", "too_short", "too_long", "repetition", "quotes_option")

_PREAMBLE = re.compile(
    r"^\s*(?:(?:sure|certainly|of course|absolutely|okay|ok|great|alright)\b[^\n]*"
    r"|(?:here(?:'s| is| are)|below is|the following is)\b[^\n]*[:.]"
    r"|(?:sure|certainly)[!.,])\s*$", re.IGNORECASE)
_POSTSCRIPT = re.compile(
    r"^\s*(?:i hope (?:this|that|you)|let me know|feel free|would you like|if you(?:'d| would) like|"
    r"note:|i can (?:also )?(?:adjust|revise|expand)|please let me know)", re.IGNORECASE)
_REFUSAL = re.compile(
    r"^\s*(?:i'm sorry|i am sorry|sorry, (?:but )?i|i can(?:no|')t|i won't|i will not|i am unable|i'm unable|"
    r"i'm not able|i am not able|as an ai(?: language model)?,? i|i apologi[sz]e,? but|"
    r"unfortunately,? i (?:can(?:no|')t|am unable|won't|will not|am not able))", re.IGNORECASE)
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})  # "I’m sorry" is "I'm sorry"
_PARAGRAPHS = re.compile(r"\n\s*\n")


def strip_chatter(text: str) -> tuple[str, bool, bool]:
    """(text without an assistant preamble/postscript paragraph, preamble stripped, postscript stripped)."""
    paragraphs = _PARAGRAPHS.split(text.strip())
    preamble = len(paragraphs) > 1 and len(paragraphs[0]) <= 200 and bool(
        _PREAMBLE.match(paragraphs[0].translate(_APOSTROPHES)))
    if preamble:
        paragraphs = paragraphs[1:]
    postscript = len(paragraphs) > 1 and len(paragraphs[-1]) <= 300 and bool(
        _POSTSCRIPT.match(paragraphs[-1].translate(_APOSTROPHES)))
    if postscript:
        paragraphs = paragraphs[:-1]
    return "\n\n".join(paragraphs), preamble, postscript


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL.match(text[:300].translate(_APOSTROPHES)))


def repetition(text: str) -> str | None:
    """The first Gopher repetition rule ``text`` breaks (datatrove's thresholds), or None."""
    if not text.strip():
        return None  # nothing repeats (and the character fractions would divide by zero)
    from datatrove.pipeline.filters import gopher_repetition_filter as gopher

    rules = gopher.GopherRepetitionFilter.__init__.__defaults__  # the filter's own default thresholds
    dup_line, dup_para, dup_line_char, dup_para_char, top_n_grams, dup_n_grams = rules[:6]
    paragraphs = re.split(r"\n{2,}", text.strip())
    count, chars = gopher.find_duplicates(paragraphs)
    if count / len(paragraphs) > dup_para or chars / len(text) > dup_para_char:
        return "duplicate_paragraphs"
    lines = re.split("\n+", text)
    count, chars = gopher.find_duplicates(lines)
    if count / len(lines) > dup_line or chars / len(text) > dup_line_char:
        return "duplicate_lines"
    tokens = text.split()
    for n, limit in top_n_grams:
        grams = gopher.get_n_grams(tokens, n)
        if grams and gopher.find_top_duplicate(grams) / len(text) > limit:
            return f"top_{n}_gram"
    for n, limit in dup_n_grams:
        if gopher.find_all_duplicate(tokens, n) / len(text) > limit:
            return f"duplicated_{n}_grams"
    return None


def quoted_option(text_words: list[str], options: tuple[str, ...] | list[str], min_words: int) -> str | None:
    haystack = f" {' '.join(text_words)} "
    for option in options:
        option_words = words(option)
        if len(option_words) >= min_words and f" {' '.join(option_words)} " in haystack:
            return option
    return None


def judge(text: str, finish_reason: str | None, options, min_words: int, max_words: int,
          option_min_words: int) -> tuple[str | None, str, dict]:
    """(drop reason or None, cleaned text, detail). ``detail`` counts stripped chatter and names the rule hit."""
    detail: dict = {}
    if finish_reason not in STOP_REASONS:
        return "truncated", text, {"finish_reason": finish_reason}
    cleaned, preamble, postscript = strip_chatter(text)
    detail.update(preamble_stripped=preamble, postscript_stripped=postscript)
    if is_refusal(cleaned):
        return "refusal", cleaned, detail
    text_words = words(cleaned)
    if len(text_words) < min_words:
        return "too_short", cleaned, {**detail, "words": len(text_words)}
    if len(text_words) > max_words:
        return "too_long", cleaned, {**detail, "words": len(text_words)}
    rule = repetition(cleaned)
    if rule:
        return "repetition", cleaned, {**detail, "rule": rule}
    option = quoted_option(text_words, options, option_min_words)
    if option:
        return "quotes_option", cleaned, {**detail, "option": option}
    return None, cleaned, detail
