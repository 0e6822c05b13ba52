"""Score prompts with our own GPTModel chunks under any TP x PP x DP layout.

The recipe, collective by collective:

1. **DP**: prompt ``i`` goes to data-parallel rank ``i % dp``; every rank of one model-parallel
   group (TP x PP) has the same DP rank, so the group agrees on its prompts.
2. **PP**: prompts are right-padded into microbatches of one shape ``[batch_size, L]`` (the
   pipeline's point-to-point buffers need a fixed shape) and run through Megatron-Core's own
   schedule with ``forward_only=True, collect_non_loss_data=True``; the last stage's "loss
   function" returns the two answer log-probabilities per prompt instead of a loss.
3. **TP**: the last stage's logits are vocab-parallel (each TP rank holds a slice of the
   vocabulary). The log-softmax is computed without gathering the vocabulary: all-reduce the max,
   then all-reduce ``[sum exp, logit(A), logit(B)]`` (each rank contributes the letters it owns).
4. One world all-reduce of an ``[n, 2]`` buffer (filled by last-stage, TP-rank-0 ranks) gives
   every rank every result.

Right padding with causal attention means a prompt's real tokens never attend to padding, so
the logits at its last real token equal the unpadded ones. :func:`load_checkpoint_model` builds
the chunks from a megatron_align checkpoint (weights only) inside an initialised process group.
"""

from __future__ import annotations

import copy
import logging
import os
from functools import partial

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.utils import VocabUtility

from megatron_align.errors import UserError
from megatron_align.eval.scorers import PromptEncoder, continuation_inputs, pad_right, split_pair

log = logging.getLogger(__name__)


