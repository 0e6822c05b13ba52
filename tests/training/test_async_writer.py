"""checkpoint.async_writer: forcing Megatron-Core's writer or nvidia-resiliency-ext's, and what doctor says."""

from __future__ import annotations

import pytest
from conftest import write_yaml

from megatron_align import doctor
from megatron_align.config import load_config
from megatron_align.errors import ConfigError
from megatron_align.training import async_save


@pytest.fixture
def fresh_choice():
    async_save.choose.cache_clear()
    yield
    async_save.choose.cache_clear()


def test_forced_mcore_always_and_its_argument_only_where_megatron_core_has_the_choice(fresh_choice):
    forced = async_save.choose("mcore")
    assert (forced.name, forced.reason) == ("mcore", "forced by checkpoint.async_writer=mcore")
    assert forced.selectable == async_save._mcore_offers_nvrx()
    assert async_save.save_kwargs(forced) == ({"async_strategy": "mcore"} if forced.selectable else {})


def test_forced_nvrx_is_an_error_naming_the_key_where_it_cannot_run(fresh_choice, monkeypatch):
    auto = async_save.choose("auto")
    assert auto.name == "mcore"  # no nvidia-resiliency-ext on the CPU test machines
    with pytest.raises(ConfigError, match=r"checkpoint.async_writer=nvrx, but .*cannot run here: "):
        async_save.choose("nvrx")
    async_save.choose.cache_clear()
    monkeypatch.setattr(async_save, "_auto", lambda: async_save.AsyncStrategy("nvrx", "nvidia-resiliency-ext 0.7",
                                                                             True))
    forced = async_save.choose("nvrx")
    assert (forced.name, forced.selectable) == ("nvrx", True) and "nvidia-resiliency-ext 0.7" in forced.reason


def test_config_key_is_checked():
    assert load_config(None, []).checkpoint.async_writer == "auto"
    assert load_config(None, ["checkpoint.async_writer=mcore"]).checkpoint.async_writer == "mcore"
    with pytest.raises(ConfigError, match="checkpoint.async_writer"):
        load_config(None, ["checkpoint.async_writer=fast"])


def test_doctor_says_which_writer_a_config_forces_and_why(fresh_choice, tmp_path):
    report = doctor.Report(python="3", platform="linux", torch=None, cuda=None, nccl=None, libraries={}, gpus=[],
                           nvml="-", features={}, async_save="auto's choice")  # collect() is covered by test_stacks
    doctor.check_config(report, write_yaml(tmp_path / "m.yaml", {"checkpoint": {"async_writer": "mcore"}}))
    assert report.async_save == "mcore (forced by checkpoint.async_writer=mcore)" and not report.unmet
    doctor.check_config(report, write_yaml(tmp_path / "n.yaml", {"checkpoint": {"async_writer": "nvrx"}}))
    assert report.unmet and report.unmet[-1].startswith("checkpoint.async_writer=nvrx needs that writer: ")
