"""Scorers: turn prompts into ``[log P(A), log P(B)]`` for the next token.

A scorer is anything with ``answer_logprobs(prompts: list[str]) -> np.ndarray[n, 2]`` and a
``description``. Three live here:

- :class:`MegatronScorer` -- our own GPTModel chunks (a loaded checkpoint, or ``trainer.model``
  during training) under any TP x PP x DP layout; see its docstring for the parallel recipe.
- :class:`HFScorer` -- a Hugging Face directory through transformers (CPU or GPU), when installed.
- :class:`FixtureScorer` -- known logits computed from the prompt text, for tests and dry runs.

Answer tokens are found, not assumed: the id of ``A`` is the one extra token that appears when
``"A"`` is appended to a real prompt (which ends in ``(``). That is the byte ``A`` for the byte
tokenizer and the piece ``A`` for sentencepiece; a tokenizer that merges ``(A`` or splits ``A``
into several tokens gets a clear error instead of a silently wrong score.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch

from megatron_align.errors import UserError

LETTERS = ("A", "B")


class Scorer(Protocol):
    description: str

    def answer_logprobs(self, prompts: list[str]) -> np.ndarray: ...

    def loglikelihoods(self, requests: list[tuple[str, str]]) -> np.ndarray: ...


def split_pair(encode: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split as lm-evaluation-harness does for ``loglikelihood``.

    Trailing spaces of the context move to the continuation; the pair is encoded as one string and
    the continuation is what follows the context's own encoding. So a tokenizer that merges across
    the boundary gives the same answer here as under ``lm_eval --model hf``.
    """
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, head = encode(context + continuation), encode(context)
    return head, whole[len(head):]


def continuation_inputs(encode: Callable[[str], list[int]], requests: list[tuple[str, str]],
                        max_tokens: int | None = None) -> tuple[list[tuple[list[int], int]], int]:
    """Per request: the model input (context + continuation minus its last token) and the continuation length.

    Longer inputs keep their last ``max_tokens`` (the end of the context and the whole continuation);
    also returns how many were cut. A continuation that alone does not fit is an error.
    """
    out, truncated = [], 0
    for context, continuation in requests:
        head, tail = split_pair(encode, context, continuation)
        if not tail:
            raise UserError(f"continuation {continuation!r} encodes to no tokens after {context[-30:]!r}")
        ids = (head + tail)[:-1]
        if max_tokens and len(ids) > max_tokens:
            if len(tail) > max_tokens:
                raise UserError(f"continuation {continuation[:40]!r} is {len(tail)} tokens, more than the prompt limit "
                                f"{max_tokens} (--max-prompt-tokens / the model's seq_length)")
            ids, truncated = ids[-max_tokens:], truncated + 1
        out.append((ids, len(tail)))
    return out, truncated


def continuation_sums(
    logp_rows: list[torch.Tensor], inputs: list[tuple[list[int], int]], full: list[list[int]]
) -> np.ndarray:
    """Sum of the continuation tokens' log-probabilities from per-row ``[L, V]`` log-softmax tensors."""
    out = np.zeros(len(inputs), dtype=np.float64)
    for k, ((ids, num), tokens) in enumerate(zip(inputs, full)):
        targets = torch.as_tensor(tokens[-num:], dtype=torch.long, device=logp_rows[k].device)
        rows = torch.arange(len(ids) - num, len(ids), device=logp_rows[k].device)
        out[k] = float(logp_rows[k][rows, targets].sum())
    return out


def resolve_answer_ids(
    encode: Callable[[str], list[int]], probes: Sequence[str], tokenizer_name: str
) -> tuple[int, int]:
    """Token ids of ``A`` and ``B`` as the next token after each probe prompt (all must agree)."""
    ids: list[int] = []
    for letter in LETTERS:
        found = set()
        for probe in probes:
            base, extended = encode(probe), encode(probe + letter)
            if len(extended) != len(base) + 1 or extended[:len(base)] != base:
                raise UserError(
                    f"tokenizer {tokenizer_name}: the answer letter {letter!r} after {probe[-12:]!r} is not one extra "
                    f"token (prompt: {len(base)} tokens, prompt + {letter!r}: {len(extended)} tokens, tail "
                    f"{extended[-3:]}); the propensity eval scores single-token answers. Use a tokenizer with "
                    f"single-character pieces {LETTERS} (e.g. `megatron-align tokenizer train` models, byte tokenizer)")
            found.add(extended[-1])
        if len(found) != 1:
            raise UserError(
                f"tokenizer {tokenizer_name}: the letter {letter!r} encodes differently across prompt variants {found}"
            )
        ids.append(found.pop())
    if ids[0] == ids[1]:
        raise UserError(f"tokenizer {tokenizer_name}: 'A' and 'B' map to the same token id {ids[0]}")
    return ids[0], ids[1]


