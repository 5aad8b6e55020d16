"""Distillation losses: per-token divergences between student and teacher, and their reduction.

Pure functions of tensors, no model code. Conventions shared by every function here:

- p_s is the student, p_t the teacher, both at temperature τ: p = softmax(z / τ). τ divides *both*
  sides' logits (one `temperature` argument, so it cannot be applied to one side only).
- forward KL = KL(p_t‖p_s) = Σ_v p_t (log p_t − log p_s)   mode-covering (GKD β=0, classic KD)
  reverse KL = KL(p_s‖p_t) = Σ_v p_s (log p_s − log p_t)   mode-seeking (MPD, OPSDC)
- Shapes: logits [..., V] (usually [B, T, V]); mask [...] (usually [B, T]), True where the position's
  target token counts. Logits at position t predict token t + 1, so the mask must already be aligned
  with the logits: build it with `target_mask` and `shift_for_causal_lm`.
- Per-token functions return [...] with zeros where the mask is False; `reduce_tokens` turns them into
  the step loss. Keeping the two apart lets callers log per-token values and pick the denominator.
- Math runs in float32 whatever the input dtype (float64 inputs stay float64, for gradient checks).
- The teacher side is detached: gradients reach the student only.
- Student logits must be finite; teacher log-probs may be −inf (processed top-k logprobs can be),
  those ids count as p_t = 0. Slice padding rows off with `vocab_limit`.

One optimizer step of several micro-batches::

    n = sum(int(mb["mask"].sum()) for mb in micro_batches)  # target tokens in the whole step
    for mb in micro_batches:
        per_token = reverse_kl(student(mb), teacher(mb), mb["mask"], temperature=1.0)
        reduce_tokens(per_token, mb["mask"], n).backward()
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Kind = Literal["forward_kl", "reverse_kl", "jsd"]
KINDS: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd")

# Floor on the top-k "tail" bucket's mass: float32 sums of k probabilities carry ~1e-7 of rounding,
# so a tail below this is noise (it is 0 up to rounding when k = V).
TAIL_EPS = 1e-6


# ---- Helpers: dtype, vocabulary, masks -----------------------------------------------------


def _float(x: Tensor) -> Tensor:
    """float32 for half/bfloat16/float32 inputs, float64 kept as is."""
    return x if x.dtype == torch.float64 else x.float()


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return F.log_softmax(_float(logits) / temperature, dim=-1)


def _masked(per_token: Tensor, mask: Tensor) -> Tensor:
    if per_token.shape != mask.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != positions {tuple(per_token.shape)}")
    return torch.where(mask.bool(), per_token, per_token.new_zeros(()))


def align_vocab(
    student_logits: Tensor, teacher_logits: Tensor, vocab_limit: int | None = None
) -> tuple[Tensor, Tensor]:
    """Slice both logits to the shared tokenizer length `vocab_limit` (= len(tokenizer)).

    Models of one family often pad their embedding matrix to different sizes while sharing one
    tokenizer; the extra rows are never real tokens. Without `vocab_limit` the sizes must match:
    a mismatch raises instead of silently comparing different ids.
    """
    v_s, v_t = student_logits.shape[-1], teacher_logits.shape[-1]
    if vocab_limit is None:
        if v_s != v_t:
            raise ValueError(f"student V={v_s} != teacher V={v_t}: pass vocab_limit=len(tokenizer)")
        return student_logits, teacher_logits
    if not 0 < vocab_limit <= min(v_s, v_t):
        raise ValueError(f"vocab_limit={vocab_limit} outside (0, min({v_s}, {v_t})]")
    return student_logits[..., :vocab_limit], teacher_logits[..., :vocab_limit]


def target_mask(
    prompt_lengths: Tensor | Sequence[int], completion_lengths: Tensor | Sequence[int], seq_len: int
) -> Tensor:
    """[B, seq_len] bool, True at token positions prompt_len ≤ i < prompt_len + completion_len.

    Built from lengths, never from token ids: in Qwen the pad id equals the EOS id, so masking by
    `input_ids != pad_id` would also drop the EOS that ends the target, which must be trained.
    Rows are laid out [prompt][completion][pad]; with left padding add the pad count to
    `prompt_lengths`. This masks *tokens*; shift it with `shift_for_causal_lm` before a loss.
    """
    start = torch.as_tensor(prompt_lengths).long()[:, None]
    end = start + torch.as_tensor(completion_lengths, device=start.device).long()[:, None]
    positions = torch.arange(seq_len, device=start.device)
    return (positions >= start) & (positions < end)


def shift_for_causal_lm(
    logits: Tensor, input_ids: Tensor, token_mask: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Align a causal LM's outputs with the tokens they predict.

    `logits[:, t]` (or hidden states) is the distribution of `input_ids[:, t + 1]`. Returns
    `(logits[:, :-1], input_ids[:, 1:], token_mask[:, 1:])`: row t of each now refers to the same
    target token, and the shifted token mask is the loss mask. Shift the teacher's logits the same
    way. The first token is a prompt token, never a target, so nothing is lost.
    """
    return logits[:, :-1], input_ids[:, 1:], token_mask[:, 1:]


