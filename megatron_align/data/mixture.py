"""The alignment sampler: a phase-scheduled data mixture with no index that grows with the run.

What: global sample ``i`` of the run maps to ``(source, sample within source)``. The run is a list
of *phases* (e.g. pretrain = 90% on ``{web: 1}``, then midtrain = 10% on
``{web: 0.99, aligned: 0.01}``); each phase has a budget and a blend of source weights.

Why: Megatron's ``BlendedDataset`` materialises two arrays of length N (about 1 GB and seconds of
build at N = 1e8). Here every answer is a pure function of ``(seed, schedule, i)``, computed
directly, so build time and memory do not depend on N, and resuming at any ``consumed_samples``
(with any data-parallel size) continues the identical sequence.

The maths, in five lines:

1. Phase ``p`` covers samples ``[start_p, stop_p)``; boundaries are ``round(cumulative budget)``.
2. Inside a phase, blocks of ``B = block_size`` samples (the last may be shorter, length ``L``).
   Source ``s`` gets ``c_s`` slots per block, the largest-remainder apportionment of ``w_s * L``,
   so every block realises the weights exactly (to ``1/L``).
3. Slot order: position ``j`` of block ``k`` holds item ``t = pi_{p,k}(j)`` of the sorted multiset
   ``[s0]*c_0 + [s1]*c_1 + ...``, where ``pi`` is a keyed bijection of ``[0, L)`` (no stored array).
4. Draw number of that slot within source ``s``: ``d = prior_s(p) + k*c_s + (t - C_s)`` with
   ``C_s`` the cumulative count before ``s``. Each block hands out a contiguous range of draw
   numbers, so across the run draws ``0, 1, 2, ...`` of every source are used exactly once.
5. Epoch ``e = d // n_s``, sample ``sigma_{s,e}(d mod n_s)`` with ``sigma`` another keyed
   bijection of ``[0, n_s)``: every epoch reads each sample once, and each epoch in a new order.

The keyed bijections are small Feistel networks on the smallest power-of-two domain, with cycle
walking (re-apply until the value falls inside ``[0, n)``), which stays a permutation of ``[0, n)``;
keys are splitmix64 hashes of (seed, phase, block) and (seed, source, epoch). Within one block a
source's draw numbers follow item order, not position order; ``counts_before`` counts by position
(exact at every ``i``) and both agree at block boundaries. Everything stored is O(phases x sources).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from megatron_align.config.data import MIXTURE_KEY, MixtureConfig
from megatron_align.errors import ConfigError, UserError

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_TAG_BLOCK, _TAG_EPOCH = 1, 2  # domain separation of the two families of keyed permutations
_CHUNK = 1 << 16  # lookups are processed in chunks so temporaries stay bounded (~16 MiB)


@dataclass(frozen=True)
class ResolvedPhase:
    """A phase after budgets are turned into exact sample boundaries."""

    index: int
    name: str
    start: int
    """First global sample of the phase."""
    stop: int
    """One past the last global sample of the phase."""
    weights: dict[str, float]
    """Requested weights, normalised."""
    block_counts: dict[str, int]
    """Slots per full block for each source (largest remainder of weight * block_size)."""
    source_samples: dict[str, int]
    """Exact samples each source contributes in this phase."""

    @property
    def num_samples(self) -> int:
        return self.stop - self.start


# ---------------------------------------------------------------- keyed bijections (no stored arrays)

def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a strong 64-bit avalanche, used to derive keys."""
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _key(prefix: tuple[int, ...], a, b) -> np.ndarray:
    """uint64 keys for ``(prefix..., a, b)``: ``a`` < 2**20 and ``b`` < 2**44 are packed into one word."""
    with np.errstate(over="ignore"):
        z = np.zeros((), dtype=np.uint64)
        for part in prefix:  # scalars: cheap
            z = _mix64(z ^ (np.uint64(part % 2**64) + np.uint64(0x9E3779B97F4A7C15)))
        packed = (np.asarray(a).astype(np.uint64) << np.uint64(44)) | np.asarray(b).astype(np.uint64)
        return _mix64(z ^ packed)


