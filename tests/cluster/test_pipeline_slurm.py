"""`prepare --executor slurm`: a real 4-task job array (datatrove's SlurmPipelineExecutor) plus the dependent merge
job write the same .bin/.idx/manifest as the single-process path. Needs only `sbatch --array` on the default
partition of the suite's cluster (tests/cluster/slurm_harness.sh)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("datatrove")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "corpus"))
from test_pipeline import manifest, read_all, write_corpus  # noqa: E402

from megatron_align.corpus.prepare import prepare_source, tokenizer_config_from_arg  # noqa: E402

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
WAIT_S = 900


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
    deadline = time.monotonic() + WAIT_S
    while not Path(f"{out}.manifest.json").exists() and time.monotonic() < deadline:
        queue = subprocess.run(
            ["squeue", "-h", "-n", "ma-i18-test,ma-i18-test-merge"], capture_output=True, text=True
        ).stdout
        if not queue.strip() and not Path(f"{out}.manifest.json").exists():
            time.sleep(5)  # the merge job may have just ended
            break
        time.sleep(3)
    logs = "\n".join(p.read_text()[-1500:] for p in Path(f"{out}.work").glob("logs/**/slurm_logs/*.out"))
    assert Path(f"{out}.manifest.json").exists(), f"no merged output; job logs:\n{logs}"
    assert read_all(out) == read_all(tmp_path / "local" / "web")
    assert manifest(out) == manifest(tmp_path / "local" / "web")
    assert not (Path(f"{out}.work") / "shards").exists()  # the merge job removed the shards
