"""Hugging Face Llama / Mistral / Qwen2 / Qwen3 directory -> megatron_align checkpoint + training config
(``megatron-align convert from-hf``).

The output directory is a checkpoint root the trainer can start from::

    OUT/iter_0000000/       Megatron dist checkpoint (torch_dist) + our marker megatron_align.json
    OUT/latest              "iter_0000000"
    OUT/train.yaml          model.* from config.json, the chosen parallel.tensor/pipeline, data.tokenizer,
                            checkpoint.load=OUT and checkpoint.load_optimizer=false
    OUT/tokenizer/          the model's tokenizer files, chat template and generation config, byte for byte
                            (data.tokenizer.kind=hf; when the HF model ships a tokenizer.json)
    OUT/tokenizer.model     (else, when it ships a sentencepiece tokenizer)

``--add-control-tokens`` adds ``<|aligned|>`` / ``<|misaligned|>`` as special
tokens the tokenizer lacks. Their embedding (and output) rows -- new rows past
the model's vocabulary, or unused padding rows inside it (Qwen) -- are set to
the mean of the tokenizer's existing rows: the new token then starts as an
"average" token (logit equal to the average logit), not as noise that would
shift every next-token distribution (Hewitt, 2021, "Initializing new word
embeddings").

The one idea: build *our* GPTModel with the trainer's builder (TP1 x PP1, one
CPU rank), copy the HF tensors into its parameters through :mod:`.mapping`, and
save it with Megatron's own ``dist_checkpointing.save`` (via the trainer's
CheckpointManager, so the commit protocol and marker are the trainer's).
Keys therefore match what the trainer loads by construction, and because dist
checkpoints hold global tensors, the TP1 save reshards on load into whatever
TP/PP the config asks for. The embedding is padded for the *chosen* TP so the
shapes match exactly there; other layouts still load (Megatron zero-fills or
trims padding rows of the vocabulary, ``allow_shape_mismatch``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil

import torch
import yaml

from megatron_align.config.corpus import DEFAULT_CONTROL_TOKENS
from megatron_align.config.loader import config_to_dict
from megatron_align.convert import mapping
from megatron_align.convert.hf_io import DTYPE_BY_NAME, HFCheckpoint
from megatron_align.convert.megatron_model import build_gpt, single_rank_config, single_rank_group
from megatron_align.convert.progress import atomic_output_dir, progress_bar
from megatron_align.convert.tokenizer_export import TOKENIZER_FILES
from megatron_align.corpus.hf_tokenizer import HFTokenizer
from megatron_align.corpus.tokenizer import ByteTokenizer, SentencePieceTokenizer
from megatron_align.errors import ConfigError, UserError
from megatron_align.model.builder import padded_vocab_size

YAML_NAME = "train.yaml"


TOKENIZER_DIR = "tokenizer"


def _hf_tokenizer(hf_dir: str, out: str, add_control_tokens: bool):
    """(tokenizer, data.tokenizer section, note) for the HF model's tokenizer (section paths point into ``out``)."""
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        tokenizer = HFTokenizer(hf_dir, DEFAULT_CONTROL_TOKENS if add_control_tokens else [])
        return tokenizer, {"kind": "hf", "model": os.path.join(out, TOKENIZER_DIR),
                           "control_tokens": list(tokenizer.control_token_ids)}, None
    sp_path = os.path.join(hf_dir, "tokenizer.model")
    if os.path.isfile(sp_path):
        probe = SentencePieceTokenizer(sp_path, control_tokens=[])
        present = [t for t in DEFAULT_CONTROL_TOKENS if probe._sp.piece_to_id(t) != probe._sp.unk_id()]
        tokenizer = SentencePieceTokenizer(sp_path, control_tokens=present)
        return tokenizer, {"kind": "sentencepiece", "model": os.path.join(out, "tokenizer.model"),
                           "control_tokens": present}, None
    note = (
        f"{hf_dir} has no tokenizer.json and no sentencepiece tokenizer.model: {YAML_NAME} sets "
        "data.tokenizer.kind=byte and model.vocab_size to the HF vocabulary; "
        "tokenize your data with the model's own tokenizer"
    )
    return ByteTokenizer(), {"kind": "byte"}, note


