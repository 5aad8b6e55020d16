"""What the engines that run the model elsewhere (vllm, openai) share with each other.

Both hand token ids to a vLLM-style sampler and get token ids and
``prompt_logprobs`` back; this module turns those into the same
:class:`~engines.base.Completion` and :class:`~engines.base.TokenScores` the
``hf`` engine returns, so a stage cannot tell the engines apart:

- one request per (prompt, sample) with its own seed, so a sample does not
  depend on batching, on which replica served it, or on a restart;
- ``finish_reason`` is "stop" exactly when the last token is a stop token
  (vLLM says "length" when the stop token is also the ``max_tokens``-th token),
  and the text is decoded locally without that token, as ``hf`` does;
- the output rows that only pad the model's vocabulary (Qwen3: 151936 rows,
  151669 tokens) are banned with a -100 logit bias when sampling and dropped
  from top-k lists when scoring.

Scoring differs from ``hf`` in one stated way: vLLM's raw ``prompt_logprobs``
are a log-softmax over all of the model's output rows, ``hf`` slices the
padding rows off first. Every logprob of a position is shifted by the same
``-log(1 - padding mass)``: nothing changes for a top-k loss that renormalises
over the k ids, and only the tail bucket sees the padding mass (the shipped
tiny student puts at most 0.6% there; a trained Qwen3, far less).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engines.base import Completion, EngineUnavailableError, GenerationParams, TokenScores

BANNED_LOGIT_BIAS = -100.0  # the most negative bias vLLM and the OpenAI API accept


def request_seed(seed: int, prompt: int, sample: int) -> int:
    """The seed of one (prompt, sample) request: a stable 63-bit hash of the three."""
    digest = hashlib.sha256(f"{seed}:{prompt}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def model_vocab_size(model_path: Path | str, tokenizer: Any) -> int:
    """Output rows of the model at ``model_path`` (config.json), else the tokenizer's size."""
    config = Path(model_path) / "config.json"
    if config.is_file():
        raw = json.loads(config.read_text())
        size = raw.get("vocab_size") or raw.get("text_config", {}).get("vocab_size")
        if size:
            return int(size)
    return len(tokenizer)


def padding_bias(vocab_limit: int, model_vocab: int) -> dict[int, float]:
    """A logit bias that bans the model rows past the tokenizer (empty when there are none)."""
    return {i: BANNED_LOGIT_BIAS for i in range(vocab_limit, model_vocab)}


def to_completion(
    prompt_index: int,
    sample_idx: int,
    token_ids: Sequence[int],
    params: GenerationParams,
    tokenizer: Any,
) -> Completion:
    """A :class:`Completion` with the ``hf`` engine's finish reason and text rules."""
    ids = [int(t) for t in token_ids]
    stopped = bool(ids) and ids[-1] in params.stop_token_ids
    body = ids[:-1] if stopped else ids
    text = tokenizer.decode(body, skip_special_tokens=False)
    return Completion(prompt_index, sample_idx, ids, text, "stop" if stopped else "length")


def logprobs_request_size(top_k: int, vocab_limit: int, model_vocab: int, max_logprobs: int) -> int:
    """How many logprobs to ask per position so that ``top_k`` real tokens survive.

    Padding ids can rank among the top ones; asking for up to as many extra as
    there are padding rows (within ``max_logprobs``) leaves room to drop them.
    """
    k = min(top_k, vocab_limit)
    if k > max_logprobs:
        raise EngineUnavailableError(
            f"score.top_k={top_k} is more than the engine's max_logprobs={max_logprobs}; raise "
            "max_logprobs in the engine config (and the server's --max-logprobs)"
        )
    return min(k + (model_vocab - vocab_limit), max_logprobs, model_vocab)


def scores_from_entries(
    entries: Sequence[Sequence[tuple[int, float, int]]],
    target: Sequence[int],
    top_k: int,
    requested: int,
    vocab_limit: int,
) -> TokenScores:
    """TokenScores from per-target-position ``(token id, logprob, rank)`` lists.

    ``entries[t]`` is vLLM's prompt-logprob entry predicting ``target[t]``: the
    ``requested`` best ids (rank 1..requested) plus the target itself when it
    ranks lower. The top ``top_k`` ids below ``vocab_limit`` are kept, best first.
    """
    k = min(top_k, vocab_limit)
    ids = np.zeros((len(target), k), np.int32)
    lps = np.zeros((len(target), k), np.float32)
    tgt = np.zeros(len(target), np.float32)
    for t, (entry, token) in enumerate(zip(entries, target, strict=True)):
        found = [lp for i, lp, _ in entry if i == token]
        if not found:
            raise EngineUnavailableError(f"prompt_logprobs of position {t} lack its own token")
        tgt[t] = found[0]
        best = sorted(
            ((r, -lp, i) for i, lp, r in entry if 0 <= i < vocab_limit and r <= requested)
        )[:k]
        if len(best) < k:
            raise EngineUnavailableError(
                f"only {len(best)} of top_k={k} logprobs at position {t} are real tokens "
                "(padding rows ranked high); raise the engine's max_logprobs"
            )
        ids[t] = [i for _, _, i in best]
        lps[t] = [-neg for _, neg, _ in best]
    return TokenScores(ids, lps, tgt)
