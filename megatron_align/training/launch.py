"""`megatron-align train CONFIG.yaml [key=value ...]`: join a launcher or spawn local ranks.

Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or inside an srun step
(SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID) this process *is* one rank and joins.
Otherwise it spawns ``parallel.world_size`` copies of itself as ranks, watches
them, and tears all of them down as soon as one fails (exit code of the first
failure is returned), so no rank is left hanging in a collective. Ranks die
with the launcher (PR_SET_PDEATHSIG), so a killed launcher leaves no orphans.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time

from megatron_align.config import load_config
from megatron_align.config.loader import config_to_yaml
from megatron_align.errors import UserError
from megatron_align.resilience.exit_codes import EXIT_CHECKPOINT_LOAD, record_checkpoint_load_failure
from megatron_align.training.checkpoint_files import CheckpointLoadError

log = logging.getLogger("megatron_align")

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_STOPPED = 0  # a requested stop (signal) that checkpointed; issue-4 supervisor refines codes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=100 parallel.tensor=2")


def distributed_env(environ=os.environ) -> tuple[int, int, int] | None:
    """(rank, world_size, local_rank) when started by torchrun or inside an srun step, else None."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ and "SLURM_NTASKS" in environ:
        return int(environ["SLURM_PROCID"]), int(environ["SLURM_NTASKS"]), int(environ.get("SLURM_LOCALID", 0))
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn_local(argv: list[str], world_size: int, env_extra: dict | None = None) -> int:
    """Start ``world_size`` ranks of ``megatron-align <argv>`` on this machine; return the job's exit code."""
    port = _free_port()
    procs: list[subprocess.Popen] = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **(env_extra or {}))
        # Own session per rank: teardown kills the rank's whole process group, including helper processes it
        # spawned (e.g. checkpoint writer workers), which would otherwise outlive a SIGKILLed rank.
        procs.append(subprocess.Popen([sys.executable, "-m", "megatron_align.cli", *argv], env=env,
                                      preexec_fn=_die_with_parent, start_new_session=True))

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                rank, code = failed[0]
                print(f"megatron-align: rank {rank} exited with code {code}; stopping the other ranks", file=sys.stderr)
                _terminate(procs)
                return code if code > 0 else 128 - code  # negative = killed by signal
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    finally:
        _terminate(procs)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _terminate(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """SIGTERM every rank's process group, wait up to ``grace_s``, then SIGKILL what is left of each group."""
    for p in procs:
        _signal_group(p, signal.SIGTERM)
    deadline = time.time() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        _signal_group(p, signal.SIGKILL)  # the group may outlive its leader
        p.wait()


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
        file_handler = logging.FileHandler(os.path.join(run_dir, "train.log"))
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        file_handler.setLevel(getattr(logging, level))
        root.addHandler(file_handler)


def run_rank(config, rank: int, world_size: int, local_rank: int) -> int:
    """Body of one rank: init, train, clean shutdown. Returns the process exit code."""
    from megatron_align.parallel.init import destroy_distributed, init_distributed
    from megatron_align.training.callbacks import build_callbacks
    from megatron_align.training.trainer import Trainer

    setup_logging(config.run_dir, rank, config.logging.level)
    try:
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
    except CheckpointLoadError as err:
        print(f"megatron-align train: error on rank {rank}: {err}", file=sys.stderr)
        record_checkpoint_load_failure(config.run_dir, rank, err.path, str(err))
        return EXIT_CHECKPOINT_LOAD
    except UserError as err:
        print(f"megatron-align train: error on rank {rank}: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        destroy_distributed()


def _write_config(config) -> None:
    os.makedirs(config.run_dir, exist_ok=True)
    path = os.path.join(config.run_dir, "config.yaml")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config_to_yaml(config))
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)  # bad config fails here, before any process starts
    joined = distributed_env()
    if joined is not None and (joined[1] > 1 or config.parallel.world_size == 1):
        return run_rank(config, *joined)
    from megatron_align.parallel.layout import validate_layout

    validate_layout(config, config.parallel.world_size)
    return spawn_local(["train", args.config, *args.overrides], config.parallel.world_size)
