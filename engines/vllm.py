"""The ``vllm`` engine: vLLM's offline ``LLM`` in worker subprocesses with their own interpreter.

Why a subprocess: vLLM's pins conflict with Prefect's, so it lives in its own
environment (``make vllm-env`` builds ``.venv-vllm``) and this process never
imports it; and ``del llm`` does not give GPU memory back, while a process
that exits does. ``engines/vllm_worker.py`` is the other side of the pipe.

Data parallelism is one worker per replica (each with its own slice of
``CUDA_VISIBLE_DEVICES``), fed contiguous slices of the requests; tensor
parallelism is vLLM's own, inside each worker. Every request carries its own
seed (:func:`engines.remote.request_seed`), so results do not depend on the
number of replicas, on batching, or on a restart: a shard redone after a kill
regenerates what the killed run would have.

Scoring uses ``prompt_logprobs``: vLLM's raw logprobs (``logprobs_mode``
``raw_logprobs``: before temperature or any processor) of every target token,
plus the top ones. vLLM refuses more than ``max_logprobs`` per position
(its default is 20; the config's default, 64, covers ``score.top_k: 32``).
See :mod:`engines.remote` for how results are made to match the ``hf`` engine.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import (
    Completion,
    EngineUnavailableError,
    GenerationParams,
    Progress,
    TokenScores,
)
from engines.config import EngineConfig, vllm_python
from engines.remote import (
    logprobs_request_size,
    padding_bias,
    request_seed,
    scores_from_entries,
    to_completion,
)
from engines.vllm_proc import Worker
from train.models import load_tokenizer

log = logging.getLogger("mpd.engines.vllm")


class VLLMEngine:
    """Generation and scoring through one vLLM worker process per data-parallel replica."""

    def __init__(
        self,
        model_path: Path | str,
        tokenizer: Any,
        *,
        python: Path | str,
        llm_args: dict[str, Any],
        data_parallel_size: int = 1,
        env: dict[str, str] | None = None,
        max_logprobs: int = 64,
        batch_size: int | None = None,
        startup_timeout_s: float = 1800.0,
        log_dir: Path | str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_logprobs = max_logprobs
        self.batch_size = batch_size  # prompts per worker call (progress granularity); None = all
        self._lock = threading.Lock()  # one call at a time: the pipes carry one exchange each
        args = {"model": str(model_path), "max_logprobs": max_logprobs, **llm_args}
        logs = Path(log_dir) if log_dir is not None else Path(tempfile.gettempdir())
        tp = int(args.get("tensor_parallel_size", 1))
        self.workers = [
            Worker(
                str(python),
                env=_replica_env(env or {}, replica, tp, data_parallel_size),
                log_path=logs / f"mpd-vllm-{os.getpid()}-{id(self):x}-{replica}.log",
            )
            for replica in range(data_parallel_size)
        ]
        self._finalizer = weakref.finalize(self, _stop, self.workers)
        try:
            for w in self.workers:  # replicas load side by side
                w.launch(args)
            deadline = time.monotonic() + startup_timeout_s
            ready = [w.wait_ready(deadline) for w in self.workers]
        except BaseException:  # boundary: no worker left running, re-raised unchanged
            self.close()
            raise
        self.model_vocab = int(ready[0]["vocab_size"])
        self.vocab_limit = min(len(tokenizer), self.model_vocab)
        log.info(
            "vllm %s: %s on %d replica(s), logs in %s",
            ready[0].get("version"),
            model_path,
            len(self.workers),
            logs,
        )

    # -- the engine interface -----------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: GenerationParams,
        progress: Progress | None = None,
    ) -> list[list[Completion]]:
        """``n`` completions per prompt, one seeded vLLM request per (prompt, sample)."""
        _check_prompts(prompts)
        sampling: dict[str, Any] = {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,  # always explicit: SamplingParams defaults to 16
            "stop_token_ids": list(params.stop_token_ids),
            "logit_bias": padding_bias(self.vocab_limit, self.model_vocab),
        }
        out: list[list[Completion]] = [[] for _ in prompts]
        step = self.batch_size or max(len(prompts), 1)
        for first in range(0, len(prompts), step):
            chunk = range(first, min(first + step, len(prompts)))
            rows = [(p, s) for p in chunk for s in range(params.n)]
            requests = [
                {"prompt": list(prompts[p]), "seed": request_seed(params.seed, p, s)}
                for p, s in rows
            ]
            ids = self._call("generate", requests, sampling=sampling)
            for (p, s), tokens in zip(rows, ids, strict=True):
                out[p].append(to_completion(p, s, tokens, params, self.tokenizer))
            if progress is not None:
                progress(chunk.stop, len(prompts))
        return out

    def score(
        self,
        prompt_ids: Sequence[Sequence[int]],
        target_ids: Sequence[Sequence[int]],
        top_k: int,
        progress: Progress | None = None,
    ) -> list[TokenScores]:
        """Top-k raw logprobs at every target position, from ``prompt_logprobs``."""
        if len(prompt_ids) != len(target_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(target_ids)} targets")
        _check_prompts(prompt_ids)
        want = logprobs_request_size(top_k, self.vocab_limit, self.model_vocab, self.max_logprobs)
        k = min(top_k, self.vocab_limit)
        out: list[TokenScores] = []
        step = self.batch_size or max(len(prompt_ids), 1)
        for first in range(0, len(prompt_ids), step):
            chunk = range(first, min(first + step, len(prompt_ids)))
            todo = [i for i in chunk if len(target_ids[i])]
            requests = [
                {"prompt": list(prompt_ids[i]) + list(target_ids[i]), "start": len(prompt_ids[i])}
                for i in todo
            ]
            replies = dict(zip(todo, self._call("score", requests, logprobs=want), strict=True))
            for i in chunk:
                if i not in replies:  # an empty target: nothing to score
                    out.append(
                        TokenScores(np.zeros((0, k), np.int32), np.zeros((0, k), np.float32))
                    )
                    continue
                entries = _entries(*replies[i])
                out.append(
                    scores_from_entries(entries, target_ids[i], top_k, want, self.vocab_limit)
                )
            if progress is not None:
                progress(chunk.stop, len(prompt_ids))
        return out

    def close(self) -> None:
        """Stop the workers; their exit is what frees the GPU memory."""
        self._finalizer()

    # -- internals ---------------------------------------------------------------------
    def _call(self, op: str, requests: list[dict], **extra: Any) -> list[Any]:
        """Spread ``requests`` over the replicas in contiguous slices; results in order."""
        if not requests:
            return []
        n = len(self.workers)
        bounds = [len(requests) * r // n for r in range(n + 1)]
        with self._lock:
            busy = []
            for w, lo, hi in zip(self.workers, bounds, bounds[1:], strict=False):
                if hi > lo:
                    w.send({"op": op, "requests": requests[lo:hi], **extra})
                    busy.append(w)
            results: list[Any] = []
            for w in busy:
                results.extend(w.receive(op))
        return results


def _entries(ids: Any, lps: Any, ranks: Any, width: int) -> list[list[tuple[int, float, int]]]:
    """The worker's flat arrays back into per-position (id, logprob, rank) lists."""
    i = np.frombuffer(ids, np.int32).reshape(-1, width)
    v = np.frombuffer(lps, np.float32).reshape(-1, width)
    r = np.frombuffer(ranks, np.int32).reshape(-1, width)
    return [
        [(int(a), float(b), int(c)) for a, b, c in zip(ri, rv, rr, strict=True) if a >= 0]
        for ri, rv, rr in zip(i, v, r, strict=True)
    ]


