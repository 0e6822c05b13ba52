"""`synth generate`: every planned prompt sent to an OpenAI-compatible server, exactly once across restarts.

Why not datatrove's ``InferenceRunner``: its endpoint path needs httpx, aiosqlite and aiofiles (absent from this
project's stacks), and its resume unit is a chunk of records plus a SQLite request cache, whose exactly-once behaviour
under SIGKILL we could not verify. This client is the standard library (threads + keep-alive ``http.client``), and
its guarantees are small enough to state:

- **Exactly once.** One thread (the caller's) appends each finished prompt to ``generations.jsonl`` as one line with
  one ``write``. A restart first cuts a torn last line (a kill mid-write), then skips every prompt id already there;
  so a run killed at any point and started again ends with every prompt once. The plan's fingerprint is stored in
  ``plan.json``; a different plan in the same directory is refused.
- **Nothing hangs.** Every request has a timeout (per socket operation); HTTP 5xx/429, timeouts, refused
  connections and unparsable replies are retried with backoff, then the prompt is counted as failed and left for the
  next run. After ``abort_after`` prompts in a row have failed the run stops: the server is down.
- ``server`` vllm|sglang starts one server on this node (guarded: the binary must exist) and stops it at the end.
"""

from __future__ import annotations

import concurrent.futures as futures
import glob
import http.client
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

from megatron_align.errors import UserError
from megatron_align.fileio import JsonlAppender, atomic_write_json, iter_jsonl
from megatron_align.synth.plan import PlannedPrompt, plan_fingerprint, write_plan
from megatron_align.synth.taxonomy import Taxonomy

GENERATIONS = "generations.jsonl"
SERVERS = ("vllm", "sglang")


@dataclass(frozen=True)
class ClientConfig:
    endpoint: str
    """Base URL of an OpenAI-compatible API, e.g. ``http://127.0.0.1:8000/v1``."""
    model: str
    api_key: str | None = None
    concurrency: int = 16
    request_timeout_s: float = 600.0
    retries: int = 3
    backoff_s: float = 1.0
    abort_after: int = 50
    """Stop the run after this many prompts in a row failed (a dead server)."""
    progress_interval_s: float = 10.0


class RequestFailed(Exception):
    def __init__(self, reason: str, retry: bool) -> None:
        super().__init__(reason)
        self.reason, self.retry = reason, retry


def _payload(prompt: PlannedPrompt, taxonomy: Taxonomy, model: str) -> dict:
    generation = taxonomy.generation
    payload = {"model": model, "messages": list(prompt.messages), "temperature": generation.temperature,
               "top_p": generation.top_p, "max_tokens": generation.max_tokens}
    if generation.seed is not None:
        payload["seed"] = generation.seed + prompt.index
    return payload