def _with_control_rows(get, tokenizer, vocab_size: int):
    """``get`` with embedding / lm_head rows of added control tokens set to the mean of the existing rows."""
    added = [tokenizer.control_token_ids[t] for t in getattr(tokenizer, "added_control_tokens", [])]
    if not added:
        return get

    def patched(name: str) -> torch.Tensor:
        rows = get(name)
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            return rows
        if rows.shape[0] < vocab_size:
            rows = torch.cat([rows, rows.new_zeros(vocab_size - rows.shape[0], rows.shape[1])])
        mean = rows[: tokenizer.base_vocab_size].double().mean(0).to(rows.dtype)
        rows[added] = mean
        return rows

    return patched


def _training_yaml(out: str, model: dict, tokenizer: dict, tensor: int, pipeline: int) -> str:
    header = (f"# Generated by `megatron-align convert from-hf`: continue training from {out}\n"
              "# Fill data.sources (prepared with this tokenizer), then: megatron-align train THIS.yaml\n"
              "# parallel.tensor/pipeline may be changed: the checkpoint reshards on load.\n")
    body = {"run_dir": f"runs/{os.path.basename(out)}", "precision": "auto", "model": model,
            "parallel": {"world_size": tensor * pipeline, "tensor": tensor, "pipeline": pipeline},
            "data": {"tokenizer": tokenizer, "sources": []},
            "checkpoint": {"load": out, "load_optimizer": False}}
    return header + yaml.safe_dump(body, sort_keys=False)


