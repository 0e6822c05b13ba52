"""training/optim.py: our optimizer keys -> Megatron-Core's DDP / optimizer / scheduler arguments."""

from __future__ import annotations

import pytest
import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_align.config import load_config
from megatron_align.config.checks import resolve_tristate
from megatron_align.config.schedule import WSD_DEFAULT_DECAY_DIVISOR, wsd_decay_steps
from megatron_align.training.optim import (
    CPU_BUCKET_SIZE,
    ddp_config,
    optimizer_config,
    scheduler_kwargs,
    use_distributed_optimizer,
)


def _scheduler(config) -> tuple[torch.optim.Optimizer, OptimizerParamScheduler]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    return optimizer, OptimizerParamScheduler(optimizer, **scheduler_kwargs(config))


def _lrs(config, steps: int) -> list[float]:
    optimizer, scheduler = _scheduler(config)
    lrs = []
    for _ in range(steps):
        scheduler.step(1)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def test_tristates():
    assert [resolve_tristate(v, auto) for v in ("auto", "true", "false") for auto in (True, False)] == \
        [True, False, True, True, False, False]
    config = load_config(None, ["optimizer.distributed=true"])
    assert use_distributed_optimizer(config, cuda=False) is True  # runs on CPU/gloo (tests/training/test_dist_opt.py)
    assert use_distributed_optimizer(config, cuda=True) is True
    assert use_distributed_optimizer(load_config(None, []), cuda=False) is False  # auto on CPU


def test_ddp_and_optimizer_configs_follow_the_device_and_keys():
    config = load_config(None, ["optimizer.lr=2e-3", "optimizer.min_lr=1e-5", "optimizer.adam_beta2=0.99",
                                "optimizer.clip_grad=0.5", "optimizer.weight_decay=0.05"])
    cpu, gpu = ddp_config(config, cuda=False, distributed_optimizer=False), ddp_config(config, True, True)
    assert (cpu.overlap_grad_reduce, cpu.bucket_size, cpu.use_distributed_optimizer) == (False, CPU_BUCKET_SIZE, False)
    assert (gpu.overlap_grad_reduce, gpu.bucket_size, gpu.use_distributed_optimizer) == (True, None, True)
    assert cpu.grad_reduce_in_fp32 and not cpu.check_for_nan_in_grad and not cpu.overlap_param_gather
    opt = optimizer_config(config.optimizer, "bf16", torch.float32, distributed_optimizer=False)
    assert (opt.optimizer, opt.lr, opt.min_lr, opt.adam_beta2, opt.clip_grad, opt.weight_decay, opt.bf16) == \
        ("adam", 2e-3, 1e-5, 0.99, 0.5, 0.05, True)
    assert optimizer_config(config.optimizer, "fp32", torch.float32, False).bf16 is False


def test_wsd_default_is_the_last_tenth_of_decay_steps():
    assert WSD_DEFAULT_DECAY_DIVISOR == 10
    o = load_config(None, ["optimizer.decay_style=WSD"]).optimizer
    assert [wsd_decay_steps(o, n) for n in (1, 9, 10, 19, 100, 1005)] == [1, 1, 1, 1, 10, 100]
    assert wsd_decay_steps(load_config(None, ["optimizer.decay_style=WSD", "optimizer.wsd_decay_steps=7"]).optimizer,
                           100) == 7
    assert wsd_decay_steps(load_config(None, ["optimizer.decay_style=cosine", "optimizer.wsd_decay_steps=7"]).optimizer,
                           100) is None
    kwargs = scheduler_kwargs(
        load_config(None, ["optimizer.decay_style=WSD", "train.steps=50", "optimizer.decay_steps=40"])
    )
    assert (
        kwargs["lr_decay_steps"],
        kwargs["wd_incr_steps"],
        kwargs["wsd_decay_steps"],
        kwargs["lr_wsd_decay_style"],
    ) == (40, 40, 4, "linear")
    assert scheduler_kwargs(load_config(None, ["train.steps=30"]))["lr_decay_steps"] == 30  # default: train.steps


def test_real_scheduler_wsd_curve():
    """Megatron-Core's scheduler with our arguments: warmup, flat at lr, the last tenth decays to min_lr."""
    config = load_config(None, ["optimizer.decay_style=WSD", "train.steps=40", "optimizer.warmup_steps=4",
                                "optimizer.lr=1e-3", "optimizer.min_lr=1e-4"])
    lrs = _lrs(config, 40)
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[3:36] == pytest.approx([1e-3] * 33)  # stable until decay_steps - 40 // 10
    assert lrs[36] < 1e-3 and lrs[-1] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[35:], lrs[36:]))
    optimizer, _ = _scheduler(config)
    assert optimizer.param_groups[0]["weight_decay"] == config.optimizer.weight_decay  # constant wd