class Connections:
    """One keep-alive connection per client thread; each request is one ``sendall``, its reply read by ``http.client``.

    Against a fast server, urllib's new TCP connection per request halved documents/s, and ``http.client``'s separate
    writes of headers and body (Nagle's algorithm meeting delayed ACKs) cost another 2-5x in latency
    (benchmarks/synth_speed.py). ``http.client`` still makes the connection: TLS, and an ``https_proxy`` /
    ``http_proxy`` tunnel or absolute-URL request, as urllib would use. A request that fails on a reused connection
    the server closed while idle is sent once more on a new one; any other error closes the connection, so a late
    reply can never be read as another request's.
    """

    def __init__(self, endpoint: str, timeout_s: float) -> None:
        url = urllib.parse.urlsplit(endpoint.rstrip("/") + "/chat/completions")
        if url.scheme not in ("http", "https") or not url.hostname:
            raise UserError(f"--endpoint {endpoint!r}: expected http(s)://HOST[:PORT]/v1")
        self.https, self.host, self.netloc, self.timeout_s = url.scheme == "https", url.hostname, url.netloc, timeout_s
        self.port = url.port or (443 if self.https else 80)
        self.path = url.path
        proxy = urllib.request.getproxies().get(url.scheme)
        self.proxy = None if not proxy or urllib.request.proxy_bypass(url.netloc) else urllib.parse.urlsplit(proxy)
        if self.proxy is not None and not self.https:
            self.path = f"http://{url.netloc}{url.path}"  # a plain-HTTP proxy takes the absolute URL
        self.local = threading.local()
        self.lock, self.open = threading.Lock(), set()

    def _connect(self) -> socket.socket:
        host, port = (self.proxy.hostname, self.proxy.port or 80) if self.proxy is not None else (self.host, self.port)
        if self.https:
            connection = http.client.HTTPSConnection(host, port, timeout=self.timeout_s)
            if self.proxy is not None:
                connection.set_tunnel(self.host, self.port)
        else:
            connection = http.client.HTTPConnection(host, port, timeout=self.timeout_s)
        connection.connect()
        connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.lock:
            self.open.add(connection.sock)
        return connection.sock

    def close(self) -> None:
        """Close this thread's connection."""
        sock, self.local.sock = getattr(self.local, "sock", None), None
        if sock is not None:
            with self.lock:
                self.open.discard(sock)
            sock.close()

    def close_all(self) -> None:
        """Close every thread's connection (the threads have finished)."""
        with self.lock:
            socks, self.open = self.open, set()
        for sock in socks:
            sock.close()

    def post(self, body: bytes, headers: dict) -> tuple[int, bytes]:
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        request = (f"POST {self.path} HTTP/1.1\r\nHost: {self.netloc}\r\n{head}Content-Length: {len(body)}\r\n\r\n"
                   .encode("latin-1") + body)
        for _ in range(2):
            sock = getattr(self.local, "sock", None)
            reused = sock is not None
            if sock is None:
                sock = self.local.sock = self._connect()
            try:
                sock.sendall(request)
                response = http.client.HTTPResponse(sock, method="POST")
                response.begin()
                data = response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if reused:
                    continue
                raise
            except BaseException:
                self.close()
                raise
            if response.will_close:
                self.close()
            return response.status, data
        raise ConnectionError("the server closed a fresh connection")


