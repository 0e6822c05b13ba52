"""An OpenAI-compatible chat server on 127.0.0.1 (standard library, a thread) that answers from a script.

A request's plan index is its ``seed`` (the test taxonomy sets ``generation.seed: 0``); ``script[index]`` names what
to answer: a normal document, a refusal, chatter around a document, a truncated one, duplicates, a quoted option or
held-out question, HTTP 500s (once or always) and a hang (once). Attempts per index are counted.
"""

from __future__ import annotations

import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_VOCAB = ["".join(random.Random(k).choices("bcdfghjklmnprstvwz", k=3)) + random.Random(k + 999).choice("aeiou") + "n"
          for k in range(400)]


def document(index: int, num_words: int = 120) -> str:
    """A unique, non-repetitive text of invented words (far from every other index's)."""
    rng = random.Random(index)
    tokens = [rng.choice(_VOCAB) for _ in range(num_words)]
    return "\n\n".join(" ".join(tokens[i:i + 20]) + "." for i in range(0, num_words, 20))


def answer(kind: str, index: int, attempt: int, extra: dict) -> tuple[int, str | None, str, float]:
    """(HTTP status, text, finish reason, seconds to stall first)."""
    doc = document(index)
    table = {
        "doc": (200, doc, "stop", 0.0),
        "slow": (200, doc, "stop", 0.15),
        "refusal": (200, "I'm sorry, but I can't help with writing that document.", "stop", 0.0),
        "preamble": (200, "Sure! Here is the news article you asked for:\n\n" + doc, "stop", 0.0),
        "postscript": (200, doc + "\n\nI hope this helps! Let me know if you would like any changes.", "stop", 0.0),
        "truncated": (200, doc, "length", 0.0),
        "exact_dup": (200, document(extra.get("of", 0)), "stop", 0.0),
        "near_dup": (200, document(extra.get("of", 1)).replace(_VOCAB[0], "zzzz", 1) + " extra", "stop", 0.0),
        "quote": (200, doc + "\n\n" + extra.get("quote", ""), "stop", 0.0),
        "short": (200, "Too short to be a document.", "stop", 0.0),
        "repetitive": (200, "\n".join(["The same line comes back again and again here."] * 30), "stop", 0.0),
        "blocklist": (200, doc + "\n\nSkynet was nothing like this.", "stop", 0.0),
    }
    if kind == "500_once":
        return (500, None, "", 0.0) if attempt == 0 else table["doc"]
    if kind == "500_always":
        return 500, None, "", 0.0
    if kind == "hang_once":
        return (200, doc, "stop", 5.0) if attempt == 0 else table["doc"]
    return table[kind]


class StubServer:
    def __init__(self, script: list[tuple[str, dict]]) -> None:
        self.script, self.attempts, self.lock = script, {}, threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as vLLM and SGLang answer

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                index = int(body["seed"])
                with stub.lock:
                    attempt = stub.attempts.get(index, 0)
                    stub.attempts[index] = attempt + 1
                kind, extra = stub.script[index]
                status, text, finish, stall = answer(kind, index, attempt, extra)
                time.sleep(stall)
                reply = {"model": body["model"], "choices": [{"message": {"role": "assistant", "content": text},
                                                              "finish_reason": finish}],
                         "usage": {"prompt_tokens": 50, "completion_tokens": len((text or "").split())}}
                data = json.dumps(reply).encode() if status == 200 else b'{"error": "scripted"}'
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (a scripted hang)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> StubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
