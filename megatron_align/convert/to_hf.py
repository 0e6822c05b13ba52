"""megatron_align dist checkpoint -> Hugging Face directory of the model's family (``megatron-align convert to-hf``).

``model.hf_family`` picks the architecture (LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM, Qwen3ForCausalLM; :mod:`.families`), so a Qwen3 import exports
as Qwen3. A run with an HF tokenizer (``data.tokenizer.kind=hf``) gets its
tokenizer files, chat template and generation config copied unchanged;
``tokenizer.json`` / ``tokenizer_config.json`` are rewritten only to carry
control tokens the run added.

One process, no process group, any saved TP/PP/DP/VPP layout and spec: the
torch_dist metadata describes global tensors (see :mod:`.dist_reader`), so we
read one layer of one tensor at a time, split it with :mod:`.mapping`, cast it
and append it to a pre-planned safetensors shard (:mod:`.hf_io`). Peak memory
is about one layer's largest tensor, whatever the model size.

Everything model-specific comes from the marker ``megatron_align.json`` the
trainer wrote next to the shards: the model section of the resolved config
(dims, RoPE base, norm epsilon, tied embeddings) and the tokenizer (whose
vocabulary size trims the TP padding rows, and which is exported alongside).
"""

from __future__ import annotations

import os

from megatron_align.config import ModelConfig, TokenizerConfig
from megatron_align.convert import families, mapping
from megatron_align.convert.dist_reader import DistCheckpoint
from megatron_align.convert.hf_io import (
    DTYPE_BY_NAME,
    ShardedSafetensorsWriter,
    generation_config_json,
    llama_config_json,
    parse_size,
    write_json,
)
from megatron_align.convert.mapping import LlamaDims
from megatron_align.convert.progress import atomic_output_dir, progress_bar
from megatron_align.corpus.tokenizer import ByteTokenizer, SentencePieceTokenizer, build_tokenizer
from megatron_align.errors import ConfigError, UserError

KNOWN_KEYS = {mapping.EMBEDDING, mapping.FINAL_NORM, mapping.OUTPUT} | {
    mapping.layer_key(k) for k in mapping.LAYER_KEYS
}
FAMILY_KEYS = {"add_qkv_bias": mapping.layer_key(mapping.QKV_BIAS), "qk_layernorm": mapping.layer_key(mapping.Q_NORM)}


def model_config_of(ckpt: DistCheckpoint) -> ModelConfig:
    section = ckpt.config["model"]
    fields = set(ModelConfig.__dataclass_fields__)
    try:
        return ModelConfig(**{k: v for k, v in section.items() if k in fields})
    except (ConfigError, TypeError) as err:
        raise UserError(f"{ckpt.path}: the saved model config is invalid ({err})") from None


def tokenizer_of(ckpt: DistCheckpoint, tokenizer_model: str | None = None):
    """(our tokenizer for this checkpoint, its sentencepiece .model path or None),
    identity-checked against the marker."""
    section = dict(ckpt.config.get("data", {}).get("tokenizer") or {})
    config = TokenizerConfig(kind=section.get("kind", "byte"), model=tokenizer_model or section.get("model"),
                             control_tokens=list(section.get("control_tokens", TokenizerConfig().control_tokens)))
    if config.kind == "byte":
        tokenizer = ByteTokenizer(config.control_tokens)
    elif config.kind == "hf":
        tokenizer = build_tokenizer(config)  # a clear error names data.tokenizer.model when it moved
    else:
        if not os.path.isfile(config.model):
            raise UserError(f"{ckpt.path}: the run's sentencepiece model {config.model} is not here; pass "
                            "--tokenizer-model PATH (the same .model file), or --no-tokenizer with --vocab-size N")
        tokenizer = SentencePieceTokenizer(config.model, config.control_tokens)
    saved = ckpt.marker.get("tokenizer")
    if saved and saved != tokenizer.identity:
        raise UserError(
            f"{ckpt.path}: the checkpoint was trained with tokenizer {saved}, but {config.model or 'byte'} is "
            f"{tokenizer.identity}; pass --tokenizer-model with the run's own tokenizer"
        )
    return tokenizer, config.model if config.kind != "byte" else None


