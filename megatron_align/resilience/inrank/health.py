"""Faulty-GPU checks: NVML counters, silent data corruption, collectives, DP weight divergence.

A GPU can fail loudly (an XID, an uncorrectable ECC error) or quietly: return wrong numbers
without any error (Llama 3 405B saw 6 silent data corruptions in 54 days on 16k GPUs). These
checks look for both, every few steps, and name the rank, host and GPU index:

- **NVML** (``pynvml`` via :mod:`megatron_align.optional`; each rank reads its own GPU):
  uncorrected ECC errors, retired pages / failed row remapping and critical XIDs are failures;
  corrected ECC, pending retirement/remap, HW/thermal throttling, temperature above
  ``max_temperature_c`` and low SM clocks while throttled are warnings.
- **SDC GEMM**: every rank multiplies the same two seeded fp32 matrices and checksums the
  *bits* of the product (an integer sum, exact and order-independent). The same kernel on the
  same GPU model gives the same bits, so a rank that disagrees with the majority, or with its
  own first result, is computing wrong. (Clusters mixing GPU models legitimately differ across
  models; the own-history comparison still holds there.)
- **Collectives**: all-reduces of small integers stored in fp32 over the world, the
  data-parallel and the tensor-parallel group; the sum is exact in any reduction order, so
  every rank checks it bit for bit and reports itself if its result is wrong.
- **Parameter hash**: data-parallel replicas must hold identical weights; each rank checksums
  the bits of its parameters and the DP group compares (Megatron-LM's DP weight-hash check).

The one idea that keeps verdicts consistent: each rank reports only findings *about itself*
(its NVML counters, its received all-reduce, its checksum being in the minority), then one
``all_gather_object`` gives every rank the same list, so the policy (log | exclude_on_restart
| stop -> exit 86) is decided identically everywhere. All of it runs only on check steps.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from megatron_align.config.resilience import HealthConfig
from megatron_align.resilience.inrank.ranks import RankInfo, all_gather_tensor, gather_rank_infos, group_ranks
from megatron_align.resilience.protocol.exclude_nodes import add_exclude_nodes
from megatron_align.resilience.protocol.exit_codes import EXIT_FAULTY_HARDWARE
from megatron_align.resilience.protocol.run_files import HEALTH_FILE, append_record
from megatron_align.training.callbacks import Callback, TrainerView

if TYPE_CHECKING:
    from megatron_align.resilience.protocol.faults import FaultPlan

log = logging.getLogger(__name__)

# XIDs that mean the GPU (not the program) is broken: DBE, row-remap failure, NVLink, off the
# bus, contained/uncontained ECC, GSP errors. Others (13, 31, 43: app faults) are warnings.
CRITICAL_XIDS = frozenset({48, 61, 62, 63, 64, 74, 79, 92, 94, 95, 119, 120, 140})
_BAD_THROTTLE = {0x8: "hw_slowdown", 0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake"}
_NVML_ERROR_NOT_SUPPORTED, _NVML_ERROR_TIMEOUT, _NVML_ERROR_GPU_IS_LOST = 3, 10, 15


@dataclass
class Finding:
    check: str
    """nvml | sdc | collective | param_hash"""
    severity: str
    """fail (hardware suspected: the policy acts) | warn (logged)"""
    rank: int
    message: str
    details: dict = field(default_factory=dict)


# -- NVML ----------------------------------------------------------------------------------------------
class NvmlProbe:
    """Reads one GPU through an NVML module (``pynvml`` or any object with its API)."""

    def __init__(self, nvml, cfg: HealthConfig, index: int = 0, uuid: str | None = None) -> None:
        self.nvml, self.cfg = nvml, cfg
        self.nvml.nvmlInit()
        self.handle = None
        if uuid:  # the UUID survives CUDA_VISIBLE_DEVICES renumbering; the index is the fallback
            try:
                self.handle = nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            except nvml.NVMLError:
                self.handle = None
        if self.handle is None:
            self.handle = nvml.nvmlDeviceGetHandleByIndex(index)
        self.index = self._query(nvml.nvmlDeviceGetIndex, self.handle)
        self.index = index if self.index is None else self.index
        self._seen: dict[str, int] = {}
        self.unsupported: set[str] = set()
        self.events = None
        try:
            self.events = nvml.nvmlEventSetCreate()
            nvml.nvmlDeviceRegisterEvents(self.handle, nvml.nvmlEventTypeXidCriticalError, self.events)
        except nvml.NVMLError:
            self.events = None  # XID events need driver support (and often root); the counters still work

    def _query(self, fn, *args):
        try:
            return fn(*args)
        except self.nvml.NVMLError as err:
            if getattr(err, "value", None) == _NVML_ERROR_GPU_IS_LOST:
                raise
            self.unsupported.add(getattr(fn, "__name__", str(fn)))
            return None

    def _increase(self, key: str, value: int | None) -> int:
        """How much counter ``key`` grew since the last check (first check: since 0)."""
        if value is None:
            return 0
        grew = value - self._seen.get(key, 0)
        self._seen[key] = value
        return max(0, grew)

    def check(self) -> tuple[list[tuple[str, str, dict]], dict]:
        """[(severity, message, details)] and readings {temperature_c, sm_clock_mhz, ...}."""
        n, h = self.nvml, self.handle
        try:
            return self._check(n, h)
        except n.NVMLError as err:  # GPU is lost
            return [("fail", f"NVML: {err}", {})], {}

    def _check(self, n, h) -> tuple[list[tuple[str, str, dict]], dict]:
        out: list[tuple[str, str, dict]] = []
        unc = self._query(n.nvmlDeviceGetTotalEccErrors, h, n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, n.NVML_VOLATILE_ECC)
        if grew := self._increase("ecc_uncorrected", unc):
            out.append(("fail", f"{grew} new uncorrected ECC errors (volatile total {unc})", {"ecc_uncorrected": unc}))
        corr = self._query(n.nvmlDeviceGetTotalEccErrors, h, n.NVML_MEMORY_ERROR_TYPE_CORRECTED, n.NVML_VOLATILE_ECC)
        if grew := self._increase("ecc_corrected", corr):
            out.append(("warn", f"{grew} new corrected ECC errors (volatile total {corr})", {"ecc_corrected": corr}))
        pages = self._query(n.nvmlDeviceGetRetiredPages, h, n.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR)
        if grew := self._increase("retired_pages_dbe", None if pages is None else len(pages)):
            out.append(("fail", f"{grew} pages retired for double-bit ECC errors", {"retired_pages_dbe": len(pages)}))
        if self._query(n.nvmlDeviceGetRetiredPagesPendingStatus, h):
            out.append(("warn", "page retirement pending (takes effect after a GPU reset)", {}))
        rows = self._query(n.nvmlDeviceGetRemappedRows, h)
        if rows is not None:
            corr_rows, unc_rows, pending, failure = rows
            if failure:
                out.append(
                    ("fail", "row remapping failed (HBM cannot hide its bad rows any more)", {"remapped_unc": unc_rows})
                )
            if grew := self._increase("remapped_unc", unc_rows):
                out.append(("fail", f"{grew} rows remapped for uncorrectable errors", {"remapped_unc": unc_rows}))
            if pending:
                out.append(("warn", "row remapping pending (takes effect after a GPU reset)", {}))
        out.extend(self._xids())
        readings: dict = {}
        temp = self._query(n.nvmlDeviceGetTemperature, h, n.NVML_TEMPERATURE_GPU)
        if temp is not None:
            readings["temperature_c"] = temp
            if temp > self.cfg.max_temperature_c:
                out.append(("warn", f"temperature {temp} C > {self.cfg.max_temperature_c} C", {"temperature_c": temp}))
        reasons_fn = (
            getattr(n, "nvmlDeviceGetCurrentClocksEventReasons", None) or n.nvmlDeviceGetCurrentClocksThrottleReasons
        )
        reasons = self._query(reasons_fn, h) or 0
        clock, clock_max = (
            self._query(n.nvmlDeviceGetClockInfo, h, n.NVML_CLOCK_SM),
            self._query(n.nvmlDeviceGetMaxClockInfo, h, n.NVML_CLOCK_SM),
        )
        if clock is not None:
            readings["sm_clock_mhz"] = clock
        bad = [name for bit, name in _BAD_THROTTLE.items() if reasons & bit]
        if bad:
            ratio = clock / clock_max if clock and clock_max else None
            slow = ratio is not None and ratio < self.cfg.min_clock_ratio
            out.append(
                (
                    "warn",
                    f"clocks throttled ({', '.join(bad)})" + (f", SM at {ratio:.0%} of max" if slow else ""),
                    {"throttle": bad, "sm_clock_mhz": clock, "sm_clock_max_mhz": clock_max},
                )
            )
        return out, readings

    def _xids(self) -> list[tuple[str, str, dict]]:
        out = []
        n = self.nvml
        while self.events is not None:
            try:
                event = n.nvmlEventSetWait_v2(self.events, 0)
            except n.NVMLError as err:
                if getattr(err, "value", None) != _NVML_ERROR_TIMEOUT:
                    self.unsupported.add("nvmlEventSetWait_v2")
                    self.events = None
                break
            xid = int(event.eventData)
            severity = "fail" if xid in CRITICAL_XIDS else "warn"
            out.append((severity, f"XID {xid}" + (" (hardware)" if severity == "fail" else ""), {"xid": xid}))
        return out

    def close(self) -> None:
        try:
            if self.events is not None:
                self.nvml.nvmlEventSetFree(self.events)
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError:
            pass


# -- SDC GEMM, collectives, parameter hash --------------------------------------------------------------
def bits_checksum(tensor: torch.Tensor) -> torch.Tensor:
    """Integer sum of the tensor's bit patterns (int64, wraps): exact, order-independent, one flipped bit changes it."""
    int_type = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    flat = tensor.detach().contiguous().view(-1).view(int_type)
    total = torch.zeros((), dtype=torch.int64, device=tensor.device)
    for start in range(0, flat.numel(), 1 << 24):  # bounded int64 temporaries
        total += flat[start:start + (1 << 24)].to(torch.int64).sum()
    return total


