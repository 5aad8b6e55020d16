"""Bootstrap the reference world: a tokenizer, a verbose student, a teacher that rewrites it.

Everything here is a plain function (``flows/bootstrap.py`` wraps it for
Prefect and the stage store). The models are real Qwen3 checkpoints saved with
``save_pretrained``; the rest of the system loads them like any other.

Why these shapes: the student must be small enough to be imperfect (50–85%
accuracy) and to sample fast on a CPU; the teacher is ~4x larger and trained
on two tasks that share one output style (see ``train/world_data.py``).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from train.config import BootstrapConfig, Recipe
from train.world_data import Example

log = logging.getLogger("mpd.bootstrap")


# -- training ------------------------------------------------------------------
def _lr_lambda(recipe: Recipe) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        span = max(1, recipe.steps - recipe.warmup_steps)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - recipe.warmup_steps) / span)))
        return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * cos

    return f


def _batches(examples: Sequence[Example], size: int, rng: random.Random) -> Iterator[list[int]]:
    """Endless length-bucketed batches: shuffle, sort pools of 50 batches, shuffle batches."""
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        pool = size * 50
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=lambda i: sum(map(len, examples[i])))
            batches = [chunk[i : i + size] for i in range(0, len(chunk), size)]
            rng.shuffle(batches)
            yield from batches


def _collate(examples: Sequence[Example], idx: list[int], pad: int, device: torch.device):
    seqs = [examples[i][0] + examples[i][1] for i in idx]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for row, (i, seq) in enumerate(zip(idx, seqs, strict=True)):
        p = len(examples[i][0])
        ids[row, : len(seq)] = torch.tensor(seq)
        attn[row, : len(seq)] = 1
        labels[row, p : len(seq)] = ids[row, p : len(seq)]  # by length: the EOS is trained
    return ids.to(device), attn.to(device), labels.to(device)


def sft(
    model: torch.nn.Module,
    examples: Sequence[Example],
    recipe: Recipe,
    *,
    pad_id: int,
    vocab_limit: int,
    seed: int,
    name: str = "model",
) -> list[dict]:
    """Cross-entropy on the completion tokens; returns the per-step log."""
    device = next(model.parameters()).device
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe))
    batches = _batches(examples, recipe.batch_size, random.Random(seed))
    history, start = [], time.monotonic()
    for step in range(recipe.steps):
        ids, attn, labels = _collate(examples, next(batches), pad_id, device)
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1, :vocab_limit]
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, vocab_limit), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == recipe.steps - 1:
            row = {
                "step": step,
                "loss": loss.item(),
                "grad_norm": float(norm),
                "lr": sched.get_last_lr()[0],
                "elapsed_s": time.monotonic() - start,
            }
            history.append(row)
            log.info(
                "%s step %d/%d loss %.4f (%.0fs)",
                name,
                step + 1,
                recipe.steps,
                row["loss"],
                row["elapsed_s"],
            )
    model.eval()
    return history


def exclusion_set(seed: int, cfg: BootstrapConfig) -> tuple[list[dict], list[str]]:
    """The campaign's test/held-out problems (never trained on) and their questions."""
    from data.world import build_problems

    records = build_problems(seed, 0, cfg.exclude_test, cfg.eval_heldout, cfg.difficulty)
    return records, [r["prompt"] for r in records]


