"""The ``openai`` engine: any OpenAI-compatible ``/v1/completions`` server (vLLM, SGLang...).

Prompts go out as token id lists, so the server never re-tokenizes; token ids
come back through vLLM's ``return_token_ids`` extension, and scoring uses its
``prompt_logprobs`` extension (with ``echo``). A server without them is told
apart with one clear line, not a traceback.

Requests are sent concurrently and retried with backoff (``engines/openai_http.py``, which
also tells a refused request from one given up on). A call can keep a journal
(:mod:`engines.journal`) so that a restart sends only the requests that had not
finished: a stage passes ``journal=`` (one file per shard, e.g. a dotfile in its
staging directory), or the engine names the file in ``journal_dir`` after the
inputs' hash and deletes it once the call returns.

The API key is read from the environment variable named by ``api_key_env``
and goes only into the ``Authorization`` header: it is never logged, never
journaled, and masked if a server echoes it in an error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from engines.base import (
    Completion,
    EngineUnavailableError,
    GenerationParams,
    Progress,
    TokenScores,
)
from engines.config import EngineConfig
from engines.journal import Journal
from engines.openai_http import (
    Poster,
    display_url,
    read_key,
)
from engines.remote import (
    logprobs_request_size,
    model_vocab_size,
    padding_bias,
    request_seed,
    scores_from_entries,
    to_completion,
)
from train.models import load_tokenizer

log = logging.getLogger("mpd.engines.openai")


class OpenAIEngine:
    """Generation and scoring through an OpenAI-compatible completions endpoint."""

    def __init__(
        self,
        base_url: str,
        tokenizer: Any,
        *,
        model: str,
        model_vocab: int | None = None,
        api_key_env: str | None = None,
        max_concurrency: int = 16,
        timeout_s: float = 120.0,
        max_retries: int = 5,
        retry_backoff_s: float = 1.0,
        max_logprobs: int = 64,
        journal_dir: Path | str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.url = display_url(base_url.rstrip("/") + "/completions")
        self._endpoint = base_url.rstrip("/") + "/completions"
        self.vocab_limit = min(len(tokenizer), model_vocab or len(tokenizer))
        self.model_vocab = model_vocab or len(tokenizer)
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.max_logprobs = max_logprobs
        self.journal_dir = Path(journal_dir) if journal_dir is not None else None
        self.last_call: dict[str, int] = {}  # requests sent and resumed by the latest call
        self._key = read_key(api_key_env)

    def __repr__(self) -> str:  # the default repr would be harmless; this one is explicit
        return f"OpenAIEngine({self.url!r}, model={self.model!r})"

    # -- the engine interface -----------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: GenerationParams,
        progress: Progress | None = None,
        *,
        journal: Path | str | None = None,
    ) -> list[list[Completion]]:
        """``n`` completions per prompt, one request per (prompt, sample)."""
        _check_prompts(prompts)
        rows = [(p, s) for p in range(len(prompts)) for s in range(params.n)]
        common = {
            "model": self.model,
            "max_tokens": params.max_tokens,  # always explicit: servers default to 16
            "temperature": params.temperature,
            "top_p": params.top_p,
            "n": 1,
            "stop_token_ids": list(params.stop_token_ids),
            "ignore_eos": True,  # stop only where the caller says, as the hf engine does
            "skip_special_tokens": False,
            "return_token_ids": True,
        }
        if bias := padding_bias(self.vocab_limit, self.model_vocab):
            common["logit_bias"] = {str(i): b for i, b in bias.items()}
        bodies = [
            {**common, "prompt": list(prompts[p]), "seed": request_seed(params.seed, p, s)}
            for p, s in rows
        ]
        results = self._run_all(bodies, self._parse_generation, journal, progress, params.n)
        out: list[list[Completion]] = [[] for _ in prompts]
        for (p, s), r in zip(rows, results, strict=True):
            out[p].append(to_completion(p, s, r["ids"], params, self.tokenizer))
        return out

    def score(
        self,
        prompt_ids: Sequence[Sequence[int]],
        target_ids: Sequence[Sequence[int]],
        top_k: int,
        progress: Progress | None = None,
        *,
        journal: Path | str | None = None,
    ) -> list[TokenScores]:
        """Top-k logprobs of every target position, from the server's ``prompt_logprobs``."""
        if len(prompt_ids) != len(target_ids):
            raise ValueError(f"{len(prompt_ids)} prompts but {len(target_ids)} targets")
        _check_prompts(prompt_ids)
        want = logprobs_request_size(top_k, self.vocab_limit, self.model_vocab, self.max_logprobs)
        bodies = [
            {
                "model": self.model,
                "prompt": list(p) + list(t),
                "max_tokens": 1,
                "temperature": 0.0,
                "echo": True,
                "prompt_logprobs": want,
                "return_token_ids": True,
            }
            for p, t in zip(prompt_ids, target_ids, strict=True)
        ]
        starts = [len(p) for p in prompt_ids]

        def parse(i: int, reply: dict) -> dict:
            return self._parse_prompt_logprobs(reply, starts[i], len(bodies[i]["prompt"]))

        results = self._run_all(bodies, parse, journal, progress, 1)
        return [
            scores_from_entries(r["entries"], list(t), top_k, want, self.vocab_limit)
            for r, t in zip(results, target_ids, strict=True)
        ]

    def _poster(self) -> Poster:
        """This call's poster, with the engine's settings as they are now."""
        return Poster(
            self._endpoint,
            self.url,
            self._key,
            max_concurrency=self.max_concurrency,
            timeout_s=self.timeout_s,
            max_retries=self.max_retries,
            retry_backoff_s=self.retry_backoff_s,
        )

    def close(self) -> None:
        """Nothing to release: each call opens and closes its own connection pool."""

    # -- parsing ---------------------------------------------------------------------
    def _parse_generation(self, i: int, reply: dict) -> dict:
        choice = _first_choice(reply, self.url)
        ids = choice.get("token_ids")
        if ids is None:
            raise EngineUnavailableError(
                f"{self.url} returned no token ids: the openai engine needs a server with "
                "vLLM's return_token_ids extension (vLLM >= 0.10.2)"
            )
        return {"ids": [int(t) for t in ids]}

    def _parse_prompt_logprobs(self, reply: dict, start: int, end: int) -> dict:
        plp = _first_choice(reply, self.url).get("prompt_logprobs")
        if not plp:
            raise EngineUnavailableError(
                f"{self.url} does not return prompt_logprobs: scoring needs a vLLM server "
                "(or the vllm/hf engine for the teacher)"
            )
        entries = [
            [(int(i), float(v["logprob"]), int(v.get("rank") or 0)) for i, v in pos.items()]
            for pos in plp[start:end]
        ]
        return {"entries": entries}

    # -- requests ----------------------------------------------------------------------
    def _run_all(
        self,
        bodies: list[dict],
        parse: Callable[[int, dict], dict],
        journal: Path | str | None,
        progress: Progress | None,
        per_prompt: int,
    ) -> list[dict]:
        """Send every body (minus the journaled ones) and return the parsed replies in order."""
        book = Journal.for_call(bodies, journal, self.journal_dir)
        results: list[dict | None] = [None] * len(bodies)
        for i, r in book.finished().items():
            results[i] = r
        todo = [i for i, r in enumerate(results) if r is None]
        self.last_call = {"requests": len(todo), "resumed": len(bodies) - len(todo)}
        if todo:
            log.info(
                "openai: %d request(s) to %s (%d resumed from the journal)",
                len(todo),
                self.url,
                len(bodies) - len(todo),
            )
        prompts = len(bodies) // per_prompt  # bodies are prompt-major: i // per_prompt
        missing = [0] * prompts
        for i in todo:
            missing[i // per_prompt] += 1
        done = sum(m == 0 for m in missing)

        def finished(i: int, result: dict) -> None:
            nonlocal done
            results[i] = result
            book.add(i, result)
            missing[i // per_prompt] -= 1
            if missing[i // per_prompt] == 0:
                done += 1
                if progress is not None:
                    progress(done, prompts)

        completed = False
        try:
            self._poster().post_all(bodies, todo, parse, finished)
            completed = True
        finally:
            book.close(completed=completed)
        return [r for r in results if r is not None]


# -- helpers ------------------------------------------------------------------------------
def _check_prompts(prompts: Sequence[Sequence[int]]) -> None:
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")


def _first_choice(reply: dict, url: str) -> dict:
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not choices:
        raise EngineUnavailableError(f"{url} answered without choices: not a completions API?")
    return choices[0]


def load_openai_engine(
    model_path: Path | str, cfg: EngineConfig, *, journal_dir: Path | str | None = None
) -> OpenAIEngine:
    """An :class:`OpenAIEngine` for ``cfg``; ``model_path`` holds the tokenizer (and config.json).

    The tokenizer is local because prompts go out as ids and completions are
    decoded here; the served model must use the same one.
    """
    tokenizer = load_tokenizer(model_path)
    assert cfg.base_url is not None  # EngineConfig refuses an openai engine without one
    return OpenAIEngine(
        cfg.base_url,
        tokenizer,
        model=cfg.served_model_name or str(model_path),
        model_vocab=model_vocab_size(model_path, tokenizer),
        api_key_env=cfg.api_key_env,
        max_concurrency=cfg.max_concurrency,
        timeout_s=cfg.timeout_s,
        max_retries=cfg.max_retries,
        retry_backoff_s=cfg.retry_backoff_s,
        max_logprobs=cfg.max_logprobs,
        journal_dir=journal_dir,
    )
