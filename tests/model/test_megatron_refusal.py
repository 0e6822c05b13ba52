"""A setting Megatron-Core refuses itself becomes a ConfigError (exit 2, no restart loop), not a crash."""

import pytest

from megatron_align.config import load_config
from megatron_align.errors import ConfigError, refused_by_megatron
from megatron_align.model.builder import build_transformer_config


def test_megatron_core_value_error_becomes_a_config_error_with_its_message():
    # 4 heads over 3 tensor ranks: launch's layout check refuses this first; built directly, megatron-core does
    config = load_config(None, ["parallel.tensor=3", "precision=fp32"])
    with pytest.raises(ConfigError, match=r"megatron-core refused the model: .*num_attention_heads \(4\).*"
                                          r"tensor_model_parallel_size \(3\)"):
        with refused_by_megatron("the model"):
            build_transformer_config(config)


def test_bare_assert_names_where_it_fired():
    with pytest.raises(ConfigError, match=r"refused x: AssertionError at .*test_megatron_refusal.py:\d+"):
        with refused_by_megatron("x"):
            raise AssertionError()  # what a bare `assert` in megatron-core raises


def test_our_own_errors_and_other_exceptions_pass_through():
    with pytest.raises(ConfigError, match="^mine$"):
        with refused_by_megatron("x"):
            raise ConfigError("mine")
    with pytest.raises(RuntimeError):
        with refused_by_megatron("x"):
            raise RuntimeError("out of memory")
