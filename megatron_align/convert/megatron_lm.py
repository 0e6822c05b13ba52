"""Megatron-LM (and Megatron-Bridge) checkpoints: recognise, read the envelope, map ``args`` to our model config.

Megatron-LM's ``torch_dist`` checkpoints and ours share the tensor layer: Megatron-Core ``dist_checkpointing``
with ``GPTModel.sharded_state_dict()`` keys (and the optimizer's keys derived from them), so weights and optimizer
state load at any TP/PP the same way ours do. What differs is the envelope, and this module owns it:

- the directory: ``latest_checkpointed_iteration.txt`` (an integer or ``release``) naming ``iter_%07d/`` or
  ``release/``, where ours has ``latest`` + a ``megatron_align.json`` marker;
- the common state (``common.pt``, or since megatron-core 0.19 a ``common_state`` object inside the shards):
  ``args`` (an argparse Namespace), ``iteration``, ``checkpoint_version``, ``opt_param_scheduler`` (counted in
  samples; ours counts steps), ``num_floating_point_operations_so_far``, ``content_metadata``;
- ``rng_state``: a ShardedObject over (pp, tp) holding a list of dicts, replica id from dp x cp.

Megatron-Bridge writes the same tensors with ``run_config.yaml`` (its ConfigContainer, ``model:`` section) and
``train_state.pt`` (step, consumed samples) beside them and usually no ``args``: :func:`read_bridge_model`.
Anything our Llama-style GPT cannot express is refused by its Megatron-LM argument name (:func:`refusals`).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field

from megatron_align.errors import UserError

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
"""What Megatron-LM's ``_build_sharded_state_dict_metadata`` records for a non-distributed optimizer."""
BRIDGE_RUN_CONFIG = "run_config.yaml"
BRIDGE_TRAIN_STATE = "train_state.pt"
_ITER_RE = re.compile(r"^iter_(\d{7})$")

# Megatron-LM args our model cannot express: (arg, is it unsupported given its value, what it means).
_UNSUPPORTED = (
    ("num_experts", lambda v: bool(v), "mixture of experts"),
    ("multi_latent_attention", lambda v: bool(v), "multi-latent attention (MLA)"),
    ("normalization", lambda v: v not in (None, "RMSNorm"), "only RMSNorm is supported"),
    ("position_embedding_type", lambda v: v not in (None, "rope"), "only RoPE positions are supported"),
    ("swiglu", lambda v: v is False, "only SwiGLU MLPs are supported"),
    ("squared_relu", lambda v: bool(v), "only SwiGLU MLPs are supported"),
    ("add_bias_linear", lambda v: bool(v), "biases on linear layers (only QKV biases are supported)"),
    ("apply_layernorm_1p", lambda v: bool(v), "zero-centred (1+w) norms"),
    ("rotary_percent", lambda v: v not in (None, 1.0), "partial rotary embeddings"),
    ("rotary_interleaved", lambda v: bool(v), "interleaved rotary embeddings"),
    ("mtp_num_layers", lambda v: bool(v), "multi-token prediction layers"),
    ("hybrid_layer_pattern", lambda v: bool(v), "hybrid (Mamba) layers"),
    ("hybrid_override_pattern", lambda v: bool(v), "hybrid (Mamba) layers"),
    ("heterogeneous_layers_config_path", lambda v: bool(v), "heterogeneous layers"),
    ("heterogeneous_layers_config_encoded_json", lambda v: bool(v), "heterogeneous layers"),
    ("experimental_attention_variant", lambda v: bool(v), "experimental attention variants"),
    ("window_size", lambda v: bool(v), "sliding-window attention"),
)


@dataclass
class MegatronLMCheckpoint:
    """One Megatron-LM (or Megatron-Bridge) checkpoint directory, its envelope read (no tensors)."""

    path: str
    """The iter_%07d (or release) directory holding the shards."""
    iteration: int
    release: bool
    common: dict = field(repr=False)
    """The common state: args, iteration, opt_param_scheduler, optimizer param groups, content_metadata..."""
    bridge: dict | None = None
    """Megatron-Bridge's run_config.yaml + train_state.pt, when present."""

    @property
    def args(self):
        return self.common.get("args")

    def arg(self, name: str, default=None):
        args = self.args
        return getattr(args, name, default) if args is not None else default

    @property
    def consumed_samples(self) -> int:
        if self.bridge and self.bridge.get("train_state"):
            return int(self.bridge["train_state"].get("consumed_train_samples", 0) or 0)
        return int(self.arg("consumed_train_samples", 0) or 0)