def _post(config: ClientConfig, connections: Connections, payload: dict) -> dict:
    headers = {"Content-Type": "application/json"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    try:
        status, body = connections.post(json.dumps(payload).encode(), headers)
    except TimeoutError:
        raise RequestFailed("timeout", retry=True) from None
    except (OSError, http.client.HTTPException):
        raise RequestFailed("connection", retry=True) from None
    if status >= 400:
        raise RequestFailed(f"http_{status}", retry=status >= 500 or status in (408, 429))
    try:
        reply = json.loads(body)
        choice = reply["choices"][0]
        text = choice["message"]["content"]
        if not isinstance(text, str):
            raise TypeError
    except (ValueError, KeyError, IndexError, TypeError):
        raise RequestFailed("bad_response", retry=True) from None
    return {"text": text, "finish_reason": choice.get("finish_reason"), "usage": reply.get("usage") or {},
            "model": reply.get("model") or payload["model"]}


def generate_one(config: ClientConfig, connections: Connections, taxonomy: Taxonomy,
                 prompt: PlannedPrompt) -> tuple[dict | None, str, int]:
    """(result or None, last failure reason or "", retries used)."""
    payload = _payload(prompt, taxonomy, config.model)
    reason = ""
    for attempt in range(config.retries + 1):
        try:
            return _post(config, connections, payload), reason, attempt
        except RequestFailed as failed:
            reason = failed.reason
            if not failed.retry or attempt == config.retries:
                return None, reason, attempt
            time.sleep(config.backoff_s * 2 ** attempt)
    raise AssertionError("unreachable")


def repair_tail(path: str) -> int:
    """Cut a torn last line (a process killed mid-write); returns the bytes removed."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return 0
    if not size:
        return 0
    with open(path, "rb+") as f:
        f.seek(max(0, size - (1 << 20)))
        tail = f.read()
        if tail.endswith(b"\n"):
            return 0
        cut = tail.rfind(b"\n")
        keep = size - len(tail) + cut + 1 if cut >= 0 else (0 if size <= len(tail) else size)
        f.truncate(keep)
        return size - keep


def generations_path(out_dir: str, rank: int = 0, world_size: int = 1) -> str:
    """The file task ``rank`` of ``world_size`` appends to (one writer per file): ``generations.jsonl`` for a single
    process, ``generations.task-RRRRR.jsonl`` for a pipeline task."""
    name = GENERATIONS if world_size == 1 else f"generations.task-{rank:05d}.jsonl"
    return os.path.join(out_dir, name)


def generation_files(out_dir: str) -> list[str]:
    """Every generations file of ``out_dir`` (runs with any task count leave theirs), in a fixed order."""
    return sorted(glob.glob(os.path.join(out_dir, "generations*.jsonl")))


def iter_generations(out_dir: str) -> Iterator[dict]:
    for path in generation_files(out_dir):
        yield from iter_jsonl(path)


def done_ids(out_dir: str) -> set[str]:
    return {r["prompt_id"] for r in iter_generations(out_dir) if "prompt_id" in r}


def prepare_out_dir(out_dir: str, taxonomy: Taxonomy, prompts: list[PlannedPrompt]) -> None:
    """Write the plan on a first run; refuse a directory generated from another plan."""
    plan_path = os.path.join(out_dir, "plan.json")
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            stored = json.load(f)
        if stored.get("fingerprint") != plan_fingerprint(prompts):
            raise UserError(f"{out_dir} holds documents of another plan (taxonomy {stored.get('taxonomy')!r}, "
                            "different prompts); use a new --out-dir, or the taxonomy it was made from")
        return
    write_plan(out_dir, taxonomy, prompts)


class _Progress:
    def __init__(self, total: int, interval_s: float) -> None:
        self.total, self.interval_s = total, interval_s
        self.start = self.last = time.monotonic()
        self.documents = self.tokens = self.failed = self.retries = 0

    def line(self) -> str:
        seconds = max(time.monotonic() - self.start, 1e-9)
        return (f"synth generate: {self.documents:,}/{self.total:,} documents, {self.tokens / seconds:,.0f} tokens/s, "
                f"{self.failed:,} failed, {self.retries:,} retries")

    def update(self, final: bool = False) -> None:
        now = time.monotonic()
        if final or now - self.last >= self.interval_s:
            self.last = now
            print(self.line(), file=sys.stderr, flush=True)


def run_generation(config: ClientConfig, taxonomy: Taxonomy, prompts: list[PlannedPrompt], out_dir: str,
                   limit: int | None = None, rank: int = 0, world_size: int = 1) -> dict:
    """Generate every prompt of ``prompts[:limit]`` not yet in ``out_dir``; returns this run's counts. As task
    ``rank`` of ``world_size``: only the prompts whose plan index is ``rank`` mod ``world_size``, into this task's own
    file (the documents are the same whatever the task count: each is a function of its prompt)."""
    os.makedirs(out_dir, exist_ok=True)
    prepare_out_dir(out_dir, taxonomy, prompts)
    path = generations_path(out_dir, rank, world_size)
    repair_tail(path)  # this task's own file only: another task may be appending to its own
    done = done_ids(out_dir)
    todo = [p for p in prompts[:limit] if p.index % world_size == rank and p.prompt_id not in done]
    progress = _Progress(len(todo), config.progress_interval_s)
    failures: dict[str, int] = {}
    in_a_row, aborted = 0, False
    # Finished requests arrive on a queue (a done-callback per future): O(1) per document, where futures.wait would
    # register a waiter on every one of the 2 x concurrency futures in flight for each completion.
    finished: queue.SimpleQueue[tuple[PlannedPrompt, futures.Future]] = queue.SimpleQueue()
    in_flight = 0
    remaining = iter(todo)
    connections = Connections(config.endpoint, config.request_timeout_s)
    try:
        with futures.ThreadPoolExecutor(max_workers=config.concurrency) as pool, JsonlAppender(path) as generations:
            while True:
                while not aborted and in_flight < 2 * config.concurrency:
                    prompt = next(remaining, None)
                    if prompt is None:
                        break
                    future = pool.submit(generate_one, config, connections, taxonomy, prompt)
                    future.add_done_callback(lambda done, prompt=prompt: finished.put((prompt, done)))
                    in_flight += 1
                if not in_flight:
                    break
                try:
                    prompt, future = finished.get(timeout=config.progress_interval_s)
                except queue.Empty:
                    progress.update()
                    continue
                in_flight -= 1
                result, reason, retries = future.result()
                progress.retries += retries
                if result is None:
                    failures[reason] = failures.get(reason, 0) + 1
                    progress.failed += 1
                    in_a_row += 1
                    aborted = aborted or in_a_row >= config.abort_after
                else:
                    in_a_row = 0
                    generations.append({"prompt_id": prompt.prompt_id, "index": prompt.index, **result})
                    progress.documents += 1
                    progress.tokens += int(result["usage"].get("completion_tokens") or 0)
                progress.update()
    finally:
        connections.close_all()  # the pool's threads have finished
    progress.update(final=True)
    counts = {"requested": len(todo), "generated": progress.documents, "failed": progress.failed,
              "failures": failures, "retries": progress.retries, "aborted": aborted,
              "seconds": round(time.monotonic() - progress.start, 3), "completion_tokens": progress.tokens}
    last_run = "last_run.json" if world_size == 1 else f"last_run.task-{rank:05d}.json"
    atomic_write_json(os.path.join(out_dir, last_run), counts, indent=2)
    return counts


# ----------------------------------------------------------------------------------------------------------------
# --server vllm|sglang


def server_command(kind: str, model: str, port: int, tensor_parallel: int = 1, extra: list[str] | None = None,
                   python: str = sys.executable) -> list[str]:
    """The command that serves ``model`` on 127.0.0.1:``port`` with an OpenAI-compatible API."""
    if kind == "vllm":
        command = ["vllm", "serve", model, "--host", "127.0.0.1", "--port", str(port),
                   "--tensor-parallel-size", str(tensor_parallel), "--served-model-name", model]
    elif kind == "sglang":
        command = [python, "-m", "sglang.launch_server", "--model-path", model, "--host", "127.0.0.1",
                   "--port", str(port), "--tp", str(tensor_parallel), "--served-model-name", model]
    else:
        raise UserError(f"--server {kind!r}: expected one of {', '.join(SERVERS)}")
    return command + list(extra or [])


def start_server(kind: str, model: str, port: int, tensor_parallel: int, log_path: str,
                 ready_timeout_s: float = 1800.0) -> subprocess.Popen:
    """Start a server (guarded: vLLM / SGLang must be installed) and wait until ``/v1/models`` answers."""
    command = server_command(kind, model, port, tensor_parallel)
    present = shutil.which("vllm") if kind == "vllm" else \
        subprocess.run([sys.executable, "-c", "import sglang"], capture_output=True).returncode == 0
    if not present:
        raise UserError(f"--server {kind}: {kind} is not installed here (it needs a CUDA GPU node: "
                        f"`pip install {kind}`); or start a server yourself and pass --endpoint")
    log = open(log_path, "ab")  # noqa: SIM115 - owned by the server process for its lifetime
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UserError(f"--server {kind} exited with status {process.returncode} before it was ready; "
                            f"see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5):
                return process
        except OSError:
            time.sleep(2.0)
    process.terminate()
    raise UserError(f"--server {kind} was not ready after {ready_timeout_s:.0f} s; see {log_path}")
