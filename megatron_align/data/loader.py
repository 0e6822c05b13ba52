"""The trainer's data seam: "microbatches from consumed_samples" + "state to save".

The trainer only ever calls :meth:`TrainData.microbatches` and
:meth:`TrainData.state_dict`. Which global sample a DP rank reads is a pure
function of (consumed_samples, global batch, micro batch, dp rank, dp size):
global batch g is samples [g*GBS, (g+1)*GBS); within it, microbatch j of DP rank
r is ``base + j*(mbs*dp) + r*mbs + [0, mbs)``. The set of samples per step does
not depend on the DP size, so a run resumes exactly even on a new layout.

Samples come from Megatron-Core's GPTDataset (per-source document/sample
indexing) blended with BlendedDataset, or MockGPTDataset for benchmarks.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from megatron_align.config.schema import RootConfig
from megatron_align.data.mixture import microbatch_indices
from megatron_align.data.tokenizer import MegatronTokenizerAdapter, build_tokenizer
from megatron_align.errors import UserError


def _check_sources(config: RootConfig, tokenizer) -> dict[str, str]:
    """Every source exists; its manifest (if any) was made with this tokenizer. Returns name -> identity."""
    identities = {}
    for i, src in enumerate(config.data.sources):
        for ext in (".bin", ".idx"):
            if not os.path.isfile(src.prefix + ext):
                raise UserError(f"data.sources[{i}] ({src.name}): {src.prefix + ext} does not exist; "
                                "create it with `megatron-align prepare`")
        manifest_path = src.prefix + ".manifest.json"
        if os.path.isfile(manifest_path):
            with open(manifest_path) as f:
                manifest = json.load(f)
            made_with = manifest.get("tokenizer_identity") or manifest.get("tokenizer", {}).get("identity")
            if made_with and made_with != tokenizer.identity:
                raise UserError(f"data.sources[{i}] ({src.name}): {manifest_path} was tokenized with {made_with}, "
                                f"but data.tokenizer is {tokenizer.identity}; re-run `megatron-align prepare` or fix data.tokenizer")
            identities[src.name] = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
        else:
            stat = os.stat(src.prefix + ".idx")
            identities[src.name] = f"idx:{stat.st_size}"
    return identities


def _disable_mask_cache(dataset) -> None:
    """Work around megatron-core 0.16's GPTDataset mask cache.

    The first sample a process reads fills a cached loss mask, and masking that
    sample's pad labels then writes into the cached tensor: every later sample
    inherits those zeros. Which sample comes first depends on the DP layout and
    the resume point, so the loss would depend on both. Recomputing the mask
    per sample costs microseconds and makes samples a pure function of the index.
    """
    for sub in getattr(dataset, "datasets", [dataset]):
        if hasattr(sub, "masks_and_position_ids_are_cacheable"):
            sub.masks_and_position_ids_are_cacheable = False


class TrainData:
    """Samples for the whole run plus the microbatch iterator for this rank."""

    def __init__(self, config: RootConfig, total_samples: int, dp_rank: int, dp_size: int, cache_dir: str) -> None:
        self.config = config
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.tokenizer = build_tokenizer(config.data.tokenizer)
        self.vocab_size = config.model.vocab_size or self.tokenizer.vocab_size
        adapter = MegatronTokenizerAdapter(self.tokenizer)
        source_ids = {} if config.data.mock else _check_sources(config, self.tokenizer)
        blend = None if config.data.mock else ([s.prefix for s in config.data.sources], [s.weight for s in config.data.sources])
        ds_config = GPTDatasetConfig(
            random_seed=config.train.seed,
            sequence_length=config.model.seq_length,
            blend=blend,
            split="100,0,0",
            tokenizer=adapter,
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
            path_to_cache=cache_dir,
            mid_level_dataset_surplus=0.005,
        )
        cls = MockGPTDataset if config.data.mock else GPTDataset
        train, _, _ = BlendedMegatronDatasetBuilder(cls, [total_samples, 0, 0], lambda: True, ds_config).build()
        _disable_mask_cache(train)
        self.dataset = train
        self.fingerprint = hashlib.sha256(json.dumps(
            {"mock": config.data.mock, "tokenizer": self.tokenizer.identity, "sources": source_ids,
             "weights": [s.weight for s in config.data.sources], "seed": config.train.seed,
             "seq_length": config.model.seq_length}, sort_keys=True).encode()).hexdigest()[:16]

    def microbatches(self, consumed_samples: int) -> Iterator[dict[str, torch.Tensor]]:
        """Endless microbatches for this DP rank, starting at the step that begins at ``consumed_samples``."""
        t = self.config.train
        per_step = t.global_batch_size // (t.micro_batch_size * self.dp_size)
        while True:
            for j in range(per_step):
                idx = microbatch_indices(consumed_samples, t.global_batch_size, t.micro_batch_size, self.dp_rank, self.dp_size, j)
                samples = [self.dataset[int(i)] for i in idx]
                yield {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in ("tokens", "labels", "loss_mask", "position_ids")}
            consumed_samples += t.global_batch_size

    def state_dict(self, consumed_samples: int) -> dict:
        return {"consumed_samples": consumed_samples, "fingerprint": self.fingerprint}

    def step_metrics(self, consumed_samples: int) -> dict:
        """Extra per-step accounting for metrics.jsonl (per-source counts once a mixture is configured)."""
        return {}