def checkpoint_dims(ckpt: DistCheckpoint, model: ModelConfig, vocab_size: int) -> LlamaDims:
    """Dims from the saved config, cross-checked against the tensor shapes in .metadata."""
    dims = LlamaDims.from_config(model, vocab_size)
    keys = set(ckpt.model_keys)
    known = KNOWN_KEYS | {mapping.layer_key(k) for k in mapping.layer_keys(dims)}
    unknown = sorted(keys - known)
    if unknown:
        raise UserError(
            f"{ckpt.path}: tensors without a Llama equivalent: {', '.join(unknown[:5])} (biases, MoE, QK-norm "
            "and multi-token prediction are not supported by the converter)"
        )
    required = known - ({mapping.OUTPUT} if dims.tie_embeddings else set())
    missing = sorted(required - keys)
    if missing:
        raise UserError(f"{ckpt.path}: model tensors missing from the checkpoint: {', '.join(missing)}")
    d, h, L = dims.head_dim, dims.hidden_size, dims.num_layers
    expected = {mapping.layer_key(mapping.QKV): (L, (dims.num_attention_heads + 2 * dims.num_query_groups) * d, h),
                mapping.layer_key(mapping.FC1): (L, 2 * dims.ffn_hidden_size, h),
                mapping.layer_key(mapping.FC2): (L, h, dims.ffn_hidden_size)}
    for key, shape in expected.items():
        if ckpt.shape(key) != shape:
            raise UserError(f"{ckpt.path}: {key} has shape {ckpt.shape(key)}, but the saved config implies {shape}")
    rows, width = ckpt.shape(mapping.EMBEDDING)
    if width != h or rows < vocab_size:
        raise UserError(f"{ckpt.path}: embedding is {rows} x {width}, expected >= {vocab_size} x {h}")
    return dims


def _tensor_stream(ckpt: DistCheckpoint, dims: LlamaDims):
    """(hf_name, tensor) in ``mapping.hf_names`` order, reading one layer slice at a time."""
    yield from mapping.global_to_hf(mapping.EMBEDDING, ckpt.read(mapping.EMBEDDING), dims)
    for layer in range(dims.num_layers):
        for name in mapping.layer_keys(dims):
            key = mapping.layer_key(name)
            yield from mapping.layer_to_hf(key, ckpt.read(key, layer), layer, dims)
    yield from mapping.global_to_hf(mapping.FINAL_NORM, ckpt.read(mapping.FINAL_NORM), dims)
    if not dims.tie_embeddings:
        yield from mapping.global_to_hf(mapping.OUTPUT, ckpt.read(mapping.OUTPUT), dims)


