"""Storage faults (issue 15): a full disk is a named verdict, never a traceback or a restart loop.

The end-to-end tests run on a real small filesystem (a tmpfs this test mounts, root only: they
skip with the reason otherwise); the ``disk_full@S`` drill and the unit tests need no mount.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import uuid

import pytest
from conftest import REPO, run_cli, tiny_config, write_yaml

from megatron_align.resilience.protocol import storage
from megatron_align.resilience.supervisor.failures import classify_rank, root_cause
from megatron_align.training.checksums import verify_checkpoint
from megatron_align.training.metrics import read_metrics

STEPS8 = dict(train={"steps": 8})  # checkpoints at 2, 4, 6, 8 (interval 2), ~3 MB each


@pytest.fixture
def small_fs(tmp_path):
    """Mount a tmpfs of the given size (MiB) and return its path; always unmounted afterwards."""
    mounts = []

    def mount(size_mib: int) -> str:
        if os.geteuid() != 0:
            pytest.skip("needs root to mount a small tmpfs (a real full filesystem)")
        where = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
        where.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(where)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounts.append(str(where))
        return str(where)

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", where], check=False)


def _fill(path: str) -> None:
    with open(os.path.join(path, "filler"), "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC


def _kept(record: dict) -> dict:
    return {k: v for k, v in record.items() if not (k.endswith("_s") or "per_s" in k)}


# -- unit: the errno decides, through every wrapper ------------------------------------------------
def test_storage_errno_found_through_wrappers_not_message_text(tmp_path):
    from torch.distributed.checkpoint import CheckpointException

    try:
        try:
            raise OSError(errno.ENOSPC, "whatever the text says")
        except OSError as inner:
            raise RuntimeError("Worker failure: boom") from inner
    except RuntimeError as wrapped:
        chained = wrapped
    assert storage.storage_errno(chained) == errno.ENOSPC
    assert storage.storage_errno(CheckpointException("write", {1: (OSError(errno.EDQUOT, "x"), None)})) == errno.EDQUOT
    assert storage.storage_errno(RuntimeError("[Errno 28] No space left on device")) is None  # text alone: no
    assert storage.storage_errno(OSError(errno.ENOENT, "missing")) is None
    err = storage.from_os_error(OSError(errno.EROFS, "ro", str(tmp_path / "f")), str(tmp_path))
    assert err.errno == errno.EROFS and err.path == str(tmp_path / "f") and "read-only filesystem" in str(err)


def test_exit_89_is_a_non_retryable_storage_failure_that_beats_its_victims():
    culprit = root_cause([classify_rank(0, 1, ["RuntimeError: unexpected pos 704 vs 598"]),
                          classify_rank(1, 89, ["megatron-align train: storage failure on rank 1: ..."])])
    assert (culprit.cause, culprit.rank, culprit.retryable) == ("storage", 1, False)


def test_disk_full_drill_stops_before_writing_with_the_verdict(tmp_path, tiny_corpus):
    """disk_full@3: the save at step 4 is refused before anything is written; exit 89 with the record."""
    run = tmp_path / "run"
    config = tiny_config(run, tiny_corpus, resilience={"inject": ["disk_full@3"]})
    result = run_cli("train", write_yaml(tmp_path / "c.yaml", config))
    assert result.returncode == 89, result.stderr[-3000:]
    assert "storage failure on rank 0" in result.stderr and "checkpoint step 4 not written" in result.stderr
    assert "latest good checkpoint iter_0000002 is intact" in result.stderr and "Traceback" not in result.stderr
    assert sorted(os.listdir(run / "checkpoints")) == ["iter_0000002", "latest"]  # no .tmp_iter_0000004
    (record,) = [json.loads(x) for x in (run / "storage_failures.jsonl").read_text().splitlines()]
    assert record["errno"] == errno.ENOSPC and record["free_bytes"] == 0 and record["needed_bytes"] > 1_000_000


# -- real full filesystems -------------------------------------------------------------------------
@pytest.mark.slow
def test_train_fills_the_disk_then_resumes_after_lowering_keep_last(tmp_path, tiny_corpus, small_fs, reference_8_steps):
    """9 MiB holds two ~3 MB checkpoints: keep_last=5 stops cleanly at step 6 (iter_4 intact); keep_last=2 then
    frees iter_2 early (retention), resumes from iter_4 and matches an uninterrupted run; leftovers are removed."""
    run = os.path.join(small_fs(9), "run")
    path = write_yaml(tmp_path / "c.yaml", tiny_config(run, tiny_corpus, **STEPS8))
    result = run_cli("train", path)
    assert result.returncode == 89, result.stderr[-3000:]
    message = next(line for line in result.stderr.splitlines() if "storage failure on rank 0" in line)
    assert f"{run}/checkpoints: no space left [ENOSPC]" in message and "needs ~" in message
    assert "latest good checkpoint iter_0000004 is intact" in message and "checkpoint.keep_last" in message
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["iter_0000002", "iter_0000004", "latest"]
    assert verify_checkpoint(os.path.join(run, "checkpoints", "iter_0000004")) == []

    leftover = os.path.join(run, "checkpoints", ".tmp_iter_0000006")
    os.makedirs(leftover)  # as if a save had been killed
    result = run_cli("train", path, "checkpoint.keep_last=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not os.path.exists(leftover) and f"removed {leftover}" in result.stdout
    assert "deleting" in result.stdout and "iter_0000002 early" in result.stdout
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["iter_0000006", "iter_0000008", "latest"]
    assert [_kept(r) for r in read_metrics(os.path.join(run, "metrics.jsonl"))] == reference_8_steps


@pytest.mark.slow
def test_launch_on_a_full_disk_stops_once_with_exit_89_and_one_message(tmp_path, tiny_corpus, small_fs):
    mnt = small_fs(2)
    run = os.path.join(mnt, "run")
    os.makedirs(run)
    _fill(mnt)
    proc = subprocess.run([sys.executable, "-m", "megatron_align.cli", "launch",
                           write_yaml(tmp_path / "c.yaml", tiny_config(run, tiny_corpus)),
                           "resilience.supervisor.backoff_s=0", "resilience.supervisor.check_interval_s=0.2"],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 89, out[-4000:]
    assert "Traceback" not in out and "attempt 1" not in out  # no crash, no second attempt
    assert f"run_dir {run}: no space left (free 0 B); no checkpoint was written yet; free space, then run the " \
           "same command (not restarted" in out
    assert "cannot write" in out and "supervisor.log" in out  # its own log refused: stderr instead
    assert not [n for n in os.listdir(run) if ".tmp" in n]  # no temp files left behind


@pytest.fixture(scope="module")
def reference_8_steps(tmp_path_factory, tiny_corpus) -> list[dict]:
    """Metrics of an uninterrupted 8-step run (the baseline every storage/corruption drill must reproduce)."""
    root = tmp_path_factory.mktemp("reference8")
    result = run_cli("train", write_yaml(root / "c.yaml", tiny_config(root / "run", tiny_corpus, **STEPS8)))
    assert result.returncode == 0, result.stderr[-3000:]
    return [_kept(r) for r in read_metrics(root / "run" / "metrics.jsonl")]


@pytest.mark.slow
def test_bitflip_is_caught_by_verify_and_resume_falls_back_to_identical_metrics(
    tmp_path, tiny_corpus, reference_8_steps
):
    """One flipped bit inside a tensor of iter_6 still loads; the checksums catch it: `checkpoint verify` exits 1
    naming the file, the resume after kill@7 quarantines iter_6 (exit 88), and the run completes from iter_4."""
    run = tmp_path / "run"
    config = tiny_config(run, tiny_corpus, resilience={"inject": ["bitflip_checkpoint@6", "kill@7"]}, **STEPS8)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_align.cli",
            "launch",
            write_yaml(tmp_path / "c.yaml", config),
            "resilience.supervisor.backoff_s=0",
            "resilience.supervisor.check_interval_s=0.2",
            "resilience.supervisor.term_grace_s=3",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")},
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    crash, corrupt = [json.loads(x) for x in (run / "restarts.jsonl").read_text().splitlines()]
    assert crash["cause"] == "crash" and corrupt["cause"] == "corrupt_checkpoint" and corrupt["exit_code"] == 88
    assert corrupt["checkpoint_step"] == 4 and "checksum verification" in out and "__0_0.distcp: content changed" in out
    (failure,) = [json.loads(x) for x in (run / "checkpoint_load_failures.jsonl").read_text().splitlines()]
    assert failure["checkpoint"].endswith("iter_0000006") and failure["rank"] == 0
    assert [_kept(r) for r in read_metrics(run / "metrics.jsonl")] == reference_8_steps

    (quarantined,) = [n for n in os.listdir(run / "checkpoints") if n.startswith("iter_0000006.corrupt-")]
    bad = run_cli("checkpoint", "verify", str(run / "checkpoints" / quarantined))
    assert bad.returncode == 1 and f"{quarantined}/__0_0.distcp: content changed since the save" in bad.stderr
    good = run_cli("checkpoint", "verify", str(run / "checkpoints"))
    assert good.returncode == 0 and "iter_0000008: ok" in good.stdout, good.stdout + good.stderr


def test_enospc_inside_megatrons_writer_becomes_the_storage_verdict(tmp_path, small_fs, monkeypatch):
    """The space check is fooled (as if another job filled the disk after it), so Megatron-Core's writer really fails
    on a 2 MiB tmpfs. torch.save's zip writer loses the errno there ("unexpected pos 704 vs 598"), so the verdict
    comes from the filesystem being full; the partial save is removed and the earlier checkpoint stays."""
    import torch
    import torch.distributed as dist
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_align.parallel import cpu
    from megatron_align.training.checkpoint import CheckpointManager

    root = small_fs(2)
    if not torch.cuda.is_available():
        cpu.activate()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(20000 + os.getpid() % 20000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        manager = CheckpointManager(os.path.join(root, "ckpt"), keep_last=5, keep_every=None, async_save=False)
        small = {"w": ShardedTensor.from_rank_offsets("w", torch.ones(1000), replica_id=0)}
        manager.save(1, small, {})
        monkeypatch.setattr(manager, "_check_space", lambda step, estimate: (estimate, None, None))
        big = {"w": ShardedTensor.from_rank_offsets("w", torch.ones(2_000_000), replica_id=0)}  # 8 MB > 2 MiB
        with pytest.raises(storage.StorageError) as err:
            manager.save(2, big, {})
        assert err.value.errno == errno.ENOSPC and "latest good checkpoint iter_0000001 is intact" in str(err.value)
        assert sorted(os.listdir(os.path.join(root, "ckpt"))) == ["iter_0000001", "latest"]
        assert verify_checkpoint(os.path.join(root, "ckpt", "iter_0000001")) == []
    finally:
        dist.destroy_process_group()


def test_new_fault_kinds_parse_and_bitflip_changes_exactly_one_bit(tmp_path):
    from megatron_align.resilience.protocol.faults import damage_checkpoint, parse_fault

    assert (parse_fault("disk_full@6").kind, parse_fault("bitflip_checkpoint@4@1").rank) == ("disk_full", 1)
    for name, size in (("__0_0.distcp", 4000), ("__0_1.distcp", 9000), ("common.pt", 100)):
        (tmp_path / name).write_bytes(bytes(range(256)) * (size // 256) + bytes(size % 256))
    before = (tmp_path / "__0_1.distcp").read_bytes()
    assert damage_checkpoint(str(tmp_path), "bitflip") == [str(tmp_path / "__0_1.distcp")]  # the largest shard
    after = (tmp_path / "__0_1.distcp").read_bytes()
    assert len(after) == len(before)
    assert sum(bin(a ^ b).count("1") for a, b in zip(before, after)) == 1


def test_eval_and_verify_refuse_a_checkpoint_whose_bytes_changed(tmp_path):
    """`eval` (and `convert to-hf`, tested in tests/convert) verify before reading; same-size damage is caught."""
    from megatron_align.errors import UserError
    from megatron_align.eval.megatron_scorer import eval_model_config
    from megatron_align.training.checksums import digest_files

    ckpt = tmp_path / "iter_0000002"
    ckpt.mkdir()
    (ckpt / "__0_0.distcp").write_bytes(b"\1" * 5000)
    (ckpt / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    sums = {"algorithm": "xxh3_64", "files": digest_files(str(ckpt), ["__0_0.distcp", "metadata.json"])}
    (ckpt / "megatron_align.json").write_text(json.dumps({"step": 2, "checksums": sums, "config": {}}))
    assert verify_checkpoint(str(ckpt)) == []
    (ckpt / "__0_0.distcp").write_bytes(b"\1" * 2500 + b"\3" + b"\1" * 2499)
    with pytest.raises(UserError, match=r"failed checksum verification: .*__0_0.distcp: content changed"):
        eval_model_config(str(ckpt), tensor=1, pipeline=1, world_size=1)
    result = run_cli("checkpoint", "verify", str(ckpt))
    assert result.returncode == 1 and "__0_0.distcp: content changed since the save" in result.stderr
