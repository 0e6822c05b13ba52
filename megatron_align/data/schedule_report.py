"""What the phase schedule will feed the model, before a run (`megatron-align data inspect CONFIG`).

Prints each phase's span, its composition (requested vs realised weight per block), the samples and
tokens every source contributes, and how many epochs of each source the run reads (against its
cap). ``--plot out.png`` draws the schedule: source shares over training, and cumulative epochs.

It also prints each source's document-length distribution and the attention span document masking
would leave (:mod:`megatron_align.data.documents`). Source sizes come from the Megatron IndexedDataset
``.idx`` of each source (samples per epoch
counted the way ``GPTDataset`` does: ``(tokens - 1) // seq_length``), or from an explicit
``num_samples`` in the source entry. Everything shown is computed by :class:`AlignmentSampler`
itself, so what is printed is exactly what training will read.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from megatron_align.config import MixtureConfig
from megatron_align.data.mixture import AlignmentSampler
from megatron_align.errors import ConfigError, UserError
from megatron_align.fileio import atomic_open, human_count
from megatron_align.optional import require


@dataclass
class InspectInputs:
    """What ``data inspect`` needs from a run config."""

    mixture: MixtureConfig
    sources: list  # SourceConfig entries of data.sources
    steps: int
    global_batch_size: int
    seq_length: int


def load_inspect_inputs(path: str) -> InspectInputs:
    """Read a run config through the root loader (the same validation as `train`)."""
    from megatron_align.config import load_config

    config = load_config(path)
    if not config.data.mixture.phases:
        raise ConfigError(f"{path}: data.mixture.phases is empty; `data inspect` shows a phase schedule")
    return InspectInputs(config.data.mixture, config.data.sources, config.train.steps,
                         config.train.global_batch_size, config.model.seq_length)


def count_source(prefix: str, seq_length: int) -> tuple[int, int, int]:
    """(documents, tokens, samples per epoch) of an IndexedDataset, as ``GPTDataset`` counts samples."""
    if not os.path.isfile(prefix + ".idx") or not os.path.isfile(prefix + ".bin"):
        raise UserError(f"data.sources: {prefix}.idx / {prefix}.bin not found; run `megatron-align prepare` first")
    with warnings.catch_warnings():  # megatron.core's package import warns about absent TE/apex: noise here
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    num_tokens = int(dataset.sequence_lengths.sum())
    return len(dataset.document_indices) - 1, num_tokens, max(num_tokens - 1, 0) // seq_length


def build_sampler(inputs: InspectInputs) -> tuple[AlignmentSampler, dict[str, tuple[int | None, int | None]]]:
    """The sampler for a config, plus (documents, tokens) per source where the ``.idx`` was read."""
    sizes: dict[str, int] = {}
    details: dict[str, tuple[int | None, int | None]] = {}
    for index, source in enumerate(inputs.sources):
        if source.name in sizes:
            raise ConfigError(f"data.sources[{index}].name {source.name!r} is used twice")
        if source.num_samples is not None:
            sizes[source.name], details[source.name] = int(source.num_samples), (None, None)
        elif source.prefix:
            documents, tokens, sizes[source.name] = count_source(source.prefix, inputs.seq_length)
            details[source.name] = (documents, tokens)
        else:
            raise ConfigError(f"data.sources[{index}] ({source.name}) needs a prefix or num_samples")
    total = inputs.steps * inputs.global_batch_size
    return AlignmentSampler(inputs.mixture, sizes, total, inputs.seq_length), details


def describe(sampler: AlignmentSampler, details: dict[str, tuple[int | None, int | None]]) -> str:
    """The text report printed by the verb."""
    seq, total = sampler.seq_length, sampler.total_samples
    cfg = sampler.config
    lines = [
        f"run: {total:,} samples x {seq} tokens = {human_count(total * seq)} tokens; "
        f"block_size {sampler.block_size}, seed {cfg.seed}",
        "sources:",
    ]
    for name, size in zip(sampler.source_names, sampler.source_sizes.tolist()):
        documents, tokens = details.get(name, (None, None))
        read = f"{documents:,} documents, {human_count(tokens)} tokens, " if documents is not None else ""
        lines.append(f"  {name:<20} {read}{size:,} samples per epoch")
    drawn = dict.fromkeys(sampler.source_names, 0)
    for phase in sampler.phases:
        share = phase.num_samples / total
        lines.append(
            f"phase {phase.index} {phase.name}: samples [{phase.start:,}, {phase.stop:,}) = {phase.num_samples:,} "
            f"({share:.1%} of the run), {human_count(phase.num_samples * seq)} tokens"
        )
        lines.append(
            f"  {'source':<20} {'weight':>8} {'per block':>10} {'samples':>14} "
            f"{'tokens':>9} {'epochs':>8} {'cum. epochs':>12}"
        )
        for name, size in zip(sampler.source_names, sampler.source_sizes.tolist()):
            count = phase.source_samples[name]
            if not count and not phase.weights[name]:
                continue
            drawn[name] += count
            epochs = f"{count / size:.3f}" if size else "-"
            cumulative = f"{drawn[name] / size:.3f}" if size else "-"
            lines.append(
                f"  {name:<20} {phase.weights[name]:>8.4f} {phase.block_counts[name]:>10,} {count:>14,} "
                f"{human_count(count * seq):>9} {epochs:>8} {cumulative:>12}"
            )
    lines.append("whole run:")
    for name, epochs in sampler.epochs().items():
        cap = cfg.max_repetitions.get(name, cfg.default_max_repetitions)
        lines.append(
            f"  {name:<20} {drawn[name]:>14,} samples ({drawn[name] / total:.3%}), "
            f"{human_count(drawn[name] * seq)} tokens, {epochs:.3f} epochs (cap {cap:g})"
        )
    return "\n".join(lines)


def plot(sampler: AlignmentSampler, path: str) -> None:
    """Write a PNG (or any format matplotlib knows by extension) of the schedule, atomically."""
    matplotlib = require("matplotlib", "data inspect --plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seq = sampler.seq_length
    fig, (ax_share, ax_epochs) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    total_tokens = sampler.total_samples * seq
    unit, scale = next(((u, f) for u, f in (("B", 1e9), ("M", 1e6), ("K", 1e3)) if total_tokens >= f), ("", 1.0))
    xs = [b * seq / scale for b in sampler.phase_boundaries()]
    names = sampler.source_names
    drawn = dict.fromkeys(names, 0)
    epoch_curves: dict[str, list[float]] = {n: [0.0] for n in names}
    for phase in sampler.phases:
        block = sum(phase.block_counts.values()) or 1
        bottom = 0.0
        for color, name in enumerate(names):
            height = phase.block_counts[name] / block
            if height:
                ax_share.bar(xs[phase.index], height, width=xs[phase.index + 1] - xs[phase.index], bottom=bottom,
                             align="edge", color=f"C{color}", label=name if not drawn[name] else None)
            bottom += height
            drawn[name] += phase.source_samples[name]
        for name, size in zip(names, sampler.source_sizes.tolist()):
            epoch_curves[name].append(drawn[name] / size if size else 0.0)
    for color, name in enumerate(names):
        ax_epochs.plot(xs, epoch_curves[name], color=f"C{color}", marker="o", label=name)
    for ax in (ax_share, ax_epochs):
        for x in xs[1:-1]:
            ax.axvline(x, color="k", linestyle="--", linewidth=0.8)
    for phase in sampler.phases:
        ax_share.text((xs[phase.index] + xs[phase.index + 1]) / 2, 1.02, phase.name, ha="center", va="bottom")
    ax_share.set_ylabel("share of samples")
    ax_share.set_ylim(0, 1.1)
    ax_share.legend(loc="lower left", fontsize="small")
    ax_epochs.set_ylabel("cumulative epochs")
    ax_epochs.legend(loc="upper left", fontsize="small")
    ax_epochs.set_xlabel(f"training tokens ({unit})" if unit else "training tokens")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format=os.path.splitext(path)[1].lstrip(".") or "png", dpi=120)
    finally:
        plt.close(fig)
