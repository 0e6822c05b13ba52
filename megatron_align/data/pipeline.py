"""`filter`, `tag` and `prepare` as datatrove pipelines: many tasks on one machine, a SLURM job array, or Ray.

What: ``--executor local|slurm|ray --tasks N [--workers M]`` runs the verb as a
datatrove pipeline of one step of ours (:class:`ShardStep`): task ``r`` of
``N`` processes input files ``r, r+N, r+2N, ...``, each into its own shard
under the work directory (:mod:`megatron_align.data.pipeline_shards`). When
all tasks are done, :class:`MergeStep` streams the shards, in input order,
into the outputs the single-process verb writes -- byte for byte the same,
whatever N, M or the executor. Without ``--executor`` the verb runs in this
process as before.

Resume: datatrove records each finished task (``WORK/logs/tasks-N/shards/
completions``) and skips it on a rerun; inside a task, a file whose shard is
finished (its marker written last) is not redone either, so a rerun -- also
with another ``--tasks`` -- redoes only unfinished work. The merge writes
under temporary names and publishes the manifest / report last, so a killed
run never leaves an output that looks complete.

SLURM: the shard step is submitted as a job array through datatrove's
``SlurmPipelineExecutor`` (``#SBATCH`` options from :class:`SlurmConfig`),
the merge as one job that depends on it (``afterok``); the command returns
after submitting. Ray: datatrove's ``RayPipelineExecutor`` on the cluster at
``ray.address`` (or ``RAY_ADDRESS``), else on a local Ray started for the run
and stopped after it (:mod:`megatron_align.data.pipeline_ray`); the merge runs
in this process once every task is done.

Progress (local, ray): this process shows the one progress display of the
data verbs (:class:`~megatron_align.data.sources.Progress`) over finished
files -- a file is a task's unit of work -- polled from the shard markers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron_align.data.pipeline_shards import VERBS
from megatron_align.data.sources import Progress, expand_inputs
from megatron_align.errors import ConfigError, UserError
from megatron_align.optional import require

EXECUTORS = ("none", "local", "slurm", "ray")


@dataclass
class SlurmConfig:
    """SLURM options of a pipeline's job array (config key ``slurm:``; flags override)."""

    partition: Optional[str] = None
    """Partition of the array and the merge job; None = the cluster's default partition."""
    time: str = "24:00:00"
    """Time limit of one task (one array element): enough for its share of the files."""
    cpus_per_task: int = 1
    """CPUs per task. A task is one process: more tasks, not more CPUs per task, use more cores."""
    mem_per_cpu_gb: Optional[int] = None
    """Memory per CPU (GB); None = the partition's default."""
    account: Optional[str] = None
    """``#SBATCH --account``."""
    qos: Optional[str] = None
    """``#SBATCH --qos``; None = none given."""
    job_name: Optional[str] = None
    """Job name; None = ``megatron-align-<verb>``."""
    srun_args: str = ""
    """Options of the ``srun`` that starts each task, e.g. ``--container-image=IMG --container-mounts=/data:/data``."""
    env_command: Optional[str] = None
    """Shell line run before each task (e.g. ``module load ...; source venv/bin/activate``); None = activate this
    Python's virtual environment when it is one."""
    max_array_size: int = 1001
    """Largest array the cluster accepts (``MaxArraySize - 1``); more tasks are submitted as several arrays."""

    def __post_init__(self) -> None:
        if self.cpus_per_task < 1:
            raise ConfigError(f"slurm.cpus_per_task={self.cpus_per_task}: must be >= 1")
        if self.mem_per_cpu_gb is not None and self.mem_per_cpu_gb < 1:
            raise ConfigError(f"slurm.mem_per_cpu_gb={self.mem_per_cpu_gb}: must be >= 1")
        if self.max_array_size < 1:
            raise ConfigError(f"slurm.max_array_size={self.max_array_size}: must be >= 1")
        for token in shlex.split(self.srun_args):
            if not token.startswith("--") or "=" not in token:
                raise ConfigError(f"slurm.srun_args: {token!r} is not of the form --option=value")

    def srun_dict(self) -> dict[str, str]:
        return dict(token[2:].split("=", 1) for token in shlex.split(self.srun_args))


