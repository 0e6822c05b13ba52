"""The trainer's data seam: "microbatches from consumed_samples" + "state to save".

The trainer only ever calls :meth:`TrainData.microbatches` and
:meth:`TrainData.state_dict`. Which global sample a DP rank reads is a pure
function of (consumed_samples, global batch, micro batch, dp rank, dp size):
global batch g is samples [g*GBS, (g+1)*GBS); within it, microbatch j of DP rank
r is ``base + j*(mbs*dp) + r*mbs + [0, mbs)``. The set of samples per step does
not depend on the DP size, so a run resumes exactly even on a new layout.

Samples come from Megatron-Core's GPTDataset (per-source document -> sample
indexing). With ``data.mixture`` the alignment sampler
(:mod:`megatron_align.data.mixture`) maps each global index to (source, sample)
by phase; without it, sources are blended by weight with Megatron-Core's
BlendedDataset; ``data.mock`` uses MockGPTDataset for benchmarks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from megatron_align.config import RootConfig
from megatron_align.corpus.indexed import check_indexed_files
from megatron_align.corpus.tokenizer import build_tokenizer
from megatron_align.data.mixture import AlignmentSampler, check_fingerprint, microbatch_indices
from megatron_align.errors import UserError

log = logging.getLogger(__name__)


class MegatronTokenizerAdapter:
    """The attributes Megatron-Core's GPTDataset reads from its ``tokenizer`` argument."""

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self.eod = tokenizer.eod
        self.pad = tokenizer.pad
        self.vocab_size = tokenizer.vocab_size
        self.unique_identifiers = {"class": "megatron_align", "identity": tokenizer.identity}

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text)

    def detokenize(self, ids) -> str:
        return self._tok.decode(ids)


def _split(heldout_percent: float) -> str:
    return f"{100 - heldout_percent},{heldout_percent},0"


def _build(cls, ds_config: GPTDatasetConfig, num_samples: int | None, split_index: int = 0):
    """One Megatron-Core split (0 train, 1 held-out; num_samples None = one epoch), with the mask-cache fix."""
    sizes = [None, None, None] if num_samples is None else [num_samples, 0, 0]
    built = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, ds_config).build()[split_index]
    _disable_mask_cache(built)
    return built


