"""The trainer callback that applies a :class:`~megatron_align.resilience.protocol.faults.FaultPlan` inside a rank.

The grammar, the fire-once bookkeeping and checkpoint damage are in
:mod:`megatron_align.resilience.protocol.faults` (torch-free: the config validates ``resilience.inject``
with it); this module only hooks them into the trainer: kill/hang at a step, slowed forwards
and optimizer steps, NaN/spiked outputs, a NaN gradient, damaged checkpoints.
"""

from __future__ import annotations

import logging
import os
import signal
import time

from megatron_align.resilience.protocol.faults import FaultPlan, damage_checkpoint
from megatron_align.training.callbacks import Callback, TrainerView

log = logging.getLogger(__name__)


def _burn_cpu(seconds: float) -> None:
    """Spend ``seconds`` of this process's CPU time on throwaway matmuls: a CPU rank that is slower,
    visible to wall-clock and CPU-time clocks alike (a sleep would be invisible to the latter)."""
    import torch

    deadline = time.process_time() + seconds
    x = torch.full((96, 96), 0.01)
    while time.process_time() < deadline:
        x = torch.tanh(x @ x)


class InjectionCallback(Callback):
    """Applies a :class:`FaultPlan` at the trainer's hooks (kill/hang/nan/spike/nan_grad/slow/checkpoint damage).

    ``sdc`` is applied by the SDC check itself (it asks the same plan), so the perturbed
    value is the one that is checksummed and compared.
    """

    name = "fault_injection"
    priority = -100  # first: its forward hooks wrap the model before the straggler clock's

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan
        self._handles: list = []
        self._restore_step = None
        self._nan = False
        self._spike: float | None = None
        self._grad_handle = None
        self._factor: float | None = None
        self._forward_started = 0.0
        self._saved_steps: list[int] = []
        self._cuda = False

    def on_train_start(self, trainer: TrainerView) -> None:
        import torch

        self.plan.start(trainer.run_dir, trainer.rank, torch.distributed.get_world_size())
        self._cuda = trainer.cuda
        if self.plan.pending("slow") or self.plan.pending("nan") or self.plan.pending("spike"):
            for chunk in trainer.model:
                module = getattr(chunk, "module", chunk)
                self._handles.append(module.register_forward_pre_hook(self._before_forward))
                # prepend: run before other callbacks' post-hooks (the straggler clock), so they see the delay.
                self._handles.append(module.register_forward_hook(self._after_forward, prepend=True))
        if self.plan.pending("slow"):
            optimizer, original = trainer.optimizer, trainer.optimizer.step

            def slowed_step(*args, **kwargs):
                started = self._now()
                result = original(*args, **kwargs)
                self._slow_down(started)
                return result

            optimizer.step = slowed_step
            self._restore_step = (optimizer, original)

    def _now(self) -> float:
        if self._cuda:
            if self._factor is not None:
                import torch

                torch.cuda.synchronize()  # time the GPU work, not the kernel launches
            return time.perf_counter()
        return time.process_time()

    def _slow_down(self, started: float) -> None:
        if self._factor is None:
            return
        extra = (self._factor - 1.0) * max(0.0, self._now() - started)
        if self._cuda:
            time.sleep(extra)  # the GPU idles: CUDA-event timings of the section grow by `extra`
        else:
            _burn_cpu(extra)

    def _before_forward(self, module, args) -> None:
        self._forward_started = self._now()

    def _after_forward(self, module, args, output):
        self._slow_down(self._forward_started)
        scale = float("nan") if self._nan else self._spike
        if scale is not None and hasattr(output, "dtype") and output.dtype.is_floating_point:
            return output * scale
        return None

    def on_step_start(self, trainer: TrainerView, step: int) -> None:
        if self.plan.fire("disk_full", step):
            from megatron_align.resilience.protocol.storage import simulate_full

            simulate_full(trainer.ckpt_dir)
            log.warning("fault injection: rank %d sees %s as full from step %d", trainer.rank, trainer.ckpt_dir, step)
        if self.plan.fire("kill", step):
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)
        if self.plan.fire("hang", step):
            log.warning("fault injection: rank %d hangs at step %d", trainer.rank, step)
            while True:
                time.sleep(3600)
        self._nan = self.plan.fire("nan", step) is not None
        spike = self.plan.fire("spike", step)
        self._spike = spike.arg if spike else None
        if self.plan.fire("nan_grad", step):
            first = next(p for chunk in trainer.model for p in getattr(chunk, "module", chunk).parameters())
            self._grad_handle = first.register_hook(lambda grad: grad * float("nan"))

    def on_loss(self, trainer: TrainerView, step: int, loss: float) -> None:
        if self._grad_handle is not None:  # backward is over
            self._grad_handle.remove()
            self._grad_handle = None
        slow = self.plan.fire("slow", step, persistent=True)
        self._factor = slow.arg if slow else None

    def on_checkpoint_saved(self, trainer: TrainerView, step: int) -> None:
        if any(self.plan.pending(k) for k in ("corrupt_checkpoint", "truncate_checkpoint", "bitflip_checkpoint")):
            self._saved_steps.append(step)
        self._damage_committed(trainer)

    def on_step_end(self, trainer: TrainerView, step: int, record: dict) -> None:
        if self._saved_steps:
            self._damage_committed(trainer)

    def _damage_committed(self, trainer: TrainerView) -> None:
        """Damage checkpoints once they are committed (async saves commit a few steps later)."""
        from megatron_align.training.checkpoint import is_complete, iter_dir_name

        for saved in list(self._saved_steps):
            path = os.path.join(trainer.ckpt_dir, iter_dir_name(saved))
            if not is_complete(path):
                writing = os.path.isdir(os.path.join(trainer.ckpt_dir, ".tmp_" + iter_dir_name(saved)))
                if not writing and not is_complete(path):  # (re-checked: the rename may have just happened)
                    self._saved_steps.remove(saved)  # neither being written nor committed: gone
                continue
            self._saved_steps.remove(saved)
            for kind, mode in (("corrupt_checkpoint", "corrupt"), ("truncate_checkpoint", "truncate"),
                               ("bitflip_checkpoint", "bitflip")):
                for fault in self.plan.pending(kind):
                    if saved < fault.step or (fault.rank is None and trainer.rank != 0):
                        continue
                    if self.plan.fire(kind, saved, persistent=True) is fault:
                        files = damage_checkpoint(path, mode, fault.rank)
                        log.warning("fault injection: %s %d files of %s", mode, len(files), path)

    def on_train_end(self, trainer: TrainerView) -> None:
        self._damage_committed(trainer)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._restore_step is not None:
            optimizer, original = self._restore_step
            optimizer.step = original
            self._restore_step = None
