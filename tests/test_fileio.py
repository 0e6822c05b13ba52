"""megatron_align.fileio: atomic writes leave the old file or the new one, never a torn one or a temp file;
JSON Lines appends are whole lines and torn lines are skipped on read; sizes read as people write them."""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import pytest

from megatron_align import fileio


def test_atomic_json_replaces_and_leaves_no_temp_file(tmp_path):
    path = str(tmp_path / "state.json")
    fileio.atomic_write_json(path, {"a": 1})
    fileio.atomic_write_json(path, {"a": 2}, indent=1)
    assert json.load(open(path)) == {"a": 2}
    assert os.listdir(tmp_path) == ["state.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temp_file(tmp_path):
    path = str(tmp_path / "state.json")
    fileio.atomic_write_text(path, "old")
    with pytest.raises(TypeError):  # not JSON-serialisable: fails while writing
        fileio.atomic_write_json(path, {"a": object()})
    with pytest.raises(RuntimeError), fileio.atomic_open(path) as f:
        f.write("half")
        raise RuntimeError("crash mid-write")
    assert open(path).read() == "old"
    assert os.listdir(tmp_path) == ["state.json"]


def test_atomic_open_refuses_read_and_append_modes(tmp_path):
    with pytest.raises(ValueError, match="mode"), fileio.atomic_open(str(tmp_path / "x"), "a"):
        pass


def test_a_full_disk_leaves_no_temp_file(tmp_path, monkeypatch):
    def no_space(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(OSError):
        fileio.atomic_write_bytes(str(tmp_path / "blob"), b"x" * 10)
    assert os.listdir(tmp_path) == []


def _append_many(path: str, worker: int) -> None:
    for i in range(200):
        fileio.append_jsonl(path, {"worker": worker, "i": i, "pad": "x" * 500})


def test_appends_from_several_processes_are_whole_lines(tmp_path):
    path = str(tmp_path / "sub" / "log.jsonl")
    procs = [mp.get_context("fork").Process(target=_append_many, args=(path, w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    records = fileio.read_jsonl(path)
    assert len(records) == 600 and sorted({r["worker"] for r in records}) == [0, 1, 2]


def test_torn_and_foreign_lines_are_skipped_and_since_and_offset_filter(tmp_path):
    path = str(tmp_path / "r.jsonl")
    fileio.append_jsonl(path, {"time": 1.0, "n": 1})
    offset = fileio.file_size(path)
    fileio.append_jsonl(path, {"time": 5.0, "n": 2})
    with open(path, "a") as f:
        f.write('[1, 2]\n{"time": 9.0, "n": 3\n')  # a non-object line, then a torn last line
    assert [r["n"] for r in fileio.read_jsonl(path)] == [1, 2]
    assert [r["n"] for r in fileio.read_jsonl(path, since=2.0)] == [2]
    assert [r["n"] for r in fileio.read_jsonl(path, offset=offset)] == [2]
    assert fileio.read_jsonl(str(tmp_path / "absent.jsonl")) == []
    assert fileio.file_size(str(tmp_path / "absent.jsonl")) == 0


@pytest.mark.parametrize("value, binary, text", [
    (None, False, "unknown"), (999, False, "999 B"), (1500, False, "1.5 kB"), (2.5e9, False, "2.5 GB"),
    (1536, True, "1.5 KiB"), (3 * 1024**3, True, "3.0 GiB"), (2e18, False, "2,000.0 PB"),
])
def test_human_bytes(value, binary, text):
    assert fileio.human_bytes(value, binary=binary) == text


def test_human_count():
    counts = [fileio.human_count(n) for n in (12, 1234, 5.6e6, 7.89e9, 1e12)]
    assert counts == ["12", "1.23K", "5.60M", "7.89B", "1.00T"]
