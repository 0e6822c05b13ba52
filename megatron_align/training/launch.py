"""`megatron-align train CONFIG.yaml [key=value ...]`: join a launcher or spawn local ranks, then assemble one rank.

Under torchrun or inside an srun step this process *is* one rank and joins; otherwise it
spawns ``parallel.world_size`` copies of itself as ranks (:mod:`megatron_align.parallel.spawn`).
Each rank is assembled here: process groups, the callbacks the config asks for
(:func:`build_callbacks`, the one composition root), the trainer, and signal handling.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from megatron_align.config import load_config
from megatron_align.config.loader import config_to_yaml
from megatron_align.config.schema import RootConfig
from megatron_align.data.indexed_check import check_data_files
from megatron_align.errors import UserError
from megatron_align.parallel.spawn import distributed_env, spawn_local
from megatron_align.training.callbacks import Callback

log = logging.getLogger("megatron_align")

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_STOPPED = 0  # a requested stop (signal) that checkpointed; issue-4 supervisor refines codes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100 parallel.tensor=2")


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
    console.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(levelname)s %(name)s: %(message)s"))
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
    """Every callback the run's config asks for. Each area owns its own ``build_callbacks``.

    Imported here, in the rank, not at module level: the process that only spawns ranks stays free of torch.
    """
    from megatron_align.eval import callback as eval_callbacks
    from megatron_align.resilience import inrank
    from megatron_align.tracking import callback as tracking_callbacks
    from megatron_align.training import heldout

    # Tracking last: it logs the record after every other callback has added its keys.
    return [*inrank.build_callbacks(config), *heldout.build_callbacks(config), *eval_callbacks.build_callbacks(config),
            *tracking_callbacks.build_callbacks(config)]


def run_rank(config: RootConfig, rank: int, world_size: int, local_rank: int) -> int:
    """Body of one rank: init, train, clean shutdown. Returns the process exit code."""
    from megatron_align.parallel.init import destroy_distributed, init_distributed
    from megatron_align.training.trainer import Trainer

    try:
        setup_logging(config.run_dir, rank, config.logging.level)
        layout = init_distributed(config, rank, world_size, local_rank)
        if rank == 0:
            _write_config(config)
            log.info("layout: TP=%d PP=%d CP=%d VPP=%s DP=%d on %d ranks", layout.tensor, layout.pipeline, layout.context,
                     layout.virtual_pipeline or 1, layout.data, world_size)
        trainer = Trainer(config, layout, callbacks=build_callbacks(config))
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, lambda signum, _f: trainer.request_stop(signal.Signals(signum).name))
        reason = trainer.train()
        if rank == 0:
            log.info("training %s at step %d; checkpoints in %s", reason, trainer.step, trainer.ckpt_dir)
        return trainer.exit_code if trainer.exit_code is not None else EXIT_STOPPED if reason.startswith("stop") else EXIT_OK
    except Exception as err:
        return _failure_exit(config, rank, err)
    finally:
        destroy_distributed()


def _failure_exit(config, rank: int, err: Exception) -> int:
    """The exit code (and the run-dir record) for a rank's failure the supervisor can act on; re-raises others."""
    from megatron_align.resilience import exit_codes, storage
    from megatron_align.training.checkpoint import CheckpointLoadError

    problem = err if isinstance(err, storage.StorageError) else storage.from_os_error(err, config.run_dir) \
        if storage.storage_errno(err) else None
    if problem is not None:
        print(f"megatron-align train: storage failure on rank {rank}: {problem}", file=sys.stderr, flush=True)
        storage.report_storage_failure(config.run_dir, rank, problem)
        return exit_codes.EXIT_STORAGE
    if isinstance(err, CheckpointLoadError):
        print(f"megatron-align train: error on rank {rank}: {err}", file=sys.stderr, flush=True)
        try:
            exit_codes.record_checkpoint_load_failure(config.run_dir, rank, err.path, str(err))
        except OSError:
            pass  # a full disk: stderr has it
        return exit_codes.EXIT_CHECKPOINT_LOAD
    if isinstance(err, UserError):
        print(f"megatron-align train: error on rank {rank}: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    raise err


def _write_config(config: RootConfig) -> None:
    os.makedirs(config.run_dir, exist_ok=True)
    path = os.path.join(config.run_dir, "config.yaml")
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(config_to_yaml(config))
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)  # bad config fails here, before any process starts
    joined = distributed_env()
    if joined is not None and (joined[1] > 1 or config.parallel.world_size == 1):
        return run_rank(config, *joined)
    from megatron_align.parallel.layout import validate_layout

    validate_layout(config, config.parallel.world_size)
    check_data_files(config)  # damaged .idx/.bin fail here, naming the file, before any rank starts
    return spawn_local(["train", args.config, *args.overrides], config.parallel.world_size)