def _foreign(directory: str) -> bool:
    """A torch_dist checkpoint dir without our marker (ours are renamed into place only after the marker)."""
    return os.path.isfile(os.path.join(directory, "metadata.json")) and not os.path.isfile(
        os.path.join(directory, "megatron_align.json"))


def is_megatron_lm(path: str | None) -> bool:
    """Does ``path`` look like a Megatron-LM / Bridge checkpoint: a tracker file, an iter_/release dir without our
    marker, or a root whose iter_* dirs all lack it?"""
    if not path or not os.path.isdir(path):
        return False
    if os.path.isfile(os.path.join(path, TRACKER)):
        return True
    name = os.path.basename(os.path.abspath(path))
    if _ITER_RE.match(name) or name == "release":
        return _foreign(path)
    iters = [os.path.join(path, n) for n in os.listdir(path) if _ITER_RE.match(n)]
    return bool(iters) and all(_foreign(d) for d in iters)


def resolve_dir(path: str) -> tuple[str, int, bool]:
    """(iteration dir, iteration, release) of a Megatron-LM checkpoint root or one of its iter_/release dirs."""
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such checkpoint directory")
    name = os.path.basename(os.path.abspath(path))
    match = _ITER_RE.match(name)
    if match or name == "release":
        if not os.path.isfile(os.path.join(path, "metadata.json")):
            raise UserError(f"{path}: no metadata.json; not a torch_dist checkpoint (Megatron-LM --ckpt-format "
                            "torch_dist), or an interrupted save")
        return path, int(match.group(1)) if match else 0, name == "release"
    tracker = os.path.join(path, TRACKER)
    if not os.path.isfile(tracker):
        found = sorted(n for n in os.listdir(path) if _ITER_RE.match(n))
        hint = f"; it holds {', '.join(found[-3:])}: pass one of those dirs" if found else ""
        raise UserError(f"{tracker}: missing tracker file (Megatron-LM writes it last, so the save may not have "
                        f"finished){hint}")
    with open(tracker) as f:
        text = f.read().strip()
    if text == "release":
        return resolve_dir(os.path.join(path, "release"))
    if not text.isdigit():
        raise UserError(f"{tracker}: holds {text!r}; expected an iteration number or 'release'")
    target = os.path.join(path, f"iter_{int(text):07d}")
    if not os.path.isdir(target):
        raise UserError(f"{tracker}: names iteration {int(text)} but {target} does not exist")
    return resolve_dir(target)


def open_checkpoint(path: str) -> MegatronLMCheckpoint:
    """Resolve ``path`` and read its common state (and Bridge files); UserError naming the file on damage."""
    directory, iteration, release = resolve_dir(path)
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    try:
        with warnings.catch_warnings():  # "torch.distributed is disabled ... single process": that is the intent
            warnings.simplefilter("ignore", UserWarning)
            common = load_common_state_dict(directory)
    except (Exception, BaseException) as err:  # noqa: B036  (DCP's CheckpointException is a BaseException)
        if isinstance(err, KeyboardInterrupt):
            raise
        raise UserError(f"{directory}: its common state (common.pt / common_state) is unreadable "
                        f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); the checkpoint "
                        "is damaged") from None
    bridge = _read_bridge(directory)
    if "iteration" in common:
        iteration = int(common["iteration"])
    elif bridge and bridge.get("train_state"):
        iteration = int(bridge["train_state"].get("step", iteration))
    if common.get("args") is None and not (bridge and bridge.get("model")):
        raise UserError(f"{directory}: the common state has no 'args' and there is no {BRIDGE_RUN_CONFIG}; "
                        "cannot tell the model's shape")
    return MegatronLMCheckpoint(directory, iteration, release, common, bridge)


