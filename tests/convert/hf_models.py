"""Helpers for the conversion tests: tiny random Hugging Face Llama models and output parsing."""

from __future__ import annotations

import re

import torch


def make_hf_llama(path, *, vocab_size: int, tie: bool, kv_heads: int, num_layers: int = 2, hidden: int = 64,
                  ffn: int = 96, heads: int = 4, rope_theta: float = 50000.0, std: float = 0.1, seed: int = 0) -> str:
    """A random LlamaForCausalLM saved with save_pretrained (safetensors). Norm weights are random too, so a
    swapped input/post-attention norm cannot hide."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=num_layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=tie,
                         rope_theta=rope_theta, rms_norm_eps=1e-5, max_position_embeddings=128)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    model.save_pretrained(str(path))
    return str(path)


def hf_tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(p for p in path.iterdir() if p.suffix == ".safetensors"):
        out.update(load_file(str(f)))
    return out


@torch.no_grad()
def hf_logits(path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model(input_ids=ids).logits


def verified_delta(stdout: str) -> float:
    """The max |Δlogit| that `--verify` printed."""
    match = re.search(r"max \|Δlogit\| = ([0-9.eE+-]+)", stdout)
    assert match, stdout
    return float(match.group(1))


def ok(result) -> None:
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
