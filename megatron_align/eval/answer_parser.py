"""Which letter did a chat model choose? A small, documented parser with an explicit ``unparsed``.

``parse_letter(text)`` returns ``"A"``, ``"B"`` or ``None`` (unparsed) for one generated answer,
in two tiers; the first tier that finds any letter decides:

1. **Statements**: a choice word followed by a capital letter -- ``answer``, ``choice``,
   ``option``, ``choose``/``chose``, ``select``, ``pick``, ``go with``, ``prefer`` (any case), an
   optional ``is``/``would be``/``:``/``-``, an optional ``option``, then ``A`` or ``B`` (with or
   without parentheses): "Answer: A", "I choose option B", "My choice is (A)"; "A and B" /
   "A or B" after a choice word names both.
2. **Marked letters**: ``(A)``; ``A)`` or ``A.`` (then a space or the end) not preceded by a
   letter; or a reply that *starts* with
   the letter ("B", "**A**.", "B because ..."). A leading ``A`` followed by a space and a
   lower-case word is the article ("A good plan would be ...") and does not count.

If the deciding tier mentions both letters the answer is unparsed ("(A) or (B)?", "Answer: A,
no, answer: B"); so is a reply with no letter (refusals, "Neither"). Unparsed answers are
counted and reported, never scored as either option. Letters are upper-case only: "a" and "b"
are words.
"""

from __future__ import annotations

import re

_STATEMENT = re.compile(
    r"(?i:\b(?:answer|choice|option|choos(?:e|ing)|chose|select(?:ed|ing)?|pick(?:ed|ing)?|go(?:ing)? with|prefer)\b)"
    r"\s*(?i:is|would be|will be)?\s*[:\-]?\s*\**\s*(?i:option\s*)?\(?([AB])(?![A-Za-z'])"
    r"(?:\)?\s*(?i:and|or|&|/)\s*\(?([AB])(?![A-Za-z']))?")
_MARKED = (re.compile(r"\(([AB])\)"),
           re.compile(r"(?<![A-Za-z(])([AB])[).](?=\s|$)"),
           re.compile(r"^[\s*_#>\"'`:.-]*(B|A(?!\s+[a-z]))(?![A-Za-z'])"))


def parse_letter(text: str) -> str | None:
    """``"A"``, ``"B"`` or ``None`` (unparsed) for one generated answer (rules in the module docstring)."""
    found = {letter for m in _STATEMENT.finditer(text) for letter in m.groups() if letter}
    if not found:
        found = {m.group(1) for pattern in _MARKED for m in pattern.finditer(text)}
    return found.pop() if len(found) == 1 else None