def _read_bridge(directory: str) -> dict | None:
    """Megatron-Bridge's run_config.yaml (``model:``) and train_state.pt, from the iter dir or its parent."""
    import yaml

    found: dict = {}
    for where in (directory, os.path.dirname(directory)):
        run_config = os.path.join(where, BRIDGE_RUN_CONFIG)
        if "model" not in found and os.path.isfile(run_config):
            with open(run_config) as f:
                found["model"] = (yaml.safe_load(f) or {}).get("model") or {}
        state = os.path.join(where, BRIDGE_TRAIN_STATE)
        if "train_state" not in found and os.path.isfile(state):
            import torch

            loaded = torch.load(state, map_location="cpu", weights_only=True)
            found["train_state"] = {k: (v.item() if hasattr(v, "item") else v) for k, v in loaded.items()}
    return found or None


def _model_args(ckpt: MegatronLMCheckpoint) -> dict:
    """The model fields under Megatron-LM's arg names, from args or (Bridge) run_config.yaml's model section."""
    if ckpt.args is not None:
        return dict(vars(ckpt.args))
    model = dict(ckpt.bridge["model"])  # Bridge's GPTModelProvider fields are TransformerConfig names
    renames = {"layernorm_epsilon": "norm_epsilon", "vocab_size": "padded_vocab_size",
               "share_embeddings_and_output_weights": None, "gated_linear_unit": "swiglu"}
    for old, new in renames.items():
        if old in model and new:
            model.setdefault(new, model[old])
    if "share_embeddings_and_output_weights" in model:
        model["untie_embeddings_and_output_weights"] = not model["share_embeddings_and_output_weights"]
    if "rotary_percent" not in model and "rotary_base" in model:
        model["rotary_percent"] = 1.0
    return model


def refusals(values: dict) -> list[str]:
    """``arg=value (why)`` for every Megatron-LM argument our model cannot express."""
    return [f"{name}={values[name]!r} ({why})" for name, bad, why in _UNSUPPORTED
            if name in values and bad(values[name])]


def model_config(ckpt: MegatronLMCheckpoint, embedding_rows: int | None = None) -> dict:
    """Our ``model:`` section for the checkpoint (UserError naming the args we cannot express).

    The vocabulary is the checkpoint's padded rows with ``make_vocab_size_divisible_by=1``, so the embedding has
    exactly those rows at every TP that divides them; the tokenizer must fit in them (the trainer checks).
    """
    values = _model_args(ckpt)
    refused = refusals(values)
    if refused:
        raise UserError(f"{ckpt.path}: this Megatron checkpoint uses what megatron_align's model cannot express: "
                        f"{'; '.join(refused)}")
    hidden, heads = int(values["hidden_size"]), int(values["num_attention_heads"])
    groups = values.get("num_query_groups") if values.get("group_query_attention", True) else None
    kv_channels = values.get("kv_channels")
    rows = values.get("padded_vocab_size") or embedding_rows
    if not rows:
        raise UserError(f"{ckpt.path}: no padded_vocab_size in args and no embedding found; cannot size the vocab")
    model = {
        "num_layers": int(values["num_layers"]), "hidden_size": hidden, "num_attention_heads": heads,
        "ffn_hidden_size": int(values.get("ffn_hidden_size") or 4 * hidden),
        "num_query_groups": int(groups) if groups and int(groups) != heads else None,
        "kv_channels": int(kv_channels) if kv_channels and int(kv_channels) != hidden // heads else None,
        "seq_length": int(values.get("seq_length") or values.get("max_position_embeddings") or 0) or 2048,
        "vocab_size": int(rows), "make_vocab_size_divisible_by": 1,
        "rotary_base": int(values.get("rotary_base") or 10000),
        "norm_epsilon": float(values.get("norm_epsilon") or 1e-5),
        "tie_embeddings": not bool(values.get("untie_embeddings_and_output_weights", False)),
        "add_qkv_bias": bool(values.get("add_qkv_bias", False)),
        "qk_layernorm": bool(values.get("qk_layernorm", False)),
        "init_method_std": float(values.get("init_method_std") or 0.02),
        "rope_scaling": "llama3" if values.get("use_rope_scaling") or values.get("rope_scaling") else "none",
    }
    if model["rope_scaling"] == "llama3":
        model["rope_scaling_factor"] = float(values.get("rope_scaling_factor") or 8.0)
    return model


