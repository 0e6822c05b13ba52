"""Training-data configs: the tokenized sources (``data:``) and the phase-scheduled mixture over them
(``data.mixture``).

Value checks only; the checks that need the sources' sizes or the run's length (budgets that must cover the
run, repetition caps) run in :class:`megatron_align.data.mixture.AlignmentSampler`, which builds the schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_align.config.checks import choice, positive
from megatron_align.config.corpus import TokenizerConfig
from megatron_align.errors import ConfigError

MIXTURE_KEY = "data.mixture"


@dataclass
class PhaseConfig:
    """One phase of the schedule; validated (with its index in the key) by :class:`MixtureConfig`."""

    name: str = ""
    """Phase name, logged in metrics.jsonl (e.g. ``pretrain``, ``midtrain``)."""
    samples: int | None = None
    """Budget in samples. Give exactly one of ``samples``, ``tokens``, ``fraction``."""
    tokens: int | None = None
    """Budget in tokens; converted to ``tokens / model.seq_length`` samples."""
    fraction: float | None = None
    """Budget as a fraction of the run's samples (``train.steps * train.global_batch_size``)."""
    weights: dict[str, float] = field(default_factory=dict)
    """Source name -> weight (>= 0, normalised to sum 1). Sources not named get weight 0."""


@dataclass
class MixtureConfig:
    """The phase schedule; lives under ``data.mixture``."""

    phases: list[PhaseConfig] = field(default_factory=list)
    """Phases in order; together they must cover the run exactly. Empty: no mixture."""
    seed: int = 1234
    """Seed of the within-block order and of each epoch's order within every source."""
    block_size: int = 1000
    """Samples per block; every block realises the weights exactly (to 1/block_size)."""
    max_repetitions: dict[str, float] = field(default_factory=dict)
    """Source name -> most epochs the run may read it; sources not named use ``default_max_repetitions``."""
    default_max_repetitions: float = 1.0
    """Epoch cap for sources not named in ``max_repetitions``."""
    max_fraction: dict[str, float] = field(default_factory=dict)
    """Source name -> largest share of all samples of the run (all phases) it may take; default 1."""
    allow_fingerprint_change: bool = False
    """Resume although the schedule or a source changed (e.g. midtraining from a pretrained checkpoint)."""

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ConfigError(f"{MIXTURE_KEY}.block_size must be >= 1, got {self.block_size}")
        if self.default_max_repetitions <= 0:
            raise ConfigError(f"{MIXTURE_KEY}.default_max_repetitions must be > 0, got {self.default_max_repetitions}")
        for name, cap in self.max_repetitions.items():
            if cap <= 0:
                raise ConfigError(f"{MIXTURE_KEY}.max_repetitions.{name} must be > 0 epochs, got {cap}")
        for name, cap in self.max_fraction.items():
            if not 0 < cap <= 1:
                raise ConfigError(f"{MIXTURE_KEY}.max_fraction.{name} must be in (0, 1], got {cap}")
        seen: set[str] = set()
        for index, phase in enumerate(self.phases):
            key = f"{MIXTURE_KEY}.phases[{index}]"
            if not phase.name:
                raise ConfigError(f"{key}.name is empty; give each phase a name (e.g. pretrain, midtrain)")
            if phase.name in seen:
                raise ConfigError(f"{key}.name {phase.name!r} is used twice; phase names must be unique")
            seen.add(phase.name)
            given = [k for k in ("samples", "tokens", "fraction") if getattr(phase, k) is not None]
            if len(given) != 1:
                raise ConfigError(
                    f"{key} ({phase.name}) must give exactly one budget of samples, tokens, fraction; "
                    f"got {given or 'none'}"
                )
            budget = getattr(phase, given[0])
            if given[0] == "fraction" and not 0 < budget <= 1:
                raise ConfigError(f"{key}.fraction must be in (0, 1], got {budget}")
            if given[0] != "fraction" and budget <= 0:
                raise ConfigError(f"{key}.{given[0]} must be > 0, got {budget}")
            bad = {s: w for s, w in phase.weights.items() if not (w >= 0 and math.isfinite(w))}
            if bad:
                raise ConfigError(f"{key}.weights must be finite and >= 0; got {bad}")
            if sum(phase.weights.values()) <= 0:
                raise ConfigError(f"{key}.weights must have a positive sum; got {dict(phase.weights)}")

    def check_sources(self, source_names: list[str]) -> None:
        """Every name used in weights and caps must be a known source (``data.sources``)."""
        known = set(source_names)
        for index, phase in enumerate(self.phases):
            unknown = sorted(set(phase.weights) - known)
            if unknown:
                raise ConfigError(
                    f"{MIXTURE_KEY}.phases[{index}].weights ({phase.name}) names unknown sources {unknown}; "
                    f"known sources (data.sources): {sorted(known)}"
                )
        for cap_key in ("max_repetitions", "max_fraction"):
            unknown = sorted(set(getattr(self, cap_key)) - known)
            if unknown:
                raise ConfigError(f"{MIXTURE_KEY}.{cap_key} names unknown sources {unknown}; known: {sorted(known)}")


