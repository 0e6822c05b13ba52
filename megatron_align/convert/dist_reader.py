"""Read a megatron_align dist checkpoint on one process, one tensor region at a time.

A torch_dist checkpoint (Megatron-Core dist_checkpointing) is a
``torch.distributed.checkpoint`` directory: ``.metadata`` describes every
*global* tensor (shape, dtype, and the chunks each rank wrote, with file
offsets), ``__R_N.distcp`` files hold the chunks. Because the metadata is
global, a reader needs neither the saving layout nor any process group: to get
layer 7 of ``decoder.layers.mlp.linear_fc1.weight`` we ask torch DCP for the
region ``[7:8, :, :]`` and it reads only the chunks that overlap it, whatever
TP/PP/DP/VPP layout wrote them.

The one idea: a tiny load planner whose "local shard" is exactly the region
we want. Peak memory is one layer's slice of one tensor (plus the chunk being
decoded), never the model. TE ``_extra_state`` (FP8 scaling state) and
optimizer / RNG entries are simply never requested.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_align.convert import mapping
from megatron_align.errors import UserError
from megatron_align.training.checkpoint import MARKER, read_marker, resolve_checkpoint

_DCP_METADATA = ".metadata"


def open_checkpoint_dir(path: str) -> str:
    """A run's checkpoints dir or one iter_* dir -> the complete iter dir to read, or a UserError saying why not."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such checkpoint directory")
    if not os.path.isdir(path):
        raise UserError(f"{path}: not a directory (pass a run's checkpoints/ dir or one iter_XXXXXXX dir)")
    resolved = resolve_checkpoint(path)
    if resolved is not None:
        return resolved
    if os.path.isfile(os.path.join(path, "metadata.json")) and not os.path.isfile(os.path.join(path, MARKER)):
        raise UserError(
            f"{path}: missing marker {MARKER}; this checkpoint was never committed (the save was "
            "interrupted). Use an older iter_* dir or the checkpoints/ dir (which picks the newest complete one)"
        )
    partial = sorted(n for n in os.listdir(path) if n.startswith(("iter_", ".tmp_iter_")))
    hint = f" (found only incomplete {', '.join(partial)}: interrupted saves without {MARKER})" if partial else ""
    raise UserError(
        f"{path}: no complete checkpoint{hint}; expected iter_XXXXXXX dirs holding metadata.json and {MARKER}"
    )


class _CachedReader(FileSystemReader):
    """FileSystemReader that parses ``.metadata`` once, not once per tensor read."""

    def __init__(self, path: str, metadata: Metadata) -> None:
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        return self._metadata


class _RegionPlanner(DefaultLoadPlanner):
    """Loads the region ``offsets .. offsets + buffer.shape`` of one global tensor into ``buffer``."""

    def __init__(self, key: str, offsets: tuple[int, ...], buffer: torch.Tensor) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.key, self.offsets, self.buffer = key, offsets, buffer
        self.covered = 0

    def create_local_plan(self) -> LoadPlan:
        md = self.metadata.state_dict_metadata[self.key]
        chunk = ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=self.buffer.size())
        items = create_read_items_for_chunk_list(self.key, md, [chunk])
        self.covered = sum(math.prod(item.lengths) for item in items)
        return LoadPlan(items)

    def lookup_tensor(self, index) -> torch.Tensor:
        return self.buffer


