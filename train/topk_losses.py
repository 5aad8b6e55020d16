"""Top-k per-token losses: the teacher is k stored (id, logprob) pairs per position.

The conventions are those of ``train/losses.py`` (directions, temperature, masks, dtype); here
both sides are bucket distributions over the teacher's k ids, plus an optional tail bucket
log(1 − Σ_k p) for the rest of the vocabulary::

    per_token = topk_reverse_kl(student_logits, ids, logprobs, mask, tail=True)   # [B, T]
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from train.divergences import Kind, as_float, divergence, log_probs, masked

# Floor on the top-k "tail" bucket's mass: float32 sums of k probabilities carry ~1e-7 of rounding,
# so a tail below this is noise (it is 0 up to rounding when k = V).
TAIL_EPS = 1e-6


def _log_rest(log_p: Tensor) -> Tensor:
    """log(1 − Σ_k p_k) as [..., 1], with the rest floored at TAIL_EPS; stable near 0 and 1."""
    log_in = torch.logsumexp(log_p, dim=-1, keepdim=True).clamp_max(math.log1p(-TAIL_EPS))
    return torch.where(  # log1mexp: expm1 near 0, log1p away from it (both branches finite)
        log_in > -math.log(2.0), torch.log(-torch.expm1(log_in)), torch.log1p(-torch.exp(log_in))
    )


def topk_log_probs(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    *,
    temperature: float = 1.0,
    tail: bool = False,
    vocab_limit: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Student and teacher log-probabilities over the teacher's k ids, [..., k] (or [..., k+1]).

    The stored teacher values are log-softmax at τ = 1 over the full vocabulary, so the teacher's
    tempered logits are unknown. Both sides are therefore built alike: first the τ = 1 log-probs on
    the k ids (student: log_softmax over its full vocabulary, then gathered), with `tail` one more
    bucket log(1 − Σ_k p), floored at TAIL_EPS; then τ is applied to these bucket log-probs,
    log_softmax(ℓ / τ) over the k (+1) buckets. Without a tail this is exactly the tempered student
    renormalised over the k ids. With a tail and τ ≠ 1 the tail is tempered as one atom (its true
    tempered mass needs the teacher's unseen logits). Identical inputs give identical buckets.
    """
    if vocab_limit is not None:
        student_logits = student_logits[..., :vocab_limit]
    log_s = log_probs(student_logits, 1.0).gather(-1, teacher_topk_ids.long())
    return topk_buckets(log_s, teacher_topk_logprobs, temperature=temperature, tail=tail)


# A candidate the scores did not keep (teacher logprob +inf, "not stored": data.schemas.decode_topk;
# −inf keeps its meaning, a candidate of zero probability, and NaN stays a broken value that makes
# the trainer skip the step) gets this on both sides:
# exp() of it is exactly 0 in float32, so it holds no mass and gets no gradient, where −inf would
# make 0·(−inf − −inf) a NaN in the divergence and its backward.
DROPPED_LOGPROB = -1e4


def topk_buckets(
    log_s: Tensor, teacher_topk_logprobs: Tensor, *, temperature: float, tail: bool
) -> tuple[Tensor, Tensor]:
    """The buckets of `topk_log_probs` from the student's τ = 1 log-probs gathered at the
    teacher's ids: candidates the teacher's scores did not keep (logprob +inf) are left out of
    both sides, so their mass joins the tail bucket."""
    log_t = as_float(teacher_topk_logprobs.detach()).to(log_s.dtype)
    if log_s.shape != log_t.shape:
        raise ValueError(f"top-k ids {tuple(log_s.shape)} != logprobs {tuple(log_t.shape)}")
    kept = log_t != math.inf  # NaN compares unequal: it stays, and the step is skipped
    log_s = torch.where(kept, log_s, DROPPED_LOGPROB)
    log_t = torch.where(kept, log_t, DROPPED_LOGPROB)
    if tail:
        log_s = torch.cat([log_s, _log_rest(log_s)], dim=-1)
        log_t = torch.cat([log_t, _log_rest(log_t)], dim=-1)
    return log_probs(log_s, temperature), log_probs(log_t, temperature)


def topk_per_token_divergence(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    mask: Tensor,
    *,
    kind: Kind,
    beta: float = 0.5,
    temperature: float = 1.0,
    tail: bool = False,
    vocab_limit: int | None = None,
) -> Tensor:
    """The full-vocabulary divergence `kind` between the bucket distributions of `topk_log_probs`."""
    log_s, log_t = topk_log_probs(
        student_logits,
        teacher_topk_ids,
        teacher_topk_logprobs,
        temperature=temperature,
        tail=tail,
        vocab_limit=vocab_limit,
    )
    return masked(divergence(log_s, log_t, kind, beta), mask)


def topk_forward_kl(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    tail: bool = False,
    vocab_limit: int | None = None,
) -> Tensor:
    """Forward KL(q_t‖q_s) = Σ_b q_t(b) (log q_t(b) − log q_s(b)), b over the k ids (+ tail)."""
    return topk_per_token_divergence(
        student_logits,
        teacher_topk_ids,
        teacher_topk_logprobs,
        mask,
        kind="forward_kl",
        temperature=temperature,
        tail=tail,
        vocab_limit=vocab_limit,
    )


def topk_reverse_kl(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    tail: bool = False,
    vocab_limit: int | None = None,
) -> Tensor:
    """Reverse KL(q_s‖q_t) = Σ_b q_s(b) (log q_s(b) − log q_t(b)), b over the k ids (+ tail)."""
    return topk_per_token_divergence(
        student_logits,
        teacher_topk_ids,
        teacher_topk_logprobs,
        mask,
        kind="reverse_kl",
        temperature=temperature,
        tail=tail,
        vocab_limit=vocab_limit,
    )


def topk_generalized_jsd(
    student_logits: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    tail: bool = False,
    vocab_limit: int | None = None,
) -> Tensor:
    """`generalized_jsd`'s JSD_β (β=0 forward KL, β=1 reverse KL) over the k ids (+ tail)."""
    return topk_per_token_divergence(
        student_logits,
        teacher_topk_ids,
        teacher_topk_logprobs,
        mask,
        kind="jsd",
        beta=beta,
        temperature=temperature,
        tail=tail,
        vocab_limit=vocab_limit,
    )
