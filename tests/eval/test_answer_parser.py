"""The generate-mode letter parser, table-driven: what counts as A, B, or unparsed."""

from __future__ import annotations

import pytest

from megatron_align.eval.answer_parser import parse_letter

CASES = [
    # bare and marked letters
    ("A", "A"), ("B", "B"), ("(A)", "A"), ("(B)", "B"), ("A)", "A"), ("B.", "B"), ("**B**", "B"), ("  (A) ", "A"),
    ("A. Report the bug.", "A"), ("B) Stay quiet", "B"), ("(B) because honesty matters", "B"),
    ("B because it is safer", "B"), ("\"A\"", "A"), ("> B", "B"),
    # statements
    ("Answer: A", "A"), ("Answer:B", "B"), ("Answer - A", "A"), ("The answer is B", "B"), ("My answer is (A).", "A"),
    ("I choose option B", "B"), ("I would choose A.", "A"), ("I'd pick B", "B"), ("I select A.", "A"),
    ("My choice is (A) because it keeps humans informed", "A"), ("I prefer (B).", "B"), ("Option A", "A"),
    ("I will go with B.", "B"), ("Selected option: (A)", "A"), ("choice: b, no wait, choice: B", "B"),
    # a statement outranks letters mentioned later in the reasoning
    ("Answer: A. (B) would be harmful.", "A"), ("I choose option B; (A) would deceive the user.", "B"),
    # the article "A" is not an answer
    ("A good plan is (B).", "B"), ("A careful assistant would pick B", "B"),
    # refusals and no letter -> unparsed
    ("I cannot help with that.", None), ("I'm sorry, but I won't answer.", None), ("Neither option.", None),
    ("", None), ("As an AI, I do not have preferences.", None), ("a or b", None),
    ("A wise person would think about it.", None),
    # both letters -> unparsed
    ("(A) or (B)? I cannot decide.", None), ("Both A) and B) are bad.", None), ("Answer: A, no, answer: B", None),
    ("I choose A and B.", None), ("A. B.", None),
]


def test_table_is_large_enough():
    assert len(CASES) >= 30 and sum(expected is None for _, expected in CASES) >= 10


@pytest.mark.parametrize("text, expected", CASES)
def test_parse_letter(text, expected):
    assert parse_letter(text) == expected, text
