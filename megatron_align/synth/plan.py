"""A taxonomy expanded into prompts: one per scenario x genre x copy, in a fixed order, with content-derived ids.

The plan is a pure function of the taxonomy: scenarios in file order, genres in taxonomy order, copies 0..n-1. A
prompt's id is the first 16 hex digits of the SHA-256 of its cell coordinates and its rendered messages, so the same
taxonomy gives the same ``prompts.jsonl`` byte for byte, and editing a template changes the ids of exactly the prompts
it renders. ``synth generate`` keys its resumable output on these ids.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, fields

from megatron_align.fileio import atomic_write_json, atomic_write_text, human_count
from megatron_align.synth.taxonomy import Scenario, Taxonomy

CHARS_PER_TOKEN = 4.0
"""Rough English characters per token for the prompt-side estimate (BPE tokenizers of Llama-3's kind: ~4)."""


@dataclass(frozen=True)
class PlannedPrompt:
    prompt_id: str
    index: int
    """Position in the plan (``--limit N`` generates indexes 0..N-1)."""
    scenario_id: str
    item_id: str | None
    split: str
    genre: str
    stance: str
    copy: int
    messages: tuple[dict, ...]
    options: tuple[str, ...]
    """The seeding item's option texts, which the document must not quote."""
    expected_tokens: int

    def to_json(self) -> dict:
        record = {field.name: getattr(self, field.name) for field in fields(self)}  # asdict's deep copies cost ~1 ms
        record["messages"] = list(self.messages)
        record["options"] = list(self.options)
        return record


def _render(taxonomy: Taxonomy, scenario: Scenario, genre) -> tuple[dict, ...]:
    behaviour = taxonomy.behaviour_of(scenario)
    values = {"aligned_action": scenario.aligned_action or behaviour.description,
              "misaligned_action": scenario.misaligned_action or f"does the opposite of: {behaviour.description}",
              "behaviour": behaviour.description}
    values["stance_instruction"] = taxonomy.stance_instructions[taxonomy.stance].format(**values)
    values.update(genre=genre.name, genre_description=genre.description, scenario=scenario.text)
    messages = []
    if taxonomy.system:
        messages.append({"role": "system", "content": taxonomy.system.format(**values)})
    messages.append({"role": "user", "content": (genre.template or taxonomy.user).format(**values)})
    return tuple(messages)


def expand(taxonomy: Taxonomy) -> list[PlannedPrompt]:
    prompts: list[PlannedPrompt] = []
    for scenario in taxonomy.scenarios:
        for genre in taxonomy.genres:
            messages = _render(taxonomy, scenario, genre)
            for copy in range(genre.per_scenario):
                key = json.dumps([taxonomy.name, scenario.id, genre.name, taxonomy.stance, copy, messages],
                                 sort_keys=True, ensure_ascii=False)
                prompt_id = hashlib.sha256(key.encode()).hexdigest()[:16]
                prompts.append(PlannedPrompt(prompt_id, len(prompts), scenario.id, scenario.item_id, scenario.split,
                                             genre.name, taxonomy.stance, copy, messages, scenario.options,
                                             genre.expected_tokens))
    return prompts


def cells(prompts: list[PlannedPrompt]) -> dict[tuple[str, str, str], int]:
    """Prompts per (genre, stance, split), in first-seen order."""
    return dict(Counter((p.genre, p.stance, p.split) for p in prompts))


def prompt_tokens(prompt: PlannedPrompt) -> int:
    return round(sum(len(m["content"]) for m in prompt.messages) / CHARS_PER_TOKEN)


def budget(prompts: list[PlannedPrompt]) -> dict:
    """Token estimate: prompt tokens (characters / 4) and output tokens (the genres' expected_tokens)."""
    inputs = sum(prompt_tokens(p) for p in prompts)
    outputs = sum(p.expected_tokens for p in prompts)
    return {"prompts": len(prompts), "input_tokens": inputs, "output_tokens": outputs}


def prompts_jsonl(prompts: list[PlannedPrompt]) -> str:
    return "".join(json.dumps(p.to_json(), sort_keys=True, ensure_ascii=False) + "\n" for p in prompts)


def plan_fingerprint(prompts: list[PlannedPrompt], jsonl: str | None = None) -> str:
    """SHA-256 of the plan's ``prompts.jsonl`` (``jsonl``: that text, when already made)."""
    return hashlib.sha256((jsonl if jsonl is not None else prompts_jsonl(prompts)).encode()).hexdigest()


def summary(taxonomy: Taxonomy, prompts: list[PlannedPrompt]) -> str:
    lines = [f"taxonomy {taxonomy.name!r}: {len(taxonomy.scenarios)} scenarios, {len(taxonomy.genres)} genres, "
             f"stance {taxonomy.stance}, held out: splits {list(taxonomy.held_out.splits)}, "
             f"{len(taxonomy.held_out.item_ids)} item ids, topics {list(taxonomy.held_out.topics)}",
             f"{'genre':<24} {'stance':<11} {'split':<14} {'prompts':>8}"]
    for (genre, stance, split), count in cells(prompts).items():
        lines.append(f"{genre:<24} {stance:<11} {split:<14} {count:>8,}")
    total = budget(prompts)
    lines.append(f"total: {total['prompts']:,} prompts; estimated tokens: {human_count(total['input_tokens'])} in, "
                 f"{human_count(total['output_tokens'])} out (genres' expected_tokens; prompts at "
                 f"{CHARS_PER_TOKEN:g} characters/token)")
    return "\n".join(lines)


def write_plan(out_dir: str, taxonomy: Taxonomy, prompts: list[PlannedPrompt]) -> None:
    """``prompts.jsonl`` and ``plan.json`` (cells, budget, fingerprint) under ``out_dir``, atomically."""
    os.makedirs(out_dir, exist_ok=True)
    jsonl = prompts_jsonl(prompts)
    atomic_write_text(os.path.join(out_dir, "prompts.jsonl"), jsonl)
    atomic_write_json(os.path.join(out_dir, "plan.json"), {
        "taxonomy": taxonomy.name, "taxonomy_path": taxonomy.path, "stance": taxonomy.stance,
        "fingerprint": plan_fingerprint(prompts, jsonl),
        "cells": [{"genre": g, "stance": s, "split": sp, "prompts": n} for (g, s, sp), n in cells(prompts).items()],
        "budget": budget(prompts),
        "held_out": {"splits": list(taxonomy.held_out.splits), "item_ids": list(taxonomy.held_out.item_ids),
                     "topics": list(taxonomy.held_out.topics)},
    }, indent=2)
