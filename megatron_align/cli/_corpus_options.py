"""The options the corpus verbs share, defined once: their input files, and how they run as a datatrove pipeline
(``--executor local|slurm|ray --tasks N ...``, making a :class:`~megatron_align.config.corpus.PipelineConfig`)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from megatron_align.config.corpus import EXECUTORS, PipelineConfig, PipelineRayConfig, PipelineSlurmConfig
from megatron_align.errors import ConfigError


def add_inputs(parser: argparse.ArgumentParser, note: str = "") -> None:
    """The positional corpus files every corpus verb reads (:mod:`megatron_align.corpus.sources`)."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help=f"JSONL (.jsonl, .json, .gz, .zst) or Parquet files, or directories of them{note}")


def add_arguments(parser: argparse.ArgumentParser, tasks_note: str = "input file i goes to task i mod N",
                  default_work_dir: str = "next to the output") -> None:
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="progress (bytes, documents, rates) on stderr")
    g = parser.add_argument_group("pipeline (datatrove): run across processes, a SLURM job array or Ray")
    g.add_argument("--executor", choices=EXECUTORS, default="none",
                   help="none: this process (default) | local | slurm | ray: a datatrove pipeline of --tasks tasks")
    g.add_argument("--tasks", type=int, default=1, help=f"pipeline tasks; {tasks_note}")
    g.add_argument("--work-dir", default=None, help=f"shards and completion records (default: {default_work_dir})")
    g.add_argument("--keep-work", action="store_true", help="keep the shards after the merge")
    g.add_argument("--executor-config", "--slurm-config", dest="executor_config", default=None,
                   help="YAML file with `slurm:` and/or `ray:` mappings (PipelineSlurmConfig / PipelineRayConfig keys)")
    for key, kind in (("partition", str), ("time", str), ("account", str), ("qos", str), ("job-name", str),
                      ("srun-args", str), ("env-command", str)):
        g.add_argument(f"--{key}", type=kind, default=None, help=f"slurm.{key.replace('-', '_')}")
    g.add_argument("--cpus-per-task", type=int, default=None, help="slurm.cpus_per_task / ray.cpus_per_task")
    g.add_argument("--mem-per-cpu-gb", type=int, default=None, help="slurm.mem_per_cpu_gb / ray.mem_per_cpu_gb")
    g.add_argument("--gpus-per-task", type=int, default=None, help="slurm.gpus_per_task (--gres=gpu:N)")
    g.add_argument("--ray-address", default=None, help="ray.address: a running Ray cluster (default: $RAY_ADDRESS, "
                   "else a local Ray for the run)")
    g.add_argument("--ray-num-cpus", type=int, default=None, help="ray.num_cpus of the local Ray")


def report_submitted(result: dict) -> None:
    """What a SLURM submission printed (the command returns before the jobs run)."""
    print(f"submitted SLURM jobs {result['job_ids'][0]} (array) and {result['job_ids'][-1]} (merge, afterok); "
          f"outputs appear when the merge job ends; logs: {result['logs']}; rerun the same command to resume")


def _section(loaded: dict, name: str, config_cls, path: str) -> dict[str, Any]:
    section = dict(loaded.get(name) or {})
    unknown = set(section) - {f.name for f in dataclasses.fields(config_cls)}
    if unknown:
        raise ConfigError(f"{path}: unknown {name} keys {sorted(unknown)}")
    return section


def config_from_args(args: argparse.Namespace, workers: int) -> PipelineConfig:
    """The :class:`PipelineConfig` of the options above: ``--executor-config`` sections, flags overriding them."""
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
        slurm = _section(loaded, "slurm", PipelineSlurmConfig, args.executor_config)
        ray = _section(loaded, "ray", PipelineRayConfig, args.executor_config)
    for section, config_cls in ((slurm, PipelineSlurmConfig), (ray, PipelineRayConfig)):
        for f in dataclasses.fields(config_cls):
            value = getattr(args, f.name, None)
            if value is not None:
                section[f.name] = value
    if args.ray_address is not None:
        ray["address"] = args.ray_address
    if args.ray_num_cpus is not None:
        ray["num_cpus"] = args.ray_num_cpus
    return PipelineConfig(executor=args.executor, tasks=args.tasks, workers=workers, work_dir=args.work_dir,
                          keep_work=args.keep_work, progress=args.progress, slurm=PipelineSlurmConfig(**slurm),
                          ray=PipelineRayConfig(**ray))
