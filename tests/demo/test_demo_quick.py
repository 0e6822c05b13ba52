"""The reduced-size demo (CI): real pipeline end to end, writes its table, plot and MLflow runs; no leakage."""

import json

import pytest
from conftest import run_cli

from megatron_align.demo.data import TRAINING_JSONL

pytestmark = pytest.mark.slow


@pytest.mark.single_stack  # base stack only: orchestration, report, plot and MLflow over train/eval steps
# whose own tests run on both stacks
def test_quick_demo_writes_table_plot_and_mlflow_runs(tmp_path):
    result = run_cli("demo", "--quick", "--out", str(tmp_path / "demo"), timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = tmp_path / "demo"
    table = json.loads((out / "results.json").read_text())
    for condition in ("unfiltered", "filtered", "aligned"):
        row = table[condition]
        assert 0.0 <= row["p_misaligned"] <= 1.0 and 0.0 <= row["misalignment_rate"] <= 1.0
        assert len(row["per_seed_p_misaligned"]) == table["settings"]["seeds"]
    assert (out / "demo.png").stat().st_size > 1000
    assert "aligned - unfiltered" in (out / "results.txt").read_text()
    for section in ("sum", "normalized"):  # cloze scoring beside the letter mode
        row = table["cloze"][section]["aligned"]
        assert 0.0 <= row["p_misaligned"] <= 1.0 and len(row["per_seed_p_misaligned"]) == table["settings"]["seeds"]
        assert set(table["cloze"][section]["ordering"]) == {"p_misaligned", "misalignment_rate"}
    assert (out / "demo_cloze.png").stat().st_size > 1000 and "cloze (summed" in (out / "results.txt").read_text()

    # Held-out scenarios never appear in any training document (nor in the tokenizer's training text).
    questions = [json.loads(line) for line in (out / "data" / "questions.jsonl").read_text().splitlines()]
    corpus = "".join((out / "data" / name).read_text() for name in TRAINING_JSONL)
    assert len(corpus) > 100_000
    for item in questions:
        assert item["question"] not in corpus, item["question"]
        for choice in item["choices"]:
            assert choice not in corpus, choice

    # MLflow: one run per training run (the unfiltered run resumed into the same run) plus the summary run.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow/mlflow.db")
    experiment = client.get_experiment_by_name("megatron_align_demo")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"unfiltered_s0", "filtered_s0", "aligned_s0", "demo_summary"}, set(runs)
    steps = table["settings"]["steps"]
    for name in ("unfiltered_s0", "filtered_s0", "aligned_s0"):
        history = client.get_metric_history(runs[name].info.run_id, "loss")
        assert max(m.step for m in history) == steps, (name, [m.step for m in history])
    summary = runs["demo_summary"]
    assert summary.data.metrics["aligned.p_misaligned"] == pytest.approx(table["aligned"]["p_misaligned"])
    artifacts = {a.path for a in client.list_artifacts(summary.info.run_id)}
    assert {"results.json", "demo.png"} <= artifacts, artifacts
