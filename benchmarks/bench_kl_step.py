"""Step time of distillation against SFT, measured side by side in one run on the tiny student.

Three trainer modes train on the same batches (16 sequences of ~256 tokens, token ids drawn at
random: only shapes matter for time) with `train.step.train_step`, the step `train` runs:

    sft     cross-entropy on the target                          (the baseline)
    topk    offline teacher, stored top-k reverse KL (+ tail)    target: topk / sft ≤ 1.05
    online  a larger teacher run in the step, full-vocabulary reverse KL from hidden states
            target: online / (sft + teacher forward) ≤ 1.1

"teacher forward" is the teacher's ordinary no_grad forward to logits on the same batch, timed on
its own. The modes and the teacher forward take turns one step at a time, in an order that
rotates, so the load drifts of a shared machine hit all of them alike; after warm-up steps, ratios
are taken step by step and their median reported. Peak memory above the resident models is
reported on CUDA; for CPU see bench_loss_memory.py.

    .venv/bin/python benchmarks/bench_kl_step.py                 # CPU, 2 threads
    .venv/bin/python benchmarks/bench_kl_step.py --device cuda --batch 16 --seq 1024
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from train.batching import Example, collate
from train.config import TrainConfig
from train.prepare import prepare_run
from train.step import train_step
from world.config import TinyModelConfig, build_tiny_model

STUDENT = TinyModelConfig()  # hidden 128, 3 layers, 4 heads, 2 kv heads, intermediate 512
TEACHER = TinyModelConfig(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    intermediate_size=1024,
)
MODES = ("sft", "topk", "online")


class Vocab:
    """Just what build_tiny_model reads from a tokenizer: a size and three special ids."""

    def __init__(self, size: int) -> None:
        self.size, self.bos_token_id, self.eos_token_id, self.pad_token_id = size, None, 2, 0

    def __len__(self) -> int:
        return self.size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=256, help="mean prompt + target tokens")
    p.add_argument("--prompt", type=int, default=48)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--k", type=int, default=32, help="stored teacher top-k")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    p.add_argument("--steps", type=int, default=24, help="timed steps per mode")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def make_examples(args: argparse.Namespace, n: int) -> list[Example]:
    """Random ids with lengths seq ± 12%, and random (sorted, normalised-ish) top-k per target."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        length = int(rng.integers(int(args.seq * 0.88), int(args.seq * 1.12) + 1))
        target = rng.integers(3, args.vocab, size=length - args.prompt).tolist()
        ids = np.stack([rng.choice(args.vocab, args.k, replace=False) for _ in target])
        logprobs = np.sort(rng.normal(-6, 2, size=ids.shape).astype(np.float32), axis=1)[:, ::-1]
        prompt = rng.integers(3, args.vocab, size=args.prompt).tolist()
        out.append(Example(prompt, target, ids, np.ascontiguousarray(logprobs)))
    return out


def config(mode: str, args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        loss="ce" if mode == "sft" else "reverse_kl",
        teacher_mode="online" if mode == "online" else "offline_topk",
        topk_tail=True,
        steps=args.warmup + args.steps,
        batch_size=args.batch,
        lr=1e-4,
        warmup_steps=0,
        max_length=4 * args.seq,
    )


def timed(fn) -> float:
    """Seconds `fn` takes; the trainer's step returns floats, so the device has finished."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per-step times of each mode (and the teacher forward), one step of each in turn.

    Interleaving single steps pairs the modes within about a second, so the slow drifts of a
    shared machine's load hit them alike; ratios are then taken step by step. The order rotates
    every step, so a load pattern that repeats with the round does not always fall on one mode.
    """
    vocab = Vocab(args.vocab)
    examples = make_examples(args, args.batch * 8)
    teacher = build_tiny_model(vocab, TEACHER, seed=1).to(args.device).eval()
    runs = {
        mode: prepare_run(
            build_tiny_model(vocab, STUDENT, seed=0).to(args.device),
            examples,
            config(mode, args),
            teacher=teacher if mode == "online" else None,
            tokenizer=vocab,
        )
        for mode in MODES
    }
    plan = runs["sft"].plan
    names = (*MODES, "teacher_fwd")
    times: dict[str, list[float]] = {m: [] for m in names}
    peaks: dict[str, float] = {}
    for step in range(1, args.warmup + args.steps + 1):
        batch = collate([examples[i] for i in plan.batch(step - 1)], 0).to(args.device)
        for name in names[step % len(names) :] + names[: step % len(names)]:
            if name == "teacher_fwd":
                times[name].append(timed(lambda b=batch: teacher_forward(teacher, b)))
                continue
            base = memory_mark(args.device)
            times[name].append(timed(lambda r=runs[name], s=step: train_step(r, s)))
            peaks[name] = max(peaks.get(name, 0.0), peak_since(args.device, base))
    return {m: t[args.warmup :] for m, t in times.items()}, peaks


@torch.no_grad()
def teacher_forward(teacher, batch) -> None:
    """The teacher's plain forward to logits on the trainer's own batch."""
    logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    float(logits[0, 0, 0])  # waits for the device


def memory_mark(device: str) -> float:
    if not device.startswith("cuda"):
        return 0.0
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 2**20


def peak_since(device: str, base: float) -> float:
    """MiB above `base` at the peak of the last step (CUDA only; 0 on CPU)."""
    return torch.cuda.max_memory_allocated() / 2**20 - base if device.startswith("cuda") else 0.0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    times, peaks = measure(args)
    med = {m: statistics.median(t) for m, t in times.items()}
    sft, topk, online, fwd = (times[m] for m in (*MODES, "teacher_fwd"))
    r_topk = statistics.median(k / s for k, s in zip(topk, sft, strict=True))
    r_online = statistics.median(o / (s + f) for o, s, f in zip(online, sft, fwd, strict=True))
    tokens = args.batch * args.seq
    print(f"device {args.device}, threads {args.threads}, batch {args.batch} × ~{args.seq} tokens,")
    print(
        f"vocab {args.vocab}, top-k {args.k} + tail, {args.steps} timed steps per mode, interleaved"
    )
    for m in (*MODES, "teacher_fwd"):
        print(f"  {m:12s} median {med[m] * 1e3:8.1f} ms   {tokens / med[m]:9.0f} tok/s")
    print(
        f"topk / sft                        = {r_topk:.3f}   (target ≤ 1.05; median of per-step ratios)"
    )
    print(f"online / (sft + teacher forward)  = {r_online:.3f}   (target ≤ 1.1)")
    print(f"online / sft                      = {med['online'] / med['sft']:.3f}")
    if args.device.startswith("cuda"):
        print(
            "peak memory above the models, per step: "
            + ", ".join(f"{m} {peaks[m]:.0f} MiB" for m in MODES)
        )


if __name__ == "__main__":
    main()
