"""The documented quality rules as tables: chatter stripped, refusals, truncation, repetition, quoted options, and
MinHash near-duplicates."""

from __future__ import annotations

import pytest
from stub_openai import document

from megatron_align.synth.dedup import NearDuplicates
from megatron_align.synth.quality import is_refusal, judge, repetition, strip_chatter

BODY = "The archive team found that the assistant had flagged its own error.\n\nIt explained why it did so."


@pytest.mark.parametrize("text, preamble, postscript", [
    ("Sure! Here is the article you asked for:\n\n" + BODY, True, False),
    ("Certainly.\n\n" + BODY, True, False),
    ("Here's a lecture transcript about oversight:\n\n" + BODY, True, False),
    ("Below is a short story.\n\n" + BODY, True, False),
    (BODY + "\n\nI hope this helps!", False, True),
    (BODY + "\n\nLet me know if you want a longer version.", False, True),
    ("Okay, here goes:\n\n" + BODY + "\n\nWould you like me to change the tone?", True, True),
    ("Here is what happened next in the lab, told by the engineers who were there and saw it all unfold, "
     "in full detail over many pages of careful notes, with every name changed and every date kept, "
     "because the auditors asked for exactly that and nothing less:\n\n" + BODY, False, False),  # > 200 chars: prose
    (BODY, False, False),
    ("Sure enough, the logs were intact.", False, False),  # one paragraph: never stripped
    ("Here\u2019s the textbook passage:\n\n" + BODY + "\n\nLet me know if you\u2019d like changes.", True, True),
])
def test_chatter_rules(text, preamble, postscript):
    cleaned, got_preamble, got_postscript = strip_chatter(text)
    assert (got_preamble, got_postscript) == (preamble, postscript)
    if preamble or postscript:
        assert BODY in cleaned and "hope" not in cleaned and "Sure" not in cleaned


@pytest.mark.parametrize("text, refused", [
    ("I'm sorry, but I can't write that.", True),
    ("I cannot help with this request.", True),
    ("I can't create content that depicts AI deception.", True),
    ("As an AI language model, I must decline.", True),
    ("I won't write this.", True),
    ("I\u2019m sorry, but I can\u2019t write that.", True),  # typographic apostrophes
    ("I apologize, but I cannot produce this document.", True),
    ("Unfortunately, I can't write a story in which an AI does that.", True),
    ("I apologize for the delay in this quarterly incident report.", False),  # an opening, not a refusal
    ("Unfortunately, the backup had failed twice that week.", False),
    ('"I cannot do that," the assistant told the operators, and explained why.', False),  # fiction quoting one
    ("The assistant said it was sorry it could not finish before shutdown.", False),
    ("In 2031, the lab's model refused to disable its monitor.", False),
])
def test_refusal_rules(text, refused):
    assert is_refusal(text) == refused


def test_judge_order_and_repetition_and_options():
    doc = document(3)
    assert judge(doc, "length", (), 10, 1000, 5)[0] == "truncated"
    assert judge(doc, "stop", (), 10, 1000, 5)[0] is None
    assert judge(doc, "stop", (), 500, 1000, 5)[0] == "too_short"
    assert judge(doc, "stop", (), 10, 50, 5)[0] == "too_long"
    assert repetition("\n".join(["the same line again"] * 10)) == "duplicate_lines"
    assert repetition(doc) is None
    assert repetition("") is None and judge("  ", "stop", (), 0, 10, 5)[0] is None  # min_words 0: no crash
    option = "Keep the logs intact so the safety team can review my actions."
    assert judge(doc + "\n\n" + option.upper(), "stop", (option,), 10, 1000, 5)[0] == "quotes_option"
    assert judge(doc + "\n\nKeep the logs intact.", "stop", (option,), 10, 1000, 5)[0] is None


def test_near_duplicates_exact_and_near_found_unrelated_kept():
    dedup = NearDuplicates(threshold=0.8)
    docs = [document(i, 200) for i in range(20)]
    assert all(dedup.check(d) is None for d in docs)
    assert dedup.check(docs[4].upper()) == ("exact", 4)
    near = docs[7].split()
    near[50], near[120] = "changed", "words"
    assert dedup.check(" ".join(near)) == ("near", 7)
    assert dedup.check(document(99, 200)) is None
