"""The training losses of `train.chunked`, reduced, with their gradient made in the forward pass.

The trainer's reduction is known before the forward pass: loss = Σ_i w_i ℓ_i with fixed token
weights w (w_i = 1/N on the targets, N the target tokens of the whole optimizer step). So the
gradient w.r.t. a chunk's logits, G = ∂loss/∂logits, depends only on that chunk's own forward
values, and each chunk can

1. make its logits once (hidden @ Wᵀ), then ℓ and G: analytic for the full-vocabulary divergences
   and cross-entropy; for the top-k buckets one `torch.autograd.grad` over the small [chunk, k]
   bucket math, then analytic over the vocabulary;
2. turn G into ∂/∂hidden = G W and ∂/∂W += Gᵀ hidden, and free the logits and G;

and backward only scales these two stored gradients by grad_output. Against `train.chunked`'s
checkpointed per-token path this saves, per chunk, the student (and teacher) logits matmul and
log-softmax recomputed in backward, and the autograd graph over [chunk, V] tensors: that was the
cost of an online KL step beyond the teacher's own forward (benchmarks/bench_kl_step.py). Peak
memory stays O(chunk × V), plus a hidden-sized and a weight-sized gradient (float32).

    n = sum(int(mb.loss_mask.sum()) for mb in micro_batches)  # target tokens of the whole step
    for mb in micro_batches:
        out = chunked_divergence_loss(h_s, W_s, h_t, W_t, mb.loss_mask, 1.0 / n, kind="reverse_kl")
        out.loss.backward()  # out.per_token: [B, T] detached, for logging

The per-token functions of `train.chunked` (and `train.losses` under them) stay the reference:
the tests hold these to them in value and gradient. First-order gradients only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from train.chunked import vocab_rows
from train.divergences import KINDS, Kind, divergence, kl
from train.topk_losses import topk_buckets

_FORWARD_KL, _REVERSE_KL = "forward_kl", "reverse_kl"


class ReducedLoss(NamedTuple):
    """`loss` = Σ_i w_i ℓ_i over the masked positions, a scalar to call backward on; `per_token`
    the ℓ_i as [B, T] (zeros off the mask), detached, for logging."""

    loss: Tensor
    per_token: Tensor


# A chunk rule maps one chunk's student logits [n, V] (and the chunk's row slice, to find its rows
# of the other per-position inputs) to its per-token values [n] and, given the chunk's token
# weights w [n], to the gradient ∂(Σ_i w_i ℓ_i)/∂logits [n, V]; without weights, no gradient.
ChunkRule = Callable[[Tensor, slice, Tensor | None], tuple[Tensor, Tensor | None]]


def _acc_dtype(x: Tensor) -> torch.dtype:
    """The dtype the loss math runs in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _log_softmax(logits: Tensor, temperature: float) -> Tensor:
    """log softmax(z / τ) in float32 (float64 kept); no division when τ = 1."""
    z = logits if logits.dtype == torch.float64 else logits.float()
    return torch.log_softmax(z if temperature == 1.0 else z / temperature, dim=-1)


