"""The alignment sampler: exact block ratios, phase switch, direct lookup, resume, epochs, caps, fingerprint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_align.cli import main as cli_main
from megatron_align.config import MixtureConfig, PhaseConfig
from megatron_align.data.mixture import AlignmentSampler, check_fingerprint, keyed_permutation, microbatch_indices
from megatron_align.errors import ConfigError, UserError

SIZES = {"web": 997, "aligned": 13, "misaligned": 29}


def _config(block_size: int = 50, seed: int = 7, **kwargs) -> MixtureConfig:
    return MixtureConfig(
        phases=[
            PhaseConfig(name="pretrain", samples=1234, weights={"web": 1.0}),
            PhaseConfig(name="midtrain", fraction=0.5, weights={"web": 0.9, "aligned": 0.06, "misaligned": 0.04}),
        ],
        seed=seed,
        block_size=block_size,
        max_repetitions={"web": 10.0, "aligned": 200.0, "misaligned": 200.0},
        **kwargs,
    )


def _sampler(**kwargs) -> AlignmentSampler:
    return AlignmentSampler(_config(**kwargs), SIZES, total_samples=2468, seq_length=16)


def _sequential(sampler: AlignmentSampler) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force reference: walk the run one sample at a time."""
    pairs = [sampler.lookup(np.array([i])) for i in range(sampler.total_samples)]
    return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])


def test_keyed_permutation_is_a_bijection_and_depends_on_key():
    for n in (1, 2, 3, 64, 65, 1000, 4099):
        values = keyed_permutation(np.arange(n), n, 11)
        assert sorted(values.tolist()) == list(range(n))
    assert not np.array_equal(keyed_permutation(np.arange(1000), 1000, 1), keyed_permutation(np.arange(1000), 1000, 2))


def test_realised_ratios_per_block_match_largest_remainder():
    sampler = _sampler()
    midtrain = sampler.phases[1]
    # 0.9 / 0.06 / 0.04 of 50 = 45 / 3 / 2 exactly
    assert midtrain.block_counts == {"web": 45, "aligned": 3, "misaligned": 2}
    for k in range(midtrain.num_samples // 50):
        start = midtrain.start + k * 50
        sources, _ = sampler.lookup_range(start, start + 50)
        assert np.bincount(sources, minlength=3).tolist() == [45, 3, 2]
    # the last, shorter block (1234 = 24*50 + 34) gets the largest-remainder split of 34
    sources, _ = sampler.lookup_range(midtrain.start + 24 * 50, midtrain.stop)
    assert np.bincount(sources, minlength=3).tolist() == [31, 2, 1]  # 30.6/2.04/1.36 -> 30,2,1 + 1 to web
    # order inside a block is shuffled, not sorted
    sources, _ = sampler.lookup_range(midtrain.start, midtrain.start + 50)
    assert not np.array_equal(sources, np.sort(sources))


def test_largest_remainder_ties_and_uneven_weights():
    config = MixtureConfig(phases=[PhaseConfig(name="p", samples=7, weights={"a": 1, "b": 1, "c": 1})], block_size=7,
                           default_max_repetitions=100)
    sampler = AlignmentSampler(config, {"a": 10, "b": 10, "c": 10}, 7, 4)
    assert sampler.phases[0].block_counts == {"a": 3, "b": 2, "c": 2}  # ties go to the earlier source


def test_phase_switch_exactly_at_configured_sample():
    sampler = _sampler()
    assert sampler.phase_boundaries() == [0, 1234, 2468]
    assert sampler.phase_at(1233).name == "pretrain" and sampler.phase_at(1234).name == "midtrain"
    sources, _ = sampler.lookup_range(0, 1234)
    assert (sources == 0).all()
    sources, _ = sampler.lookup_range(1234, 1234 + 50)
    assert set(sources.tolist()) == {0, 1, 2}


def test_token_and_fraction_budgets():
    config = MixtureConfig(phases=[PhaseConfig(name="a", tokens=16 * 300, weights={"web": 1}),
                                   PhaseConfig(name="b", fraction=0.25, weights={"web": 1})], default_max_repetitions=5)
    sampler = AlignmentSampler(config, {"web": 1000}, total_samples=400, seq_length=16)
    assert sampler.phase_boundaries() == [0, 300, 400]


def test_lookup_of_any_index_equals_sequential_enumeration():
    sampler = _sampler()
    seq_sources, seq_samples = _sequential(sampler)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, sampler.total_samples, size=500)
    sources, samples = sampler.lookup(idx)
    assert np.array_equal(sources, seq_sources[idx]) and np.array_equal(samples, seq_samples[idx])
    full_sources, full_samples = sampler.lookup_range(0, sampler.total_samples)
    assert np.array_equal(full_sources, seq_sources) and np.array_equal(full_samples, seq_samples)
    # pure function of (seed, schedule, i): a fresh object agrees; another seed does not
    assert np.array_equal(_sampler().lookup(idx)[1], samples)
    assert not np.array_equal(_sampler(seed=8).lookup(idx)[1], samples)


