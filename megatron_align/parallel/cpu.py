"""Run real Megatron-Core on CPU/gloo by routing its CUDA-only calls to CPU.

Megatron-Core assumes CUDA in a handful of places. The call sites the test suite
and the CPU examples reach, per version (each found by running them without CUDA):

- 0.16.1: ``torch.cuda.current_device()`` as a device argument, literal
  ``device="cuda"`` tensors (schedules, grad-norm), the CUDA RNG state used by
  the model-parallel RNG tracker, ``torch.cuda.synchronize``, and grad clipping
  that asserts ``torch.cuda.FloatTensor``.
- Megatron-Core's DistributedOptimizer (both versions) accepts only parameters whose ``tensor.type()``
  names a CUDA type (``torch.cuda.FloatTensor``); the mode answers ``type()`` with the CUDA name.
  Its collectives need no routing: gloo (torch 2.13) runs ``reduce_scatter_tensor`` and
  ``all_gather_into_tensor``.
- 0.19.x adds: ``torch.cuda.current_stream()`` in
  ``_ParamAndGradBucketGroup.start_grad_sync`` (it waits on CUDA-graph replay
  events before reducing grads, every step). On CPU there is one stream, so a
  stream object whose waits do nothing is exact.

This module is the only place that knows CUDA is absent: :func:`activate` is
called once per process, only when ``torch.cuda.is_available()`` is False, and
the GPU path never imports it.

The one idea: a process-wide ``TorchFunctionMode`` rewrites every CUDA device
argument to CPU, so Megatron's own code runs unmodified; the few functions
that check tensor *types* are replaced by CPU equivalents. The "CUDA" RNG
tracker gets its own CPU generator, so forking it (as Megatron does around
tensor-parallel init/dropout) never disturbs the default CPU RNG stream, and
its state is saved/restored in checkpoints exactly like the CUDA one.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_active_mode: TorchFunctionMode | None = None
_cuda_generator = torch.Generator()  # stands in for the CUDA default generator


def _is_cuda(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):  # an int device is a CUDA ordinal
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _cuda_type_name(tensor: torch.Tensor) -> str:
    """``tensor.type()`` as it would read on CUDA (``torch.FloatTensor`` -> ``torch.cuda.FloatTensor``)."""
    name = torch.Tensor.type(tensor)
    return name.replace("torch.", "torch.cuda.", 1) if name.startswith("torch.") and ".cuda." not in name else name


class _CudaToCpuMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = _CPU
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:  # the type *name*, as Megatron compares it
            return _cuda_type_name(args[0])
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


def _cpu_clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """CPU twin of megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32 (no CUDA-type assert)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


class _CpuStream:
    """The single CPU "stream": work is already ordered, so every wait/sync is a no-op."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


_CPU_STREAM = _CpuStream()


def _get_cuda_rng_state(device="cuda", clone=False, graph_safe=False):
    return _cuda_generator.get_state()


def _set_cuda_rng_state(new_state, device=-1, graph_safe=False):
    _cuda_generator.set_state(new_state)


def is_active() -> bool:
    return _active_mode is not None


def activate() -> None:
    """Route Megatron-Core's CUDA-only calls to CPU for this process (idempotent)."""
    global _active_mode
    if _active_mode is not None:
        return
    if torch.cuda.is_available():
        raise RuntimeError(
            "megatron_align.parallel.cpu.activate() called on a machine with CUDA; the GPU path must not use it"
        )

    torch.cuda.current_device = lambda: 0  # an int ordinal; the mode maps it to CPU
    torch.cuda.set_device = lambda device: None
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.current_stream = lambda device=None: _CPU_STREAM  # 0.19: start_grad_sync
    torch.cuda.get_rng_state = lambda device="cuda": _cuda_generator.get_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": _cuda_generator.set_state(state)
    torch.cuda.manual_seed = lambda seed: _cuda_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: _cuda_generator.manual_seed(int(seed))

    from megatron.core.tensor_parallel import random as tp_random

    tp_random._get_cuda_rng_state = _get_cuda_rng_state
    tp_random._set_cuda_rng_state = _set_cuda_rng_state

    from megatron.core.optimizer import clip_grads, optimizer

    clip_grads.clip_grad_by_total_norm_fp32 = _cpu_clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = _cpu_clip_grad_by_total_norm_fp32

    _active_mode = _CudaToCpuMode()
    _active_mode.__enter__()
