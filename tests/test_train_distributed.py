"""The train stage on several processes: torchrun with DDP or FSDP2, 2 CPU processes (gloo).

One real ``mpd run`` trains round 1 on 2 FSDP processes with LoRA (``fsdp_lora``, computed once
per module); the other strategies and the kill -9 resume call the stage's own body
(``tasks.train.train_body``) on that round's examples, each in a fresh staging directory: the
same code the stage runs, without a campaign around it each time.

Tolerance, and why there is one: the processes split each micro-batch in two, pad each half to
its own length and sum the halves' gradients in another order, so float32 rounding differs from
one process's. Losses and gradient norms agree to rel 1e-4 (measured: ~4e-6), weights to atol
1e-4 (measured: 3e-5; AdamW divides each update by the gradient's own scale, so where a gradient
is near zero rounding noise moves a weight by up to lr = 3e-3 per step); token counts and
learning rates are equal.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import torch

from data.store import StageStore
from tasks.common import stage_files
from tasks.train import example_prompts, train_body, training_rows
from tests.test_campaign import (
    REPO,
    copy,
    kill9,
    manifests,
    mpd,
    ok,
    outcomes,
    planned,
    sets,
    start,
    table,
    wait_for,
)
from train.checkpoint import latest_checkpoint
from train.config import TrainConfig
from train.example_file import EXAMPLES_FILE, stored_examples
from train.launch import LAUNCH_DIR, RankDiedError
from train.models import load_model, load_tokenizer

pytestmark = pytest.mark.usefixtures("prefect_api")

STUDENT = REPO / "world" / "assets" / "student"
FSDP_LORA = {
    "train.steps": 12,
    "train.grad_accum": 2,
    "train.checkpoint_every": 2,
    "train.lora.enabled": "true",
    "train.distributed.nproc": 2,
    "train.distributed.strategy": "fsdp",
}
ONE = {"train.distributed.nproc": 1}
WEIGHTS_ATOL = 1e-4
# The stage body's runs: global batch 2 x 2 over the round's 8 examples, 2 epochs.
BODY = {"steps": 6, "batch_size": 2, "grad_accum": 2, "lr": 3e-3, "warmup_steps": 1}


def losses(rows: list[dict]) -> list[float]:
    return [r["loss"] for r in rows]


# -- the real mpd run ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fsdp_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-round campaign whose train stage ran on 2 FSDP processes with LoRA adapters, and
    whose rank 1 was killed (-9) once a checkpoint was written: the stage task retried."""
    root = tmp_path_factory.mktemp("fsdp")
    ws, log = root / "ws", root / "run.log"
    proc = start(ws, log, changes=FSDP_LORA)
    try:
        wait_for(ws, ".staging/train/round=1/*/checkpoints/step-000002", proc, log)
        (pid,) = wait_for(ws, ".staging/train/round=1/*/launch/rank-1.pid", proc, log)
        os.kill(int(pid.read_text()), signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        kill9(proc)
    (root / "killed.log").write_text(log.read_text())
    return ws


def test_distributed_mpd_run_retries_a_dead_rank_and_matches_one_process(
    fsdp_lora: Path, tmp_path: Path
) -> None:
    """The dead rank failed the stage as transient: the same run retried it, resuming from the
    checkpoint. The committed model is one Hugging Face directory (adapters merged), no
    checkpoint or launch file shipped; the process count is in no key (the same run on 1
    process reuses everything), and retraining round 1 on 1 process gives the same loss
    trajectory."""
    said = (fsdp_lora.parent / "killed.log").read_text()
    assert "train: rank 1 of 2 died (killed by SIGKILL)" in said and "Retry 1/2" in said
    assert manifests(fsdp_lora)["1/train"]["extra"]["resumed_from"] >= 2
    model = fsdp_lora / "train" / "round=1" / "model"
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()
    assert not (model / "adapter_config.json").exists()
    shipped = {p.name for p in (fsdp_lora / "train" / "round=1").iterdir()}
    assert shipped == {"_manifest.json", "log.parquet", "model"}
    assert not list((fsdp_lora / ".staging").glob("train/**/rank-*.pid"))
    two = table(fsdp_lora, "train", 1).to_pylist()
    assert [r["step"] for r in two] == list(range(1, 13))
    assert len(manifests(fsdp_lora)["1/train"]["extra"]["rank_peak_rss_mb"]) == 2

    ws = copy(fsdp_lora, tmp_path / "ws")
    ok(mpd("run", "-w", ws, "--rounds", 1, *sets({**FSDP_LORA, **ONE})))
    assert outcomes(ws) == dict.fromkeys(planned(1), "cached")
    ok(mpd("rerun", "-w", ws, "--round", 1, "--from", "train", *sets({**FSDP_LORA, **ONE})))
    assert manifests(ws)["1/train"]["key"] == manifests(fsdp_lora)["1/train"]["key"]
    one = table(ws, "train", 1).to_pylist()
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]
    assert [r["lr"] for r in one] == [r["lr"] for r in two]
    assert losses(one) == pytest.approx(losses(two), rel=1e-4)
    assert [r["grad_norm"] for r in one] == pytest.approx([r["grad_norm"] for r in two], rel=1e-4)