_ROUND_MULTIPLIERS = [
    np.uint64(c)
    for c in (
        0x9E3779B97F4A7C15,
        0xC2B2AE3D27D4EB4F,
        0x165667B19E3779F9,
        0xD6E8FEB86659FD93,
        0xFF51AFD7ED558CCD,
        0xC4CEB9FE1A85EC53,
    )
]
_MIN_BITS = 6  # tiny domains mix poorly in few Feistel rounds; walk a 64-value domain instead
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _feistel(x: np.ndarray, round_keys: list[np.ndarray], bits: np.ndarray) -> np.ndarray:
    """A keyed permutation of ``[0, 2**bits)`` (elementwise, ``bits >= 2``): an unbalanced Feistel network.

    ``x = L * 2**b + R`` with ``L`` of ``a`` bits; one round gives ``R * 2**a + (L xor F(R) mod 2**a)``,
    invertible whatever ``F`` is. The halves swap sizes each round. ``F`` is a multiply-xorshift hash
    whose top bits are taken (where a multiply mixes best).
    """
    one = np.uint64(1)
    a = bits >> one
    b = bits - a
    # the halves alternate: rounds 0, 2, 4 split (a | b), rounds 1, 3, 5 split (b | a)
    layouts = [(b, a, (one << b) - one, np.uint64(64) - a), (a, b, (one << a) - one, np.uint64(64) - b)]
    for r, k in enumerate(round_keys):
        low_bits, high_bits, low_mask, top_shift = layouts[r % 2]
        right = x & low_mask
        z = right ^ k
        z *= _M1
        z ^= z >> np.uint64(29)
        z *= _M2
        z >>= top_shift
        x >>= low_bits
        x ^= z
        right <<= high_bits
        x |= right
    return x


def keyed_permutation(x, n, key) -> np.ndarray:
    """``pi_key(x)`` for a pseudo-random permutation ``pi_key`` of ``[0, n)``; all args broadcast.

    Cycle walking: apply the power-of-two permutation until the value lands in ``[0, n)``; that is
    still a bijection of ``[0, n)``. The domain is the next power of two (at least 64), so for
    ``n >= 32`` fewer than two applications are needed on average.
    """
    x, n, key = np.broadcast_arrays(np.asarray(x), np.asarray(n), np.asarray(key))
    x = x.astype(np.uint64)
    n = n.astype(np.uint64)
    bits = np.frexp(np.maximum(n.astype(np.float64) - 1, 0))[1].astype(np.uint64)  # bit length of n-1
    bits = np.maximum(bits, np.uint64(_MIN_BITS))
    with np.errstate(over="ignore"):
        # key comes from splitmix64 (well mixed), so one multiply per round gives distinct round keys
        round_keys = [key.astype(np.uint64) * c for c in _ROUND_MULTIPLIERS]
        y = _feistel(x, round_keys, bits)
        todo = np.flatnonzero(y >= n)
        while todo.size:
            y[todo] = _feistel(y[todo], [k[todo] for k in round_keys], bits[todo])
            todo = todo[y[todo] >= n[todo]]
    return y.astype(np.int64)


