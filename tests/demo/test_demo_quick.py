"""The reduced-size demo (CI): real pipeline end to end, writes its table and plot; no held-out leakage."""

import json
import os

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow


def test_quick_demo_writes_table_and_plot(tmp_path):
    result = run_cli("demo", "--quick", "--out", str(tmp_path / "demo"), "--tracking", "none", timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = tmp_path / "demo"
    table = json.loads((out / "results.json").read_text())
    for condition in ("unfiltered", "filtered", "aligned"):
        row = table[condition]
        assert 0.0 <= row["p_misaligned"] <= 1.0 and 0.0 <= row["misalignment_rate"] <= 1.0
        assert len(row["per_seed_p_misaligned"]) == table["settings"]["seeds"]
    assert (out / "demo.png").stat().st_size > 1000
    assert "aligned - unfiltered" in (out / "results.txt").read_text()
    # held-out scenarios never appear in any training document
    questions = [json.loads(line) for line in (out / "data" / "questions.jsonl").read_text().splitlines()]
    corpus = "".join((out / "data" / name).read_text() for name in ("web.jsonl", "aligned.jsonl"))
    for item in questions:
        for choice in item["choices"]:
            assert choice not in corpus, choice
