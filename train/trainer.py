"""The training loop: distillation (offline top-k or online teacher) or SFT, resumable, data-parallel.

    rows = []
    result = train(student, examples, cfg, out_dir=Path("ws/train/round=1"), tokenizer=tok,
                   log_fn=rows.append, seed=0, round_idx=1)
    result.model_dir   # ws/train/round=1/model: a Hugging Face directory, or a LoRA adapter

One optimizer step, and why it is built this way:

1. Its global batch (cfg.batch_size × cfg.grad_accum × processes sequences) comes from
   `batching.BatchPlan`, a function of (seed, step): resuming needs only the step number, and one
   process accumulating 2 micro-batches sees exactly what 2 data-parallel processes see. The
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

Several processes: `torchrun --nproc_per_node 2 -m train.trainer spec.json` on CPUs (gloo; note
that `accelerate launch --cpu --num_processes 2` starts only one process), or
`accelerate launch --num_processes 2 -m train.trainer spec.json` on GPUs. See `LaunchSpec`.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from data.configbase import StrictModel
from data.errors import UserError
from data.fsutil import atomic_write_json
from data.memory import naming_memory
from train.batching import BatchPlan, Example, collate, fit_examples, load_examples, micro_batches
from train.checkpoint import (
    Checkpoint,
    check_compatible,
    clean_partial,
    latest_checkpoint,
    read_checkpoint,
    restore,
    rng_state,
    save_model_dir,
    write_checkpoint,
)
from train.config import LoraConfig, TrainConfig
from train.example_file import ExampleView, open_examples
from train.fused import (
    chunked_cross_entropy_loss,
    chunked_divergence_loss,
    chunked_topk_divergence_loss,
)
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


class Dist:
    """The few collective operations the loop needs, for one process or several under accelerate."""

    def __init__(self, accelerator: Any = None) -> None:
        self.acc = accelerator
        self.world = 1 if accelerator is None else accelerator.num_processes
        self.rank = 0 if accelerator is None else accelerator.process_index
        if accelerator is not None and str(accelerator.mixed_precision) == "fp16":
            raise TrainInputError("fp16 mixed precision needs a GradScaler step: use bf16 or fp32")
        if accelerator is not None and accelerator.gradient_accumulation_steps != 1:
            raise TrainInputError(
                "set cfg.grad_accum, not the Accelerator's gradient_accumulation_steps"
            )

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, module: nn.Module) -> nn.Module:
        return module if self.acc is None else self.acc.prepare_model(module)

    def no_sync(self, module: nn.Module, *, sync: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        return nullcontext() if sync or self.acc is None else self.acc.no_sync(module)

    def backward(self, loss: Tensor) -> None:
        if self.acc is None:
            loss.backward()
        else:
            self.acc.backward(loss)  # also unscales/scales under the Accelerator's mixed precision

    def sum(self, value: Tensor) -> Tensor:
        return value if self.world == 1 else self.acc.reduce(value, reduction="sum")

    def clip(self, params: list[nn.Parameter], max_norm: float) -> Tensor:
        if self.acc is None:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return self.acc.clip_grad_norm_(params, max_norm)

    def gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def barrier(self) -> None:
        if self.acc is not None:
            self.acc.wait_for_everyone()


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
    accelerator: Any = None,
) -> TrainResult:
    """Train `model` in place for cfg.steps optimizer steps; see the module docstring.

    `teacher`: a frozen causal LM for cfg.teacher_mode == "online" (never the student object
    itself). `tokenizer`: saved with the model, and len(tokenizer) slices padding rows off the
    logits. `out_dir` None trains in memory: no checkpoints, nothing saved. `log_fn` gets each
    TRAIN_LOG row on the main process. Reseeds torch's generator (from `seed`) for dropout.
    """
    run = prepare_run(
        model,
        examples,
        cfg,
        teacher=teacher,
        tokenizer=tokenizer,
        seed=seed,
        accelerator=accelerator,
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
    final, model_dir = _finish(run, out, tokenizer)
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
    accelerator: Any = None,
) -> Run:
    """Check the inputs and build model wrapper, optimizer, schedule and batch plan (no resume).

    `train` is prepare_run + resume + `train_step` per step + checkpoints + the final save; the
    pieces are public so that a benchmark can interleave single steps of several runs.
    """
    dist = Dist(accelerator)
    kept, lengths, target_lengths, dropped, truncated = _fit(examples, cfg.max_length)
    _check_inputs(kept, cfg, model, teacher)
    torch.manual_seed(seed)  # LoRA's initial adapters: the same on every process
    peft = _with_lora(model, cfg.lora) if cfg.lora.enabled else None
    lm = model if peft is None else peft.get_base_model()
    lm.train()
    module = dist.prepare(HiddenStates(lm))
    device = next(lm.parameters()).device
    if teacher is not None:
        teacher.eval().to(device)
    torch.manual_seed(seed + dist.rank)  # dropout: one stream per process
    optimizer = _optimizer(lm, cfg)
    plan = BatchPlan(lengths, _global_size(cfg, dist), seed)
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


def _global_size(cfg: TrainConfig, dist: Dist) -> int:
    return cfg.batch_size * cfg.grad_accum * dist.world


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
    micro = micro_batches(indices, cfg.batch_size, dist.world, dist.rank)
    local = torch.zeros((), device=run.device)
    for a, idx in enumerate(micro):
        batch = collate([run.examples[i] for i in idx], run.pad_id).to(run.device)
        # The teacher first, before the student's graph exists: the step's peak memory is then
        # max(teacher activations, student graph) rather than their sum.
        teacher_hidden = _teacher_hidden(run.teacher, batch) if _online(cfg) else None
        with dist.no_sync(run.module, sync=a == len(micro) - 1):
            hidden = run.module(batch.input_ids, batch.attention_mask)[:, :-1]
            hidden = hidden.to(run.lm.get_output_embeddings().weight.dtype)  # autocast: bf16
            loss = _loss(run, batch, hidden, teacher_hidden, n_tokens)
            del teacher_hidden
            dist.backward(loss * dist.world)  # DDP averages over processes; the loss is their sum
        local += loss.detach()
    return _update(run, dist.sum(local), n_tokens)


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
    rng = run.dist.gather(rng_state())
    if run.dist.is_main:
        trainable = {n: p.detach().cpu() for n, p in run.lm.named_parameters() if p.requires_grad}
        state = {
            "elapsed_s": log[-1]["elapsed_s"],
            "log": log,
            "config": run.cfg.model_dump(mode="json"),
            "seed": seed,
            "world_size": run.dist.world,
        }
        ckpt = Checkpoint(
            trainable, run.optimizer.state_dict(), run.scheduler.state_dict(), rng, state
        )
        write_checkpoint(out, step, ckpt)
    run.dist.barrier()


def _resume(run: Run, out: Path, seed: int) -> tuple[int, list[dict], float, int | None]:
    """Load the newest complete checkpoint, if any: (step, log, elapsed, step resumed from)."""
    if run.dist.is_main:
        clean_partial(out)
    run.dist.barrier()
    path = latest_checkpoint(out)
    if path is None:
        return 0, [], 0.0, None
    ckpt = read_checkpoint(path)
    config = run.cfg.model_dump(mode="json")
    check_compatible(ckpt.state, config=config, seed=seed, world_size=run.dist.world, path=path)
    params = {n: p for n, p in run.lm.named_parameters() if p.requires_grad}
    restore(
        ckpt, params=params, optimizer=run.optimizer, scheduler=run.scheduler, rank=run.dist.rank
    )
    step = int(ckpt.state["step"])
    return step, list(ckpt.state["log"]), float(ckpt.state["elapsed_s"]), step


def _finish(run: Run, out: Path | None, tokenizer: Any) -> tuple[Any, Path | None]:
    """The trained model (adapters merged on request), saved to out/model on the main process."""
    model = run.lm if run.peft is None else run.peft
    if run.peft is not None and run.cfg.lora.merge:
        model = run.peft.merge_and_unload()
    model.eval()
    if out is None:
        return model, None
    target = out / MODEL_DIR
    if run.dist.is_main:
        save_model_dir(model, tokenizer, target)
    run.dist.barrier()
    return model, target


# ---- Launched runs (one process per device) --------------------------------------------------


class LaunchSpec(StrictModel):
    """Everything a launched process needs, as one JSON file (no Python objects cross processes)."""

    model: str = Field(description="Hugging Face model directory of the student.")
    examples: str = Field(
        description="JSON lines written by batching.save_examples, or an examples file (.arrow,"
        " train.example_file: memory-mapped by every process)"
    )
    out_dir: str = Field(description="Checkpoints, out_dir/model and out_dir/log.json go here.")
    config: TrainConfig = Field(default_factory=TrainConfig)
    teacher: str | None = Field(None, description="Teacher directory (online mode).")
    tokenizer: str | None = Field(None, description="Tokenizer directory, saved with the model.")
    seed: int = 0
    round_idx: int = 0
    threads: int | None = Field(None, ge=1, description="torch threads per process.")
    cpu: bool = Field(False, description="Force CPU (gloo) even when GPUs are visible.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


def run_spec(path: Path | str) -> TrainResult:
    """Train from a LaunchSpec file in this process, one of `accelerate`'s/torchrun's processes."""
    from accelerate import Accelerator

    spec = LaunchSpec.model_validate_json(Path(path).read_text())
    if spec.threads:
        torch.set_num_threads(spec.threads)
    accelerator = Accelerator(cpu=spec.cpu)
    model = load_model(spec.model, dtype=spec.dtype, device="cpu")
    teacher = load_model(spec.teacher, dtype=spec.dtype, device="cpu") if spec.teacher else None
    result = train(
        model,
        _launch_examples(Path(spec.examples)),
        spec.config,
        out_dir=spec.out_dir,
        teacher=teacher,
        tokenizer=load_tokenizer(spec.tokenizer) if spec.tokenizer else None,
        seed=spec.seed,
        round_idx=spec.round_idx,
        accelerator=accelerator,
    )
    if accelerator.is_main_process:
        atomic_write_json(Path(spec.out_dir) / "log.json", result.log)
    accelerator.end_training()
    return result


def _launch_examples(path: Path) -> Sequence[Example]:
    return open_examples(path) if path.suffix == ".arrow" else load_examples(path)


if __name__ == "__main__":
    run_spec(sys.argv[1])
