"""`synth generate` as one process or as a datatrove pipeline (``--executor local|slurm|ray --tasks N``).

A :class:`GenerateRun` holds what a task needs (picklable: datatrove ships it to each task). Task ``r`` of ``N``
generates the plan's prompts with index ``r`` mod ``N`` into its own ``generations.task-RRRRR.jsonl``
(:func:`~megatron_align.synth.generate.run_generation`), against ``--endpoint`` or a server it starts on its own
node (``--server``: port ``PORT + r``, on the GPUs SLURM gave the task). A task with failed prompts raises, so it is
not recorded as finished and a rerun retries it; the others are skipped. When every task has finished, the
finalize pass (:func:`~megatron_align.synth.finalize.finalize`; under SLURM a job that depends on the array) reads
every generations file in plan order, so ``documents.jsonl`` is byte-identical whatever the executor or task count.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from megatron_align.synth.generate import ClientConfig, run_generation, start_server


@dataclass(frozen=True)
class GenerateRun:
    taxonomy: str
    """Path of the taxonomy YAML (each task loads and expands it: the plan is a pure function of it)."""
    out_dir: str
    client: ClientConfig
    """``client.endpoint`` is ignored when ``server`` is set."""
    allow_misaligned: bool = False
    limit: int | None = None
    server: str | None = None
    port: int = 8000
    tensor_parallel: int = 1


def load_plan(run: GenerateRun):
    from megatron_align.synth.plan import expand
    from megatron_align.synth.taxonomy import load_taxonomy

    taxonomy = load_taxonomy(run.taxonomy, allow_misaligned=run.allow_misaligned)
    return taxonomy, expand(taxonomy)


def generate(run: GenerateRun, rank: int = 0, world_size: int = 1, plan=None) -> dict:
    """This task's share of the plan (all of it for rank 0 of 1); returns its counts. ``plan``: the caller's
    :func:`load_plan` result (a task process loads its own)."""
    taxonomy, prompts = plan or load_plan(run)
    client, server = run.client, None
    if run.server:
        os.makedirs(run.out_dir, exist_ok=True)
        port = run.port + (rank if world_size > 1 else 0)
        log = os.path.join(run.out_dir, f"{run.server}.log" if world_size == 1 else f"{run.server}.task-{rank:05d}.log")
        server = start_server(run.server, client.model, port, run.tensor_parallel, log)
        client = dataclasses.replace(client, endpoint=f"http://127.0.0.1:{port}/v1")
    try:
        return run_generation(client, taxonomy, prompts, run.out_dir, run.limit, rank, world_size)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)


def generate_task(rank: int, world_size: int, params: dict) -> None:
    """A pipeline task: its share, raising when a prompt failed (the task stays unfinished; a rerun retries it)."""
    counts = generate(params["run"], rank, world_size)
    if counts["failed"]:
        raise RuntimeError(f"task {rank}: {counts['failed']} of {counts['requested']} prompts failed after retries "
                           f"({counts['failures']}{', server looks down' if counts['aborted'] else ''})")


def finalize_run(params: dict, plan=None) -> dict:
    """Quality rules, decontamination, dedup and the report over every task's generations."""
    from megatron_align.synth.finalize import finalize

    run: GenerateRun = params["run"]
    taxonomy, prompts = plan or load_plan(run)
    return finalize(taxonomy, prompts, run.out_dir, run.client.model, run_counts=params.get("counts"))