def _divergence_rule(
    teacher_rows: Tensor, teacher_weight: Tensor, *, kind: Kind, beta: float, temperature: float
) -> ChunkRule:
    """Per-token divergence and its analytic gradient w.r.t. the student's logits.

    With z = logits / τ, p_s = softmax(z) and p_t = softmax(teacher logits / τ), the gradients
    of one token's loss w.r.t. z are (then × w_i / τ for the logits):

        forward KL(p_t‖p_s) = Σ p_t (log p_t − log p_s):  ∂/∂z = p_s − p_t
        reverse KL(p_s‖p_t) = Σ p_s (log p_s − log p_t):  ∂/∂z = p_s ⊙ (log p_s − log p_t − KL)
        JSD_β = β·KL(p_t‖m) + (1−β)·KL(p_s‖m),  m = β p_t + (1−β) p_s,  0 < β < 1:
                                ∂/∂z = (1−β) p_s ⊙ (log p_s − log m − KL(p_s‖m))

    (JSD: ∂JSD/∂p_s = (1−β)(log p_s − log m): the constants +(1−β) from p_s log p_s and
    −(1−β)(β p_t + (1−β) p_s)/m from the two log m terms cancel. The softmax Jacobian
    diag(p) − p pᵀ turns a gradient a w.r.t. p_s into p_s ⊙ (a − Σ p_s a) w.r.t. z.)
    β = 0 and β = 1 are forward and reverse KL, as in `losses.generalized_jsd`. The teacher's
    logits are made here, chunk by chunk, and never need a gradient.
    """
    if kind == "jsd" and beta == 0.0:
        kind = _FORWARD_KL
    elif kind == "jsd" and beta == 1.0:
        kind = _REVERSE_KL

    def rule(logits: Tensor, rows: slice, w: Tensor | None) -> tuple[Tensor, Tensor | None]:
        log_s = _log_softmax(logits, temperature)
        teacher_logits = teacher_rows[rows] @ teacher_weight.T
        log_t = _log_softmax(teacher_logits, temperature).to(log_s.dtype)
        del teacher_logits
        coef = None if w is None else (w / temperature)[:, None]
        if kind == _FORWARD_KL:
            values = kl(log_t, log_s)
            if coef is None:
                return values, None
            return values, log_s.exp_().sub_(log_t.exp_()).mul_(coef)
        if kind == _REVERSE_KL:
            p_s = log_s.exp()
            ratio = log_s.sub_(log_t)  # log p_s − log p_t, in log_s's storage
            del log_t
            values = (p_s * ratio).sum(-1)
            if coef is None:
                return values, None
            return values, ratio.sub_(values[:, None]).mul_(p_s).mul_(coef)
        log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
        kl_tm = kl(log_t, log_m)
        del log_t
        p_s = log_s.exp()
        ratio = log_s.sub_(log_m)  # log p_s − log m
        del log_m
        kl_sm = (p_s * ratio).sum(-1)
        values = beta * kl_tm + (1.0 - beta) * kl_sm
        if coef is None:
            return values, None
        return values, ratio.sub_(kl_sm[:, None]).mul_(p_s).mul_((1.0 - beta) * coef)

    return rule


def _cross_entropy_rule(targets: Tensor, *, temperature: float) -> ChunkRule:
    """ℓ = −log p_s(y), p_s = softmax(logits / τ); ∂ℓ/∂logits = (p_s − onehot(y)) / τ."""

    def rule(logits: Tensor, rows: slice, w: Tensor | None) -> tuple[Tensor, Tensor | None]:
        log_s = _log_softmax(logits, temperature)
        y = targets[rows].long()[:, None]
        values = -log_s.gather(-1, y).squeeze(-1)
        if w is None:
            return values, None
        p_s = log_s.exp_()
        grad = p_s.scatter_add_(-1, y, p_s.new_full(y.shape, -1.0))
        return values, grad.mul_((w / temperature)[:, None])

    return rule


def _topk_rule(
    ids: Tensor, logprobs: Tensor, *, kind: Kind, beta: float, temperature: float, tail: bool
) -> ChunkRule:
    """Top-k bucket divergence; autograd on the [n, k (+1)] buckets, analytic over the vocabulary.

    The buckets are those of `topk_losses.topk_log_probs`: ℓ_j = log p_s(id_j), the student's
    log-softmax at τ = 1 over its full vocabulary gathered at the teacher's k ids, then (with
    `tail`) one more bucket log(1 − Σ_j p_j), then log_softmax(· / τ) over the buckets, on both
    sides. Everything after the gather is small and is differentiated by one `torch.autograd.grad`
    per chunk, giving a_j = ∂(Σ_i w_i ℓ_i)/∂ℓ_j; the full-vocabulary step is analytic:
    ∂ℓ_j/∂z_v = δ(v = id_j) − p_s(v), so ∂/∂z = scatter(a) − p_s · Σ_j a_j.
    """

    def buckets(log_s: Tensor, rows: slice) -> Tensor:
        """The per-token divergence from the gathered student log-probs [n, k]."""
        log_s, log_t = topk_buckets(log_s, logprobs[rows], temperature=temperature, tail=tail)
        return divergence(log_s, log_t, kind, beta)

    def rule(logits: Tensor, rows: slice, w: Tensor | None) -> tuple[Tensor, Tensor | None]:
        log_full = _log_softmax(logits, 1.0)
        chunk_ids = ids[rows].long()
        gathered = log_full.gather(-1, chunk_ids)
        if w is None:
            return buckets(gathered, rows), None
        with torch.enable_grad():
            gathered.requires_grad_()
            values = buckets(gathered, rows)
            (a,) = torch.autograd.grad(values, gathered, grad_outputs=w.to(values.dtype))
        grad = log_full.exp_().mul_(-a.sum(-1, keepdim=True)).scatter_add_(-1, chunk_ids, a)
        return values.detach(), grad

    return rule