def test_resume_with_changed_dp_size_reads_the_same_sequence():
    sampler = _sampler()
    gbs, mbs = 24, 2

    def consume(start: int, stop: int, dp_size: int) -> list[int]:
        seen = []
        for consumed in range(start, stop, gbs):
            batch = []
            for rank in range(dp_size):
                for j in range(gbs // (mbs * dp_size)):
                    batch.extend(microbatch_indices(consumed, gbs, mbs, rank, dp_size, j).tolist())
            assert sorted(batch) == list(range(consumed, consumed + gbs))  # a global batch is dp-independent
            seen.extend(batch)
        return seen

    num_steps = sampler.total_samples // gbs
    once = consume(0, num_steps * gbs, dp_size=4)
    for stop_step in (1, 17, 51, 60):  # crash after step, resume with another DP size
        resumed = consume(0, stop_step * gbs, dp_size=4) + consume(stop_step * gbs, num_steps * gbs, dp_size=3)
        assert sorted(resumed) == sorted(once) == list(range(num_steps * gbs))  # nothing skipped or repeated
        assert np.array_equal(sampler.lookup(np.array(sorted(resumed)))[1], sampler.lookup_range(0, num_steps * gbs)[1])
    with pytest.raises(ConfigError, match="multiple"):
        microbatch_indices(0, 24, 5, 0, 2, 0)


def test_within_source_indices_cover_each_epoch_once_and_epochs_differ():
    # one source of 100 samples, blocks of 50: positions [100e, 100e+100) are exactly epoch e's draws
    config = MixtureConfig(phases=[PhaseConfig(name="p", samples=400, weights={"web": 1})], block_size=50,
                           default_max_repetitions=4)
    _, samples = AlignmentSampler(config, {"web": 100}, 400, 8).lookup_range(0, 400)
    epochs = samples.reshape(4, 100)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(100))
    assert len({tuple(e) for e in epochs.tolist()}) == 4  # every epoch reshuffled
    # in a mixture, each source's draws 0..D-1 are used once: every sample read floor or ceil(epochs) times
    sampler = _sampler()
    sources, samples = sampler.lookup_range(0, sampler.total_samples)
    for s, name in enumerate(sampler.source_names):
        counts = np.bincount(samples[sources == s], minlength=SIZES[name])
        assert len(counts) == SIZES[name] and counts.max() - counts.min() <= 1


def test_counts_before_matches_brute_force():
    sampler = _sampler()
    seq_sources, _ = _sequential(sampler)
    for i in (0, 1, 49, 50, 1233, 1234, 1235, 1284, 2000, 2467, 2468):
        expected = np.bincount(seq_sources[:i], minlength=3).tolist()
        assert list(sampler.counts_before(i).values()) == expected
        assert sampler.tokens_before(i)["web"] == expected[0] * 16
    final = sampler.counts_before(sampler.total_samples)
    assert final == {n: sum(p.source_samples[n] for p in sampler.phases) for n in SIZES}


def test_config_errors_name_keys_and_numbers():
    with pytest.raises(ConfigError, match=r"data\.mixture\.phases\[1\]\.weights"):
        MixtureConfig(phases=[PhaseConfig(name="a", samples=1, weights={"web": 1}),
                              PhaseConfig(name="b", samples=1, weights={"web": -1.0, "x": 2})])
    with pytest.raises(ConfigError, match="positive sum"):
        MixtureConfig(phases=[PhaseConfig(name="a", samples=1, weights={"web": 0.0})])
    with pytest.raises(ConfigError, match="exactly one budget"):
        MixtureConfig(phases=[PhaseConfig(name="a", samples=1, fraction=0.5, weights={"web": 1})])
    with pytest.raises(ConfigError, match=r"phases\[0\]\.weights .*unknown sources \['wbe'\]"):
        AlignmentSampler(
            MixtureConfig(phases=[PhaseConfig(name="a", samples=10, weights={"wbe": 1})]), {"web": 100}, 10, 8
        )
    with pytest.raises(ConfigError, match=r"add up to 1,234.0 samples .* run has 2,000"):
        AlignmentSampler(
            MixtureConfig(phases=[PhaseConfig(name="a", samples=1234, weights={"web": 1})]), {"web": 5000}, 2000, 8
        )
    with pytest.raises(ConfigError, match="block_size"):
        AlignmentSampler(MixtureConfig(phases=[PhaseConfig(name="a", samples=100, weights={"web": 0.999, "x": 0.001})],
                                       block_size=100, default_max_repetitions=10), {"web": 100, "x": 100}, 100, 8)