# ---- Divergences between two log-probability tensors over the last dimension ---------------


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p‖q) = Σ_v p(v) (log p(v) − log q(v)) over the last dimension, with 0·log 0 = 0."""
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(log_p == -math.inf, 0.0, terms).sum(-1)


def _jsd(log_s: Tensor, log_t: Tensor, beta: float) -> Tensor:
    """Generalised JSD with TRL's weights and endpoints; see `generalized_jsd`."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return _kl(log_t, log_s)  # forward KL(p_t‖p_s)
    if beta == 1.0:
        return _kl(log_s, log_t)  # reverse KL(p_s‖p_t)
    log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
    return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def _divergence(log_s: Tensor, log_t: Tensor, kind: str, beta: float) -> Tensor:
    if kind == "forward_kl":
        return _kl(log_t, log_s)
    if kind == "reverse_kl":
        return _kl(log_s, log_t)
    if kind == "jsd":
        return _jsd(log_s, log_t, beta)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


# ---- Full-vocabulary per-token losses: [..., V] logits on both sides -----------------------


def per_token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    kind: Kind,
    beta: float = 0.5,
    temperature: float = 1.0,
    vocab_limit: int | None = None,
) -> Tensor:
    """`forward_kl`, `reverse_kl` or `generalized_jsd` (kind "jsd", uses `beta`) by name."""
    student_logits, teacher_logits = align_vocab(student_logits, teacher_logits, vocab_limit)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {student_logits.shape} != teacher {teacher_logits.shape}")
    log_s = _log_probs(student_logits, temperature)
    log_t = _log_probs(teacher_logits.detach(), temperature).to(log_s.dtype)
    return _masked(_divergence(log_s, log_t, kind, beta), mask)


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    vocab_limit: int | None = None,
) -> Tensor:
    """Forward KL(p_t‖p_s) = Σ_v p_t(v) (log p_t(v) − log p_s(v)) per position, [...] float32."""
    return per_token_divergence(
        student_logits,
        teacher_logits,
        mask,
        kind="forward_kl",
        temperature=temperature,
        vocab_limit=vocab_limit,
    )


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    vocab_limit: int | None = None,
) -> Tensor:
    """Reverse KL(p_s‖p_t) = Σ_v p_s(v) (log p_s(v) − log p_t(v)) per position, [...] float32."""
    return per_token_divergence(
        student_logits,
        teacher_logits,
        mask,
        kind="reverse_kl",
        temperature=temperature,
        vocab_limit=vocab_limit,
    )


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    vocab_limit: int | None = None,
) -> Tensor:
    """Generalised Jensen-Shannon divergence of GKD (Agarwal et al., Eq. 1), TRL's convention.

    β weights the *teacher* in the mixture; small β is forward-like, large β reverse-like:

        0 < β < 1:  JSD_β = β·KL(p_t‖m) + (1−β)·KL(p_s‖m),   m = β·p_t + (1−β)·p_s
        β = 0:      JSD_0 = KL(p_t‖p_s)   forward KL
        β = 1:      JSD_1 = KL(p_s‖p_t)   reverse KL

    exactly as TRL's `generalized_jsd_loss` (huggingface/trl#3043 fixed its mixture weights; #6780
    disputed the docs and was answered by documenting this piecewise definition). The endpoints are
    special-cased because the interior formula tends to 0 there (m becomes p_s or p_t): the loss jumps
    at β = 0 and 1. What is continuous is its *direction*, the first-order limits

        JSD_β / β     → KL(p_t‖p_s)   as β → 0⁺      (and so does its gradient)
        JSD_β / (1−β) → KL(p_s‖p_t)   as β → 1⁻

    i.e. JSD_β / (β(1−β)) runs continuously from forward KL at β = 0 to reverse KL at β = 1. We keep
    TRL's unnormalised interior so that learning rates carry over from TRL/GKD recipes; mind that near
    the endpoints β mostly rescales the loss (≈ the learning rate) rather than its direction. At
    β = 0.5 it is the symmetric JSD; in general JSD_β(s, t) = JSD_{1−β}(t, s) inside (0, 1).
    """
    return per_token_divergence(
        student_logits,
        teacher_logits,
        mask,
        kind="jsd",
        beta=beta,
        temperature=temperature,
        vocab_limit=vocab_limit,
    )


