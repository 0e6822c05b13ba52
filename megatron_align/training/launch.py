"""Start a training run: join a launcher or spawn local ranks, then assemble one rank (``megatron-align train``).

Under torchrun or inside an srun step this process *is* one rank and joins; otherwise it
spawns ``parallel.world_size`` copies of itself as ranks (:mod:`megatron_align.parallel.spawn`).
Each rank is assembled here: process groups, the callbacks the config asks for
(:func:`build_callbacks`, the one composition root), the trainer, and signal handling.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from megatron_align.config import RootConfig, load_config
from megatron_align.config.loader import config_to_yaml
from megatron_align.corpus.indexed import check_data_files
from megatron_align.errors import UserError
from megatron_align.fileio import atomic_write_text
from megatron_align.parallel.spawn import distributed_env, spawn_local
from megatron_align.resilience.protocol.exit_codes import EXIT_CHECKPOINT_LOAD, EXIT_OK, EXIT_STORAGE, EXIT_USER_ERROR
from megatron_align.training import run_lock
from megatron_align.training.callbacks import Callback

log = logging.getLogger("megatron_align")

class _RunLogHandler(logging.FileHandler):
    """train.log; when the disk refuses a write it says so once and drops out (the console keeps everything)."""

    def handleError(self, record: logging.LogRecord) -> None:
        print(f"megatron-align: cannot write {self.baseFilename} ({sys.exc_info()[1]}); logging to the console only",
              file=sys.stderr, flush=True)
        logging.getLogger().removeHandler(self)


def setup_logging(run_dir: str, rank: int, level: str) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.DEBUG)
    console = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    console.setFormatter(
        logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    )
    console.setLevel(getattr(logging, level) if rank == 0 else logging.WARNING)
    console.addFilter(lambda r: r.name.startswith("megatron_align") or r.levelno >= logging.WARNING)
    root.addHandler(console)
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        file_handler = _RunLogHandler(os.path.join(run_dir, "train.log"))
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        file_handler.setLevel(getattr(logging, level))
        root.addHandler(file_handler)


def build_callbacks(config: RootConfig) -> list[Callback]:
    """Every callback the run's config asks for. Each area owns its own ``build_callbacks``; the order they run
    in is each callback's ``priority`` (:class:`~megatron_align.training.callbacks.CallbackList` sorts them).

    Imported here, in the rank, not at module level: the process that only spawns ranks stays free of torch.
    """
    from megatron_align.eval import callback as eval_callbacks
    from megatron_align.resilience import inrank
    from megatron_align.tracking import callback as tracking_callbacks
    from megatron_align.training import heldout, profiling

    return [*profiling.build_callbacks(config), *inrank.build_callbacks(config), *heldout.build_callbacks(config),
            *eval_callbacks.build_callbacks(config),
            *tracking_callbacks.build_callbacks(config)]


def run_rank(config: RootConfig, rank: int, world_size: int, local_rank: int) -> int:
    """Body of one rank: init, train, clean shutdown. Returns the process exit code."""
    from megatron_align.parallel.init import destroy_distributed, init_distributed
    from megatron_align.training.trainer import Trainer

    lock = None
    try:
        # One run per run_dir: under torchrun/srun without a holding parent, rank 0 takes the lock before it
        # writes anything; ranks of a holder (standalone `train`, `launch`) check they still run under its lock.
        lock = run_lock.hold(config.run_dir, config.run_lock, "megatron-align train") if rank == 0 else None
        if rank != 0:
            run_lock.check_inherited(config.run_dir)
        setup_logging(config.run_dir, rank, config.logging.level)
        layout = init_distributed(config, rank, world_size, local_rank)
        if rank == 0:
            _write_config(config)
            log.info(
                "layout: TP=%d PP=%d CP=%d VPP=%s DP=%d on %d ranks",
                layout.tensor,
                layout.pipeline,
                layout.context,
                layout.virtual_pipeline or 1,
                layout.data,
                world_size,
            )
        trainer = Trainer(config, layout, callbacks=build_callbacks(config))
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, lambda signum, _f: trainer.stop(signal.Signals(signum).name))
        reason = trainer.train()
        if rank == 0:
            log.info("training %s at step %d; checkpoints in %s", reason, trainer.step, trainer.ckpt_dir)
        return trainer.exit_code if trainer.exit_code is not None else EXIT_OK  # a requested stop exits 0 too
    except Exception as err:
        return _failure_exit(config, rank, err)
    finally:
        destroy_distributed()
        if lock:
            lock.release()


def _failure_exit(config, rank: int, err: Exception) -> int:
    """The exit code (and the run-dir record) for a rank's failure the supervisor can act on; re-raises others."""
    from megatron_align.resilience.protocol import run_files, storage
    from megatron_align.training.checkpoint import CheckpointLoadError

    problem = err if isinstance(err, storage.StorageError) else storage.from_os_error(err, config.run_dir) \
        if storage.storage_errno(err) else None
    if problem is not None:
        print(f"megatron-align train: storage failure on rank {rank}: {problem}", file=sys.stderr, flush=True)
        storage.report_storage_failure(config.run_dir, rank, problem)
        return EXIT_STORAGE
    if isinstance(err, CheckpointLoadError):
        print(f"megatron-align train: error on rank {rank}: {err}", file=sys.stderr, flush=True)
        try:
            run_files.record_checkpoint_load_failure(config.run_dir, rank, err.path, str(err))
        except OSError:
            pass  # a full disk: stderr has it
        return EXIT_CHECKPOINT_LOAD
    if isinstance(err, UserError):
        print(f"megatron-align train: error on rank {rank}: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    raise err


def _write_config(config: RootConfig) -> None:
    os.makedirs(config.run_dir, exist_ok=True)
    atomic_write_text(os.path.join(config.run_dir, "config.yaml"), config_to_yaml(config))


def train(config_path: str, overrides: list[str]) -> int:
    """The ``train`` verb: this process is one rank under torchrun/srun, or it spawns ``parallel.world_size`` ranks
    (each re-running the verb); returns the exit code."""
    config = load_config(config_path, overrides)  # bad config fails here, before any process starts
    if config.checkpoint.load:  # from Megatron-LM: its model, in every rank (torch only when there is a load)
        from megatron_align.training.megatron_lm_state import adopt_model_config

        config = adopt_model_config(config)
    joined = distributed_env()
    if joined is not None and (joined[1] > 1 or config.parallel.world_size == 1):
        return run_rank(config, *joined)
    from megatron_align.parallel.layout import validate_layout

    validate_layout(config, config.parallel.world_size)
    check_data_files(config)  # damaged .idx/.bin fail here, naming the file, before any rank starts
    lock = run_lock.hold(config.run_dir, config.run_lock, "megatron-align train")  # held across the local ranks
    try:
        return spawn_local(["train", config_path, *overrides], config.parallel.world_size,
                           lock.env() if lock else None, abort=lock.lost_reason if lock else None)
    finally:
        if lock:
            lock.release()
