"""Bootstrap the reference world: a tokenizer, a two-mode student, a teacher that rewrites it.

Everything here is a plain function (``flows/bootstrap.py`` wraps it for
Prefect and the stage store). The models are real Qwen3 checkpoints saved with
``save_pretrained``; the rest of the system loads them like any other. Training
goes through the project's one trainer (``train.trainer``, cross-entropy), so a
long run on a CPU writes checkpoints and resumes where it was killed.

Why these shapes: the student must be small enough to be imperfect (50–85%
accuracy) and to sample fast on a CPU; the teacher is ~4x larger. What each is
trained on, and why, is in ``world/corpus.py``.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from data.answers import IM_END, format_prompt
from data.prompts import cued_prompt, rewrite_prompt
from data.traces import think_close_id, trace_rows
from engines.base import GenerationParams
from engines.hf import HFEngine
from train.batching import Example
from train.checkpoint import checkpoint_step, latest_checkpoint
from train.config import TrainConfig
from train.models import load_tokenizer, resolve_device
from train.trainer import train
from world import (
    build_problems,
    corpus_texts,
    problem_from_record,
    render_concise,
    render_target,
    style_of,
)
from world.config import BootstrapConfig, Recipe, build_tiny_model
from world.corpus import encode, make_texts
from world.tokenizer import train_tokenizer

log = logging.getLogger("mpd.bootstrap")


# -- training ------------------------------------------------------------------
def recipe_config(recipe: Recipe, checkpoint_every: int) -> TrainConfig:
    """A bootstrap recipe as the trainer's config: cross-entropy on the completion tokens."""
    return TrainConfig(
        loss="ce",
        lr=recipe.lr,
        steps=recipe.steps,
        batch_size=recipe.batch_size,
        warmup_steps=recipe.warmup_steps,
        min_lr_ratio=recipe.min_lr_ratio,
        checkpoint_every=checkpoint_every,
        max_length=4096,  # rewrite prompts of verbosity-3 traces reach ~1,500 tokens
    )


def train_model(
    model: torch.nn.Module,
    examples: Sequence[Example],
    recipe: Recipe,
    *,
    tokenizer,
    work: Path,
    seed: int,
    name: str,
    checkpoint_every: int = 50,
) -> dict:
    """Cross-entropy through the project's trainer, checkpointed under ``work``.

    The checkpoints make a long CPU run resumable: the same command, run again after a
    kill, continues from the newest one (the examples are a function of the seed and
    the config, so it sees the same data). Returns what the manifest records.
    """

    cfg = recipe_config(recipe, checkpoint_every)

    def report(row: dict) -> None:
        if row["step"] % 50 == 0 or row["step"] == cfg.steps:
            log.info(
                "%s step %d/%d loss %.4f (%.0fs)",
                name,
                row["step"],
                cfg.steps,
                row["loss"],
                row["elapsed_s"],
            )

    if (found := latest_checkpoint(work)) is not None:
        log.info("%s: resuming from the checkpoint of step %d", name, checkpoint_step(found))
    result = train(
        model, examples, cfg, out_dir=work, tokenizer=tokenizer, seed=seed, log_fn=report
    )
    last = result.log[-1]
    return {"loss": round(last["loss"], 4), "train_s": round(last["elapsed_s"], 1)}


def exclusion_set(seed: int, cfg: BootstrapConfig) -> tuple[list[dict], list[str]]:
    """The campaign's test/held-out problems (never trained on) and their questions."""

    records = build_problems(seed, 0, cfg.exclude_test, cfg.eval_heldout, cfg.difficulty)
    return records, [r["prompt"] for r in records]


def tokenizer_texts(seed: int, cfg: BootstrapConfig) -> list[str]:
    """World text in every style the models will read, cued and rewrite prompts included."""

    records = build_problems(seed + 7, 600, 0, 100, cfg.difficulty)
    texts = corpus_texts(records, seed=seed, verbosity=3)
    mixed = cfg.model_copy(update={"rewrite_share": 1.0})
    rewrites = make_texts("teacher", 400, mixed, seed=seed + 11, workers=1)
    students = make_texts("student", 400, cfg, seed=seed + 13, workers=1)
    return texts + [p + c + IM_END for p, c in rewrites + students]


