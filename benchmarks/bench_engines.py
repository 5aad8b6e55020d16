"""Generation throughput of the vllm engine against the hf engine, same prompts, one run.

Why: the vllm engine costs a separate 3.4 GB environment and a ~40-70 s start-up;
this says what it buys on this machine. Both engines run the shipped tiny student
(float32) on the same chat prompts, every row running the full ``--new-tokens``
(no stop token), greedy and sampled; the start-up is timed apart from generation.
Without ``.venv-vllm`` the vllm half is skipped with a message.

    .venv/bin/python benchmarks/bench_engines.py                   # 64 prompts x 128 tokens
    .venv/bin/python benchmarks/bench_engines.py --prompts 16 --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engines.base import EngineUnavailableError, GenerationParams  # noqa: E402
from engines.config import EngineConfig  # noqa: E402

STUDENT = REPO / "world" / "assets" / "student"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the hf engine (1 on a shared machine)",
    )
    p.add_argument("--model", type=Path, default=STUDENT)
    return p.parse_args(argv)


def throughput(engine, prompts: list[list[int]], params: GenerationParams) -> float:
    """Generated tokens per second of one ``generate`` call (after a small warm-up call)."""
    engine.generate(prompts[:2], GenerationParams(max_tokens=4, temperature=0))
    started = time.perf_counter()
    out = engine.generate(prompts, params)
    seconds = time.perf_counter() - started
    return sum(len(c.token_ids) for row in out for c in row) / seconds


def main(argv: list[str] | None = None) -> int:
    import torch

    from engines.hf import load_hf_engine
    from engines.vllm import load_vllm_engine
    from tasks.generation import chat_prompt
    from world import build_problems

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    hf = load_hf_engine(args.model, device="cpu")
    records = build_problems(0, args.prompts, 0, 0, difficulty=2)
    prompts = [chat_prompt(hf.tokenizer, r["prompt"]) for r in records]
    cases = {
        "greedy": GenerationParams(temperature=0, max_tokens=args.new_tokens),
        "sampled": GenerationParams(temperature=1.0, max_tokens=args.new_tokens, seed=1),
    }
    print(f"{args.prompts} prompts x {args.new_tokens} new tokens, {args.model.name}, float32")
    results = {name: {"hf": throughput(hf, prompts, p)} for name, p in cases.items()}
    cfg = EngineConfig(  # FACTS.md: what vLLM's CPU build needs here
        kind="vllm",
        enforce_eager=True,
        max_model_len=1024,
        gpu_memory_utilization=0.3,
        env={"VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    vllm = None
    try:
        started = time.perf_counter()
        vllm = load_vllm_engine(args.model, cfg, dtype="float32")
        print(f"vllm start-up: {time.perf_counter() - started:.1f}s")
        for name, p in cases.items():
            results[name]["vllm"] = throughput(vllm, prompts, p)
    except EngineUnavailableError as exc:
        print(f"vllm skipped: {exc}")
    finally:
        if vllm is not None:
            vllm.close()
    print(f"{'case':<10}{'hf tok/s':>10}{'vllm tok/s':>12}{'vllm/hf':>9}")
    for name, r in results.items():
        v = r.get("vllm")
        ratio = f"{v / r['hf']:.2f}x" if v else "-"
        print(f"{name:<10}{r['hf']:>10.0f}{(f'{v:.0f}' if v else '-'):>12}{ratio:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
