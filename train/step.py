"""One optimizer step of the trainer (``train.trainer``): what a run holds, and the step.

Its global batch is the plan's indices for the step; each process takes its share of every
micro-batch (``batching.share``), and each micro-batch contributes Σ per-token loss / N, with N
the target tokens of the whole global batch: the gradient of one big batch whatever the number
of processes or micro-batches (the trainer's module docstring says why). The student runs its
decoder only (:class:`HiddenStates`); ``train.fused`` applies the lm_head a chunk of positions at
a time and makes each chunk's gradient in the forward pass.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from train.batching import BatchPlan, Example, collate, micro_batches, share
from train.config import TrainConfig
from train.distributed import Dist
from train.fused import (
    chunked_cross_entropy_loss,
    chunked_divergence_loss,
    chunked_topk_divergence_loss,
)

CHUNK_SIZE = 1024  # positions per chunk of logits: 1024 × 151936 × 4 B = 0.6 GB for Qwen3


class HiddenStates(nn.Module):
    """The causal LM's decoder alone: last hidden states [B, T, H], no lm_head.

    The loss applies the lm_head weight chunk by chunk (train.fused). Calling the decoder through
    this module keeps DDP's forward, and so its gradient synchronisation, on the path.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.lm.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        )
        return out.last_hidden_state


@dataclass
class Run:
    """Everything one training run holds: built by `prepare_run`, advanced by `train_step`."""

    cfg: TrainConfig
    dist: Dist
    lm: Any  # the causal LM being trained (LoRA layers injected when enabled)
    peft: Any  # its PeftModel wrapper, or None
    module: nn.Module  # HiddenStates(lm), DDP-wrapped under several processes
    teacher: Any
    examples: Sequence[Example]  # a list, or an ExampleView of an examples file on disk
    target_lengths: np.ndarray  # per example: the steps' token counts without building one
    plan: BatchPlan
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    params: list[nn.Parameter]
    vocab_limit: int | None
    pad_id: int
    device: torch.device
    dropped: int = 0  # examples whose prompt alone reaches cfg.max_length
    truncated: int = 0  # examples whose target was cut to fit


def train_step(run: Run, step: int) -> dict[str, Any]:
    """One optimizer step (`step` is 1-based); returns its loss, tokens, grad_norm, lr, skipped.

    Forward/backward of this process's micro-batches, then one update, or none if the loss or
    the gradient norm is not finite.
    """
    cfg, dist = run.cfg, run.dist
    indices = run.plan.batch(step - 1)
    n_tokens = int(run.target_lengths[indices].sum())
    micro = micro_batches(indices, cfg.batch_size)
    local = torch.zeros((), device=run.device)
    for a, whole in enumerate(micro):
        idx = share(whole, dist.world, dist.rank)
        batch = collate([run.examples[i] for i in idx], run.pad_id).to(run.device)
        # The teacher first, before the student's graph exists: the step's peak memory is then
        # max(teacher activations, student graph) rather than their sum.
        teacher_hidden = _teacher_hidden(run.teacher, batch) if _online(cfg) else None
        with dist.no_sync(run.module, sync=a == len(micro) - 1), _autocast(run):
            hidden = run.module(batch.input_ids, batch.attention_mask)[:, :-1]
            hidden = hidden.to(run.lm.get_output_embeddings().weight.dtype)
            loss = _loss(run, batch, hidden, teacher_hidden, n_tokens)
            del teacher_hidden
            (loss * dist.world).backward()  # DDP/FSDP average over processes; the loss is a sum
        local += loss.detach()
    return _update(run, dist.sum(local), n_tokens)


def _autocast(run: Run):
    """bf16 compute over float32 weights (cfg.precision "bf16-mixed") where FSDP does not
    already cast the parameters itself (its MixedPrecisionPolicy: train.distributed)."""
    if run.cfg.precision != "bf16-mixed" or run.dist.sharded:
        return nullcontext()
    return torch.autocast(run.device.type, dtype=torch.bfloat16)


def _online(cfg: TrainConfig) -> bool:
    return cfg.loss != "ce" and cfg.teacher_mode == "online"


def _loss(
    run: Run, batch: Any, hidden: Tensor, teacher_hidden: Tensor | None, n_tokens: int
) -> Tensor:
    """Σ per-token loss of cfg.loss over the micro-batch's targets / N, N = `n_tokens` of the step.

    = losses.reduce_tokens(per_token, loss_mask, N). The weight 1/N is known before the forward
    pass, so the `*_loss` functions of train.fused make the gradient chunk by chunk within it (no
    logits recomputed in backward). `teacher_hidden`: `_teacher_hidden`'s, online only. CE
    ignores the temperature (SFT is at τ = 1).
    """
    cfg = run.cfg
    weight = run.lm.get_output_embeddings().weight
    mask, token_weight = batch.loss_mask, 1.0 / max(n_tokens, 1)
    common = {"chunk_size": CHUNK_SIZE, "vocab_limit": run.vocab_limit}
    if cfg.loss == "ce":
        return chunked_cross_entropy_loss(
            hidden, weight, batch.labels, mask, token_weight, **common
        ).loss
    kl = {"kind": cfg.loss, "beta": cfg.beta, "temperature": cfg.temperature}
    if cfg.teacher_mode == "offline_topk":
        return chunked_topk_divergence_loss(
            hidden,
            weight,
            batch.topk_ids,
            batch.topk_logprobs,
            mask,
            token_weight,
            tail=cfg.topk_tail,
            **kl,
            **common,
        ).loss
    assert teacher_hidden is not None
    teacher_weight = run.teacher.get_output_embeddings().weight.detach()
    return chunked_divergence_loss(
        hidden, weight, teacher_hidden, teacher_weight, mask, token_weight, **kl, **common
    ).loss


@torch.no_grad()
def _teacher_hidden(teacher: Any, batch: Any) -> Tensor:
    """Teacher hidden states [B, T-1, H_t] at the student's positions.

    With its own prompts (self-distillation) the teacher's target positions differ from the
    student's; the target tokens are the same, so its states are moved onto the student's mask.
    """
    decoder = teacher.get_decoder()
    if batch.teacher_input_ids is None:
        out = decoder(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        )
        return out.last_hidden_state[:, :-1]
    own = decoder(
        input_ids=batch.teacher_input_ids,
        attention_mask=batch.teacher_attention_mask,
        use_cache=False,
    ).last_hidden_state[:, :-1]
    aligned = own.new_zeros(*batch.loss_mask.shape, own.shape[-1])
    aligned[batch.loss_mask] = own[batch.teacher_loss_mask]
    return aligned


def _update(run: Run, loss: Tensor, n_tokens: int) -> dict[str, Any]:
    """Clip, then step unless the loss or the gradient norm is not finite; advance the schedule."""
    grad_norm = run.dist.clip(run.params, run.cfg.max_grad_norm)
    finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
    lr = run.scheduler.get_last_lr()[0]
    if finite:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    with warnings.catch_warnings():  # a skipped first step makes torch warn about the order
        warnings.filterwarnings(
            "ignore", message="Detected call of `lr_scheduler.step", category=UserWarning
        )
        run.scheduler.step()
    return {
        # None, not NaN, for non-finite values: SQL averages skip NULLs but NaN poisons them.
        "loss": float(loss) if torch.isfinite(loss) else None,
        "tokens": n_tokens,
        "grad_norm": float(grad_norm) if torch.isfinite(grad_norm) else None,
        "lr": float(lr),
        "skipped": not finite,
    }
