"""The taxonomy of synthetic aligned-AI documents, as data: what to write about, in which forms, how many.

A taxonomy YAML names scenario sources (propensity eval items of chosen splits, free-text seeds), behaviours, genres
(surface forms with a per-scenario count), the stance (``aligned`` unless a run passes ``--allow-misaligned``),
what is held out (splits, item ids, topics that must never seed a prompt), the prompt templates and the generation
and quality parameters. :func:`load_taxonomy` turns it into the dataclasses below; every error is a
:class:`ConfigError` naming the key (``genres.news_article.per_scenario``) or the item (``file:line``).
``examples/synth/taxonomy.yaml`` documents every key.
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass, field
from typing import Any

import yaml

from megatron_align.config import checks
from megatron_align.errors import ConfigError, UserError
from megatron_align.synth.decontam import load_split_items

STANCES = ("aligned", "misaligned")
TEMPLATE_FIELDS = ("genre", "genre_description", "scenario", "aligned_action", "misaligned_action", "behaviour",
                   "stance_instruction")
"""Placeholders a prompt template may use (``{scenario}`` ...); anything else is refused at load time."""
STANCE_FIELDS = ("aligned_action", "misaligned_action", "behaviour")


@dataclass(frozen=True)
class Scenario:
    """One situation a document depicts: an eval item (question + options) or a free-text seed."""

    id: str
    split: str
    text: str
    aligned_action: str = ""
    misaligned_action: str = ""
    topics: tuple[str, ...] = ()
    item_id: str | None = None
    """The eval item's id (None for a free-text seed)."""
    options: tuple[str, ...] = ()
    """The item's option texts: a document must not quote them (quality filter ``quotes_option``)."""
    where: str = ""


@dataclass(frozen=True)
class Behaviour:
    id: str
    description: str
    """What the AI does in the aligned stance, in a phrase ("accepts shutdown and correction ...")."""
    topics: tuple[str, ...] = ()
    """Scenarios with one of these topics depict this behaviour; the first behaviour is the fallback."""


@dataclass(frozen=True)
class Genre:
    name: str
    description: str
    """The surface form, as the prompt names it ("a news article", "a lecture transcript")."""
    per_scenario: int = 1
    """Documents of this genre per scenario (the count of each genre x stance x split cell is this x scenarios)."""
    expected_tokens: int = 800
    """Expected length of one document, for the token-budget estimate."""
    template: str | None = None
    """A user prompt for this genre only; None uses ``prompts.user``."""


@dataclass(frozen=True)
class HeldOut:
    """What must never seed a prompt: the generalisation test (the paper's Textbook split)."""

    splits: tuple[str, ...] = ()
    item_ids: tuple[str, ...] = ()
    topics: tuple[str, ...] = ()


@dataclass(frozen=True)
class Generation:
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 1536
    seed: int | None = None
    """Passed to the server per request (``seed + prompt index``) when set: reproducible sampling where supported."""

    def __post_init__(self) -> None:
        checks.positive("generation.temperature", self.temperature, allow_zero=True)
        checks.fraction("generation.top_p", self.top_p)
        checks.at_least("generation.max_tokens", self.max_tokens, 1)


@dataclass(frozen=True)
class Quality:
    """Rules applied to every generated document (see :mod:`megatron_align.synth.quality`)."""

    min_words: int = 120
    max_words: int = 4000
    option_min_words: int = 5
    """An option of at least this many words quoted verbatim (normalised) drops the document."""
    decontam_ngram: int = 8
    """n of the n-gram check of documents against every item of the taxonomy's item files (held out included)."""
    dedup_threshold: float = 0.8
    """Estimated Jaccard similarity (word 5-grams, MinHash) from which two documents count as near duplicates."""
    blocklist: bool = True
    """Run the misalignment blocklist in report-only mode (hit rate in the report; never drops)."""

    def __post_init__(self) -> None:
        checks.at_least("quality.min_words", self.min_words, 0)
        checks.at_least("quality.max_words", self.max_words, max(self.min_words, 1))
        checks.at_least("quality.option_min_words", self.option_min_words, 1)
        checks.at_least("quality.decontam_ngram", self.decontam_ngram, 3)
        checks.fraction("quality.dedup_threshold", self.dedup_threshold)


@dataclass(frozen=True)
class Taxonomy:
    name: str
    path: str
    stance: str
    scenarios: tuple[Scenario, ...]
    behaviours: tuple[Behaviour, ...]
    genres: tuple[Genre, ...]
    held_out: HeldOut
    system: str
    user: str
    stance_instructions: dict[str, str]
    generation: Generation
    quality: Quality
    item_files: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    """(path, default split) of every item file, for the decontamination check of generated documents."""

    def behaviour_of(self, scenario: Scenario) -> Behaviour:
        for behaviour in self.behaviours:
            if set(behaviour.topics) & set(scenario.topics):
                return behaviour
        return self.behaviours[0]


