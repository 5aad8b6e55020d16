"""A training run built from its inputs (``train.trainer.train``'s first half).

The examples fitted to ``max_length`` (their lengths read once, so the plan and each step's
token count never build an example), the inputs checked (a top-k width the scores lack, a
teacher whose vocabulary does not match), LoRA adapters, the optimizer and the schedule, the
model wrapped for the process group. A mistake here is one line (:class:`TrainInputError`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from data.errors import UserError
from train.batching import (
    BatchPlan,
    Example,
    fit_examples,
)
from train.config import LoraConfig, TrainConfig
from train.distributed import Dist
from train.example_file import ExampleView
from train.schedule import build_scheduler
from train.step import HiddenStates, Run

# What to change when a training step does not fit in memory (the step is named, and its device).
FIT = "lower train.batch_size (raise grad_accum to keep the step's size) or train.max_length"


class TrainInputError(UserError):
    """A training run asked for something it cannot do (a config or model mistake; one line)."""


def _fit(
    examples: Sequence[Example], max_length: int
) -> tuple[Sequence[Example], np.ndarray, np.ndarray, int, int]:
    """`fit_examples`, and the kept examples' (lengths, target lengths): read from a file's
    offsets when the examples are an ExampleView, so that none is built before its step."""
    if isinstance(examples, ExampleView):
        kept, dropped, truncated = examples.fit(max_length)
        return kept, kept.lengths, kept.target_lengths, dropped, truncated
    fitted, dropped, truncated = fit_examples(examples, max_length)
    lengths = np.array([ex.length for ex in fitted], dtype=np.int64)
    targets = np.array([len(ex.target_ids) for ex in fitted], dtype=np.int64)
    return fitted, lengths, targets, dropped, truncated


def _topk_sizes(examples: Sequence[Example]) -> set[int | None]:
    if isinstance(examples, ExampleView):
        return examples.topk_sizes()
    return {None if ex.topk_ids is None else ex.topk_ids.shape[-1] for ex in examples}


def _check_inputs(examples: Sequence[Example], cfg: TrainConfig, model: Any, teacher: Any) -> None:
    """Refuse a run that could only fail later, or silently train on the wrong thing."""
    if not examples:
        raise TrainInputError(f"no example fits max_length={cfg.max_length}: nothing to train on")
    if cfg.loss == "ce":
        return
    if cfg.teacher_mode == "online":
        if teacher is None:
            raise TrainInputError("teacher_mode 'online' needs a teacher model")
        if teacher is model:
            raise TrainInputError(
                "the teacher must be a frozen copy, not the student being trained"
            )
        return
    ks = _topk_sizes(examples)
    if None in ks:
        raise ValueError(
            "teacher_mode 'offline_topk' needs topk_ids/topk_logprobs on every example"
        )
    if len(ks) > 1:
        raise ValueError(f"examples carry different top-k sizes: {sorted(ks)}")


def prepare_run(
    model: Any,
    examples: Sequence[Example],
    cfg: TrainConfig,
    *,
    teacher: Any = None,
    tokenizer: Any = None,
    seed: int = 0,
    dist: Dist | None = None,
) -> Run:
    """Check the inputs and build model wrapper, optimizer, schedule and batch plan (no resume).

    `train` is prepare_run + resume + `train_step` per step + checkpoints + the final save; the
    pieces are public so that a benchmark can interleave single steps of several runs.
    """
    dist = dist or Dist()
    kept, lengths, target_lengths, dropped, truncated = _fit(examples, cfg.max_length)
    _check_inputs(kept, cfg, model, teacher)
    if cfg.batch_size < dist.world:
        raise TrainInputError(
            f"train.batch_size {cfg.batch_size} cannot be shared by {dist.world} processes: "
            f"raise it to {dist.world} or more (lower grad_accum to keep the step's size)"
        )
    torch.manual_seed(seed)  # LoRA's initial adapters: the same on every process
    peft = with_lora(model, cfg.lora) if cfg.lora.enabled else None
    lm = model if peft is None else peft.get_base_model()
    lm.train()
    if cfg.distributed.activation_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = dist.wrap(HiddenStates(lm), list(lm.get_decoder().layers))
    device = dist.device or next(lm.parameters()).device
    if teacher is not None:
        teacher.eval().to(device)
    torch.manual_seed(seed + dist.rank)  # dropout: one stream per process
    optimizer = _optimizer(lm, cfg)
    plan = BatchPlan(lengths, cfg.batch_size * cfg.grad_accum, seed)
    pad_id = getattr(tokenizer, "pad_token_id", None)  # any id works: masks come from lengths
    return Run(
        cfg,
        dist,
        lm,
        peft,
        module,
        teacher,
        kept,
        target_lengths,
        plan,
        optimizer,
        build_scheduler(optimizer, cfg),
        [p for p in lm.parameters() if p.requires_grad],
        None if tokenizer is None else len(tokenizer),
        0 if pad_id is None else int(pad_id),
        device,
        dropped,
        truncated,
    )


def with_lora(model: Any, lora: LoraConfig) -> Any:
    """Wrap `model` with fresh trainable adapters; the base weights are frozen."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        raise TrainInputError(
            "the model already carries adapters: merge them before training new ones"
        )
    if "lm_head" in lora.target_modules:
        raise TrainInputError(
            "lm_head adapters are not supported: the loss reads the lm_head weight"
        )
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def _optimizer(lm: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (decaying norm gains and biases only hurts)."""
    trainable = [p for p in lm.parameters() if p.requires_grad]
    if not trainable:
        raise TrainInputError(
            "the model has no trainable parameters (an adapter loaded for inference?)"
        )
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)
