"""The training loop: distillation (offline top-k or online teacher) or SFT, resumable, data-parallel.

    rows = []
    result = train(student, examples, cfg, out_dir=Path("ws/train/round=1"), tokenizer=tok,
                   log_fn=rows.append, seed=0, round_idx=1)
    result.model_dir   # ws/train/round=1/model: a Hugging Face directory, or a LoRA adapter

One optimizer step, and why it is built this way:

1. Its global batch (cfg.batch_size × cfg.grad_accum sequences, whatever the process count) comes
   from `batching.BatchPlan`, a function of (seed, step): resuming needs only the step number.
   Each of N processes takes its share of every micro-batch (`share`), so 1 and N processes
   train on the same batches and make the same steps, within float rounding. The
   examples are a list or a `train.example_file.ExampleView` (the train stage's: a memory-mapped
   Arrow file, each example cut from it when its micro-batch is collated); the plan and each
   step's token count read their lengths, never the examples.
2. N = the target tokens of the whole global batch, and each micro-batch contributes
   Σ per-token loss / N, so accumulation and data parallelism give the gradient of one big batch
   (a per-micro-batch mean would over-weight short ones). Every process holds the same examples
   and plan, so each computes the same N locally: no all-reduce is needed for the count.
3. The student runs its decoder only; `train.fused` multiplies the hidden states by the lm_head
   weight a chunk of positions at a time, so B × T × V logits never exist, and makes each chunk's
   gradient right there (the 1/N weights are known up front), so backward recomputes nothing. An
   online teacher runs its decoder under no_grad; its logits are made chunk by chunk too. Targets
   are masked by length: the EOS is trained even if pad == eos.
4. Gradients are clipped; a non-finite loss or gradient norm skips the optimizer step (the weights
   stay as they were) and is counted. The schedule still advances: it is tied to the step number.
5. One row per step (data.schemas.TRAIN_LOG) goes to `log_fn`; a checkpoint is written every
   cfg.checkpoint_every steps and at the last one, and a restart resumes from the newest.

Several processes: `torchrun --nproc-per-node 2 -m train.trainer spec.json` (gloo on CPUs, NCCL
on GPUs), DDP or FSDP2 as cfg.distributed.strategy says (train.distributed); the train stage
starts it itself (train.launch). See `LaunchSpec`.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from data.errors import InternalError, UserError
from data.fsutil import atomic_write_json
from data.memory import naming_memory
from train.batching import (
    BatchPlan,
    Example,
    collate,
    fit_examples,
    load_examples,
    micro_batches,
    share,
)
from train.checkpoint import (
    check_compatible,
    clean_partial,
    latest_checkpoint,
    read_state,
    restore,
    save_model_dir,
    write_checkpoint,
)
from train.config import LoraConfig, TrainConfig
from train.distributed import Dist
from train.example_file import ExampleView, open_examples
from train.fused import (
    chunked_cross_entropy_loss,
    chunked_divergence_loss,
    chunked_topk_divergence_loss,
)
from train.launch import RESULT, LaunchSpec, progress, rank_failures
from train.models import load_model, load_tokenizer
from train.schedule import build_scheduler

CHUNK_SIZE = 1024  # positions per chunk of logits: 1024 × 151936 × 4 B = 0.6 GB for Qwen3
MODEL_DIR = "model"


# What to change when a training step does not fit in memory (the step is named, and its device).
FIT = "lower train.batch_size (raise grad_accum to keep the step's size) or train.max_length"


class TrainInputError(UserError):
    """A training run asked for something it cannot do (a config or model mistake; one line)."""


@dataclass
class TrainResult:
    """What `train` hands back. `log` covers steps 1..cfg.steps, those before a resume included."""

    model: Any  # the trained model in eval mode (adapters merged when cfg.lora.merge)
    log: list[dict[str, Any]]
    skipped_steps: int
    resumed_from: int | None  # the step of the checkpoint this run started from
    model_dir: Path | None  # out_dir/model, None without out_dir
    dropped_examples: int = 0  # prompt alone ≥ cfg.max_length
    truncated_examples: int = 0  # target cut to fit cfg.max_length
    step_seconds: float = 0.0  # inside train_step this run (the compute floor; no checkpoints)


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
    examples: Sequence[Example]  # a list, or an ExampleView of a memory-mapped examples file
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


def train(
    model: Any,
    examples: Sequence[Example],
    cfg: TrainConfig,
    *,
    out_dir: Path | str | None = None,
    teacher: Any = None,
    tokenizer: Any = None,
    log_fn: Callable[[dict[str, Any]], None] | None = None,
    seed: int = 0,
    round_idx: int = 0,
    dist: Dist | None = None,
    fresh: Callable[[], Any] | None = None,
) -> TrainResult:
    """Train `model` in place for cfg.steps optimizer steps; see the module docstring.

    `teacher`: a frozen causal LM for cfg.teacher_mode == "online" (never the student object
    itself). `tokenizer`: saved with the model, and len(tokenizer) slices padding rows off the
    logits. `out_dir` None trains in memory: no checkpoints, nothing saved. `log_fn` gets each
    TRAIN_LOG row on the main process. Reseeds torch's generator (from `seed`) for dropout.
    `dist`: the process group of a launched run (None: this process alone). `fresh`: builds
    the untrained student again, on rank 0 of an FSDP run only: the trained weights are
    gathered into it to be saved whole (the sharded model has no whole weight to save).
    """
    run = prepare_run(
        model,
        examples,
        cfg,
        teacher=teacher,
        tokenizer=tokenizer,
        seed=seed,
        dist=dist,
    )
    out = None if out_dir is None else Path(out_dir)
    start, log, elapsed, resumed = (
        _resume(run, out, seed) if out is not None else (0, [], 0.0, None)
    )
    t0 = time.perf_counter()
    step_seconds = 0.0
    for step in range(start + 1, cfg.steps + 1):
        t_step = time.perf_counter()
        with naming_memory(f"training step {step} (batch_size {cfg.batch_size})", run.device, FIT):
            row = {"round": round_idx, "step": step, **train_step(run, step)}
        step_seconds += time.perf_counter() - t_step
        row["elapsed_s"] = elapsed + time.perf_counter() - t0
        log.append(row)
        if log_fn is not None and run.dist.is_main:
            log_fn(row)
        if out is not None and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            _save_checkpoint(run, out, step, log, seed)
    final, model_dir = _finish(run, out, tokenizer, fresh)
    skipped = sum(row["skipped"] for row in log)
    return TrainResult(
        final, log, skipped, resumed, model_dir, run.dropped, run.truncated, step_seconds
    )


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
    peft = _with_lora(model, cfg.lora) if cfg.lora.enabled else None
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


def _with_lora(model: Any, lora: LoraConfig) -> Any:
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


# ---- One optimizer step ----------------------------------------------------------------------


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


# ---- Checkpoints and the final model ---------------------------------------------------------


def _save_checkpoint(run: Run, out: Path, step: int, log: list[dict], seed: int) -> None:
    state = {
        "elapsed_s": log[-1]["elapsed_s"],
        "log": log,
        "config": run.cfg.model_dump(mode="json"),
        "seed": seed,
    }
    write_checkpoint(
        out,
        step,
        dist=run.dist,
        module=run.module,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        state=state,
    )


def _resume(run: Run, out: Path, seed: int) -> tuple[int, list[dict], float, int | None]:
    """Load the newest complete checkpoint, if any: (step, log, elapsed, step resumed from).

    Rank 0 picks it and tells the others, so all load the same one."""
    if run.dist.is_main:
        clean_partial(out)
    path = run.dist.broadcast(latest_checkpoint(out))
    if path is None:
        return 0, [], 0.0, None
    state = read_state(path)
    check_compatible(state, config=run.cfg.model_dump(mode="json"), seed=seed, path=path)
    restore(
        path, dist=run.dist, module=run.module, optimizer=run.optimizer, scheduler=run.scheduler
    )
    step = int(state["step"])
    return step, list(state["log"]), float(state["elapsed_s"]), step


def _finish(
    run: Run, out: Path | None, tokenizer: Any, fresh: Callable[[], Any] | None
) -> tuple[Any, Path | None]:
    """The trained model (adapters merged on request), saved to out/model on the main process.

    FSDP: the shards are gathered whole on rank 0, into `fresh()` (the model again, untrained);
    the other ranks return None as the model."""
    model = run.lm if run.peft is None else run.peft
    if run.dist.sharded:
        model = _gathered(run, fresh)
    if model is not None and run.peft is not None and run.cfg.lora.merge:
        model = model.merge_and_unload()
    if model is not None:
        model.eval()
    if out is None:
        return model, None
    target = out / MODEL_DIR
    if run.dist.is_main:
        save_model_dir(model, tokenizer, target)
    run.dist.barrier()
    return model, target


def _gathered(run: Run, fresh: Callable[[], Any] | None) -> Any:
    """Rank 0: a whole copy of the sharded model, built by `fresh` and loaded with the
    gathered weights (with fresh adapters first under LoRA); the other ranks: None."""
    full = run.dist.full_state_dict(run.module)  # collective: every rank takes part
    if not run.dist.is_main:
        return None
    if fresh is None:
        raise InternalError("an FSDP run needs `fresh` to save its gathered weights")
    model = fresh()
    peft = _with_lora(model, run.cfg.lora) if run.cfg.lora.enabled else None
    lm = model if peft is None else peft.get_base_model()
    prefix = "lm."  # HiddenStates(lm)'s parameter names
    lm.load_state_dict({k.removeprefix(prefix): v for k, v in full.items()}, strict=True)
    return model if peft is None else peft


# ---- Launched runs (one process per device) --------------------------------------------------


def run_spec(path: Path | str) -> TrainResult:
    """Train from a LaunchSpec file in this process, one of torchrun's (or alone: world 1).

    Rank 0 writes out_dir/log.json and out_dir/result.json (what the train stage reads back),
    and prints one line per step for the stage to pass on (train.launch.PROGRESS)."""
    spec = LaunchSpec.model_validate_json(Path(path).read_text())
    if spec.threads:
        torch.set_num_threads(spec.threads)
    cfg = spec.config
    mixed = cfg.precision == "bf16-mixed"
    dist = Dist.from_env(cfg.distributed.strategy, cpu=spec.cpu, mixed_precision=mixed)
    dtype = "float32" if mixed else spec.dtype  # bf16-mixed keeps float32 master weights

    def fresh() -> Any:
        return load_model(spec.model, dtype=dtype, device="cpu")

    result = train(
        fresh(),
        _launch_examples(Path(spec.examples)),
        cfg,
        out_dir=spec.out_dir,
        teacher=load_model(spec.teacher, dtype=dtype, device="cpu") if spec.teacher else None,
        tokenizer=load_tokenizer(spec.tokenizer) if spec.tokenizer else None,
        log_fn=lambda row: progress(row, cfg.steps),
        seed=spec.seed,
        round_idx=spec.round_idx,
        dist=dist,
        fresh=fresh if dist.is_main else None,
    )
    if dist.is_main:
        out = Path(spec.out_dir)
        atomic_write_json(out / "log.json", result.log)
        atomic_write_json(out / RESULT, result_summary(result))
    dist.close()
    return result


def result_summary(result: TrainResult) -> dict[str, Any]:
    """What the train stage records of a launched run besides its log (out_dir/result.json)."""
    return {
        "skipped_steps": result.skipped_steps,
        "resumed_from": result.resumed_from,
        "step_seconds": result.step_seconds,
        "dropped_examples": result.dropped_examples,
        "truncated_examples": result.truncated_examples,
    }


def _launch_examples(path: Path) -> Sequence[Example]:
    return open_examples(path) if path.suffix == ".arrow" else load_examples(path)


if __name__ == "__main__":
    with rank_failures(sys.argv[1]):
        run_spec(sys.argv[1])
