"""Helpers for the conversion tests: tiny random Hugging Face Llama models and output parsing."""

from __future__ import annotations

import re

import torch
from conftest import make_bpe_tokenizer


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


# -- the families of convert/families.py, with their own tokenizer -------------------------------------------
BOS_FAMILIES = ("llama", "mistral")  # their tokenizers add BOS; Qwen's have none (conftest.make_bpe_tokenizer)


def make_hf_family(path, family: str, *, tie: bool = False, rope_llama3: bool = False, extra_rows: int = 3,
                   num_layers: int = 2, hidden: int = 96, heads: int = 6, kv_heads: int = 2, ffn: int = 160,
                   head_dim: int | None = None, seed: int = 0) -> str:
    """A random model of ``family`` at odd sizes (hidden 96, GQA 6/2, head_dim 16 = 96 / 6 unless given, as Qwen3-0.6B's
    128 != 1024 / 16) with its own BPE tokenizer; the embedding has ``extra_rows`` more rows than the tokenizer (as
    Qwen's do), so vocab is not a multiple of 128."""
    import transformers

    vocab = make_bpe_tokenizer(path, bos=family in BOS_FAMILIES) + extra_rows
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=num_layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim or hidden // heads,
                  tie_word_embeddings=tie, rms_norm_eps=1e-5, max_position_embeddings=16384 if rope_llama3 else 128)
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if rope_llama3:
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
               "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
    config_cls, model_cls = (getattr(transformers, n) for n in classes[family])
    extra = {"sliding_window": None} if family == "mistral" else {}
    if family in ("qwen2", "qwen3"):
        extra = {"use_sliding_window": False}
    config = config_cls(**common, rope_parameters=rope, **extra)
    generation = (path / "generation_config.json").read_text()
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.3)
            else:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(str(path))
    (path / "generation_config.json").write_text(generation)  # the family's own, not transformers' default
    return str(path)
