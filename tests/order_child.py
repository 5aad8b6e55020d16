"""A launched training run (``train.trainer.run_spec``) that records what it trains on.

    python -m tests.order_child SPEC DIGESTS [HOLD_AT]

Appends one line per collated micro-batch to DIGESTS (a SHA-256 of its input ids and top-k
tensors), fsynced, so a test can compare the data order of a killed and resumed run with an
uninterrupted one. With HOLD_AT, the process stops after recording that many micro-batches and
waits to be killed (a test hook: the kill then lands mid-run on every machine, however slow).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from pathlib import Path

import train.step as step
import train.trainer as trainer
from train.batching import Batch


def main(spec: str, digests: Path, hold_at: int | None) -> None:
    real = step.collate  # what each micro-batch is collated by (train.step.train_step)
    seen = 0

    def recording(examples: list, pad_id: int) -> Batch:
        nonlocal seen
        batch = real(examples, pad_id)
        digest = hashlib.sha256()
        for tensor in (batch.input_ids, batch.topk_ids, batch.topk_logprobs):
            if tensor is not None:
                digest.update(tensor.numpy().tobytes())
        with open(digests, "a") as fh:
            fh.write(digest.hexdigest() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        seen += 1
        while hold_at is not None and seen >= hold_at:
            time.sleep(1)  # held until the test's kill -9
        return batch

    step.collate = recording
    trainer.run_spec(spec)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