@dataclass
class RayConfig:
    """Ray options of a pipeline (config key ``ray:``; flags override)."""

    address: Optional[str] = None
    """A running Ray cluster (``HOST:PORT``, ``ray://HOST:10001`` or ``auto``); None = ``$RAY_ADDRESS``, else a
    local Ray is started for the run (and stopped after it). A cluster's nodes need this package installed and the
    work directory mounted."""
    cpus_per_task: int = 1
    """CPUs Ray reserves per task. A task is one process: more tasks, not more CPUs per task, use more cores."""
    mem_per_cpu_gb: Optional[float] = None
    """Memory Ray reserves per CPU (GB); None = no reservation (datatrove would reserve 2 GB, which a small node
    cannot schedule many of)."""
    num_cpus: Optional[int] = None
    """CPUs of the local Ray; None = ``cpus_per_task`` x the tasks run at once (``--workers``, else all tasks, at most
    this machine's cores). Ignored with an address."""
    object_store_mb: int = 256
    """Shared-memory object store of the local Ray (``/dev/shm``); the pipeline passes only its plan through it."""
    start_timeout_s: int = 120
    """How long the local Ray waits for its agent and task processes to start (``RAY_agent_register_timeout_ms``,
    ``RAY_worker_register_timeout_seconds``); on a loaded machine they take longer than Ray's defaults and the node
    dies ("timed out during startup")."""

    def __post_init__(self) -> None:
        if self.cpus_per_task < 1:
            raise ConfigError(f"ray.cpus_per_task={self.cpus_per_task}: must be >= 1")
        if self.mem_per_cpu_gb is not None and self.mem_per_cpu_gb <= 0:
            raise ConfigError(f"ray.mem_per_cpu_gb={self.mem_per_cpu_gb}: must be > 0")
        if self.num_cpus is not None and self.num_cpus < self.cpus_per_task:
            raise ConfigError(f"ray.num_cpus={self.num_cpus}: must be >= ray.cpus_per_task={self.cpus_per_task}, or no "
                              "task can ever be scheduled")
        if self.object_store_mb < 80:
            raise ConfigError(f"ray.object_store_mb={self.object_store_mb}: Ray needs at least 80")
        if self.start_timeout_s < 1:
            raise ConfigError(f"ray.start_timeout_s={self.start_timeout_s}: must be >= 1")


@dataclass
class PipelineConfig:
    """How a data verb runs: in this process, or as a datatrove pipeline."""

    executor: str = "none"
    """none (this process, as always) | local (datatrove tasks on this machine) | slurm (job array) | ray."""
    tasks: int = 1
    """Tasks the input files are split into (file i goes to task i mod tasks)."""
    workers: int = -1
    """Tasks running at once (local: processes; slurm: array throttle ``%M``); -1 = all."""
    work_dir: Optional[str] = None
    """Shards, datatrove logs and completion records; on a filesystem every task can reach. None = next to
    the output."""
    keep_work: bool = False
    """Keep the shards after a successful merge (else the work directory is removed)."""
    progress: bool = False
    """Show finished input (bytes, documents, rates) on stderr while the tasks run (local, ray)."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ConfigError(f"--executor={self.executor!r}: expected one of {', '.join(EXECUTORS)}")
        if self.tasks < 1:
            raise ConfigError(f"--tasks={self.tasks}: must be >= 1")
        if self.workers == 0 or self.workers < -1:
            raise ConfigError(f"--workers={self.workers}: must be >= 1 (or -1 for all tasks at once)")


def shard_prefix(work_dir: str, index: int) -> str:
    return os.path.join(work_dir, "shards", f"{index:07d}")


def _json_default(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else str(obj)


def merge(verb: str, files: list[str], work_dir: str, params: dict, keep_work: bool) -> dict:
    """Merge the finished shards of ``work_dir`` into the verb's outputs (refused while any is unfinished)."""
    _, marker, merge_fn = VERBS[verb]
    shards = [shard_prefix(work_dir, i) for i in range(len(files))]
    missing = [f for f, s in zip(files, shards) if not os.path.exists(s + marker)]
    if missing:
        raise UserError(f"{verb}: {len(missing)} of {len(files)} input files have no finished shard in {work_dir} "
                        f"(first: {missing[0]}); run the same command again: only unfinished work is redone")
    result = merge_fn(files, shards, params)
    if not keep_work:  # shards, plan and completion records; the logs stay (a SLURM merge job still writes its own)
        os.remove(os.path.join(work_dir, "plan.json"))
        shutil.rmtree(os.path.join(work_dir, "shards"), ignore_errors=True)
        for completions in glob.glob(os.path.join(work_dir, "logs", "tasks-*", "shards", "completions")):
            shutil.rmtree(completions, ignore_errors=True)
    return result


