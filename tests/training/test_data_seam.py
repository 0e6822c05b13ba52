"""The data seam: samples are a pure function of the global index, whatever the layout or read order."""

import numpy as np
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


def test_sample_does_not_depend_on_read_order(tiny_corpus, tmp_path):
    """Guards the megatron-core 0.16 GPTDataset mask-cache bug: read order must not change loss masks."""
    import os

    import torch.distributed as dist

    from megatron_align.config import load_config
    from megatron_align.data.loader import TrainData

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        config = load_config(None, [f"data.sources=[{{name: web, prefix: {tiny_corpus}}}]", "data.mock=false",
                                    "model.seq_length=64", f"run_dir={tmp_path}"])
        forward = TrainData(config, 64, 0, 1, str(tmp_path / "c1"))
        backward = TrainData(config, 64, 0, 1, str(tmp_path / "c2"))
        first = {i: forward.dataset[i] for i in range(64)}
        second = {i: backward.dataset[i] for i in reversed(range(64))}
        masked = 0
        for i in range(64):
            for key in ("tokens", "labels", "loss_mask"):
                assert torch.equal(torch.as_tensor(first[i][key]), torch.as_tensor(second[i][key])), (i, key)
            masked += int((torch.as_tensor(first[i]["loss_mask"]) == 0).sum())
    finally:
        dist.destroy_process_group()
    assert np.isfinite(masked)
