"""Training on several processes, started by the train stage: the spec every process reads,
torchrun started and stopped as one process group, and a failed run told apart by meaning.

    spec = LaunchSpec(model=..., examples=".../examples.arrow", out_dir=..., run_dir=...)
    result = run_launched(spec, cfg.distributed, on_progress=log_step)
    # runs: python -m train.torchrun --standalone --nproc-per-node 2 -m train.trainer spec.json
    #   or: <cfg.distributed.launcher ...> -m train.trainer spec.json   (several hosts)

Each process writes `run_dir/rank-<r>.pid` when it starts, `rank-<r>.json` (its peak memory)
when it ends well and, when it fails, `error-<r>.json` ({"kind": "user" | "resource" |
"transient" | "bug", "message": one line}). After a non-zero
exit the stage reads them:

- a process that left no error file died from outside (kill -9, the kernel's OOM killer, a
  lost host): TransientError, the stage task retries, and the retry resumes from the newest
  checkpoint (train.checkpoint), with the same data order;
- otherwise the most telling error: a user mistake (one line, exit 2), memory exhausted (one
  line naming the rank, the model and what was asked for), a lost peer (transient), a bug
  (InternalError naming the log, whose traceback the process printed there).

No process outlives the stage: torchrun runs in its own session (the stage kills the group
when it returns, fails or is interrupted), and torchrun and every training process ask the
kernel to kill them when their parent dies (PR_SET_PDEATHSIG), which covers an `mpd` that
ended by `os._exit` on SIGTERM (flows.stopping) or by kill -9.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from data.configbase import StrictModel
from data.errors import InternalError, TransientError, UserError, kind_of, one_line
from data.fsutil import atomic_write_bytes
from data.memory import MemoryExhaustedError
from train.config import DistributedConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]
RESULT = "result.json"
LAUNCH_DIR = "launch"  # the train stage's run_dir in its staging directory (not committed)
PROGRESS = "mpd-train-step"  # rank 0's line per step: "mpd-train-step 3 30 2.4512"
PARENT_ENV = "MPD_TRAIN_PARENT"  # the pid a process started by train.torchrun must have as parent
STOP_GRACE_S = 10.0


class LaunchSpec(StrictModel):
    """Everything a launched process needs, as one JSON file (no Python objects cross processes)."""

    model: str = Field(description="Hugging Face model directory of the student.")
    examples: str = Field(
        description="JSON lines written by batching.save_examples, or an examples file (.arrow,"
        " train.example_file: read a row at a time by every process)"
    )
    out_dir: str = Field(description="Checkpoints, out_dir/model and out_dir/log.json go here.")
    config: TrainConfig = Field(default_factory=TrainConfig)
    teacher: str | None = Field(None, description="Teacher directory (online mode).")
    tokenizer: str | None = Field(None, description="Tokenizer directory, saved with the model.")
    seed: int = 0
    round_idx: int = 0
    threads: int | None = Field(None, ge=1, description="torch threads per process.")
    cpu: bool = Field(False, description="Force CPU (gloo) even when GPUs are visible.")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    run_dir: str | None = Field(
        None, description="Where each process writes its pid and error files (None: nowhere)."
    )


class TrainRankError(UserError):
    """A training process refused its input (the same on every rank): one line."""


class RankDiedError(TransientError):
    """A training process died from outside, or lost its peers: retried from the checkpoint."""


class TrainBugError(InternalError):
    """A training process failed on a bug; its traceback is in the launch log."""


def progress(row: dict[str, Any], steps: int) -> None:
    """Rank 0's line per step on stdout, which the stage passes on to its log."""
    loss = row["loss"] if row["loss"] is not None else float("nan")
    print(f"{PROGRESS} {row['step']} {steps} {loss:.6f}", flush=True)


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; elsewhere nothing).

    A parent already gone before the request (the pid it was started by, in PARENT_ENV, is no
    longer the parent) ends this process at once. Children of this process are told to check
    for it as their parent in turn."""
    expected = os.environ.get(PARENT_ENV)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    if expected is not None and int(expected) != os.getppid():
        os._exit(1)


@contextlib.contextmanager
def rank_failures(spec_path: str) -> Iterator[None]:
    """The body of one launched process: its pid file, and its failure as an error file.

    A user mistake or exhausted memory is printed as one line and exits 1 (the stage says it);
    anything else is re-raised, so that its traceback goes to the launch log."""
    die_with_parent()
    run_dir = json.loads(Path(spec_path).read_text()).get("run_dir")
    rank = int(os.environ.get("RANK", "0"))
    if run_dir is not None:
        # renamed into place whole: the launcher and a stop read it while ranks start
        atomic_write_bytes(Path(run_dir) / f"rank-{rank}.pid", str(os.getpid()).encode())
    try:
        yield
        if run_dir is not None:
            atomic_write_bytes(
                Path(run_dir) / f"rank-{rank}.json", json.dumps(peak_memory()).encode()
            )
    except BaseException as exc:  # boundary: every failure of the process is recorded by kind
        kind = rank_kind(exc)
        if run_dir is not None:
            record = {"kind": kind, "message": one_line(exc)}
            (Path(run_dir) / f"error-{rank}.json").write_text(json.dumps(record))
        if kind in ("user", "resource"):
            print(f"mpd: error: rank {rank}: {one_line(exc)}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        raise


def peak_memory() -> dict[str, float]:
    """This process's peak resident memory (MB), and its GPU's peak allocation when it has one:
    what one rank needed (benchmarks/bench_train_distributed.py, scripts/gpu-check.sh)."""
    import resource

    import torch

    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def rank_kind(exc: BaseException) -> str:
    """data.errors' kind, and a collective that failed because a peer went away: transient."""
    import torch.distributed as tdist

    if isinstance(exc, tdist.DistError) or any(
        text in str(exc) for text in ("Connection closed by peer", "Connection reset by peer")
    ):
        return "transient"
    if isinstance(exc, KeyboardInterrupt | SystemExit):
        return "transient"
    return kind_of(exc)


