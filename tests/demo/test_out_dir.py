"""The demo clears only an output directory it wrote itself; anything else is refused untouched."""

import pytest
from conftest import run_cli

from megatron_align.demo.run import OUT_MARKER, claim_out_dir
from megatron_align.errors import UserError


def test_a_foreign_directory_is_refused_and_left_alone(tmp_path):
    project = tmp_path / "project"
    (project / "runs" / "real_run").mkdir(parents=True)
    (project / "runs" / "real_run" / "metrics.jsonl").write_text("{}\n")
    (project / "results.json").write_text('{"mine": 1}')

    result = run_cli("demo", "--out", str(project), timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "not empty and was not written by `megatron-align demo`" in result.stderr
    assert "Traceback" not in result.stderr
    assert (project / "runs" / "real_run" / "metrics.jsonl").read_text() == "{}\n"
    assert (project / "results.json").read_text() == '{"mine": 1}'
    assert not (project / OUT_MARKER).exists()


def test_a_file_is_refused(tmp_path):
    target = tmp_path / "out"
    target.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        claim_out_dir(str(target))
    assert target.read_text() == "x"


def test_own_directory_is_cleared_of_earlier_outputs_only(tmp_path):
    out = tmp_path / "demo"
    assert claim_out_dir(str(out)) == str(out) and (out / OUT_MARKER).is_file()  # new directory: claimed
    (out / "runs" / "unfiltered_s0").mkdir(parents=True)
    (out / "results.txt").write_text("old table")
    (out / "notes.md").write_text("the user's own notes")

    claim_out_dir(str(out))  # a later demo in the same directory
    assert not (out / "runs").exists() and not (out / "results.txt").exists()
    assert (out / "notes.md").read_text() == "the user's own notes"

    empty = tmp_path / "empty"
    empty.mkdir()
    claim_out_dir(str(empty))  # an existing empty directory is fine too
    assert (empty / OUT_MARKER).is_file()