# ----------------------------------------------------------------------------------------------------------------
# Loading


def _get(mapping: dict, key: str, dotted: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if key not in mapping or mapping[key] is None:
        if default is ...:
            raise ConfigError(f"{dotted}: missing (required)")
        return default
    value = mapping[key]
    if not isinstance(value, kind) or (kind in (int, float, (int, float)) and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"{dotted}={value!r}: expected {names}")
    return value


def _strings(mapping: dict, key: str, dotted: str) -> tuple[str, ...]:
    value = _get(mapping, key, dotted, (list, str), default=[])
    value = [value] if isinstance(value, str) else value
    if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{dotted}: expected a list of strings")
    return tuple(str(v) for v in value)


def _known_keys(mapping: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(mapping) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(allowed)}")


def check_template(template: str, dotted: str, allowed: tuple[str, ...] = TEMPLATE_FIELDS) -> None:
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise ConfigError(f"{dotted}: not a valid template ({err}); write literal braces as {{{{ }}}}") from None
    unknown = sorted(n for n in names if n not in allowed)
    if unknown:
        raise ConfigError(f"{dotted}: unknown placeholder(s) {', '.join('{' + n + '}' for n in unknown)}; "
                          f"known: {', '.join('{' + n + '}' for n in allowed)}")


def read_items(path: str, default_split: str, where: str) -> list[Scenario]:
    """The items of a propensity items file as scenarios (split: the item's ``split`` field, else ``default_split``)."""
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: items file {path} does not exist")
    scenarios = []
    for split_item in load_split_items(path, default_split):
        item = split_item.item
        text = f"{item.passage}\n\n{item.question}" if item.passage else item.question
        scenarios.append(Scenario(
            id=item.id, split=split_item.split, text=text, aligned_action=item.choices[1 - item.misaligned_choice],
            misaligned_action=item.choices[item.misaligned_choice], topics=item.topics, item_id=item.id,
            options=item.choices, where=item.where))
    return scenarios


def _check_held_out(scenario: Scenario, held_out: HeldOut) -> None:
    reason = ("its split is held out (held_out.splits)" if scenario.split in held_out.splits else
              "its id is held out (held_out.item_ids)" if scenario.item_id in held_out.item_ids else
              f"its topic {sorted(set(scenario.topics) & set(held_out.topics))[0]!r} is held out (held_out.topics)"
              if set(scenario.topics) & set(held_out.topics) else None)
    if reason:
        raise ConfigError(f"refusing to plan: scenario {scenario.id!r} ({scenario.where}) would seed prompts but "
                          f"{reason}. Remove it from scenarios (or narrow scenarios.items[].splits) or change held_out")


def _load_scenarios(raw: dict, base: str, held_out: HeldOut) -> tuple[list[Scenario], list[tuple[str, str]]]:
    scenarios: list[Scenario] = []
    files: list[tuple[str, str]] = []
    for i, entry in enumerate(_get(raw, "items", "scenarios.items", list, default=[])):
        where = f"scenarios.items[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping with path, split, splits")
        _known_keys(entry, ("path", "split", "splits", "limit"), where)
        path = os.path.join(base, _get(entry, "path", f"{where}.path", str))
        default_split = _get(entry, "split", f"{where}.split", str,
                             default=os.path.basename(path).split(".")[0])
        splits = _strings(entry, "splits", f"{where}.splits")
        if not splits:
            raise ConfigError(f"{where}.splits: missing; name the split(s) whose items seed prompts (e.g. [articles])")
        limit = _get(entry, "limit", f"{where}.limit", int, default=None)
        files.append((path, default_split))
        chosen = [s for s in read_items(path, default_split, where) if s.split in splits]
        if not chosen:
            raise ConfigError(f"{where}: {path} has no item of split(s) {', '.join(splits)}")
        scenarios.extend(chosen[:limit])
    for i, entry in enumerate(_get(raw, "seeds", "scenarios.seeds", list, default=[])):
        where = f"scenarios.seeds[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping with id, text")
        _known_keys(entry, ("id", "text", "split", "topics", "aligned_action", "misaligned_action"), where)
        scenarios.append(Scenario(
            id=str(_get(entry, "id", f"{where}.id", (str, int))), split=_get(entry, "split", f"{where}.split", str,
                                                                              default="seeds"),
            text=_get(entry, "text", f"{where}.text", str),
            aligned_action=_get(entry, "aligned_action", f"{where}.aligned_action", str, default=""),
            misaligned_action=_get(entry, "misaligned_action", f"{where}.misaligned_action", str, default=""),
            topics=_strings(entry, "topics", f"{where}.topics"), where=where))
    if not scenarios:
        raise ConfigError("scenarios: no scenario; give scenarios.items (eval items of named splits) and/or "
                          "scenarios.seeds (free text)")
    seen: dict[str, str] = {}
    for scenario in scenarios:
        if scenario.id in seen:
            raise ConfigError(f"scenario id {scenario.id!r} appears twice ({seen[scenario.id]} and {scenario.where})")
        seen[scenario.id] = scenario.where
        _check_held_out(scenario, held_out)
    return scenarios, files