def cross_entropy(
    student_logits: Tensor,
    target_ids: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    vocab_limit: int | None = None,
) -> Tensor:
    """Cross-entropy −log p_s(y) per position, y = `target_ids` (aligned with the logits), [...]."""
    if vocab_limit is not None:
        student_logits = student_logits[..., :vocab_limit]
    log_s = _log_probs(student_logits, temperature)
    ids = torch.where(mask.bool(), target_ids, torch.zeros_like(target_ids)).long()  # -100 → 0
    return _masked(-log_s.gather(-1, ids.unsqueeze(-1)).squeeze(-1), mask)


# ---- Top-k per-token losses: the teacher is k stored (id, logprob) pairs per position ------


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
    log_s = _log_probs(student_logits, 1.0).gather(-1, teacher_topk_ids.long())
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
    log_t = _float(teacher_topk_logprobs.detach()).to(log_s.dtype)
    if log_s.shape != log_t.shape:
        raise ValueError(f"top-k ids {tuple(log_s.shape)} != logprobs {tuple(log_t.shape)}")
    kept = log_t != math.inf  # NaN compares unequal: it stays, and the step is skipped
    log_s = torch.where(kept, log_s, DROPPED_LOGPROB)
    log_t = torch.where(kept, log_t, DROPPED_LOGPROB)
    if tail:
        log_s = torch.cat([log_s, _log_rest(log_s)], dim=-1)
        log_t = torch.cat([log_t, _log_rest(log_t)], dim=-1)
    return _log_probs(log_s, temperature), _log_probs(log_t, temperature)


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
    return _masked(_divergence(log_s, log_t, kind, beta), mask)


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


# ---- Reduction -----------------------------------------------------------------------------


def reduce_tokens(
    per_token: Tensor, mask: Tensor, num_items_in_batch: int | Tensor | None = None
) -> Tensor:
    """Σ_masked per_token / max(N, 1), a scalar.

    N is `num_items_in_batch`, the number of target tokens in the whole optimizer step (all its
    micro-batches), so that summing the micro-batch losses equals the loss of one big batch and
    gradient accumulation changes nothing; a per-micro-batch mean would over-weight short ones.
    With None, N is this batch's masked count. clamp_min(1) keeps an empty mask a finite 0 that
    still has a (zero) gradient path.
    """
    mask = mask.bool()
    total = torch.where(mask, per_token, per_token.new_zeros(())).sum()
    if num_items_in_batch is None:
        count = mask.sum()
    else:
        count = torch.as_tensor(num_items_in_batch, device=total.device)
    return total / count.to(device=total.device, dtype=total.dtype).clamp_min(1)