class DistCheckpoint:
    """One complete checkpoint, opened for reading (no process group, no model build)."""

    def __init__(self, path: str) -> None:
        self.path = open_checkpoint_dir(path)
        self.marker = read_marker(self.path)
        meta_json = os.path.join(self.path, "metadata.json")
        try:
            with open(meta_json) as f:
                backend = json.load(f).get("sharded_backend")
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"{meta_json}: unreadable ({err}); the checkpoint is damaged") from None
        if backend != "torch_dist":
            raise UserError(f"{meta_json}: sharded_backend={backend!r}; only Megatron's torch_dist format is supported")
        dcp_meta = os.path.join(self.path, _DCP_METADATA)
        try:
            self.reader = FileSystemReader(self.path)
            self.metadata: Metadata = self.reader.read_metadata()
        except Exception as err:  # missing or truncated pickle
            raise UserError(f"{dcp_meta}: unreadable ({type(err).__name__}: {err}); the checkpoint is damaged — "
                            "use an older iter_* dir") from None
        self.reader = _CachedReader(self.path, self.metadata)
        self._checked_files = False

    # -- what is in it ---------------------------------------------------------------------------
    @property
    def tensors(self) -> dict[str, TensorStorageMetadata]:
        return {k: v for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}

    @property
    def model_keys(self) -> list[str]:
        return [k for k in self.tensors if mapping.is_model_key(k)]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def nbytes(self, key: str) -> int:
        return math.prod(self.shape(key)) * torch.empty((), dtype=self.dtype(key)).element_size()

    @property
    def config(self) -> dict:
        """The resolved config dict the run saved in its marker."""
        config = self.marker.get("config")
        if not isinstance(config, dict) or "model" not in config:
            raise UserError(f"{os.path.join(self.path, MARKER)}: no 'config.model' section; "
                            "not a megatron_align checkpoint marker")
        return config

    def check_files(self) -> None:
        """Fail early, naming the file, when a shard is missing or shorter than .metadata says."""
        if self._checked_files:
            return
        check_shard_sizes(self.path, self.metadata)
        from megatron_align.training.checksums import require_verified

        require_verified(self.path)  # same sizes can still hide damaged bytes
        self._checked_files = True

    # -- reading ---------------------------------------------------------------------------------
    def read(self, key: str, layer: int | None = None) -> torch.Tensor:
        """The global tensor ``key`` (or its slice for ``layer`` along the stacked layer axis), in its saved dtype."""
        self.check_files()
        if key not in self.tensors:
            raise UserError(f"{self.path}: tensor {key!r} not in the checkpoint")
        shape = self.shape(key)
        offsets = [0] * len(shape)
        region = list(shape)
        if layer is not None:
            offsets[0], region[0] = layer, 1
        buffer = torch.empty(region, dtype=self.dtype(key))
        planner = _RegionPlanner(key, tuple(offsets), buffer)
        try:
            with warnings.catch_warnings():  # "torch.distributed is disabled ... single process": that is the intent
                warnings.simplefilter("ignore", UserWarning)
                dcp.load({key: buffer}, storage_reader=self.reader, planner=planner, no_dist=True)
        except (Exception, CheckpointException) as err:  # a corrupt chunk: unpickling or size errors
            files = sorted({info.relative_path for idx, info in self.metadata.storage_data.items() if idx.fqn == key})
            raise UserError(f"{self.path}: reading {key!r} failed ({_short(err)}); its chunks are in "
                            f"{', '.join(files)}, one of which is damaged — use an older iter_* dir") from None
        if planner.covered != buffer.numel():
            raise UserError(f"{self.path}: tensor {key!r} is only partly present in {_DCP_METADATA} "
                            f"({planner.covered} of {buffer.numel()} elements); the checkpoint is incomplete")
        return buffer[0] if layer is not None else buffer



def check_shard_sizes(path: str, metadata: Metadata) -> None:
    """Fail early, naming the file, when a shard ``metadata`` lists is missing or shorter than it says."""
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size_needed in sorted(needed.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise UserError(f"{file}: missing shard file listed in {_DCP_METADATA}; the checkpoint is incomplete — "
                            "use an older iter_* dir or copy the file again")
        size = os.path.getsize(file)
        if size < size_needed:
            raise UserError(f"{file}: truncated ({size} bytes, {_DCP_METADATA} needs {size_needed}); the checkpoint "
                            "is damaged (partial copy or full disk?) — copy it again or use an older iter_* dir")


def _short(err: BaseException) -> str:
    """DCP wraps per-rank failures in a CheckpointException with full tracebacks; keep the first cause's line."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        err = next(iter(failures.values()))
        if isinstance(err, tuple):  # (exception, traceback summary)
            err = err[0]
    if isinstance(err, pickle.UnpicklingError):  # torch's text suggests weights_only=False: wrong advice here
        return "UnpicklingError: the bytes are not a saved tensor"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"