def _prepare_work_dir(verb: str, files: list[str], params: dict, work_dir: str) -> None:
    """Create ``work_dir``; refuse one that holds shards of other inputs or settings."""
    plan = {"verb": verb, "files": [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files],
            "params": json.loads(json.dumps(params, default=_json_default, sort_keys=True))}
    path = os.path.join(work_dir, "plan.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if json.load(f) != plan:
                raise UserError(f"{work_dir}: holds shards of another run (inputs or settings differ); remove it or "
                                "pass another --work-dir")
        return
    os.makedirs(os.path.join(work_dir, "shards"), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(plan, f, indent=1)
    os.replace(tmp, path)


def _default_partition() -> str:
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=False).stdout.split()
    default = [p.rstrip("*") for p in out if p.endswith("*")] or [p for p in out]
    if not default:
        raise UserError("--executor slurm: sinfo lists no partition; pass --partition")
    return default[0]


def _slurm_executors(verb: str, pc: PipelineConfig, shard_step, merge_step, logs: str):
    from megatron_align.data.pipeline_steps import SlurmExecutor

    s = pc.slurm
    venv_activate = os.path.join(sys.prefix, "bin", "activate")
    env = s.env_command if s.env_command is not None else (
        f"source {venv_activate}" if sys.prefix != sys.base_prefix and os.path.exists(venv_activate) else "")
    common = dict(time=s.time, partition=s.partition or _default_partition(), mem_per_cpu_gb=s.mem_per_cpu_gb,
                  qos=s.qos or "", env_command=env or None, sbatch_args={"account": s.account} if s.account else None,
                  srun_args=s.srun_dict() or None, max_array_size=s.max_array_size, requeue=False)
    name = s.job_name or f"megatron-align-{verb}"
    shards = SlurmExecutor([shard_step], tasks=pc.tasks, workers=pc.workers, cpus_per_task=s.cpus_per_task,
                                   job_name=name, logging_dir=os.path.join(logs, "shards"), **common)
    merged = SlurmExecutor([merge_step], tasks=1, cpus_per_task=1, job_name=f"{name}-merge", depends=shards,
                                   logging_dir=os.path.join(logs, "merge"), skip_completed=False, **common)
    return shards, merged


class _ShardProgress:
    """The progress display while the tasks run: input bytes, documents (and tokens) of the finished files, read
    from the shard markers every ``interval_s`` by a thread of this process."""

    def __init__(self, verb: str, files: list[str], work_dir: str, enabled: bool, interval_s: float = 2.0) -> None:
        self.marker = VERBS[verb][1]
        self.sizes = [os.path.getsize(f) for f in files]
        self.shards = [shard_prefix(work_dir, i) for i in range(len(files))]
        self.bar = Progress(sum(self.sizes), f"{verb} ({len(files)} files)", enabled, tokens=verb == "prepare")
        self.counts: dict[int, tuple[int, int]] = {}  # file index -> (documents, tokens) of its finished shard
        self.enabled, self.interval_s = enabled, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="pipeline-progress", daemon=True)

    def poll(self) -> None:
        for index, shard in enumerate(self.shards):
            if index not in self.counts and os.path.exists(shard + self.marker):
                with open(shard + self.marker, encoding="utf-8") as f:
                    marker = json.load(f)
                self.counts[index] = (marker["documents"], marker.get("tokens", 0))
        self.bar.update(sum(self.sizes[i] for i in self.counts), *map(sum, zip((0, 0), *self.counts.values())))

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def __enter__(self) -> "_ShardProgress":
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.enabled:
            return
        self._stop.set()
        self._thread.join()
        self.poll()
        documents, tokens = map(sum, zip((0, 0), *self.counts.values()))
        self.bar.close(documents, tokens, failed=exc_type is not None or len(self.counts) < len(self.shards))


