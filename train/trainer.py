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
   examples are a list or a `train.example_file.ExampleView` (the train stage's: an Arrow file on
   disk, each example read from it when its micro-batch is collated); the plan and each
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data.errors import InternalError
from data.fsutil import atomic_write_json
from data.memory import naming_memory
from train.batching import (
    Example,
    load_examples,
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
from train.config import TrainConfig
from train.distributed import Dist
from train.example_file import open_examples
from train.launch import RESULT, LaunchSpec, progress, rank_failures
from train.models import load_model, load_tokenizer
from train.prepare import FIT, TrainInputError, prepare_run, with_lora
from train.step import Run, train_step

MODEL_DIR = "model"

# The trainer's public face; the run's parts live in train.prepare (building it) and train.step
# (one optimizer step).
__all__ = ["LaunchSpec", "TrainInputError", "TrainResult", "result_summary", "run_spec", "train"]


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
    peft = with_lora(model, run.cfg.lora) if run.cfg.lora.enabled else None
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