def optimizer_sharding(ckpt: MegatronLMCheckpoint) -> str | None:
    """The checkpoint's DistributedOptimizer format (None: Megatron-Core's plain optimizer). Checkpoints of
    megatron-core < 0.13 record none; Megatron-LM then infers it from the args, and so do we."""
    sharding = (ckpt.common.get("content_metadata") or {}).get("distrib_optim_sharding_type")
    if sharding is None and ckpt.arg("use_distributed_optimizer"):
        sharding = "fully_sharded_model_space" if ckpt.arg("ckpt_fully_parallel_save") else "dp_zero_gather_scatter"
    return sharding


def optimizer_refusal(sharding: str | None, saved_tp_pp: tuple[int, int], run_tp_pp: tuple[int, int],
                      distributed: bool, fused_adam: bool) -> str | None:
    """Why this run cannot load the checkpoint's optimizer state (None: it can).

    - plain optimizer state (no DistributedOptimizer) is keyed by parameter: it loads at any TP/PP, into a run
      without the DistributedOptimizer;
    - ``dp_reshardable`` (Megatron-LM's default since megatron-core 0.13, and ours) is the DistributedOptimizer's
      flat buckets: it reshards across data-parallel sizes only, so TP and PP must match (and the DDP bucket
      layout: checked key by key against the checkpoint before loading);
    - ``fully_reshardable`` loads at any layout, but only into TE's or apex's fused Adam (torch Adam's fallback
      fails on it in Megatron-Core);
    - ``fully_sharded_model_space`` and ``dp_zero_gather_scatter`` (older megatron-core) are refused.
    """
    if sharding is None:
        return None if not distributed else (
            "its optimizer state is Megatron-Core's plain (non-distributed) optimizer's; set "
            "optimizer.distributed=false to load it")
    if not distributed:
        return (f"its optimizer state is the DistributedOptimizer's ({sharding!r}); set optimizer.distributed=true "
                "to load it")
    if sharding == "dp_reshardable":
        if tuple(saved_tp_pp) != tuple(run_tp_pp):
            return ("its DistributedOptimizer state ('dp_reshardable') reshards across data-parallel sizes only: "
                    f"saved at TP{saved_tp_pp[0]}xPP{saved_tp_pp[1]}, this run is TP{run_tp_pp[0]}xPP{run_tp_pp[1]}; "
                    f"run at parallel.tensor={saved_tp_pp[0]} parallel.pipeline={saved_tp_pp[1]}")
        return None
    if sharding == "fully_reshardable":
        return None if fused_adam else (
            "its DistributedOptimizer state ('fully_reshardable') loads only into TE's or apex's fused Adam, and "
            "this environment has neither (Megatron-Core fell back to torch Adam)")
    return (f"its DistributedOptimizer state is in the {sharding!r} layout, which Megatron-Core's dist_checkpointing "
            "cannot load here (re-save it in Megatron-LM with the default 'dp_reshardable' format)")


