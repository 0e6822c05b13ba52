"""The corpus verbs as datatrove pipelines: many tasks on one machine, a SLURM job array, or Ray.

What: a verb hands :func:`run_pipeline` a :class:`Job` -- its per-file shard function and its merge -- and the
runner (which knows no verb) runs it as a datatrove pipeline of one step (:class:`ShardStep`): task ``r`` of ``N``
processes input files ``r, r+N, r+2N, ...``, each into its own shard under the work directory. When all tasks are
done, :class:`MergeStep` calls the job's merge, which streams the shards, in input order, into the outputs the
single-process verb writes -- byte for byte the same, whatever N, M or the executor.

Resume: datatrove records each finished task (``WORK/logs/tasks-N/shards/completions``) and skips it on a rerun;
inside a task, a file whose shard is finished (its marker written last) is not redone either, so a rerun -- also
with another ``--tasks`` -- redoes only unfinished work. The merge writes under temporary names and publishes the
manifest / report last, so a killed run never leaves an output that looks complete.

SLURM: the shard step is submitted as a job array through datatrove's ``SlurmPipelineExecutor`` (``#SBATCH``
options from :class:`~megatron_align.config.corpus.PipelineSlurmConfig`), the merge as one job that depends on it
(``afterok``); the command returns after submitting. Ray: datatrove's ``RayPipelineExecutor`` on the cluster at
``ray.address`` (or ``RAY_ADDRESS``), else on a local Ray started for the run and stopped after it
(:mod:`megatron_align.corpus.pipeline_ray`); the merge runs in this process once every task is done.

Progress (local, ray): this process shows the one progress display of the corpus verbs
(:class:`~megatron_align.corpus.sources.Progress`) over finished files -- a file is a task's unit of work --
polled from the shard markers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
from typing import Any

from megatron_align.config.corpus import PipelineConfig
from megatron_align.corpus.job import Job, merge, shard_prefix
from megatron_align.corpus.sources import Progress, expand_inputs
from megatron_align.errors import UserError
from megatron_align.fileio import atomic_write_json
from megatron_align.optional import require


def _json_default(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else str(obj)


def _prepare_work_dir(job: Job, files: list[str], work_dir: str) -> None:
    """Create ``work_dir``; refuse one that holds shards of other inputs or settings."""
    plan = {"verb": job.name,
            "files": [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in files],
            "params": json.loads(json.dumps(job.params, default=_json_default, sort_keys=True))}
    path = os.path.join(work_dir, "plan.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if json.load(f) != plan:
                raise UserError(f"{work_dir}: holds shards of another run (inputs or settings differ); remove it or "
                                "pass another --work-dir")
        return
    os.makedirs(os.path.join(work_dir, "shards"), exist_ok=True)
    atomic_write_json(path, plan, indent=1)


def _default_partition() -> str:
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=False).stdout.split()
    default = [p.rstrip("*") for p in out if p.endswith("*")] or [p for p in out]
    if not default:
        raise UserError("--executor slurm: sinfo lists no partition; pass --partition")
    return default[0]


def _slurm_executors(verb: str, pc: PipelineConfig, shard_step, merge_step, logs: str):
    from megatron_align.corpus.pipeline_steps import SlurmExecutor

    s = pc.slurm
    venv_activate = os.path.join(sys.prefix, "bin", "activate")
    env = s.env_command if s.env_command is not None else (
        f"source {venv_activate}" if sys.prefix != sys.base_prefix and os.path.exists(venv_activate) else "")
    account = {"account": s.account} if s.account else {}
    gres = {"gres": f"gpu:{s.gpus_per_task}"} if s.gpus_per_task else {}  # the tasks only, not the merge
    common = dict(time=s.time, partition=s.partition or _default_partition(), mem_per_cpu_gb=s.mem_per_cpu_gb,
                  qos=s.qos or "", env_command=env or None, srun_args=s.srun_dict() or None,
                  max_array_size=s.max_array_size, requeue=False)
    name = s.job_name or f"megatron-align-{verb}"
    shards = SlurmExecutor([shard_step], tasks=pc.tasks, workers=pc.workers, cpus_per_task=s.cpus_per_task,
                           job_name=name, logging_dir=os.path.join(logs, "shards"),
                           sbatch_args={**account, **gres} or None, **common)
    merged = SlurmExecutor([merge_step], tasks=1, cpus_per_task=1, job_name=f"{name}-merge", depends=shards,
                           logging_dir=os.path.join(logs, "merge"), skip_completed=False,
                           sbatch_args=account or None, **common)
    return shards, merged


class _ShardProgress:
    """The progress display while the tasks run: input bytes, documents (and tokens) of the finished files, read
    from the shard markers every ``interval_s`` by a thread of this process."""

    def __init__(self, job: Job, files: list[str], work_dir: str, enabled: bool, interval_s: float = 2.0) -> None:
        self.marker = job.marker
        self.sizes = [os.path.getsize(f) for f in files]
        self.shards = [shard_prefix(work_dir, i) for i in range(len(files))]
        self.bar = Progress(sum(self.sizes), f"{job.name} ({len(files)} files)", enabled, tokens=job.tokens)
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

    def __enter__(self) -> _ShardProgress:
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
    """CPUs one task may use: what SLURM or Ray reserves for it, else this machine's cores over the tasks
    run at once."""
    if pc.executor == "slurm":
        return pc.slurm.cpus_per_task
    if pc.executor == "ray":
        return pc.ray.cpus_per_task
    at_once = pc.tasks if pc.workers == -1 else min(pc.workers, pc.tasks)
    return max(1, (cpus or os.cpu_count() or 1) // max(1, at_once))


def task_logs(work_dir: str, tasks: int) -> str:
    """Where datatrove keeps a pipeline's completion records and task logs: per task count (a rerun with another
    --tasks starts its own records)."""
    return os.path.join(os.path.abspath(work_dir), "logs", f"tasks-{tasks}")


def run_tasks(name: str, pc: PipelineConfig, step, merge_step, logs: str,
              watch: contextlib.AbstractContextManager | None = None) -> dict | None:
    """Run the datatrove ``step`` as ``pc.tasks`` tasks (completion records under ``logs``).

    slurm: submits the step as a job array and ``merge_step`` as one job after it (``afterok``); returns the
    submission. local / ray: runs the tasks here, ``watch`` (a progress display) around them, and returns None once
    every task finished; the caller merges in this process. A failed task is a :class:`UserError` naming its log.
    """
    if pc.executor == "slurm":
        tasks, merged = _slurm_executors(name, pc, step, merge_step, logs)
        merged.run()
        return {"submitted": True, "job_ids": [tasks.job_id, merged.job_id], "logs": logs}
    if pc.executor == "ray":
        from megatron_align.corpus.pipeline_ray import ray_session

        session = ray_session(pc.ray, pc.tasks, pc.workers)
    else:
        session = contextlib.nullcontext()
    with session:
        if pc.executor == "ray":
            from datatrove.executor.ray import RayPipelineExecutor

            executor = RayPipelineExecutor(
                [step], tasks=pc.tasks, workers=pc.workers, logging_dir=os.path.join(logs, "shards"),
                cpus_per_task=pc.ray.cpus_per_task, mem_per_cpu_gb=pc.ray.mem_per_cpu_gb or 0)
        else:
            from datatrove.executor import LocalPipelineExecutor

            executor = LocalPipelineExecutor([step], tasks=pc.tasks, workers=pc.workers,
                                             logging_dir=os.path.join(logs, "shards"))
        with watch or contextlib.nullcontext():
            try:
                executor.run()
            except UserError:
                raise
            except Exception as err:  # a task failed: its message, and how to go on
                raise UserError(f"{name}: a pipeline task failed: {err} (task logs: {logs}/shards/logs); fix it "
                                "and run the same command again: finished tasks are kept") from err
    failed = executor.get_incomplete_ranks(range(pc.tasks), skip_completed=True)
    if failed:  # datatrove's Ray executor logs a failed task and returns
        raise UserError(f"{name}: {len(failed)} of {pc.tasks} pipeline tasks did not finish (first: task "
                        f"{failed[0]}, log {logs}/shards/logs/task_{failed[0]:05d}.log); fix it and run the same "
                        "command again: finished tasks are kept")
    return None


def run_pipeline(job: Job, inputs: list[str], pc: PipelineConfig, default_work_dir: str) -> dict:
    """Run ``job`` as a datatrove pipeline; returns the merged result (slurm: the submitted job ids)."""
    files = expand_inputs(inputs)
    work_dir = os.path.abspath(pc.work_dir or default_work_dir)
    require("datatrove", "--executor local|slurm|ray (pip install datatrove)")
    from megatron_align.corpus.pipeline_steps import MergeStep, ShardStep

    _prepare_work_dir(job, files, work_dir)
    shard_step = ShardStep(job, files, work_dir, threads=threads_per_task(pc))
    logs = task_logs(work_dir, pc.tasks)
    submitted = run_tasks(job.name, pc, shard_step, MergeStep(job, files, work_dir, pc.keep_work), logs,
                          _ShardProgress(job, files, work_dir, pc.progress) if pc.executor != "slurm" else None)
    if submitted is not None:
        return {**submitted, "work_dir": work_dir}
    result = merge(job, files, work_dir, pc.keep_work)
    if not pc.keep_work:
        shutil.rmtree(work_dir, ignore_errors=True)
    return result
