"""Peak memory of a distillation loss step: full [B, T, V] logits vs `train.chunked`'s two paths.

Each variant runs in its own subprocess, so peaks do not mix (CPU: the process's max RSS, which
includes the interpreter and the inputs, hence the separate `inputs` run to subtract; CUDA:
torch.cuda.max_memory_allocated). One step = student logits from hidden states, teacher logits,
per-token divergence, reduction, backward. `chunked` is the checkpointed per-token path
(`chunked_divergence` then `reduce_tokens`), `fused` the trainer's (`train.fused.chunked_divergence_loss`: the
gradient made chunk by chunk in the forward pass; it also holds a float32 [V, H] weight gradient).

    .venv/bin/python benchmarks/bench_loss_memory.py                  # B=8 T=512 V=32000 H=256, CPU
    .venv/bin/python benchmarks/bench_loss_memory.py --device cuda --dtype bfloat16 --vocab 151936
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from train.chunked import chunked_divergence
from train.fused import chunked_divergence_loss
from train.losses import per_token_divergence, reduce_tokens

MODES = ("inputs", "naive", "chunked", "fused")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--kind", default="reverse_kl", choices=["forward_kl", "reverse_kl", "jsd"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", choices=MODES, help="internal: run one variant and print JSON")
    return p.parse_args(argv)


def run_one(args: argparse.Namespace) -> dict:
    """One variant in this process; returns its peak memory and loss."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shape = (args.batch, args.seq, args.hidden)
    hidden = torch.randn(shape, device=dev, dtype=dtype, requires_grad=True)
    weight = (torch.randn(args.vocab, args.hidden, device=dev, dtype=dtype) / 16).requires_grad_()
    teacher_hidden = torch.randn(shape, device=dev, dtype=dtype)
    teacher_weight = torch.randn(args.vocab, args.hidden, device=dev, dtype=dtype) / 16
    mask = torch.ones(args.batch, args.seq, dtype=torch.bool, device=dev)
    mask[:, : args.seq // 8] = False  # a prompt

    def step() -> torch.Tensor:
        if args.mode == "naive":
            with torch.no_grad():
                teacher_logits = teacher_hidden @ teacher_weight.T
            per_token = per_token_divergence(
                hidden @ weight.T, teacher_logits, mask, kind=args.kind
            )
        elif args.mode == "chunked":
            per_token = chunked_divergence(
                hidden, weight, teacher_hidden, teacher_weight, mask, kind=args.kind,
                chunk_size=args.chunk_size,
            )  # fmt: skip
        elif args.mode == "fused":
            n_tokens = int(mask.sum())
            loss = chunked_divergence_loss(
                hidden, weight, teacher_hidden, teacher_weight, mask, 1.0 / n_tokens,
                kind=args.kind, chunk_size=args.chunk_size,
            ).loss  # fmt: skip
            loss.backward()
            return loss.detach()
        else:
            return torch.zeros(())
        loss = reduce_tokens(per_token, mask)
        loss.backward()
        return loss.detach()

    if dev.type == "cuda":  # warm up kernels and cuBLAS, then measure a second step
        step()
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    loss = step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    seconds = time.perf_counter() - start
    return {"mode": args.mode, "peak_bytes": peak, "loss": float(loss), "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.mode:
        print(json.dumps(run_one(args)))
        return
    forwarded = list(argv if argv is not None else sys.argv[1:])
    results = {}
    for mode in MODES:
        cmd = [sys.executable, __file__, *forwarded, "--mode", mode]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    base = results["inputs"]["peak_bytes"]  # interpreter + inputs (CPU), inputs (CUDA)
    print(
        f"B={args.batch} T={args.seq} V={args.vocab} H={args.hidden} kind={args.kind} "
        f"chunk={args.chunk_size} device={args.device} dtype={args.dtype}"
    )
    print(f"{'mode':8} {'peak MiB':>10} {'above inputs MiB':>17} {'seconds':>8}  loss")
    for mode in MODES:
        r = results[mode]
        extra = (r["peak_bytes"] - base) / 2**20
        print(
            f"{mode:8} {r['peak_bytes'] / 2**20:10.1f} {extra:17.1f} {r['seconds']:8.2f}  {r['loss']:.6f}"
        )
    naive = results["naive"]["peak_bytes"] - base
    for mode in ("chunked", "fused"):
        above = results[mode]["peak_bytes"] - base
        peak_ratio = results["naive"]["peak_bytes"] / results[mode]["peak_bytes"]
        print(f"peak ratio naive/{mode}: {peak_ratio:.2f}")
        print(f"ratio above inputs naive/{mode}: {naive / max(above, 1):.2f}")


if __name__ == "__main__":
    main()
