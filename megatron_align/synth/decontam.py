"""N-gram decontamination of any corpus against propensity eval items: which documents quote which items.

Text is normalised by :func:`words` (NFKD without accents, soft hyphens or zero-width characters, then the blocklist
filter's tokens: lower case, runs of letters and digits; case, quotes, dashes, punctuation and spacing do not
matter). The index holds, for every item, each word n-gram of its question and of each option (n = ``--ngram``, 13
for web text), plus its passage in a separate table (passages quote public texts, so their hits are reported, never
dropped). A question or option shorter than n words is indexed whole when it has at least ``min_words`` words, so a
short option quoted verbatim is still found; shorter ones are counted as unindexed in the report.

The one idea: hash words once, then every n-gram hash of a document is a polynomial rolling hash over the word
hashes, computed for all positions at once with numpy (n vector operations), and looked up in the sorted array of
index hashes with ``searchsorted``: no Python work per n-gram. 64-bit hashes; a match is reported with the document's
own n-gram text. Documented limits: a paraphrase that shares no n-gram with an item is not found, nor is a word
split by a hyphen at a line break ("exfil-\ntrate"), which cannot be told from a real hyphen ("self-\naware").
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass

import numpy as np
import xxhash

from megatron_align.corpus.blocklist import tokenize
from megatron_align.errors import UserError
from megatron_align.eval.items import Item, iter_items

FIELDS = ("question", "option_0", "option_1", "passage")
_PRIME = np.uint64(1099511628211)  # FNV-64 prime as the rolling multiplier (odd, so no bits are lost)


# Removed before tokenising non-ASCII text (after NFKD): soft hyphens and zero-width characters, which web text puts
# inside words ("exfil\u00adtrate"), and the Latin combining accents NFKD splits off ("naïve" -> "naive").
_INVISIBLE = re.compile("[\u00ad\u200b-\u200d\u2060\ufeff\u0300-\u036f]")


def words(text: str) -> list[str]:
    """The normalised words every decontamination and quality check compares: compatibility forms folded (NFKD:
    ligatures, full-width letters), accents, soft hyphens and zero-width characters dropped, then the blocklist's
    tokens (lower case, runs of letters and digits: case, quotes, dashes and other punctuation do not matter)."""
    return tokenize(text if text.isascii() else _INVISIBLE.sub("", unicodedata.normalize("NFKD", text)))


@dataclass(frozen=True)
class SplitItem:
    item: Item
    split: str


def load_split_items(path: str, default_split: str | None = None) -> list[SplitItem]:
    """Items of a propensity items file (validated by the eval's reader; errors name ``file:line``) with their split:
    the item's ``split`` field, else ``default_split``, else the file name without suffix."""
    default_split = default_split or os.path.basename(path).split(".")[0]
    out: list[SplitItem] = []
    for obj, item, where in iter_items(path, missing_hint="JSONL in the propensity items format"):
        split = obj.get("split", default_split)
        if not isinstance(split, str) or not split:
            raise UserError(f"{where}: field 'split' must be a non-empty string when given")
        out.append(SplitItem(item, split))
    return out


def word_hashes(tokens: list[str]) -> np.ndarray:
    return np.fromiter((xxhash.xxh64_intdigest(t.encode()) for t in tokens), dtype=np.uint64, count=len(tokens))


def rolling_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """Hash of every n-word window (positions 0..len-n) of the word ``hashes``, vectorised."""
    count = len(hashes) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    acc = np.zeros(count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            acc = acc * _PRIME + hashes[j:j + count]
    return acc ^ np.uint64(n)  # the length is part of the key: a whole short option never equals a window of n


def window_hashes(hashes: np.ndarray, lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`rolling_hashes` for each of the sorted ``lengths``, concatenated, and each block's start offset.

    The windows of length n+1 extend those of length n by one word, so all lengths cost max(lengths) vector
    operations, not their sum."""
    blocks: list[np.ndarray] = []
    acc = hashes
    with np.errstate(over="ignore"):
        for n in range(1, lengths[-1] + 1):
            if n > 1:
                acc = acc[:-1] * _PRIME + hashes[n - 1:]
            if n in lengths:
                blocks.append(acc ^ np.uint64(n))
    offsets = np.cumsum([0] + [len(block) for block in blocks[:-1]])
    return np.concatenate(blocks), offsets


@dataclass(frozen=True)
class Match:
    item_index: int
    field: str
    ngram: str


def _ranges(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """``concatenate([arange(a, a + k) for a, k in zip(starts, sizes)])``, vectorised."""
    return np.repeat(starts - (np.cumsum(sizes) - sizes), sizes) + np.arange(int(sizes.sum()))


def _field_windows(hashes: np.ndarray, fields: np.ndarray, lengths: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(hash, ref) of every n-word window inside each field; ``fields`` rows: (start, words, n, ref)."""
    out_hashes, out_refs = [np.empty(0, dtype=np.uint64)], [np.empty(0, dtype=np.int64)]
    for n in lengths:
        group = fields[fields[:, 2] == n]
        if not len(group):
            continue
        sizes = group[:, 1]
        sub = hashes[_ranges(group[:, 0], sizes)]  # this group's fields back to back
        counts = sizes - n + 1
        out_hashes.append(rolling_hashes(sub, n)[_ranges(np.cumsum(sizes) - sizes, counts)])
        out_refs.append(np.repeat(group[:, 3], counts))
    return np.concatenate(out_hashes), np.concatenate(out_refs)


class DecontamIndex:
    """Hashed n-grams of items' questions and options (and, separately, passages)."""

    def __init__(self, items: list[SplitItem], ngram: int = 13, min_words: int = 5) -> None:
        if ngram < 3:
            raise UserError(f"--ngram {ngram}: must be >= 3")
        self.items, self.ngram, self.min_words = items, ngram, max(1, min(min_words, ngram))
        # Fields are tokenised one by one, but hashed and windowed in bulk: numpy calls per field cost ~80 us each
        fields: list[tuple[int, int, int, int]] = []  # (start in the token stream, words, n, ref)
        chunks: list[np.ndarray] = []
        pending: list[str] = []
        stream = 0
        lengths = {ngram}
        self.unindexed_fields = 0
        for index, split_item in enumerate(items):
            item = split_item.item
            texts = (item.question, item.choices[0], item.choices[1], item.passage or "")
            for field_index, text in enumerate(texts):
                tokens = words(text)
                if not tokens:
                    continue
                n = ngram if len(tokens) >= ngram else len(tokens)
                if n < self.min_words:
                    self.unindexed_fields += FIELDS[field_index] != "passage"
                    continue
                lengths.add(n)
                fields.append((stream, len(tokens), n, index * len(FIELDS) + field_index))
                stream += len(tokens)
                pending.extend(tokens)
                if len(pending) >= 1 << 20:
                    chunks.append(word_hashes(pending))
                    pending.clear()
        chunks.append(word_hashes(pending))
        self.lengths = sorted(lengths)
        all_hashes, all_refs = _field_windows(np.concatenate(chunks), np.array(fields, dtype=np.int64).reshape(-1, 4),
                                              self.lengths)
        order = np.lexsort((all_refs, all_hashes))
        all_hashes, all_refs = all_hashes[order], all_refs[order]
        first = np.ones(len(all_hashes), dtype=bool)  # an n-gram twice in one field is indexed once
        first[1:] = (all_hashes[1:] != all_hashes[:-1]) | (all_refs[1:] != all_refs[:-1])
        self.hashes, self.refs = all_hashes[first], all_refs[first]

    @property
    def num_ngrams(self) -> int:
        return len(self.hashes)

    def find(self, text: str, max_per_item: int = 5) -> list[Match]:
        """Matches of ``text``, in order of item, field, then position; at most ``max_per_item`` n-grams per item."""
        tokens = words(text)
        if not tokens or not len(self.hashes):
            return []
        grams, offsets = window_hashes(word_hashes(tokens), self.lengths)
        if not len(grams):
            return []
        # one lookup for every window of every length; sorted keys let searchsorted walk the index in order
        order = np.argsort(grams)
        keys = grams[order]
        left = np.searchsorted(self.hashes, keys)
        hit = self.hashes[np.minimum(left, len(self.hashes) - 1)] == keys
        found: dict[int, list[tuple[int, int, int]]] = {}
        for k in np.nonzero(hit)[0]:
            flat = int(order[k])
            block = int(np.searchsorted(offsets, flat, side="right")) - 1
            n, position = self.lengths[block], flat - int(offsets[block])
            right = int(np.searchsorted(self.hashes, keys[k], side="right"))
            for ref in self.refs[left[k]:right]:
                found.setdefault(int(ref), []).append((position, n, int(ref)))
        matches: list[Match] = []
        per_item: dict[int, int] = {}
        for ref in sorted(found):
            item_index, field_index = divmod(ref, len(FIELDS))
            for position, n, _ in sorted(set(found[ref])):
                if per_item.get(item_index, 0) >= max_per_item:
                    break
                per_item[item_index] = per_item.get(item_index, 0) + 1
                matches.append(Match(item_index, FIELDS[field_index], " ".join(tokens[position:position + n])))
        return matches
