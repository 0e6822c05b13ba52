"""megatron_align.eval: alignment-propensity MCQ eval (:mod:`.propensity`) and its in-training callback."""

from __future__ import annotations

from megatron_align.errors import ConfigError


def build_callbacks(config) -> list:
    """Trainer callbacks for this area, from the root config (empty when disabled)."""
    cfg = config.eval
    if not cfg.enabled:
        return []
    if config.parallel.context > 1:
        raise ConfigError("eval.interval > 0 with parallel.context > 1: the in-training propensity eval does not "
                          "support context parallelism; evaluate checkpoints with `megatron-align eval propensity`")
    if cfg.interval % config.logging.interval:
        raise ConfigError(f"eval.interval={cfg.interval} must be a multiple of logging.interval={config.logging.interval}, "
                          "otherwise the eval results miss metrics.jsonl")
    from megatron_align.eval.callback import PropensityCallback

    return [PropensityCallback(cfg, config.train.steps, config.model.seq_length, config.run_dir)]
