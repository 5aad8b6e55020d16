#!/usr/bin/env bash
# The distributed train stage on GPUs, for any GPU host (the project's own machine has 2 CPU
# cores and no GPU, so this was made ready and syntax-checked there, never run).
#
#   scripts/gpu-check.sh                 every visible GPU, both sizes, output tee'd to a file
#   NPROC=2 SIZES=qwen3-0.6b scripts/gpu-check.sh
#
# What it runs, in order (each step prints its own table):
#   1. the host: GPUs, torch and its NCCL;
#   2. for each size (Qwen3 architecture built from config, ~0.6B and ~1.7B parameters, random
#      weights): benchmarks/bench_train_distributed.py with bf16-mixed precision (float32
#      master weights; FSDP2's MixedPrecisionPolicy bf16 parameters, float32 reductions) and the
#      fused top-k loss: step time and peak GPU memory per process of the single-process trainer,
#      NPROC processes with DDP and NPROC with FSDP;
#   3. the fused top-k loss on one GPU against SFT (benchmarks/bench_kl_step.py --device cuda);
#   4. with RUN_TESTS=1 and 2 GPUs or more: `pytest -k distributed` (its mpd run then trains on
#      NCCL, one GPU a process).
# Settings (environment): PYTHON (.venv/bin/python), NPROC (the visible GPUs), SIZES
# ("qwen3-0.6b qwen3-1.7b"), SEQ (2048 tokens a sequence), STEPS (10), OUT (the log file).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-gpu-check-$(date -u +%Y%m%dT%H%M%SZ).log}
SIZES=${SIZES:-"qwen3-0.6b qwen3-1.7b"}
SEQ=${SEQ:-2048}
STEPS=${STEPS:-10}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1

die() { echo "gpu-check: $*" >&2; exit 1; }
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())') || die "no torch in $PY"
[ "$GPUS" -ge 1 ] || die "no GPU visible (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset})"
NPROC=${NPROC:-$GPUS}
[ "$NPROC" -le "$GPUS" ] || die "NPROC=$NPROC but only $GPUS GPU(s): one GPU a process"

{
    echo "== host"
    nvidia-smi -L || true
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
        "nccl", ".".join(map(str, torch.cuda.nccl.version())))'
    for size in $SIZES; do
        echo "== $size: 1 process vs $NPROC DDP vs $NPROC FSDP, bf16-mixed, fused top-k loss"
        "$PY" benchmarks/bench_train_distributed.py --preset "$size" --device cuda \
            --precision bf16-mixed --loss topk --nproc "$NPROC" --batch "$((NPROC * 2))" \
            --seq "$SEQ" --steps "$STEPS" --warmup 3 --repeats 1
    done
    echo "== fused top-k loss on one GPU (topk / sft <= 1.05, online / (sft + teacher) <= 1.1)"
    "$PY" benchmarks/bench_kl_step.py --device cuda --batch 16 --seq 1024 --vocab 151936
    if [ "${RUN_TESTS:-0}" = 1 ] && [ "$GPUS" -ge 2 ]; then
        echo "== pytest -k distributed"
        "$PY" -m pytest -q -k distributed tests/test_train_distributed.py tests/test_trainer_ddp.py
    fi
} 2>&1 | tee "$OUT"
echo "gpu-check: written to $OUT"