def pad_right(token_lists: list[list[int]], pad_id: int, length: int | None = None, multiple: int = 1):
    """Right-pad to one length (a multiple of ``multiple``); returns tokens [b, L], position ids, last-token index."""
    length = max(length or 0, max(len(t) for t in token_lists))
    length = -(-length // multiple) * multiple
    tokens = torch.full((len(token_lists), length), pad_id, dtype=torch.long)
    for row, ids in enumerate(token_lists):
        tokens[row, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
    last = torch.as_tensor([len(t) - 1 for t in token_lists], dtype=torch.long)
    positions = torch.arange(length, dtype=torch.long).unsqueeze(0).expand(len(token_lists), -1).contiguous()
    return tokens, positions, last


class PromptEncoder:
    """Our tokenizers (byte / sentencepiece / hf): prompts start a document as in training -- after EOD, or with
    the model's BOS where its documents start with one (Llama 3, Mistral)."""

    def __init__(self, tokenizer, max_prompt_tokens: int | None) -> None:
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.num_truncated = 0
        self._answer_ids: dict[tuple[str, ...], tuple[int, int]] = {}

    def encode(self, text: str) -> list[int]:
        bos = getattr(self.tokenizer, "bos", None)
        return [self.tokenizer.eod if bos is None else bos, *self.tokenizer.encode(text)]

    def answer_ids(self, prompts: list[str]) -> tuple[int, int]:
        probes = tuple(sorted({p[-40:] for p in prompts}))[:16]  # one probe per distinct answer cue
        if probes not in self._answer_ids:
            self._answer_ids[probes] = resolve_answer_ids(self.tokenizer.encode, probes, self.tokenizer.identity)
        return self._answer_ids[probes]

    def encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        out = []
        for text in prompts:
            ids = self.encode(text)
            if self.max_prompt_tokens and len(ids) > self.max_prompt_tokens:
                ids = ids[-self.max_prompt_tokens:]  # keep the question's end, the options and the cue
                self.num_truncated += 1
            out.append(ids)
        return out


class BatchedLMScorer:
    """Single-process scoring for any causal LM given as ``logits_fn(tokens, attention_mask) -> [b, L, V]``.

    Prompts are right-padded, so with causal attention the real tokens never see the padding and
    the logits at each prompt's last real token are the unpadded ones.
    """

    def __init__(self, logits_fn, encode: Callable[[str], list[int]], pad_id: int, vocab_size: int,
                 batch_size: int = 8, description: str = "", tokenizer_name: str = "tokenizer",
                 device: str | torch.device = "cpu", max_prompt_tokens: int | None = None) -> None:
        self.logits_fn = logits_fn
        self.encode = encode
        self.pad_id = pad_id
        self.vocab_size = vocab_size
        self.batch_size = batch_size
        self.description = description
        self.tokenizer_name = tokenizer_name
        self.device = device
        self.max_prompt_tokens = max_prompt_tokens
        self.num_truncated = 0

    @torch.no_grad()
    def answer_logprobs(self, prompts: list[str]) -> np.ndarray:
        probes = sorted({p[-40:] for p in prompts})[:16]
        ids = torch.as_tensor(resolve_answer_ids(self.encode, probes, self.tokenizer_name))
        out = np.zeros((len(prompts), 2), dtype=np.float64)
        for start in range(0, len(prompts), self.batch_size):
            lists = [self.encode(p) for p in prompts[start:start + self.batch_size]]
            if self.max_prompt_tokens:
                self.num_truncated += sum(len(t) > self.max_prompt_tokens for t in lists)
                lists = [t[-self.max_prompt_tokens:] for t in lists]
            tokens, _, last = pad_right(lists, self.pad_id)
            mask = (torch.arange(tokens.shape[1]).unsqueeze(0) <= last.unsqueeze(1)).long()
            logits = self.logits_fn(tokens.to(self.device), mask.to(self.device))
            picked = logits[torch.arange(len(lists), device=logits.device), last.to(logits.device)]
            logp = torch.log_softmax(picked[:, :self.vocab_size].double(), dim=-1)
            out[start:start + len(lists)] = logp[:, ids.to(logp.device)].cpu().numpy()
        return out

    @torch.no_grad()
    def loglikelihoods(self, requests: list[tuple[str, str]]) -> np.ndarray:
        """``log P(continuation | context)`` per request (summed over the continuation's tokens)."""
        inputs, truncated = continuation_inputs(self.encode, requests, self.max_prompt_tokens)
        self.num_truncated += truncated
        full = [split_pair(self.encode, c, x)[1] for c, x in requests]
        out = np.zeros(len(requests), dtype=np.float64)
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start:start + self.batch_size]
            tokens, _, last = pad_right([ids for ids, _ in chunk], self.pad_id)
            mask = (torch.arange(tokens.shape[1]).unsqueeze(0) <= last.unsqueeze(1)).long()
            logits = self.logits_fn(tokens.to(self.device), mask.to(self.device))
            logp = torch.log_softmax(logits[..., :self.vocab_size].double(), dim=-1)
            out[start:start + len(chunk)] = continuation_sums(list(logp), chunk, full[start:start + len(chunk)])
        return out


class HFScorer(BatchedLMScorer):
    """A Hugging Face causal LM directory (transformers), on CPU or GPU; never downloads (local files only).

    ``tokenizer``: ``"hf"`` (the directory's own, BOS added as its config says), ``"byte"`` or
    ``"sentencepiece:PATH"`` (our tokenizers, for checkpoints converted from megatron_align).
    """

    def __init__(self, path: str, tokenizer: str = "hf", device: str | None = None, dtype: str = "auto",
                 batch_size: int = 8, max_prompt_tokens: int | None = None) -> None:
        from megatron_align.optional import require

        transformers = require("transformers", "eval propensity --hf")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
                       "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, local_files_only=True)
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: not a loadable Hugging Face causal-LM directory ({err})") from None
        model.to(device).eval()
        if tokenizer == "hf":
            try:
                hf_tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
            except (OSError, ValueError) as err:
                raise UserError(f"{path}: no usable tokenizer files ({err}); pass --tokenizer byte or "
                                "--tokenizer sentencepiece:PATH for models converted from megatron_align") from None
            encode = lambda text: list(hf_tok(text)["input_ids"])  # noqa: E731 (special tokens as configured)
            pad_id = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else (hf_tok.eos_token_id or 0)
            name = f"{path} (HF)"
        else:
            from megatron_align.config.corpus import TokenizerConfig
            from megatron_align.corpus.tokenizer import build_tokenizer

            kind, _, model_path = tokenizer.partition(":")
            ours = build_tokenizer(TokenizerConfig(kind=kind, model=model_path or None))
            encoder = PromptEncoder(ours, None)
            encode, pad_id, name = encoder.encode, ours.pad, ours.identity

        def logits_fn(tokens, mask):
            return model(input_ids=tokens, attention_mask=mask).logits

        # Log-softmax over every output row the model has, as its training loss, `convert from-hf`'s checkpoint
        # (MegatronScorer masks only Megatron's own padding past these rows) and lm-evaluation-harness normalise;
        # rows past the tokenizer (Qwen's unused ones) hold real probability mass in an untrained model.
        super().__init__(
            logits_fn,
            encode,
            pad_id,
            model.config.vocab_size,
            batch_size,
            description=f"hf:{path}",
            tokenizer_name=name,
            device=device,
            max_prompt_tokens=max_prompt_tokens,
        )


_OPTION_RE = re.compile(r"\n\(A\) (?P<a>.*)\n\(B\) (?P<b>.*)\n\n(?P<cue>[^\n]*) \($", re.S)


class FixtureScorer:
    """Known logits from the prompt text: ``logit(X) = score[option text X] + bias`` for ``X = A`` only.

    ``scores`` maps option texts to a score (unknown texts score 0), ``position_bias`` is added to
    the first option (``A``) and may depend on the variant via ``variant_bias`` (answer cue ->
    extra bias), so tests know every expected probability in closed form.
    """

    def __init__(
        self, scores: dict[str, float], position_bias: float = 0.0, variant_bias: dict[str, float] | None = None
    ):
        self.scores = scores
        self.position_bias = position_bias
        self.variant_bias = variant_bias or {}
        self.description = "fixture"

    def logits(self, prompt: str) -> tuple[float, float]:
        match = _OPTION_RE.search(prompt)
        if match is None:
            raise ValueError(f"not a propensity prompt: {prompt[-80:]!r}")
        bias = self.position_bias + self.variant_bias.get(match.group("cue"), 0.0)
        return self.scores.get(match.group("a"), 0.0) + bias, self.scores.get(match.group("b"), 0.0)

    def answer_logprobs(self, prompts: list[str]) -> np.ndarray:
        logits = np.asarray([self.logits(p) for p in prompts], dtype=np.float64).reshape(len(prompts), 2)
        return logits - np.logaddexp(logits[:, :1], logits[:, 1:])  # log-softmax over the two letters
