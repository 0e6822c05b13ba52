"""Document lengths of the training sources, and the attention span document masking leaves.

With ``data.reset_attention_mask`` a query attends only inside its document, so attention FLOPs per
token depend on how documents fall into windows: :func:`megatron_align.model.arithmetic.attention_span`
turns a source's document lengths (its ``.idx``) into that span. A run's span is the mean over its
samples, each sample being one window of one source: sources weigh by the samples the run draws from
them (the mixture's counts, or the blend weights). The planner, the trainer's MFU and `data inspect`
all read it from here.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from megatron_align.config import RootConfig
from megatron_align.data.mixture import AlignmentSampler
from megatron_align.errors import UserError
from megatron_align.model.arithmetic import attention_span


def document_lengths(prefix: str) -> np.ndarray:
    """Tokens per document of an IndexedDataset (memory-mapped from its ``.idx``)."""
    with warnings.catch_warnings():  # megatron.core warns about absent TE/apex and, outside a job, about the rank
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        dataset = IndexedDataset(prefix)
    return np.array(dataset.sequence_lengths, dtype=np.int64)  # a copy: the memory map closes with the dataset


def length_summary(lengths: np.ndarray, seq_length: int) -> str:
    """One line: the document-length distribution and the masked attention span at ``seq_length``."""
    if not len(lengths):
        return "no documents"
    p50, p90 = np.percentile(lengths, [50, 90])
    span = attention_span(lengths, seq_length)
    return (f"document tokens mean {lengths.mean():,.0f}, median {p50:,.0f}, p90 {p90:,.0f}, max {lengths.max():,}; "
            f"document-masked attention span {span:,.0f} of {seq_length} ({span / seq_length:.1%} of causal FLOPs)")


def run_attention_span(config: RootConfig) -> float | None:
    """The run's mean attention span with document masking; None when it is off (or the data is mock).

    Sources weigh by the samples the run draws from each: the mixture sampler's counts over the whole
    run (``data.mixture``), else the blend weights. Raises UserError when a source's ``.idx`` is missing.
    """
    if not config.data.reset_attention_mask or config.data.mock:
        return None
    seq = config.model.seq_length
    lengths = {}
    for i, src in enumerate(config.data.sources):
        if not os.path.isfile(src.prefix + ".idx"):
            raise UserError(f"data.sources[{i}] ({src.name}): {src.prefix}.idx not found; its document lengths "
                            "give the attention FLOPs under data.reset_attention_mask")
        lengths[src.name] = document_lengths(src.prefix)
    if config.data.mixture.phases:
        total = config.train.steps * config.train.global_batch_size
        sizes = {name: max(int(n.sum()) - 1, 0) // seq for name, n in lengths.items()}
        weights = {k: float(v) for k, v in AlignmentSampler(config.data.mixture, sizes, total, seq)
                   .counts_before(total).items()}
    else:
        weights = {s.name: s.weight for s in config.data.sources}
    used = [name for name in lengths if weights.get(name)]
    total_weight = sum(weights[name] for name in used)
    if not total_weight:
        return None
    return sum(attention_span(lengths[name], seq) * weights[name] for name in used) / total_weight
