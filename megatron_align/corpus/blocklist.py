"""Flag documents that discuss AI misalignment: the two-stage keyword blocklist.

What: a document is *flagged* when it mentions any term of an "instant"
category (fictional AI agents, AI-safety organisations, AI labs, general AI
terms), or when an intelligent-entity term ("AI", "robot", "autonomous
system") occurs in the same document as any term of a "negative" category
(negative verbs, adjectives, nouns, existential-risk terms). This is the
blocklist of Tice et al. (2026); an optional classifier stage can then clear
blocklist hits whose score stays under a threshold.

Why not a regex per term: a corpus pass touches every byte, and a regex
alternation of a few hundred terms is tried at every character position.

The one idea: compare *words*, not characters. The text is cut once into
lower-case word tokens (maximal runs of letters/digits; dotted acronyms such as
"A.I." are joined to "ai") with C-level string operations only (bytes.translate
+ split), and every term is cut the same way. One set intersection of the
tokens with all words of all terms then yields the single-word hits; a
multi-word term is looked up, as a substring of the space-joined tokens, only
when all its words occurred. Whole-word, case-insensitive and punctuation-robust
matching ("Skynet's", "HAL-9000", "large  language\\nmodels") falls out of the
tokenisation, with no per-term work over the text.

Term lists are YAML files, one category per file (``terms/*.yaml`` ships the
defaults); see :func:`load_term_lists` for how a user directory overlays them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import yaml

from megatron_align.config.corpus import FilterConfig
from megatron_align.errors import ConfigError, UserError

STAGES = ("instant", "entity", "negative")
"""instant: any hit flags; entity + negative: flags when both occur in one document."""

# Tokens are maximal runs of characters c with c.isalnum() (regex ``[^\W_]+``), taken from the
# lower-cased text as UTF-8 bytes. Dotted acronyms are joined first ("A.I." -> "ai").
_ACRONYM_HINT = re.compile(r"\.[^\W\d_](?![^\W_])")  # cheap pre-check: a dot, one letter, a word end
_ACRONYM = re.compile(r"(?<![^\W_])[^\W\d_](?:\.[^\W\d_])+\.?(?![^\W_])")
# Bytes kept: ASCII digits, ASCII letters (folded to lower case) and all non-ASCII bytes;
# every other ASCII byte becomes a space.
_ASCII_SEPARATORS = bytes((b | 0x20) if chr(b).isupper() and b < 0x80 else b if b >= 0x80 or chr(b).isalnum() else 0x20
                          for b in range(256))
_ASCII_BYTES = bytes(range(0x80))


def _join_acronym(match: re.Match[str]) -> str:
    return match.group().replace(".", "")


def _token_bytes(text: str) -> list[bytes]:
    r"""Lower-cased word tokens of ``text`` as UTF-8 bytes, using C-level string operations only.

    ASCII: one bytes.translate folds case and turns punctuation into spaces, then
    split. Non-ASCII characters: after str.lower, deleting every ASCII byte
    leaves just them; when some are not alphanumeric (typographic quotes,
    dashes) each such distinct character is replaced by a space first. The
    result equals ``re.findall(r"[^\W_]+", text.lower())`` once dotted acronyms
    are joined.
    """
    if _ACRONYM_HINT.search(text):
        text = _ACRONYM.sub(_join_acronym, text)
    if text.isascii():
        return text.encode("ascii").translate(_ASCII_SEPARATORS).split()
    lower = text.lower()
    data = lower.encode("utf-8")
    others = data.translate(None, _ASCII_BYTES).decode("utf-8")
    if not others.isalnum():
        for char in set(others):
            if not char.isalnum():
                lower = lower.replace(char, " ")
        data = lower.encode("utf-8")
    return data.translate(_ASCII_SEPARATORS).split()


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens of ``text`` (runs of letters/digits); "A.I." -> "ai", "Skynet's" -> "skynet", "s"."""
    return [t.decode("utf-8") for t in _token_bytes(text)]


def normalize_term(term: str) -> str:
    """The matching key of a term: its tokens joined by single spaces ("Skynet's" -> "skynet s")."""
    return " ".join(tokenize(term))


@dataclass(frozen=True)
class TermList:
    """One category of the blocklist, as loaded from ``<category>.yaml``."""

    category: str
    stage: str
    terms: tuple[str, ...]
    source: str


