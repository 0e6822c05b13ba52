"""Document boundaries inside packed training windows: the attention inputs each spec needs.

What: a training sample is a window over concatenated documents, each ending in EOD. With
``data.reset_attention_mask`` a token attends only to earlier tokens of its own document
(Megatron-LM's ``--reset-attention-mask``); Megatron-Core's GPTDataset already restarts position
ids and zeroes the loss at EOD inputs (``reset_position_ids``, ``eod_mask_loss``).

The one idea: a token's document is the number of EODs strictly before it in its window
(``cumsum(is_eod) - is_eod``). Every form an attention kernel wants follows from those ids:

- local / portable specs: the dense ``[b, 1, s, s]`` mask "future or another document" (Megatron's
  convention, True = masked out). It equals what GPTDataset builds with ``create_attention_mask=True``,
  but from ``s`` ints per sample on the device instead of ``s * s`` floats in the loader.
- te spec: the packed THD layout. The micro-batch becomes one stream of ``b * s`` tokens cut into
  documents by ``cu_seqlens`` (``PackedSeqParams``); a window's end is always a cut. TE ignores a
  dense mask (Megatron-LM #2357), so this is the only form in which TE honours the boundaries; its
  fused RoPE restarts at each cut.

Context parallelism (te only, pipeline 1): the THD stream of the whole micro-batch is built first, each document
padded to a multiple of ``2 * cp`` (``* tp`` with sequence parallelism) as TE requires, and then split with TE's
``thd_get_partitioned_indices``: every rank holds chunks ``r`` and ``2 * cp - 1 - r`` of every document
(Megatron-LM's split for packed sequences). The padding carries no loss; ``cu_seqlens`` (real lengths) and
``cu_seqlens_padded`` both go to TE, so the padding is never attended to.

Positions: RoPE makes a query-key score depend on their offset only, and Megatron-Core's GPTModel
applies RoPE by offset in the sequence (``position_ids`` feed learned absolute embeddings only). With
per-document attention every offset lies inside one document, so each document is computed exactly as
if it started at position 0, on every spec.
"""

from __future__ import annotations

import torch

from megatron_align.config import RootConfig
from megatron_align.errors import ConfigError
from megatron_align.optional import optional_import, require

TE_MIN_VERSION = "1.10.0"  # THD with cu_seqlens(_padded) fully supported in Megatron-Core's TE attention


