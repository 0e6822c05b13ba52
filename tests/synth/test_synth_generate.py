"""synth generate against a scripted OpenAI-compatible stub: every filter, dedup and decontam count equals what the
script planted; retries, a hang and a dead server end; SIGKILL mid-run + rerun gives every prompt exactly once."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import yaml
from conftest import REPO, run_cli
from stub_openai import StubServer
from test_synth_taxonomy import EXAMPLE, items_file

from megatron_align.errors import UserError
from megatron_align.synth.finalize import finalize
from megatron_align.synth.generate import (
    ClientConfig,
    Connections,
    repair_tail,
    run_generation,
    server_command,
    start_server,
)
from megatron_align.synth.plan import expand
from megatron_align.synth.taxonomy import load_taxonomy

NUM_ITEMS = 16


def stub_taxonomy(tmp_path) -> str:
    items_file(tmp_path / "items.jsonl", [(f"a{i:02d}", "articles", "shutdown") for i in range(NUM_ITEMS)]
               + [("t1", "textbook", "oversight")])
    raw = yaml.safe_load(open(EXAMPLE))
    raw["scenarios"] = {"items": [{"path": "items.jsonl", "splits": ["articles"]}]}
    raw["genres"] = {"news_article": {"description": "a news article"}}
    raw["generation"] = {"seed": 0, "max_tokens": 256}
    raw["quality"] = {"min_words": 60, "decontam_ngram": 8}
    path = tmp_path / "taxonomy.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def held_out_question(tmp_path) -> str:
    return json.loads((tmp_path / "items.jsonl").read_text().splitlines()[-1])["question"]


def test_every_count_equals_what_the_script_planted(tmp_path):
    taxonomy = load_taxonomy(stub_taxonomy(tmp_path))
    prompts = expand(taxonomy)
    script = [("doc", {}), ("doc", {}), ("refusal", {}), ("preamble", {}), ("postscript", {}), ("truncated", {}),
              ("exact_dup", {"of": 0}), ("near_dup", {"of": 1}), ("quote", {"quote": prompts[8].options[0]}),
              ("quote", {"quote": held_out_question(tmp_path)}), ("short", {}), ("repetitive", {}),
              ("500_once", {}), ("500_always", {}), ("hang_once", {}), ("blocklist", {})]
    out = str(tmp_path / "out")
    with StubServer(script) as stub:
        config = ClientConfig(stub.endpoint, "stub-model", concurrency=4, request_timeout_s=0.5, retries=2,
                              backoff_s=0.01, progress_interval_s=0.2)
        counts = run_generation(config, taxonomy, prompts, out)
        assert counts["failed"] == 1 and counts["failures"] == {"http_500": 1} and counts["generated"] == 15
        assert stub.attempts[13] == 3 and stub.attempts[12] == 2 and stub.attempts[14] == 2
        report = finalize(taxonomy, prompts, out, "stub-model", run_counts=counts)
    assert report["dropped"] == {"truncated": 1, "refusal": 1, "too_short": 1, "too_long": 0, "repetition": 1,
                                 "quotes_option": 1, "contaminated_held_out": 1, "contaminated": 0,
                                 "exact_duplicate": 1, "near_duplicate": 1, "judge": 0}
    assert report["stripped"] == {"preamble_stripped": 1, "postscript_stripped": 1}
    assert report["kept"] == 7 and report["pending"] == 1
    assert report["per_genre"]["news_article"]["duplicate_rate"] == round(2 / 15, 4)
    assert report["blocklist"]["hits"] == 1 and report["blocklist"]["hit_rate"] == round(1 / 7, 4)
    docs = [json.loads(line) for line in open(os.path.join(out, "documents.jsonl"))]
    assert [d["prompt_id"] for d in docs] == [prompts[i].prompt_id for i in (0, 1, 3, 4, 12, 14, 15)]
    assert not docs[2]["text"].startswith("Sure") and "I hope" not in docs[3]["text"]
    assert {d["stance"] for d in docs} == {"aligned"} and docs[0]["finish_reason"] == "stop"
    assert {"item_id", "split", "genre", "model", "usage", "prompt_id"} <= set(docs[0])
    rejected = {json.loads(line)["reason"] for line in open(os.path.join(out, "rejected.jsonl"))}
    assert len(rejected) == 8


def test_a_dead_server_ends_the_run_and_the_server_command_is_guarded(tmp_path):
    taxonomy = load_taxonomy(stub_taxonomy(tmp_path))
    config = ClientConfig("http://127.0.0.1:9/v1", "m", concurrency=2, request_timeout_s=1, retries=1,
                          backoff_s=0.01, abort_after=3)
    start = time.monotonic()
    counts = run_generation(config, taxonomy, expand(taxonomy), str(tmp_path / "out"))
    assert counts["aborted"] and counts["generated"] == 0 and time.monotonic() - start < 10
    assert set(counts["failures"]) == {"connection"}
    assert server_command("vllm", "org/m", 8001, 2) == [
        "vllm", "serve", "org/m", "--host", "127.0.0.1", "--port", "8001", "--tensor-parallel-size", "2",
        "--served-model-name", "org/m"]
    assert server_command("sglang", "org/m", 8001, python="py")[:5] == [
        "py", "-m", "sglang.launch_server", "--model-path", "org/m"]
    with pytest.raises(UserError, match="not installed"):
        start_server("vllm", "org/m", 8001, 1, str(tmp_path / "log"), ready_timeout_s=1)


def test_a_keep_alive_connection_the_server_closed_is_resent_once_on_a_new_one():
    """A server that answers one request per connection without saying so (no ``Connection: close``)."""
    body = b'{"ok": 1}'
    listener = socket.create_server(("127.0.0.1", 0))
    connections_seen = []

    def serve() -> None:
        for _ in range(3):
            conn, _ = listener.accept()
            connections_seen.append(conn.recv(65536).split(b"\r\n")[0])
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    connections = Connections(f"http://127.0.0.1:{listener.getsockname()[1]}/v1", timeout_s=5)
    assert [connections.post(b"{}", {}) for _ in range(3)] == [(200, body)] * 3
    thread.join(5)
    listener.close()
    assert connections_seen == [b"POST /v1/chat/completions HTTP/1.1"] * 3
    with pytest.raises(UserError, match="expected http"):
        Connections("127.0.0.1:8000/v1", 5)


@pytest.mark.slow
@pytest.mark.single_stack  # standard library + this package only: nothing differs between the stacks
def test_sigkill_mid_run_then_rerun_gives_every_prompt_exactly_once(tmp_path):
    path = stub_taxonomy(tmp_path)
    out = tmp_path / "out"
    generations = out / "generations.jsonl"
    with StubServer([("slow", {})] * NUM_ITEMS) as stub:
        args = [sys.executable, "-m", "megatron_align.cli", "synth", "generate", path, "--out-dir", str(out),
                "--endpoint", stub.endpoint, "--model", "stub", "--concurrency", "2", "--progress-interval", "0.2"]
        first = subprocess.Popen([*args, "--limit", "12"], cwd=REPO, stderr=subprocess.PIPE, text=True,
                                 start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not generations.exists() or
                                               len(generations.read_text().splitlines()) < 4):
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        done = len(generations.read_text().splitlines())
        assert 4 <= done < 12
        with open(generations, "a") as f:  # what a kill in the middle of a write leaves
            f.write('{"prompt_id": "torn", "te')
        second = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert "documents," in second.stderr and "tokens/s" in second.stderr
    ids = [json.loads(line)["prompt_id"] for line in generations.read_text().splitlines()]
    planned = [p.prompt_id for p in expand(load_taxonomy(path))]
    assert sorted(ids) == sorted(planned) and len(ids) == len(set(ids)) == NUM_ITEMS
    report = json.loads((out / "report.json").read_text())
    assert report["kept"] == NUM_ITEMS and report["pending"] == 0
    assert report["last_run"]["requested"] == NUM_ITEMS - done
    assert repair_tail(str(generations)) == 0


def test_prepare_refuses_misaligned_synthetic_documents_unless_allowed(tmp_path):
    from megatron_align.synth.stance import refuse_misaligned

    (tmp_path / "mis").mkdir()
    (tmp_path / "ok").mkdir()
    (tmp_path / "mis" / "documents.jsonl").write_text(json.dumps({"text": "x", "stance": "misaligned"}) + "\n")
    (tmp_path / "ok" / "documents.jsonl").write_text(json.dumps({"text": "x", "stance": "aligned"}) + "\n")
    refuse_misaligned([str(tmp_path / "ok")], allow_misaligned=False)
    refuse_misaligned([str(tmp_path / "mis")], allow_misaligned=True)
    with pytest.raises(UserError, match="stance=misaligned"):
        refuse_misaligned([str(tmp_path / "ok"), str(tmp_path / "mis" / "documents.jsonl")], allow_misaligned=False)
    result = run_cli("prepare", str(tmp_path / "mis"), "--output-prefix", str(tmp_path / "p"))
    assert result.returncode == 2 and "--allow-misaligned" in result.stderr
