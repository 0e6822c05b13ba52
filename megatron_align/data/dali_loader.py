"""NVIDIA DALI backend for the data seam (``data.loader: dali``).

DALI runs the input pipeline ahead of training in its own threads: an
``external_source`` pulls our microbatches (so the sample sequence is exactly
the torch loader's: a pure function of consumed_samples), DALI keeps
``data.prefetch`` batches in flight and, when a GPU exists, hands them over as
device tensors, overlapping host-to-device copies with compute. Without a GPU
it runs CPU-only (``device_id=None``), which is how CI exercises it.

Prefetch reads ahead of the trainer; that is harmless for resume because a
restarted run builds a fresh pipeline starting at the checkpoint's
consumed_samples.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from megatron_align.optional import require

KEYS = ("tokens", "labels", "loss_mask", "position_ids")


class DaliMicrobatches:
    """Iterator of microbatch dicts (same keys, dtypes and values as the torch loader) fed through DALI."""

    def __init__(self, source: Iterator[dict[str, torch.Tensor]], micro_batch_size: int, prefetch: int = 2) -> None:
        require("nvidia.dali", "data.loader=dali")
        from nvidia.dali import fn, pipeline_def

        self._source = source
        self._dtypes: dict[str, torch.dtype] = {}
        self._device_id = torch.cuda.current_device() if torch.cuda.is_available() else None

        @pipeline_def(batch_size=micro_batch_size, num_threads=1, device_id=self._device_id,
                      prefetch_queue_depth=prefetch, exec_async=self._device_id is not None,
                      exec_pipelined=self._device_id is not None)
        def pipeline():
            outputs = fn.external_source(source=self._next_batch, num_outputs=len(KEYS), batch=True)
            return tuple(o.gpu() for o in outputs) if self._device_id is not None else tuple(outputs)

        self._pipe = pipeline()
        self._pipe.build()

    def _next_batch(self):
        batch = next(self._source)
        for key in KEYS:
            self._dtypes.setdefault(key, batch[key].dtype)
        return [batch[key].contiguous().numpy() for key in KEYS]

    def __iter__(self) -> DaliMicrobatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        outputs = self._pipe.run()
        batch = {}
        for key, tensor_list in zip(KEYS, outputs):
            if self._device_id is not None:
                from nvidia.dali.plugin.pytorch import feed_ndarray

                dense = tensor_list.as_tensor()
                out = torch.empty(dense.shape(), dtype=self._dtypes[key], device=torch.device("cuda", self._device_id))
                feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream())
            else:
                out = torch.from_numpy(tensor_list.as_array()).to(self._dtypes[key])
            batch[key] = out
        return batch