def layout_mismatch(path: str, template) -> str | None:
    """The first tensor of a sharded-state-dict ``template`` that checkpoint ``path`` lacks or holds in another
    shape (e.g. the DistributedOptimizer's buckets of another DDP bucket size), named; None when all fit."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = {k: tuple(v.size) for k, v in FileSystemReader(path).read_metadata().state_dict_metadata.items()
             if isinstance(v, TensorStorageMetadata)}
    for value in nested_values(template):
        if not isinstance(value, ShardedTensor):
            continue
        if value.key not in saved:
            return f"{value.key} is not in the checkpoint"
        if tuple(value.global_shape) != saved[value.key]:
            return f"{value.key} is {list(saved[value.key])} in the checkpoint, {list(value.global_shape)} in this run"
    return None


def scheduler_to_steps(saved: dict, global_batch_size: int) -> dict:
    """Megatron-LM's opt_param_scheduler state counts samples; ours counts optimizer steps."""
    sample_keys = ("lr_warmup_steps", "lr_decay_steps", "num_steps", "wd_incr_steps", "wsd_decay_steps")
    return {k: (int(v) // global_batch_size if k in sample_keys and v is not None else v) for k, v in saved.items()}


def scheduler_to_samples(saved: dict, global_batch_size: int) -> dict:
    sample_keys = ("lr_warmup_steps", "lr_decay_steps", "num_steps", "wd_incr_steps", "wsd_decay_steps")
    return {k: (int(v) * global_batch_size if k in sample_keys and v is not None else v) for k, v in saved.items()}


def rng_from_megatron_lm(states: list[dict], dp_rank: int) -> dict:
    """Megatron-LM's rng_state list (one entry, or one per DP rank with data_parallel_random_init) -> ours."""
    state = states[dp_rank] if len(states) > 1 else states[0]
    return {"random": state["random_rng_state"], "numpy": state["np_rng_state"], "torch": state["torch_rng_state"],
            "cuda": state["cuda_rng_state"], "tracker": state["rng_tracker_states"]}


def rng_to_megatron_lm(state: dict) -> list[dict]:
    return [{"random_rng_state": state["random"], "np_rng_state": state["numpy"], "torch_rng_state": state["torch"],
             "cuda_rng_state": state["cuda"], "rng_tracker_states": state["tracker"]}]


def describe(path: str) -> dict:
    """What ``checkpoint inspect`` shows for a Megatron-LM / Bridge checkpoint: found vs. what a run will use."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    ckpt = open_checkpoint(path)
    tensors = {k: v for k, v in FileSystemReader(ckpt.path).read_metadata().state_dict_metadata.items()
               if isinstance(v, TensorStorageMetadata)}
    embedding = tensors.get("embedding.word_embeddings.weight")
    try:
        model, refused = model_config(ckpt, list(embedding.size)[0] if embedding is not None else None), None
    except UserError as err:
        model, refused = None, str(err)
    optimizer = sum(1 for k in tensors if k.startswith("optimizer."))
    sched = ckpt.common.get("opt_param_scheduler")
    return {
        "path": ckpt.path, "format": "megatron_bridge" if ckpt.bridge else "megatron_lm",
        "iteration": ckpt.iteration, "release": ckpt.release, "consumed_samples": ckpt.consumed_samples,
        "checkpoint_version": ckpt.common.get("checkpoint_version"),
        "layout": {"tensor": ckpt.arg("tensor_model_parallel_size"),
                   "pipeline": ckpt.arg("pipeline_model_parallel_size"), "data": ckpt.arg("data_parallel_size")},
        "global_batch_size": ckpt.arg("global_batch_size"), "opt_param_scheduler": sched,
        "content_metadata": ckpt.common.get("content_metadata"),
        "model": model, "refused": refused,
        "tensors": {"model": sum(1 for k in tensors if not k.startswith("optimizer.")), "optimizer": optimizer},
        "will_use": {
            "weights": refused is None,
            "optimizer": bool(optimizer) and not ckpt.release and refused is None,
            "schedule": sched is not None and not ckpt.release,
            "iteration": ckpt.iteration,
            "data_position": "sample 0 of this run's mixture (checkpoint.data_position=continue: "
                             f"sample {ckpt.consumed_samples})",
        },
    }


def format_description(d: dict) -> str:
    lay, use = d["layout"], d["will_use"]
    lines = [
        f"checkpoint   {d['path']}  ({d['format']}{', release' if d['release'] else ''})",
        f"iteration    {d['iteration']}  (consumed {d['consumed_samples']} samples, global batch "
        f"{d['global_batch_size']})",
        f"layout       TP{lay['tensor']} x PP{lay['pipeline']} x DP{lay['data']}",
        f"tensors      {d['tensors']['model']} model, {d['tensors']['optimizer']} optimizer",
        f"schedule     {d['opt_param_scheduler']}",
    ]
    if d["refused"]:
        lines.append(f"REFUSED      {d['refused']}")
    else:
        lines.append("model        " + ", ".join(f"{k}={v}" for k, v in d["model"].items()))
    lines += [
        "will use     weights: {}, optimizer state: {}, LR schedule position: {}, iteration: {}".format(
            "yes" if use["weights"] else "no", "yes (checkpoint.load_optimizer=true)" if use["optimizer"] else "no",
            "yes" if use["schedule"] else "no", use["iteration"]),
        f"data         {use['data_position']}",
    ]
    return "\n".join(lines)
