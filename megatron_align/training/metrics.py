"""metrics.jsonl and the measured throughput / MFU.

FLOPs per token and GPU peaks come from :mod:`megatron_align.model.arithmetic`, the module the
planner reads too, so a run's measured MFU and ``megatron-align plan``'s predicted MFU are the same
quantity: model FLOPs per token (6 x linear weights + 6 h V + causal attention 6 L s q, s the document-masked
span with data.reset_attention_mask) x tokens/s,
over the GPU's dense peak for the training precision.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch

from megatron_align.config import RootConfig
from megatron_align.fileio import atomic_write_text
from megatron_align.model.arithmetic import ModelShape, gpu_for_device


def peak_flops_per_gpu(precision: str) -> float | None:
    if not torch.cuda.is_available():
        return None
    gpu = gpu_for_device(torch.cuda.get_device_name())
    return gpu.peak_flops(precision) if gpu else None


def flops_per_token(config: RootConfig, vocab_size: int, attention_span: float | None = None) -> float:
    """Model FLOPs per token of this config's model; ``vocab_size`` padded or not (padding is idempotent).
    ``attention_span``: document-masked attention (megatron_align.data.documents.run_attention_span)."""
    shape = dataclasses.replace(ModelShape.from_config(config.model, vocab_size), attention_span=attention_span)
    return shape.flops_per_token(tp=config.parallel.tensor)


class MetricsWriter:
    """Appends one JSON object per logged step; only rank 0 writes."""

    def __init__(self, path: str, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        self._pending = b""  # bytes a full disk refused; retried at the next write
        self._warned = False
        if enabled:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def write(self, record: dict) -> None:
        """Append the record; a full disk keeps it in memory (warned once) instead of failing the step.

        The storage verdict itself comes from the next checkpoint save's space check, with one clear message.
        """
        if not self.enabled:
            return
        from megatron_align.resilience.protocol.storage import storage_errno

        self._pending += (json.dumps(record, sort_keys=False) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                while self._pending:
                    self._pending = self._pending[os.write(fd, self._pending):]
            finally:
                os.close(fd)
        except OSError as err:
            if storage_errno(err) is None:
                raise
            if not self._warned:
                self._warned = True
                print(f"megatron-align: cannot append to {self.path} ({err}); metrics are kept in memory "
                      "and written when space returns", file=sys.stderr, flush=True)

    def truncate_after(self, step: int) -> None:
        """On resume, drop records past the checkpoint step: they are about to be recomputed."""
        if not self.enabled or not os.path.isfile(self.path):
            return
        with open(self.path) as f:
            lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        atomic_write_text(self.path, "".join(lines))


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
