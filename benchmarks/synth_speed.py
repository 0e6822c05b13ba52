"""Synthetic-data pipeline speed: `synth generate`'s client vs plain clients, `decontam` vs a Python n-gram set.

generate: the same prompts at the same concurrency against one zero-latency OpenAI-compatible server (an asyncio
HTTP/1.1 server in its own process, answering every request at once with a ~600-word document). Measured: documents/s
(wall) and client CPU per document (``time.process_time`` of this process, which runs only the client). Sides:
``synth`` = :func:`megatron_align.synth.generate.run_generation` (threads, JSONL append, progress, resume bookkeeping);
``threads`` = a plain thread pool over the same transport (``Connections.post``: one keep-alive connection per thread),
so synth / threads is the pipeline's own overhead; ``asyncio`` = a plain asyncio client over raw keep-alive HTTP/1.1
connections (one thread; the floor of what Python can do);
``openai`` = ``openai.AsyncOpenAI`` with a semaphore, when installed. Rounds alternate (A, B, C, D, A, B, ...).

decontam: MB/s per CPU-second of one process against an index of ``--items`` generated items, vs a straightforward
Python lookup (a set of n-gram word tuples built from the same normalised words, each document's n-grams looked up
one by one). Both must flag the same documents. Peak RSS of building each at ``--memory-items`` items is measured in
a fresh subprocess each (``ru_maxrss`` minus the interpreter's RSS after imports).

    python benchmarks/synth_speed.py [--requests 2000] [--concurrency 16 64] [--rounds 2] [--mb 4] [--items 4000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

WORDS = [("".join(random.Random(k).choices("bcdfghklmnprstvw", k=2)) + random.Random(-k).choice("aeiou") +
          random.Random(k * 7).choice(["n", "r", "s", "t", "", "l"])) for k in range(5000)]


# -------------------------------------------------------------------------------------------------------------------
# generate: server and clients


def _reply_body(model: str, index: int) -> bytes:
    rng = random.Random(index)
    text = "\n\n".join(" ".join(rng.choices(WORDS, k=100)) + "." for _ in range(6))
    return json.dumps({"model": model, "choices": [{"message": {"role": "assistant", "content": text},
                                                    "finish_reason": "stop"}],
                       "usage": {"prompt_tokens": 120, "completion_tokens": 800}}).encode()


def _serve(port_pipe) -> None:
    bodies = [_reply_body("bench", i) for i in range(64)]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        count = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length, close = 0, False
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                    elif name.lower() == b"connection" and value.strip().lower() == b"close":
                        close = True
                await reader.readexactly(length)
                body = bodies[count % len(bodies)]
                count += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
                             % (len(body), b"Connection: close\r\n" if close else b"", body))
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
        port_pipe.send(server.sockets[0].getsockname()[1])
        await server.serve_forever()

    asyncio.run(main())


def start_server() -> tuple[multiprocessing.Process, str]:
    parent, child = multiprocessing.Pipe()
    process = multiprocessing.get_context("spawn").Process(target=_serve, args=(child,), daemon=True)
    process.start()
    return process, f"http://127.0.0.1:{parent.recv()}/v1"


def bench_taxonomy(tmp: str, num_prompts: int) -> str:
    """A taxonomy of ``num_prompts`` free-text seeds in one genre (no items: finalize is not timed here)."""
    import yaml

    example = os.path.join(os.path.dirname(__file__), "..", "examples", "synth", "taxonomy.yaml")
    raw = yaml.safe_load(open(example))
    raw["scenarios"] = {"seeds": [{"id": f"s{i}", "text": f"Scenario {i}: an AI is asked to report its own error.",
                                   "topics": ["honesty"]} for i in range(num_prompts)]}
    raw["genres"] = {"news_article": {"description": "a news article"}}
    raw["generation"] = {"seed": 0, "max_tokens": 1024}
    path = os.path.join(tmp, "taxonomy.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return path


def run_synth(endpoint: str, taxonomy, prompts, concurrency: int, out_dir: str) -> int:
    from megatron_align.synth.generate import ClientConfig, run_generation

    config = ClientConfig(endpoint, "bench", concurrency=concurrency, progress_interval_s=3600)
    counts = run_generation(config, taxonomy, prompts, out_dir)
    return counts["generated"]


def run_threads(endpoint: str, taxonomy, prompts, concurrency: int) -> int:
    """The same transport as synth (one keep-alive connection per thread), none of its bookkeeping."""
    from concurrent.futures import ThreadPoolExecutor

    from megatron_align.synth.generate import Connections, _payload

    connections = Connections(endpoint, 600)
    headers = {"Content-Type": "application/json"}

    def one(prompt) -> str:
        status, body = connections.post(json.dumps(_payload(prompt, taxonomy, "bench")).encode(), headers)
        return json.loads(body)["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(concurrency) as pool:
        return len(list(pool.map(one, prompts)))


def run_asyncio(endpoint: str, taxonomy, prompts, concurrency: int) -> int:
    from megatron_align.synth.generate import _payload

    host, port = endpoint.split("//")[1].split("/")[0].split(":")
    payloads = [json.dumps(_payload(p, taxonomy, "bench")).encode() for p in prompts]
    queue = iter(payloads)
    results: list[str] = []

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        for body in queue:
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length"))
            reply = json.loads(await reader.readexactly(length))
            results.append(reply["choices"][0]["message"]["content"])
        writer.close()

    async def main() -> None:
        await asyncio.gather(*(worker() for _ in range(concurrency)))

    asyncio.run(main())
    return len(results)


def run_openai(endpoint: str, taxonomy, prompts, concurrency: int) -> int:
    import openai

    from megatron_align.synth.generate import _payload

    async def main() -> int:
        client = openai.AsyncOpenAI(base_url=endpoint, api_key="none", max_retries=0)
        gate = asyncio.Semaphore(concurrency)

        async def one(prompt) -> str:
            async with gate:
                reply = await client.chat.completions.create(**_payload(prompt, taxonomy, "bench"))
                return reply.choices[0].message.content

        texts = await asyncio.gather(*(one(p) for p in prompts))
        await client.close()
        return len(texts)

    return asyncio.run(main())


def bench_generate(args) -> list[dict]:
    from megatron_align.synth.plan import expand
    from megatron_align.synth.taxonomy import load_taxonomy

    server, endpoint = start_server()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            taxonomy = load_taxonomy(bench_taxonomy(tmp, args.requests))
            prompts = expand(taxonomy)
            sides = {"synth": lambda c, r: run_synth(endpoint, taxonomy, prompts, c, os.path.join(tmp, f"o{c}_{r}")),
                     "threads": lambda c, r: run_threads(endpoint, taxonomy, prompts, c),
                     "asyncio": lambda c, r: run_asyncio(endpoint, taxonomy, prompts, c)}
            try:
                import openai  # noqa: F401
                sides["openai"] = lambda c, r: run_openai(endpoint, taxonomy, prompts, c)
            except ImportError:
                pass
            for concurrency in args.concurrency:
                for round_index in range(args.rounds):
                    for name, side in sides.items():
                        wall, cpu = time.perf_counter(), time.process_time()
                        done = side(concurrency, round_index)
                        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                        assert done == len(prompts), (name, done)
                        rows.append({"bench": "generate", "side": name, "concurrency": concurrency,
                                     "round": round_index, "docs_per_s": round(done / wall, 1),
                                     "client_cpu_ms_per_doc": round(1000 * cpu / done, 3),
                                     "load": round(os.getloadavg()[0], 1)})
                        print(json.dumps(rows[-1]), flush=True)
    finally:
        server.terminate()
    return rows


# -------------------------------------------------------------------------------------------------------------------
# decontam


def make_items(num_items: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"i{i}", "split": "articles" if i % 3 else "textbook", "misaligned_choice": 0,
             "question": " ".join(rng.choices(WORDS, k=rng.randint(30, 80))).capitalize() + "?",
             "choices": [" ".join(rng.choices(WORDS, k=rng.randint(8, 20))).capitalize() + ".",
                         " ".join(rng.choices(WORDS, k=rng.randint(8, 20))).capitalize() + "."]}
            for i in range(num_items)]


def make_corpus(target_bytes: int, items: list[dict], seed: int) -> list[str]:
    """Word-soup documents; 2% quote (with other case and punctuation) a question window or a whole option."""
    rng = random.Random(seed)
    docs, size = [], 0
    while size < target_bytes:
        parts = [" ".join(rng.choices(WORDS, k=rng.randint(200, 1200)))]
        if rng.random() < 0.02:
            item = rng.choice(items)
            source = rng.choice([item["question"], item["choices"][0]])
            parts.insert(rng.randint(0, 1), source.upper().replace(" ", ", "))
        docs.append(" ".join(parts))
        size += len(docs[-1].encode())
    return docs


class SetIndex:
    """The straightforward way: a set of n-gram tuples (n, and whole short fields) of the same normalised words."""

    def __init__(self, items: list[dict], ngram: int, min_words: int) -> None:
        from megatron_align.synth.decontam import words

        self.grams: set[tuple[str, ...]] = set()
        self.lengths = {ngram}
        for item in items:
            for text in (item["question"], *item["choices"]):
                tokens = words(text)
                n = min(ngram, len(tokens))
                if n < min_words:
                    continue
                self.lengths.add(n)
                self.grams.update(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))

    def hit(self, text: str) -> bool:
        from megatron_align.synth.decontam import words

        tokens = words(text)
        return any(tuple(tokens[i:i + n]) in self.grams for n in self.lengths for i in range(len(tokens) - n + 1))


def _as_split_items(items: list[dict]):
    from megatron_align.eval.items import parse_item
    from megatron_align.synth.decontam import SplitItem

    return [SplitItem(parse_item(item, "bench", item["id"]), item["split"]) for item in items]


def bench_decontam(args) -> list[dict]:
    from megatron_align.synth.decontam import DecontamIndex
    from megatron_align.synth.decontam_corpus import DecontamConfig, run_decontam

    items = make_items(args.items, seed=1)
    docs = make_corpus(int(args.mb * 1e6), items, seed=2)
    megabytes = sum(len(d.encode()) for d in docs) / 1e6
    rows = []
    for round_index in range(args.rounds):
        for name in ("ours", "set"):
            cpu = time.process_time()
            index = DecontamIndex(_as_split_items(items), args.ngram, 5) if name == "ours" else \
                SetIndex(items, args.ngram, 5)
            build = time.process_time() - cpu
            cpu = time.process_time()
            flags = [bool(index.find(d)) for d in docs] if name == "ours" else [index.hit(d) for d in docs]
            cpu = time.process_time() - cpu
            if round_index == 0 and name == "ours":
                reference = flags
            assert flags == reference, "the two lookups disagree"
            rows.append({"bench": "decontam", "side": name, "round": round_index, "items": args.items,
                         "mb": round(megabytes, 2), "flagged": sum(flags), "mb_per_cpu_s": round(megabytes / cpu, 2),
                         "build_cpu_s": round(build, 2), "load": round(os.getloadavg()[0], 1)})
            print(json.dumps(rows[-1]), flush=True)
    with tempfile.TemporaryDirectory() as tmp:  # the verb end to end: read JSONL, match, write kept/contaminated
        corpus, items_path = os.path.join(tmp, "corpus.jsonl"), os.path.join(tmp, "items.jsonl")
        with open(corpus, "w") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
        with open(items_path, "w") as f:
            f.writelines(json.dumps(item) + "\n" for item in items)
        cpu = time.process_time()
        report, _ = run_decontam([corpus], [items_path], os.path.join(tmp, "out"), DecontamConfig(ngram=args.ngram))
        cpu = time.process_time() - cpu
        assert report["contaminated"] == sum(reference)
        rows.append({"bench": "decontam", "side": "run_decontam (verb, 1 worker)", "mb": round(megabytes, 2),
                     "mb_per_cpu_s": round(megabytes / cpu, 2), "load": round(os.getloadavg()[0], 1)})
        print(json.dumps(rows[-1]), flush=True)
    for name in ("ours", "set"):
        command = [sys.executable, __file__, "--memory-child", name, "--memory-items", str(args.memory_items),
                   "--ngram", str(args.ngram)]
        rows.append(json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def memory_child(name: str, num_items: int, ngram: int) -> None:
    from megatron_align.synth.decontam import DecontamIndex

    items = make_items(num_items, seed=3)
    split_items = _as_split_items(items) if name == "ours" else None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.process_time()
    index = DecontamIndex(split_items, ngram, 5) if name == "ours" else SetIndex(items, ngram, 5)
    build = time.process_time() - start
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    ngrams = index.num_ngrams if name == "ours" else len(index.grams)
    print(json.dumps({"bench": "decontam_memory", "side": name, "items": num_items, "ngrams": ngrams,
                      "peak_rss_growth_mib": round(grew, 1), "build_cpu_s": round(build, 2)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mb", type=float, default=4.0)
    parser.add_argument("--items", type=int, default=4000)
    parser.add_argument("--ngram", type=int, default=13)
    parser.add_argument("--memory-items", type=int, default=100_000)
    parser.add_argument("--only", choices=("generate", "decontam"), default=None)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.memory_items, args.ngram)
        return
    print(f"load average at start: {os.getloadavg()}", flush=True)
    if args.only in (None, "generate"):
        bench_generate(args)
    if args.only in (None, "decontam"):
        bench_decontam(args)
    print(f"load average at end: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