def command(dcfg: DistributedConfig, spec_path: Path) -> list[str]:
    """torchrun on this host, or the user's launcher, followed by the training module."""
    entry = ["-m", "train.trainer", str(spec_path)]
    if dcfg.launcher:
        return [*dcfg.launcher, *entry]
    torchrun = [sys.executable, "-m", "train.torchrun", "--standalone"]
    return [*torchrun, "--nproc-per-node", str(dcfg.nproc), *entry]


def run_launched(
    spec: LaunchSpec,
    dcfg: DistributedConfig,
    *,
    on_progress: Callable[[int, int, float], None] = lambda step, steps, loss: None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the spec's training on `dcfg`'s processes: rank 0's log rows (out_dir/log.json) and
    result (out_dir/result.json, with each process's peak RSS as `rank_peak_rss_mb`).

    Raises by meaning (module docstring) when the run fails."""
    assert spec.run_dir is not None
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for old in [*run_dir.glob("error-*.json"), *run_dir.glob("rank-*.*")]:
        old.unlink()  # an earlier attempt's
    spec_path = run_dir / "spec.json"
    spec_path.write_text(spec.model_dump_json())
    log_path = run_dir / "train.log"
    code = _run(command(dcfg, spec_path), log_path, on_progress, own=not dcfg.launcher)
    if code != 0:
        raise failure(run_dir, code, spec.model, log_path)
    out = Path(spec.out_dir)
    summary = json.loads((out / RESULT).read_text())
    ranks = sorted(run_dir.glob("rank-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    summary["rank_peak_rss_mb"] = [
        round(json.loads(p.read_text())["peak_rss_mb"], 1) for p in ranks
    ]
    return json.loads((out / "log.json").read_text()), summary


def _run(
    cmd: list[str], log_path: Path, on_progress: Callable[[int, int, float], None], *, own: bool
) -> int:
    """Start `cmd` in its own session, copy its output to `log_path` (passing progress lines
    on), and leave nothing of its process group behind, whatever ends the wait."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop(PARENT_ENV, None)
    if own:
        env[PARENT_ENV] = str(os.getpid())
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if line.startswith(PROGRESS.encode()):
                    with contextlib.suppress(ValueError):  # a line cut short: progress only
                        step, steps, loss = line.split()[1:4]
                        on_progress(int(step), int(steps), float(loss))
            return proc.wait()
        finally:
            stop_group(proc)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (torchrun stops its workers), SIGKILL what is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_GRACE_S)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def failure(run_dir: Path, code: int, model: str, log_path: Path) -> Exception:
    """The error a failed launch raises, by meaning (module docstring).

    A process's own error file is the cause when it says user, resource or bug: torchrun then
    stops the other processes (SIGTERM: they die without a word). Otherwise a process died
    from outside, or lost its peers because one did: transient."""
    errors = {
        int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in run_dir.glob("error-*.json")
    }
    started = sorted(int(p.stem.split("-")[1]) for p in run_dir.glob("rank-*.pid"))
    where = f"(log: {log_path})"
    for kind, error in (("user", TrainRankError), ("resource", MemoryExhaustedError)):
        for rank, err in sorted(errors.items()):
            if err["kind"] == kind:
                return error(f"train rank {rank} of {len(started)} ({model}): {err['message']}")
    for rank, err in sorted(errors.items()):
        if err["kind"] == "bug":
            return TrainBugError(f"train rank {rank} failed: {err['message']} {where}")
    cause = root_cause(log_path)
    who = "a training process" if cause is None else f"rank {cause[0]} of {len(started) or '?'}"
    how = f"exit code {code}" if cause is None else _exit_said(cause[1])
    return RankDiedError(
        f"train: {who} died ({how}); the stage is retried and resumes from its newest "
        f"checkpoint {where}"
    )


_ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)


def root_cause(log_path: Path) -> tuple[int, int] | None:
    """(rank, exit code) of the first process that failed, as torchrun's summary names it."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 65536))
            tail = fh.read().decode(errors="replace")
    except OSError:
        return None
    found = _ROOT_CAUSE.findall(tail)
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def _exit_said(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"