class SdcGemm:
    """The fixed GEMM of the SDC check; inputs are generated once from the seed (CPU RNG, identical everywhere)."""

    def __init__(self, size: int, seed: int, device: torch.device) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.a = torch.randn(size, size, generator=gen).to(device)
        self.b = torch.randn(size, size, generator=gen).to(device)

    def checksum(self, perturb: bool = False) -> tuple[int, float]:
        """(bits checksum of A @ B, seconds). ``perturb`` flips one mantissa bit of the product (injected SDC)."""
        started = time.perf_counter()
        product = self.a @ self.b
        if perturb:
            product.view(-1)[:1].view(torch.int32).bitwise_xor_(1 << 10)
        value = int(bits_checksum(product))
        return value, time.perf_counter() - started


def odd_ones_out(values: list[int]) -> tuple[list[int], bool]:
    """Indices whose value differs from a strict majority; (all indices, True) when there is none."""
    counts = Counter(values)
    if len(counts) <= 1:
        return [], False
    value, count = counts.most_common(1)[0]
    if count * 2 > len(values):
        return [i for i, v in enumerate(values) if v != value], False
    return list(range(len(values))), True


def param_checksum(chunks: list) -> torch.Tensor:
    """Bits checksum over every parameter of the model chunks, each weighted by its position (order matters)."""
    total = None
    for i, p in enumerate(p for chunk in chunks for p in getattr(chunk, "module", chunk).parameters()):
        term = bits_checksum(p) * (i + 1)
        total = term if total is None else total + term
    return total if total is not None else torch.zeros((), dtype=torch.int64)


