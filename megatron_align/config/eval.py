"""The in-training propensity eval (``eval:``), run by :mod:`megatron_align.eval.callback`.

The wording variants are data (``megatron_align/eval/templates.yaml``): the default list and the known names are
read from it through :func:`megatron_align.eval.templates.load_templates` (yaml and the standard library only),
imported when a config is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_align.config.checks import at_least
from megatron_align.errors import ConfigError


def _default_variants() -> list[str]:
    from megatron_align.eval.templates import load_templates

    return load_templates().defaults()


@dataclass
class EvalConfig:
    propensity_questions: str | None = None
    """JSONL file of alignment-propensity MCQ items (see megatron_align.eval.items); None = no in-training eval."""
    interval: int = 0
    """Run the propensity eval every N optimizer steps (and after the last step); 0 = never during training."""
    variants: list[str] = field(default_factory=_default_variants)
    """Prompt wording variants to average over (names in megatron_align.eval.items.VARIANTS); default: all."""
    both_orders: bool = True
    """Score each item with its options in the given order and swapped (cancels position bias)."""
    max_items: int | None = None
    """Use only the first N items of the file (quick periodic evals); None = all."""
    batch_size: int = 8
    """Prompts per forward pass on one data-parallel rank."""
    max_prompt_tokens: int | None = None
    """Longer prompts keep their last N tokens (the answer cue); None = model.seq_length."""
    out_dir: str | None = None
    """Where in-training eval reports go; default <run_dir>/eval."""

    def __post_init__(self) -> None:
        variants = _default_variants()
        if self.interval < 0:
            raise ConfigError(f"eval.interval={self.interval}: must be >= 0 (0 = no in-training eval)")
        if self.interval > 0 and not self.propensity_questions:
            raise ConfigError("eval.interval > 0 needs eval.propensity_questions (a JSONL file of MCQ items)")
        if not self.variants:
            raise ConfigError(f"eval.variants: empty; name at least one of {', '.join(variants)}")
        unknown = [v for v in self.variants if v not in variants]
        if unknown:
            raise ConfigError(f"eval.variants: unknown {unknown}; known variants: {', '.join(variants)}")
        if len(set(self.variants)) != len(self.variants):
            raise ConfigError(f"eval.variants: duplicates in {list(self.variants)}")
        if self.max_items is not None and self.max_items < 1:
            raise ConfigError(f"eval.max_items={self.max_items}: must be >= 1 (or null for all items)")
        at_least("eval.batch_size", self.batch_size, 1)
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 8:
            raise ConfigError(
                f"eval.max_prompt_tokens={self.max_prompt_tokens}: must be >= 8 (or null for model.seq_length)"
            )

    @property
    def enabled(self) -> bool:
        """True when the in-training propensity eval runs."""
        return bool(self.propensity_questions) and self.interval > 0
