"""A stand-in for a vLLM OpenAI-compatible server, for tests that must run without vLLM.

It serves the shipped tiny student through the ``hf`` engine on 127.0.0.1 with
the part of vLLM's ``/v1/completions`` API the openai engine uses: token-id
prompts, ``seed``, ``stop_token_ids``, ``return_token_ids`` and ``echo`` +
``prompt_logprobs``. On top it can misbehave on cue (429, 5xx, dropped
connections, slow replies, no or refused ``prompt_logprobs``) and counts what it
sees, so retry, resume and concurrency behaviour are checked against a real
socket and a real HTTP stack, not a mock.

This is not vLLM: ``tests/test_engine_vllm.py`` runs the same engine against
the real thing when ``.venv-vllm`` exists.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

from engines.base import GenerationParams
from engines.hf import HFEngine


@dataclass
class Behaviour:
    """How the server answers; a test sets it with :meth:`StandInServer.reset`."""

    faults: list[str] = field(default_factory=list)  # one per request: 429, 500, 503, drop, ok
    fail_after: int | None = None  # after this many good replies, every request gets a 500
    delay_s: float = 0.0  # per request, while counted as in flight
    logprobs: Literal["vllm", "ignore", "reject"] = "vllm"  # how prompt_logprobs is handled
    api_key: str | None = None  # required bearer token
    error_text: str = ""  # appended to every error message (a server that echoes secrets)


class StandInServer:
    """The tiny model behind an HTTP server in a thread; ``base_url`` ends in ``/v1``."""

    def __init__(self, engine: HFEngine, model: str = "tiny", port: int = 0) -> None:
        self.engine, self.model = engine, model
        self.behaviour = Behaviour()
        self.lock, self.model_lock = threading.Lock(), threading.Lock()
        self.requests = self.ok = self.in_flight = self.max_in_flight = 0
        self.bodies: list[dict] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def start(self) -> StandInServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def reset(self, **behaviour: Any) -> None:
        with self.lock:
            self.behaviour = Behaviour(**behaviour)
            self.requests = self.ok = self.in_flight = self.max_in_flight = 0
            self.bodies = []

    # -- what a request gets ------------------------------------------------------
    def fault(self) -> str:
        with self.lock:
            self.requests += 1
            b = self.behaviour
            if b.faults:
                return b.faults.pop(0)
            if b.fail_after is not None and self.ok >= b.fail_after:
                return "500"
            return "ok"

    def complete(self, body: dict) -> tuple[int, dict]:
        """(status, JSON reply) for one completions request."""
        b = self.behaviour
        if body.get("model") != self.model:
            return 404, _error(f"The model `{body.get('model')}` does not exist.{b.error_text}")
        wants_plp = body.get("prompt_logprobs") is not None
        if wants_plp and b.logprobs == "reject":
            return 400, _error("prompt_logprobs: Extra inputs are not permitted")
        prompt = [int(t) for t in body["prompt"]]
        params = GenerationParams(
            temperature=float(body.get("temperature", 1.0)),
            top_p=float(body.get("top_p", 1.0)),
            max_tokens=int(body.get("max_tokens", 16)),
            seed=int(body.get("seed") or 0),
            stop_token_ids=tuple(body.get("stop_token_ids") or ()),
        )
        with self.model_lock:
            (c,) = self.engine.generate([prompt], params)[0]
            plp = self.prompt_logprobs(prompt, int(body["prompt_logprobs"])) if wants_plp else None
        choice: dict[str, Any] = {
            "index": 0,
            "text": c.text,
            "token_ids": c.token_ids if body.get("return_token_ids") else None,
            "finish_reason": c.finish_reason,
        }
        if b.logprobs == "vllm":
            choice["prompt_logprobs"] = plp
        return 200, {"id": "cmpl-0", "object": "text_completion", "choices": [choice]}

    def prompt_logprobs(self, prompt: list[int], k: int) -> list[dict | None]:
        """vLLM's format: None for the first token, then {id: {logprob, rank}} per position."""
        (s,) = self.engine.score([prompt[:1]], [prompt[1:]], top_k=k)
        out: list[dict | None] = [None]
        for t, token in enumerate(prompt[1:]):
            entry = {
                str(int(i)): {"logprob": float(v), "rank": r + 1, "decoded_token": None}
                for r, (i, v) in enumerate(zip(s.topk_ids[t], s.topk_logprobs[t], strict=True))
            }
            # vLLM adds the actual token with its true rank; below the top k is all we need
            entry.setdefault(str(token), {"logprob": float(s.target_logprobs[t]), "rank": k + 1})
            out.append(entry)
        return out


def _error(message: str) -> dict:
    return {"error": {"message": message, "type": "BadRequestError"}}


def _handler(server: StandInServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as vLLM's uvicorn does

        def log_message(self, *args: Any) -> None:  # quiet: tests read their own output
            pass

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            fault = server.fault()
            b = server.behaviour
            if fault == "drop":  # hang up without a reply: a crashed or restarting server
                self.close_connection = True
                return
            if b.api_key and self.headers.get("Authorization") != f"Bearer {b.api_key}":
                self.reply(401, _error("Unauthorized"))
                return
            if fault != "ok":
                self.reply(int(fault), _error(f"injected {fault}{b.error_text}"))
                return
            if self.path != "/v1/completions":
                self.reply(404, _error(f"no route {self.path}"))
                return
            with server.lock:
                server.in_flight += 1
                server.max_in_flight = max(server.max_in_flight, server.in_flight)
            try:
                time.sleep(b.delay_s)
                body = json.loads(raw)
                status, reply = server.complete(body)
            finally:
                with server.lock:
                    server.in_flight -= 1
            with server.lock:
                server.bodies.append(body)
                server.ok += status == 200
            self.reply(status, reply)

        def reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 429:
                self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(data)

    return Handler