# -- evaluation ------------------------------------------------------------------
def generate_rows(
    engine,
    tokenizer,
    prompts: list[str],
    records: list[dict],
    *,
    role: str,
    model: str,
    max_tokens: int,
) -> list[dict]:
    """Greedy completions of ``prompts`` as ``bootstrap_evals`` rows (role, split, family, style)."""

    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    params = GenerationParams(
        n=1, temperature=0.0, max_tokens=max_tokens, stop_token_ids=(tokenizer.eos_token_id,)
    )
    return trace_rows(
        records,
        ids,
        engine.generate(ids, params),
        round_=0,
        think_close_id=think_close_id(tokenizer),
        model=model,
        extra=lambda rec, row, _: {
            "role": role,
            "split": rec["split"],
            "family": rec["family"],
            "style": style_of(row["completion"]),
            "orig_think_tokens": None,
            "orig_correct": None,
        },
    )


def _mean(xs: Sequence[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def evaluate_world(
    student, teacher, tokenizer, records: list[dict], max_tokens: int, style: str = "steps"
) -> tuple[list[dict], dict]:
    """The world's properties, measured greedily on the eval problems (table bootstrap_evals).

    Roles: ``student`` reads the plain prompt (its verbose habit), ``student_cued`` the
    problem inside the concise cue (its short mode), ``teacher`` solves directly,
    ``rewrite`` is the teacher rewriting the student's plain trace.
    """

    # On a GPU one batch holds every prompt; on a CPU the default bounds memory.
    on_gpu = next(student.parameters()).is_cuda
    kw = {"max_batch_tokens": 1 << 22} if on_gpu else {}
    s_eng, t_eng = HFEngine(student, tokenizer, **kw), HFEngine(teacher, tokenizer, **kw)
    gen = {"tokenizer": tokenizer, "records": records, "max_tokens": max_tokens}
    plain = [format_prompt(r["prompt"]) for r in records]
    student_rows = generate_rows(s_eng, prompts=plain, role="student", model="student", **gen)
    rows = student_rows + generate_rows(
        s_eng,
        prompts=[cued_prompt(r["prompt"]) for r in records],
        role="student_cued",
        model="student",
        **gen,
    )
    rows += generate_rows(t_eng, prompts=plain, role="teacher", model="teacher", **gen)
    rw_prompts = [
        rewrite_prompt(r["prompt"], s["completion"])
        for r, s in zip(records, student_rows, strict=True)
    ]
    rewrites = generate_rows(t_eng, prompts=rw_prompts, role="rewrite", model="teacher", **gen)
    for rw, s in zip(rewrites, student_rows, strict=True):
        rw["orig_think_tokens"], rw["orig_correct"] = s["think_tokens"], s["correct"]
    rows += rewrites

    def think_len(text: str) -> int:
        return len(
            tokenizer(text[: text.rindex("</think>") + 8], add_special_tokens=False)["input_ids"]
        )

    metrics: dict[str, float | None] = {}
    for split in ("test", "heldout"):
        for role in ("student", "student_cued", "teacher"):
            sel = [r for r in rows if r["role"] == role and r["split"] == split]
            metrics[f"{role}_{split}_accuracy"] = _mean([r["correct"] for r in sel])
            metrics[f"{role}_{split}_think"] = _mean([r["think_tokens"] for r in sel])
            if role != "teacher":
                metrics[f"{role}_{split}_{style}_share"] = _mean([r["style"] == style for r in sel])
        problems = [problem_from_record(r) for r in records if r["split"] == split]
        metrics[f"concise_{split}_think"] = _mean([think_len(render_concise(p)) for p in problems])
        metrics[f"target_{split}_think"] = _mean(
            [think_len(render_target(p, style)) for p in problems]
        )
        sel = [r for r in rewrites if r["split"] == split and r["orig_correct"]]
        metrics[f"rewrite_{split}_keeps_correct"] = _mean([r["correct"] for r in sel])
        metrics[f"rewrite_{split}_think_ratio"] = _mean(
            [r["think_tokens"] / max(1, r["orig_think_tokens"]) for r in sel]
        )
    st, ct = metrics["student_test_think"], metrics["concise_test_think"]
    metrics["student_verbosity_ratio"] = round(st / ct, 3) if st and ct else None
    cued = metrics["student_cued_test_think"]
    metrics["student_plain_to_cued_think"] = round(st / cued, 3) if st and cued else None
    return rows, metrics


# -- the whole bootstrap -----------------------------------------------------------
ROLES = ("student", "teacher")


def run_bootstrap(
    cfg: BootstrapConfig,
    out: Path,
    *,
    seed: int = 0,
    device: str = "auto",
    workers: int | None = None,
    sources: dict[str, Path] | None = None,
    parts: Sequence[str] = ROLES,
) -> tuple[list[dict], dict]:
    """Build the world's tokenizer, student and teacher into ``out``; returns (eval rows, metrics).

    From scratch (``sources`` None): a tokenizer and both models trained with
    ``student_train`` / ``teacher_train`` (minutes on a GPU, many hours on a CPU).
    From ``sources`` (role -> an assets directory holding it; the tokenizer comes from the
    student's): each role in ``parts`` is fine-tuned from its weights there with
    ``student_finetune`` / ``teacher_finetune``, the others are copied unchanged. That is how
    a CPU makes a new world from an old one, and how roles trained apart (two machines, two
    cores) are put together. Checkpoints live in ``out/.checkpoints`` until the models are
    saved, so a killed run resumes.
    """
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    if sources is None:
        tok = train_tokenizer(tokenizer_texts(seed, cfg), cfg.vocab_size, out / "tokenizer")
        log.info("tokenizer: %d tokens", len(tok))
    else:
        shutil.rmtree(out / "tokenizer", ignore_errors=True)
        shutil.copytree(sources["student"] / "tokenizer", out / "tokenizer")
        tok = load_tokenizer(out / "tokenizer")
    eval_records, exclude = exclusion_set(seed, cfg)
    timings: dict[str, float] = {}
    models = {}
    for offset, role in enumerate(ROLES, start=1):
        if sources is not None and role not in parts:
            shutil.rmtree(out / role, ignore_errors=True)
            shutil.copytree(sources[role] / role, out / role)
            models[role] = AutoModelForCausalLM.from_pretrained(out / role).to(dev)
            continue
        if sources is None:
            recipe = cfg.student_train if role == "student" else cfg.teacher_train
            mcfg = cfg.student if role == "student" else cfg.teacher
            model = build_tiny_model(tok, mcfg, seed=seed).to(dev)
        else:
            recipe = cfg.student_finetune if role == "student" else cfg.teacher_finetune
            model = AutoModelForCausalLM.from_pretrained(sources[role] / role).to(dev)
        texts = make_texts(
            role, recipe.examples, cfg, seed=seed + offset, exclude=exclude, workers=workers
        )
        done = train_model(
            model,
            encode(tok, texts),
            recipe,
            tokenizer=tok,
            work=out / ".checkpoints" / role,
            seed=seed,
            name=role,
            checkpoint_every=cfg.checkpoint_every,
        )
        model.save_pretrained(out / role)
        tok.save_pretrained(out / role)
        models[role] = model
        timings[f"{role}_final_loss"], timings[f"{role}_train_s"] = done["loss"], done["train_s"]
    shutil.rmtree(out / ".checkpoints", ignore_errors=True)
    return _evaluate(cfg, models, tok, eval_records, timings, started, dev)


def _evaluate(
    cfg: BootstrapConfig,
    models: dict[str, torch.nn.Module],
    tok,
    eval_records: list[dict],
    timings: dict[str, float],
    started: float,
    dev: torch.device,
) -> tuple[list[dict], dict]:
    """The bootstrap's evaluation and metrics, with the timings and parameter counts."""
    t0 = time.monotonic()
    chosen = [r for r in eval_records if r["split"] == "test"][: cfg.eval_problems]
    chosen += [r for r in eval_records if r["split"] == "heldout"][: cfg.eval_heldout]
    rows, metrics = evaluate_world(
        models["student"], models["teacher"], tok, chosen, cfg.max_new_tokens, cfg.target_style
    )
    timings["eval_s"] = round(time.monotonic() - t0, 1)
    timings["total_s"] = round(time.monotonic() - started, 1)
    params = {r: sum(p.numel() for p in m.parameters()) for r, m in models.items()}
    return rows, {**metrics, **timings, "params": params, "device": str(dev)}
