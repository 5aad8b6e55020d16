"""Resumable training checkpoints that a crash can never leave half-written and visible.

Layout, one directory per checkpoint::

    out_dir/checkpoints/step-000050/
        trainable.pt    {parameter name: tensor}: every weight (full fine-tuning) or the adapters
        optimizer.pt    AdamW moments and step counts
        scheduler.pt    the LambdaLR counter (the factor itself is recomputed from the config)
        rng.pt          per process: torch CPU (+ CUDA), python and numpy generator states
        state.json      {"step": 50, "elapsed_s": 81.2, "log": [...rows...], "config": {...},
                         "seed": 0, "world_size": 1}

Everything is written into a hidden `.tmp-step-000050/`, state.json last, each file fsynced; the
directory is then renamed into place. A reader takes only `step-NNNNNN` directories that hold a
state.json, so a checkpoint killed mid-write (still hidden, or a stray directory without its state
file) is never resumed from. The data order needs no saved state: it is a function of the step.
A write that fails (a full disk) removes its hidden directory before raising one line naming the
checkpoint: the failure gives back the space it took, and the next run resumes from the last
complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.diskfull import naming
from data.errors import UserError
from data.fsutil import atomic_write_json, fsync_dir, removed_on_failure

CHECKPOINTS = "checkpoints"
STATE = "state.json"
KEEP = 2  # complete checkpoints kept: the newest, and one more in case the newest's disk is bad
_NAME = re.compile(r"^step-(\d{6,})$")


@dataclass
class Checkpoint:
    """What one checkpoint holds, as in-memory objects."""

    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: list[dict[str, Any]]  # index = process rank
    state: dict[str, Any]


class CheckpointMismatchError(UserError):
    """A checkpoint in the output directory belongs to another run (one line: what to remove)."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoint_step(path: Path) -> int | None:
    """The optimizer step a checkpoint directory holds (its name), None for another name."""
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def complete_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints under out_dir/checkpoints, oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [
        (step, p)
        for p in root.iterdir()
        if (step := checkpoint_step(p)) is not None and (p / STATE).is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None: what a restarted run resumes from."""
    done = complete_checkpoints(out_dir)
    return done[-1] if done else None


def clean_partial(out_dir: Path) -> None:
    """Remove hidden leftovers (`.tmp-*`, `.trash-*`) of a run killed while writing or pruning."""
    root = Path(out_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".trash-")):
                shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """This process's generator states: dropout draws from torch's, user code may use the others."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(obj: Any, path: Path) -> None:
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def write_checkpoint(out_dir: Path, step: int, ckpt: Checkpoint) -> Path:
    """Write atomically (tmp dir, state.json last, rename), then prune to the KEEP newest."""
    root = Path(out_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    shutil.rmtree(tmp, ignore_errors=True)
    # A full disk: one line naming the checkpoint, said once the partial one is gone (so the
    # free space it reports is what the next try will have).
    with naming(final), removed_on_failure(tmp):
        tmp.mkdir(parents=True)
        _save(ckpt.trainable, tmp / "trainable.pt")
        _save(ckpt.optimizer, tmp / "optimizer.pt")
        _save(ckpt.scheduler, tmp / "scheduler.pt")
        _save(ckpt.rng, tmp / "rng.pt")
        atomic_write_json(tmp / STATE, {**ckpt.state, "step": step})
    if final.exists():  # a stale one from a run that was reset: replace it whole
        _discard(final)
    os.replace(tmp, final)
    fsync_dir(root)
    for old in complete_checkpoints(out_dir)[:-KEEP]:
        _discard(old)
    return final


def _discard(path: Path) -> None:
    """Hide first (one rename), then delete: a half-deleted checkpoint is never visible."""
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def check_compatible(
    state: dict[str, Any], *, config: dict[str, Any], seed: int, world_size: int, path: Path
) -> None:
    """A checkpoint resumes only the run that wrote it; anything else would silently mix runs.

    `checkpoint_every` may change between the two (it does not change what is computed).
    """
    differ = sorted(
        k for k in config if k != "checkpoint_every" and state["config"].get(k) != config[k]
    )
    differ += [
        name for name, ours in (("seed", seed), ("world_size", world_size)) if state[name] != ours
    ]
    if differ:
        raise CheckpointMismatchError(
            f"{path} was written by a different run ({', '.join(differ)} differ); "
            f"remove {path.parent} to start over"
        )


def restore(
    ckpt: Checkpoint,
    *,
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rank: int,
) -> None:
    """Put weights, optimizer, schedule and this process's RNG back as they were at the save."""
    if set(params) != set(ckpt.trainable):
        raise CheckpointMismatchError(
            "the checkpoint's trainable parameters differ from this model's"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(ckpt.trainable[name])
    optimizer.load_state_dict(ckpt.optimizer)
    scheduler.load_state_dict(ckpt.scheduler)
    set_rng_state(ckpt.rng[rank])


def save_model_dir(model: Any, tokenizer: Any, target: Path) -> None:
    """save_pretrained into a hidden tmp dir, then rename: `target` is whole or absent."""
    tmp = target.with_name(f".tmp-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    with naming(target), removed_on_failure(tmp):
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    if target.exists():
        _discard(target)
    os.replace(tmp, target)
    fsync_dir(target.parent)


def read_checkpoint(path: Path) -> Checkpoint:
    """Load a checkpoint written by `write_checkpoint` (our own files: full unpickling)."""
    path = Path(path)

    def load(name: str) -> Any:
        return torch.load(path / name, map_location="cpu", weights_only=False)

    state = json.loads((path / STATE).read_text())
    return Checkpoint(
        load("trainable.pt"), load("optimizer.pt"), load("scheduler.pt"), load("rng.pt"), state
    )