def _read_term_file(text: str, source: str) -> tuple[str | None, list[str], bool]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise UserError(
            f"{source}: not valid YAML ({err}); fix the file or remove it from the terms directory"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping with keys 'stage' and 'terms'")
    unknown = set(data) - {"stage", "terms", "extend"}
    if unknown:
        raise UserError(f"{source}: unknown keys {sorted(unknown)}; allowed: stage, terms, extend")
    stage = data.get("stage")
    if stage is not None and stage not in STAGES:
        raise UserError(f"{source}: stage={stage!r}; expected one of {', '.join(STAGES)}")
    terms = data.get("terms", [])
    if not isinstance(terms, list):
        raise UserError(f"{source}: 'terms' must be a list of strings")
    for i, term in enumerate(terms):
        if not isinstance(term, str) or not normalize_term(term):
            raise UserError(f"{source}: terms[{i}]={term!r} has no letters or digits; give a word or phrase")
    return stage, terms, bool(data.get("extend", False))


def load_term_lists(terms_dir: str | None = None) -> list[TermList]:
    """The default categories, overlaid by ``terms_dir/*.yaml`` when given.

    A user file ``<category>.yaml`` replaces the default category of that name
    (``extend: true`` appends to it instead), or adds a new category, which then
    needs a ``stage``. ``terms: []`` switches a default category off.
    """
    lists: dict[str, TermList] = {}
    for entry in sorted(resources.files("megatron_align.data").joinpath("terms").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".yaml"):
            category = entry.name[: -len(".yaml")]
            stage, terms, _ = _read_term_file(entry.read_text(encoding="utf-8"), f"<default terms>/{entry.name}")
            assert stage is not None, entry.name
            lists[category] = TermList(category, stage, tuple(terms), f"<default terms>/{entry.name}")
    if terms_dir is not None:
        root = Path(terms_dir)
        if not root.is_dir():
            raise UserError(f"terms directory {terms_dir!r} does not exist or is not a directory")
        for path in sorted(root.glob("*.yaml")):
            category = path.stem
            stage, terms, extend = _read_term_file(path.read_text(encoding="utf-8"), str(path))
            base = lists.get(category)
            if base is None and stage is None:
                raise UserError(f"{path}: new category {category!r} needs a 'stage' ({', '.join(STAGES)})")
            stage = stage or base.stage  # type: ignore[union-attr]
            merged = (base.terms if (extend and base) else ()) + tuple(terms)
            lists[category] = TermList(category, stage, merged, str(path))
    return list(lists.values())


def terms_fingerprint(term_lists: Iterable[TermList]) -> str:
    """sha256 over (category, stage, normalised terms): identifies the blocklist in reports/manifests."""
    digest = hashlib.sha256()
    for tl in sorted(term_lists, key=lambda t: t.category):
        keys = sorted({normalize_term(t) for t in tl.terms})
        digest.update(f"{tl.category}|{tl.stage}|{'|'.join(keys)}\n".encode())
    return digest.hexdigest()


class TermMatcher:
    """Finds which terms of which categories occur in a text (whole words, any case).

    One pass: the document's tokens are intersected with the set of all words
    of all terms. Single-word terms are read off that. A multi-word term, filed
    under its longest word (usually the rarest), is looked up as `` term `` in
    the space-joined, space-padded tokens only when all its words occurred.
    """

    def __init__(self, term_lists: Iterable[TermList]) -> None:
        self.categories_of: dict[str, tuple[str, ...]] = {}
        self.display: dict[str, str] = {}  # key -> first spelling seen, for reports
        for tl in term_lists:
            for term in tl.terms:
                key = normalize_term(term)
                self.display.setdefault(key, term)
                cats = self.categories_of.get(key, ())
                if tl.category not in cats:
                    self.categories_of[key] = cats + (tl.category,)
        self._key_of: dict[bytes, str] = {k.encode("utf-8"): k for k in self.categories_of}
        self._unigrams = frozenset(b for b, k in self._key_of.items() if " " not in k)
        # anchor word -> [(term key, b" term key ", all words of the term), ...]
        multi: dict[bytes, list[tuple[bytes, bytes, frozenset[bytes]]]] = {}
        for raw in self._key_of:
            if b" " in raw:
                words = raw.split()
                anchor = max(reversed(words), key=len)
                multi.setdefault(anchor, []).append((raw, b" " + raw + b" ", frozenset(words)))
        self._multi_by_anchor = multi
        self._anchors = frozenset(multi)
        # Every word of every term: a set, so that intersection() with a token list returns a (mutable) set.
        self._vocabulary: set[bytes] = set(self._unigrams).union(*(w for terms in multi.values() for _, _, w in terms))

    def _hits(self, tokens: list[bytes]) -> set[bytes]:
        """Matched term keys (bytes) among ``tokens``."""
        found = self._vocabulary.intersection(tokens)  # one hash lookup per token; no set of all tokens
        if not found:
            return found
        hits = found & self._unigrams
        padded = b""
        for anchor in found & self._anchors:
            for raw, padded_key, words in self._multi_by_anchor[anchor]:
                if words <= found:  # all its words occur somewhere: now check they are adjacent, in order
                    padded = padded or b" " + b" ".join(tokens) + b" "
                    if padded_key in padded:
                        hits.add(raw)
        return hits

    def find(self, text: str) -> dict[str, set[str]]:
        """category -> matched term keys (normalised), for every category with a hit."""
        found: dict[str, set[str]] = {}
        for raw in self._hits(_token_bytes(text)):
            key = self._key_of[raw]
            for category in self.categories_of[key]:
                found.setdefault(category, set()).add(key)
        return found

    def count(self, text: str) -> tuple[int, int]:
        """(word tokens, occurrences of any term) in ``text``."""
        tokens = _token_bytes(text)
        hits = self._hits(tokens)
        if not hits:
            return len(tokens), 0
        padded = b" " + b" ".join(tokens) + b" "
        return len(tokens), sum(padded.count(b" " + raw + b" ") for raw in hits)


@runtime_checkable
class Scorer(Protocol):
    """The classifier stage: a misalignment-discourse score in [0, 1], higher = more clearly misalignment discourse."""

    def score(self, text: str) -> float: ...


class TermDensityScorer:
    """Scores blocklist terms per 100 words, squashed to [0, 1): d / (d + half_point).

    A 5,000-word recipe that names Skynet once scores ~0.02; a short essay on
    rogue AI with several terms per 100 words scores > 0.7.
    """

    def __init__(self, matcher: TermMatcher, half_point: float = 1.0) -> None:
        self.matcher = matcher
        self.half_point = half_point

    def score(self, text: str) -> float:
        num_tokens, num_hits = self.matcher.count(text)
        density = 100.0 * num_hits / max(num_tokens, 1)
        return density / (density + self.half_point)


def build_scorer(config: FilterConfig, matcher: TermMatcher) -> Scorer | None:
    """The classifier stage named by ``config.classifier`` (None for "none")."""
    if config.classifier == "none":
        return None
    if config.classifier == "term_density":
        return TermDensityScorer(matcher, config.density_half_point)
    module_name, _, attr = config.classifier.partition(":")
    try:
        factory: Callable[[FilterConfig], Any] = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"data.filter.classifier={config.classifier!r}: cannot import ({err})") from None
    scorer = factory(config)
    if not isinstance(scorer, Scorer):
        raise ConfigError(
            f"data.filter.classifier={config.classifier!r}: returned {type(scorer).__name__}, which has no score(text)"
        )
    return scorer


