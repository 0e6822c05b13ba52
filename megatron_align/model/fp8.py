"""FP8 training through Transformer Engine: recipe mapping, checks, scaling state.

``precision: fp8`` keeps weights, gradients and the optimizer as in BF16 and runs each transformer layer's GEMMs
in FP8 inside TE; Megatron-Core does the work. This module turns :class:`FP8Config` into Megatron-Core's
``TransformerConfig`` / DDP fields and refuses, before the first step, every recipe, TE version, GPU or layout
that would fail later or silently run something else. The recipes, their floors and how the scaling state
flows through checkpoints: docs/fp8.md.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from megatron_align.errors import ConfigError, UserError

if TYPE_CHECKING:
    from megatron_align.config import RootConfig

FP8_MIN_CAPABILITY = (8, 9)

# recipe -> (minimum TE version as Megatron-Core checks it, minimum compute capability, first unsupported cc or None)
RECIPE_REQUIREMENTS: dict[str, tuple[str, tuple[int, int], tuple[int, int] | None]] = {
    "delayed": ("2.0", (8, 9), None),
    "tensorwise": ("2.2.0.dev0", (8, 9), None),
    "blockwise": ("2.3.0.dev0", (9, 0), None),
    "mxfp8": ("2.1.0", (10, 0), (12, 0)),
}
DELAYED_DEFAULT_HISTORY = (
    1024  # TE's DelayedScaling defaults (Megatron's TransformerConfig defaults are 1 / most_recent)
)
DELAYED_DEFAULT_ALGO = "max"


@dataclass(frozen=True)
class FP8Environment:
    """The hardware/software facts FP8 depends on; :meth:`probe` reads them from this process."""

    capability: tuple[int, int] | None
    """Compute capability of the current CUDA device; None without CUDA."""
    te_version: str | None
    """Installed Transformer Engine version; None when TE is not importable."""
    device_name: str = "GPU"

    @classmethod
    def probe(cls) -> FP8Environment:
        import torch

        from megatron_align.optional import have_te, optional_import

        capability, name = None, "no CUDA device"
        if torch.cuda.is_available():
            capability = tuple(torch.cuda.get_device_capability())
            name = torch.cuda.get_device_name()
        te_version = None
        if have_te():
            te_version = getattr(optional_import("transformer_engine"), "__version__", None)
            if te_version is None:
                te_version = _dist_version("transformer-engine") or _dist_version("transformer_engine") or "0"
        return cls(capability=capability, te_version=te_version, device_name=name)


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _version_at_least(version: str, minimum: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version) >= Version(minimum)
    except InvalidVersion:
        return False


def _cc(capability: tuple[int, int]) -> str:
    return f"{capability[0]}.{capability[1]}"


def check_fp8_config(config: RootConfig) -> None:
    """Checks that need only the config (spec, layer counts, shapes, optimizer). Raises ConfigError."""
    f, m, p = config.fp8, config.model, config.parallel
    if m.spec in ("local", "portable"):
        raise ConfigError(f"precision=fp8 runs its GEMMs in Transformer Engine, but model.spec={m.spec} has no FP8 "
                          "path; set model.spec=te (or auto), or use precision=bf16 with this spec")
    n = f.first_last_layers_bf16
    if n:
        per_stage = m.num_layers // p.pipeline
        if n > per_stage:
            raise ConfigError(
                f"fp8.first_last_layers_bf16={n} exceeds the layers per pipeline stage "
                f"({m.num_layers} / parallel.pipeline={p.pipeline} = {per_stage}); Megatron-Core refuses it"
            )
        if 2 * n >= m.num_layers:
            raise ConfigError(f"fp8.first_last_layers_bf16={n} keeps all {m.num_layers} layers in BF16; "
                              "use precision=bf16, or a smaller N")
    if f.param_gather and config.optimizer.distributed == "false":
        raise ConfigError("fp8.param_gather=true needs the distributed optimizer (it all-gathers the FP8 weights "
                          "from the optimizer's fp32 shards); set optimizer.distributed=auto or true")
    t = p.tensor
    head_dim = m.head_dim
    groups = m.num_query_groups or m.num_attention_heads
    dims = {
        "model.hidden_size": m.hidden_size,
        "query projection / parallel.tensor": m.num_attention_heads * head_dim / t,
        "key/value projection / parallel.tensor": groups * head_dim / t,
        "model.ffn_hidden_size / parallel.tensor": m.ffn_size / t,
    }
    for name, value in dims.items():
        if value != int(value) or int(value) % 16:
            raise ConfigError(f"precision=fp8: {name} = {value:g} is not a multiple of 16, which FP8 GEMMs require "
                              "(pick model sizes divisible by 16 x parallel.tensor)")
    tokens = m.seq_length * config.train.micro_batch_size // p.context
    if tokens % 8:
        raise ConfigError(
            f"precision=fp8: tokens per micro batch per CP rank = model.seq_length x "
            f"train.micro_batch_size / parallel.context = {tokens} is not a multiple of 8 (FP8 GEMMs need it)"
        )


def check_fp8_environment(config: RootConfig, env: FP8Environment) -> None:
    """Checks against the machine: CUDA, TE present and new enough, GPU able to run the recipe. Raises UserError."""
    f = config.fp8
    if env.capability is None:
        raise UserError("precision=fp8 needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9: L40S, H100, "
                        "H200, B200); none is visible here. On CPU use precision=fp32 (or auto)")
    if env.te_version is None:
        from megatron_align.optional import require

        require("transformer_engine.pytorch", "precision=fp8")
    if env.capability < FP8_MIN_CAPABILITY:
        raise UserError(
            f"precision=fp8: {env.device_name} has compute capability {_cc(env.capability)}, without FP8 "
            f"tensor cores (needs >= {_cc(FP8_MIN_CAPABILITY)}: Ada, Hopper, Blackwell); use precision=bf16"
        )
    min_te, min_cc, first_bad_cc = RECIPE_REQUIREMENTS[f.recipe]
    if env.capability < min_cc or (first_bad_cc is not None and env.capability >= first_bad_cc):
        if f.recipe == "mxfp8":
            hint = ("MXFP8 is a Blackwell data-center format (B200/B300, cc 10.x); on Hopper use fp8.recipe=tensorwise "
                    "or blockwise" if env.capability < min_cc else
                    "Transformer Engine does not support MXFP8 on cc 12.x (RTX 50 / RTX PRO Blackwell); use tensorwise")
        else:
            hint = "block scaling needs Hopper or newer (cc >= 9.0); on Ada use fp8.recipe=tensorwise or delayed"
        raise UserError(f"fp8.recipe={f.recipe} is not supported on {env.device_name} (compute capability "
                        f"{_cc(env.capability)}): {hint}")
    if not _version_at_least(env.te_version, min_te):
        shown = min_te.replace(".dev0", "")
        raise UserError(f"fp8.recipe={f.recipe} needs Transformer Engine >= {shown} (Megatron-Core builds its recipe "
                        f"only from that version); found {env.te_version}. Upgrade TE (a newer NGC PyTorch container) "
                        f"or choose a recipe your TE has: {', '.join(supported_recipes(env.te_version))}")


def supported_recipes(te_version: str) -> list[str]:
    return [r for r, (min_te, _, _) in RECIPE_REQUIREMENTS.items() if _version_at_least(te_version, min_te)]


def validate_fp8(config: RootConfig, env: FP8Environment | None = None) -> None:
    """All FP8 checks, config first (so a wrong config is named even on a laptop), then the machine."""
    check_fp8_config(config)
    check_fp8_environment(config, env if env is not None else FP8Environment.probe())


def fp8_transformer_kwargs(config: RootConfig) -> dict[str, Any]:
    """FP8Config -> Megatron-Core ``TransformerConfig`` keyword arguments (empty unless precision=fp8).

    Only fields this Megatron-Core has are passed; a requested feature whose field is missing
    (0.16-0.19 differ in places) is an error rather than a silently ignored setting.
    """
    if config.precision != "fp8":
        return {}
    f = config.fp8
    kwargs: dict[str, Any] = {"fp8": f.format, "fp8_recipe": f.recipe}
    if f.recipe == "delayed":
        kwargs.update(fp8_margin=f.margin, fp8_amax_history_len=f.amax_history_len or DELAYED_DEFAULT_HISTORY,
                      fp8_amax_compute_algo=f.amax_compute_algo or DELAYED_DEFAULT_ALGO)
    if f.first_last_layers_bf16:
        n = f.first_last_layers_bf16
        kwargs.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=n, num_layers_at_end_in_bf16=n)
    if f.param_gather:
        kwargs["fp8_param"] = True
    return _only_known_fields(kwargs)


def fp8_ddp_kwargs(config: RootConfig) -> dict[str, Any]:
    """Keyword arguments for Megatron-Core's ``DistributedDataParallelConfig`` (fp8.param_gather)."""
    if config.precision == "fp8" and config.fp8.param_gather:
        return {"fp8_param_gather": True}
    return {}


