"""Can a student stay accurate in a shorter style? (why MPD failed on the first tiny world)

Which style should MPD's teacher rewrite into? This probe fine-tunes a copy of
the shipped student with plain cross-entropy on fresh world problems written in
a style, with ample data (steps x 32 examples drawn from ``--examples`` traces,
never the test problems), then evaluates it greedily on an interleaved test
set. If even supervised training on perfect traces of a style cannot keep the
student's accuracy, no distillation toward that style will: the style, not the
method, is the limit.

    python benchmarks/style_probe.py --style steps --steps 200
    python benchmarks/style_probe.py --style concise --steps 200
    python benchmarks/style_probe.py --style verbose1 --steps 200
    python benchmarks/style_probe.py --steps 0        # the shipped student itself

Measured with this script on the 2-core CPU (2026-11-23, 64 test problems, 16 per
family, lr 1e-3, 6,000 traces, 200 steps, one thread), accuracy / mean think tokens,
on the first world's verbose-only student (docs/first-world.md; ``--student DIR`` probes
another):

    shipped student (--steps 0)                            56.2% / 372
    verbose1  (headers, equations, running values, recap)  60.9% / 261  (-30%)
    steps     (headers, equations, running values)         54.7% / 181  (-51%)
    headers_given (problem restated, headers, equations)   48.4% / 168
    headers   (headers, equations)                         37.5% / 140
    concise   (equations only: the shipped teacher's)      20.3% /  50
    steps, stopped after 30 / 80 steps (--steps 30, 80)    18.8% / 174, 35.9% / 184
    after 30 steps: verbose1 31.2% / 251, planned 21.9% / 223, verbose2 54.7% / 361

A valley: any new style (even verbose1, which only drops re-checks and recaps)
costs the student most of its accuracy at 30 steps and needs ~200 to recover;
its own style (verbose2) costs nothing. One MPD round trains far less. The current
world's student carries the steps style already (README, "The reference world").
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _headers(problem, *, given: bool) -> str:
    """The steps style without its running values; with ``given``, the problem restated first."""
    from data.answers import format_completion
    from world.narrate import equation, header

    lines = list(problem.given) if given else []
    for index, step in enumerate(problem.steps, start=1):
        lines += [header(step, index), equation(step)]
    lines.append(f"So the answer is {problem.answer}.")
    return format_completion(lines, problem.answer)


def _planned(problem) -> str:
    """The steps style under the verbose trace's plan line (its step count kept)."""
    from data.answers import format_completion
    from world.styles import steps_lines

    plan = f"That takes {len(problem.steps)} steps, so I will go one step at a time."
    return format_completion([plan, *steps_lines(problem)], problem.answer)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--style",
        choices=["concise", "headers", "headers_given", "steps", "planned", "verbose1", "verbose2"],
        default="concise",
    )
    ap.add_argument("--steps", type=int, default=200, help="SFT steps of 32 examples (0: none)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--examples", type=int, default=6000, help="distinct training traces")
    ap.add_argument("--per-family", type=int, default=16, help="test problems per family")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--student", type=Path, help="student directory (default: the shipped one)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from transformers import AutoModelForCausalLM

    from data.answers import format_prompt
    from engines.hf import HFEngine
    from flows.bootstrap import SHIPPED
    from train.models import load_tokenizer
    from train.trainer import train
    from world import (
        TRAIN_FAMILIES,
        build_problems,
        generate,
        render_concise,
        render_steps,
        render_verbose,
    )
    from world.bootstrap import generate_rows, recipe_config
    from world.config import Recipe
    from world.corpus import encode

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(SHIPPED / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(args.student or SHIPPED / "student")
    records = build_problems(0, 0, 1000, 0, (1, 2))  # the campaign's test split: never trained on
    by_family: dict[str, list[dict]] = {}
    for r in records:
        if r["split"] == "test":
            by_family.setdefault(r["family"], []).append(r)
    chosen = [r for f in sorted(by_family) for r in by_family[f][: args.per_family]]

    if args.steps:
        rng, exclude = random.Random(5), {r["prompt"] for r in records}
        render = {
            "concise": lambda p: render_concise(p),
            "steps": lambda p: render_steps(p),
            "planned": lambda p: _planned(p),
            "headers": lambda p: _headers(p, given=False),
            "headers_given": lambda p: _headers(p, given=True),
            "verbose1": lambda p: render_verbose(p, rng, 1),
            "verbose2": lambda p: render_verbose(p, rng, 2),
        }[args.style]
        texts: list[tuple[str, str]] = []
        while len(texts) < args.examples:
            p = generate(rng.choice(TRAIN_FAMILIES), rng, rng.randint(1, 2))
            if p.question not in exclude:
                texts.append((format_prompt(p.question), render(p)))
        t0 = time.monotonic()
        recipe = Recipe(
            steps=args.steps, batch_size=32, lr=args.lr, warmup_steps=10, examples=args.examples
        )
        train(model, encode(tok, texts), recipe_config(recipe, args.steps), tokenizer=tok, seed=0)
        print(f"trained {args.steps} steps on {args.style} traces in {time.monotonic() - t0:.0f}s")

    rows = generate_rows(
        HFEngine(model, tok),
        tok,
        [format_prompt(r["prompt"]) for r in chosen],
        chosen,
        role="student",
        model="student",
        max_tokens=768,
    )
    acc = sum(r["correct"] for r in rows) / len(rows)
    think = sum(r["think_tokens"] for r in rows) / len(rows)
    label = f"after {args.steps} steps on {args.style}" if args.steps else "shipped student"
    print(f"{label}: accuracy {acc:.3f}, mean think tokens {think:.0f} ({len(rows)} problems)")
    for family in sorted(by_family):
        sel = [r for r in rows if r["family"] == family]
        print(f"  {family:9s} accuracy {sum(r['correct'] for r in sel) / len(sel):.3f}")


if __name__ == "__main__":
    main()
