"""The LR schedule a run will follow, resolved from the config, and what happens to it on resume.

Megatron-Core's ``OptimizerParamScheduler`` only *asserts* on its inputs (``lr_warmup_steps <
lr_decay_steps``, a WSD decay length, ``min_lr <= max_lr``), so a bad value used to kill every
rank with a bare ``AssertionError`` after the process groups formed. :func:`resolve_schedule`
computes the values the trainer passes, from our keys, and raises a ``ConfigError`` naming them
at config load instead. One case is clipped rather than refused: warmup as long as the run when
``optimizer.decay_steps`` is not set, i.e. a shortened smoke run (``train.steps=2`` of a config
with 5 warmup steps): the user asked for fewer steps, not for a different schedule, so warmup
becomes ``train.steps - 1`` with a warning. With ``decay_steps`` set explicitly the two keys
contradict each other and the config is refused.

On resume Megatron-Core's scheduler silently keeps the checkpoint's values (a run extended from 2
to 4 steps stayed at ``min_lr``). :func:`schedule_changes` lists what differs between the
checkpoint and this config; ``optimizer.override_scheduler`` (default true) follows the new config
and logs the changes, the common case being a WSD run extended or re-decayed; false refuses to
resume with a message naming the keys. The step count always comes from the checkpoint.
"""

from __future__ import annotations

from megatron_align.errors import ConfigError

WSD_DEFAULT_DECAY_DIVISOR = 10
"""WSD without ``optimizer.wsd_decay_steps``: the final decay is the last 1/10 of ``decay_steps``
(floor division, at least one step) -- the "short cooldown" of warmup-stable-decay schedules, and
the ``default 10% of decay_steps`` the config documents."""

# Megatron-Core scheduler state_dict key -> our config key
STATE_KEYS = {
    "max_lr": "optimizer.lr",
    "min_lr": "optimizer.min_lr",
    "lr_warmup_steps": "optimizer.warmup_steps",
    "lr_decay_steps": "optimizer.decay_steps (default train.steps)",
    "lr_decay_style": "optimizer.decay_style",
}


def resolve_schedule(optimizer, steps: int) -> tuple[dict, list[str]]:
    """(scheduler kwargs for Megatron-Core, warnings) for ``optimizer`` (OptimizerConfig) and ``train.steps``."""
    o = optimizer
    decay = o.decay_steps or steps
    warmup = o.warmup_steps
    notes = []
    if warmup >= decay:
        if o.decay_steps is None:
            notes.append(f"optimizer.warmup_steps={warmup} is not shorter than the run (train.steps={steps}, the decay "
                         f"length while optimizer.decay_steps is unset): warmup clipped to {max(0, decay - 1)} steps")
            warmup = max(0, decay - 1)
        else:
            raise ConfigError(f"optimizer.warmup_steps={warmup} must be < optimizer.decay_steps={decay} (the steps "
                              "the LR decays over, warmup included); lower warmup_steps or raise decay_steps")
    wsd = wsd_decay_steps(o, decay)
    if wsd is not None:
        if wsd > decay - warmup:
            key = "optimizer.decay_steps" if o.decay_steps else "train.steps"
            raise ConfigError(
                f"optimizer.wsd_decay_steps={wsd} exceeds the {decay - warmup} steps after warmup "
                f"({key}={decay} - optimizer.warmup_steps={warmup}); lower wsd_decay_steps or raise {key}"
            )
    kwargs = dict(init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=warmup, lr_decay_steps=decay,
                  lr_decay_style=o.decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=decay,
                  wd_incr_style="constant", wsd_decay_steps=wsd, lr_wsd_decay_style=o.wsd_decay_style if wsd else None)
    return kwargs, notes


def wsd_decay_steps(o, total_decay_steps: int) -> int | None:
    """Length of WSD's final decay: ``optimizer.wsd_decay_steps`` if set, else
    ``max(1, total_decay_steps // WSD_DEFAULT_DECAY_DIVISOR)``; None for every other decay style."""
    if o.decay_style != "WSD":
        return None
    return o.wsd_decay_steps or max(1, total_decay_steps // WSD_DEFAULT_DECAY_DIVISOR)


def schedule_changes(saved: dict, kwargs: dict) -> list[str]:
    """Human lines ``key: checkpoint -> config`` for schedule values that differ (empty = same schedule)."""
    changes = []
    for state_key, key in STATE_KEYS.items():
        if state_key in saved and saved[state_key] != kwargs[state_key]:
            changes.append(f"{key}: {saved[state_key]} in the checkpoint -> {kwargs[state_key]}")
    return changes
