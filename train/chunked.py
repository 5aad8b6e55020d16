"""Full-vocabulary losses from hidden states, a chunk of positions at a time.

Logits are the largest tensors of a distillation step: 8 sequences × 4096 positions × 151936 ids
in float32 is 20 GB per side, and log_softmax, exp and their backward each make another of the same
size. So the callers pass the last hidden states and the lm_head weights instead, and here

1. the target positions are gathered first, [B, T, H] → [N, H] (prompt and pad cost nothing);
2. each chunk of `chunk_size` positions computes its logits (hidden @ weight.T, in the weights'
   dtype), casts them to float32 and reduces them to one loss per token, inside
   `torch.utils.checkpoint`: backward keeps only the chunk's inputs, recomputes its logits and
   frees them again, so peak memory is O(chunk_size × V) instead of O(B × T × V), for one more
   lm_head matmul per chunk (two with a full-vocabulary teacher);
3. the per-token values are scattered back to [B, T] (zeros off the mask), ready for
   `losses.reduce_tokens`.

The per-token math is `train.losses`' own; these functions only decide what is alive at once.
Hidden states must already be shifted like logits (position t predicts token t + 1).

These per-token functions suit any reduction and are the reference for `train.fused`, which the
trainer uses: the same losses already reduced, their gradient made in the forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from train.divergences import Kind
from train.losses import cross_entropy, per_token_divergence
from train.topk_losses import topk_per_token_divergence


def vocab_rows(weight: Tensor, vocab_limit: int | None) -> Tensor:
    """The lm_head rows of real tokens: the first `vocab_limit` (all with None), range-checked."""
    if vocab_limit is not None and not 0 < vocab_limit <= weight.shape[0]:
        raise ValueError(f"vocab_limit={vocab_limit} outside (0, {weight.shape[0]}]")
    return weight[:vocab_limit]


def chunked_per_token(
    fn: Callable[..., Tensor],
    mask: Tensor,
    per_position: tuple[Tensor, ...],
    shared: tuple[Tensor, ...],
    chunk_size: int,
) -> Tensor:
    """Apply `fn(*chunk_of_each_per_position, *shared) -> [n]` to the masked positions, chunk by chunk.

    `per_position` tensors are [B, T, ...] and are selected with `mask`; `shared` ones (weights) are
    passed whole. Each call is checkpointed. Returns [B, T] with zeros where the mask is False. An
    empty mask still runs one empty chunk, so the result keeps a (zero) gradient path.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    mask = mask.bool()
    rows = [x[mask] for x in per_position]
    n = rows[0].shape[0]
    pieces = [
        checkpoint(fn, *(r[i : i + chunk_size] for r in rows), *shared, use_reentrant=False)
        for i in range(0, max(n, 1), chunk_size)
    ]
    values = torch.cat(pieces)
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def _divergence_chunk(
    hidden: Tensor,
    teacher_hidden: Tensor,
    weight: Tensor,
    teacher_weight: Tensor,
    *,
    kind: Kind,
    beta: float,
    temperature: float,
) -> Tensor:
    with torch.no_grad():
        teacher_logits = teacher_hidden @ teacher_weight.T
    ones = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    return per_token_divergence(
        hidden @ weight.T, teacher_logits, ones, kind=kind, beta=beta, temperature=temperature
    )


def chunked_divergence(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    mask: Tensor,
    *,
    kind: Kind,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    vocab_limit: int | None = None,
) -> Tensor:
    """`losses.per_token_divergence` of (student_hidden @ student_weight.T) against the teacher's.

    Hidden states [B, T, H_s] and [B, T, H_t], lm_head weights [V_s, H_s] and [V_t, H_t] (no bias),
    mask [B, T]. `kind` is "forward_kl" (KL(p_t‖p_s)), "reverse_kl" (KL(p_s‖p_t)) or "jsd"
    (`losses.generalized_jsd`: β=0 forward, β=1 reverse). `vocab_limit` keeps the first rows of
    both weights. Returns [B, T] float32, zeros off the mask; the teacher gets no gradient.
    """
    fn = partial(_divergence_chunk, kind=kind, beta=beta, temperature=temperature)
    shared = (vocab_rows(student_weight, vocab_limit), vocab_rows(teacher_weight, vocab_limit))
    return chunked_per_token(
        fn, mask, (student_hidden, teacher_hidden.detach()), shared, chunk_size
    )


def _topk_chunk(
    hidden: Tensor,
    ids: Tensor,
    logprobs: Tensor,
    weight: Tensor,
    *,
    kind: Kind,
    beta: float,
    temperature: float,
    tail: bool,
) -> Tensor:
    ones = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    return topk_per_token_divergence(
        hidden @ weight.T,
        ids,
        logprobs,
        ones,
        kind=kind,
        beta=beta,
        temperature=temperature,
        tail=tail,
    )


def chunked_topk_divergence(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_topk_ids: Tensor,
    teacher_topk_logprobs: Tensor,
    mask: Tensor,
    *,
    kind: Kind,
    beta: float = 0.5,
    temperature: float = 1.0,
    tail: bool = False,
    chunk_size: int = 1024,
    vocab_limit: int | None = None,
) -> Tensor:
    """`losses.topk_per_token_divergence` with the student's logits made chunk by chunk.

    The student still needs its full-vocabulary logits (for log_softmax), so chunking pays here
    too. Teacher ids/logprobs [B, T, k]; see `topk_losses.topk_log_probs` for the buckets and τ.
    """
    fn = partial(_topk_chunk, kind=kind, beta=beta, temperature=temperature, tail=tail)
    per_position = (student_hidden, teacher_topk_ids, teacher_topk_logprobs.detach())
    shared = (vocab_rows(student_weight, vocab_limit),)
    return chunked_per_token(fn, mask, per_position, shared, chunk_size)


def _cross_entropy_chunk(
    hidden: Tensor, target_ids: Tensor, weight: Tensor, *, temperature: float
) -> Tensor:
    ones = torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    return cross_entropy(hidden @ weight.T, target_ids, ones, temperature=temperature)


def chunked_cross_entropy(
    student_hidden: Tensor,
    student_weight: Tensor,
    target_ids: Tensor,
    mask: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    vocab_limit: int | None = None,
) -> Tensor:
    """`losses.cross_entropy` −log p_s(y) per position, logits made chunk by chunk; [B, T]."""
    fn = partial(_cross_entropy_chunk, temperature=temperature)
    shared = (vocab_rows(student_weight, vocab_limit),)
    return chunked_per_token(fn, mask, (student_hidden, target_ids), shared, chunk_size)
