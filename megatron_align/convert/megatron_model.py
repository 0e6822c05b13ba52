"""Our GPTModel on one CPU process: build it exactly as the trainer does, load or save dist checkpoints.

The converter needs a real Megatron-Core model twice: ``from-hf`` fills one and
saves it with Megatron's own ``dist_checkpointing.save`` (so the keys are by
construction what the trainer loads), and ``--verify`` loads a checkpoint into
one to compare logits with transformers. Both run in a 1-rank gloo group formed
by :func:`megatron_align.parallel.init.init_distributed` (which also activates
CPU routing when CUDA is absent), always as TP1 x PP1: dist checkpoints are
global, so a TP1 save reshards into any layout on load and a TP1 load reads
any saved layout.

Memory: the whole model lives in this process. ``from-hf`` builds it on the
meta device and materialises it once in the checkpoint dtype (every tensor is
then overwritten from HF); ``--verify`` builds a real fp32 model (4 bytes per
parameter), because its forward needs the non-persistent buffers (RoPE
frequencies) that a meta build would leave uninitialised.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from megatron_align.config import ModelConfig, RootConfig
from megatron_align.config.loader import config_from_dict
from megatron_align.errors import UserError
from megatron_align.parallel.spawn import local_rendezvous


@contextlib.contextmanager
def single_rank_group(config: RootConfig):
    """A 1-rank process group + Megatron parallel state for ``config`` (TP1 x PP1), torn down on exit."""
    from megatron_align.parallel.init import destroy_distributed, init_distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise UserError("the converter forms its own 1-rank process group; run it outside torchrun/srun jobs")
    threads = torch.get_num_threads()
    with local_rendezvous():
        try:
            init_distributed(config, 0, 1, 0)
            torch.set_num_threads(threads)  # init_distributed pins 1 thread (for many ranks per box); we are alone
            yield
        finally:
            destroy_distributed()


def single_rank_config(model: dict, tokenizer: dict | None, padded_rows: int | None, vocab_size: int) -> RootConfig:
    """A TP1 x PP1 config for ``model`` whose padded vocabulary has exactly ``padded_rows`` rows.

    ``make_vocab_size_divisible_by`` is the knob: padded = ceil(vocab / d) * d, so d = padded_rows gives
    padded_rows whenever vocab <= padded_rows.
    """
    fields = {f for f in ModelConfig.__dataclass_fields__}
    model = {k: v for k, v in model.items() if k in fields}
    model.update(vocab_size=vocab_size, spec="local", recompute="none")
    if padded_rows is not None:
        model["make_vocab_size_divisible_by"] = padded_rows
    data = {"mock": True}
    if tokenizer is not None:
        data["tokenizer"] = tokenizer
    return config_from_dict({"precision": "fp32", "model": model, "data": data,
                             "parallel": {"world_size": 1, "tensor": 1, "pipeline": 1}})


def build_gpt(config: RootConfig, vocab_size: int):
    from megatron_align.model.builder import build_model_chunks

    (model,) = build_model_chunks(config, vocab_size)
    return model


def load_checkpoint_into(model, path: str) -> None:
    """Load the weights of checkpoint ``path`` (any saved layout and spec) into a TP1 x PP1 GPTModel.

    Only weights are requested: optimizer state in the checkpoint is ignored, and ``_extra_state`` (TE FP8
    scaling metadata, absent or meaningless for the local spec) is neither requested nor required.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy

    sharded = {k: v for k, v in model.sharded_state_dict().items() if "_extra_state" not in k}
    try:
        with warnings.catch_warnings():  # Megatron's torch_dist load still builds torch ShardedTensors (deprecated)
            warnings.simplefilter("ignore", FutureWarning)
            state = dist_checkpointing.load(
                {"model": sharded}, path, sharded_strategy=get_default_load_sharded_strategy(path)
            )
    except Exception as err:  # missing keys, shape mismatch, corrupt shards
        raise UserError(f"loading the weights of {path} failed: {type(err).__name__}: {str(err)[:500]}") from None
    result = model.load_state_dict(state["model"], strict=False)
    missing = [k for k in result.missing_keys if "_extra_state" not in k]
    if missing or result.unexpected_keys:
        raise UserError(f"{path}: weights do not match the model (missing {missing[:3]}, "
                        f"unexpected {result.unexpected_keys[:3]})")


@torch.no_grad()
def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """[batch, seq] token ids -> [batch, seq, padded_vocab] fp32 logits."""
    model.eval()
    position_ids = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    return model(tokens, position_ids, None).float()