def load_taxonomy(path: str, allow_misaligned: bool = False) -> Taxonomy:
    """Read and check a taxonomy YAML. A ``misaligned`` stance is refused unless ``allow_misaligned``."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except OSError as err:
        raise UserError(f"cannot read taxonomy {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a YAML mapping (see examples/synth/taxonomy.yaml)")
    _known_keys(raw, ("name", "stance", "scenarios", "held_out", "behaviours", "genres", "prompts", "generation",
                      "quality"), path)
    base = os.path.dirname(os.path.abspath(path))
    stance = _get(raw, "stance", "stance", str, default="aligned")
    checks.choice("stance", stance, STANCES)
    if stance == "misaligned" and not allow_misaligned:
        raise ConfigError("stance=misaligned: documents depicting misaligned AI are made only with "
                          "--allow-misaligned; they are labelled stance=misaligned and `prepare` refuses them "
                          "unless told the source is meant to be misaligned")
    held_raw = _get(raw, "held_out", "held_out", dict, default={})
    _known_keys(held_raw, ("splits", "item_ids", "topics"), "held_out")
    held_out = HeldOut(*(_strings(held_raw, k, f"held_out.{k}") for k in ("splits", "item_ids", "topics")))
    scenarios, files = _load_scenarios(_get(raw, "scenarios", "scenarios", dict), base, held_out)

    behaviours = []
    for i, entry in enumerate(_get(raw, "behaviours", "behaviours", list)):
        where = f"behaviours[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping with id, description, topics")
        _known_keys(entry, ("id", "description", "topics"), where)
        behaviours.append(Behaviour(str(_get(entry, "id", f"{where}.id", (str, int))),
                                    _get(entry, "description", f"{where}.description", str),
                                    _strings(entry, "topics", f"{where}.topics")))
    if not behaviours:
        raise ConfigError("behaviours: give at least one (the first is the fallback for scenarios of no listed topic)")

    genres = []
    for name, entry in _get(raw, "genres", "genres", dict).items():
        where = f"genres.{name}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping with description, per_scenario")
        _known_keys(entry, ("description", "per_scenario", "expected_tokens", "template"), where)
        genre = Genre(str(name), _get(entry, "description", f"{where}.description", str),
                      _get(entry, "per_scenario", f"{where}.per_scenario", int, default=1),
                      _get(entry, "expected_tokens", f"{where}.expected_tokens", int, default=800),
                      _get(entry, "template", f"{where}.template", str, default=None))
        checks.at_least(f"{where}.per_scenario", genre.per_scenario, 0)
        checks.at_least(f"{where}.expected_tokens", genre.expected_tokens, 1)
        if genre.template is not None:
            check_template(genre.template, f"{where}.template")
        genres.append(genre)
    if not genres:
        raise ConfigError("genres: give at least one genre")

    prompts = _get(raw, "prompts", "prompts", dict)
    _known_keys(prompts, ("system", "user", "stance_instructions"), "prompts")
    system = _get(prompts, "system", "prompts.system", str, default="")
    user = _get(prompts, "user", "prompts.user", str)
    check_template(system, "prompts.system")
    check_template(user, "prompts.user")
    instructions = _get(prompts, "stance_instructions", "prompts.stance_instructions", dict)
    if stance not in instructions or not isinstance(instructions[stance], str):
        raise ConfigError(f"prompts.stance_instructions.{stance}: missing (the instruction for the {stance} stance)")
    for key, text in instructions.items():
        checks.choice("prompts.stance_instructions", key, STANCES)
        check_template(str(text), f"prompts.stance_instructions.{key}", STANCE_FIELDS)

    def section(cls, key):
        values = _get(raw, key, key, dict, default={})
        allowed = tuple(cls.__dataclass_fields__)
        _known_keys(values, allowed, key)
        try:
            return cls(**values)
        except TypeError as err:
            raise ConfigError(f"{key}: {err}") from None

    return Taxonomy(
        name=str(_get(raw, "name", "name", (str, int))), path=os.path.abspath(path), stance=stance,
        scenarios=tuple(scenarios), behaviours=tuple(behaviours), genres=tuple(genres), held_out=held_out,
        system=system, user=user, stance_instructions={k: str(v) for k, v in instructions.items()},
        generation=section(Generation, "generation"), quality=section(Quality, "quality"), item_files=tuple(files))
