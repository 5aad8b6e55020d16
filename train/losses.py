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
- The divergences themselves (KL, JSD_β) are ``train/divergences.py``; the top-k losses, whose
  teacher is k stored (id, logprob) pairs per position, ``train/topk_losses.py``.
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

from collections.abc import Sequence

import torch
from torch import Tensor

from train.divergences import Kind, divergence, log_probs, masked

# ---- Vocabulary and masks: which positions and ids a loss compares -------------------------


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
    log_s = log_probs(student_logits, temperature)
    log_t = log_probs(teacher_logits.detach(), temperature).to(log_s.dtype)
    return masked(divergence(log_s, log_t, kind, beta), mask)


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
    log_s = log_probs(student_logits, temperature)
    ids = torch.where(mask.bool(), target_ids, torch.zeros_like(target_ids)).long()  # -100 → 0
    return masked(-log_s.gather(-1, ids.unsqueeze(-1)).squeeze(-1), mask)


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
