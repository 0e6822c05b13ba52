"""The datatrove side of the corpus pipelines: our PipelineStep subclasses and the SLURM executor we submit with.

Imported only when a verb runs with ``--executor`` (datatrove's executors are slow to import). The steps call the
:class:`~megatron_align.corpus.pipeline.Job`'s shard and merge functions for the work itself; the executors pickle
them (dill) into each task, so they live at module level here.
"""

from __future__ import annotations

import json
import os

from datatrove.executor.slurm import SlurmPipelineExecutor
from datatrove.pipeline.base import PipelineStep

from megatron_align.corpus.job import Job, merge, shard_prefix


class SlurmExecutor(SlurmPipelineExecutor):
    """datatrove's SLURM executor, without a memory request when none is configured (the partition's default
    applies; datatrove always asks for one, which a cluster without configured node memory refuses), and
    without datatrove's extra stats-merging job (the merge job of this pipeline is the one that matters)."""

    def get_sbatch_args(self, max_array: int = 1) -> dict:
        args = super().get_sbatch_args(max_array)
        if self.mem_per_cpu_gb is None:
            args.pop("mem-per-cpu", None)
        return args

    def launch_merge_stats(self) -> None:
        return None


class ShardStep(PipelineStep):
    """Task ``rank`` of ``world_size``: files rank, rank+world_size, ... -> finished shards."""

    name = "megatron-align shards"
    type = "megatron-align"

    def __init__(self, job: Job, files: list[str], work_dir: str, threads: int = 1) -> None:
        super().__init__()
        self.job, self.files, self.work_dir = job, files, work_dir
        self.threads = threads
        """Threads of HF tokenizers' pool in this task (the CPUs it has): tasks running side by side would
        otherwise start one pool thread per core of the machine each."""

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        os.environ.setdefault("RAYON_NUM_THREADS", str(self.threads))  # read when the pool starts; a user's wins
        for index in range(rank, len(self.files), world_size):
            prefix = shard_prefix(self.work_dir, index)
            if os.path.exists(prefix + self.job.marker):
                self.stat_update("files_already_done")
                continue
            self.job.shard(self.files[index], prefix, self.job.params)
            self.stat_update("files")
        return None


class TaskStep(PipelineStep):
    """A pipeline whose unit of work is not an input file: task ``rank`` of ``world_size`` calls
    ``run_task(rank, world_size, params)`` (a module-level function; it raises to leave the task unfinished, so a
    rerun redoes it). ``synth generate`` shards its plan this way."""

    name = "megatron-align tasks"
    type = "megatron-align"

    def __init__(self, run_task, params: dict) -> None:
        super().__init__()
        self.run_task, self.params = run_task, params

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        self.run_task(rank, world_size, self.params)
        return None


class CallStep(PipelineStep):
    """The one task after a :class:`TaskStep` (SLURM: a job that runs after the whole array succeeded):
    ``call(params)``, its result printed to the job's log."""

    name = "megatron-align merge"
    type = "megatron-align"

    def __init__(self, call, params: dict) -> None:
        super().__init__()
        self.call, self.params = call, params

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        result = self.call(self.params)
        print(json.dumps(result, default=str)[:2000], flush=True)
        return None


def _merge(params: dict) -> dict:
    result = merge(params["job"], params["files"], params["work_dir"], params["keep_work"])
    return {k: v for k, v in result.items() if k not in ("inputs", "skipped_lines", "lines", "examples")}


def MergeStep(job: Job, files: list[str], work_dir: str, keep_work: bool) -> CallStep:  # noqa: N802 - a step
    """The one merge task of a :class:`Job` (SLURM: a job that runs after the whole array succeeded)."""
    return CallStep(_merge, {"job": job, "files": files, "work_dir": work_dir, "keep_work": keep_work})
