"""What this machine can run, and whether it can run a config (``megatron-align doctor [CONFIG] [--json]``).

What it reports: versions of Python, torch (with its CUDA and NCCL), megatron-core and the optional
libraries (Transformer Engine, apex, DALI, mlflow, sentencepiece, NVML); each GPU with its compute
capability and whether it does FP8 (Hopper/Ada, cc >= 8.9) or MXFP8 (Blackwell, cc >= 10.0); NVML
health per GPU (uncorrected ECC errors, temperature against the slowdown threshold); which async
checkpoint writer a run would use (nvidia-resiliency-ext's or Megatron-Core's own, and why: see
:mod:`megatron_align.training.async_save`); and which features are usable here.

With a config it reads only the keys that imply a requirement (``precision``, ``model.spec``,
``parallel.*``, ``data.loader``, ``data.tokenizer.kind``, ``tracking.backend``) straight from the YAML
with omegaconf, so it also diagnoses configs the installed schema would reject, and lists every unmet
need at once instead of failing on the first at job start.

Exit codes: 0 = fine; 1 = an unmet need of CONFIG, or an unhealthy GPU; 2 = unreadable config.
Optional libraries are probed only through :mod:`megatron_align.optional`.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from dataclasses import dataclass, field

from megatron_align.errors import UserError
from megatron_align.optional import optional_import

FP8_MIN_CC = (8, 9)  # Ada / Hopper: FP8 tensor cores (delayed / current scaling recipes)
MXFP8_MIN_CC = (10, 0)  # Blackwell: microscaled FP8 and NVFP4

# optional module probed (through megatron_align.optional) -> distribution whose version is reported
_LIBRARIES = {
    "transformer_engine.pytorch": "transformer-engine",
    "apex": "apex",
    "nvidia.dali": "nvidia-dali-cuda120",
    "mlflow": "mlflow",
    "sentencepiece": "sentencepiece",
    "pynvml": "nvidia-ml-py",
}


@dataclass
class GPUInfo:
    index: int
    name: str
    compute_capability: str
    memory_gib: float
    fp8: bool
    mxfp8: bool
    temperature_c: int | None = None
    slowdown_temperature_c: int | None = None
    ecc_uncorrected_volatile: int | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class Report:
    python: str
    platform: str
    torch: str | None
    cuda: str | None
    nccl: str | None
    libraries: dict[str, str | None]
    gpus: list[GPUInfo]
    nvml: str
    features: dict[str, bool]
    async_save: str = ""
    """The async checkpoint writer (``nvrx`` / ``mcore``) with the reason."""
    attention: str = ""
    """With a config: the attention path it gets on this machine and whether document masking is effective."""
    needs: list[str] = field(default_factory=list)
    unmet: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not any(g.problems for g in self.gpus)


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _version(module_name: str, dist: str) -> str | None:
    """Version of an importable optional module, else None (not installed or fails to load)."""
    module = optional_import(module_name)
    if module is None:
        return None
    for candidate in (dist, dist.replace("-", "_"), dist.split("-")[0]):
        version = _dist_version(candidate)
        if version:
            return version
    top = optional_import(module_name.split(".")[0])
    return str(getattr(module, "__version__", None) or getattr(top, "__version__", None) or "installed")


def _gpus(torch) -> list[GPUInfo]:
    if torch is None or not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        cc = (props.major, props.minor)
        gpus.append(
            GPUInfo(
                index=i,
                name=props.name,
                compute_capability=f"{cc[0]}.{cc[1]}",
                memory_gib=round(props.total_memory / 2**30, 1),
                fp8=cc >= FP8_MIN_CC,
                mxfp8=cc >= MXFP8_MIN_CC,
            )
        )
    return gpus


def _nvml_health(gpus: list[GPUInfo]) -> str:
    """Fill temperature/ECC from NVML into ``gpus``; return a one-line NVML status."""
    pynvml = optional_import("pynvml")
    if pynvml is None:
        return "not installed (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
    except Exception as err:  # NVMLError_LibraryNotFound / DriverNotLoaded on machines without a driver
        return f"unavailable: {err}"
    try:
        count = pynvml.nvmlDeviceGetCount()
        for gpu in gpus:
            if gpu.index >= count:
                continue
            # NVML numbers all GPUs; CUDA_VISIBLE_DEVICES may renumber. Match on the common case only.
            handle = pynvml.nvmlDeviceGetHandleByIndex(gpu.index)
            try:
                gpu.temperature_c = int(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))
                gpu.slowdown_temperature_c = int(pynvml.nvmlDeviceGetTemperatureThreshold(
                    handle, pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN))
            except Exception:
                pass
            try:
                gpu.ecc_uncorrected_volatile = int(pynvml.nvmlDeviceGetTotalEccErrors(
                    handle, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC))
            except Exception:  # ECC off or not supported on this board
                pass
            if gpu.ecc_uncorrected_volatile:
                gpu.problems.append(
                    f"{gpu.ecc_uncorrected_volatile} uncorrected ECC error(s) since boot: drain the node"
                )
            if (
                gpu.temperature_c is not None
                and gpu.slowdown_temperature_c
                and gpu.temperature_c >= gpu.slowdown_temperature_c
            ):
                gpu.problems.append(
                    f"temperature {gpu.temperature_c} C >= slowdown threshold {gpu.slowdown_temperature_c} C"
                )
        driver = pynvml.nvmlSystemGetDriverVersion()
        return f"ok (driver {driver.decode() if isinstance(driver, bytes) else driver}, {count} device(s))"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def collect() -> Report:
    torch = optional_import("torch")
    cuda = nccl = None
    if torch is not None:
        cuda = torch.version.cuda
        if cuda and hasattr(torch.cuda, "nccl"):
            try:
                nccl = ".".join(str(v) for v in torch.cuda.nccl.version())
            except Exception:
                nccl = None
    # megatron-core is a hard dependency: its version comes from package metadata, because importing it
    # costs ~10 s on a small machine and tells nothing more (a broken install fails `train` loudly).
    libraries = {"megatron-core": _dist_version("megatron-core")}
    libraries.update({dist: _version(module, dist) for module, dist in _LIBRARIES.items()})
    gpus = _gpus(torch)
    nvml = _nvml_health(gpus) if gpus or libraries["nvidia-ml-py"] else "not installed (pip install nvidia-ml-py)"
    have = {dist: libraries[dist] is not None for dist in libraries}
    cuda_ok = bool(gpus)
    features = {
        "cuda": cuda_ok,
        "nccl": cuda_ok and nccl is not None,
        "cpu_gloo_training": torch is not None and have["megatron-core"],
        "te_spec": cuda_ok and have["transformer-engine"],
        "fp8": cuda_ok and have["transformer-engine"] and all(g.fp8 for g in gpus),
        "mxfp8": cuda_ok and have["transformer-engine"] and all(g.mxfp8 for g in gpus),
        "apex_fused_kernels": cuda_ok and have["apex"],
        "dali_loader": have["nvidia-dali-cuda120"],
        "mlflow_tracking": have["mlflow"],
        "sentencepiece_tokenizer": have["sentencepiece"],
        "nvml_health": nvml.startswith("ok"),
    }
    from megatron_align.training import async_save

    writer = async_save.choose()
    return Report(
        python=sys.version.split()[0],
        platform=platform.platform(),
        torch=getattr(torch, "__version__", None),
        cuda=cuda,
        nccl=nccl,
        libraries=libraries,
        gpus=gpus,
        nvml=nvml,
        features=features,
        async_save=f"{writer.name} ({writer.reason})",
    )


def _load_needs_keys(path: str) -> dict:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not os.path.isfile(path):
        raise UserError(f"{path}: config file not found")
    try:
        cfg = OmegaConf.load(path)
        keys = ("precision", "model.spec", "parallel.world_size", "parallel.tensor", "parallel.pipeline",
                "parallel.context", "parallel.backend", "data.loader", "data.tokenizer.kind", "tracking.backend",
                "data.reset_attention_mask", "data.reset_position_ids", "data.eod_mask_loss",
                "checkpoint.async_writer", "tracking.backends")
        return {k: OmegaConf.select(cfg, k, default=None) for k in keys}
    except (OmegaConfBaseException, ValueError) as err:
        raise UserError(f"{path}: cannot read config: {err}") from None


def check_config(report: Report, path: str) -> None:
    """Append each requirement of the config at ``path`` to report.needs, and each unmet one to report.unmet."""
    keys = _load_needs_keys(path)
    f = report.features
    gpu_names = ", ".join(sorted({g.name for g in report.gpus})) or "no CUDA GPU"

    def need(what: str, ok: bool, fix: str) -> None:
        report.needs.append(what)
        if not ok:
            report.unmet.append(f"{what}: {fix}")

    precision = str(keys["precision"] or "auto").lower()
    if precision in ("mxfp8", "nvfp4"):
        need(
            f"precision={precision} needs Transformer Engine and Blackwell GPUs (cc >= 10.0)",
            f["mxfp8"],
            f"have {gpu_names}, TE {'installed' if report.libraries['transformer-engine'] else 'missing'}; "
            "use precision=fp8 on Hopper or bf16",
        )
    elif precision.startswith("fp8"):
        need(f"precision={precision} needs Transformer Engine and FP8 GPUs (cc >= 8.9, Hopper/Ada)", f["fp8"],
             f"have {gpu_names}, TE {'installed' if report.libraries['transformer-engine'] else 'missing'}; "
             "run in the docker/ image on H100 nodes, or set precision=bf16 (fp32 on CPU)")
    elif precision == "bf16":
        need("precision=bf16 needs CUDA GPUs with cc >= 8.0 (Ampere+)",
             bool(report.gpus) and all(tuple(map(int, g.compute_capability.split("."))) >= (8, 0) for g in report.gpus),
             f"have {gpu_names}; use precision=auto (fp32 on CPU)")

    spec = str(keys["model.spec"] or "auto")
    if spec == "te":
        need("model.spec=te needs Transformer Engine on a CUDA machine", f["te_spec"],
             "use the docker/ image (NGC PyTorch ships TE), or model.spec=auto / local")
    if int(keys["parallel.context"] or 1) > 1:
        need("parallel.context > 1 needs Transformer Engine (context-parallel attention)", f["te_spec"],
             "use the docker/ image, or parallel.context=1")
    _check_attention(report, keys, spec, precision, need)
    if str(keys["parallel.backend"] or "auto") == "nccl":
        need("parallel.backend=nccl needs CUDA GPUs and NCCL", f["nccl"], "use parallel.backend=auto (gloo on CPU)")

    world = keys["parallel.world_size"]
    if world is not None and report.gpus and not _inside_launcher():
        need(
            f"parallel.world_size={world} standalone needs {world} GPU(s) on this node",
            int(world) <= len(report.gpus),
            f"this node has {len(report.gpus)}; submit with slurm/pretrain.sbatch (or torchrun) for multi-node runs",
        )
    if world is not None:
        tp, pp, cp = (int(keys[k] or 1) for k in ("parallel.tensor", "parallel.pipeline", "parallel.context"))
        need(
            f"parallel.world_size={world} divisible by tensor*pipeline*context={tp * pp * cp}",
            int(world) % (tp * pp * cp) == 0,
            "change parallel.world_size or the layout (megatron-align plan CONFIG ranks layouts)",
        )

    if str(keys["data.loader"] or "").lower() == "dali":
        need(
            "data.loader=dali needs NVIDIA DALI",
            f["dali_loader"],
            "pip install nvidia-dali-cuda120 (in the docker/ image)",
        )
    if str(keys["data.tokenizer.kind"] or "") == "sentencepiece":
        need(
            "data.tokenizer.kind=sentencepiece needs sentencepiece",
            f["sentencepiece_tokenizer"],
            "pip install sentencepiece",
        )
    writer = str(keys["checkpoint.async_writer"] or "auto")
    if writer != "auto":
        from megatron_align.errors import ConfigError
        from megatron_align.training import async_save

        try:
            report.async_save = f"{async_save.choose(writer).name} ({async_save.choose(writer).reason})"
            usable, fix = True, ""
        except ConfigError as err:
            usable, fix = False, str(err)
        need(f"checkpoint.async_writer={writer} needs that writer", usable, fix)
    backends = {str(b).lower() for b in (keys["tracking.backends"] or [])} | {str(keys["tracking.backend"]).lower()}
    if "mlflow" in backends:
        need(
            "tracking.backends with mlflow needs mlflow",
            f["mlflow_tracking"],
            "pip install mlflow, or tracking.backends: [jsonl]",
        )


def _check_attention(report: Report, keys: dict, spec: str, precision: str, need) -> None:
    """Which attention path the config gets here (the spec `auto` resolves to) and what document masking does."""
    from megatron_align.model.documents import TE_MIN_VERSION, te_too_old_for_thd

    on = {k: str(keys[f"data.{k}"]).lower() == "true" for k in ("reset_attention_mask", "reset_position_ids",
                                                                  "eod_mask_loss")}
    if precision.startswith("fp8") or precision in ("mxfp8", "nvfp4") or spec == "te":
        resolved = "te"
    elif spec == "auto":
        resolved = "te" if report.features.get("te_spec") else "local"
    else:
        resolved = spec
    kernel = {"te": "Transformer Engine fused attention", "portable": "torch SDPA",
              "local": "Megatron-Core unfused softmax"}.get(resolved, resolved)
    if not on["reset_attention_mask"]:
        masking = "off (one causal span per window)"
        if on["reset_position_ids"]:
            need("data.reset_position_ids=true needs data.reset_attention_mask=true", False,
                 "RoPE ignores position_ids; set data.reset_attention_mask=true too (or neither)")
    elif int(keys["parallel.context"] or 1) > 1 and resolved != "te":
        masking = "refused (parallel.context > 1 needs model.spec=te)"
        need("data.reset_attention_mask=true with parallel.context > 1 needs model.spec=te", False,
             f"model.spec resolves to {resolved} here, whose attention has no context parallelism")
    elif resolved == "te":
        te_version = report.libraries.get("transformer-engine")
        masking = f"effective: packed THD sequences, cu_seqlens from EOD (TE >= {TE_MIN_VERSION})"
        if int(keys["parallel.context"] or 1) > 1:
            masking += ", each document split over the context-parallel ranks (padded to 2 x cp)"
        if te_version:
            need(f"data.reset_attention_mask=true on model.spec=te needs Transformer Engine >= {TE_MIN_VERSION}",
                 not te_too_old_for_thd(te_version),
                 f"have TE {te_version}; upgrade it, or use model.spec=local / portable")
    else:
        masking = "effective: block-diagonal causal mask built from EOD per micro-batch"
    loss = ", no loss across EOD" if on["eod_mask_loss"] else ""
    report.attention = f"model.spec={spec} -> {resolved} ({kernel}); document masking {masking}{loss}"


def _inside_launcher() -> bool:
    """Under torchrun/srun the world spans nodes, so local GPU count does not bound it."""
    return "WORLD_SIZE" in os.environ or "SLURM_NTASKS" in os.environ


def format_text(report: Report, config: str | None) -> str:
    rows = [("python", f"{report.python} ({report.platform})"), ("torch", report.torch or "MISSING"),
            ("cuda", report.cuda or "-"), ("nccl", report.nccl or "-")]
    rows += [(dist, version or "-") for dist, version in report.libraries.items()]
    rows.append(("nvml", report.nvml))
    rows.append(("async checkpoint", report.async_save))
    lines = [f"{name:<20} {value}" for name, value in rows]
    if report.gpus:
        for g in report.gpus:
            fp8 = "mxfp8+fp8" if g.mxfp8 else ("fp8" if g.fp8 else "no fp8")
            health = "; ".join(g.problems) or "healthy"
            temp = f", {g.temperature_c} C" if g.temperature_c is not None else ""
            ecc = f", ECC uncorrected {g.ecc_uncorrected_volatile}" if g.ecc_uncorrected_volatile is not None else ""
            lines.append(
                f"{'gpu ' + str(g.index):<20} {g.name}, cc {g.compute_capability}, "
                f"{g.memory_gib} GiB, {fp8}{temp}{ecc}: {health}"
            )
    else:
        lines.append(f"{'gpus':<20} none (CPU: ranks run on gloo)")
    lines.append(f"{'features':<20} " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in report.features.items()))
    if config is not None:
        lines.append(f"{'attention':<20} {report.attention}")
        if report.unmet:
            lines.append(f"{config}: {len(report.unmet)} unmet need(s):")
            lines.extend(f"  - {u}" for u in report.unmet)
        else:
            lines.append(f"{config}: all {len(report.needs)} need(s) met")
    return "\n".join(lines)
