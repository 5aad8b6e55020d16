"""The openai engine against a real HTTP server on 127.0.0.1 (no vLLM needed).

The server is ``tests/standin_server.py``: the shipped tiny student served
through the hf engine behind vLLM's completions API, with faults on cue. So
"same tokens as the hf engine" checks the plumbing (ids in, ids out, stop
token, finish reason, text), and the rest checks what the engine does when
the server does not behave: retries with backoff, a clear error when it gives
up, request-level resume, the concurrency limit, and the API key staying out
of every file and log line. ``tests/test_engine_vllm.py`` repeats the first
checks against a real vLLM server.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from engines.base import EngineUnavailableError, GenerationParams
from engines.config import EngineConfig
from engines.hf import HFEngine, load_hf_engine
from engines.openai import OpenAIEngine
from engines.openai_http import EngineGaveUpError, EngineRefusedError
from tasks.engines import engine_for
from tasks.generation import chat_prompt
from tests.conftest import REPO, free_port
from tests.standin_server import StandInServer
from world import build_problems

STUDENT = REPO / "world" / "assets" / "student"
KEY = "sk-test-5b1e7c0d9a-never-write-me"


@pytest.fixture(scope="module")
def hf() -> HFEngine:
    return load_hf_engine(STUDENT, device="cpu")


@pytest.fixture(scope="module")
def server(hf: HFEngine) -> Iterator[StandInServer]:
    srv = StandInServer(hf).start()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _healthy(server: StandInServer) -> None:
    server.reset()


@pytest.fixture(scope="module")
def prompts(hf: HFEngine) -> list[list[int]]:
    records = build_problems(3, 8, 0, 0, difficulty=1)
    return [chat_prompt(hf.tokenizer, r["prompt"]) for r in records]


def engine(server: StandInServer, hf: HFEngine, **kw) -> OpenAIEngine:
    opts = {"model": "tiny", "model_vocab": 832, "retry_backoff_s": 0.05, **kw}
    return OpenAIEngine(server.base_url, hf.tokenizer, **opts)


def greedy(hf: HFEngine, max_tokens: int = 48, n: int = 1) -> GenerationParams:
    eos = hf.tokenizer.eos_token_id
    return GenerationParams(n=n, temperature=0, max_tokens=max_tokens, stop_token_ids=(eos,))


def rows(out) -> list[list[tuple]]:
    return [[(c.token_ids, c.text, c.finish_reason) for c in row] for row in out]


# -- the same results as the hf engine ---------------------------------------------------------
def test_generation_matches_hf(server, hf, prompts) -> None:
    eng = engine(server, hf)
    params = greedy(hf, max_tokens=200)  # the first trace ends at 179 tokens, the rest do not
    out = eng.generate(prompts, params)
    assert rows(out) == rows(hf.generate(prompts, params))
    assert {c.finish_reason for row in out for c in row} == {"stop", "length"}
    assert all(len(b["prompt"]) and b["max_tokens"] == 200 for b in server.bodies)
    sampled = GenerationParams(n=2, temperature=1.0, max_tokens=16, seed=5)
    first = eng.generate(prompts[:3], sampled)
    assert rows(first) == rows(eng.generate(prompts[:3], sampled))  # seeded per request
    assert [[(c.prompt_index, c.sample_idx) for c in r] for r in first] == [
        [(p, 0), (p, 1)] for p in range(3)
    ]


def test_score_matches_hf(server, hf, prompts) -> None:
    targets = [p[3:20] for p in reversed(prompts[:4])]
    got = engine(server, hf).score(prompts[:4], targets, top_k=6)
    for a, b in zip(got, hf.score(prompts[:4], targets, top_k=6), strict=True):
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        # the server scores one unpadded row, the reference a padded batch: float32 rounding
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-4)
        np.testing.assert_allclose(a.target_logprobs, b.target_logprobs, atol=1e-4)
    (body,) = server.bodies[:1]
    assert body["echo"] is True and body["prompt_logprobs"] >= 6


def test_top_k_above_max_logprobs(server, hf, prompts) -> None:
    with pytest.raises(EngineUnavailableError, match="max_logprobs=8"):
        engine(server, hf, max_logprobs=8).score(prompts[:1], [prompts[1][:4]], top_k=16)


def test_called_from_inside_an_event_loop(server, hf, prompts) -> None:
    """A caller that already runs an event loop (a notebook, an async flow) still gets results."""
    import asyncio

    async def caller() -> list:
        return engine(server, hf).generate(prompts[:2], greedy(hf, max_tokens=8))

    assert rows(asyncio.run(caller())) == rows(hf.generate(prompts[:2], greedy(hf, max_tokens=8)))


# -- retries and errors -----------------------------------------------------------------------
def test_retries_429_500_and_dropped_connections(server, hf, prompts) -> None:
    server.reset(faults=["429", "500", "drop"])
    started = time.monotonic()
    out = engine(server, hf, max_retries=3).generate(prompts[:1], greedy(hf))
    assert time.monotonic() - started >= 0.05 + 0.1 + 0.2  # backoff doubles each time
    assert server.requests == 4
    assert rows(out) == rows(hf.generate(prompts[:1], greedy(hf)))


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_gives_up_after_max_retries(server, hf, prompts) -> None:
    server.reset(faults=["503"] * 10)
    with pytest.raises(EngineGaveUpError) as exc:
        engine(server, hf, max_retries=2).generate(prompts[:1], greedy(hf))
    msg = one_line(exc)
    assert server.base_url + "/completions" in msg and "HTTP 503" in msg and "3 attempt" in msg
    assert server.requests == 3


def test_client_errors_are_not_retried(server, hf, prompts) -> None:
    with pytest.raises(EngineRefusedError) as exc:
        engine(server, hf, model="no-such-model").generate(prompts[:1], greedy(hf))
    assert "HTTP 404" in one_line(exc) and "no-such-model" in str(exc.value)
    assert server.requests == 1


def test_connection_refused(hf, prompts) -> None:
    port = free_port()
    eng = OpenAIEngine(
        f"http://127.0.0.1:{port}/v1", hf.tokenizer, model="tiny", max_retries=2,
        retry_backoff_s=0.01,
    )  # fmt: skip
    with pytest.raises(EngineGaveUpError) as exc:
        eng.generate(prompts[:1], greedy(hf))
    msg = one_line(exc)
    assert f"127.0.0.1:{port}" in msg and "cannot connect" in msg and "3 attempt" in msg


def test_server_that_comes_up_late(hf, prompts) -> None:
    """Connection refused is retried: a server starting while the stage waits is picked up."""
    port = free_port()
    late = StandInServer(hf, port=port)
    timer = threading.Timer(0.4, late.start)
    timer.start()
    try:
        eng = OpenAIEngine(
            late.base_url, hf.tokenizer, model="tiny", max_retries=6, retry_backoff_s=0.1
        )
        out = eng.generate(prompts[:2], greedy(hf))
    finally:
        timer.join()
        late.stop()
    assert rows(out) == rows(hf.generate(prompts[:2], greedy(hf)))


@pytest.mark.parametrize("mode", ["ignore", "reject"])
def test_server_without_prompt_logprobs(server, hf, prompts, mode: str) -> None:
    server.reset(logprobs=mode)
    with pytest.raises(EngineUnavailableError) as exc:
        engine(server, hf).score(prompts[:1], [prompts[1][:5]], top_k=4)
    assert "prompt_logprobs" in one_line(exc) and server.base_url in str(exc.value)


# -- request-level resume ---------------------------------------------------------------------
def test_request_level_resume(server, hf, prompts, tmp_path: Path) -> None:
    """An outage after 5 replies; the restarted call sends only the 11 requests left."""
    params = GenerationParams(n=2, temperature=1.0, max_tokens=24, seed=9)
    reference = engine(server, hf).generate(prompts, params)
    journal = tmp_path / ".part-00000.requests.jsonl"
    server.reset(fail_after=5)
    eng = engine(server, hf, max_retries=0, max_concurrency=1)
    with pytest.raises(EngineGaveUpError):
        eng.generate(prompts, params, journal=journal)
    assert len(journal.read_text().splitlines()) == 5
    with open(journal, "a") as fh:
        fh.write('{"i": 7, "h": "torn')  # a write cut short by kill -9
    server.reset()
    progress: list[tuple[int, int]] = []
    out = eng.generate(prompts, params, lambda d, t: progress.append((d, t)), journal=journal)
    assert server.requests == 16 - 5 and eng.last_call == {"requests": 11, "resumed": 5}
    assert rows(out) == rows(reference)
    assert progress[-1] == (8, 8) and len(progress) == 8 - 2  # prompts 0-1 were done before
    # the same journal under other inputs: nothing reused, nothing mixed in
    server.reset()
    eng.generate(prompts, GenerationParams(n=2, temperature=1.0, max_tokens=24, seed=10), journal=journal)  # fmt: skip
    assert server.requests == 16


def test_journal_dir_is_removed_after_a_call(server, hf, prompts, tmp_path: Path) -> None:
    eng = engine(server, hf, journal_dir=tmp_path / "requests")
    server.reset(fail_after=3)
    with pytest.raises(EngineGaveUpError):
        failing = engine(server, hf, journal_dir=tmp_path / "requests", max_retries=0)
        failing.max_concurrency = 1  # replies arrive in order: exactly 3 succeed
        failing.generate(prompts, greedy(hf))
    assert len(list((tmp_path / "requests").iterdir())) == 1
    server.reset()
    eng.generate(prompts, greedy(hf))
    assert server.requests == len(prompts) - 3
    assert list((tmp_path / "requests").iterdir()) == []


def test_concurrency_limit(server, hf, prompts) -> None:
    server.reset(delay_s=0.3)
    engine(server, hf, max_concurrency=3).generate(prompts, greedy(hf, max_tokens=4))
    assert server.max_in_flight == 3 and server.requests == len(prompts)


# -- the API key ------------------------------------------------------------------------------
def test_api_key_is_never_written(server, hf, prompts, tmp_path, monkeypatch, caplog) -> None:
    """Sent as a bearer token; absent from the journal, logs, errors and the resolved config."""
    from flows.config import dump_config, validate

    monkeypatch.setenv("MPD_TEST_API_KEY", KEY)
    logfile = tmp_path / "run.log"
    handler = logging.FileHandler(logfile)
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.DEBUG)  # httpx and httpcore log every request at DEBUG
    caplog.set_level(logging.DEBUG)
    try:
        server.reset(api_key=KEY, error_text=f" (key was {KEY})")
        eng = engine(server, hf, api_key_env="MPD_TEST_API_KEY", max_retries=1)
        eng.generate(prompts[:3], greedy(hf), journal=tmp_path / "gen.jsonl")
        eng.score(prompts[:2], [prompts[3][:6], prompts[4][:6]], 4, journal=tmp_path / "s.jsonl")
        server.reset(api_key=KEY, faults=["500"] * 4, error_text=f" (key was {KEY})")
        with pytest.raises(EngineGaveUpError) as exc:
            eng.generate(prompts[:1], greedy(hf))
        assert "***" in str(exc.value)  # the server echoed the key; the engine masked it
        monkeypatch.setenv("MPD_TEST_API_KEY", "wrong")
        server.reset(api_key=KEY)
        with pytest.raises(EngineRefusedError, match="HTTP 401"):
            engine(server, hf, api_key_env="MPD_TEST_API_KEY").generate(prompts[:1], greedy(hf))
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(old_level)
    cfg = validate({"engines": {"teacher": openai_cfg(server, api_key_env="MPD_TEST_API_KEY")}})
    (tmp_path / "run.yaml").write_text(dump_config(cfg))
    texts = [p.read_text() for p in tmp_path.rglob("*") if p.is_file()]
    assert len(texts) == 4 and logfile.stat().st_size > 0
    for text in [*texts, caplog.text, str(exc.value), repr(eng)]:
        assert KEY not in text


def test_missing_key_variable(server, hf, monkeypatch) -> None:
    monkeypatch.delenv("MPD_NO_SUCH_KEY", raising=False)
    with pytest.raises(EngineUnavailableError, match=r"MPD_NO_SUCH_KEY.*not set"):
        engine(server, hf, api_key_env="MPD_NO_SUCH_KEY")


# -- wiring -----------------------------------------------------------------------------------
def openai_cfg(server: StandInServer, **kw) -> dict:
    return {"kind": "openai", "base_url": server.base_url, "served_model_name": "tiny", **kw}


def test_engine_for_builds_an_openai_engine(server, hf, prompts) -> None:
    cfg = EngineConfig.model_validate(openai_cfg(server, retry_backoff_s=0.01))
    eng = engine_for(cfg, STUDENT, dtype="float32", device="cpu")
    assert isinstance(eng, OpenAIEngine) and eng.vocab_limit == len(hf.tokenizer) == 805
    assert rows(eng.generate(prompts[:2], greedy(hf))) == rows(hf.generate(prompts[:2], greedy(hf)))
    with pytest.raises(ValueError, match="base_url"):
        EngineConfig(kind="openai")
