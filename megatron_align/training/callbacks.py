"""The callback seam: everything that is not the loop itself.

Straggler detection, health checks, watchdog heartbeats, trackers, periodic
eval and fault injection are callbacks. The trainer calls the hooks below in
order on every rank; a callback that only acts on rank 0 checks it itself.
``state_dict``/``load_state_dict`` make callback state survive restarts (it is
stored in every checkpoint under ``callbacks.<name>``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron_align.training.trainer import Trainer


class Callback:
    name: str = "callback"

    def on_train_start(self, trainer: "Trainer") -> None: ...

    def on_step_start(self, trainer: "Trainer", step: int) -> None: ...

    def on_section(self, trainer: "Trainer", section: str, seconds: float) -> None:
        """A named section of the step (data, forward_backward, optimizer, checkpoint) took ``seconds``."""

    def on_loss(self, trainer: "Trainer", step: int, loss: float) -> None:
        """After forward/backward, before the update; ``loss`` is the all-reduced step loss (same on every rank).
        May call ``trainer.skip_current_step(reason)`` or ``trainer.request_stop(reason)``."""

    def on_step_end(self, trainer: "Trainer", step: int, record: dict[str, Any]) -> None:
        """After the optimizer step; ``record`` is this step's metrics (callbacks may add keys before logging)."""

    def on_checkpoint_saved(self, trainer: "Trainer", step: int) -> None: ...

    def on_train_end(self, trainer: "Trainer") -> None: ...

    def on_error(self, trainer: "Trainer", error: BaseException) -> None: ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


class CallbackList:
    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = callbacks

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