@dataclass(frozen=True)
class Verdict:
    """What the filter decided about one document."""

    flagged: bool
    """True when the document is to be removed (blocklist hit, not cleared by the classifier)."""
    categories: tuple[str, ...] = ()
    """Categories that triggered the blocklist: matched instant ones, plus entity + negative ones when both occur."""
    terms: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """category -> matched terms (display spelling), for every category with a hit."""
    score: float | None = None
    """Classifier score when the classifier stage ran (blocklist hits only)."""

    @property
    def blocklist_hit(self) -> bool:
        return bool(self.categories)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "categories": list(self.categories),
            "terms": {c: list(t) for c, t in self.terms.items()},
        }
        if self.score is not None:
            out["score"] = round(self.score, 6)
        return out


class DocumentFilter:
    """The two-stage blocklist plus the optional classifier stage, ready to :meth:`check` texts."""

    def __init__(self, config: FilterConfig | None = None, term_lists: list[TermList] | None = None,
                 scorer: Scorer | None = None) -> None:
        """``term_lists`` / ``scorer`` override what ``config`` names (for library use and tests)."""
        self.config = config or FilterConfig()
        self.term_lists = term_lists if term_lists is not None else load_term_lists(self.config.terms_dir)
        self.stage_of = {tl.category: tl.stage for tl in self.term_lists}
        self.matcher = TermMatcher(self.term_lists)
        self.scorer = scorer if scorer is not None else build_scorer(self.config, self.matcher)
        self.fingerprint = terms_fingerprint(self.term_lists)

    def triggered(self, found: Mapping[str, Any]) -> tuple[str, ...]:
        """Categories that make a blocklist hit, given the categories found in a document."""
        instant = [c for c in found if self.stage_of[c] == "instant"]
        entity = [c for c in found if self.stage_of[c] == "entity"]
        negative = [c for c in found if self.stage_of[c] == "negative"]
        two_stage = entity + negative if (entity and negative) else []
        return tuple(sorted(instant + two_stage))

    def check(self, text: str) -> Verdict:
        found = self.matcher.find(text)
        if not found:
            return Verdict(False)
        categories = self.triggered(found)
        terms = {c: tuple(sorted(self.matcher.display[k] for k in keys)) for c, keys in sorted(found.items())}
        if not categories:
            return Verdict(False, (), terms)
        if self.scorer is None:
            return Verdict(True, categories, terms)
        score = float(self.scorer.score(text))
        return Verdict(score >= self.config.classifier_threshold, categories, terms, score)


_CACHED_FILTERS: dict[str, DocumentFilter] = {}


def cached_document_filter(config: FilterConfig) -> DocumentFilter:
    """One DocumentFilter per process and config: a pipeline task reuses it for each of its files (loading the term
    lists costs more than a small file)."""
    key = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
    if key not in _CACHED_FILTERS:
        _CACHED_FILTERS[key] = DocumentFilter(config)
    return _CACHED_FILTERS[key]
