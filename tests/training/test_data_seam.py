"""The data seam: samples are a pure function of the global index, whatever the layout or read order."""

import torch

from megatron_align.data.mixture import microbatch_indices


def test_global_batch_is_independent_of_dp_size():
    for dp in (1, 2, 4):
        seen = []
        for step_start in (0, 8):
            batch = sorted(int(i) for r in range(dp) for j in range(8 // dp)
                           for i in microbatch_indices(step_start, 8, 1, r, dp, j))
            seen.append(batch)
        assert seen == [list(range(0, 8)), list(range(8, 16))]


def test_sample_does_not_depend_on_read_order(tmp_path, gloo_group):
    """Guards the megatron-core 0.16 GPTDataset mask-cache bug: read order must not change loss masks.

    The bug needs masked labels: GPTDataset zeroes the loss mask where a label is the tokenizer's pad id,
    and the first sample's zeros leaked into a cached mask shared by every later sample. Documents here
    are short (40 tokens) and end in the pad id (as with a SentencePiece model without a pad piece, where
    pad = eod), so every sample has masked labels, the first one read in each order included."""
    from megatron_align.config import load_config
    from megatron_align.corpus.indexed import write_indexed_dataset
    from megatron_align.corpus.tokenizer import ByteTokenizer
    from megatron_align.data.loader import TrainData
    from megatron_align.data.synthetic import general_documents

    tok = ByteTokenizer()
    corpus = str(tmp_path / "pad_terminated")
    write_indexed_dataset((tok.encode(t)[:40] for t in general_documents(400, seed=0)), corpus, tok.vocab_size, tok.pad)
    config = load_config(None, [f"data.sources=[{{name: web, prefix: {corpus}}}]", "data.mock=false",
                                "model.seq_length=64", f"run_dir={tmp_path}"])
    forward = TrainData(config, 64, 0, 1, str(tmp_path / "c1"))
    backward = TrainData(config, 64, 0, 1, str(tmp_path / "c2"))
    first = {i: forward.dataset[i] for i in range(64)}
    second = {i: backward.dataset[i] for i in reversed(range(64))}
    masked = [int((torch.as_tensor(first[i]["loss_mask"]) == 0).sum()) for i in range(64)]
    # The bug's precondition: the first sample read in either order has masked labels to leak.
    assert masked[0] > 0 and masked[63] > 0, masked
    for i in range(64):
        for key in ("tokens", "labels", "loss_mask"):
            assert torch.equal(torch.as_tensor(first[i][key]), torch.as_tensor(second[i][key])), (i, key)