# -- the stage body on the round's examples -----------------------------------------------------
def body(ws: Path, campaign: Path, cfg: TrainConfig, *, key: str = "k" * 64) -> dict[str, Any]:
    """``train_body`` as the stage calls it, in a staging directory of ``ws``, on round 1 of
    ``campaign`` (its targets, the filter's decisions, the teacher's stored top-k)."""
    source = StageStore(campaign)
    writer = StageStore(ws).writer("train", 1, key)
    rows = training_rows(
        stage_files(source, "rewrite", 1),
        decisions=stage_files(source, "filter", 1),
        scores=stage_files(source, "score", 1),
    )
    problems = {r["problem_id"]: r for r in table(campaign, "problems", 0).to_pylist()}
    prompts = example_prompts(problems, load_tokenizer(STUDENT))
    examples = stored_examples(writer.path(EXAMPLES_FILE), rows, prompts)
    extra = train_body(
        writer,
        cfg,
        student_path=str(STUDENT),
        examples=examples,
        round_=1,
        seed=0,
        dtype="float32",
        device="cpu",
    )
    log = pq.read_table(writer.dir / "log.parquet").to_pylist()  # the table it commits
    return {"extra": extra, "log": log, "model": writer.dir / "model", "dir": writer.dir}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return dict(load_model(path, device="cpu").named_parameters())


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory, fsdp_lora: Path) -> dict[bool, dict]:
    """The stage body on 1 process (in the stage's own), full fine-tuning and LoRA."""
    out = {}
    for lora in (False, True):
        cfg = TrainConfig(**BODY, lora={"enabled": lora, "r": 4, "alpha": 8})
        out[lora] = body(tmp_path_factory.mktemp(f"one-{lora}"), fsdp_lora, cfg)
    return out


@pytest.mark.parametrize(
    ("strategy", "lora", "recompute"),
    [("ddp", False, False), ("ddp", True, False), ("fsdp", False, True), ("fsdp", True, False)],
)
def test_distributed_stage_body_matches_one_process(
    fsdp_lora: Path, references: dict, tmp_path: Path, strategy: str, lora: bool, recompute: bool
) -> None:
    """2 processes, DDP or FSDP, full or LoRA (FSDP full with activation checkpointing): the
    loss, token count and learning rate of every step, and the saved model's weights, are one
    process's (within the module's tolerance)."""
    distributed = {"nproc": 2, "strategy": strategy, "activation_checkpointing": recompute}
    cfg = TrainConfig(**BODY, lora={"enabled": lora, "r": 4, "alpha": 8}, distributed=distributed)
    got, ref = body(tmp_path, fsdp_lora, cfg), references[lora]
    assert [(r["step"], r["tokens"], r["lr"]) for r in got["log"]] == [
        (r["step"], r["tokens"], r["lr"]) for r in ref["log"]
    ]
    assert losses(got["log"]) == pytest.approx(losses(ref["log"]), rel=1e-4)
    a, b = weights(got["model"]), weights(ref["model"])
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=WEIGHTS_ATOL, msg=name)
    assert not (got["dir"] / LAUNCH_DIR).exists() and not (got["dir"] / "checkpoints").exists()


