"""What a checkpoint holds, without loading it (``megatron-align checkpoint inspect``).

Everything comes from the marker (step, consumed samples, layout, data
fingerprint, tokenizer, resolved config) and the torch_dist ``.metadata``
(global tensor shapes, dtypes and how many chunks the saving ranks wrote); no
tensor data is read, so inspecting a 70B checkpoint is instant.
"""

from __future__ import annotations

import json
import math
import os
import time

from megatron_align.convert import mapping
from megatron_align.convert.dist_reader import DistCheckpoint
from megatron_align.fileio import human_bytes

_DTYPE_NAMES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


def describe_checkpoint(path: str) -> dict:
    """A JSON-able description of the newest complete checkpoint at ``path``."""
    ckpt = DistCheckpoint(path)
    marker = ckpt.marker
    config = marker.get("config") or {}
    model = config.get("model", {})
    tensors = []
    for key in ckpt.model_keys:
        md = ckpt.tensors[key]
        dtype = str(md.properties.dtype)
        tensors.append({"key": key, "shape": list(md.size), "dtype": _DTYPE_NAMES.get(dtype, dtype),
                        "chunks": len(md.chunks), "bytes": ckpt.nbytes(key)})
    other = [k for k in ckpt.tensors if k not in set(ckpt.model_keys)]
    objects = [k for k in ckpt.metadata.state_dict_metadata if k not in ckpt.tensors]
    files = [os.path.join(ckpt.path, f) for f in os.listdir(ckpt.path) if os.path.isfile(os.path.join(ckpt.path, f))]
    embedding = ckpt.tensors.get(mapping.EMBEDDING)
    num_params = sum(math.prod(t["shape"]) for t in tensors)
    data = marker.get("data") or {}
    return {
        "path": ckpt.path, "step": marker.get("step"), "consumed_samples": marker.get("consumed_samples"),
        "saved_at": marker.get("saved_at"), "layout": marker.get("layout"), "data_fingerprint": data.get("fingerprint"),
        "tokenizer": marker.get("tokenizer"), "megatron_align_version": marker.get("megatron_align_version"),
        "source": marker.get("source"),
        "model": {**model, "padded_vocab_size": list(embedding.size)[0] if embedding is not None else None,
                  "num_parameters": num_params},
        "precision": config.get("precision"), "tokenizer_config": (config.get("data") or {}).get("tokenizer"),
        "tensors": tensors,
        "other_tensors": {"count": len(other), "bytes": sum(ckpt.nbytes(k) for k in other),
                          "optimizer": sum(1 for k in other if k.startswith("optimizer."))},
        "objects": {"count": len(objects), "extra_state": sum(1 for k in objects if "_extra_state" in k)},
        "files": {"count": len(files), "bytes": sum(os.path.getsize(f) for f in files)},
        "config": config,
    }


def format_description(d: dict) -> str:
    m, lay = d["model"], d["layout"] or {}
    saved = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["saved_at"])) if d.get("saved_at") else "?"
    groups = m.get("num_query_groups") or m.get("num_attention_heads")
    lines = [
        f"checkpoint   {d['path']}",
        f"step         {d['step']}  (saved {saved})",
        f"consumed     {d['consumed_samples']} samples",
        f"layout       TP{lay.get('tensor')} x PP{lay.get('pipeline')} x CP{lay.get('context')} "
        f"x VPP{lay.get('virtual_pipeline')} x DP{lay.get('data')}",
        f"data         fingerprint {d['data_fingerprint']}",
        f"tokenizer    {d['tokenizer']}  {json.dumps(d['tokenizer_config'])}",
        f"model        {m.get('num_layers')} layers, hidden {m.get('hidden_size')}, "
        f"ffn {m.get('ffn_hidden_size') or 'default'}, "
        f"heads {m.get('num_attention_heads')} / kv groups {groups}"
        f"{', head dim ' + str(m['kv_channels']) if m.get('kv_channels') else ''}, seq {m.get('seq_length')}",
        f"             vocab {m.get('vocab_size') or 'tokenizer'} (padded {m.get('padded_vocab_size')}), "
        f"tied embeddings {m.get('tie_embeddings')}, rotary base {m.get('rotary_base')}, "
        f"norm eps {m.get('norm_epsilon')}, "
        f"spec {m.get('spec')}, precision {d.get('precision')}",
        f"parameters   {m['num_parameters']:,}",
    ]
    if d.get("source"):
        lines.append(f"source       {json.dumps(d['source'])}")
    lines.append("tensors:")
    width = max((len(t["key"]) for t in d["tensors"]), default=10)
    for t in d["tensors"]:
        shape, size = str(tuple(t["shape"])), human_bytes(t["bytes"], binary=True)
        lines.append(f"  {t['key']:<{width}}  {shape:<22} {t['dtype']:<5} {t['chunks']:>4} chunks  {size}")
    o = d["other_tensors"]
    lines.append(f"other        {o['count']} tensors ({o['optimizer']} optimizer), "
                 f"{human_bytes(o['bytes'], binary=True)}; "
                 f"{d['objects']['count']} objects ({d['objects']['extra_state']} _extra_state)")
    lines.append(f"files        {d['files']['count']}, {human_bytes(d['files']['bytes'], binary=True)}")
    return "\n".join(lines)
