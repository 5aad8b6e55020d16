"""The engine interface every backend implements: generate and score.

Prompts and targets travel as token ids, never as text: the ids a student
sampled are the ids the teacher scores and the trainer trains on, so nothing
is ever re-tokenized (re-tokenizing decoded text can change the ids).

A completion record, as the sample stage stores it::

    Completion(prompt_index=3, sample_idx=0, token_ids=[71, 5, ..., 2],
               text="<think>...</think>\\n\\nAnswer: 7", finish_reason="stop")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from data.errors import UserError

Progress = Callable[[int, int], None]  # (done, total) in prompts


@dataclass(frozen=True)
class GenerationParams:
    """How to sample; checked on construction so a bad value fails before any model runs."""

    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    max_tokens: int = 512
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()  # end-of-turn; generation stops after emitting one

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        # a list would make the frozen params unhashable; normalise to a tuple of ints
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@dataclass
class Completion:
    prompt_index: int
    sample_idx: int
    token_ids: list[int]  # includes the stop token when finish_reason == "stop"
    text: str  # decoded without special end-of-turn tokens
    finish_reason: Literal["stop", "length"]


@dataclass
class TokenScores:
    """The teacher's view of one target: per target token, its top-k candidates."""

    topk_ids: np.ndarray  # [T, k] int32
    topk_logprobs: np.ndarray  # [T, k] float32, log-softmax over the tokenizer's vocabulary
    target_logprobs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # [T]


class Engine(Protocol):
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: GenerationParams,
        progress: Progress | None = None,
    ) -> list[list[Completion]]:
        """``n`` completions for each prompt, in prompt order."""
        ...

    def score(
        self,
        prompt_ids: Sequence[Sequence[int]],
        target_ids: Sequence[Sequence[int]],
        top_k: int,
        progress: Progress | None = None,
    ) -> list[TokenScores]:
        """Top-k next-token logprobs at every target position, given prompt + target prefix."""
        ...

    def close(self) -> None: ...


class EngineUnavailableError(UserError):
    """The configured engine cannot run here (not installed, or not implemented yet)."""
