"""Hugging Face Llama-layout directories (the families of :mod:`.families`): config.json <-> LlamaDims,
and safetensors written/read tensor by tensor.

Writing streams: every tensor's name, shape and dtype is known from the
Megatron checkpoint's metadata *before* any data is read, so shard files are
planned up front and each safetensors header is written first; tensor bytes
then follow one at a time and are dropped. (``safetensors.torch.save_file``
would need a whole shard in memory.) The format is the documented one: an
8-byte little-endian header length, a JSON header of dtype/shape/byte offsets
(space-padded to 8 bytes), then the raw little-endian bytes.

Reading uses ``safetensors.safe_open`` (memory-mapped, one tensor at a time).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import torch

from megatron_align.convert import families
from megatron_align.convert.mapping import LlamaDims
from megatron_align.errors import ConfigError, UserError
from megatron_align.optional import require

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DTYPE_BY_NAME = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                 "fp16": torch.float16, "float16": torch.float16}
INDEX_NAME = "model.safetensors.index.json"


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '123' -> bytes (decimal units, as Hugging Face uses)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    s = text.strip().upper()
    for unit, factor in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * factor)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise UserError(f"--max-shard-size {text!r}: expected bytes or a size like 5GB / 500MB") from None


# -- writing -------------------------------------------------------------------------------------------
class ShardedSafetensorsWriter:
    """Writes ``model-0000i-of-0000n.safetensors`` + index for tensors arriving in a fixed, planned order."""

    def __init__(
        self, out_dir: str, specs: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int
    ) -> None:
        self.out_dir = out_dir
        self.specs = specs
        shards: list[list[int]] = [[]]
        size = 0
        for i, (_, shape, dtype) in enumerate(specs):
            nbytes = math.prod(shape) * _itemsize(dtype)
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(i)
            size += nbytes
        self.shards = shards
        self.total_size = sum(math.prod(s) * _itemsize(d) for _, s, d in specs)
        self.file_names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        self._next = 0
        self._shard = -1
        self._file = None
        self._remaining: list[int] = []

    def _open_shard(self) -> None:
        self._shard += 1
        indices = self.shards[self._shard]
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for i in indices:
            name, shape, dtype = self.specs[i]
            nbytes = math.prod(shape) * _itemsize(dtype)
            header[name] = {
                "dtype": SAFETENSORS_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._file = open(os.path.join(self.out_dir, self.file_names[self._shard]), "wb")
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)
        self._remaining = list(indices)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.specs):
            raise AssertionError(f"unexpected extra tensor {name}")
        expected, shape, dtype = self.specs[self._next]
        assert name == expected, f"tensor order: got {name}, expected {expected}"
        assert tuple(tensor.shape) == shape and tensor.dtype == dtype, (
            name,
            tuple(tensor.shape),
            tensor.dtype,
            shape,
            dtype,
        )
        if not self._remaining:
            self._open_shard()
        data = tensor.detach().contiguous().cpu().view(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._remaining.pop(0)
        self._next += 1
        if not self._remaining:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Write the index; every planned tensor must have been written."""
        assert self._next == len(self.specs), f"{len(self.specs) - self._next} tensors were not written"
        weight_map = {self.specs[i][0]: self.file_names[s] for s, idx in enumerate(self.shards) for i in idx}
        index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
        write_json(os.path.join(self.out_dir, INDEX_NAME), index)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")


def llama_config_json(dims: LlamaDims, *, rope_theta: float, rms_norm_eps: float, max_position_embeddings: int,
                      dtype: torch.dtype, bos_token_id: int | None, eos_token_id: int | None, pad_token_id: int | None,
                      initializer_range: float) -> dict:
    """config.json for LlamaForCausalLM, readable by transformers 4.x (rope_theta) and 5.x (rope_parameters)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": dims.vocab_size, "hidden_size": dims.hidden_size, "intermediate_size": dims.ffn_hidden_size,
        "num_hidden_layers": dims.num_layers, "num_attention_heads": dims.num_attention_heads,
        "num_key_value_heads": dims.num_query_groups, "head_dim": dims.head_dim, "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings, "initializer_range": initializer_range,
        "rms_norm_eps": rms_norm_eps, "rope_theta": float(rope_theta), "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(rope_theta)},
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
        "tie_word_embeddings": dims.tie_embeddings, "use_cache": True,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
        "torch_dtype": HF_DTYPE_NAMES[dtype], "dtype": HF_DTYPE_NAMES[dtype],
    }


def generation_config_json(bos_token_id: int | None, eos_token_id: int | None, pad_token_id: int | None) -> dict:
    out = {"_from_model_config": True, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    if pad_token_id is not None:
        out["pad_token_id"] = pad_token_id
    return out


# -- reading -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HFLlamaConfig:
    dims: LlamaDims
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    initializer_range: float
    dtype: torch.dtype
    bos_token_id: int | None
    eos_token_id: int | None
    family: families.Family | None = None
    features: dict | None = None
    """model.* keys of the family's options (hf_family, add_qkv_bias, qk_layernorm, rope_scaling[_factor])."""