def _only_known_fields(kwargs: dict[str, Any]) -> dict[str, Any]:
    from megatron.core.transformer import TransformerConfig

    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    missing = sorted(k for k in kwargs if k not in known)
    if missing:
        import megatron.core

        raise ConfigError(f"precision=fp8: this megatron-core ({getattr(megatron.core, '__version__', '?')}) has no "
                          f"TransformerConfig field(s) {', '.join(missing)}; the fp8 settings that need them cannot "
                          "be honoured -- upgrade megatron-core or drop those fp8.* settings")
    return kwargs


def fp8_scaling_state(modules) -> dict[str, dict[str, Any]]:
    """Delayed-scaling state of every TE module under ``modules``: {module name: {scale_fwd, amax_history_fwd, ...}}.

    Reads TE's live ``fp8_meta`` (the same tensors ``get_extra_state`` serializes), copied to CPU.
    Empty for non-TE models and for recipes without persistent state.
    """
    import torch

    state: dict[str, dict[str, Any]] = {}
    for prefix, root in (modules.items() if isinstance(modules, dict) else enumerate(modules)):
        for name, module in root.named_modules():
            meta = getattr(module, "fp8_meta", None)
            if not isinstance(meta, dict):
                continue
            entry = {}
            for direction in ("fwd", "bwd"):
                scaling = meta.get(f"scaling_{direction}")
                for attr in ("scale", "amax_history"):
                    value = getattr(scaling, attr, None)
                    if isinstance(value, torch.Tensor):
                        entry[f"{attr}_{direction}"] = value.detach().float().cpu().clone()
            if entry:
                state[f"{prefix}.{name}"] = entry
    return state
