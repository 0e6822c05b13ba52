"""Fault-injection specs: grammar, clear errors, fire-once bookkeeping, checkpoint damage."""

from __future__ import annotations

import json
import os

import pytest
from conftest import tiny_config, write_yaml

from megatron_align.config import load_config
from megatron_align.errors import ConfigError, UserError
from megatron_align.resilience.protocol.exclude_nodes import add_exclude_nodes, read_exclude_nodes
from megatron_align.resilience.protocol.faults import (
    FaultPlan,
    damage_checkpoint,
    faults_from_env,
    parse_fault,
    parse_faults,
)
from megatron_align.resilience.protocol.run_files import FAULTS_FIRED_FILE


def test_both_argument_positions_and_optional_rank():
    a, b = parse_fault("slow:3@5@1"), parse_fault("slow@5@1:3")
    assert (a.kind, a.step, a.rank, a.arg) == (b.kind, b.step, b.rank, b.arg) == ("slow", 5, 1, 3.0)
    kill = parse_fault(" kill@7 ")
    assert (kill.kind, kill.step, kill.rank, kill.arg, kill.text) == ("kill", 7, None, None, "kill@7")
    assert kill.on_rank(0) and kill.on_rank(5)
    assert not parse_fault("hang@2@1").on_rank(0)
    assert [f.kind for f in parse_faults(["nan@3", "spike:20@4", "nan_grad@5", "sdc@2@0", "corrupt_checkpoint@4",
                                          "truncate_checkpoint@6@1"])] == \
        ["nan", "spike", "nan_grad", "sdc", "corrupt_checkpoint", "truncate_checkpoint"]


@pytest.mark.parametrize("text, expected", [
    ("boom@3", "unknown fault kind 'boom'; expected one of kill, hang, slow:FACTOR"),
    ("kill", "missing @step"),
    ("kill@", "missing @step"),
    ("kill@x", "step 'x' is not an integer"),
    ("kill@0", "step must be >= 1"),
    ("kill@3@-1", "rank must be >= 0"),
    ("kill@3@1@2", "too many '@' parts"),
    ("slow@3", "slow needs a factor, e.g. slow:3@3"),
    ("slow:fast@3", "factor 'fast' is not a number"),
    ("slow:0.5@3", "slow factor must be > 1"),
    ("kill:2@3", "kill takes no ':arg'"),
    ("slow:2@3@1:4", "':arg' given twice"),
    ("", "empty fault item"),
])
def test_parse_errors_name_the_item_and_the_fix(text, expected):
    with pytest.raises(ConfigError) as err:
        parse_fault(text, "resilience.inject[2]")
    assert expected in str(err.value)
    assert str(err.value).startswith("resilience.inject[2]")


def test_config_and_environment_errors_name_their_source(tmp_path, tiny_corpus):
    path = write_yaml(
        tmp_path / "c.yaml", tiny_config(tmp_path / "run", tiny_corpus, resilience={"inject": ["kill@3", "hang@two"]})
    )
    with pytest.raises(ConfigError, match=r"resilience\.inject\[1\]='hang@two': step 'two' is not an integer"):
        load_config(path)
    with pytest.raises(UserError, match="MEGATRON_ALIGN_FAULT='slow@4': slow needs a factor"):
        faults_from_env({"MEGATRON_ALIGN_FAULT": "checkpoint.before_commit@4,slow@4"})
    # Fault points (with a dot) are left to fault_point(); injection items are parsed.
    assert [f.text for f in faults_from_env({"MEGATRON_ALIGN_FAULT": "checkpoint.before_commit@4, kill@2@1"})] == [
        "kill@2@1"
    ]


def test_a_fault_fires_once_per_run_dir(tmp_path):
    plan = FaultPlan(parse_faults(["kill@5@1", "slow:2@3@1", "nan@4"]))
    plan.start(str(tmp_path), rank=1, world_size=2)
    assert plan.fire("kill", 4) is None
    assert plan.fire("kill", 5).text == "kill@5@1"
    assert plan.fire("slow", 2, persistent=True) is None
    assert plan.fire("slow", 3, persistent=True) and plan.fire("slow", 9, persistent=True)  # persists in this process
    lines = [json.loads(x) for x in open(tmp_path / FAULTS_FIRED_FILE)]
    assert [(x["fault"], x["rank"], x["step"]) for x in lines] == [("kill@5@1", 1, 5), ("slow:2@3@1", 1, 3)]
    # A restarted job with the same config: recorded faults stay quiet, the rest still fire.
    again = FaultPlan(parse_faults(["kill@5@1", "slow:2@3@1", "nan@4"]))
    again.start(str(tmp_path), rank=1, world_size=2)
    assert again.fire("kill", 5) is None and again.fire("slow", 6, persistent=True) is None
    assert again.fire("nan", 4).text == "nan@4"
    other = FaultPlan(parse_faults(["kill@5@1"]))
    other.start(str(tmp_path), rank=0, world_size=2)
    assert other.fire("kill", 5) is None  # not this rank
    with pytest.raises(UserError, match="rank 3 does not exist"):
        FaultPlan(parse_faults(["hang@2@3"])).start(str(tmp_path), rank=0, world_size=2)


def test_damage_checkpoint_corrupts_or_truncates_shards(tmp_path):
    def make(name: str) -> str:
        path = tmp_path / name
        path.mkdir()
        for file in ("__0_0.distcp", "__1_0.distcp", "common.pt", "metadata.json", "megatron_align.json"):
            (path / file).write_bytes(bytes(range(256)) * 64)
        return str(path)

    original = bytes(range(256)) * 64
    corrupt = make("c")
    damaged = damage_checkpoint(corrupt, "corrupt")
    assert sorted(os.path.basename(f) for f in damaged) == ["__0_0.distcp", "__1_0.distcp", "common.pt"]
    for name in ("__0_0.distcp", "common.pt"):
        data = open(os.path.join(corrupt, name), "rb").read()
        assert len(data) == len(original) and data[:16] != original[:16] and data != original
    assert open(os.path.join(corrupt, "megatron_align.json"), "rb").read() == original  # still looks complete
    truncated = make("t")
    assert [os.path.basename(f) for f in damage_checkpoint(truncated, "truncate", rank=1)] == ["__1_0.distcp"]
    assert os.path.getsize(os.path.join(truncated, "__1_0.distcp")) == len(original) // 2
    assert os.path.getsize(os.path.join(truncated, "__0_0.distcp")) == len(original)


def test_exclude_nodes_file_merges_and_deduplicates(tmp_path):
    assert read_exclude_nodes(str(tmp_path)) == []
    assert add_exclude_nodes(str(tmp_path), ["node3", "node1", "node3"]) == ["node3", "node1"]
    assert add_exclude_nodes(str(tmp_path), ["node1", "node7"]) == ["node3", "node1", "node7"]
    assert (tmp_path / "exclude_nodes.txt").read_text() == "node3\nnode1\nnode7\n"
