"""The divergences every loss of train/ is made of, between log-probability tensors.

Shared by the per-token losses (``train/losses.py``, ``train/topk_losses.py``) and the fused
ones (``train/fused.py``), so that all three compute one formula; the conventions (directions,
temperature, dtype, the detached teacher) are the module docstring of ``train/losses.py``::

    kl(log_p, log_q)                 KL(p‖q) = Σ_v p (log p − log q), with 0·log 0 = 0
    divergence(log_s, log_t, kind, beta)   kind: forward_kl = KL(p_t‖p_s), reverse_kl = KL(p_s‖p_t),
                                     jsd = TRL's generalised JSD_β (β = 0 forward, β = 1 reverse)
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Kind = Literal["forward_kl", "reverse_kl", "jsd"]
KINDS: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd")


def as_float(x: Tensor) -> Tensor:
    """float32 for half/bfloat16/float32 inputs, float64 kept as is."""
    return x if x.dtype == torch.float64 else x.float()


def log_probs(logits: Tensor, temperature: float) -> Tensor:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return F.log_softmax(as_float(logits) / temperature, dim=-1)


def masked(per_token: Tensor, mask: Tensor) -> Tensor:
    if per_token.shape != mask.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != positions {tuple(per_token.shape)}")
    return torch.where(mask.bool(), per_token, per_token.new_zeros(()))


def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p‖q) = Σ_v p(v) (log p(v) − log q(v)) over the last dimension, with 0·log 0 = 0."""
    terms = log_p.exp() * (log_p - log_q)
    return torch.where(log_p == -math.inf, 0.0, terms).sum(-1)


def jsd(log_s: Tensor, log_t: Tensor, beta: float) -> Tensor:
    """Generalised JSD with TRL's weights and endpoints; see `generalized_jsd`."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return kl(log_t, log_s)  # forward KL(p_t‖p_s)
    if beta == 1.0:
        return kl(log_s, log_t)  # reverse KL(p_s‖p_t)
    log_m = torch.logaddexp(log_t + math.log(beta), log_s + math.log1p(-beta))
    return beta * kl(log_t, log_m) + (1.0 - beta) * kl(log_s, log_m)


def divergence(log_s: Tensor, log_t: Tensor, kind: str, beta: float) -> Tensor:
    if kind == "forward_kl":
        return kl(log_t, log_s)
    if kind == "reverse_kl":
        return kl(log_s, log_t)
    if kind == "jsd":
        return jsd(log_s, log_t, beta)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
