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
directories are garbage from a crash and are removed at start-up (logged) and by
the next save. Retention keeps the newest ``keep_last`` plus every
``keep_every``-th step and never deletes the newest complete checkpoint.

Integrity: between steps 1 and 2 every rank digests the files it wrote (xxh3-64,
:mod:`.checksums`) and rank 0 records all of them in the marker; resume verifies
them before loading (a mismatch is a :class:`CheckpointLoadError`, exit 88).

Space: before step 1, rank 0 compares the free space of the checkpoint
filesystem with the size of the last checkpoint (+10 %); if it will not fit,
it first deletes the checkpoints retention would delete after this save anyway,
and if it still will not fit every rank raises
:class:`~megatron_align.resilience.protocol.storage.StorageError` *before* writing (exit 89).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import time

import torch
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint import CheckpointException

from megatron_align.errors import UserError
from megatron_align.fileio import atomic_open, human_bytes
from megatron_align.known_warnings import drop_known_record
from megatron_align.resilience.protocol import storage
from megatron_align.training import async_save as async_writer
from megatron_align.training.checkpoint_files import (  # noqa: F401  (re-exported: the public checkpoint API)
    LATEST,
    MARKER,
    CheckpointLoadError,
    complete_checkpoints,
    durable_write,
    is_complete,
    iter_dir_name,
    read_marker,
    resolve_checkpoint,
    retained,
)
from megatron_align.training.checksums import ALGORITHM, digest_files, recorded_checksums, verify_checkpoint

log = logging.getLogger(__name__)
# torch.distributed.checkpoint's CheckpointException (how dist_checkpointing reports any rank's failed write or
# read) derives from BaseException, so `except Exception` would let it through as a traceback.
_WRITE_ERRORS = (Exception, CheckpointException)
SPACE_FACTOR = 1.1  # the next checkpoint is assumed up to 10 % larger than the last one