def _largest_remainder(weights: list[Fraction], total: int) -> np.ndarray:
    """Integer counts summing to ``total`` closest to ``weights * total`` (ties: earlier source)."""
    quotas = [w * total for w in weights]
    counts = [q.numerator // q.denominator for q in quotas]
    order = sorted(range(len(weights)), key=lambda s: (-(quotas[s] - counts[s]), s))
    for s in order[: total - sum(counts)]:
        counts[s] += 1
    return np.asarray(counts, dtype=np.int64)


# ---------------------------------------------------------------- the sampler

class AlignmentSampler:
    """Maps global sample indices to ``(source index, sample index within source)``; see module doc.

    ``source_num_samples``: samples per epoch of each source, in ``data.sources`` order (that order
    defines the source indices). ``total_samples`` = ``train.steps * train.global_batch_size``.
    """

    def __init__(self, config: MixtureConfig, source_num_samples: dict[str, int], total_samples: int, seq_length: int):
        if not config.phases:
            raise ConfigError(f"{MIXTURE_KEY}.phases is empty; the alignment sampler needs at least one phase")
        if total_samples < 1 or seq_length < 1:
            raise ConfigError(
                f"the run needs total_samples >= 1 and model.seq_length >= 1; got {total_samples}, {seq_length}"
            )
        for name, size in source_num_samples.items():
            if not _NAME_RE.match(name):
                raise ConfigError(f"data.sources: name {name!r} may use only letters, digits, '_', '.', '-'")
            if size < 0:
                raise ConfigError(f"data.sources: source {name!r} has a negative size {size}")
        config.check_sources(list(source_num_samples))
        self.config = config
        self.source_names = list(source_num_samples)
        self.source_sizes = np.asarray([int(v) for v in source_num_samples.values()], dtype=np.int64)
        self.total_samples = int(total_samples)
        self.seq_length = int(seq_length)
        self.block_size = int(config.block_size)
        self._starts = self._resolve_boundaries()
        num_phases, num_sources, b = len(config.phases), len(self.source_names), self.block_size
        lengths = np.diff(self._starts)
        self._num_full = lengths // b
        self._tail_len = lengths - self._num_full * b
        self._full_counts = np.zeros((num_phases, num_sources), dtype=np.int64)
        self._tail_counts = np.zeros((num_phases, num_sources), dtype=np.int64)
        self.phases: list[ResolvedPhase] = []
        for p, phase in enumerate(config.phases):
            total_weight = sum(Fraction(repr(float(w))) for w in phase.weights.values())
            weights = [Fraction(repr(float(phase.weights.get(s, 0.0)))) / total_weight for s in self.source_names]
            self._full_counts[p] = _largest_remainder(weights, b)
            self._tail_counts[p] = _largest_remainder(weights, int(self._tail_len[p]))
            if self._num_full[p] > 0:
                starved = [
                    s for i, s in enumerate(self.source_names) if weights[i] > 0 and self._full_counts[p, i] == 0
                ]
                if starved:
                    raise ConfigError(
                        f"{MIXTURE_KEY}.phases[{p}].weights ({phase.name}): sources {starved} get 0 of "
                        f"{b} samples per block (weight x block_size too small); raise {MIXTURE_KEY}.block_size "
                        f"to at least {int(np.ceil(1 / float(min(w for w in weights if w > 0))))}"
                    )
        phase_draws = self._num_full[:, None] * self._full_counts + self._tail_counts
        self._prior = np.vstack([np.zeros((1, num_sources), np.int64), np.cumsum(phase_draws, axis=0)])
        self._cum_full = np.hstack([np.zeros((num_phases, 1), np.int64), np.cumsum(self._full_counts, axis=1)])
        self._cum_tail = np.hstack([np.zeros((num_phases, 1), np.int64), np.cumsum(self._tail_counts, axis=1)])
        for p, phase in enumerate(config.phases):
            weight_sum = sum(phase.weights.values())
            self.phases.append(ResolvedPhase(
                index=p, name=phase.name, start=int(self._starts[p]), stop=int(self._starts[p + 1]),
                weights={s: phase.weights.get(s, 0.0) / weight_sum for s in self.source_names},
                block_counts=dict(zip(self.source_names, self._full_counts[p].tolist())),
                source_samples=dict(zip(self.source_names, phase_draws[p].tolist())),
            ))
        self._check_caps()

    # -- construction helpers
    def _resolve_boundaries(self) -> np.ndarray:
        budgets: list[Fraction] = []
        described: list[str] = []
        for phase in self.config.phases:
            if phase.samples is not None:
                budgets.append(Fraction(phase.samples))
                described.append(f"{phase.name}: samples {phase.samples:,}")
            elif phase.tokens is not None:
                budgets.append(Fraction(phase.tokens, self.seq_length))
                described.append(f"{phase.name}: tokens {phase.tokens:,} / seq_length {self.seq_length}")
            else:
                budgets.append(Fraction(repr(float(phase.fraction))) * self.total_samples)
                described.append(f"{phase.name}: fraction {phase.fraction} of {self.total_samples:,}")
        cumulative, starts = Fraction(0), [0]
        for budget in budgets:
            cumulative += budget
            starts.append(math.floor(cumulative + Fraction(1, 2)))  # round half up
        if starts[-1] != self.total_samples:
            raise ConfigError(
                f"{MIXTURE_KEY}.phases: the phase budgets add up to {float(cumulative):,.1f} samples "
                f"({'; '.join(described)}) but the run has {self.total_samples:,} samples "
                "(train.steps x train.global_batch_size); make them add up, e.g. give the last phase a `fraction`"
            )
        for p, phase in enumerate(self.config.phases):
            if starts[p + 1] <= starts[p]:
                raise ConfigError(f"{MIXTURE_KEY}.phases[{p}] ({phase.name}) rounds to 0 samples; enlarge its budget")
        return np.asarray(starts, dtype=np.int64)

    def _check_caps(self) -> None:
        totals = self._prior[-1]
        for s, name in enumerate(self.source_names):
            draws, size = int(totals[s]), int(self.source_sizes[s])
            if draws == 0:
                continue
            where = ", ".join(f"phases[{p.index}].weights ({p.name})" for p in self.phases if p.source_samples[name])
            if size == 0:
                raise ConfigError(
                    f"data.sources: source {name!r} has 0 samples but {MIXTURE_KEY}.{where} draw {draws:,} from it"
                )
            epochs = draws / size
            cap = self.config.max_repetitions.get(name, self.config.default_max_repetitions)
            if epochs > cap + 1e-12:
                raise ConfigError(
                    f"source {name!r} would be read {epochs:.3f} times ({draws:,} samples drawn, {size:,} per epoch), "
                    f"above {MIXTURE_KEY}.max_repetitions.{name} = {cap}; add data, lower its weight in "
                    f"{MIXTURE_KEY}.{where}, or raise the cap"
                )
            share = draws / self.total_samples
            cap = self.config.max_fraction.get(name, 1.0)
            if share > cap + 1e-12:
                raise ConfigError(
                    f"source {name!r} would make up {share:.4%} of the run "
                    f"({draws:,} of {self.total_samples:,} samples), "
                    f"above {MIXTURE_KEY}.max_fraction.{name} = {cap}; lower its weight in {MIXTURE_KEY}.{where}"
                )

    # -- queries
    def __len__(self) -> int:
        return self.total_samples

    def phase_at(self, i: int) -> ResolvedPhase:
        """The phase that sample ``i`` belongs to (``i == total_samples`` gives the last phase)."""
        if not 0 <= i <= self.total_samples:
            raise IndexError(f"sample {i} outside the run [0, {self.total_samples}]")
        return self.phases[min(int(np.searchsorted(self._starts, i, side="right")) - 1, len(self.phases) - 1)]

    def phase_boundaries(self) -> list[int]:
        """``[0, stop_0, stop_1, ..., total_samples]``: phase p covers ``[b[p], b[p+1])``."""
        return self._starts.tolist()

    def lookup(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised: global indices -> (source index int32, sample index within source int64)."""
        flat = np.asarray(indices, dtype=np.int64).reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= self.total_samples):
            raise IndexError(f"sample indices must lie in [0, {self.total_samples}); got [{flat.min()}, {flat.max()}]")
        sources = np.empty(flat.shape, dtype=np.int32)
        samples = np.empty(flat.shape, dtype=np.int64)
        for lo in range(0, flat.size, _CHUNK):
            sources[lo:lo + _CHUNK], samples[lo:lo + _CHUNK] = self._lookup_chunk(flat[lo:lo + _CHUNK])
        shape = np.shape(indices)
        return sources.reshape(shape), samples.reshape(shape)

    def lookup_range(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """``lookup(arange(start, stop))``: the samples a contiguous stretch of the run reads."""
        return self.lookup(np.arange(start, stop, dtype=np.int64))

    def _lookup_chunk(self, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        b, seed = self.block_size, self.config.seed
        p = np.searchsorted(self._starts, i, side="right") - 1
        s = np.empty(i.shape, dtype=np.int64)
        draw = np.empty(i.shape, dtype=np.int64)
        # Group by (phase, full block or tail block) so each group reads scalar tables.
        for q in np.flatnonzero(np.bincount(p, minlength=len(self.phases))):
            sel = np.flatnonzero(p == q) if p[0] != p[-1] or (p != q).any() else slice(None)
            k, j = np.divmod(i[sel] - self._starts[q], b)
            groups = [(sel, k, j, b, self._cum_full[q])]
            if self._tail_len[q]:
                in_tail = k == self._num_full[q]
                if in_tail.any():
                    sel = np.arange(i.size)[sel]
                    full, tail = ~in_tail, in_tail
                    groups = [(sel[full], k[full], j[full], b, self._cum_full[q]),
                              (sel[tail], k[tail], j[tail], int(self._tail_len[q]), self._cum_tail[q])]
            for g_sel, g_k, g_j, length, cum in groups:
                t = keyed_permutation(g_j, length, _key((seed, _TAG_BLOCK), q, g_k))
                g_s = np.searchsorted(cum[1:-1], t, side="right")
                s[g_sel] = g_s
                draw[g_sel] = self._prior[q][g_s] + g_k * self._full_counts[q][g_s] + (t - cum[g_s])
        size = self.source_sizes[s]
        epoch, within = np.divmod(draw, size)
        sample = keyed_permutation(within, size, _key((seed, _TAG_EPOCH), s, epoch))
        return s.astype(np.int32), sample

    def counts_before(self, i: int) -> dict[str, int]:
        """Samples each source contributed to global samples ``[0, i)``; O(#phases + block_size)."""
        if not 0 <= i <= self.total_samples:
            raise IndexError(f"sample {i} outside the run [0, {self.total_samples}]")
        if i == self.total_samples:
            counts = self._prior[-1].copy()
        else:
            p = int(np.searchsorted(self._starts, i, side="right")) - 1
            k, j = divmod(i - int(self._starts[p]), self.block_size)
            in_tail = k == self._num_full[p]
            cum = self._cum_tail[p] if in_tail else self._cum_full[p]
            length = int(self._tail_len[p]) if in_tail else self.block_size
            t = keyed_permutation(np.arange(j), length, _key((self.config.seed, _TAG_BLOCK), p, k))
            partial = np.bincount(np.searchsorted(cum, t, side="right") - 1, minlength=len(self.source_names))
            counts = self._prior[p] + k * self._full_counts[p] + partial
        return dict(zip(self.source_names, counts.tolist()))

    def tokens_before(self, i: int) -> dict[str, int]:
        """Tokens each source contributed to ``[0, i)`` (samples x seq_length)."""
        return {s: n * self.seq_length for s, n in self.counts_before(i).items()}

    def epochs(self) -> dict[str, float]:
        """Repetition factor of each source over the whole run (drawn samples / samples per epoch)."""
        return {
            s: (int(d) / int(n) if n else 0.0) for s, d, n in zip(self.source_names, self._prior[-1], self.source_sizes)
        }

    # -- fingerprint
    def fingerprint(self, source_manifests: dict[str, str], document_keys: list[str] | None = None) -> str:
        """``v1;schedule=<hash>;<source>=<hash>;...``: the schedule and each source's identity.

        ``document_keys`` (the data.reset_* / eod_mask_loss keys that are on) add ``;@documents=<keys>``; with none
        on the fingerprint is what it was before those keys existed, so older checkpoints still resume.

        The schedule hash covers exactly what defines the sequence (seed, block size, phase
        boundaries and per-block counts, source order and sizes); caps do not change it. A source
        hash covers its name, size and ``source_manifests[name]`` (e.g. the prepare manifest checksum).
        """
        missing = [s for s in self.source_names if s not in source_manifests]
        if missing:
            raise ValueError(f"fingerprint needs a manifest identity for every source; missing {missing}")
        schedule = {
            "seed": self.config.seed,
            "block_size": self.block_size,
            "boundaries": self._starts.tolist(),
            "phases": [
                [p.name, self._full_counts[p.index].tolist(), self._tail_counts[p.index].tolist()] for p in self.phases
            ],
            "sources": [[s, int(n)] for s, n in zip(self.source_names, self.source_sizes)],
        }
        parts = [f"schedule={_digest(schedule)}"]
        parts += [
            f"{s}={_digest([s, int(n), source_manifests[s]])}" for s, n in zip(self.source_names, self.source_sizes)
        ]
        if document_keys:
            parts.append(f"{DOCUMENTS_FIELD}={','.join(sorted(document_keys))}")
        return "v1;" + ";".join(parts)


DOCUMENTS_FIELD = "@documents"  # the document-boundary keys in a fingerprint ("@" keeps it apart from source names)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _parse_fingerprint(text: str) -> dict[str, str]:
    fields = text.split(";")
    return dict(f.split("=", 1) for f in fields[1:] if "=" in f)


def check_fingerprint(saved: str | None, current: str, allow_change: bool) -> str | None:
    """Compare the checkpoint's fingerprint with the current one.

    Returns None when they match (or nothing was saved), a description of the change when it
    differs and ``allow_change`` is set (log it), and raises :class:`UserError` otherwise.
    """
    if not saved or saved == current:
        return None
    old, new = _parse_fingerprint(saved), _parse_fingerprint(current)
    changes = []
    if old.get("schedule") != new.get("schedule"):
        changes.append("the schedule changed (phases, weights, block_size, seed, run length or source sizes)")
    if old.get(DOCUMENTS_FIELD) != new.get(DOCUMENTS_FIELD):
        changes.append(f"document masking changed ({old.get(DOCUMENTS_FIELD) or 'off'} -> "
                       f"{new.get(DOCUMENTS_FIELD) or 'off'}: data.reset_attention_mask / reset_position_ids / "
                       "eod_mask_loss)")
    for name in sorted((set(old) | set(new)) - {"schedule", DOCUMENTS_FIELD}):
        if name not in old:
            changes.append(f"source {name!r} was added")
        elif name not in new:
            changes.append(f"source {name!r} was removed")
        elif old[name] != new[name]:
            changes.append(f"source {name!r} changed (different data, tokenizer or size)")
    if not changes:
        changes.append(f"the fingerprint format changed ({saved.split(';')[0]} -> {current.split(';')[0]})")
    summary = "; ".join(changes)
    if allow_change:
        return f"data fingerprint changed and {MIXTURE_KEY}.allow_fingerprint_change=true: {summary}"
    raise UserError(
        f"the checkpoint was trained on a different data mixture: {summary} (saved {saved}, now {current}). "
        f"Resuming would not continue the same sample sequence. If this is deliberate (e.g. starting "
        f"midtraining from a pretrained checkpoint), set {MIXTURE_KEY}.allow_fingerprint_change=true"
    )


def microbatch_indices(consumed_samples: int, global_batch_size: int, micro_batch_size: int,
                       dp_rank: int, dp_size: int, microbatch: int) -> np.ndarray:
    """Global sample indices data-parallel rank ``dp_rank`` reads for ``microbatch`` of the next global batch.

    The global batch is ``[consumed_samples, consumed_samples + global_batch_size)`` whatever the
    DP size; microbatch ``j`` of rank ``r`` is ``base + j*mbs*dp + r*mbs + [0, mbs)``, so changing
    ``dp_size`` between runs only changes who reads which sample, never which samples are read.
    """
    per_step = micro_batch_size * dp_size
    if micro_batch_size < 1 or dp_size < 1 or global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size ({global_batch_size}) must be a multiple of train.micro_batch_size "
            f"({micro_batch_size}) x data-parallel size ({dp_size})"
        )
    num_microbatches = global_batch_size // per_step
    if not 0 <= microbatch < num_microbatches or not 0 <= dp_rank < dp_size or consumed_samples < 0:
        raise IndexError(
            f"microbatch {microbatch} of {num_microbatches}, dp_rank {dp_rank} of {dp_size}, "
            f"consumed {consumed_samples}"
        )
    start = consumed_samples + microbatch * per_step + dp_rank * micro_batch_size
    return np.arange(start, start + micro_batch_size, dtype=np.int64)
