"""Checkpoints: Megatron-Core dist_checkpointing (torch_dist) with an atomic commit.

Commit protocol (a crash at any point leaves the previous checkpoint as
``latest`` and loadable):

1. every rank writes its shards into ``checkpoints/.tmp_iter_XXXXXXX/``
   (dist_checkpointing.save; in the background on GPU);
2. once *all* ranks have finished, rank 0 writes ``common.pt`` if megatron-core did not (0.19+; see
   :func:`_write_legacy_common_state`), then ``megatron_align.json``
   (step, consumed samples, layout, data fingerprint, resolved config) into the
   temporary directory and fsyncs it; this file is the completeness marker;
3. rank 0 renames the directory to ``iter_XXXXXXX`` (atomic on one filesystem);
4. rank 0 rewrites ``latest`` via a temporary file + ``os.replace``, last.

Readers trust only directories that carry the marker; stray ``.tmp_*``
directories are garbage from a crash and are removed by the next save.
Retention keeps the newest ``keep_last`` plus every ``keep_every``-th step and
never deletes the newest complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time

import torch
from megatron.core import dist_checkpointing

from megatron_align.errors import UserError
from megatron_align.known_warnings import drop_known_record
from megatron_align.training import async_save as async_writer
from megatron_align.training.checkpoint_files import (  # noqa: F401  (re-exported: the public checkpoint API)
    LATEST,
    MARKER,
    CheckpointLoadError,
    _fsync_write,
    complete_checkpoints,
    is_complete,
    iter_dir_name,
    read_marker,
    resolve_checkpoint,
    retained,
)

log = logging.getLogger(__name__)
LOAD_COMMON_DEPRECATION = "load_common is deprecated"
drop_known_record("megatron.core.dist_checkpointing.strategies.common", LOAD_COMMON_DEPRECATION,
                  "megatron-core 0.19 reads this checkpoint's common.pt through its deprecated legacy path; "
                  "megatron_align writes common.pt on purpose, so that 0.16 can load the checkpoint too")

def load_sharded(path: str, sharded_state_dict: dict) -> dict:
    """dist_checkpointing.load of exactly the requested keys (collective); clear errors for users.

    Entries the checkpoint holds but the caller did not request (optimizer state for a weights-only
    load, RNG state of another layout) are simply not read. Requested tensors the checkpoint lacks are
    an error, except Transformer Engine's ``_extra_state`` (FP8 scaling metadata), which is absent from
    local/portable-spec checkpoints and which TE initialises fresh.
    """
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.validation import StrictHandling

    try:
        # Megatron's "unexpected" = requested by this model but absent from the checkpoint.
        state, _missing, unexpected = dist_checkpointing.load(
            sharded_state_dict, path, sharded_strategy=get_default_load_sharded_strategy(path),
            strict=StrictHandling.RETURN_UNEXPECTED)
    except Exception as err:  # corrupt shards, missing files, shape mismatch: whatever this library version raises
        rank = torch.distributed.get_rank()
        raise CheckpointLoadError(path, f"loading checkpoint {path} failed on rank {rank}: {type(err).__name__}: "
                                  f"{err}") from err
    real = sorted(k for k in unexpected if not k.endswith("_extra_state"))
    if real:
        raise UserError(f"checkpoint {path} lacks {len(real)} tensors this model needs (e.g. {real[:3]}); "
                        "was it saved from a different model shape?")
    return state


def _start_writer_manager_with_signals_blocked(strategy: async_writer.AsyncStrategy) -> None:
    """Start dist_checkpointing's writer-results Manager process with SIGUSR1/SIGTERM blocked.

    Megatron-Core starts that Manager lazily, in a fresh process, at the first save. SLURM delivers
    ``--signal=USR1`` (and TERM at preemption) to every process of the step, so the Manager would die
    and the very checkpoint the signal asks for would fail with BrokenPipeError. A process inherits the
    signal mask, so starting it now with both blocked keeps it alive; the rank's own handlers are
    unaffected once the mask is restored.
    """
    import signal

    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGTERM})
    try:
        async_writer.start_results_queue(strategy)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _write_legacy_common_state(path: str) -> None:
    """Make checkpoint dir ``path`` loadable by every supported megatron-core (rank 0, before the marker).

    The common (non-tensor) state (step, scheduler, optimizer param groups) is ``common.pt`` up to 0.16;
    0.19 writes it as a ``common_state`` object inside the torch_dist files instead, and 0.16 cannot load
    such a checkpoint ("Common file .../common.pt does not exist"). 0.19 reads ``common.pt`` first when it
    exists, so writing the same state there too keeps checkpoints movable in both directions.
    """
    target = os.path.join(path, "common.pt")
    if os.path.exists(target):
        return
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    tmp = f"{target}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(load_common_state_dict(path), f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


class CheckpointManager:
    """Saves and loads sharded checkpoints of one run; every method is called on all ranks."""

    def __init__(self, ckpt_dir: str, keep_last: int, keep_every: int | None, async_save: bool, dp_group=None) -> None:
        self.ckpt_dir = ckpt_dir
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.async_save = async_save
        self.dp_group = dp_group
        self.rank = torch.distributed.get_rank()
        self._queue = None
        self.async_strategy = async_writer.choose()
        if self.async_save:
            log.info("async checkpoint save: %s (%s)", self.async_strategy.name, self.async_strategy.reason)
            self._queue = async_writer.calls_queue(self.async_strategy)
        self.last_saved_step: int | None = None
        _start_writer_manager_with_signals_blocked(self.async_strategy)

    # -- save ---------------------------------------------------------------------------------
    def _save_strategy(self):
        from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

        strategy = get_default_save_sharded_strategy("torch_dist")
        if self.dp_group is not None and torch.distributed.get_world_size(self.dp_group) > 1:
            # Replicated tensors are written once, their writes spread over the DP replicas.
            strategy = FullyParallelSaveStrategyWrapper(strategy, self.dp_group)
        return strategy

    def save(self, step: int, sharded_state_dict: dict, marker: dict) -> None:
        """Write checkpoint ``step``; on GPU the write continues in the background (see :meth:`finalize`)."""
        self.finalize(blocking=True)  # one save in flight at a time
        final = os.path.join(self.ckpt_dir, iter_dir_name(step))
        tmp = os.path.join(self.ckpt_dir, "." + "tmp_" + iter_dir_name(step))
        if self.rank == 0:
            os.makedirs(self.ckpt_dir, exist_ok=True)
            for name in os.listdir(self.ckpt_dir):  # leftovers of crashed saves
                if name.startswith(".tmp_"):
                    shutil.rmtree(os.path.join(self.ckpt_dir, name), ignore_errors=True)
            os.makedirs(tmp)
        torch.distributed.barrier()
        started = time.time()
        extra = async_writer.save_kwargs(self.async_strategy) if self.async_save else {}
        request = dist_checkpointing.save(sharded_state_dict, tmp, sharded_strategy=self._save_strategy(),
                                          async_sharded_save=self.async_save, **extra)
        marker = dict(marker, step=step, saved_at=time.time())

        def commit() -> None:
            if self.rank == 0:
                self._commit(tmp, final, marker)
            log.info("checkpoint %s committed (%.1f s)", final, time.time() - started)
            self.last_saved_step = step

        if self.async_save:
            request.add_finalize_fn(commit)
            self._queue.schedule_async_request(request)
        else:
            torch.distributed.barrier()  # every rank's shards are on disk before the commit
            commit()
            torch.distributed.barrier()

    def _commit(self, tmp: str, final: str, marker: dict) -> None:
        from megatron_align.resilience.inject import fault_point

        fault_point("checkpoint.before_commit", marker["step"])
        _write_legacy_common_state(tmp)
        _fsync_write(os.path.join(tmp, MARKER), json.dumps(marker, indent=1, sort_keys=True, default=str))
        if os.path.exists(final):  # re-saving a step after a restart: replace the old one whole
            trash = final + f".old-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fault_point("checkpoint.before_latest", marker["step"])
        _fsync_write(os.path.join(self.ckpt_dir, LATEST), os.path.basename(final) + "\n")
        self._apply_retention()

    def _apply_retention(self) -> None:
        found = complete_checkpoints(self.ckpt_dir)
        keep = retained([s for s, _ in found], self.keep_last, self.keep_every)
        for step, path in found:
            if step not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def finalize(self, blocking: bool = False) -> None:
        """Commit background saves that have finished on all ranks (collective)."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=blocking)

    def close(self) -> None:
        self.finalize(blocking=True)
        if self._queue is not None:
            self._queue.close()

    # -- load ---------------------------------------------------------------------------------
    def load(self, path: str, sharded_state_dict: dict) -> dict:
        return load_sharded(path, sharded_state_dict)