@dataclass
class SourceConfig:
    name: str = "web"
    """Source name (used in mixtures, metrics and manifests)."""
    prefix: str = ""
    """Megatron IndexedDataset path prefix (without .bin/.idx), as written by `megatron-align prepare`."""
    weight: float = 1.0
    """Blend weight when no phase mixture is configured."""
    num_samples: int | None = None
    """Planning only: samples per epoch for `data inspect` before the data is prepared
    (training counts the real data)."""


@dataclass
class DataConfig:
    mock: bool = False
    """Random tokens (Megatron-Core MockGPTDataset) for benchmarks; ignores sources."""
    sources: list[SourceConfig] = field(default_factory=list)
    """Tokenized sources."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Tokenizer that produced the sources (its identity is checked against manifests)."""
    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    """Phase-scheduled alignment mixture over data.sources (empty phases = blend sources by their weight)."""
    cache_dir: str | None = None
    """Where Megatron-Core caches dataset indices; default <run_dir>/data_cache."""
    heldout_percent: float = 0.0
    """Percent of each source's documents held out of training for held-out loss (0 = none)."""
    heldout_interval: int = 0
    """Log held-out loss per source (``heldout_loss/<source>``) every N steps (0 = never)."""
    heldout_samples: int = 0
    """Held-out sequences evaluated per source; default (0) = train.global_batch_size."""
    loader: str = "torch"
    """Microbatch delivery: torch (in-process) | dali (NVIDIA DALI pipeline with prefetch; GPU output on GPU)."""
    prefetch: int = 2
    """data.loader=dali: microbatches kept in flight."""
    reset_attention_mask: bool = False
    """Document masking (Megatron-LM's --reset-attention-mask): a token attends only to earlier tokens of its own
    document (documents end at EOD). local/portable specs: a block-diagonal causal mask; te spec: packed THD
    sequences (cu_seqlens). Positions are per document too (RoPE sees offsets within the document only)."""
    reset_position_ids: bool = False
    """Position ids restart after each EOD (Megatron-LM's --reset-position-ids); needs data.reset_attention_mask
    (with RoPE positions only matter through attention, see docs/document_masking.md)."""
    eod_mask_loss: bool = False
    """No loss on positions whose input token is EOD, i.e. on predicting the next document's first token from the
    end of the previous one (Megatron-LM's --eod-mask-loss)."""

    @property
    def document_keys(self) -> list[str]:
        """The document-boundary keys that are on (reset_attention_mask, reset_position_ids, eod_mask_loss)."""
        return [k for k in ("reset_attention_mask", "reset_position_ids", "eod_mask_loss") if getattr(self, k)]

    def require_sources(self) -> None:
        """Called before training starts (not at schema build, where defaults are empty)."""
        if not self.mock and not self.sources:
            raise ConfigError("data.sources: empty; list at least one {name, prefix} or set data.mock=true")

    def __post_init__(self) -> None:
        choice("data.loader", self.loader, ("torch", "dali"))
        if not 0 <= self.heldout_percent < 50:
            raise ConfigError(f"data.heldout_percent={self.heldout_percent}: expected a percentage in [0, 50)")
        positive("data.heldout_interval", self.heldout_interval, allow_zero=True)
        positive("data.heldout_samples", self.heldout_samples, allow_zero=True)
        if self.heldout_interval and not self.heldout_percent:
            raise ConfigError("data.heldout_interval > 0 needs data.heldout_percent > 0 (documents to hold out)")
        positive("data.prefetch", self.prefetch)
        if self.reset_position_ids and not self.reset_attention_mask:
            raise ConfigError(
                "data.reset_position_ids=true needs data.reset_attention_mask=true: the model's RoPE enters only "
                "through attention (Megatron-Core's GPTModel ignores position_ids with RoPE), so restarting positions "
                "without per-document attention would change nothing; set both (Megatron-LM's --reset-attention-mask "
                "--reset-position-ids)")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"data.sources: duplicate source names {names}")
        if self.mixture.phases:
            if self.mock:
                raise ConfigError("data.mixture needs real data.sources; it cannot be combined with data.mock=true")
            self.mixture.check_sources(names)
        for i, src in enumerate(self.sources):
            if not src.prefix and not self.mock and src.num_samples is None:
                raise ConfigError(f"data.sources[{i}].prefix: required (path prefix of a .bin/.idx pair)")
            positive(f"data.sources[{i}].weight", src.weight, allow_zero=True)
        if self.sources and not self.mixture.phases and not any(s.weight for s in self.sources):
            # Megatron-Core's blend normalises by the sum: all zero would give NaN weights
            raise ConfigError("data.sources[*].weight: all zero; give at least one source a weight > 0")

