"""Step time and peak memory per process of the trainer on 1 process against 2 (DDP, FSDP2).

Each mode is one launched run (train.launch.run_launched: torchrun and `python -m
train.trainer`, as the train stage starts it) of SFT steps on the same random batches of a tiny
Qwen3 student; the modes take turns, `--repeats` times each, so the drifts of a shared machine
hit all of them alike. Reported per mode: the median step (the step-to-step differences of
the log's `elapsed_s`, warm-up steps dropped, checkpoints excluded by checkpointing only at the
end), its ratio to 1 process, and each process's peak RSS (`rank-<r>.json`).

    .venv/bin/python benchmarks/bench_train_distributed.py
    .venv/bin/python benchmarks/bench_train_distributed.py --hidden 512 --layers 8 --steps 30

What 2 CPU cores allow: every process runs one torch thread (`--threads`), so 2 processes use
both cores where 1 process uses one: on an idle machine the ideal ratio is 0.5, and what it
misses is gloo's all-reduce over loopback (DDP) or its all-gather and reduce-scatter of every
layer (FSDP). On a machine shared with other work (the load average is printed) 2 processes
get less than 2 cores and the ratio says little; 1 process with 2 threads on a busy machine was
measured 8x slower than with 1, which is why the baseline is not given both cores. A real
speed-up needs one device per process: scripts/gpu-check.sh. At this size the peak RSS is
mostly torch and Python themselves (~550 MB a process): FSDP's saving (each process holds 1/N
of the gradients and optimizer moments) shows with `--hidden 1024 --layers 8` and up, and the
table in docs/distributed-training.md computes it for real shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from train.batching import Example, save_examples
from train.config import DistributedConfig, TrainConfig
from train.launch import LaunchSpec, run_launched
from train.tiny import TinyModelConfig, build_tiny_model

MODES = {"1 process": (1, "ddp"), "2 ddp": (2, "ddp"), "2 fsdp": (2, "fsdp")}


class Vocab:
    """Just what build_tiny_model reads from a tokenizer: a size and three special ids."""

    def __init__(self, size: int) -> None:
        self.size, self.bos_token_id, self.eos_token_id, self.pad_token_id = size, None, 2, 0

    def __len__(self) -> int:
        return self.size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    return p.parse_args(argv)


def setup(root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """The student directory and the examples file (random ids: only shapes matter for time)."""
    heads = max(2, args.hidden // 64)
    cfg = TinyModelConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        intermediate_size=4 * args.hidden,
    )
    model_dir = root / "student"
    build_tiny_model(Vocab(args.vocab), cfg, seed=0).save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    half = args.seq // 2
    examples = [
        Example(
            rng.integers(3, args.vocab, half).tolist(), rng.integers(3, args.vocab, half).tolist()
        )
        for _ in range(args.batch * 4)
    ]
    data = root / "examples.jsonl"
    save_examples(data, examples)
    return model_dir, data


def one_run(root: Path, name: str, model: Path, data: Path, args: argparse.Namespace, i: int):
    """(median step seconds, [peak RSS MB per process]) of one launched run."""
    nproc, strategy = MODES[name]
    cfg = TrainConfig(
        loss="ce",
        steps=args.steps,
        batch_size=args.batch,
        max_length=args.seq + 8,
        warmup_steps=0,
        checkpoint_every=10**6,  # only the last step's
        distributed={"nproc": nproc, "strategy": strategy},
    )
    out = root / f"{name.replace(' ', '-')}-{i}"
    spec = LaunchSpec(
        model=str(model),
        examples=str(data),
        out_dir=str(out),
        config=cfg,
        threads=args.threads,
        cpu=True,
        run_dir=str(out / "launch"),
    )
    run_launched(spec, DistributedConfig(nproc=nproc, strategy=strategy))
    log = json.loads((out / "log.json").read_text())
    times = np.diff([0.0] + [r["elapsed_s"] for r in log])[args.warmup : args.steps - 1]
    ranks = sorted((out / "launch").glob("rank-*.json"))
    return statistics.median(times), [json.loads(p.read_text())["peak_rss_mb"] for p in ranks]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cores = os.cpu_count()
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {cores} cores")
    results: dict[str, list[tuple[float, list[float]]]] = {name: [] for name in MODES}
    with tempfile.TemporaryDirectory(prefix="bench-train-dist-") as tmp:
        root = Path(tmp)
        model, data = setup(root, args)
        for i in range(args.repeats):
            order = list(MODES)[i % len(MODES) :] + list(MODES)[: i % len(MODES)]
            for name in order:
                results[name].append(one_run(root, name, model, data, args, i))
    base = statistics.median(t for t, _ in results["1 process"])
    print(
        f"tiny Qwen3 hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}; "
        f"global batch {args.batch} x {args.seq} tokens; {args.steps} steps, median of "
        f"{args.repeats} runs"
    )
    print(f"{'mode':<10} {'step_ms':>8} {'ratio':>6}  peak_rss_mb per process")
    for name, runs in results.items():
        step = statistics.median(t for t, _ in runs)
        peaks = [max(run[1][r] for run in runs) for r in range(len(runs[0][1]))]
        shown = " ".join(f"{mb:.0f}" for mb in peaks)
        print(f"{name:<10} {step * 1e3:>8.1f} {step / base:>6.2f}  {shown}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"{cores} cores, {args.threads} thread(s) a process: the ideal 2-process ratio is "
        f"{1 / min(2, max(1, (cores or 1) // args.threads)):.2f} on an idle machine; above it is "
        "the collectives' cost plus the cores other work takes (one device per process: "
        "scripts/gpu-check.sh)."
    )


if __name__ == "__main__":
    main()
