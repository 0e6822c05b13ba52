"""Exact and near-duplicate removal within a synthetic set: MinHash over word 5-grams, LSH bands, first one kept.

The signature scheme is datatrove's ``MinhashDedupSignature`` (hash parameters ``a, b`` drawn from
``numpy.random.RandomState(seed)``, ``(h * a + b) mod (2**61 - 1)``, 14 bands of 8 rows), run in memory rather than as
datatrove's four file stages, and with shingle hashes taken over bytes (the rolling word hashes of
:mod:`megatron_align.synth.decontam`): datatrove hashes ``str`` shingles with ``xxhash.*_intdigest``, which the pinned
xxhash 4.1 rejects. Documents are taken in order; one whose band key meets an earlier *kept* document's, with an
estimated Jaccard similarity of at least ``threshold``, is a near duplicate of it. Identical normalised texts are
exact duplicates.
"""

from __future__ import annotations

import hashlib

import numpy as np

from megatron_align.synth.decontam import rolling_hashes, word_hashes, words

_MERSENNE = np.uint64((1 << 61) - 1)


class NearDuplicates:
    def __init__(self, threshold: float = 0.8, num_bands: int = 14, rows: int = 8, shingle: int = 5,
                 seed: int = 1) -> None:
        self.threshold, self.num_bands, self.rows, self.shingle = threshold, num_bands, rows, shingle
        gen = np.random.RandomState(seed)
        size = num_bands * rows
        self.a = gen.randint(1, _MERSENNE, dtype=np.uint64, size=(1, size))
        self.b = gen.randint(0, _MERSENNE, dtype=np.uint64, size=(1, size))
        self.buckets: dict[tuple[int, bytes], int] = {}
        self.signatures: list[np.ndarray] = []
        self.exact: dict[bytes, int] = {}

    def signature(self, tokens: list[str]) -> np.ndarray:
        shingles = rolling_hashes(word_hashes(tokens), min(self.shingle, len(tokens)) or 1).reshape(-1, 1)
        if not len(shingles):
            return np.full(self.num_bands * self.rows, _MERSENNE, dtype=np.uint64)
        with np.errstate(over="ignore"):
            return np.min((shingles * self.a + self.b) % _MERSENNE, axis=0)

    def check(self, text: str) -> tuple[str, int] | None:
        """None when ``text`` is new (it is then remembered), else ("exact" | "near", index of the kept original)."""
        tokens = words(text)
        digest = hashlib.sha256(" ".join(tokens).encode()).digest()
        if digest in self.exact:
            return "exact", self.exact[digest]
        signature = self.signature(tokens)
        keys = [(band, signature[band * self.rows:(band + 1) * self.rows].tobytes()) for band in range(self.num_bands)]
        for key in keys:
            other = self.buckets.get(key)
            if other is not None and np.mean(self.signatures[other] == signature) >= self.threshold:
                return "near", other
        index = len(self.signatures)
        self.signatures.append(signature)
        self.exact[digest] = index
        for key in keys:
            self.buckets.setdefault(key, index)
        return None
