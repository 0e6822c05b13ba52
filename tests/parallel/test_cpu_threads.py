"""parallel.cpu_threads: the torch thread count each CPU rank runs with."""

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = """
import json, os, sys
import torch
from megatron_align.config import load_config
from megatron_align.parallel.init import destroy_distributed, init_distributed
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29900 + os.getpid() % 90))
init_distributed(load_config(None, ["data.mock=true"] + sys.argv[1:]), 0, 1, 0)
print(json.dumps(torch.get_num_threads()))
destroy_distributed()
"""


@pytest.mark.slow  # two Megatron-Core processes
@pytest.mark.parametrize("overrides, expected", [([], 1), (["parallel.cpu_threads=2"], 2)])
def test_cpu_rank_uses_the_configured_thread_count(overrides, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "RANK", "WORLD_SIZE")}
    result = subprocess.run([sys.executable, "-c", _SCRIPT, *overrides], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == expected