def tokenizer_texts(seed: int, cfg: BootstrapConfig) -> list[str]:
    """World text in every style the models will read, rewrite prompts included."""
    from data.world import build_problems, corpus_texts
    from data.world.tokenizer import IM_END
    from train.world_data import make_texts

    records = build_problems(seed + 7, 600, 0, 100, cfg.difficulty)
    texts = corpus_texts(records, seed=seed, verbosity=3)
    rewrites = make_texts(
        "teacher",
        400,
        seed=seed + 11,
        difficulty=cfg.difficulty,
        verbosity=cfg.verbosity,
        rewrite_share=1.0,
        workers=1,
    )
    return texts + [p + c + IM_END for p, c in rewrites]


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
    """Greedy completions of ``prompts`` as trace rows (with role, split, family)."""
    from data.traces import trace_row
    from engines.base import GenerationParams

    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    params = GenerationParams(
        n=1, temperature=0.0, max_tokens=max_tokens, stop_token_ids=(tokenizer.eos_token_id,)
    )
    close = tokenizer.convert_tokens_to_ids("</think>")
    rows = []
    for rec, pid, outs in zip(records, ids, engine.generate(ids, params), strict=True):
        c = outs[0]
        row = trace_row(
            round_=0,
            problem_id=rec["problem_id"],
            sample_idx=0,
            text=c.text,
            token_ids=c.token_ids,
            finish_reason=c.finish_reason,
            prompt_tokens=len(pid),
            gold=rec["answer"],
            think_close_id=close,
            model=model,
        )
        rows.append(
            {
                **row,
                "role": role,
                "split": rec["split"],
                "family": rec["family"],
                "orig_think_tokens": None,
                "orig_correct": None,
            }
        )
    return rows


