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

from data.memory import MemoryExhaustedError
from train.batching import Example, save_examples
from train.config import DistributedConfig, TrainConfig
from train.launch import LaunchSpec, run_launched
from world.config import TinyModelConfig, build_tiny_model

# Qwen3's published shapes (config.json of Qwen/Qwen3-0.6B and -1.7B): built from config,
# random weights (only shapes matter for time and memory).
PRESETS = {
    "qwen3-0.6b": {"hidden_size": 1024, "num_hidden_layers": 28, "intermediate_size": 3072},
    "qwen3-1.7b": {"hidden_size": 2048, "num_hidden_layers": 28, "intermediate_size": 6144},
}
QWEN3 = {"num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "vocab": 151936}
K = 32  # stored top-k per position (score.top_k of the real configs)


class Vocab:
    """Just what build_tiny_model reads from a tokenizer: a size and three special ids."""

    def __init__(self, size: int) -> None:
        self.size, self.bos_token_id, self.eos_token_id, self.pad_token_id = size, None, 2, 0

    def __len__(self) -> int:
        return self.size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=["tiny", *PRESETS], default="tiny")
    p.add_argument("--hidden", type=int, default=256, help="tiny only")
    p.add_argument("--layers", type=int, default=4, help="tiny only")
    p.add_argument("--vocab", type=int, default=4096, help="tiny only")
    p.add_argument("--nproc", type=int, default=2, help="processes to compare with 1")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", choices=["model", "bf16-mixed"], default="model")
    p.add_argument("--loss", choices=["ce", "topk"], default="ce", help="topk: fused top-k KL")
    p.add_argument("--batch", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--recompute", action="store_true", help="activation checkpointing")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    return p.parse_args(argv)


def shapes(args: argparse.Namespace) -> tuple[TinyModelConfig, int]:
    """The student's architecture and vocabulary size."""
    if args.preset in PRESETS:
        qwen = {k: v for k, v in QWEN3.items() if k != "vocab"}
        return TinyModelConfig(**PRESETS[args.preset], **qwen), QWEN3["vocab"]
    heads = max(2, args.hidden // 64)
    cfg = TinyModelConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        intermediate_size=4 * args.hidden,
    )
    return cfg, args.vocab


def setup(root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """The student directory and the examples file (random ids: only shapes matter for time)."""
    cfg, vocab = shapes(args)
    model_dir = root / "student"
    build_tiny_model(Vocab(vocab), cfg, seed=0).save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    half = args.seq // 2

    def example() -> Example:
        prompt, target = rng.integers(3, vocab, half).tolist(), rng.integers(3, vocab, half)
        if args.loss == "ce":
            return Example(prompt, target.tolist())
        ids = rng.integers(3, vocab, (half, K))
        ids[:, 0] = target  # the target token among the teacher's top-k, as it mostly is
        logprobs = np.sort(rng.normal(-6, 2, (half, K)).astype(np.float32), axis=1)[:, ::-1]
        return Example(prompt, target.tolist(), ids, np.ascontiguousarray(logprobs) - 0.1)

    examples = [example() for _ in range(args.batch * args.accum * 4)]
    data = root / "examples.jsonl"
    save_examples(data, examples)
    return model_dir, data


def modes(args: argparse.Namespace) -> dict[str, dict]:
    """name -> train.distributed: the single-process trainer (`python -m train.trainer`, no
    torchrun), and `--nproc` processes with DDP and with FSDP."""
    n = args.nproc
    return {
        "1 process": {"launcher": [sys.executable]},
        f"{n} ddp": {"nproc": n, "strategy": "ddp"},
        f"{n} fsdp": {"nproc": n, "strategy": "fsdp"},
    }


def one_run(root: Path, name: str, model: Path, data: Path, args: argparse.Namespace, i: int):
    """(median step seconds, [peak memory per process]) of one launched run."""
    distributed = DistributedConfig(**modes(args)[name], activation_checkpointing=args.recompute)
    topk = {"loss": "reverse_kl", "teacher_mode": "offline_topk"}
    cfg = TrainConfig(
        **(topk if args.loss == "topk" else {"loss": "ce"}),
        precision=args.precision,
        steps=args.steps,
        batch_size=args.batch,
        grad_accum=args.accum,
        max_length=args.seq + 8,
        warmup_steps=0,
        checkpoint_every=10**6,  # only the last step's
        distributed=distributed,
    )
    out = root / f"{name.replace(' ', '-')}-{i}"
    spec = LaunchSpec(
        model=str(model),
        examples=str(data),
        out_dir=str(out),
        config=cfg,
        threads=args.threads,
        cpu=args.device == "cpu",
        run_dir=str(out / "launch"),
    )
    try:
        run_launched(spec, distributed)
    except MemoryExhaustedError as exc:
        print(f"{name}: {exc}")
        return None, []
    log = json.loads((out / "log.json").read_text())
    times = np.diff([0.0] + [r["elapsed_s"] for r in log])[args.warmup : args.steps - 1]
    ranks = sorted((out / "launch").glob("rank-*.json"))
    return statistics.median(times), [json.loads(p.read_text()) for p in ranks]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} cores")
    results: dict[str, list[tuple[float, list[dict]]]] = {name: [] for name in modes(args)}
    with tempfile.TemporaryDirectory(prefix="bench-train-dist-") as tmp:
        root = Path(tmp)
        model, data = setup(root, args)
        for i in range(args.repeats):
            names = list(results)
            order = names[i % len(names) :] + names[: i % len(names)]
            for name in order:
                results[name].append(one_run(root, name, model, data, args, i))
    report(args, results)


def report(args: argparse.Namespace, results: dict[str, list[tuple[float, list[dict]]]]) -> None:
    """One row per mode: median step, its ratio to 1 process, peak memory of each process."""
    cfg, vocab = shapes(args)
    base = statistics.median(t or float("nan") for t, _ in results["1 process"])
    print(
        f"{args.preset}: Qwen3 hidden {cfg.hidden_size} x {cfg.num_hidden_layers} layers, vocab "
        f"{vocab}; {args.device}, precision {args.precision}, loss {args.loss}; global batch "
        f"{args.accum} x {args.batch} x {args.seq} tokens; {args.steps} steps, median of {args.repeats} runs"
    )
    gpu = args.device == "cuda"
    print(
        f"{'mode':<10} {'step_ms':>8} {'ratio':>6}  peak {'GPU' if gpu else 'RSS'} MB per process"
    )
    for name, runs in results.items():
        if any(t is None for t, _ in runs):
            print(f"{name:<10} out of memory")
            continue
        step = statistics.median(t for t, _ in runs)
        field = "cuda_peak_mb" if gpu else "peak_rss_mb"
        peaks = [max(run[1][r].get(field, 0.0) for run in runs) for r in range(len(runs[0][1]))]
        shown = " ".join(f"{mb:.0f}" for mb in peaks)
        print(f"{name:<10} {step * 1e3:>8.1f} {step / base:>6.2f}  {shown}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if not gpu:
        cores = os.cpu_count() or 1
        print(
            f"{cores} cores, {args.threads} thread(s) a process: the ideal {args.nproc}-process "
            f"ratio is {1 / min(args.nproc, max(1, cores // args.threads)):.2f} on an idle "
            "machine; above it is the collectives' cost plus the cores other work takes (one "
            "device per process: scripts/gpu-check.sh)."
        )


if __name__ == "__main__":
    main()