def kill_a_rank_after(run_dir: Path, staging: Path, step: int, errors: list) -> None:
    """Wait until the newest checkpoint is at `step` or later, then kill -9 rank 1."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not errors:
        newest = latest_checkpoint(staging)
        pid = run_dir / "rank-1.pid"
        if newest is not None and int(newest.name.split("-")[1]) >= step and pid.is_file():
            os.kill(int(pid.read_text()), signal.SIGKILL)
            return
        time.sleep(0.005)


def test_distributed_rank_killed_mid_train_resumes_on_two_then_one_process(
    fsdp_lora: Path, tmp_path: Path
) -> None:
    """kill -9 of rank 1 fails the stage as transient (the stage task retries it); the rerun
    resumes from the newest checkpoint on 2 processes, is killed again, and the next resumes
    on 1 process (resharding the FSDP checkpoint): every step once, the weights of an
    uninterrupted run (so the data order was the same)."""
    # lr 3e-4: 24 steps of 3e-3 over 8 examples are chaotic enough to amplify the rounding of
    # 2 processes past any tolerance (measured: 20% by step 20), with or without a kill
    steps = {**BODY, "steps": 24, "checkpoint_every": 3, "lr": 3e-4}
    fsdp = {"nproc": 2, "strategy": "fsdp"}
    cfg = TrainConfig(**steps, distributed=fsdp)
    ws, staging = tmp_path / "ws", tmp_path / "ws" / ".staging" / "train" / "round=1" / ("k" * 16)
    resumed: list[int] = []
    for kill_at in (3, 9):
        errors: list[BaseException] = []
        killer = threading.Thread(
            target=kill_a_rank_after, args=(staging / LAUNCH_DIR, staging, kill_at, errors)
        )
        killer.start()
        try:
            with pytest.raises(RankDiedError, match=r"rank 1 of 2 died \(killed by SIGKILL\)"):
                body(ws, fsdp_lora, cfg)
        finally:
            errors.append(None)
            killer.join()
        newest = latest_checkpoint(staging)
        assert newest is not None and not (staging / "model").exists()
        resumed.append(int(newest.name.split("-")[1]))
    assert resumed[0] >= 3 and resumed[1] > resumed[0]
    done = body(ws, fsdp_lora, TrainConfig(**steps))  # 1 process, the stage's own
    assert done["extra"]["resumed_from"] == resumed[1]
    assert [r["step"] for r in done["log"]] == list(range(1, 25))
    straight = body(tmp_path / "straight", fsdp_lora, TrainConfig(**steps))
    assert [r["tokens"] for r in done["log"]] == [r["tokens"] for r in straight["log"]]
    assert losses(done["log"]) == pytest.approx(losses(straight["log"]), rel=1e-4)
    a, b = weights(done["model"]), weights(straight["model"])
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=WEIGHTS_ATOL, msg=name)


def test_distributed_rank_out_of_memory_is_one_line_naming_rank_model_and_size(
    fsdp_lora: Path, tmp_path: Path
) -> None:
    """Rank 1 cannot allocate in its second step: the stage fails with one line that names
    the rank, the model and the memory asked for (a resource error: not retried)."""
    from data.errors import kind_of
    from data.memory import MemoryExhaustedError
    from tests.oom_rank import ASKED

    torchrun = [sys.executable, "-m", "train.torchrun", "--standalone", "--nproc-per-node", "2"]
    launcher = [*torchrun, "-m", "tests.oom_rank"]
    cfg = TrainConfig(**BODY, distributed={"launcher": launcher})
    with pytest.raises(MemoryExhaustedError) as caught:
        body(tmp_path, fsdp_lora, cfg)
    said = str(caught.value)
    assert "\n" not in said and kind_of(caught.value) == "resource"
    assert said.startswith(f"train rank 1 of 2 ({STUDENT}): out of memory training step 2")
    assert str(ASKED) in said


def test_distributed_batch_smaller_than_the_process_count_is_a_user_mistake(
    tmp_path: Path,
) -> None:
    """Every process takes a share of every micro-batch: fewer sequences than processes is
    refused at start-up, one line, exit 2, before anything runs."""
    out = mpd("run", "-w", tmp_path / "ws", *sets({"train.distributed.nproc": 4}))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("mpd: error:")]
    assert "batch_size 2 cannot be shared by distributed.nproc 4 processes" in line


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_distributed_training_processes_end_with_a_stopped_mpd(
    fsdp_lora: Path, tmp_path: Path, how: str
) -> None:
    """SIGTERM (a scheduler's stop) or kill -9 of ``mpd`` alone, mid-training: torchrun and
    every training process end within seconds (they die with their parent), none is left."""
    ws = copy(fsdp_lora, tmp_path / "ws")
    log = tmp_path / "run.log"
    proc = start(ws, log, changes={**FSDP_LORA, "train.steps": 5000})
    try:
        pids = wait_for(ws, ".staging/train/round=1/*/launch/rank-1.pid", proc, log)
        ranks = [int(p.read_text()) for p in sorted(pids[0].parent.glob("rank-*.pid"))]
        agent = int(Path(f"/proc/{ranks[0]}/stat").read_text().split(")")[-1].split()[1])
        os.kill(proc.pid, getattr(signal, how))
        proc.wait(timeout=30)
    finally:
        kill9(proc)
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in (agent, *ranks)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in (agent, *ranks) if _alive(p)], log.read_text()[-2000:]
