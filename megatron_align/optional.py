"""One guard per optional dependency.

Transformer Engine, apex, DALI, NVML and mlflow are imported only through these
functions, lazily and once, so ``import megatron_align`` works on a laptop.
Each returns the module or ``None``; ``require(name, why)`` raises a
:class:`UserError` that says what to install.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

from megatron_align.errors import UserError

_INSTALL_HINTS = {
    "transformer_engine": (
        "use the NGC PyTorch container (docker/Dockerfile) or "
        "`pip install transformer-engine[pytorch]` on a CUDA machine"
    ),
    "apex": "use the NGC PyTorch container (docker/Dockerfile), which ships apex",
    "nvidia.dali": "`pip install nvidia-dali-cuda120` (or the `gpu` extra)",
    "pynvml": "`pip install nvidia-ml-py` (or the `gpu` extra)",
    "mlflow": "`pip install mlflow-skinny==3.17.2 SQLAlchemy==2.1.9 alembic==1.20.1` (or the `tracking` extra)",
    "sentencepiece": "`pip install sentencepiece`",
}


@functools.cache
def optional_import(name: str) -> ModuleType | None:
    """Import ``name`` or return None when it (or a compiled part of it) is unavailable."""
    if name.split(".")[0] == "mlflow":
        # MLflow sends usage telemetry by default; nothing leaves the machine unless tracking.uri says so.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        os.environ.setdefault("DO_NOT_TRACK", "true")
    try:
        return importlib.import_module(name)
    except Exception:  # ImportError, or a compiled extension failing to load (TE without CUDA)
        return None


def have_te() -> bool:
    return optional_import("transformer_engine.pytorch") is not None


def have_apex() -> bool:
    return optional_import("apex") is not None


def have_grad_accum_fusion_kernel() -> bool:
    """apex's ``fused_weight_gradient_mlp_cuda``: Megatron-Core's own linear layers (the output layer even in the TE
    spec) refuse ``gradient_accumulation_fusion`` without it, and pip-installed TE brings no apex."""
    return optional_import("fused_weight_gradient_mlp_cuda") is not None


def have_dali() -> bool:
    return optional_import("nvidia.dali") is not None


def have_nvml() -> bool:
    return optional_import("pynvml") is not None


def have_mlflow() -> bool:
    return optional_import("mlflow") is not None


def require(name: str, why: str) -> ModuleType:
    """Return module ``name`` or raise a UserError naming what needs it and how to install it."""
    module = optional_import(name)
    if module is None:
        top = name.split(".")[0] if name not in _INSTALL_HINTS else name
        hint = _INSTALL_HINTS.get(name, _INSTALL_HINTS.get(top, f"`pip install {top}`"))
        raise UserError(f"{why} needs {name!r}, which is not importable here: {hint}")
    return module