def verify_before_load(path: str) -> bool:
    """Check the checkpoint's recorded checksums, split over the ranks; CheckpointLoadError on a mismatch
    (collective). True when every file was verified; False for a checkpoint saved without checksums."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    started = time.time()
    problems = verify_checkpoint(path, part=(rank, world))
    bad = torch.tensor([1.0 if problems else 0.0])
    if torch.cuda.is_available():
        bad = bad.cuda()
    torch.distributed.all_reduce(bad)
    if problems:
        raise CheckpointLoadError(
            path,
            f"loading checkpoint {path} failed on rank {rank}: checksum verification: "
            f"{problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""),
        )
    if float(bad.item()) > 0:
        raise CheckpointLoadError(path, f"loading checkpoint {path} failed on rank {rank}: another rank found a "
                                        "checksum mismatch (see its message)")
    if recorded_checksums(path) is None:
        return False
    log.info("checkpoint %s: checksums verified (%.1f s)", path, time.time() - started)
    return True


TE_PICKLE_ENV = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"


@contextlib.contextmanager
def te_extra_state_unpickling(verified: bool):
    """Let Transformer Engine unpickle this checkpoint's ``_extra_state`` only when its checksums verified.

    TE >= 2.18 refuses to unpickle FP8 delayed-scaling ``_extra_state`` unless this variable is set (pickle can
    run code); FP8 resume with the default recipe needs it. A checkpoint whose every file matches the digests this
    run family recorded at save is trusted; one without checksums, or anything loaded outside this window, is not.
    TE unpickles when the model's ``load_state_dict`` runs, so that call belongs inside the window too.
    """
    if not verified:
        yield
        return
    previous = os.environ.get(TE_PICKLE_ENV)
    os.environ[TE_PICKLE_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(TE_PICKLE_ENV, None)
        else:
            os.environ[TE_PICKLE_ENV] = previous


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
    except _WRITE_ERRORS as err:  # corrupt shards, missing files, shape mismatch
        rank = torch.distributed.get_rank()
        raise CheckpointLoadError(
            path, f"loading checkpoint {path} failed on rank {rank}: {type(err).__name__}: {err}"
        ) from err
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

    with atomic_open(target, "wb", fsync=True) as f:
        torch.save(load_common_state_dict(path), f)


class CheckpointManager:
    """Saves and loads sharded checkpoints of one run; every method is called on all ranks."""

    def __init__(self, ckpt_dir: str, keep_last: int, keep_every: int | None, async_save: bool, dp_group=None,
                 async_writer_choice: str = "auto", megatron_lm_tracker: bool = False) -> None:
        self.ckpt_dir = ckpt_dir
        self.megatron_lm_tracker = megatron_lm_tracker  # also write latest_checkpointed_iteration.txt
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.async_save = async_save
        self.dp_group = dp_group
        self.rank = torch.distributed.get_rank()
        self._queue = None
        self.async_strategy = async_writer.choose(async_writer_choice)
        if self.async_save:
            log.info("async checkpoint save: %s (%s)", self.async_strategy.name, self.async_strategy.reason)
            self._queue = async_writer.calls_queue(self.async_strategy)
        self.last_saved_step: int | None = None
        self._saving: tuple[str, int | None] | None = None  # (tmp dir, bytes needed) of the save in flight
        if self.rank == 0:
            self._remove_leftovers(at_start=True)
        _start_writer_manager_with_signals_blocked(self.async_strategy)

    def _remove_leftovers(self, at_start: bool = False) -> None:
        """Remove ``.tmp_*`` directories of crashed saves (rank 0; nothing else writes there between saves)."""
        if not os.path.isdir(self.ckpt_dir):
            return
        for name in sorted(os.listdir(self.ckpt_dir)):
            if name.startswith(".tmp_"):
                path = os.path.join(self.ckpt_dir, name)
                size = storage.dir_size(path)
                shutil.rmtree(path, ignore_errors=True)
                if at_start:
                    log.warning("removed %s (%s), left by an interrupted save", path, human_bytes(size))

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
        needed = self._ensure_space(step, sharded_state_dict)
        self._saving = (tmp, needed)
        started = time.time()
        try:
            if self.rank == 0:
                os.makedirs(self.ckpt_dir, exist_ok=True)
                self._remove_leftovers()
                os.makedirs(tmp)
            torch.distributed.barrier()
            extra = async_writer.save_kwargs(self.async_strategy) if self.async_save else {}
            request = dist_checkpointing.save(sharded_state_dict, tmp, sharded_strategy=self._save_strategy(),
                                              async_sharded_save=self.async_save, **extra)
        except _WRITE_ERRORS as err:
            self._raise_storage(err)
            raise
        marker = dict(marker, step=step, saved_at=time.time())

        def commit() -> None:
            if self.rank == 0:  # before the digests: common.pt is one of rank 0's files
                try:
                    _write_legacy_common_state(tmp)
                except OSError as err:
                    self._raise_storage(err)
                    raise
            # Every rank digests the files it wrote (in parallel); rank 0 records them all in the marker.
            digests = digest_files(tmp, self._own_files(tmp))
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, digests)
            if self.rank == 0:
                files = {name: entry for part in gathered for name, entry in part.items()}
                self._commit(tmp, final, dict(marker, checksums={"algorithm": ALGORITHM, "files": files}))
            log.info("checkpoint %s committed (%.1f s)", final, time.time() - started)
            self.last_saved_step = step
            self._saving = None

        if self.async_save:
            request.add_finalize_fn(commit)
            self._queue.schedule_async_request(request)
        else:
            torch.distributed.barrier()  # every rank's shards are on disk before the commit
            commit()
            torch.distributed.barrier()

    def _own_files(self, tmp: str) -> list[str]:
        """The files of ``tmp`` this rank wrote: its ``__<rank>_*.distcp`` shards; rank 0 also the metadata."""
        names = sorted(os.listdir(tmp))
        own = [n for n in names if n.startswith(f"__{self.rank}_")]
        if self.rank == 0:
            own += [n for n in names if not n.startswith("__") and n != MARKER and os.path.isfile(os.path.join(tmp, n))]
        return own

    def _ensure_space(self, step: int, sharded_state_dict: dict) -> int:
        """Collective: bytes the save needs; StorageError on every rank, before writing, when they are not there."""
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica

        local = sum(v.data.numel() * v.data.element_size() for v in nested_values(sharded_state_dict)
                    if isinstance(v, ShardedTensor) and is_main_replica(v.replica_id) and v.data is not None)
        estimate = torch.tensor([float(local)], dtype=torch.float64)
        if torch.cuda.is_available():
            estimate = estimate.cuda()
        torch.distributed.all_reduce(estimate)
        verdict: list = [None]
        if self.rank == 0:
            verdict[0] = self._check_space(step, int(estimate.item()))
        torch.distributed.broadcast_object_list(verdict, src=0)
        needed, free, detail = verdict[0]
        if detail is not None:
            raise storage.StorageError(self.ckpt_dir, errno.ENOSPC, needed, detail, free=free)
        return needed

    def _check_space(self, step: int, estimate: int) -> tuple[int, int | None, str | None]:
        """Rank 0: (needed, free, None) when the save fits (after early retention if need be), else a reason."""
        found = complete_checkpoints(self.ckpt_dir)
        last = storage.dir_size(found[-1][1]) if found else 0
        needed = int(max(last, estimate) * SPACE_FACTOR) + storage.FULL_MARGIN_BYTES
        self._remove_leftovers()
        free = storage.free_bytes(self.ckpt_dir)
        if free is None or free >= needed:
            return needed, free, None
        # Early retention: what retention would delete once this save commits, never the newest complete one.
        keep = retained([s for s, _ in found] + [step], self.keep_last, self.keep_every)
        doomed = [(s, p) for s, p in found[:-1] if s not in keep]
        for _, path in doomed:
            log.warning("checkpoint filesystem: free %s < ~%s needed for step %d: deleting %s early (retention "
                        "would delete it after this save)", human_bytes(free), human_bytes(needed), step, path)
            shutil.rmtree(path, ignore_errors=True)
            free = storage.free_bytes(self.ckpt_dir)
            if free is None or free >= needed:
                return needed, free, None
        newest = os.path.basename(found[-1][1]) if found else None
        return needed, free, (f"checkpoint step {step} not written (nothing half-written); "
                              + (f"latest good checkpoint {newest} is intact; " if newest else "")
                              + "free space or lower checkpoint.keep_last, then run the same command")

    def _raise_storage(self, err: BaseException) -> None:
        """Turn a failed write into a StorageError when it was one (errno, or a full checkpoint filesystem)."""
        tmp, needed = self._saving or (None, None)
        found = complete_checkpoints(self.ckpt_dir)
        detail = "the partial save was removed; " if tmp else ""
        if found:
            detail += f"latest good checkpoint {os.path.basename(found[-1][1])} is intact; "
        converted = storage.from_os_error(
            err, self.ckpt_dir, needed, detail + "free space or lower checkpoint.keep_last, then run the same command"
        )
        if converted is None:
            return
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        self._saving = None
        raise converted from err

    def _commit(self, tmp: str, final: str, marker: dict) -> None:
        from megatron_align.resilience.protocol.faults import fault_point

        fault_point("checkpoint.before_commit", marker["step"])
        try:
            durable_write(os.path.join(tmp, MARKER), json.dumps(marker, indent=1, sort_keys=True, default=str))
        except OSError as err:
            self._raise_storage(err)
            raise
        if os.path.exists(final):  # re-saving a step after a restart: replace the old one whole
            trash = final + f".old-{os.getpid()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fault_point("checkpoint.before_latest", marker["step"])
        durable_write(os.path.join(self.ckpt_dir, LATEST), os.path.basename(final) + "\n")
        if self.megatron_lm_tracker:  # Megatron-LM's tracker names the same newest complete iteration
            from megatron_align.convert.megatron_lm import TRACKER

            durable_write(os.path.join(self.ckpt_dir, TRACKER), f"{marker['step']}\n")
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
            try:
                self._queue.maybe_finalize_async_calls(blocking=blocking)
            except _WRITE_ERRORS as err:  # a background write failed: ENOSPC & co. become the storage verdict
                self._raise_storage(err)
                raise

    def close(self) -> None:
        self.finalize(blocking=True)
        if self._queue is not None:
            self._queue.close()

    # -- load ---------------------------------------------------------------------------------
    def load(self, path: str, sharded_state_dict: dict, load_model) -> dict:
        """Verify, load, and call ``load_model(state)`` (the model's ``load_state_dict``) in the same window in
        which Transformer Engine may unpickle its FP8 state (:func:`te_extra_state_unpickling`)."""
        with te_extra_state_unpickling(verify_before_load(path)):
            state = load_sharded(path, sharded_state_dict)
            load_model(state)
        return state
