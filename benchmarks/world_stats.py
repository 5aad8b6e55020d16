"""Reference-world statistics: how much longer the verbose style is, per family.

Builds a problem set, trains the world tokenizer on it, renders every problem
concisely and verbosely, and prints mean think tokens per family and style,
their ratio, and the largest verbose trace (which bounds the sequence length
the tiny models need). Run: ``.venv/bin/python benchmarks/world_stats.py``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections import defaultdict

from data.answers import count_tokens
from world.problems import build_problems, corpus_texts, problem_from_record
from world.styles import render_concise, render_verbose
from world.tokenizer import train_tokenizer


def _parse_difficulty(text: str) -> int | tuple[int, int]:
    if "-" in text:
        lo, hi = text.split("-")
        return int(lo), int(hi)
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=500, help="training problems")
    parser.add_argument("--difficulty", default="1-5", help="a level or a range like 1-5")
    parser.add_argument("--verbosity", type=int, default=2)
    args = parser.parse_args()

    start = time.perf_counter()
    difficulty = _parse_difficulty(args.difficulty)
    records = build_problems(args.seed, args.n, args.n // 5, args.n // 5, difficulty=difficulty)
    with tempfile.TemporaryDirectory() as out_dir:
        tok = train_tokenizer(corpus_texts(records, args.seed), 1024, out_dir)
    encode = tok.encode
    rng = random.Random(args.seed)
    stats: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        problem = problem_from_record(record)
        row = stats[record["family"]]
        row["concise"].append(count_tokens(encode, render_concise(problem))[0])
        verbose = render_verbose(problem, rng, args.verbosity)
        row["verbose"].append(count_tokens(encode, verbose)[0])
        row["prompt"].append(len(encode(problem.question)))
    print(
        f"{len(records)} problems, difficulty {args.difficulty}, verbosity {args.verbosity}, "
        f"vocab {len(tok)}, {time.perf_counter() - start:.1f} s"
    )
    print(
        f"{'family':<10}{'n':>5}{'prompt':>8}{'concise':>9}{'verbose':>9}{'ratio':>7}"
        f"{'v_min':>7}{'v_max':>7}{'v_sd':>7}"
    )
    for family, row in sorted(stats.items()):
        c, v = statistics.mean(row["concise"]), statistics.mean(row["verbose"])
        print(
            f"{family:<10}{len(row['concise']):>5}{statistics.mean(row['prompt']):>8.1f}"
            f"{c:>9.1f}{v:>9.1f}{v / c:>7.2f}{min(row['verbose']):>7}"
            f"{max(row['verbose']):>7}{statistics.stdev(row['verbose']):>7.1f}"
        )


if __name__ == "__main__":
    main()