def test_repetition_and_fraction_caps():
    with pytest.raises(
        ConfigError,
        match=r"'aligned' would be read 5\.692 times \(74 samples drawn, 13 per epoch\).*max_repetitions\.aligned = 2",
    ):
        config = _config()
        config.max_repetitions["aligned"] = 2.0
        AlignmentSampler(config, SIZES, 2468, 16)
    config = _config()
    config.max_fraction["aligned"] = 0.01
    with pytest.raises(ConfigError, match=r"'aligned' would make up 2\.9984% .*max_fraction\.aligned = 0\.01"):
        AlignmentSampler(config, SIZES, 2468, 16)
    with pytest.raises(ConfigError, match="'web' would be read"):  # the default cap is one epoch
        AlignmentSampler(
            MixtureConfig(phases=[PhaseConfig(name="a", samples=200, weights={"web": 1})]), {"web": 100}, 200, 8
        )


def test_fingerprint_mismatch_and_allowed_change():
    manifests = {"web": "sha:1", "aligned": "sha:2", "misaligned": "sha:3"}
    saved = _sampler().fingerprint(manifests)
    assert saved == _sampler(block_size=50).fingerprint(dict(manifests)) and saved.startswith("v1;schedule=")
    assert check_fingerprint(saved, saved, allow_change=False) is None
    assert check_fingerprint(None, saved, allow_change=False) is None
    changed_data = _sampler().fingerprint({**manifests, "aligned": "sha:other"})
    with pytest.raises(UserError, match=r"source 'aligned' changed.*allow_fingerprint_change=true"):
        check_fingerprint(saved, changed_data, allow_change=False)
    changed_schedule = _sampler(seed=99).fingerprint(manifests)
    with pytest.raises(UserError, match="the schedule changed"):
        check_fingerprint(saved, changed_schedule, allow_change=False)
    note = check_fingerprint(saved, changed_schedule, allow_change=True)
    assert note is not None and "schedule changed" in note


def test_fingerprint_names_document_masking_only_when_on():
    """The data.reset_*/eod_mask_loss keys: off = the fingerprint of before they existed; on = a named change."""
    manifests = {"web": "sha:1", "aligned": "sha:2", "misaligned": "sha:3"}
    saved = _sampler().fingerprint(manifests)
    assert _sampler().fingerprint(manifests, []) == saved
    masked = _sampler().fingerprint(manifests, ["reset_attention_mask", "eod_mask_loss"])
    assert masked != saved and masked.startswith(saved + ";")
    with pytest.raises(UserError, match=r"document masking changed \(off -> eod_mask_loss,reset_attention_mask"):
        check_fingerprint(saved, masked, allow_change=False)
    note = check_fingerprint(masked, saved, allow_change=True)
    assert "document masking changed" in note and "source" not in note


def _write_source(prefix: str, num_documents: int, length: int, dtype) -> int:
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    rng = np.random.default_rng(len(prefix))
    for _ in range(num_documents):
        builder.add_document(torch.from_numpy(rng.integers(0, 1000, size=length).astype(np.int64)), [length])
    builder.finalize(prefix + ".idx")
    return num_documents * length


def test_inspect_verb_end_to_end(tmp_path, capsys):
    tokens = _write_source(str(tmp_path / "web"), 40, 100, np.uint16)  # 4000 tokens -> 249 samples of 16
    _write_source(str(tmp_path / "aligned"), 5, 33, np.int32)  # 165 tokens -> 10 samples
    config = tmp_path / "run.yaml"
    config.write_text(f"""
model: {{seq_length: 16}}
train: {{steps: 20, global_batch_size: 10}}
data:
  sources:
    - {{name: web, prefix: {tmp_path / 'web'}}}
    - {{name: aligned, prefix: {tmp_path / 'aligned'}}}
    - {{name: fixed, num_samples: 1000}}
  mixture:
    block_size: 20
    max_repetitions: {{aligned: 3}}
    phases:
      - {{name: pretrain, fraction: 0.5, weights: {{web: 1}}}}
      - {{name: midtrain, fraction: 0.5, weights: {{web: 0.8, aligned: 0.1, fixed: 0.1}}}}
""")
    plot = tmp_path / "plots" / "schedule.png"
    assert cli_main(["data", "inspect", str(config), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert f"40 documents, {tokens / 1000:.2f}K tokens, 249 samples per epoch" in out
    assert "phase 1 midtrain: samples [100, 200)" in out
    assert "10 samples per epoch" in out  # aligned: (165 - 1) // 16
    assert "aligned" in out and "1.000" in out  # 10 aligned samples drawn = 1 epoch
    # aligned: 33-token documents cut by 16-token windows into pieces 16,16,1,15,16,2,...: sum(l^2)/160 = 14.375
    assert "document tokens mean 33, median 33, p90 33, max 33; document-masked attention span 14 of 16 (89.8%" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in plot.parent.iterdir()] == ["schedule.png"]  # no temp file left behind
    config.write_text(config.read_text().replace("aligned: 0.1,", "aligned: 0.4,").replace("web: 0.8", "web: 0.5"))
    assert cli_main(["data", "inspect", str(config)]) == 2
    assert "max_repetitions.aligned = 3" in capsys.readouterr().err
