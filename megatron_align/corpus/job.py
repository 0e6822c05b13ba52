"""What a corpus verb hands the pipeline runner (:class:`Job`), and the work directory's shard layout.

A verb depends on this module, never the runner on a verb: the verb's shard and merge functions travel in the
:class:`Job` (datatrove pickles them into each task), and :func:`merge` calls the job's merge once every shard is
finished. Layout: ``WORK/shards/NNNNNNN.*`` per input file (its index), ``WORK/plan.json``, ``WORK/logs/``.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field

from megatron_align.errors import UserError


@dataclass(frozen=True)
class Job:
    """What the runner runs, handed in by a verb: its per-file shard function and its merge (module-level functions,
    so datatrove can pickle them into each task). The runner knows no verb."""

    name: str
    """The verb (``prepare``): messages, SLURM job names, the work directory's plan."""
    shard: Callable[[str, str, dict], None]
    """``shard(input file, shard prefix, params)``: one input file into ``prefix.*``, the marker file written last."""
    marker: str
    """Suffix of the file a finished shard writes last (``.manifest.json``): JSON with ``documents`` (and
    ``tokens``), read by the progress display."""
    merge: Callable[[list[str], list[str], dict], dict]
    """``merge(input files, shard prefixes, params)``: the shards, in input order, into the verb's outputs."""
    params: dict = field(default_factory=dict)
    """The verb's settings (picklable; compared on resume)."""
    tokens: bool = False
    """The progress display counts tokens too."""


def shard_prefix(work_dir: str, index: int) -> str:
    return os.path.join(work_dir, "shards", f"{index:07d}")


def merge(job: Job, files: list[str], work_dir: str, keep_work: bool) -> dict:
    """Merge the finished shards of ``work_dir`` into the job's outputs (refused while any is unfinished)."""
    shards = [shard_prefix(work_dir, i) for i in range(len(files))]
    missing = [f for f, s in zip(files, shards) if not os.path.exists(s + job.marker)]
    if missing:
        raise UserError(f"{job.name}: {len(missing)} of {len(files)} input files have no finished shard in {work_dir} "
                        f"(first: {missing[0]}); run the same command again: only unfinished work is redone")
    result = job.merge(files, shards, job.params)
    if not keep_work:  # shards, plan and completion records; the logs stay (a SLURM merge job still writes its own)
        os.remove(os.path.join(work_dir, "plan.json"))
        shutil.rmtree(os.path.join(work_dir, "shards"), ignore_errors=True)
        for completions in glob.glob(os.path.join(work_dir, "logs", "tasks-*", "shards", "completions")):
            shutil.rmtree(completions, ignore_errors=True)
    return result