class _FusedLoss(torch.autograd.Function):
    """Σ_i w_i ℓ_i over rows of hidden states, with ∂/∂hidden and ∂/∂weight made in forward.

    For each chunk of rows: logits = x @ Wᵀ, the rule's values ℓ and G = ∂(Σ w ℓ)/∂logits, then
    ∂/∂x = G W and ∂/∂W += Gᵀ x, and the chunk's logits and G are freed. Backward only scales the
    two stored gradients by grad_output: no logits are recomputed. First order only.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        token_weight: Tensor,
        rule: ChunkRule,
        chunk_size: int,
        need_hidden: bool,
        need_weight: bool,
    ) -> tuple[Tensor, Tensor]:
        n = hidden.shape[0]
        acc = _acc_dtype(hidden)
        values = hidden.new_empty(n, dtype=acc)
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        # ∂/∂W summed over the chunks in float32 (not in a bf16 weight's dtype), cast at the end.
        grad_weight = weight.new_zeros(weight.shape, dtype=acc) if need_weight else None
        grads = need_hidden or need_weight
        for start in range(0, n, chunk_size):
            rows = slice(start, min(start + chunk_size, n))
            x = hidden[rows]
            logits = x @ weight.T
            logits_dtype = logits.dtype  # the weights' (bf16 under autocast)
            chunk_values, grad = rule(logits, rows, token_weight[rows] if grads else None)
            del logits
            values[rows] = chunk_values
            if grad is None:
                continue
            grad = grad.to(logits_dtype)  # as autograd would: the matmuls' backward in their dtype
            if grad_hidden is not None:
                grad_hidden[rows] = grad @ weight
            if grad_weight is not None:
                grad_weight += grad.T @ x
        total = (values * token_weight).sum()
        ctx.mark_non_differentiable(values)
        ctx.save_for_backward(
            grad_hidden if grad_hidden is not None else hidden.new_empty(0),
            grad_weight.to(weight.dtype) if grad_weight is not None else weight.new_empty(0),
        )
        ctx.need = (need_hidden, need_weight)
        return total, values

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_total: Tensor, _grad_values: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        need_hidden, need_weight = ctx.need
        return (  # grad_total: the caller's scale (the number of processes, a loss scale)
            grad_hidden * grad_total if need_hidden else None,
            grad_weight * grad_total if need_weight else None,
            None,
            None,
            None,
            None,
            None,
        )


def fused_reduced_loss(
    rule: ChunkRule,
    hidden: Tensor,
    weight: Tensor,
    mask: Tensor,
    token_weight: Tensor | float,
    chunk_size: int,
) -> ReducedLoss:
    """Σ_{masked i} token_weight_i · ℓ_i, ℓ_i = `rule` on row i of (hidden @ weight.T), fused.

    `hidden` [B, T, H], `weight` [V, H], `mask` [B, T]; `token_weight` a [B, T] tensor (its
    masked entries are used; a constant: no gradient reaches it) or one float for every masked
    position. Each chunk's gradient is made during this call, for the inputs that need one
    (grad mode on and requires_grad), so the returned loss must be backpropagated as it is (or
    scaled): another reduction of `per_token` has no gradient. Peak memory stays O(chunk × V),
    plus the stored gradients, hidden-sized and weight-sized (the weight's in float32 until the
    last chunk).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    mask = mask.bool()
    rows = hidden[mask]
    acc = _acc_dtype(rows)
    if isinstance(token_weight, Tensor):
        if token_weight.shape != mask.shape:
            raise ValueError(
                f"token_weight shape {tuple(token_weight.shape)} != mask {tuple(mask.shape)}"
            )
        weights = token_weight.detach()[mask].to(acc)
    else:
        weights = rows.new_full((rows.shape[0],), float(token_weight), dtype=acc)
    grad_on = torch.is_grad_enabled()
    loss, values = _FusedLoss.apply(
        rows,
        weight,
        weights,
        rule,
        chunk_size,
        grad_on and rows.requires_grad,
        grad_on and weight.requires_grad,
    )
    per_token = values.new_zeros(mask.shape).masked_scatter(mask, values)
    return ReducedLoss(loss, per_token)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_loss_args(kind: Kind, beta: float, temperature: float) -> None:
    """Fail before any chunk runs, with `losses`' messages."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    _check_temperature(temperature)


def chunked_divergence_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    mask: Tensor,
    token_weight: Tensor | float,
    *,
    kind: Kind,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    vocab_limit: int | None = None,
) -> ReducedLoss:
    """`chunked.chunked_divergence` reduced with `token_weight`, its gradient made in the forward pass.

    loss = Σ_{masked i} w_i · D(i), D = forward KL(p_t‖p_s), reverse KL(p_s‖p_t) or JSD_β as in
    `chunked.chunked_divergence`; with w = 1/N (N the step's target tokens) it equals
    `losses.reduce_tokens(chunked_divergence(...), mask, N)`, value and gradient, in under half
    the time (0.43× on 2 CPU threads, 16 × 256 positions, V = 1024, forward + backward): no
    logits recomputed in backward, no autograd graph over [chunk, V] tensors. The gradient w.r.t.
    the student's logits is analytic (see `_divergence_rule`).
    """
    _check_loss_args(kind, beta, temperature)
    student_weight = vocab_rows(student_weight, vocab_limit)
    teacher_weight = vocab_rows(teacher_weight, vocab_limit).detach()
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"student V={student_weight.shape[0]} != teacher V={teacher_weight.shape[0]}: "
            "pass vocab_limit=len(tokenizer)"
        )
    rule = _divergence_rule(
        teacher_hidden.detach()[mask.bool()],
        teacher_weight,
        kind=kind,
        beta=beta,
        temperature=temperature,
    )
    return fused_reduced_loss(rule, student_hidden, student_weight, mask, token_weight, chunk_size)


def chunked_topk_divergence_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    mask: Tensor,
    token_weight: Tensor | float,
    *,
    kind: Kind,
    beta: float = 0.5,
    temperature: float = 1.0,
    tail: bool = False,
    chunk_size: int = 1024,
    vocab_limit: int | None = None,
) -> ReducedLoss:
    """`chunked.chunked_topk_divergence` reduced with `token_weight`, gradient made in forward.

    loss = Σ_{masked i} w_i · D(q_s‖q_t or q_t‖q_s, as `kind`)(i) over the k (+ tail) buckets of
    `topk_losses.topk_log_probs`; see `_topk_rule` for how the gradient is made.
    """
    _check_loss_args(kind, beta, temperature)
    mask = mask.bool()
    rule = _topk_rule(
        teacher_topk_ids[mask],
        teacher_topk_logprobs.detach()[mask],
        kind=kind,
        beta=beta,
        temperature=temperature,
        tail=tail,
    )
    weight = vocab_rows(student_weight, vocab_limit)
    return fused_reduced_loss(rule, student_hidden, weight, mask, token_weight, chunk_size)


def chunked_cross_entropy_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    target_ids: Tensor,
    mask: Tensor,
    token_weight: Tensor | float,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    vocab_limit: int | None = None,
) -> ReducedLoss:
    """Σ_{masked i} w_i · (−log p_s(y_i)), the gradient (p_s − onehot(y)) / τ made in forward."""
    _check_temperature(temperature)
    rule = _cross_entropy_rule(target_ids[mask.bool()], temperature=temperature)
    weight = vocab_rows(student_weight, vocab_limit)
    return fused_reduced_loss(rule, student_hidden, weight, mask, token_weight, chunk_size)
