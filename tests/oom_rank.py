"""A launched training process whose rank 1 runs out of memory in its second step (a fake of a
GPU's OOM, which cannot happen here: a real allocation that torch's CPU allocator refuses).

    torchrun ... -m tests.oom_rank -m train.trainer SPEC

It is started through ``train.distributed.launcher`` (the launcher's words, then the train
stage's ``-m train.trainer SPEC``), so the stage's own launch and failure reading run as they
would for a GPU that ran out of memory.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

import train.trainer as trainer
from train.launch import rank_failures

ASKED = 2**50  # 1 PiB: more than any machine has, so the allocator refuses it at once


def main(spec: str) -> None:
    real = trainer.train_step

    def step(run: Any, number: int) -> dict[str, Any]:
        if run.dist.rank == 1 and number == 2:
            torch.empty(ASKED, dtype=torch.uint8)
        return real(run, number)

    trainer.train_step = step
    with rank_failures(spec):
        trainer.run_spec(spec)


if __name__ == "__main__":
    main(sys.argv[-1])