def convert_to_hf(
    checkpoint: str,
    out: str,
    *,
    dtype: str = "auto",
    max_shard_size: str = "5GB",
    overwrite: bool = False,
    tokenizer_model: str | None = None,
    with_tokenizer: bool = True,
    vocab_size: int | None = None,
    progress: bool = True,
) -> dict:
    """Convert; returns a summary dict (paths, dims, files). Raises UserError for anything the user can fix."""
    ckpt = DistCheckpoint(checkpoint)
    model = model_config_of(ckpt)
    families.check_exportable(model, ckpt.path)
    tokenizer, sp_model = tokenizer_of(ckpt, tokenizer_model) if with_tokenizer else (None, None)
    vocab = vocab_size or model.vocab_size or (tokenizer.vocab_size if tokenizer else None)
    if vocab is None:
        raise UserError("--no-tokenizer needs --vocab-size N (the model's real vocabulary, without TP padding)")
    dims = checkpoint_dims(ckpt, model, vocab)
    out_dtype = ckpt.dtype(mapping.EMBEDDING) if dtype == "auto" else DTYPE_BY_NAME[dtype]
    shapes = mapping.hf_shapes(dims)
    specs = [(name, shapes[name], out_dtype) for name in mapping.hf_names(dims)]
    ckpt.check_files()
    special = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    notes: list[str] = []
    with atomic_output_dir(out, overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, specs, parse_size(max_shard_size))
        bar = progress_bar(writer.total_size, "to-hf", progress)
        for name, tensor in _tensor_stream(ckpt, dims):
            tensor = tensor.to(out_dtype)
            writer.write(name, tensor)
            bar.update(tensor.numel() * tensor.element_size())
        bar.close()
        writer.close()
        files = list(writer.file_names) + ["model.safetensors.index.json"]
        if tokenizer is not None:
            from megatron_align.convert import tokenizer_export as tx

            if tokenizer.vocab_size > vocab:
                notes.append(
                    f"tokenizer files skipped: the tokenizer has {tokenizer.vocab_size} ids, the model {vocab}"
                )
            elif tokenizer.identity.startswith("hf:"):
                files += tx.write_hf_tokenizer(tmp, tokenizer)
            elif isinstance(tokenizer, ByteTokenizer):
                written = tx.write_byte_tokenizer(tmp, tokenizer, model.seq_length)
                notes.append(
                    "byte tokenizer exported as a byte-level PreTrainedTokenizerFast (tokenizer.json)"
                    if written
                    else "tokenizer files skipped: `tokenizers` is not installed"
                )
                files += written
            else:
                files += tx.write_sentencepiece_tokenizer(tmp, sp_model, tokenizer, model.seq_length)
            if tokenizer.vocab_size <= vocab:
                special = tx.tokenizer_special_ids(tokenizer)
                differs = tx.check_tokenizer(tmp, tokenizer)
                if differs:
                    notes.append(
                        f"WARNING: the HF tokenizer encodes {len(differs)} sample text(s) differently from ours, "
                        f"e.g. {differs[0]!r}"
                    )
        source = ckpt.marker.get("source") or {}
        if special["eos_token_id"] is None and source.get("eos_token_id") is not None:  # from-hf: keep the HF ids
            special.update(bos_token_id=source.get("bos_token_id"), eos_token_id=source["eos_token_id"])
        write_json(
            os.path.join(tmp, "config.json"),
            families.config_json(
                model,
                llama_config_json(
                    dims,
                    rope_theta=model.rotary_base,
                    rms_norm_eps=model.norm_epsilon,
                    max_position_embeddings=model.seq_length,
                    dtype=out_dtype,
                    initializer_range=model.init_method_std,
                    **special,
                ),
            ),
        )
        if "generation_config.json" not in files:  # an HF tokenizer carried the model's own
            write_json(os.path.join(tmp, "generation_config.json"), generation_config_json(**special))
        write_json(
            os.path.join(tmp, "megatron_align_source.json"),
            {
                "checkpoint": ckpt.path,
                "step": ckpt.marker.get("step"),
                "consumed_samples": ckpt.marker.get("consumed_samples"),
                "layout": ckpt.marker.get("layout"),
                "tokenizer": ckpt.marker.get("tokenizer"),
                "data_fingerprint": (ckpt.marker.get("data") or {}).get("fingerprint"),
            },
        )
        files += ["config.json", "megatron_align_source.json"] + [
            n for n in ["generation_config.json"] if n not in files
        ]
    return {
        "out": os.path.abspath(out),
        "checkpoint": ckpt.path,
        "step": ckpt.marker.get("step"),
        "dtype": str(out_dtype),
        "vocab_size": vocab,
        "padded_vocab_size": ckpt.shape(mapping.EMBEDDING)[0],
        "files": files,
        "notes": notes,
        "model": model,
        "dims": dims,
        "tokenizer": tokenizer,
    }