def threads_per_task(pc: PipelineConfig, cpus: int | None = None) -> int:
    """CPUs one task may use: what SLURM or Ray reserves for it, else this machine's cores over the tasks run at once."""
    if pc.executor == "slurm":
        return pc.slurm.cpus_per_task
    if pc.executor == "ray":
        return pc.ray.cpus_per_task
    at_once = pc.tasks if pc.workers == -1 else min(pc.workers, pc.tasks)
    return max(1, (cpus or os.cpu_count() or 1) // max(1, at_once))


def run_pipeline(verb: str, inputs: list[str], params: dict, pc: PipelineConfig, default_work_dir: str) -> dict:
    """Run ``verb`` as a datatrove pipeline; returns the merged result (slurm: the submitted job ids)."""
    files = expand_inputs(inputs)
    work_dir = os.path.abspath(pc.work_dir or default_work_dir)
    require("datatrove", "--executor local|slurm|ray (pip install datatrove)")
    from megatron_align.data.pipeline_steps import MergeStep, ShardStep

    _prepare_work_dir(verb, files, params, work_dir)
    shard_step = ShardStep(verb, files, work_dir, params, threads=threads_per_task(pc))
    logs = os.path.join(work_dir, "logs", f"tasks-{pc.tasks}")  # completions are per task count
    if pc.executor == "slurm":
        shards, merged = _slurm_executors(verb, pc, shard_step, MergeStep(verb, files, work_dir, params, pc.keep_work), logs)
        merged.run()
        return {"submitted": True, "job_ids": [shards.job_id, merged.job_id], "work_dir": work_dir,
                "logs": logs}
    if pc.executor == "ray":
        from megatron_align.data.pipeline_ray import ray_session

        session = ray_session(pc.ray, pc.tasks, pc.workers)
    else:
        session = contextlib.nullcontext()
    with session:
        if pc.executor == "ray":
            from datatrove.executor.ray import RayPipelineExecutor

            executor = RayPipelineExecutor(
                [shard_step], tasks=pc.tasks, workers=pc.workers, logging_dir=os.path.join(logs, "shards"),
                cpus_per_task=pc.ray.cpus_per_task, mem_per_cpu_gb=pc.ray.mem_per_cpu_gb or 0)
        else:
            from datatrove.executor import LocalPipelineExecutor

            executor = LocalPipelineExecutor([shard_step], tasks=pc.tasks, workers=pc.workers,
                                             logging_dir=os.path.join(logs, "shards"))
        with _ShardProgress(verb, files, work_dir, pc.progress):
            try:
                executor.run()
            except UserError:
                raise
            except Exception as err:  # a task failed: its message, and how to go on
                raise UserError(f"{verb}: a pipeline task failed: {err} (task logs: {logs}/shards/logs); fix it and "
                                "run the same command again: finished tasks and files are kept") from err
    failed = executor.get_incomplete_ranks(range(pc.tasks), skip_completed=True)
    if failed:  # datatrove's Ray executor logs a failed task and returns
        raise UserError(f"{verb}: {len(failed)} of {pc.tasks} pipeline tasks did not finish (first: task {failed[0]}, "
                        f"log {logs}/shards/logs/task_{failed[0]:05d}.log); fix it and run the same command again: "
                        "finished tasks and files are kept")
    result = merge(verb, files, work_dir, params, pc.keep_work)
    if not pc.keep_work:
        shutil.rmtree(work_dir, ignore_errors=True)
    return result


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="progress (bytes, documents, rates) on stderr")
    g = parser.add_argument_group("pipeline (datatrove): run across processes, a SLURM job array or Ray")
    g.add_argument("--executor", choices=EXECUTORS, default="none",
                   help="none: this process (default) | local | slurm | ray: a datatrove pipeline of --tasks tasks")
    g.add_argument("--tasks", type=int, default=1, help="pipeline tasks; input file i goes to task i mod N")
    g.add_argument("--work-dir", default=None, help="shards and completion records (default: next to the output)")
    g.add_argument("--keep-work", action="store_true", help="keep the shards after the merge")
    g.add_argument("--executor-config", "--slurm-config", dest="executor_config", default=None,
                   help="YAML file with `slurm:` and/or `ray:` mappings (SlurmConfig / RayConfig keys)")
    for key, kind in (("partition", str), ("time", str), ("account", str), ("qos", str), ("job-name", str),
                      ("srun-args", str), ("env-command", str)):
        g.add_argument(f"--{key}", type=kind, default=None, help=f"slurm.{key.replace('-', '_')}")
    g.add_argument("--cpus-per-task", type=int, default=None, help="slurm.cpus_per_task / ray.cpus_per_task")
    g.add_argument("--mem-per-cpu-gb", type=int, default=None, help="slurm.mem_per_cpu_gb / ray.mem_per_cpu_gb")
    g.add_argument("--ray-address", default=None, help="ray.address: a running Ray cluster (default: $RAY_ADDRESS, "
                   "else a local Ray for the run)")
    g.add_argument("--ray-num-cpus", type=int, default=None, help="ray.num_cpus of the local Ray")


