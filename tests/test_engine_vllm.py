"""The vllm engine and a real vLLM server against the hf engine, on the shipped tiny student.

Needs ``.venv-vllm`` (``make vllm-env``; or MPD_VLLM_PYTHON naming an interpreter
with vLLM); without it these tests skip and say so. One offline vLLM (the
engine's worker) and one ``vllm.entrypoints.openai.api_server`` start per
module, side by side (~40-70 s each on two cores); a third vLLM starts inside
the stage that the kill test kills.

What is compared, and how closely:

- greedy tokens, finish reasons and texts: equal to the hf engine's;
- scoring: the same top-k ids; logprobs renormalised over those k ids (what the
  top-k loss uses) within 1e-4; raw logprobs within 6e-3, because vLLM
  normalises over all 832 output rows of the model and hf over the tokenizer's
  805 (the padding rows hold at most 0.56% of this model's mass, -log(1 -
  0.0056) = 5.6e-3: see ``engines/remote.py``);
- a stage killed with SIGKILL (its vLLM worker dies with it), or interrupted
  while talking to the server, resumes to the same rows as a clean run, with
  none missing or repeated, and the server run's files never hold the API key.
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data.errors import is_retried, kind_of
from engines.base import EngineUnavailableError, GenerationParams
from engines.config import EngineConfig
from engines.hf import HFEngine, load_hf_engine
from engines.openai import OpenAIEngine
from engines.vllm import VLLMEngine, _replica_env, load_vllm_engine
from engines.vllm_proc import WorkerRefusedError
from tasks.engines import engine_for
from tasks.generation import chat_prompt
from tests.conftest import REPO, free_port, stop_process_tree
from tests.stage_runner import PROBLEMS, SAMPLES_PER_PROBLEM, STUDENT, run_sample_stage

VLLM_PYTHON = Path(os.environ.get("MPD_VLLM_PYTHON") or REPO / ".venv-vllm" / "bin" / "python")
SKIP_REASON = (
    f"needs vLLM at {VLLM_PYTHON}: run `make vllm-env` (~3 min, 3.4 GB) "
    "or set MPD_VLLM_PYTHON to a Python that has vLLM"
)


def _has_vllm() -> bool:
    """The interpreter exists and can find vllm (a half-finished install must skip, not fail)."""
    if not VLLM_PYTHON.exists():
        return False
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    return subprocess.run([str(VLLM_PYTHON), "-c", probe], capture_output=True).returncode == 0


HAVE_VLLM = _has_vllm()
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason=SKIP_REASON)
CPU = {  # FACTS.md: the settings vLLM's CPU build needs on a 2-core, no-GPU machine
    "python": str(VLLM_PYTHON),
    "enforce_eager": True,
    "max_model_len": 1024,
    "gpu_memory_utilization": 0.3,
    "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
}
KEY = "sk-vllm-test-3f9d27c1-never-write-me"
KEY_ENV = "MPD_TEST_VLLM_KEY"


# -- no vLLM needed: the mistakes a user makes -----------------------------------------------
def test_missing_interpreter_is_one_line(tmp_path: Path) -> None:
    cfg = EngineConfig(kind="vllm", python=str(tmp_path / "nowhere" / "python"))
    with pytest.raises(EngineUnavailableError) as exc:
        engine_for(cfg, STUDENT, dtype="float32", device="cpu")
    assert "\n" not in str(exc.value) and "make vllm-env" in str(exc.value)


def test_interpreter_without_vllm(tmp_path: Path) -> None:
    """The test interpreter has no vLLM: the worker says so, in one line, and exits. The user's
    to fix (the engine's python:), never retried: a retry would start the same interpreter."""
    with pytest.raises(WorkerRefusedError) as exc:
        load_vllm_engine(STUDENT, EngineConfig(kind="vllm", python=sys.executable), dtype="float32")
    msg = str(exc.value)
    assert "\n" not in msg and "cannot import vllm" in msg and sys.executable in msg
    assert kind_of(exc.value) == "user" and not is_retried(exc.value)


def test_lora_adapter_is_refused(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(EngineUnavailableError, match="LoRA adapter"):
        load_vllm_engine(
            tmp_path, EngineConfig(kind="vllm", python=sys.executable), dtype="float32"
        )


def test_replicas_get_their_own_gpus(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    monkeypatch.setenv("PYTHONPATH", "/our/site-packages")
    envs = [_replica_env({"X": "1"}, r, tp=2, dp=2) for r in range(2)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["4,5", "6,7"]
    assert all(e["X"] == "1" and "PYTHONPATH" not in e for e in envs)
    assert _replica_env({}, 0, tp=2, dp=1)["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"


# -- fixtures: one offline vLLM, one vLLM server ----------------------------------------------
@pytest.fixture(scope="module")
def server_proc(tmp_path_factory) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    """``vllm serve`` (by module path: the vllm-cpu distribution breaks the CLI entry point)."""
    if not HAVE_VLLM:
        pytest.skip(SKIP_REASON)
    port, log = free_port(), tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_API_KEY": KEY}
    env.pop("PYTHONPATH", None)
    args = ["--model", str(STUDENT), "--served-model-name", "tiny", "--dtype", "float32"]
    args += ["--enforce-eager", "--max-model-len", "1024", "--gpu-memory-utilization", "0.3"]
    args += ["--max-logprobs", "64", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    yield proc, f"http://127.0.0.1:{port}", log
    stop_process_tree(proc)


@pytest.fixture(scope="module")
def hf() -> HFEngine:
    return load_hf_engine(STUDENT, device="cpu")


@pytest.fixture(scope="module")
def prompts(hf: HFEngine) -> list[list[int]]:
    from world import build_problems

    return [chat_prompt(hf.tokenizer, r["prompt"]) for r in build_problems(3, 8, 0, 0, 1)]


@pytest.fixture(scope="module")
def offline(server_proc, prompts) -> Iterator[VLLMEngine]:
    """Starts while the server (already launched by ``server_proc``) loads too."""
    eng = load_vllm_engine(STUDENT, EngineConfig(kind="vllm", **CPU), dtype="float32")
    eng.score(prompts[:1], [prompts[1][:4]], top_k=4)  # the first logprobs request is slow
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def served(server_proc, hf, prompts, monkeypatch_module) -> OpenAIEngine:
    proc, url, log = server_proc
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            time.sleep(1)
    else:
        pytest.fail(f"vLLM server not healthy: {log.read_text()[-2000:]}")
    monkeypatch_module.setenv(KEY_ENV, KEY)
    eng = OpenAIEngine(
        f"{url}/v1", hf.tokenizer, model="tiny", model_vocab=832, api_key_env=KEY_ENV
    )
    eng.score(prompts[:1], [prompts[1][:4]], top_k=4)  # warm-up
    return eng


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def rows(out) -> list[list[tuple]]:
    return [[(c.token_ids, c.text, c.finish_reason) for c in row] for row in out]


# -- the same results as the hf engine ---------------------------------------------------------
@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("which", ["offline", "served"])
def test_greedy_matches_hf(which: str, request, hf, prompts) -> None:
    eng = request.getfixturevalue(which)
    params = GenerationParams(temperature=0, max_tokens=200, stop_token_ids=(2,))
    out = eng.generate(prompts, params)
    assert rows(out) == rows(hf.generate(prompts, params))
    assert {c.finish_reason for row in out for c in row} == {"stop", "length"}


@needs_vllm
@pytest.mark.slow
@pytest.mark.parametrize("which", ["offline", "served"])
def test_scores_match_hf(which: str, request, hf, prompts) -> None:
    eng = request.getfixturevalue(which)
    targets = [p[3:40] for p in reversed(prompts)]
    got, ref = eng.score(prompts, targets, top_k=8), hf.score(prompts, targets, top_k=8)
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=6e-3)
        np.testing.assert_allclose(a.target_logprobs, b.target_logprobs, atol=6e-3)
        for pos in range(len(a.topk_ids)):
            assert_same_topk(a, b, pos, tie=6e-3)
        same = (a.topk_ids == b.topk_ids).all(axis=1)
        x, y = (
            s.topk_logprobs - np.logaddexp.reduce(s.topk_logprobs, 1, keepdims=True) for s in (a, b)
        )
        np.testing.assert_allclose(x[same], y[same], atol=3e-4)  # renormalised over the k ids


def assert_same_topk(a, b, pos: int, tie: float) -> None:
    """The same top-k ids in the same order, except where two logprobs are within ``tie``:
    the float kernels of two engines may order near-ties either way (and swap which of two
    tied ids is k-th)."""
    la = dict(zip(a.topk_ids[pos].tolist(), a.topk_logprobs[pos].tolist(), strict=True))
    lb = dict(zip(b.topk_ids[pos].tolist(), b.topk_logprobs[pos].tolist(), strict=True))
    for i in la.keys() & lb.keys():
        assert abs(la[i] - lb[i]) <= tie, (pos, i, la[i], lb[i])
    kth = min(min(la.values()), min(lb.values()))
    for i in la.keys() ^ lb.keys():  # only at the boundary, tied with the k-th
        assert abs((la[i] if i in la else lb[i]) - kth) <= 2 * tie, (pos, i, la, lb)
    for j, (ia, ib) in enumerate(zip(a.topk_ids[pos], b.topk_ids[pos], strict=True)):
        if ia != ib:  # a swap of neighbours with (nearly) the same logprob
            assert abs(a.topk_logprobs[pos][j] - b.topk_logprobs[pos][j]) <= tie, (pos, j)


@needs_vllm
@pytest.mark.slow
def test_sampling_is_seeded_per_request(offline, prompts) -> None:
    params = GenerationParams(n=2, temperature=1.0, max_tokens=32, seed=4)
    six = offline.generate(prompts[:6], params)
    assert rows(six[:3]) == rows(offline.generate(prompts[:3], params))  # batch-independent
    assert all(max(c.token_ids) < 805 for row in six for c in row)
    other = offline.generate(prompts[:6], GenerationParams(n=2, max_tokens=32, seed=5))
    assert rows(other) != rows(six)


# -- a stage killed mid-way resumes -------------------------------------------------------------
def start_stage(workspace: Path, engine_cfg: dict, log: Path) -> tuple[subprocess.Popen, list[int]]:
    """The stage in a subprocess; returns it and its engine's worker pids once it is up."""
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.stage_runner", str(workspace), json.dumps(engine_cfg)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 300)
    line = proc.stdout.readline().decode() if ready else ""
    if not line.startswith("engine-ready"):
        stop_process_tree(proc)
        pytest.fail(f"stage runner did not start: {line!r} {log.read_text()[-2000:]}")
    return proc, [int(p) for p in line.split()[1:]]


def kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the stage finished before it could be killed"
        assert time.monotonic() < deadline, "the stage made no progress"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def shards_done(workspace: Path) -> int:
    return len(list((workspace / ".staging" / "sample").glob("round=1/*/_shards/*.json")))


def gone(pid: int) -> bool:
    """Not running (exited, or a zombie nobody has reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in {"Z", "X"}


def table(result) -> dict[tuple[str, int], list[int]]:
    t = pq.read_table(result.path, columns=["problem_id", "sample_idx", "token_ids"]).to_pylist()
    keys = [(r["problem_id"], r["sample_idx"]) for r in t]
    assert len(keys) == len(set(keys)) == PROBLEMS * SAMPLES_PER_PROBLEM  # none missing or twice
    return {(r["problem_id"], r["sample_idx"]): r["token_ids"] for r in t}


@needs_vllm
@pytest.mark.slow
def test_killed_vllm_stage_resumes(offline, tmp_path: Path) -> None:
    ws = tmp_path / "killed"
    proc, workers = start_stage(ws, {"kind": "vllm", **CPU}, tmp_path / "runner.log")
    assert workers
    kill_when(proc, lambda: shards_done(ws) >= 1)
    deadline = time.monotonic() + 15
    while not all(gone(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(gone(p) for p in workers), "the vLLM worker outlived its killed stage"
    done = shards_done(ws)
    assert 1 <= done < PROBLEMS // 2
    resumed = run_sample_stage(ws, offline)
    clean = run_sample_stage(tmp_path / "clean", offline)
    assert table(resumed) == table(clean)  # per-request seeds: any vLLM instance, same samples
    manifest = json.loads((Path(resumed.path) / "_manifest.json").read_text())
    assert manifest["resumed_shards"] == done


@needs_vllm
@pytest.mark.slow
def test_interrupted_http_stage_resumes(served, offline, tmp_path: Path, caplog) -> None:
    """Killed with requests in its journal; the rerun resends only the rest; no key on disk."""
    ws = tmp_path / "http"
    cfg = {
        "kind": "openai",
        "base_url": served.url.removesuffix("/completions"),  # no userinfo in this url
        "served_model_name": "tiny",
        "api_key_env": KEY_ENV,
        "max_concurrency": 1,
    }
    journals = ws / ".requests"

    def journaled() -> int:
        files = journals.glob("*.jsonl") if journals.is_dir() else []
        return sum(len(f.read_text().splitlines()) for f in files)

    proc, _ = start_stage(ws, cfg, tmp_path / "runner.log")
    kill_when(proc, lambda: shards_done(ws) >= 1 and journaled() >= 1)
    in_journal = journaled()
    caplog.set_level(logging.INFO, logger="mpd.engines.openai")
    fresh = OpenAIEngine(
        cfg["base_url"], served.tokenizer, model="tiny", model_vocab=832, api_key_env=KEY_ENV,
        max_concurrency=1, journal_dir=journals,
    )  # fmt: skip
    resumed = run_sample_stage(ws, fresh)
    counts = [re.search(r"\((\d+) resumed", r.getMessage()) for r in caplog.records]
    assert sum(int(m.group(1)) for m in counts if m) == in_journal >= 1
    assert not list(journals.glob("*.jsonl"))  # each call's journal goes once it returns
    assert table(resumed) == table(run_sample_stage(tmp_path / "clean", offline))
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
