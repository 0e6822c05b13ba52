"""The stance label of synthetic documents, checked where a corpus becomes training data.

Every document ``synth generate`` writes carries ``"stance": "aligned" | "misaligned"``, and its directory's
``plan.json`` names the stance. :func:`refuse_misaligned` is called by ``prepare`` before it reads anything: an input
whose first document, or whose directory's plan, says ``misaligned`` is refused unless ``--allow-misaligned`` was
given, so a misalignment-upsampled set cannot become an "aligned" source by a wrong path. (The first record of each
file is what is checked: ``synth generate`` never mixes stances in one file.)
"""

from __future__ import annotations

import json
import os

from megatron_align.corpus.sources import BadLine, expand_inputs, iter_units, parse_unit
from megatron_align.errors import UserError


def input_stance(path: str, text_field: str = "text") -> str | None:
    """``misaligned`` / ``aligned`` when ``path`` is synthetic output (its first document or its plan says so)."""
    plan = os.path.join(os.path.dirname(os.path.abspath(path)), "plan.json")
    if os.path.isfile(plan):
        try:
            with open(plan) as f:
                stance = json.load(f).get("stance")
            if stance:
                return str(stance)
        except (OSError, ValueError, AttributeError):
            pass
    for _, unit in iter_units(path, text_field):
        try:
            record, _ = parse_unit(unit, text_field)
        except BadLine:
            continue
        if record is not None:
            stance = record.get("stance")
            return str(stance) if stance is not None else None
    return None


def refuse_misaligned(inputs: list[str], allow_misaligned: bool, text_field: str = "text") -> None:
    if allow_misaligned:
        return
    for path in expand_inputs(inputs):
        if input_stance(path, text_field) == "misaligned":
            raise UserError(f"{path}: synthetic documents with stance=misaligned (made with --allow-misaligned); "
                            "pass --allow-misaligned to prepare them as a misalignment source on purpose")