def parse_llama_config(config: dict, where: str) -> HFLlamaConfig:
    """config.json -> what the converter needs; unsupported features raise a UserError naming the key."""
    family, features = families.model_features(config, where)
    rope = config.get("rope_parameters") or {}
    rope_theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        dims = LlamaDims(
            num_layers=int(config["num_hidden_layers"]),
            hidden_size=hidden,
            ffn_hidden_size=int(config["intermediate_size"]),
            num_attention_heads=heads,
            num_query_groups=int(config.get("num_key_value_heads") or heads),
            vocab_size=int(config["vocab_size"]),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            kv_channels=_kv_channels(config.get("head_dim"), hidden, heads, where),
            qkv_bias=family.qkv_bias,
            qk_norm=family.qk_norm,
        )
    except KeyError as err:
        raise UserError(f"{where}: missing key {err.args[0]!r}") from None
    except ConfigError as err:  # the shared shape's checks speak in model.* keys; name the HF file too
        raise UserError(f"{where}: {err}") from None
    dtype_name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return HFLlamaConfig(dims=dims, rope_theta=rope_theta, rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                         max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
                         initializer_range=float(config.get("initializer_range", 0.02)),
                         dtype=DTYPE_BY_NAME.get(str(dtype_name), torch.float32),
                         bos_token_id=config.get("bos_token_id"), eos_token_id=_first(config.get("eos_token_id")),
                         family=family, features=features)


def _kv_channels(head_dim, hidden: int, heads: int, where: str) -> int | None:
    """config.json ``head_dim`` -> model.kv_channels: None where it is hidden_size / heads (the default)."""
    if head_dim is None:
        return None
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise UserError(f"{where}: head_dim={head_dim!r}: expected a positive even integer (RoPE rotates pairs "
                        "of channels)")
    return None if head_dim * heads == hidden else head_dim


def _first(value):
    return value[0] if isinstance(value, list) and value else value


class HFCheckpoint:
    """An HF model directory: config.json + safetensors (one file or sharded with an index)."""

    def __init__(self, path: str) -> None:
        if not os.path.isdir(path):
            raise UserError(f"{path}: no such Hugging Face model directory")
        self.path = path
        config_path = os.path.join(path, "config.json")
        try:
            with open(config_path) as f:
                self.raw_config = json.load(f)
        except FileNotFoundError:
            raise UserError(
                f"{config_path}: missing; expected a Hugging Face model directory (save_pretrained output)"
            ) from None
        except json.JSONDecodeError as err:
            raise UserError(f"{config_path}: not valid JSON ({err})") from None
        self.config = parse_llama_config(self.raw_config, config_path)
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        index = os.path.join(self.path, INDEX_NAME)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    return dict(json.load(f)["weight_map"])
            except (json.JSONDecodeError, KeyError) as err:
                raise UserError(f"{index}: unreadable index ({err})") from None
        single = os.path.join(self.path, "model.safetensors")
        if os.path.isfile(single):
            with self._open("model.safetensors") as handle:
                return {name: "model.safetensors" for name in handle.keys()}
        if any(n.endswith(".bin") for n in os.listdir(self.path)):
            raise UserError(f"{self.path}: only PyTorch .bin weights; convert them to safetensors first "
                            "(transformers: model.save_pretrained(dir, safe_serialization=True))")
        raise UserError(f"{self.path}: no model.safetensors or {INDEX_NAME}")

    def _open(self, file_name: str):
        safetensors = require("safetensors", "reading Hugging Face weights")
        path = os.path.join(self.path, file_name)
        if not os.path.isfile(path):
            raise UserError(f"{path}: listed in the weight index but missing")
        try:
            return safetensors.safe_open(path, framework="pt")
        except Exception as err:  # truncated / corrupt header
            raise UserError(f"{path}: unreadable safetensors file ({err}); the download or copy is damaged") from None

    def get(self, name: str) -> torch.Tensor:
        """One tensor. Its file is opened for this read only: safetensors memory-maps files, and mapped pages
        count as resident until unmapped, so a long-lived handle would make RSS grow to the whole checkpoint."""
        if name not in self.weight_map:
            raise UserError(
                f"{self.path}: tensor {name!r} is missing from the weights (does config.json match the weights?)"
            )
        file_name = self.weight_map[name]
        with self._open(file_name) as handle:
            try:
                return handle.get_tensor(name).clone()
            except Exception as err:
                raise UserError(f"{os.path.join(self.path, file_name)}: reading {name!r} failed ({err}); "
                                "the file is damaged") from None

    def check_complete(self, names: list[str]) -> None:
        """Every shard opens (safetensors checks the size against its header) and every needed tensor is listed."""
        for file_name in sorted(set(self.weight_map.values())):
            with self._open(file_name):
                pass
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise UserError(f"{self.path}: {len(missing)} LlamaForCausalLM tensors missing from the weights, e.g. "
                            f"{missing[:3]}; is this a complete checkpoint of the family config.json names?")