def document_ids(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """``[b, s]`` -> ``[b, s]``: the index of each token's document in its window (EOD belongs to its document)."""
    is_eod = (tokens == eod).long()
    return torch.cumsum(is_eod, dim=-1) - is_eod


def block_causal_mask(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """``[b, 1, s, s]`` bool, True = query may not attend to key: key in the future or in another document."""
    docs = document_ids(tokens, eod)
    s = tokens.size(-1)
    positions = torch.arange(s, device=tokens.device)
    future = positions.unsqueeze(0) > positions.unsqueeze(1)
    return (future | (docs.unsqueeze(-1) != docs.unsqueeze(-2))).unsqueeze(1)


def thd_cu_seqlens(tokens: torch.Tensor, eod: int, pad_multiple: int = 1):
    """Cumulative document lengths of a ``[b, s]`` micro-batch flattened to one ``b * s`` stream.

    A document ends at an EOD or at the end of its window. Returns ``(cu_seqlens, cu_seqlens_padded,
    max_seqlen)``: int32 tensors of ``num_documents + 1`` offsets on ``tokens``' device, and the longest
    document. ``cu_seqlens_padded`` rounds each length up to ``pad_multiple`` (context parallelism
    splits each document into ``2 * cp`` chunks); with 1 it equals ``cu_seqlens``.
    """
    b, s = tokens.shape
    flat = tokens.reshape(-1)
    ends = torch.zeros(b * s, dtype=torch.bool, device=tokens.device)
    ends[:-1] = flat[:-1] == eod
    ends[s - 1::s] = True  # every window ends a document (an EOD there ends only one)
    end_positions = torch.nonzero(ends).reshape(-1) + 1
    zero = torch.zeros(1, dtype=end_positions.dtype, device=tokens.device)
    cu_seqlens = torch.cat([zero, end_positions])
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    padded = (lengths + pad_multiple - 1) // pad_multiple * pad_multiple
    cu_padded = torch.cat([zero, torch.cumsum(padded, 0)])
    return cu_seqlens.to(torch.int32), cu_padded.to(torch.int32), int(lengths.max())


def attention_path(config: RootConfig, spec: str) -> str:
    """How attention sees documents for ``spec`` (resolved: local | portable | te), or a ConfigError naming the keys.

    ``window``: one causal span per sample (default); ``dense-mask``: block-diagonal causal mask;
    ``thd``: packed sequences with cu_seqlens (Transformer Engine).
    """
    if not config.data.reset_attention_mask:
        return "window"
    if config.parallel.context > 1 and spec != "te":
        raise ConfigError(f"data.reset_attention_mask=true with parallel.context={config.parallel.context} needs "
                          f"model.spec=te (packed THD sequences split per document); model.spec resolves to {spec} "
                          "here, whose attention has no context parallelism")
    if spec == "te":
        te = optional_import("transformer_engine")
        version = getattr(te, "__version__", None)
        if version is not None and te_too_old_for_thd(version):
            raise ConfigError(f"data.reset_attention_mask=true with model.spec=te needs Transformer Engine >= "
                              f"{TE_MIN_VERSION} (packed THD sequences); this one is {version}. Upgrade TE, or use "
                              "model.spec=local / portable")
        return "thd"
    return "dense-mask"


def te_too_old_for_thd(version: str) -> bool:
    """Whether Transformer Engine ``version`` predates full THD support (TE_MIN_VERSION)."""
    from packaging.version import Version

    return Version(version.split("+")[0]) < Version(TE_MIN_VERSION)


class ModelInputs:
    """Turns a device micro-batch into GPTModel's keyword arguments for the configured attention path.

    ``pipeline_shape(seq_length, micro_batch_size)`` is the (sequence, batch) shape the pipeline
    schedule sends between stages: THD packs the micro-batch into one sequence of ``b * s`` tokens.
    """

    def __init__(self, path: str, eod: int) -> None:
        self.path = path
        self.eod = eod

    def __call__(self, tokens, labels, position_ids) -> dict:
        kwargs = {"input_ids": tokens, "position_ids": position_ids, "attention_mask": None, "labels": labels}
        if self.path == "dense-mask":
            kwargs["attention_mask"] = block_causal_mask(tokens, self.eod)
        elif self.path == "thd":
            from megatron.core.packed_seq_params import PackedSeqParams

            cu_seqlens, _, max_seqlen = thd_cu_seqlens(tokens, self.eod)
            kwargs.update(input_ids=tokens.reshape(1, -1), position_ids=position_ids.reshape(1, -1),
                          labels=None if labels is None else labels.reshape(1, -1))
            kwargs["packed_seq_params"] = PackedSeqParams(
                qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)
        return kwargs

    def thd_context_parallel(self, tokens, labels, position_ids, loss_mask, cp_size: int, cp_rank: int,
                             pad_multiple: int, partition=None) -> tuple[dict, torch.Tensor]:
        """GPTModel's keyword arguments and the loss mask of this context-parallel rank's part of a ``[b, s]``
        micro-batch as packed THD sequences (see the module docstring). ``partition(cu_seqlens_padded, total,
        cp_size, cp_rank)`` -> token indices; default TE's ``thd_get_partitioned_indices``."""
        from megatron.core.packed_seq_params import PackedSeqParams

        cu_seqlens, cu_padded, _ = thd_cu_seqlens(tokens, self.eod, pad_multiple)
        n, total = tokens.numel(), int(cu_padded[-1])
        starts, padded_starts = cu_seqlens.long(), cu_padded.long()
        flat = torch.arange(n, device=tokens.device)
        doc = torch.searchsorted(starts[1:], flat, right=True)
        dest = flat - starts[doc] + padded_starts[doc]  # every real token's place in the padded stream
        streams = []
        for x, fill in ((tokens, self.eod), (labels, 0), (position_ids, 0), (loss_mask, 0)):
            out = torch.full((total,), fill, dtype=x.dtype, device=x.device)
            out[dest] = x.reshape(-1)
            streams.append(out)
        if partition is None:
            partition = require("transformer_engine_torch", "document masking under context parallelism "
                                "(Transformer Engine's thd_get_partitioned_indices)").thd_get_partitioned_indices
        index = partition(cu_padded, total, cp_size, cp_rank)
        ids, lab, pos, mask = (x.index_select(0, index).unsqueeze(0) for x in streams)
        max_len = int((cu_padded[1:] - cu_padded[:-1]).max())
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                                 cu_seqlens_q_padded=cu_padded, cu_seqlens_kv_padded=cu_padded,
                                 max_seqlen_q=max_len, max_seqlen_kv=max_len)
        return {"input_ids": ids, "position_ids": pos, "attention_mask": None, "labels": lab,
                "packed_seq_params": params}, mask

    def pipeline_shape(self, seq_length: int, micro_batch_size: int) -> tuple[int, int]:
        if self.path == "thd":
            return seq_length * micro_batch_size, 1
        return seq_length, micro_batch_size
