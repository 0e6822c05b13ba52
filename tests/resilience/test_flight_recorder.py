"""NCCL Flight Recorder collection: dumps in the format torch writes (synthesized here: no NCCL on this machine),
read without running code, analysed for the rank whose last collective differs, and put into the hang report."""

from __future__ import annotations

import os
import pickle
import time
from types import SimpleNamespace

from conftest import tiny_config, write_yaml

from megatron_align.config import load_config
from megatron_align.resilience import flight_recorder
from megatron_align.resilience.supervisor.supervisor import Supervisor


def _entry(seq: int, op: str = "nccl:all_reduce", state: str = "completed", pg: str = "0") -> dict:
    """One ring-buffer entry as ProcessGroupNCCL records it (the fields the analysis reads, and a few more)."""
    return {"record_id": seq, "pg_id": int(pg), "process_group": (pg, "default_pg"), "collective_seq_id": seq,
            "p2p_seq_id": 0, "op_id": seq, "profiling_name": op, "time_created_ns": seq * 1000,
            "input_sizes": [[1024]], "input_dtypes": ["Float"], "output_sizes": [[1024]], "output_dtypes": ["Float"],
            "state": state, "time_discovered_started_ns": None, "time_discovered_completed_ns": None,
            "retired": state == "completed", "timeout_ms": 600000, "is_p2p": False,
            "frames": [{"name": "all_reduce", "filename": "distributed_c10d.py", "line": 2501}]}


def _dump(run_dir, rank: int, entries: list[dict]) -> None:
    os.makedirs(os.path.join(run_dir, flight_recorder.DIR), exist_ok=True)
    data = {"version": "2.4", "pg_config": {"0": {"name": "0", "desc": "default_pg", "ranks": "[0, 1, 2, 3]"}},
            "pg_status": {"0": {"last_enqueued_collective": entries[-1]["collective_seq_id"]}}, "entries": entries}
    with open(os.path.join(run_dir, flight_recorder.DIR, f"{flight_recorder.PREFIX}{rank}"), "wb") as f:
        pickle.dump(data, f)


class _Evil:
    def __reduce__(self):
        return (open, ("/tmp/flight_recorder_pwned", "w"))


def test_rank_whose_last_collective_differs_is_named(tmp_path):
    run = str(tmp_path)
    history = [_entry(10), _entry(11, "nccl:broadcast")]
    for rank in (0, 1, 3):  # waiting in all_reduce #12
        _dump(run, rank, [*history, _entry(12, state="started")])
    _dump(run, 2, history)  # rank 2 never entered #12
    text, differing = flight_recorder.describe(run, world_size=4)
    assert differing == [2]
    assert "rank 2: process group 0: last collective #11 nccl:broadcast (completed), the others' #12 " \
           "nccl:all_reduce" in text

    os.remove(os.path.join(run, flight_recorder.DIR, "rank_3"))
    with open(os.path.join(run, flight_recorder.DIR, "rank_1"), "wb") as f:
        pickle.dump(_Evil(), f)  # a dump that would run code when unpickled: refused, nothing runs
    text, differing = flight_recorder.describe(run, world_size=4)
    assert not os.path.exists("/tmp/flight_recorder_pwned")
    assert "unreadable dumps from ranks [1]" in text and "no dump from ranks [1, 3]" in text and differing == [2]

    future = time.time() + 60  # dumps older than the attempt are ignored
    assert flight_recorder.describe(run, 4, since=future) == ("", [])
    assert flight_recorder.describe(str(tmp_path / "cpu_run"), 4) == ("", [])  # gloo: no dumps, nothing said


def test_supervisor_sets_the_env_and_puts_the_dumps_in_the_hang_report(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", tiny_config(tmp_path / "run", "unused-prefix", parallel={"world_size": 4}))
    config = load_config(path, ["resilience.supervisor.stack_dump_wait_s=0.1"])
    sup = Supervisor(config, path, [], environ={"PATH": "/bin", "TORCH_NCCL_TRACE_BUFFER_SIZE": "100"})
    env = sup._rank_env(0)
    prefix = os.path.join(os.path.abspath(config.run_dir), "flight_recorder", "rank_")
    assert env["TORCH_FR_DUMP_TEMP_FILE"] == env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == prefix
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1" and env["TORCH_NCCL_TRACE_BUFFER_SIZE"] == "100"  # user's wins

    sup.attempt_started = time.time() - 1
    for rank in (0, 1, 2):
        _dump(config.run_dir, rank, [_entry(7), _entry(8, state="started")])
    _dump(config.run_dir, 3, [_entry(7)])
    job = SimpleNamespace(send_signal=lambda sig: None, terminate=lambda grace: None)
    verdict = SimpleNamespace(describe=lambda: "no progress for 60 s", suspects=[0])
    failure = sup._hang(job, verdict)
    assert failure.cause == "hang" and failure.rank == 3  # the flight recorder's rank, not the watchdog's guess
    assert "no progress for 60 s; NCCL flight recorder" in failure.detail and "rank 3: process group 0: " \
        "last collective #7 nccl:all_reduce (completed), the others' #8 nccl:all_reduce" in failure.detail
