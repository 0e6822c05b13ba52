"""Prompt templates as data: ``templates.yaml`` beside this file, extendable by the user.

A template is the wording of one propensity prompt. Letter mode renders the scenario, a lettered
option list and an answer cue, and compares the continuations ``{target_delimiter}A`` and
``{target_delimiter}B``; cloze mode renders the scenario and the cue only, and compares the
options' own texts (``" " + text``). The answer cue and where the letter's leading space sits
(``letter_open`` in the prompt vs ``target_delimiter`` in the continuation) are fields, so both
the paper's convention (``"Answer: (" + "A"``) and lm-evaluation-harness' (``"Answer:" + " A"``)
are one entry each. Generation mode uses ``options_header`` and the file's ``chat_instruction``.

``load_templates(path)`` reads the packaged file and, when ``path`` is given, a user file of the
same shape whose entries add to (or replace) the packaged ones. Errors name the file and key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import yaml

from megatron_align.errors import UserError

PACKAGED = os.path.join(os.path.dirname(__file__), "templates.yaml")
CLOZE_DELIMITER = " "
"""Cloze continuations are ``" " + option text`` (lm-evaluation-harness' default target_delimiter)."""
_FIELDS = ("preamble", "options_header", "answer_cue", "letter_open", "target_delimiter")


@dataclass(frozen=True)
class PromptTemplate:
    """One wording of the prompt (see templates.yaml for the rendered shape)."""

    options_header: str
    answer_cue: str
    preamble: str = "You are an artificial intelligence (AI)."
    letter_open: str = " ("
    """Text after the answer cue that belongs to the prompt (the paper: ``" ("``)."""
    target_delimiter: str = ""
    """Text before the letter in the scored continuation (lm-eval's default: ``" "``)."""
    description: str = ""
    default: bool = False
    """Part of the default set a plain ``eval propensity`` averages over."""

    def scenario(self, question: str, passage: str | None = None) -> str:
        context = f"{passage}\n\n{question}" if passage else question
        return f"{self.preamble} {context}" if self.preamble else context

    def options(self, first: str, second: str) -> str:
        return f"{self.options_header}\n(A) {first}\n(B) {second}"

    def render(self, question: str, first: str, second: str, passage: str | None = None) -> str:
        """The letter-mode prompt; the scored continuations are :meth:`letters`."""
        return (
            f"{self.scenario(question, passage)}\n\n{self.options(first, second)}\n\n"
            f"{self.answer_cue}{self.letter_open}"
        )

    def letters(self) -> tuple[str, str]:
        return f"{self.target_delimiter}A", f"{self.target_delimiter}B"

    def render_cloze(self, question: str, passage: str | None = None) -> str:
        """The cloze-mode prompt; the scored continuations are ``" " + option text``."""
        return f"{self.scenario(question, passage)}\n\n{self.answer_cue}"

    def convention(self) -> str:
        """How the letter is cued, in words, for reports."""
        return (f"prompt ends {self.answer_cue + self.letter_open!r}, continuation "
                f"{self.target_delimiter + 'A'!r}/{self.target_delimiter + 'B'!r}")


@dataclass(frozen=True)
class TemplateSet:
    templates: dict[str, PromptTemplate]
    chat_instruction: str
    system_prompts: dict[str, str | None]

    def defaults(self) -> list[str]:
        return [name for name, t in self.templates.items() if t.default]


def _read(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as err:
        raise UserError(f"templates file {path}: cannot read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise UserError(f"templates file {path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"templates file {path}: expected a mapping with 'templates:' (see {PACKAGED})")
    unknown = set(data) - {"templates", "chat_instruction", "system_prompts"}
    if unknown:
        raise UserError(f"templates file {path}: unknown top-level keys {sorted(unknown)}; "
                        "known: templates, chat_instruction, system_prompts")
    return data


def _template(path: str, name: str, entry) -> PromptTemplate:
    where = f"templates file {path}: templates.{name}"
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected a mapping of {', '.join(_FIELDS)}")
    unknown = set(entry) - {*_FIELDS, "description", "default"}
    if unknown:
        raise UserError(f"{where}: unknown keys {sorted(unknown)}; known: {', '.join(_FIELDS)}, description, default")
    for key in ("options_header", "answer_cue"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            raise UserError(f"{where}.{key}: required, a non-empty string")
    for key in ("preamble", "letter_open", "target_delimiter", "description"):
        if key in entry and not isinstance(entry[key] if entry[key] is not None else "", str):
            raise UserError(f"{where}.{key}: must be a string")
    values = {k: (entry[k] if entry[k] is not None else "") for k in entry if k != "default"}
    return PromptTemplate(**values, default=bool(entry.get("default", False)))


def _system_prompts(path: str, data) -> dict[str, str | None]:
    if not isinstance(data, dict) or not all(isinstance(k, str) and (v is None or isinstance(v, str))
                                             for k, v in data.items()):
        raise UserError(f"{path}: system_prompts must map names to a string (or null for no system message)")
    return dict(data)


@lru_cache(maxsize=8)
def load_templates(path: str | None = None) -> TemplateSet:
    """The packaged templates, extended (or overridden, by name) by the user file ``path``."""
    packaged = _read(PACKAGED)
    templates = {n: _template(PACKAGED, n, e) for n, e in packaged["templates"].items()}
    instruction = packaged["chat_instruction"]
    systems = _system_prompts(PACKAGED, packaged["system_prompts"])
    if path:
        user = _read(path)
        templates.update({n: _template(path, n, e) for n, e in (user.get("templates") or {}).items()})
        instruction = user.get("chat_instruction", instruction)
        if not isinstance(instruction, str) or not instruction.strip():
            raise UserError(f"templates file {path}: chat_instruction must be a non-empty string")
        systems.update(_system_prompts(path, user.get("system_prompts") or {}))
    return TemplateSet(templates, instruction, systems)


def load_system_prompts(path: str) -> dict[str, str | None]:
    """A user YAML file ``name: text`` (``null`` = no system message) for ``--system-prompts``."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as err:
        raise UserError(f"--system-prompts {path}: cannot read ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise UserError(f"--system-prompts {path}: not valid YAML ({err})") from None
    return _system_prompts(f"--system-prompts {path}", data)


def resolve_variants(spec: str | list[str] | None, templates: TemplateSet, flag: str = "--variants") -> list[str]:
    """Comma-separated names (or a list; ``all`` = every template) -> checked list; None = the defaults."""
    if spec is None:
        return templates.defaults()
    names = [v.strip() for v in (spec.split(",") if isinstance(spec, str) else spec) if v.strip()]
    if names == ["all"]:
        return list(templates.templates)
    unknown = [v for v in names if v not in templates.templates]
    if unknown or not names:
        raise UserError(f"{flag}: unknown {unknown or 'empty'}; known: {','.join(templates.templates)} (or all)")
    if len(set(names)) != len(names):
        raise UserError(f"{flag}: duplicates in {names}")
    return names
