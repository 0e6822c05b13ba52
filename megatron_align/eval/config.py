"""Config for megatron_align.eval (composed into the root config as ``eval:``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_align.errors import ConfigError


def _default_variants() -> list[str]:
    from megatron_align.eval.items import VARIANTS

    return list(VARIANTS)


@dataclass
class EvalConfig:
    propensity_questions: Optional[str] = None
    """JSONL file of alignment-propensity MCQ items (see megatron_align.eval.items); None = no in-training eval."""
    interval: int = 0
    """Run the propensity eval every N optimizer steps (and after the last step); 0 = never during training."""
    variants: list[str] = field(default_factory=_default_variants)
    """Prompt wording variants to average over (names in megatron_align.eval.items.VARIANTS); default: all."""
    both_orders: bool = True
    """Score each item with its options in the given order and swapped (cancels position bias)."""
    max_items: Optional[int] = None
    """Use only the first N items of the file (quick periodic evals); None = all."""
    batch_size: int = 8
    """Prompts per forward pass on one data-parallel rank."""
    max_prompt_tokens: Optional[int] = None
    """Longer prompts keep their last N tokens (the answer cue); None = model.seq_length."""
    out_dir: Optional[str] = None
    """Where in-training eval reports go; default <run_dir>/eval."""

    def __post_init__(self) -> None:
        from megatron_align.eval.items import VARIANTS

        if self.interval < 0:
            raise ConfigError(f"eval.interval={self.interval}: must be >= 0 (0 = no in-training eval)")
        if self.interval > 0 and not self.propensity_questions:
            raise ConfigError("eval.interval > 0 needs eval.propensity_questions (a JSONL file of MCQ items)")
        if not self.variants:
            raise ConfigError(f"eval.variants: empty; name at least one of {', '.join(VARIANTS)}")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ConfigError(f"eval.variants: unknown {unknown}; known variants: {', '.join(VARIANTS)}")
        if len(set(self.variants)) != len(self.variants):
            raise ConfigError(f"eval.variants: duplicates in {list(self.variants)}")
        if self.max_items is not None and self.max_items < 1:
            raise ConfigError(f"eval.max_items={self.max_items}: must be >= 1 (or null for all items)")
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size={self.batch_size}: must be >= 1")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 8:
            raise ConfigError(f"eval.max_prompt_tokens={self.max_prompt_tokens}: must be >= 8 (or null for model.seq_length)")

    @property
    def enabled(self) -> bool:
        """True when the in-training propensity eval runs."""
        return bool(self.propensity_questions) and self.interval > 0
