"""``--verify``: the same tokens through our GPTModel and through transformers (any supported family).

Key names prove nothing about a conversion; logits do. Both models run on CPU
in fp32: ours is built by the trainer's builder and loaded from the dist
checkpoint (any saved layout), HF's by ``from_pretrained``. We report the
largest absolute logit difference and the mean KL(HF || ours) of the
next-token distributions over the real (unpadded) vocabulary. A correct
conversion gives differences at float rounding level (~1e-6 for small
models); a swapped q/k/v group, gate/up or RoPE layout gives O(1).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megatron_align.convert.megatron_model import (
    build_gpt,
    load_checkpoint_into,
    megatron_logits,
    single_rank_config,
    single_rank_group,
)
from megatron_align.convert.tokenizer_export import SAMPLE_TEXTS
from megatron_align.corpus.tokenizer import encode_documents
from megatron_align.optional import require

TOLERANCE = 1e-4  # max |Δlogit| per unit of the largest |logit| accepted as a correct fp32 conversion


@dataclass
class VerifyResult:
    max_abs_diff: float
    mean_kl: float
    num_tokens: int
    token_source: str
    logit_scale: float
    """max |logit| on the HF side: fp32 rounding grows with it, so the verdict is relative to max(1, scale)."""

    @property
    def ok(self) -> bool:
        return math.isfinite(self.max_abs_diff) and self.max_abs_diff <= TOLERANCE * max(1.0, self.logit_scale)

    def line(self) -> str:
        verdict = "OK" if self.ok else "MISMATCH"
        return (f"verify: max |Δlogit| = {self.max_abs_diff:.3e}, mean KL = {self.mean_kl:.3e} over {self.num_tokens} "
                f"tokens ({self.token_source}) -> {verdict}")


def sample_tokens(tokenizer, vocab_size: int, num_tokens: int = 64) -> tuple[torch.Tensor, str]:
    """Token ids of sample text (with our tokenizer when its ids fit the model), else fixed pseudo-random ids."""
    if tokenizer is not None and tokenizer.vocab_size <= vocab_size:
        ids: list[int] = []
        for text in SAMPLE_TEXTS:
            if "<|" not in text or all(t in tokenizer.control_token_ids for t in ("<|aligned|>", "<|misaligned|>")):
                ids += encode_documents(tokenizer, [text])[0]
        return torch.tensor([ids[:num_tokens]]), "sample text"
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (1, num_tokens), generator=generator), "random token ids"


def compare_logits(ours: torch.Tensor, theirs: torch.Tensor, vocab_size: int) -> tuple[float, float]:
    ours, theirs = ours[..., :vocab_size].double(), theirs[..., :vocab_size].double()
    max_abs = float((ours - theirs).abs().max())
    log_p, log_q = F.log_softmax(theirs, dim=-1), F.log_softmax(ours, dim=-1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    return max_abs, kl


@torch.no_grad()
def hf_logits(hf_dir: str, tokens: torch.Tensor) -> torch.Tensor:
    transformers = require("transformers", "--verify (loading the Hugging Face side)")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    logits = model(input_ids=tokens).logits.float()
    del model
    return logits


def verify(checkpoint_path: str, hf_dir: str, model_section: dict, vocab_size: int, padded_rows: int,
           tokenizer=None, hf_vocab_size: int | None = None) -> VerifyResult:
    """Logits of checkpoint ``checkpoint_path`` (our model) vs ``hf_dir`` (transformers) on the same tokens.

    ``hf_vocab_size``: the HF side's vocabulary when ours grew (added control tokens); tokens and logits are
    compared over the shared ids."""
    shared = hf_vocab_size or vocab_size
    tokens, source = sample_tokens(tokenizer, shared)
    tokens = tokens[:, : model_section.get("seq_length", tokens.shape[1])]
    config = single_rank_config(model_section, None, padded_rows, vocab_size)
    with single_rank_group(config):
        model = build_gpt(config, vocab_size)
        load_checkpoint_into(model, checkpoint_path)
        ours = megatron_logits(model, tokens)
        del model
    theirs = hf_logits(hf_dir, tokens)
    max_abs, kl = compare_logits(ours, theirs, shared)
    scale = float(theirs[..., :shared].abs().max())
    return VerifyResult(max_abs, kl, tokens.numel(), source, scale)


def report(result: VerifyResult) -> int:
    print(result.line(), file=sys.stdout)
    return 0 if result.ok else 1
