"""The pretraining job script for one config (``megatron-align slurm render CONFIG``).

What: prints ``slurm/pretrain.sbatch`` with its ``#SBATCH`` directives set from the config (nodes,
tasks and GPUs per node from ``parallel.world_size``; time, partition, account, container image from
flags or the config's optional ``slurm:`` section) and the config path filled in as ``MA_CONFIG``.

Why render instead of generating: the job script in ``slurm/`` is the one source of truth. Users can
``sbatch`` it directly with command-line options, or render it; either way the body that runs (the
rendezvous, NCCL settings, container handling, USR1 → checkpoint → requeue) is the same text, and a
fix there reaches both. Rendering only rewrites lines that are data: ``#SBATCH --key=value`` lines
and ``: "${MA_NAME:=default}"`` default lines.

Where the template comes from: ``--template`` if given, else ``slurm/pretrain.sbatch`` next to the
package in the repository checkout (the supported install is ``pip install -e .`` from a checkout,
and the container copies the checkout to /opt/megatron-align), else ``./slurm/pretrain.sbatch``.
The scripts are not duplicated as package data because a second copy would drift from the one users
submit, and the job scripts need the checkout anyway (they source ``slurm/common.sh`` from it).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import fields
from pathlib import Path

from megatron_align.config.slurm import SlurmConfig
from megatron_align.errors import ConfigError, UserError

_DIRECTIVE = re.compile(r"^#SBATCH\s+--(?P<key>[A-Za-z-]+)(?:[= ](?P<value>.*))?$")
_DEFAULT = re.compile(r'^: "\$\{(?P<name>MA_[A-Z_]+):=(?P<value>[^}]*)\}"(?P<rest>.*)$')


def repo_root() -> Path:
    """The checkout that holds this package (where slurm/ lives)."""
    return Path(__file__).resolve().parent.parent


def find_template(explicit: str | None = None) -> Path:
    candidates = (
        [Path(explicit)]
        if explicit
        else [repo_root() / "slurm" / "pretrain.sbatch", Path.cwd() / "slurm" / "pretrain.sbatch"]
    )
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(
        f"job script template not found (looked at {', '.join(str(p) for p in candidates)}); run from a checkout of "
        "megatron_align (pip install -e .) or pass --template PATH/TO/slurm/pretrain.sbatch"
    )


def job_shape(world_size: int, gpus_per_node: int) -> tuple[int, int]:
    """(nodes, tasks per node) for ``world_size`` ranks, one rank per GPU."""
    if world_size < 1:
        raise ConfigError(f"parallel.world_size: must be >= 1, got {world_size}")
    if gpus_per_node == 0 or world_size <= gpus_per_node:
        return 1, world_size
    if world_size % gpus_per_node:
        raise ConfigError(
            f"parallel.world_size={world_size} does not fill whole nodes of {gpus_per_node} GPUs; use a multiple of "
            f"{gpus_per_node} (or set slurm.gpus_per_node / --gpus-per-node)"
        )
    return math.ceil(world_size / gpus_per_node), gpus_per_node


def read_exclude_file(path: Path) -> list[str]:
    """Node names from a preflight exclude file ('#' starts a comment)."""
    if not path.is_file():
        return []
    nodes = []
    for line in path.read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            nodes.append(name)
    return nodes


def render(template: str, directives: dict[str, str | None], defaults: dict[str, str], header: str = "") -> str:
    """Set ``#SBATCH --key=value`` lines (None removes one; new keys go after the last directive) and
    ``: "${MA_NAME:=value}"`` defaults in ``template``. Other lines are copied unchanged."""
    lines = template.splitlines()
    pending = dict(directives)
    out: list[str] = []
    last_directive = -1
    for line in lines:
        match = _DIRECTIVE.match(line)
        if match and match.group("key") in pending:
            value = pending.pop(match.group("key"))
            if value is not None:
                out.append(f"#SBATCH --{match.group('key')}={value}")
                last_directive = len(out) - 1
            continue
        match = _DEFAULT.match(line)
        if match and match.group("name") in defaults:
            line = f': "${{{match.group("name")}:={_shell_word(defaults[match.group("name")])}}}"{match.group("rest")}'
        out.append(line)
        if line.startswith("#SBATCH"):
            last_directive = len(out) - 1
    if last_directive < 0:
        raise UserError("job script template has no #SBATCH lines; is it slurm/pretrain.sbatch?")
    added = [f"#SBATCH --{key}={value}" for key, value in pending.items() if value is not None]
    out[last_directive + 1:last_directive + 1] = added
    if header and out and out[0].startswith("#!"):
        out[1:1] = header.splitlines()
    return "\n".join(out) + "\n"


def _shell_word(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_./:@%+,=-]*", value):
        raise UserError(f"{value!r} has characters that are not safe in a job script default; use a plain path or name")
    return value


def load_render_inputs(config_path: str) -> tuple[int, str, SlurmConfig]:
    """(parallel.world_size, run_dir, SlurmConfig) from a YAML config."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not os.path.isfile(config_path):
        raise UserError(f"{config_path}: config file not found")
    try:
        cfg = OmegaConf.load(config_path)
        world_size = int(OmegaConf.select(cfg, "parallel.world_size", default=1))
        run_dir = str(OmegaConf.select(cfg, "run_dir", default="runs/default"))
        raw = OmegaConf.to_container(cfg.get("slurm", None) or OmegaConf.create({}), resolve=True)
    except (OmegaConfBaseException, ValueError, TypeError) as err:
        raise ConfigError(f"{config_path}: {err}") from None
    known = {f.name for f in fields(SlurmConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"{config_path}: unknown key(s) slurm.{', slurm.'.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return world_size, run_dir, SlurmConfig(**raw)


def profile_mode(config_path: str) -> str:
    from omegaconf import OmegaConf

    return str(OmegaConf.select(OmegaConf.load(config_path), "profile.mode", default="none"))


def render_job_script(config_path: str, flags: dict[str, str | int | None], template: str | None = None,
                      verb: str | None = None) -> tuple[str, int, int]:
    """``slurm render``: (the job script, nodes, tasks per node) for a config; ``flags`` override its ``slurm:``
    keys (None = keep the config's value), ``verb`` the megatron-align verb the job runs."""
    world_size, run_dir, cfg = load_render_inputs(config_path)
    cfg = SlurmConfig(**{**cfg.__dict__, **{k: v for k, v in flags.items() if v is not None}})
    nodes, tasks_per_node = job_shape(world_size, cfg.gpus_per_node)

    template_path = find_template(template)
    exclude_path = Path(cfg.exclude_file)
    if not exclude_path.is_absolute():
        exclude_path = template_path.resolve().parent.parent / exclude_path
    excluded = read_exclude_file(exclude_path)

    directives: dict[str, str | None] = {
        "job-name": cfg.job_name or f"ma-{Path(run_dir).name or 'run'}",
        "nodes": str(nodes),
        "ntasks-per-node": str(tasks_per_node),
        "gpus-per-node": str(tasks_per_node) if cfg.gpus_per_node else None,
        "time": cfg.time or None,
        "partition": cfg.partition or None,
        "account": cfg.account or None,
        "exclude": ",".join(excluded) or None,
    }
    if not cfg.time:
        directives.pop("time")  # keep the template's
    defaults = {"MA_CONFIG": str(Path(config_path).resolve()), "MA_CONTAINER_IMAGE": cfg.container_image,
                "MA_REPO": str(template_path.resolve().parent.parent)}
    if verb:
        defaults["MA_VERB"] = verb
    if cfg.container_mounts:
        defaults["MA_CONTAINER_MOUNTS"] = cfg.container_mounts
    if profile_mode(config_path) == "nsys":  # nsys wraps each rank: the ranks must be srun's own tasks
        if verb == "launch":
            raise UserError("profile.mode=nsys wraps each rank in `nsys profile`, which needs --verb train "
                            "(under launch the restart manager starts the ranks)")
        defaults["MA_VERB"] = "train"
        defaults["MA_NSYS"] = os.path.join(run_dir, "profile")
    header = (f"# Rendered by `megatron-align slurm render {config_path}` from {template_path.name}: "
              f"{world_size} ranks = {nodes} node(s) x {tasks_per_node}.\n# Change the config and render again; "
              "do not edit this copy. key=value overrides go after the script: sbatch job.sbatch train.steps=100")
    return render(template_path.read_text(), directives, defaults, header), nodes, tasks_per_node