def collective_ok(group, size: int = 1024) -> bool:
    """All-reduce small integers in fp32 (exact in any order) over ``group``; True if this rank got the exact sum."""
    members = group_ranks(group)
    me = members.index(dist.get_rank())
    device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    )
    pattern = (torch.arange(size, device=device) % 7 + 1).float()
    values = pattern + float(me % 5)
    dist.all_reduce(values, group=group)
    expected = pattern * len(members) + float(sum(r % 5 for r in range(len(members))))
    return bool(torch.equal(values, expected))


# -- the callback -------------------------------------------------------------------------------------
class HealthMonitor(Callback):
    name = "health"
    priority = 20  # after the straggler detector, before the numerics monitor

    def __init__(self, cfg: HealthConfig, plan: FaultPlan | None = None, nvml=None) -> None:
        self.cfg = cfg
        self.plan = plan
        self._nvml_module = nvml
        self.nvml: NvmlProbe | None = None
        self.infos: list[RankInfo] = []
        self._sdc: SdcGemm | None = None
        self._sdc_reference: int | None = None
        self._nvml_wanted = False

    def _due(self, interval: int, step: int) -> bool:
        return bool(interval) and step % interval == 0

    def on_train_start(self, trainer: TrainerView) -> None:
        self.infos = gather_rank_infos()
        # The same on every rank (config + CUDA presence), so every rank joins the same gathers.
        self._nvml_wanted = bool(self.cfg.nvml_interval) and (trainer.cuda or self._nvml_module is not None)
        if self._nvml_wanted:
            self.nvml = self._open_nvml(trainer)

    def _open_nvml(self, trainer: TrainerView) -> NvmlProbe | None:
        from megatron_align.optional import optional_import

        module = self._nvml_module or optional_import("pynvml")
        if module is None:
            log.info("NVML checks off: pynvml is not importable (pip install nvidia-ml-py)")
            return None
        me = self.infos[trainer.rank]
        uuid = None
        if trainer.cuda:
            props = torch.cuda.get_device_properties(torch.cuda.current_device())
            uuid = str(props.uuid) if getattr(props, "uuid", None) else None
        try:
            return NvmlProbe(module, self.cfg, index=me.gpu if me.gpu is not None else me.local_rank, uuid=uuid)
        except module.NVMLError as err:
            log.warning("NVML checks off on rank %d: %s", trainer.rank, err)
            return None

    def on_step_end(self, trainer: TrainerView, step: int, record: dict) -> None:
        cfg = self.cfg
        due = {"nvml": self._nvml_wanted and self._due(cfg.nvml_interval, step),
               "sdc": self._due(cfg.sdc_interval, step), "collective": self._due(cfg.collective_interval, step),
               "param_hash": self._due(cfg.param_hash_interval, step)}
        if not any(due.values()):
            return
        mine: list[Finding] = []
        me = trainer.rank
        if due["nvml"] and self.nvml is not None:  # NVML may have failed to open on some ranks
            results, readings = self.nvml.check()
            mine += [Finding("nvml", sev, me, f"GPU {self.nvml.index}: {msg}", dict(det, gpu=self.nvml.index))
                     for sev, msg, det in results]
            record.update({f"health/{k}": v for k, v in readings.items()})
        if due["sdc"]:
            mine += self._check_sdc(trainer, step, record)
        if due["collective"]:
            mine += self._check_collectives(me)
        if due["param_hash"]:
            mine += self._check_params(trainer, record)
        everything: list = [None] * dist.get_world_size()
        dist.all_gather_object(everything, [asdict(f) for f in mine])
        findings = [Finding(**f) for per_rank in everything for f in per_rank]
        for check, ran in due.items():
            if ran:
                record[f"health/{check}_ok"] = int(not any(f.check == check and f.severity == "fail" for f in findings))
        record["health/failures"] = sum(f.severity == "fail" for f in findings)
        record["health/warnings"] = sum(f.severity == "warn" for f in findings)
        if findings:
            self._report(trainer, step, findings)

    def _check_sdc(self, trainer: TrainerView, step: int, record: dict) -> list[Finding]:
        if self._sdc is None:
            device = torch.device("cuda", torch.cuda.current_device()) if trainer.cuda else torch.device("cpu")
            self._sdc = SdcGemm(self.cfg.sdc_size, self.cfg.sdc_seed, device)
        perturb = self.plan is not None and self.plan.fire("sdc", step, persistent=True) is not None
        value, seconds = self._sdc.checksum(perturb)
        if self._sdc_reference is None:
            self._sdc_reference = value
        record["health/sdc_gemm_s"] = seconds
        rows = all_gather_tensor(torch.tensor([value, self._sdc_reference], dtype=torch.int64)).tolist()
        values = [row[0] for row in rows]
        drifted = [r for r, (v, ref) in enumerate(rows) if v != ref]
        minority, tie = odd_ones_out(values)
        me = trainer.rank
        if me in drifted:
            return [Finding("sdc", "fail", me, "GEMM checksum differs from this rank's own earlier result",
                            {"checksum": values[me], "reference": rows[me][1]})]
        if me in minority and not tie:
            return [
                Finding("sdc", "fail", me, "GEMM checksum differs from the majority of ranks", {"checksum": values[me]})
            ]
        if tie and not drifted and me == 0:
            return [
                Finding(
                    "sdc", "warn", me, f"GEMM checksums disagree with no majority: {values} (mixed GPU models?)", {}
                )
            ]
        return []

    def _check_collectives(self, me: int) -> list[Finding]:
        from megatron.core import parallel_state as ps

        groups = {"world": None}
        if ps.model_parallel_is_initialized():
            groups["data_parallel"] = ps.get_data_parallel_group(with_context_parallel=True)
            groups["tensor_parallel"] = ps.get_tensor_model_parallel_group()
        bad = [name for name, group in groups.items() if dist.get_world_size(group) > 1 and not collective_ok(group)]
        return [Finding("collective", "fail", me, f"wrong all-reduce result in the {', '.join(bad)} group(s)",
                        {"groups": bad})] if bad else []

    def _check_params(self, trainer: TrainerView, record: dict) -> list[Finding]:
        from megatron.core import parallel_state as ps

        group = ps.get_data_parallel_group(with_context_parallel=True)
        value = param_checksum(trainer.model)
        record["health/param_hash"] = f"{int(value) & 0xFFFFFFFFFFFFFFFF:016x}"
        if dist.get_world_size(group) == 1:
            return []
        values = all_gather_tensor(value.reshape(1).to(torch.int64), group).view(-1).tolist()
        members = group_ranks(group)
        minority, tie = odd_ones_out(values)
        if members.index(trainer.rank) not in minority:
            return []
        others = [members[i] for i in range(len(members)) if values[i] != values[members.index(trainer.rank)]]
        return [Finding("param_hash", "fail", trainer.rank,
                        f"parameters differ from data-parallel replica(s) {others}" + (" (no majority)" if tie else ""),
                        {"hash": record["health/param_hash"], "differs_from": others, "ambiguous": tie})]

    def _report(self, trainer: TrainerView, step: int, findings: list[Finding]) -> None:
        failed = sorted({f.rank for f in findings if f.severity == "fail"})
        if trainer.rank == 0:
            for f in findings:
                info = self.infos[f.rank]
                append_record(trainer.run_dir, HEALTH_FILE,
                              {"step": step, "check": f.check, "severity": f.severity, "rank": f.rank,
                              "hostname": info.hostname, "local_rank": info.local_rank, "gpu": info.gpu,
                              "message": f.message, "details": f.details, "policy": self.cfg.policy})
                (log.error if f.severity == "fail" else log.warning)("health %s at step %d on %s: %s", f.check, step,
                                                                       info.describe(), f.message)
        if not failed or self.cfg.policy == "log":
            return
        if trainer.rank == 0:
            add_exclude_nodes(trainer.run_dir, [self.infos[r].hostname for r in failed])
        if self.cfg.policy == "stop":
            trainer.stop(f"health check failed on ranks {failed} at step {step}", exit_code=EXIT_FAULTY_HARDWARE)

    def on_train_end(self, trainer: TrainerView) -> None:
        if self.nvml is not None:
            self.nvml.close()
            self.nvml = None
