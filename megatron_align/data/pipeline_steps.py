"""The datatrove side of the data pipelines: our PipelineStep subclasses and the SLURM executor we submit with.

Imported only when a verb runs with ``--executor`` (datatrove's executors are slow to import). The steps
call :mod:`megatron_align.data.pipeline_shards` for the work itself; the executors pickle them (dill) into
each task, so they live at module level here.
"""

from __future__ import annotations

import json
import os

from datatrove.executor.slurm import SlurmPipelineExecutor
from datatrove.pipeline.base import PipelineStep

from megatron_align.data.pipeline import merge, shard_prefix
from megatron_align.data.pipeline_shards import VERBS



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

    def __init__(self, verb: str, files: list[str], work_dir: str, params: dict, threads: int = 1) -> None:
        super().__init__()
        self.verb, self.files, self.work_dir, self.params = verb, files, work_dir, params
        self.threads = threads
        """Threads of HF tokenizers' pool in this task (the CPUs it has): tasks running side by side would
        otherwise start one pool thread per core of the machine each."""

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        os.environ.setdefault("RAYON_NUM_THREADS", str(self.threads))  # read when the pool starts; a user's wins
        shard_fn, marker, _ = VERBS[self.verb]
        for index in range(rank, len(self.files), world_size):
            prefix = shard_prefix(self.work_dir, index)
            if os.path.exists(prefix + marker):
                self.stat_update("files_already_done")
                continue
            shard_fn(self.files[index], prefix, self.params)
            self.stat_update("files")
        return None


class MergeStep(PipelineStep):
    """The one merge task (SLURM: a job that runs after the whole array succeeded)."""

    name = "megatron-align merge"
    type = "megatron-align"

    def __init__(self, verb: str, files: list[str], work_dir: str, params: dict, keep_work: bool) -> None:
        super().__init__()
        self.verb, self.files, self.work_dir, self.params, self.keep_work = verb, files, work_dir, params, keep_work

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        result = merge(self.verb, self.files, self.work_dir, self.params, self.keep_work)
        summary = {k: v for k, v in result.items() if k not in ("inputs", "skipped_lines", "lines", "examples")}
        print(json.dumps(summary, default=str)[:2000], flush=True)
        return None