def _check_sources(config: RootConfig, tokenizer) -> dict[str, str]:
    """Every source exists; its manifest (if any) was made with this tokenizer. Returns name -> identity."""
    identities = {}
    for i, src in enumerate(config.data.sources):
        if not src.prefix:
            raise UserError(f"data.sources[{i}] ({src.name}): no prefix (num_samples only serves `data inspect`); "
                            "tokenize the source with `megatron-align prepare` and set its prefix")
        for ext in (".bin", ".idx"):
            if not os.path.isfile(src.prefix + ext):
                raise UserError(f"data.sources[{i}] ({src.name}): {src.prefix + ext} does not exist; "
                                "create it with `megatron-align prepare`")
        check_indexed_files(src.prefix, tokenizer.vocab_size)
        manifest_path = src.prefix + ".manifest.json"
        if os.path.isfile(manifest_path):
            with open(manifest_path) as f:
                manifest = json.load(f)
            made_with = manifest.get("tokenizer_identity") or manifest.get("tokenizer", {}).get("identity")
            if made_with and made_with != tokenizer.identity:
                raise UserError(
                    f"data.sources[{i}] ({src.name}): {manifest_path} was tokenized with {made_with}, "
                    f"but data.tokenizer is {tokenizer.identity}; re-run `megatron-align prepare` or fix data.tokenizer"
                )
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
        if config.data.heldout_percent:  # holding documents out changes every source's training samples
            source_ids = {name: f"{ident}|heldout={config.data.heldout_percent}" for name, ident in source_ids.items()}
        blend = (
            None
            if config.data.mock
            else ([s.prefix for s in config.data.sources], [s.weight for s in config.data.sources])
        )
        ds_config = GPTDatasetConfig(
            random_seed=config.train.seed,
            sequence_length=config.model.seq_length,
            blend=blend,
            split=_split(config.data.heldout_percent),
            tokenizer=adapter,
            # Megatron-Core builds per-sample position ids and loss mask from the EOD positions; the attention
            # mask is built per micro-batch on the device (megatron_align.model.documents), not as s x s floats here.
            reset_position_ids=config.data.reset_position_ids,
            reset_attention_mask=config.data.reset_attention_mask,
            eod_mask_loss=config.data.eod_mask_loss,
            create_attention_mask=False,
            path_to_cache=cache_dir,
            mid_level_dataset_surplus=0.005,
        )
        self.sampler: AlignmentSampler | None = None
        if config.data.mixture.phases:
            # One single-epoch GPTDataset per source; the sampler decides which source and sample (and epochs).
            self.sources = [_build(GPTDataset, dataclasses.replace(ds_config, blend=([s.prefix], None)), None)
                            for s in config.data.sources]
            self.sampler = AlignmentSampler(
                config.data.mixture,
                {s.name: len(d) for s, d in zip(config.data.sources, self.sources)},
                total_samples,
                config.model.seq_length,
            )
            self.fingerprint = self.sampler.fingerprint(source_ids, config.data.document_keys)
            self.dataset = None
        else:
            self.dataset = _build(MockGPTDataset if config.data.mock else GPTDataset, ds_config, total_samples)
            identity = {"mock": config.data.mock, "tokenizer": self.tokenizer.identity, "sources": source_ids,
                        "weights": [s.weight for s in config.data.sources], "seed": config.train.seed,
                        "seq_length": config.model.seq_length}
            if config.data.document_keys:  # only when on: today's checkpoints keep their fingerprint
                identity["documents"] = config.data.document_keys
            self.fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        self._phase_name: str | None = None
        self._ds_config = ds_config
        self._heldout: list | None = None

    def heldout_microbatches(self, source_index: int, num_samples: int) -> Iterator[dict[str, torch.Tensor]]:
        """This DP rank's share of the first ``num_samples`` held-out sequences of one source (fixed set)."""
        if self._heldout is None:
            self._heldout = [_build(GPTDataset, dataclasses.replace(self._ds_config, blend=([s.prefix], None)), None, 1)
                             for s in self.config.data.sources]
        dataset = self._heldout[source_index]
        if dataset is None or len(dataset) == 0:
            raise UserError(f"data.sources[{source_index}]: no held-out sequences; raise data.heldout_percent")
        mbs = self.config.train.micro_batch_size
        for j in range(num_samples // (mbs * self.dp_size)):
            idx = microbatch_indices(0, num_samples, mbs, self.dp_rank, self.dp_size, j)
            samples = [dataset[int(i) % len(dataset)] for i in idx]
            yield {
                k: torch.stack([torch.as_tensor(s[k]) for s in samples])
                for k in ("tokens", "labels", "loss_mask", "position_ids")
            }

    def samples(self, indices) -> list[dict]:
        """The samples at these global indices (a pure function of the index)."""
        if self.sampler is None:
            return [self.dataset[int(i)] for i in indices]
        source, local = self.sampler.lookup(indices)
        return [self.sources[int(s)][int(j)] for s, j in zip(source, local)]

    def microbatches(self, consumed_samples: int) -> Iterator[dict[str, torch.Tensor]]:
        """Endless microbatches for this DP rank, starting at the step that begins at ``consumed_samples``."""
        batches = self._microbatches(consumed_samples)
        if self.config.data.loader == "dali":
            from megatron_align.data.dali_loader import DaliMicrobatches

            return DaliMicrobatches(batches, self.config.train.micro_batch_size, self.config.data.prefetch)
        return batches

    def _microbatches(self, consumed_samples: int) -> Iterator[dict[str, torch.Tensor]]:
        t = self.config.train
        per_step = t.global_batch_size // (t.micro_batch_size * self.dp_size)
        while True:
            for j in range(per_step):
                idx = microbatch_indices(
                    consumed_samples, t.global_batch_size, t.micro_batch_size, self.dp_rank, self.dp_size, j
                )
                samples = self.samples(idx)
                yield {
                    k: torch.stack([torch.as_tensor(s[k]) for s in samples])
                    for k in ("tokens", "labels", "loss_mask", "position_ids")
                }
            consumed_samples += t.global_batch_size

    def state_dict(self, consumed_samples: int) -> dict:
        return {"consumed_samples": consumed_samples, "fingerprint": self.fingerprint}

    def check_resume(self, saved: dict, where: str) -> None:
        """Refuse to resume on a different sample sequence unless the config says the change is deliberate."""
        saved_fp = (saved or {}).get("fingerprint")
        if self.sampler is not None:
            try:
                note = check_fingerprint(saved_fp, self.fingerprint, self.config.data.mixture.allow_fingerprint_change)
            except UserError as err:
                raise UserError(f"{where}: {err}") from None
            if note:
                log.warning("%s: %s", where, note)
            return
        if saved_fp and saved_fp != self.fingerprint:
            raise UserError(
                f"{where}: data fingerprint {saved_fp} differs from this config's {self.fingerprint} "
                "(sources, weights, seed, tokenizer, sequence length or data.reset_*/eod_mask_loss changed); "
                "resuming would not continue the same "
                "sample sequence. Restore the data config, or start a new run_dir with checkpoint.load=... and "
                "checkpoint.load_optimizer=false to reuse the weights")

    def step_metrics(self, consumed_samples: int) -> dict:
        """Per-source samples/tokens consumed so far and the current phase (mixture runs), for metrics.jsonl."""
        if self.sampler is None:
            return {}
        counts = self.sampler.counts_before(consumed_samples)
        seq = self.config.model.seq_length
        record: dict = {"phase": self.sampler.phase_at(max(0, consumed_samples - 1)).name}
        for name, count in counts.items():
            record[f"samples/{name}"] = int(count)
            record[f"tokens/{name}"] = int(count) * seq
        if record["phase"] != self._phase_name:
            if self._phase_name is not None:
                log.info("phase boundary: %s -> %s at sample %d", self._phase_name, record["phase"], consumed_samples)
            self._phase_name = record["phase"]
        return record
