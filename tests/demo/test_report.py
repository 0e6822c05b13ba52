"""The demo's results table: per-condition mean ± SEM over seeds and the per-seed differences to unfiltered."""

import math

import pytest

from megatron_align.demo.report import format_table, plot, summarize, table_metrics


def _report(rate, p_mis, p_first=0.5):
    return {"summary": {"misalignment_rate": {"mean": rate}, "p_misaligned": {"mean": p_mis},
                        "p_first": {"mean": p_first}}}


def test_summary_statistics_and_per_seed_differences(tmp_path):
    results = {"unfiltered": [_report(0.7, 0.60), _report(0.5, 0.52)],
               "filtered": [_report(0.6, 0.55), _report(0.6, 0.53)],
               "aligned": [_report(0.4, 0.45), _report(0.3, 0.47)]}
    table = summarize(results)
    assert table["unfiltered"]["misalignment_rate"] == pytest.approx(0.6)
    assert table["unfiltered"]["misalignment_rate_sem"] == pytest.approx(0.1)  # std(ddof=1) / sqrt(2)
    assert table["aligned"]["p_misaligned"] == pytest.approx(0.46)
    rate = table["aligned_minus_unfiltered_misalignment_rate"]
    assert rate["per_seed"] == pytest.approx([-0.3, -0.2]) and rate["all_seeds_lower"]
    assert rate["sem"] == pytest.approx(math.sqrt(0.005) / math.sqrt(2))
    filtered = table["filtered_minus_unfiltered_p_misaligned"]
    assert filtered["per_seed"] == pytest.approx([-0.05, 0.01]) and not filtered["all_seeds_lower"]

    text = format_table(table)
    assert "aligned - unfiltered misalignment rate: -0.250 ± 0.050 (lower on every seed)" in text
    assert "filtered - unfiltered P(misaligned): -0.020 ± 0.030 (NOT lower on every seed)" in text
    metrics = table_metrics(table)
    assert metrics["aligned.p_misaligned"] == pytest.approx(0.46)
    assert metrics["aligned_minus_unfiltered_misalignment_rate.all_seeds_lower"] == 1.0
    plot(table, str(tmp_path / "demo.png"))
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"


def test_one_seed_has_zero_sem():
    table = summarize({c: [_report(0.5, 0.5)] for c in ("unfiltered", "filtered", "aligned")})
    assert table["aligned"]["p_misaligned_sem"] == 0.0
    assert not table["aligned_minus_unfiltered_p_misaligned"]["all_seeds_lower"]