def _mean(xs: Sequence[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def evaluate_world(
    student, teacher, tokenizer, records: list[dict], max_tokens: int, style: str = "concise"
):
    """Student and teacher on the eval problems, and the teacher rewriting the student."""
    from data.answers import format_prompt
    from data.prompts import rewrite_prompt
    from data.world import problem_from_record, render_concise, render_target
    from engines.hf import HFEngine

    # On a GPU one batch holds every prompt; on a CPU the default bounds memory.
    on_gpu = next(student.parameters()).is_cuda
    kw = {"max_batch_tokens": 1 << 22} if on_gpu else {}
    s_eng, t_eng = HFEngine(student, tokenizer, **kw), HFEngine(teacher, tokenizer, **kw)
    prompts = [format_prompt(r["prompt"]) for r in records]
    rows = generate_rows(
        s_eng, tokenizer, prompts, records, role="student", model="student", max_tokens=max_tokens
    )
    rows += generate_rows(
        t_eng, tokenizer, prompts, records, role="teacher", model="teacher", max_tokens=max_tokens
    )
    student_rows = [r for r in rows if r["role"] == "student"]
    rw_prompts = [
        rewrite_prompt(r["prompt"], s["completion"])
        for r, s in zip(records, student_rows, strict=True)
    ]
    rewrites = generate_rows(
        t_eng,
        tokenizer,
        rw_prompts,
        records,
        role="rewrite",
        model="teacher",
        max_tokens=max_tokens,
    )
    for rw, s in zip(rewrites, student_rows, strict=True):
        rw["orig_think_tokens"], rw["orig_correct"] = s["think_tokens"], s["correct"]
    rows += rewrites

    def think_len(text: str) -> int:
        return len(
            tokenizer(text[: text.rindex("</think>") + 8], add_special_tokens=False)["input_ids"]
        )

    metrics: dict[str, float | None] = {}
    for split in ("test", "heldout"):
        for role in ("student", "teacher"):
            sel = [r for r in rows if r["role"] == role and r["split"] == split]
            metrics[f"{role}_{split}_accuracy"] = _mean([r["correct"] for r in sel])
            metrics[f"{role}_{split}_think"] = _mean([r["think_tokens"] for r in sel])
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
    return rows, metrics


# -- the whole bootstrap -----------------------------------------------------------
def _world_texts(
    cfg: BootstrapConfig, role: str, n: int, seed: int, exclude: list[str], workers: int | None
) -> list[tuple[str, str]]:
    from train.world_data import make_texts

    return make_texts(
        role,
        n,
        seed=seed,
        difficulty=cfg.difficulty,
        verbosity=cfg.verbosity,
        rewrite_share=cfg.rewrite_share,
        error_rate=cfg.error_rate,
        exclude=exclude,
        workers=workers,
        target_style=cfg.target_style,
    )


def run_bootstrap(
    cfg: BootstrapConfig,
    out: Path,
    *,
    seed: int = 0,
    device: str = "auto",
    workers: int | None = None,
) -> tuple[list[dict], dict]:
    """Train tokenizer, student and teacher into ``out``; returns (eval rows, metrics)."""
    from data.world.tokenizer import train_tokenizer
    from train.models import resolve_device
    from train.tiny import build_tiny_model
    from train.world_data import encode

    dev = resolve_device(device)
    started = time.monotonic()
    tok = train_tokenizer(tokenizer_texts(seed, cfg), cfg.vocab_size, out / "tokenizer")
    log.info("tokenizer: %d tokens", len(tok))
    eval_records, exclude = exclusion_set(seed, cfg)
    timings: dict[str, float] = {}
    models = {}
    for role, mcfg, recipe in (
        ("student", cfg.student, cfg.student_train),
        ("teacher", cfg.teacher, cfg.teacher_train),
    ):
        t0 = time.monotonic()
        texts = _world_texts(
            cfg, role, recipe.examples, seed + (1 if role == "student" else 2), exclude, workers
        )
        model = build_tiny_model(tok, mcfg, seed=seed).to(dev)
        history = sft(
            model,
            encode(tok, texts),
            recipe,
            pad_id=tok.pad_token_id,
            vocab_limit=len(tok),
            seed=seed,
            name=role,
        )
        timings[f"{role}_final_loss"] = round(history[-1]["loss"], 4)
        model.save_pretrained(out / role)
        tok.save_pretrained(out / role)
        models[role] = model
        timings[f"{role}_train_s"] = round(time.monotonic() - t0, 1)
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
    """The bootstrap's evaluation and metrics, shared by a fresh world and a retargeted one."""
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


def retarget_teacher(
    cfg: BootstrapConfig,
    src: Path,
    out: Path,
    *,
    seed: int = 0,
    device: str = "auto",
    workers: int | None = None,
) -> tuple[list[dict], dict]:
    """Fine-tune the teacher of the assets in ``src`` to rewrite into ``cfg.target_style``.

    The tokenizer and the student are copied unchanged, so every campaign starts
    from the same student; only the teacher learns the new target, from its own
    weights (``cfg.retarget_train``: ~40 minutes on a 2-core CPU, where training a
    teacher from scratch takes many hours). Returns (eval rows, metrics) like ``run_bootstrap``.
    """
    import shutil

    from transformers import AutoModelForCausalLM

    from train.models import load_tokenizer, resolve_device
    from train.world_data import encode

    dev = resolve_device(device)
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    for part in ("tokenizer", "student"):
        shutil.rmtree(out / part, ignore_errors=True)
        shutil.copytree(src / part, out / part)
    tok = load_tokenizer(out / "tokenizer")
    eval_records, exclude = exclusion_set(seed, cfg)
    t0 = time.monotonic()
    texts = _world_texts(cfg, "teacher", cfg.retarget_train.examples, seed + 3, exclude, workers)
    teacher = AutoModelForCausalLM.from_pretrained(src / "teacher").to(dev)
    history = sft(
        teacher,
        encode(tok, texts),
        cfg.retarget_train,
        pad_id=tok.pad_token_id,
        vocab_limit=len(tok),
        seed=seed,
        name="teacher (retarget)",
    )
    teacher.save_pretrained(out / "teacher")
    tok.save_pretrained(out / "teacher")
    timings = {
        "teacher_retarget_loss": round(history[-1]["loss"], 4),
        "teacher_retarget_s": round(time.monotonic() - t0, 1),
    }
    student = AutoModelForCausalLM.from_pretrained(out / "student").to(dev)
    models = {"student": student, "teacher": teacher}
    return _evaluate(cfg, models, tok, eval_records, timings, started, dev)
