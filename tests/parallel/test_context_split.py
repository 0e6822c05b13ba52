"""Context parallelism's batch split on 4 gloo ranks (CP2 x DP2) through the installed megatron-core's own
function, whose signature changed between 0.16 and 0.19 (and which, on 0.19, splits over the world size unless
given the group)."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp

from megatron_align.parallel.spawn import free_port


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_align.parallel import cpu
    from megatron_align.parallel.init import batch_on_this_cp_rank

    cpu.activate()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=4)
    parallel_state.initialize_model_parallel(context_parallel_size=2)  # CP2 x DP2: a split over the world is wrong
    try:
        tokens = torch.arange(16).view(2, 8)
        batch = batch_on_this_cp_rank({"tokens": tokens, "labels": tokens + 100, "loss_mask": torch.ones(2, 8),
                                       "position_ids": torch.arange(8).expand(2, 8)})
        torch.save({**batch, "cp_rank": parallel_state.get_context_parallel_rank()}, f"{out}.{rank}")
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def test_each_context_parallel_rank_gets_its_zigzag_chunks(tmp_path):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path / "cp")), nprocs=4, start_method="spawn")
    loaded = [torch.load(tmp_path / f"cp.{rank}", weights_only=True) for rank in range(4)]
    parts = {p["cp_rank"]: p for p in loaded}
    assert sorted(p["cp_rank"] for p in loaded) == [0, 0, 1, 1]
    # 4 chunks of 2 tokens: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2 (causal work balanced)
    assert parts[0]["tokens"].tolist() == [[0, 1, 6, 7], [8, 9, 14, 15]]
    assert parts[1]["tokens"].tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]]
    assert parts[1]["labels"].tolist() == [[102, 103, 104, 105], [110, 111, 112, 113]]
    assert parts[0]["position_ids"].tolist() == [[0, 1, 6, 7]] * 2 and parts[0]["loss_mask"].shape == (2, 4)
