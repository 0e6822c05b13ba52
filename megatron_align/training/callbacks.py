"""The callback seam: everything that is not the loop itself.

Straggler detection, health checks, watchdog heartbeats, trackers, periodic eval and fault injection are
callbacks. The trainer calls each hook on every callback in one fixed order: by ``priority`` (lower first), then
by ``name``, so every rank agrees whatever order the areas built them in. A callback that only acts on rank 0
checks it itself. ``state_dict``/``load_state_dict`` make callback state survive restarts (stored in every
checkpoint under ``callbacks.<name>``). A callback sees the trainer only through :class:`TrainerView`.
"""

from __future__ import annotations

from typing import Any, Protocol


class TrainerView(Protocol):
    """What a callback may use of the trainer (:class:`megatron_align.training.trainer.Trainer` provides it)."""

    config: Any
    """The run's :class:`~megatron_align.config.RootConfig`."""
    layout: Any
    """The parallel :class:`~megatron_align.parallel.layout.Layout` (tensor, pipeline, data, ...)."""
    rank: int
    cuda: bool
    run_dir: str
    ckpt_dir: str
    step: int
    """Optimizer steps completed."""
    model: list
    """The DDP-wrapped model chunks."""
    optimizer: Any
    data: Any
    """The :class:`~megatron_align.data.loader.TrainData` (tokenizer, held-out microbatches)."""
    metrics: Any
    vocab_size: int

    def stop(self, reason: str, exit_code: int | None = None) -> None: ...

    def skip_current_step(self, reason: str) -> None: ...

    def evaluate_loss(self, make_iterator, num_microbatches: int) -> float: ...


class Callback:
    name: str = "callback"
    priority: int = 0
    """Hooks run in ascending ``priority``, ties by ``name``: e.g. fault injection first (its forward hooks wrap
    the model before the straggler clock's), tracking last (it logs the record every other callback filled)."""

    def on_train_start(self, trainer: TrainerView) -> None: ...

    def on_step_start(self, trainer: TrainerView, step: int) -> None: ...

    def on_section(self, trainer: TrainerView, section: str, seconds: float) -> None:
        """A named section of the step (data, forward_backward, optimizer, checkpoint) took ``seconds``."""

    def on_loss(self, trainer: TrainerView, step: int, loss: float) -> None:
        """After forward/backward, before the update; ``loss`` is the all-reduced step loss (same on every rank).
        May call ``trainer.skip_current_step(reason)`` or ``trainer.stop(reason, exit_code)``."""

    def on_step_end(self, trainer: TrainerView, step: int, record: dict[str, Any]) -> None:
        """After the optimizer step; ``record`` is this step's metrics (callbacks may add keys before logging)."""

    def on_checkpoint_saved(self, trainer: TrainerView, step: int) -> None: ...

    def on_train_end(self, trainer: TrainerView) -> None: ...

    def on_error(self, trainer: TrainerView, error: BaseException) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


class CallbackList:
    """The callbacks in their run order (``priority``, then ``name``); calling a hook calls it on each."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = sorted(callbacks, key=lambda cb: (cb.priority, cb.name))

    def __getattr__(self, hook: str):
        def call_all(*args, **kwargs):
            for callback in self.callbacks:
                getattr(callback, hook)(*args, **kwargs)

        return call_all

    def state_dict(self) -> dict:
        return {cb.name: cb.state_dict() for cb in self.callbacks}

    def load_state_dict(self, state: dict) -> None:
        for cb in self.callbacks:
            if cb.name in state:
                cb.load_state_dict(state[cb.name])