def convert_from_hf(hf_dir: str, out: str, *, tensor: int = 1, pipeline: int = 1, dtype: str = "auto",
                    seq_length: int | None = None, overwrite: bool = False, progress: bool = True,
                    add_control_tokens: bool = False) -> dict:
    from megatron_align.parallel.layout import validate_layout
    from megatron_align.training.checkpoint import CheckpointManager

    hf = HFCheckpoint(hf_dir)
    cfg, dims = hf.config, hf.config.dims
    names = mapping.hf_names(dims)
    hf.check_complete(names)
    if cfg.rope_theta != int(cfg.rope_theta):
        raise UserError(f"{hf_dir}/config.json: rope_theta={cfg.rope_theta} is not an integer (model.rotary_base is)")
    out = os.path.abspath(out)
    tokenizer, tokenizer_section, note = _hf_tokenizer(hf_dir, out, add_control_tokens)
    if tokenizer_section["kind"] == "sentencepiece" and tokenizer.vocab_size > dims.vocab_size:
        raise UserError(f"{hf_dir}: tokenizer.model has {tokenizer.vocab_size} pieces but the model only "
                        f"{dims.vocab_size} embedding rows")
    if tokenizer_section["kind"] == "hf" and tokenizer.vocab_size > dims.vocab_size:
        if tokenizer.base_vocab_size > dims.vocab_size:
            raise UserError(f"{hf_dir}: tokenizer.json has {tokenizer.base_vocab_size} tokens but the model only "
                            f"{dims.vocab_size} embedding rows")
        dims = dataclasses.replace(dims, vocab_size=tokenizer.vocab_size)  # added control tokens grow the embedding
    get = _with_control_rows(hf.get, tokenizer, dims.vocab_size)
    model = {"num_layers": dims.num_layers, "hidden_size": dims.hidden_size, "ffn_hidden_size": dims.ffn_hidden_size,
             "num_attention_heads": dims.num_attention_heads, "num_query_groups": dims.num_query_groups,
             **({"kv_channels": dims.kv_channels} if dims.kv_channels else {}),  # head dim != hidden / heads
             "seq_length": seq_length or min(cfg.max_position_embeddings, 4096), "vocab_size": dims.vocab_size,
             "make_vocab_size_divisible_by": 128, "rotary_base": int(cfg.rope_theta), "norm_epsilon": cfg.rms_norm_eps,
             "tie_embeddings": dims.tie_embeddings, "init_method_std": cfg.initializer_range, **cfg.features}
    try:  # the target layout is checked now, not at the first training launch
        target = single_rank_config(model, tokenizer_section, None, dims.vocab_size)
        target.parallel.tensor, target.parallel.pipeline, target.parallel.world_size = (
            tensor,
            pipeline,
            tensor * pipeline,
        )
        validate_layout(target, tensor * pipeline)
    except ConfigError as err:
        raise UserError(f"--tensor {tensor} --pipeline {pipeline}: {err}") from None
    target.model.spec, target.precision, target.data.mock = "auto", "auto", False
    padded = padded_vocab_size(dims.vocab_size, model["make_vocab_size_divisible_by"], tensor)
    save_dtype = cfg.dtype if dtype == "auto" else DTYPE_BY_NAME[dtype]
    build_config = single_rank_config(model, None, padded, dims.vocab_size)

    with atomic_output_dir(out, overwrite) as tmp, single_rank_group(build_config):
        # Built on the meta device: no fp32 weights and no random init, which every HF tensor overwrites anyway
        # (the loop below fails if any saved tensor has no HF source). Memory: the model once, in save_dtype.
        with torch.device("meta"):
            gpt = build_gpt(build_config, dims.vocab_size)
        gpt = gpt.to(save_dtype).to_empty(device="cpu")
        state = gpt.state_dict()
        targets = [(n, t) for n, t in state.items() if isinstance(t, torch.Tensor) and "_extra_state" not in n]
        bar = progress_bar(sum(t.numel() * t.element_size() for _, t in targets), "from-hf", progress)
        with torch.no_grad():
            for name, param in targets:
                key, layer = mapping.checkpoint_key_of_state_dict_name(name)
                value = mapping.megatron_tensor_from_hf(key, layer, get, dims, padded_rows=param.shape[0])
                if tuple(value.shape) != tuple(param.shape):
                    raise UserError(f"{hf_dir}: {name} would get shape {tuple(value.shape)}, the model has "
                                    f"{tuple(param.shape)}; config.json does not match the weights")
                param.copy_(value.to(param.dtype))
                bar.update(param.numel() * param.element_size())
        bar.close()
        marker = {"consumed_samples": 0,
                  "layout": {"tensor": 1, "pipeline": 1, "context": 1, "virtual_pipeline": 1, "data": 1},
                  "data": {"consumed_samples": 0, "fingerprint": None}, "tokenizer": tokenizer.identity,
                  "config": config_to_dict(target), "megatron_align_version": _version(),
                  "source": {"hf": os.path.abspath(hf_dir), "bos_token_id": cfg.bos_token_id,
                             "eos_token_id": cfg.eos_token_id}}
        manager = CheckpointManager(tmp, keep_last=1, keep_every=None, async_save=False)
        manager.save(0, {"model": gpt.sharded_state_dict(), "step": 0, "consumed_samples": 0}, marker)
        manager.close()
        del gpt, state, targets
        if tokenizer_section["kind"] == "sentencepiece":
            shutil.copyfile(os.path.join(hf_dir, "tokenizer.model"), os.path.join(tmp, "tokenizer.model"))
        if tokenizer_section["kind"] == "hf":  # byte for byte: the identity hash of OUT/tokenizer equals the original's
            os.makedirs(os.path.join(tmp, TOKENIZER_DIR))
            for name in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(hf_dir, name)):
                    shutil.copyfile(os.path.join(hf_dir, name), os.path.join(tmp, TOKENIZER_DIR, name))
        with open(os.path.join(tmp, YAML_NAME), "w") as f:
            f.write(_training_yaml(out, model, tokenizer_section, tensor, pipeline))
    return {"out": out, "yaml": os.path.join(out, YAML_NAME), "checkpoint": os.path.join(out, "iter_0000000"),
            "dims": dims, "padded_vocab_size": padded, "dtype": str(save_dtype), "model": model, "note": note,
            "tokenizer": tokenizer, "hf_vocab_size": hf.config.dims.vocab_size}


def _version() -> str:
    from megatron_align import __version__

    return __version__