def _check_prompts(prompts: Sequence[Sequence[int]]) -> None:
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")


def _replica_env(extra: dict[str, str], replica: int, tp: int, dp: int) -> dict[str, str]:
    """The worker's environment: ours, minus paths meant for our interpreter, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}
    env.setdefault("HF_HUB_OFFLINE", "1")  # models are local directories
    env.update(extra)
    if dp > 1:  # each replica sees only its own GPUs
        visible = env.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else [str(d) for d in range(dp * tp)]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices[replica * tp : (replica + 1) * tp])
    return env


def _stop(workers: list[Worker]) -> None:
    for w in workers:
        w.stop()


def resolve_python(python: str | None) -> Path:
    """The vLLM interpreter (:func:`engines.config.vllm_python`), which must exist."""
    path = vllm_python(python)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise EngineUnavailableError(
            f"vllm engine: no Python interpreter at {path}; run `make vllm-env` "
            "(or set the engine's python: to an interpreter that has vLLM)"
        )
    return path


def load_vllm_engine(model_path: Path | str, cfg: EngineConfig, *, dtype: str) -> VLLMEngine:
    """A :class:`VLLMEngine` for ``cfg`` (the parent side: tokenizer here, weights in vLLM)."""
    python = resolve_python(cfg.python)
    path = Path(model_path)
    if (path / "adapter_config.json").is_file():
        raise EngineUnavailableError(
            f"vllm engine: {path} is a LoRA adapter; vLLM needs merged weights "
            "(train.lora.merge: true)"
        )
    llm_args: dict[str, Any] = {
        "tokenizer": str(path),
        "dtype": dtype,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "gpu_memory_utilization": cfg.gpu_memory_utilization,
        "enforce_eager": cfg.enforce_eager,
        "logprobs_mode": "raw_logprobs",
        "seed": 0,
        **({"max_model_len": cfg.max_model_len} if cfg.max_model_len else {}),
        **cfg.vllm_args,
    }
    return VLLMEngine(
        path,
        load_tokenizer(path),
        python=python,
        llm_args=llm_args,
        data_parallel_size=cfg.data_parallel_size,
        env=cfg.env,
        max_logprobs=cfg.max_logprobs,
        batch_size=cfg.batch_size,
        startup_timeout_s=cfg.startup_timeout_s,
    )
