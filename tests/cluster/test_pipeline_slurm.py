"""`prepare --executor slurm`: a real 4-task job array (datatrove's SlurmPipelineExecutor) plus the dependent merge
job write the same .bin/.idx/manifest as the single-process path. Needs only `sbatch --array` on the default
partition of the suite's cluster (tests/cluster/slurm_harness.sh)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("datatrove")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "corpus"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "synth"))
from stub_openai import StubServer  # noqa: E402
from test_decontam import ITEMS, planted_corpus  # noqa: E402
from test_pipeline import manifest, read_all, write_corpus  # noqa: E402
from test_synth_generate import NUM_ITEMS, stub_taxonomy  # noqa: E402

from megatron_align.corpus.prepare import prepare_source, tokenizer_config_from_arg  # noqa: E402

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
WAIT_S = 900


def wait_for(path: Path, job_names: str, work: Path) -> str:
    """Wait until ``path`` exists or the jobs left the queue; returns the jobs' log tails (for a failure message)."""
    deadline = time.monotonic() + WAIT_S
    while not path.exists() and time.monotonic() < deadline:
        queue = subprocess.run(["squeue", "-h", "-n", job_names], capture_output=True, text=True).stdout
        if not queue.strip() and not path.exists():
            time.sleep(5)  # the merge job may have just ended
            break
        time.sleep(3)
    return "\n".join(p.read_text()[-1500:] for p in work.glob("logs/**/slurm_logs/*.out"))


def test_job_array_prepare_equals_local(cluster, tmp_path):
    inputs = [str(p) for p in write_corpus(tmp_path / "in", num_files=4)]
    prepare_source(inputs, str(tmp_path / "local" / "web"), tokenizer_config_from_arg("byte", None))
    out = tmp_path / "slurm" / "web"
    proc = subprocess.run([sys.executable, "-m", "megatron_align.cli", "prepare", *inputs, "--output-prefix", str(out),
                           "--executor", "slurm", "--tasks", "4", "--time", "00:20:00", "--job-name", "ma-i18-test"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "submitted SLURM jobs" in proc.stdout
    script = (Path(f"{out}.work") / "logs" / "tasks-4" / "shards" / "launch_script.slurm").read_text()
    assert "#SBATCH --array=0-3" in script and "#SBATCH --time=00:20:00" in script
    logs = wait_for(Path(f"{out}.manifest.json"), "ma-i18-test,ma-i18-test-merge", Path(f"{out}.work"))
    assert Path(f"{out}.manifest.json").exists(), f"no merged output; job logs:\n{logs}"
    assert read_all(out) == read_all(tmp_path / "local" / "web")
    assert manifest(out) == manifest(tmp_path / "local" / "web")
    assert not (Path(f"{out}.work") / "shards").exists()  # the merge job removed the shards


def test_synth_generate_and_decontam_job_arrays_equal_local(cluster, tmp_path):
    """issue 24: `synth generate --executor slurm --tasks 2` against the stub server writes the documents of one
    process; `decontam --executor slurm --tasks 2` is byte-identical to local."""
    taxonomy = stub_taxonomy(tmp_path)
    planted_corpus(tmp_path)
    decontam = ["decontam", str(tmp_path / "corpus.jsonl"), str(tmp_path / "corpus.parquet"), "--items", ITEMS,
                "--ngram", "8"]
    with StubServer([("doc", {})] * NUM_ITEMS) as stub:
        generate = ["synth", "generate", taxonomy, "--endpoint", stub.endpoint, "--model", "stub"]
        submitted = [subprocess.run([sys.executable, "-m", "megatron_align.cli", *args, "--executor", "slurm",
                                     "--tasks", "2", "--time", "00:20:00", "--job-name", name],
                                    capture_output=True, text=True, timeout=300, cwd=REPO)
                     for args, name in ((generate + ["--out-dir", str(tmp_path / "gen-slurm")], "ma-i24-gen"),
                                        (decontam + ["--out-dir", str(tmp_path / "dc-slurm")], "ma-i24-dc"))]
        for proc in submitted:
            assert proc.returncode == 0 and "submitted SLURM jobs" in proc.stdout, proc.stderr[-3000:]
        local = subprocess.run([sys.executable, "-m", "megatron_align.cli", *generate, "--out-dir",
                                str(tmp_path / "gen-local")], capture_output=True, text=True, timeout=300, cwd=REPO)
        assert local.returncode == 0, local.stderr[-3000:]
        logs = wait_for(tmp_path / "gen-slurm" / "report.json", "ma-i24-gen,ma-i24-gen-merge",
                        tmp_path / "gen-slurm" / "pipeline")
    assert (tmp_path / "gen-slurm" / "report.json").exists(), f"no finalized output; job logs:\n{logs}"
    assert sorted(p.name for p in (tmp_path / "gen-slurm").glob("generations*")) == [
        "generations.task-00000.jsonl", "generations.task-00001.jsonl"]
    documents = [(tmp_path / d / "documents.jsonl").read_bytes() for d in ("gen-slurm", "gen-local")]
    assert documents[0] == documents[1] and documents[0].count(b"\n") == NUM_ITEMS
    logs = wait_for(tmp_path / "dc-slurm" / "report.json", "ma-i24-dc,ma-i24-dc-merge", tmp_path / "dc-slurm.work")
    assert (tmp_path / "dc-slurm" / "report.json").exists(), f"no merged output; job logs:\n{logs}"
    proc = subprocess.run([sys.executable, "-m", "megatron_align.cli", *decontam, "--out-dir",
                           str(tmp_path / "dc-local")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("kept.jsonl", "contaminated.jsonl"):
        assert (tmp_path / "dc-slurm" / name).read_bytes() == (tmp_path / "dc-local" / name).read_bytes()
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("dc-slurm", "dc-local")]
    for report in reports:
        assert report.pop("outputs")["kept"].startswith(report["inputs"][0].rsplit("/", 1)[0])  # its own out dir
    assert reports[0] == reports[1] and reports[0]["contaminated"] == 14
