"""Resumable training checkpoints that a crash can never leave half-written and visible, and
that any number of processes can resume (resharding).

Layout, one directory per checkpoint::

    out_dir/checkpoints/step-000050/
        dcp/            torch.distributed.checkpoint: the trainable weights (every weight, or
                        the adapters) and the AdamW moments, each process writing its own shards
                        (.distcp files) and rank 0 the .metadata that says where each piece lies
        scheduler.pt    the LambdaLR counter (the factor itself is recomputed from the config)
        rng-0.pt ...    per process: torch CPU (+ CUDA), python and numpy generator states
        state.json      {"step": 50, "elapsed_s": 81.2, "log": [...rows...], "config": {...},
                         "seed": 0, "world_size": 2}

Why DCP: a checkpoint of an FSDP run is sharded (no process ever holds the whole model), and
its state dict is keyed by parameter name, not by who held what, so 2 processes' checkpoint
loads into 1 process, or 8, and a DDP run's into an FSDP run. `world_size` is recorded for the
reader, never checked: the data order is a function of the step (train.batching), the global
batch does not depend on the process count, and a process with no saved RNG of its own rank
(more processes than before) reseeds its dropout stream.

Everything is written into a hidden `.tmp-step-000050/`, state.json last (by rank 0, after
every process's shards are fsynced), then the directory is renamed into place. A reader takes
only `step-NNNNNN` directories that hold a state.json, so a checkpoint killed mid-write (still
hidden, or a stray directory without its state file) is never resumed from. A write that fails
(a full disk) removes its hidden directory before raising one line naming the checkpoint.
Several hosts: out_dir must be one shared filesystem (every process writes its shards there).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.diskfull import naming
from data.errors import UserError, is_disk_full, one_line
from data.fsutil import atomic_write_json, fsync_dir, removed_on_failure

CHECKPOINTS = "checkpoints"
STATE = "state.json"
DCP = "dcp"
KEEP = 2  # complete checkpoints kept: the newest, and one more in case the newest's disk is bad
_NAME = re.compile(r"^step-(\d{6,})$")


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


def _trainable_state(module: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"model": trainable weights, "optim": AdamW state}, keyed by parameter name (DCP form:
    sharded DTensors under FSDP, whole tensors otherwise; wrapper prefixes removed)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model, optim = get_state_dict(
        module, optimizer, options=StateDictOptions(ignore_frozen_params=True)
    )
    return {"model": model, "optim": optim}


LOW_SPACE = 1 << 20  # bytes free, after a failed write, below which the disk is called full


# What DCP warns at every save and load of a run on one process (no process group): the intent
# it assumes is ours. A log line per checkpoint, with a source line, in every campaign's log.
_SINGLE_PROCESS = "torch.distributed is disabled, unavailable or uninitialized"


@contextlib.contextmanager
def single_process_quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS, category=UserWarning)
        yield


def _dcp_save(dcp: Any, state: dict[str, Any], where: Path) -> None:
    """``dcp.save``, with its failures told apart: it wraps every rank's exception in a
    ``CheckpointException``, a BaseException that no ``except Exception`` sees; and torch's zip
    writer loses a full disk's ENOSPC ("unexpected pos 704 vs 598"). A full disk becomes an
    OSError ENOSPC (``naming`` makes it one line); anything else stays a bug, with its text."""
    try:
        with single_process_quiet():
            dcp.save(state, checkpoint_id=str(where))
    except dcp.api.CheckpointException as exc:
        causes = [failure[0] for failure in exc.failures.values()]
        full = any(is_disk_full(cause) for cause in causes)
        if full or shutil.disk_usage(where.parent).free < LOW_SPACE:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where)) from None
        raise RuntimeError(f"saving the checkpoint {where} failed: {exc}") from None


def write_checkpoint(
    out_dir: Path,
    step: int,
    *,
    dist: Any,
    module: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
) -> Path:
    """Every process: its shards and RNG; rank 0: the rest, state.json last, rename, prune.

    `dist`: train.distributed.Dist (rank, barrier). Collective: every process calls it.
    """
    import torch.distributed.checkpoint as dcp

    root = Path(out_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    # A full disk: one line naming the checkpoint, said once the partial one is gone (so the
    # free space it reports is what the next try will have).
    with naming(final), removed_on_failure(tmp):
        _dcp_save(dcp, _trainable_state(module, optimizer), tmp / DCP)
        _save(rng_state(), tmp / f"rng-{dist.rank}.pt")
        dist.barrier()
        if dist.is_main:
            _save(scheduler.state_dict(), tmp / "scheduler.pt")
            atomic_write_json(tmp / STATE, {**state, "step": step, "world_size": dist.world})
    if dist.is_main:
        if final.exists():  # a stale one from a run that was reset: replace it whole
            _discard(final)
        os.replace(tmp, final)
        fsync_dir(root)
        for old in complete_checkpoints(out_dir)[:-KEEP]:
            _discard(old)
    dist.barrier()
    return final


def _discard(path: Path) -> None:
    """Hide first (one rename), then delete: a half-deleted checkpoint is never visible."""
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def check_compatible(
    state: dict[str, Any], *, config: dict[str, Any], seed: int, path: Path
) -> None:
    """A checkpoint resumes only the run that wrote it; anything else would silently mix runs.

    `checkpoint_every` and `distributed` (process count, strategy, launcher) may change between
    the two: they do not change what is computed.
    """
    free = ("checkpoint_every", "distributed")
    differ = sorted(k for k in config if k not in free and state["config"].get(k) != config[k])
    differ += ["seed"] if state["seed"] != seed else []
    if differ:
        raise CheckpointMismatchError(
            f"{path} was written by a different run ({', '.join(differ)} differ); "
            f"remove {path.parent} to start over"
        )


def read_state(path: Path) -> dict[str, Any]:
    """A complete checkpoint's state.json (step, log, config, seed)."""
    return json.loads((Path(path) / STATE).read_text())


def restore(
    path: Path,
    *,
    dist: Any,
    module: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> None:
    """Put weights, optimizer, schedule and this process's RNG back as they were at the save,
    whatever the process count that saved them (DCP reshards to this run's layout)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    path = Path(path)
    if not (path / DCP).is_dir():
        raise CheckpointMismatchError(f"{path} is not a checkpoint of this version: remove it")
    target = _trainable_state(module, optimizer)
    try:
        with single_process_quiet():
            dcp.load(target, checkpoint_id=str(path / DCP))
    except (RuntimeError, KeyError, ValueError) as exc:  # the planner: names or shapes differ
        raise CheckpointMismatchError(
            f"{path}: its trainable parameters differ from this model's ({one_line(exc)})"
        ) from None
    set_state_dict(  # not strict: the frozen weights are not in a checkpoint, by design
        module,
        optimizer,
        model_state_dict=target["model"],
        optim_state_dict=target["optim"],
        options=StateDictOptions(ignore_frozen_params=True, strict=False),
    )
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng = path / f"rng-{dist.rank}.pt"
    if rng.is_file():  # a process the saving run did not have keeps its fresh dropout seed
        set_rng_state(torch.load(rng, weights_only=False))


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
