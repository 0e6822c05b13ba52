"""Shared fixtures: a generated tiny corpus and a helper that runs `megatron-align train` as a real job."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_MODEL = {
    "num_layers": 4, "hidden_size": 64, "ffn_hidden_size": 192, "num_attention_heads": 4, "num_query_groups": 2,
    "seq_length": 64, "tie_embeddings": True,
}


_DISTRIBUTED_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")


@pytest.fixture(autouse=True)
def _no_leaked_distributed_state():
    """Fails a test that leaves MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE changed in this process's environment or a
    torch.distributed process group initialised: either leaks into every later test (a stale port, a rank that
    thinks it joined a job). Use ``monkeypatch.setenv`` and the ``gloo_group`` fixture, or a subprocess."""
    before = {key: os.environ.get(key) for key in _DISTRIBUTED_ENV}
    yield
    changed = [key for key in _DISTRIBUTED_ENV if os.environ.get(key) != before[key]]
    torch = sys.modules.get("torch")  # only when already imported: this check costs no import
    group = torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized()
    for key in changed:  # restore, so one leak fails one test, not every test after it
        os.environ.pop(key, None) if before[key] is None else os.environ.__setitem__(key, before[key])
    if group:
        torch.distributed.destroy_process_group()
    if changed or group:
        pytest.fail(f"the test leaked {'environment ' + ', '.join(changed) if changed else ''}"
                    f"{' and ' if changed and group else ''}{'an initialised process group' if group else ''} "
                    "into the pytest process (use monkeypatch.setenv and the gloo_group fixture)", pytrace=False)


@pytest.fixture
def gloo_group(monkeypatch):
    """A one-rank gloo process group in this process, destroyed (and its MASTER_* environment restored) after."""
    import torch.distributed as dist

    from megatron_align.parallel.spawn import free_port

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _write_corpus(tmp_path_factory, name: str, num_documents: int, seed: int) -> str:
    from megatron_align.corpus.indexed import write_indexed_dataset
    from megatron_align.corpus.tokenizer import ByteTokenizer
    from megatron_align.data.synthetic import general_documents

    prefix = str(tmp_path_factory.mktemp(name) / name)
    tok = ByteTokenizer()
    write_indexed_dataset(
        (tok.encode(t) for t in general_documents(num_documents, seed=seed)), prefix, tok.vocab_size, tok.eod
    )
    return prefix


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> str:
    """Prefix of a small byte-tokenized corpus (.bin/.idx)."""
    return _write_corpus(tmp_path_factory, "web", 400, seed=0)


@pytest.fixture(scope="session")
def second_corpus(tmp_path_factory) -> str:
    """A second small source (different documents), e.g. for mixture tests."""
    return _write_corpus(tmp_path_factory, "aligned", 120, seed=99)


def tiny_config(run_dir, corpus_prefix: str, **sections) -> dict:
    config = {
        "run_dir": str(run_dir),
        "model": dict(TINY_MODEL),
        "parallel": {"world_size": 1},
        "train": {"steps": 4, "global_batch_size": 4, "micro_batch_size": 1, "seed": 7},
        "optimizer": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 1, "clip_grad": 1.0},
        "data": {"sources": [{"name": "web", "prefix": corpus_prefix}]},
        "checkpoint": {"interval": 2, "keep_last": 5},
        "logging": {"interval": 1},
    }
    for key, value in sections.items():
        config.setdefault(key, {}).update(value) if isinstance(value, dict) else config.__setitem__(key, value)
    return config


def write_yaml(path, data: dict) -> str:
    with open(path, "w") as f:
        yaml.safe_dump(data, f)
    return str(path)


def run_cli(
    *args: str, env: dict | None = None, timeout: int = 600, python: str | None = None
) -> subprocess.CompletedProcess:
    """Run `megatron-align ARGS` in a fresh interpreter (as a user would) and capture its output.

    ``python``: another stack's interpreter (tests/test_cross_stack.py); default this one."""
    full_env = dict(os.environ, **(env or {}))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_ID", "SLURM_NTASKS"):
        full_env.pop(var, None)
    return subprocess.run([python or sys.executable, "-m", "megatron_align.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=REPO)


def make_bpe_tokenizer(path, *, bos: bool, vocab_size: int = 300) -> int:
    """A small byte-level BPE trained with `tokenizers` + tokenizer_config.json / generation_config.json written the
    way the family does (Llama 3 / Mistral: BOS added by the post-processor; Qwen: no BOS). Returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<|begin_of_text|>", "<|end_of_text|>"] if bos else ["<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    from megatron_align.data.synthetic import general_documents

    tok.train_from_iterator(list(general_documents(200, seed=4)), trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", 0)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    eos = specials[-1]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": specials[0] if bos else None,
              "eos_token": eos, "model_max_length": 128, "clean_up_tokenization_spaces": False,
              "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0 if bos else None,
                                                             "eos_token_id": tok.token_to_id(eos)}))
    return tok.get_vocab_size()


@pytest.fixture(scope="session")
def cluster() -> list[str]:
    """tests/cluster: one real N-node SLURM cluster per test session (tests/cluster/slurm_harness.sh); the node
    names (n1, n2, n3 with the default MA_SLURM_NODES=3).

    The session brings the cluster up when the first test needs it and, if this session started it, takes it down
    again at the end (daemons stopped, the harness's /etc/hosts line removed). A cluster that was already running
    (another session, a developer's `slurm_harness.sh up`) is reused and left running. Run these tests under
    `flock /tmp/ma-cluster-tests.lock` when several sessions share a machine. (It lives here, not in a
    tests/cluster/conftest.py: a second module named ``conftest`` would shadow this one for ``from conftest import``.)
    """
    harness = os.path.join(REPO, "tests", "cluster", "slurm_harness.sh")
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    was_running = subprocess.run(["bash", harness, "running"], capture_output=True).returncode == 0
    proc = subprocess.run(["bash", harness, "up"], capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(f"SLURM cannot run here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, f"slurm harness failed:\n{proc.stdout}\n{proc.stderr}"
    nodes = subprocess.run(["bash", harness, "nodes"], capture_output=True, text=True, check=True).stdout.split()
    yield nodes
    if not was_running:
        subprocess.run(["bash", harness, "down"], capture_output=True, timeout=300)


@contextlib.contextmanager
def http_server(command: list[str], health_url: str, log_path, env: dict | None = None, timeout_s: float = 300):
    """Start a server process group, wait until ``health_url`` answers 200 (or fail the test with its log's tail),
    yield the process, then stop the group (SIGTERM, SIGKILL after 30 s)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
        try:
            deadline = time.monotonic() + timeout_s  # a loaded 2-core box: servers import a lot before they listen
            while True:
                try:
                    with urllib.request.urlopen(health_url, timeout=5) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    with open(log_path) as f:
                        pytest.fail(f"{command[0]} did not come up (exit {proc.poll()}):\n{f.read()[-3000:]}")
                time.sleep(0.5)
            yield proc
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
