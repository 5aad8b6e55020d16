"""The reference world's bootstrap: from scratch (short), shipped assets, and model resolution."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.bootstrap import SHIPPED
from flows.errors import UserError
from tasks.context import resolve_model
from world.manifest import AssetsError, verify_assets

REPO = Path(__file__).resolve().parents[1]
# Every mpd subprocess talks to the session's one Prefect server (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("prefect_api")
TINY = [
    f"--set=bootstrap.{k}={v}"
    for k, v in {
        "student.hidden_size": 32,
        "student.num_hidden_layers": 1,
        "student.num_attention_heads": 2,
        "student.num_key_value_heads": 1,
        "student.intermediate_size": 64,
        "teacher.hidden_size": 32,
        "teacher.num_hidden_layers": 1,
        "teacher.num_attention_heads": 2,
        "teacher.num_key_value_heads": 1,
        "teacher.intermediate_size": 64,
        "student_train.steps": 4,
        "student_train.examples": 64,
        "student_train.batch_size": 8,
        "teacher_train.steps": 4,
        "teacher_train.examples": 64,
        "teacher_train.batch_size": 8,
        "eval_problems": 6,
        "eval_heldout": 3,
        "max_new_tokens": 24,
        "exclude_test": 50,
    }.items()
]


def mpd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=REPO
    )


def test_short_from_scratch_bootstrap_is_real_and_cached(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    out = mpd("bootstrap", "--from-scratch", "-w", str(ws), "--workers", "1", *TINY)
    assert out.returncode == 0, out.stderr
    stage = ws / "bootstrap" / "round=0"
    assert (stage / "_manifest.json").is_file()
    for part in ("tokenizer", "student", "teacher"):
        assert (stage / part / "config.json").is_file() or part == "tokenizer"
    manifest = verify_assets(stage)  # the committed copy carries its own checksums
    assert manifest["metrics"]["student_test_accuracy"] is not None
    sql = mpd(
        "sql",
        "-w",
        str(ws),
        "--format",
        "csv",
        "select role, count(*) as n from bootstrap_evals group by role order by role",
    )
    assert sql.stdout.split() == [
        "role,n",
        "rewrite,9",
        "student,9",
        "student_cued,9",
        "teacher,9",
    ]
    committed = (stage / "_manifest.json").read_bytes()
    again = mpd("bootstrap", "--from-scratch", "-w", str(ws), "--workers", "1", *TINY)
    assert again.returncode == 0, again.stderr
    # cached: the committed stage is untouched (its manifest holds the commit time and key)
    assert (stage / "_manifest.json").read_bytes() == committed, again.stderr[-3000:]
    assert "training the world from scratch" not in again.stderr, again.stderr[-3000:]

    from train.models import load_model, load_tokenizer

    tok = load_tokenizer(resolve_model("builtin:tiny-student", ws))
    model = load_model(resolve_model("builtin:tiny-teacher", ws), device="cpu")
    assert model.config.vocab_size >= len(tok) and model.config.model_type == "qwen3"


def _lineage(manifest: dict) -> list[dict]:
    """A manifest and its ancestors, nearest first (``parent``: one source, or ``parents``:
    role -> source, as a fine-tune of one role or a combination writes them)."""
    config = manifest["config"]
    above = config.get("parent") or next(iter(config.get("parents", {}).values()), None)
    return [manifest] + (_lineage(above) if above else [])


def test_shipped_assets_verify_and_tampering_is_caught(tmp_path: Path) -> None:
    manifest = verify_assets(SHIPPED)
    # provenance: every part's command, down to the first world trained from scratch
    lineage = _lineage(manifest)
    assert lineage[-1]["command"].startswith("mpd bootstrap --from-scratch")
    combined = next(m for m in lineage if m["command"].startswith("mpd bootstrap --combine"))
    for role in ("student", "teacher"):
        commands = [m["command"] for m in _lineage(combined["config"]["parents"][role])]
        # as recorded when they were trained: the shipped assets lay in assets/world then
        assert commands[0].startswith(f"mpd bootstrap --finetune assets/world --only {role}")
        assert commands[-1].startswith("mpd bootstrap --from-scratch")
    assert sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file()) <= 25 * 2**20
    m = manifest["metrics"]
    assert 0.5 <= m["student_test_accuracy"] <= 0.85, "the shipped student is in the target band"
    assert m["student_verbosity_ratio"] >= 2.5 and m["rewrite_test_keeps_correct"] >= 0.95
    assert m["rewrite_test_think_ratio"] <= 0.6 and m["student_plain_to_cued_think"] >= 1.8
    copy = tmp_path / "world"
    shutil.copytree(SHIPPED, copy)
    cfg = copy / "student" / "config.json"
    cfg.write_text(cfg.read_text().replace("128", "129", 1))
    with pytest.raises(AssetsError, match=r"student/config\.json is missing or altered"):
        verify_assets(copy)


def test_builtin_names_before_bootstrap_and_bad_paths(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="run `mpd bootstrap` first"):
        resolve_model("builtin:tiny-student", tmp_path)
    with pytest.raises(UserError, match="unknown built-in model"):
        resolve_model("builtin:huge", tmp_path)
    with pytest.raises(UserError, match="model path does not exist"):
        resolve_model(str(tmp_path / "nope"), tmp_path)


def test_run_refuses_mismatched_tokenizers(tmp_path: Path) -> None:
    from world import build_problems, corpus_texts
    from world.config import TinyModelConfig, build_tiny_model
    from world.tokenizer import train_tokenizer

    other = tmp_path / "other-teacher"
    texts = corpus_texts(build_problems(5, 30, 0, 0, 1))  # different text: different merges
    tok = train_tokenizer(texts, 400, other)
    build_tiny_model(
        tok,
        TinyModelConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
        ),
    ).save_pretrained(other)
    out = mpd("run", "-w", str(tmp_path / "ws"), "--set", f"models.teacher={other}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "use different tokenizers" in out.stderr and out.stderr.count("mpd: error") == 1


def test_finetune_resumes_keeps_the_tokenizer_and_records_its_parent(tmp_path: Path) -> None:
    """``--finetune`` is how a CPU makes a new world from the shipped one: checkpointed, resumable."""
    src, out = tmp_path / "src", tmp_path / "out"
    made = mpd("bootstrap", "--out", str(src), "--workers", "1", "--device", "cpu", *TINY)
    assert made.returncode == 0, made.stderr
    small = [
        "--set=bootstrap.teacher_finetune.steps=4",
        "--set=bootstrap.teacher_finetune.examples=24",
        "--set=bootstrap.teacher_finetune.batch_size=8",
        "--set=bootstrap.teacher_finetune.warmup_steps=1",
        "--set=bootstrap.checkpoint_every=2",
    ]
    args = ["--finetune", str(src), "--only", "teacher", "--workers", "1", "--device", "cpu"]
    args += [*TINY, *small]
    # A run killed after its first checkpoint: the same command resumes from it.
    killed = tmp_path / "killed"
    code = (
        "import sys, train.trainer as t\n"
        "real = t._save_checkpoint\n"
        "def once(run, out, step, log, seed):\n"
        "    real(run, out, step, log, seed)\n"
        "    raise SystemExit(9)\n"
        "t._save_checkpoint = once\n"
        "from flows.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    first = subprocess.run(
        [sys.executable, "-c", code, "bootstrap", *args, "--out", str(killed)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert first.returncode == 9, first.stderr
    assert list((killed / ".checkpoints").rglob("step-*")), "a checkpoint was written"
    resumed = mpd("bootstrap", *args, "--out", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    assert "teacher: resuming from the checkpoint of step 2" in resumed.stderr
    assert not (killed / ".checkpoints").exists(), "checkpoints go once the models are saved"

    done = mpd("bootstrap", *args, "--out", str(out))
    assert done.returncode == 0, done.stderr
    parent, child, again = verify_assets(src), verify_assets(out), verify_assets(killed)
    assert child["command"].startswith("mpd bootstrap --finetune")
    assert child["config"]["parent"]["command"] == parent["command"]
    assert child["config"]["finetuned"] == ["teacher"]
    for name, digest in parent["files"].items():
        if name.startswith(("student/", "tokenizer/")):
            assert child["files"][name] == digest, name  # copied, not retrained
    assert (
        child["files"]["teacher/model.safetensors"] != parent["files"]["teacher/model.safetensors"]
    )
    # resuming gave the weights an uninterrupted run gives
    assert (
        again["files"]["teacher/model.safetensors"] == child["files"]["teacher/model.safetensors"]
    )
    assert child["metrics"]["teacher_train_s"] > 0 and child["metrics"]["target_test_think"]

    # roles trained apart, put together: the student of one, the teacher of the other
    both = tmp_path / "both"
    put = mpd("bootstrap", "--combine", str(src), str(out), "--out", str(both), *TINY)
    assert put.returncode == 0, put.stderr
    combined = verify_assets(both)
    assert "finetuned" not in combined["config"]
    assert combined["config"]["parents"]["teacher"]["command"] == child["command"]
    for name in ("student/model.safetensors", "tokenizer/tokenizer.json"):
        assert combined["files"][name] == parent["files"][name]
    assert (
        combined["files"]["teacher/model.safetensors"]
        == child["files"]["teacher/model.safetensors"]
    )

    for bad, message in (
        (["--finetune", str(src)], "give --out DIR"),
        (["--only", "teacher", "--out", str(tmp_path / "y")], "give --finetune SRC"),
        (
            ["--finetune", str(tmp_path / "nope"), "--out", str(tmp_path / "x")],
            "no bootstrap assets",
        ),
        (["--finetune", str(src), "--out", str(src)], "give an --out other than it"),
        (["--combine", str(src), str(out)], "give --out DIR"),
        (["--finetune", str(src), "--combine", str(src), str(out)], "give one"),
    ):
        res = mpd("bootstrap", *bad)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert message in res.stderr and res.stderr.count("mpd: error") == 1, res.stderr