class MegatronScorer:
    """``answer_logprobs`` over Megatron GPTModel chunks (raw or DDP-wrapped); call on every rank."""

    def __init__(self, model_chunks: list, tokenizer, vocab_size: int, batch_size: int = 8,
                 max_prompt_tokens: int | None = None, description: str = "") -> None:
        self.chunks = list(model_chunks)
        self.encoder = PromptEncoder(tokenizer, max_prompt_tokens)
        self.vocab_size = vocab_size
        self.batch_size = batch_size
        self.description = description
        self.pad_id = tokenizer.pad if tokenizer.pad is not None else tokenizer.eod
        self.cuda = torch.cuda.is_available()

    @property
    def num_truncated(self) -> int:
        return self.encoder.num_truncated

    def answer_logprobs(self, prompts: list[str]) -> np.ndarray:
        answer_ids = self.encoder.answer_ids(prompts)
        token_lists = self.encoder.encode_prompts(prompts)
        return self._score(token_lists, 2, lambda batch, logits: self._answer_logprobs(batch[2], answer_ids, logits))

    def loglikelihoods(self, requests: list[tuple[str, str]]) -> np.ndarray:
        """``log P(continuation | context)`` per request, summed over tokens (vocab-parallel, any layout)."""
        inputs, truncated = continuation_inputs(self.encoder.encode, requests, self.encoder.max_prompt_tokens)
        self.encoder.num_truncated += truncated
        targets = [ids[1:] + tail[-1:] for (ids, _), (_, tail) in
                   zip(inputs, (split_pair(self.encoder.encode, c, x) for c, x in requests))]
        counts = [num for _, num in inputs]
        return self._score([ids for ids, _ in inputs], 1,
                           lambda batch, logits: self._continuation_logprobs(batch, logits),
                           extras=list(zip(targets, counts)))[:, 0]

    def _score(self, token_lists, width: int, reduce_fn, extras=None) -> np.ndarray:
        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        mine = list(range(dp_rank, len(token_lists), dp_size))
        results = torch.zeros(len(token_lists), width, dtype=torch.float64)
        was_training = [c.training for c in self.chunks]
        for c in self.chunks:
            c.eval()
        try:
            with torch.no_grad():
                if mine:
                    local = self._run([token_lists[i] for i in mine], reduce_fn,
                                      [extras[i] for i in mine] if extras else None)
                    if local is not None:
                        results[mine] = local
        finally:
            for c, training in zip(self.chunks, was_training):
                c.train(training)
        if self.cuda:
            results = results.cuda()
        torch.distributed.all_reduce(results)
        return results.cpu().numpy()

    def _run(self, token_lists: list[list[int]], reduce_fn, extras=None) -> torch.Tensor | None:
        """Forward this DP rank's prompts; returns [n, width] on the last stage's TP rank 0, else None."""
        tp = parallel_state.get_tensor_model_parallel_world_size()
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        b = self.batch_size
        num_batches = -(-len(token_lists) // b)
        if len(self.chunks) > 1:  # interleaved schedule: whole rounds of pp microbatches
            num_batches = -(-num_batches // pp) * pp
        fill = num_batches * b - len(token_lists)
        padded_lists = token_lists + [token_lists[-1]] * fill
        padded_extras = (extras + [extras[-1]] * fill) if extras else None
        length = max(len(t) for t in padded_lists)
        batches = []
        for k in range(num_batches):
            tokens, positions, last = pad_right(padded_lists[k * b:(k + 1) * b], self.pad_id, length, multiple=tp)
            extra = self._targets(padded_extras[k * b:(k + 1) * b], tokens.shape[1]) if extras else None
            batches.append((tokens, positions, last, extra))
        seq_length = batches[0][0].shape[1]
        iterators = [iter(batches) for _ in self.chunks]
        outputs = get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, reduce_fn=reduce_fn),
            data_iterator=iterators if len(iterators) > 1 else iterators[0], model=self.chunks,
            num_microbatches=num_batches, seq_length=seq_length, micro_batch_size=b,
            decoder_seq_length=seq_length, forward_only=True, collect_non_loss_data=True)
        last_stage = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        if not last_stage or parallel_state.get_tensor_model_parallel_rank() != 0:
            return None
        assert len(outputs) == num_batches, (len(outputs), num_batches)
        return torch.cat([o.cpu() for o in outputs])[:len(token_lists)]

    def _targets(self, extras, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[b, L] next-token targets and a 0/1 weight that is 1 on the continuation's positions."""
        targets = torch.full((len(extras), length), self.pad_id, dtype=torch.long)
        weights = torch.zeros((len(extras), length), dtype=torch.float64)
        for row, (ids, num) in enumerate(extras):
            targets[row, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            weights[row, len(ids) - num:len(ids)] = 1.0
        return targets, weights

    def _forward_step(self, data_iterator, model, reduce_fn):
        batch = next(data_iterator)
        device = torch.cuda.current_device() if self.cuda else "cpu"
        output = model(batch[0].to(device), batch[1].to(device), None)
        return output, lambda logits, non_loss_data=True: reduce_fn(batch, logits)

    def _continuation_logprobs(self, batch, logits: torch.Tensor) -> torch.Tensor:
        """Sum of log P(target) over the continuation positions -> [b, 1] (vocab-parallel log-softmax)."""
        targets, weights = batch[3]
        local = self._mask_padding_vocab(logits.double())
        token_logp = -tensor_parallel.vocab_parallel_cross_entropy(local, targets.to(local.device))
        return (token_logp * weights.to(local.device)).sum(dim=-1, keepdim=True).cpu()

    def _mask_padding_vocab(self, local: torch.Tensor) -> torch.Tensor:
        # Megatron-Core's own padding rows (ids >= model.vocab_size, up to make_vocab_size_divisible_by) are not
        # part of the model: leave them out. Rows below it (an HF import's unused ones) count, as in HFScorer.
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(local.shape[-1], tp_rank, tp_size)
        valid = (torch.arange(start, end, device=local.device) < self.vocab_size)
        return local.masked_fill(~valid, float("-inf"))

    def _answer_logprobs(self, last: torch.Tensor, answer_ids: tuple[int, int], logits: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel log-softmax at each prompt's last real token -> [b, 2] (every TP rank gets it)."""
        rows = torch.arange(logits.shape[0], device=logits.device)
        local = self._mask_padding_vocab(logits[rows, last.to(logits.device)].double())  # [b, V / tp]
        group = parallel_state.get_tensor_model_parallel_group()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tp_size = parallel_state.get_tensor_model_parallel_world_size()
        start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(local.shape[-1], tp_rank, tp_size)
        row_max = local.max(dim=-1).values
        torch.distributed.all_reduce(row_max, op=torch.distributed.ReduceOp.MAX, group=group)
        sums = torch.zeros(local.shape[0], 3, dtype=torch.float64, device=local.device)
        sums[:, 0] = torch.exp(local - row_max.unsqueeze(1)).sum(dim=-1)
        for column, token in enumerate(answer_ids, start=1):
            if start <= token < end:
                sums[:, column] = local[:, token - start]
        torch.distributed.all_reduce(sums, group=group)
        log_norm = row_max + torch.log(sums[:, 0])
        return (sums[:, 1:] - log_norm.unsqueeze(1)).cpu()


def eval_model_config(checkpoint: str, tensor: int, pipeline: int, world_size: int, precision: str = "auto"):
    """(resolved iter dir, marker, RootConfig) for evaluating ``checkpoint`` under a new layout."""
    from megatron_align.config.loader import config_from_dict
    from megatron_align.training.checkpoint import read_marker, resolve_checkpoint

    path = resolve_checkpoint(checkpoint) if os.path.isdir(checkpoint) else None
    if path is None:
        raise UserError(
            f"--checkpoint {checkpoint}: no complete megatron_align checkpoint there "
            "(expected a run's checkpoints/ dir with iter_* dirs, or one iter_* dir with megatron_align.json)"
        )
    from megatron_align.training.checksums import require_verified

    require_verified(path)
    marker = read_marker(path)
    if "config" not in marker:
        raise UserError(
            f"{path}: the checkpoint marker has no saved config; it was not written by megatron-align train"
        )
    saved = copy.deepcopy(marker["config"])
    # Only what the model and tokenizer need: other sections (resilience, optimizer, ...) may have
    # changed schema since the checkpoint was written and play no part in scoring.
    data = saved.get("data", {})
    sources = [{"name": s.get("name", f"s{i}"), "prefix": s.get("prefix") or "unused"}
               for i, s in enumerate(data.get("sources") or [{}])]
    data_parallel = max(1, world_size // (tensor * pipeline))  # the layout check wants a divisible batch
    slim = {
        "run_dir": saved.get("run_dir", "eval"), "precision": precision,
        "model": dict(saved["model"], spec="auto", recompute="none"),
        "parallel": {"world_size": world_size, "tensor": tensor, "pipeline": pipeline},
        "train": {"micro_batch_size": 1, "global_batch_size": data_parallel,
                  "seed": saved.get("train", {}).get("seed", 1234)},
        "data": {"tokenizer": data.get("tokenizer", {}), "sources": sources},
    }
    return path, marker, config_from_dict(slim)


def load_checkpoint_model(path: str, marker: dict, config) -> tuple[list, object, int]:
    """Build GPTModel chunks for this rank and load the checkpoint's weights; returns (chunks, tokenizer, vocab)."""
    from megatron_align.corpus.tokenizer import build_tokenizer
    from megatron_align.model.builder import build_model_chunks

    tokenizer = build_tokenizer(config.data.tokenizer)
    saved_identity = marker.get("tokenizer")
    if saved_identity and saved_identity != tokenizer.identity:
        raise UserError(f"{path}: trained with tokenizer {saved_identity} but data.tokenizer in its config now builds "
                        f"{tokenizer.identity}; restore the tokenizer model file the run used")
    vocab_size = config.model.vocab_size or tokenizer.vocab_size
    chunks = build_model_chunks(config, vocab_size)
    state = {"model": chunks[0].sharded_state_dict()} if len(chunks) == 1 else \
        {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}
    loaded = _load_weights(path, state)
    for key, chunk in zip(state, chunks):
        chunk.load_state_dict(loaded[key])
        chunk.eval()
    log.info("loaded weights of step %s from %s", marker.get("step"), path)
    return chunks, tokenizer, vocab_size


def _load_weights(path: str, sharded_state: dict) -> dict:
    """The model keys only (the trainer's loader); the checkpoint's optimizer/RNG entries are left alone."""
    from megatron_align.training.checkpoint import load_sharded

    return load_sharded(path, sharded_state)
