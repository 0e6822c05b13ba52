import pytest
from conftest import write_yaml

from megatron_align.config import load_config
from megatron_align.errors import ConfigError
from megatron_align.parallel.layout import validate_layout


def test_yaml_plus_overrides(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"train": {"steps": 5}, "model": {"hidden_size": 128}})
    config = load_config(path, ["train.steps=9", "parallel.tensor=2", "checkpoint.keep_last=1"])
    assert config.train.steps == 9
    assert config.model.hidden_size == 128
    assert config.parallel.tensor == 2
    assert config.checkpoint.keep_last == 1
    assert config.model.ffn_size == 384  # 8h/3 rounded up to 64


def test_contract_keys_exist():
    config = load_config(
        None,
        [
            "run_dir=x",
            "train.steps=1",
            "train.global_batch_size=2",
            "train.micro_batch_size=1",
            "parallel.tensor=1",
            "parallel.pipeline=1",
            "parallel.world_size=1",
            "checkpoint.interval=1",
            "checkpoint.keep_last=1",
            "model.spec=local",
            "precision=fp32",
        ],
    )
    assert config.run_dir == "x" and config.precision == "fp32" and config.model.spec == "local"


@pytest.mark.parametrize("override, fragment", [
    (["train.stepz=3"], "unknown key 'train.stepz'"),
    (["nonsense.key=1"], "unknown key"),
    (["train.steps=abc"], "train.steps"),
    (["parallel.tensor=1.5"], "parallel.tensor"),
    (["model.spec=fast"], "model.spec='fast'"),
    (["precision=fp16"], "precision='fp16'"),
    (["train.steps=0"], "train.steps=0"),
    (["parallel.cpu_threads=0"], "parallel.cpu_threads=0"),
    (["model.num_query_groups=3"], "model.num_query_groups=3"),
    (["model.kv_channels=0"], "model.kv_channels=0"),
    (["model.kv_channels=-8"], "model.kv_channels=-8"),
    (["model.kv_channels=15"], "model.kv_channels=15: must be even"),
    (["model.kv_channels=1.5"], "model.kv_channels"),
    (["model.hidden_size=100", "model.num_attention_heads=8"], "or set model.kv_channels"),
    (["optimizer.min_lr=1.0"], "optimizer.min_lr"),
    (["train.stop_at_step=99", "train.steps=10"], "train.stop_at_step=99"),
    (["steps"], "expected key=value"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    assert fragment in str(err.value)


def test_kv_channels_sets_a_head_dim_other_than_hidden_over_heads():
    assert load_config(None, ["model.hidden_size=64", "model.num_attention_heads=4"]).model.head_dim == 16
    config = load_config(None, ["model.hidden_size=100", "model.num_attention_heads=8", "model.kv_channels=32"])
    assert config.model.kv_channels == config.model.head_dim == 32  # Qwen3-0.6B-like: 8 x 32 != 100


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", {"train": {"stpes": 3}})
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'train.stpes'"):
        load_config(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "none.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        (
            ["parallel.tensor=2", "parallel.pipeline=2"],
            6,
            "world size 6 is not divisible by parallel.tensor x parallel.pipeline x parallel.context = 2 x 2 x 1 = 4",
        ),
        (
            ["parallel.tensor=8", "model.num_attention_heads=4"],
            8,
            "model.num_attention_heads=4 is not divisible by parallel.tensor=8",
        ),
        (
            ["parallel.tensor=4", "model.num_attention_heads=8", "model.num_query_groups=2"],
            4,
            "model.num_query_groups=2 is not divisible by parallel.tensor=4",
        ),
        (
            ["parallel.pipeline=3", "model.num_layers=4"],
            3,
            "model.num_layers=4 is not divisible by parallel.pipeline x parallel.virtual_pipeline = 3 x 1 = 3",
        ),
        (["parallel.pipeline=2", "parallel.virtual_pipeline=3", "model.num_layers=8"], 2, "= 2 x 3 = 6"),
        (
            ["train.global_batch_size=6", "train.micro_batch_size=2"],
            2,
            "train.global_batch_size=6 is not divisible by train.micro_batch_size x data-parallel size = 2 x 2 = 4",
        ),
    ],
)
def test_layout_constraints(overrides, world, message):
    config = load_config(None, overrides + ["data.mock=true"])
    with pytest.raises(ConfigError) as err:
        validate_layout(config, world)
    assert message in str(err.value)


def test_training_needs_data_sources():
    with pytest.raises(ConfigError, match="data.sources: empty"):
        validate_layout(load_config(None, []), 1)
    validate_layout(load_config(None, ["data.mock=true"]), 1)


def test_valid_layout_derives_data_parallel():
    config = load_config(
        None,
        [
            "parallel.tensor=2",
            "parallel.pipeline=2",
            "model.num_layers=4",
            "train.global_batch_size=8",
            "data.mock=true",
        ],
    )
    layout = validate_layout(config, 16)
    assert (layout.tensor, layout.pipeline, layout.data) == (2, 2, 4)


def test_bad_config_fails_before_any_rank_starts(tmp_path):
    from conftest import run_cli

    path = write_yaml(
        tmp_path / "c.yaml",
        {"run_dir": str(tmp_path / "run"), "parallel": {"world_size": 3, "tensor": 2}, "data": {"mock": True}},
    )
    result = run_cli("train", path, timeout=120)
    assert result.returncode == 2
    assert "world size 3 is not divisible" in result.stderr
    assert not (tmp_path / "run").exists()  # nothing half-written
