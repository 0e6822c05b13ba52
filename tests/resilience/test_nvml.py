"""NVML checks against a stand-in NVML module (the real library cannot exist on this CPU box).

The stand-in has pynvml's function names, constants and error class; the probe code is the one
that runs on GPUs (guarded by megatron_align.optional), only the module object is swapped.
"""

from __future__ import annotations

from types import SimpleNamespace

from megatron_align.config.resilience import HealthConfig
from megatron_align.resilience.inrank.health import NvmlProbe


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


class FakeNvml:
    """pynvml-shaped: one GPU whose counters the test changes between checks."""

    NVMLError = NVMLError
    NVML_MEMORY_ERROR_TYPE_CORRECTED, NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 0, 1
    NVML_VOLATILE_ECC = 0
    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1
    NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR = 1
    nvmlEventTypeXidCriticalError = 8

    def __init__(self, events_supported: bool = True) -> None:
        self.ecc = {0: 0, 1: 0}
        self.retired_dbe: list[int] = []
        self.rows = (0, 0, 0, 0)
        self.xids: list[int] = []
        self.reasons = 0
        self.temperature = 60
        self.clock, self.clock_max = 1980, 1980
        self.events_supported = events_supported
        self.lost = False
        self.opened_with = None
        self.shut_down = False

    def nvmlInit(self): ...
    def nvmlShutdown(self): self.shut_down = True

    def nvmlDeviceGetHandleByIndex(self, index):
        self.opened_with = ("index", index)
        return "handle"

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if not uuid.startswith("GPU-1234"):
            raise NVMLError(6)  # Not Found
        self.opened_with = ("uuid", uuid)
        return "handle"

    def nvmlDeviceGetIndex(self, handle): return 3

    def _check_lost(self):
        if self.lost:
            raise NVMLError(15)

    def nvmlDeviceGetTotalEccErrors(self, handle, kind, counter):
        self._check_lost()
        return self.ecc[kind]

    def nvmlDeviceGetRetiredPages(self, handle, cause): return list(self.retired_dbe)
    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle): raise NVMLError(3)  # Not Supported on Hopper
    def nvmlDeviceGetRemappedRows(self, handle): return self.rows

    def nvmlEventSetCreate(self): return "events"

    def nvmlDeviceRegisterEvents(self, handle, types, events):
        if not self.events_supported:
            raise NVMLError(4)  # No Permission

    def nvmlEventSetWait_v2(self, events, timeout_ms):
        if not self.xids:
            raise NVMLError(10)  # Timeout: no event pending
        return SimpleNamespace(eventType=8, eventData=self.xids.pop(0))

    def nvmlEventSetFree(self, events): ...
    def nvmlDeviceGetCurrentClocksEventReasons(self, handle): return self.reasons
    def nvmlDeviceGetTemperature(self, handle, sensor): return self.temperature
    def nvmlDeviceGetClockInfo(self, handle, kind): return self.clock
    def nvmlDeviceGetMaxClockInfo(self, handle, kind): return self.clock_max


def _messages(results):
    return [(sev, msg) for sev, msg, _ in results]


def test_healthy_gpu_reports_readings_and_nothing_else():
    nvml = FakeNvml()
    probe = NvmlProbe(nvml, HealthConfig(), index=1, uuid="GPU-1234")
    assert nvml.opened_with == ("uuid", "GPU-1234") and probe.index == 3
    results, readings = probe.check()
    assert results == [] and readings == {"temperature_c": 60, "sm_clock_mhz": 1980}
    assert "nvmlDeviceGetRetiredPagesPendingStatus" in probe.unsupported
    probe.close()
    assert nvml.shut_down
    NvmlProbe(nvml, HealthConfig(), index=2, uuid="1234-abcd")  # torch may omit the "GPU-" prefix
    assert nvml.opened_with == ("uuid", "GPU-1234-abcd")
    NvmlProbe(nvml, HealthConfig(), index=2, uuid="GPU-9999")  # unknown UUID: fall back to the index
    assert nvml.opened_with == ("index", 2)


def test_failures_and_warnings_are_classified_and_reported_once():
    nvml = FakeNvml()
    probe = NvmlProbe(nvml, HealthConfig(max_temperature_c=85, min_clock_ratio=0.6), index=0)
    assert nvml.opened_with == ("index", 0)
    nvml.ecc = {0: 12, 1: 2}
    nvml.retired_dbe = [0x1000]
    nvml.rows = (1, 1, 1, 0)
    nvml.xids = [13, 79]
    nvml.reasons = 0x40 | 0x1  # HW thermal slowdown (+ idle, which is harmless)
    nvml.temperature, nvml.clock = 93, 900
    results, readings = probe.check()
    fails = [msg for sev, msg in _messages(results) if sev == "fail"]
    warns = [msg for sev, msg in _messages(results) if sev == "warn"]
    assert fails == ["2 new uncorrected ECC errors (volatile total 2)", "1 pages retired for double-bit ECC errors",
                     "1 rows remapped for uncorrectable errors", "XID 79 (hardware)"]
    assert warns == ["12 new corrected ECC errors (volatile total 12)",
                     "row remapping pending (takes effect after a GPU reset)", "XID 13", "temperature 93 C > 85 C",
                     "clocks throttled (hw_thermal), SM at 45% of max"]
    assert readings == {"temperature_c": 93, "sm_clock_mhz": 900}
    # Same counters next time: only the standing conditions repeat, counters do not re-fire.
    nvml.rows, nvml.reasons, nvml.temperature = (1, 1, 0, 0), 0, 70
    assert probe.check()[0] == []
    nvml.ecc[1] = 3
    assert _messages(probe.check()[0]) == [("fail", "1 new uncorrected ECC errors (volatile total 3)")]
    nvml.rows = (1, 1, 0, 1)
    assert ("fail", "row remapping failed (HBM cannot hide its bad rows any more)") in _messages(probe.check()[0])


def test_xid_events_unavailable_and_lost_gpu():
    nvml = FakeNvml(events_supported=False)
    probe = NvmlProbe(nvml, HealthConfig(), index=0)
    assert probe.events is None
    nvml.xids = [79]
    assert probe.check()[0] == []  # counters still checked; XIDs need event support
    nvml.lost = True
    results, _ = probe.check()
    assert [sev for sev, _, _ in results] == ["fail"] and "NVML error 15" in results[0][1]