def report_submitted(result: dict) -> None:
    print(f"submitted SLURM jobs {result['job_ids'][0]} (array) and {result['job_ids'][-1]} (merge, afterok); "
          f"outputs appear when the merge job ends; logs: {result['logs']}; rerun the same command to resume")


def _section(loaded: dict, name: str, config_cls, path: str) -> dict[str, Any]:
    section = dict(loaded.get(name) or {})
    unknown = set(section) - {f.name for f in dataclasses.fields(config_cls)}
    if unknown:
        raise ConfigError(f"{path}: unknown {name} keys {sorted(unknown)}")
    return section


def config_from_args(args: argparse.Namespace, workers: int) -> PipelineConfig:
    slurm: dict[str, Any] = {}
    ray: dict[str, Any] = {}
    if args.executor_config:
        import yaml

        with open(args.executor_config, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{args.executor_config}: expected a mapping with `slurm:` and/or `ray:`")
        if not {"slurm", "ray"} & set(loaded):  # a bare mapping is the slurm section
            loaded = {"slurm": loaded}
        unknown = set(loaded) - {"slurm", "ray"}
        if unknown:
            raise ConfigError(f"{args.executor_config}: unknown sections {sorted(unknown)} (expected slurm, ray)")
        slurm = _section(loaded, "slurm", SlurmConfig, args.executor_config)
        ray = _section(loaded, "ray", RayConfig, args.executor_config)
    for section, config_cls in ((slurm, SlurmConfig), (ray, RayConfig)):
        for f in dataclasses.fields(config_cls):
            value = getattr(args, f.name, None)
            if value is not None:
                section[f.name] = value
    if args.ray_address is not None:
        ray["address"] = args.ray_address
    if args.ray_num_cpus is not None:
        ray["num_cpus"] = args.ray_num_cpus
    return PipelineConfig(executor=args.executor, tasks=args.tasks, workers=workers, work_dir=args.work_dir,
                          keep_work=args.keep_work, progress=args.progress, slurm=SlurmConfig(**slurm),
                          ray=RayConfig(**ray))
