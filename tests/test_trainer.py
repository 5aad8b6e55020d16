"""train/trainer.py (+ batching, checkpoint, schedule) on tiny Qwen3 models and world data.

Every run here is a real training run of a `Qwen3ForCausalLM` on token ids of the reference
world's problems, tokenized with the world's own tokenizer (vocab padded to 64: padding rows
exist, and `len(tokenizer)` slices them off).
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from data.answers import format_prompt
from data.schemas import LOGPROB_MIN, LOGPROB_SCALE, TRAIN_LOG, conform, logprob_gaps
from train.batching import (
    BatchPlan,
    Example,
    collate,
    example_from_scores,
    fit_examples,
    micro_batches,
    save_examples,
    share,
)
from train.checkpoint import CheckpointMismatchError, checkpoint_name, latest_checkpoint
from train.config import LoraConfig, TrainConfig
from train.losses import cross_entropy, reduce_tokens, reverse_kl
from train.models import load_model
from train.schedule import lr_factor
from train.trainer import LaunchSpec, TrainInputError, train
from world import build_problems, corpus_texts, problem_from_record, render_concise
from world.config import TinyModelConfig, build_tiny_model
from world.tokenizer import IM_END, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
SMALL = TinyModelConfig(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    intermediate_size=64,
)  # fmt: skip


# ---- World data, models, teacher scores --------------------------------------------------------


def make_world(tok_dir: Path) -> dict:
    """Tokenizer (saved to `tok_dir`), train records and test records of the reference world."""
    records = build_problems(3, n_train=200, n_test=40, n_heldout=0, difficulty=(1, 3))
    tok = train_tokenizer(corpus_texts(records, seed=3), vocab_size=1024, out_dir=tok_dir)
    train_recs = [r for r in records if r["split"] == "train"]
    test_recs = [r for r in records if r["split"] == "test"]
    return {"tok": tok, "tok_dir": tok_dir, "train": train_recs, "test": test_recs}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_world(tmp_path_factory.mktemp("tok"))


def concise_examples(tok, records: list[dict]) -> list[Example]:
    """Prompt = chat-formatted question; target = concise completion + EOS, tokenized once."""
    out = []
    for record in records:
        problem = problem_from_record(record)
        prompt = tok.encode(format_prompt(problem.question))
        out.append(Example(prompt, tok.encode(render_concise(problem) + IM_END)))
    return out


@pytest.fixture(scope="module")
def examples(world: dict) -> list[Example]:
    return concise_examples(world["tok"], world["train"])


def student(tok, cfg: TinyModelConfig = SMALL, seed: int = 0, dropout: float = 0.0):
    model = build_tiny_model(tok, cfg, seed=seed)
    if dropout:
        model.config.attention_dropout = dropout
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = dropout
    return model


@torch.no_grad()
def score_topk(teacher, examples: list[Example], k: int, vocab: int) -> list[Example]:
    """The score stage in miniature: teacher top-k per target token, stored as int16."""
    out = []
    for ex in examples:
        ids = torch.tensor([ex.prompt_ids + ex.target_ids])
        start = len(ex.prompt_ids) - 1
        logits = teacher(ids).logits[0, start : start + len(ex.target_ids), :vocab]
        top = torch.log_softmax(logits.float(), -1).topk(k)
        q = (top.values / LOGPROB_SCALE).round().clamp_min(LOGPROB_MIN / LOGPROB_SCALE)
        flat_q = logprob_gaps(q.to(torch.int16).numpy()).flatten().tolist()
        out.append(
            example_from_scores(
                ex.prompt_ids, ex.target_ids, top.indices.flatten().tolist(), flat_q, k
            )
        )
    return out


@pytest.fixture(scope="module")
def scored(world: dict, examples: list[Example]) -> list[Example]:
    teacher = student(world["tok"], seed=7).eval()
    return score_topk(teacher, examples[:64], k=8, vocab=len(world["tok"]))


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


def cfg_(**kw) -> TrainConfig:
    base = {"steps": 3, "batch_size": 4, "lr": 1e-2, "warmup_steps": 0, "checkpoint_every": 100}
    return TrainConfig(**{**base, **kw})


# ---- Schedule, plan, collation ----------------------------------------------------------------


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    kw = {"schedule": "cosine", "warmup_steps": 4, "total_steps": 14, "min_lr_ratio": 0.1}
    f = [lr_factor(i, **kw) for i in range(14)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == 1.0
    assert all(a >= b for a, b in itertools.pairwise(f[4:]))
    assert f[13] == pytest.approx(0.1)
    assert lr_factor(100, **{**kw, "schedule": "constant"}) == 1.0


def test_batch_plan_is_deterministic_epoch_wise_and_length_sorted() -> None:
    lengths = list(np.random.default_rng(0).integers(5, 200, size=103))
    plan = BatchPlan(lengths, global_size=8, seed=1)
    again = BatchPlan(lengths, global_size=8, seed=1)
    epoch = [plan.batch(i) for i in range(12)]  # 103 // 8 = 12 batches per epoch
    assert epoch == [again.batch(i) for i in reversed(range(12))][::-1]  # any visiting order
    flat = [i for b in epoch for i in b]
    assert len(set(flat)) == 96 and all(len(b) == 8 for b in epoch)  # no repeats in an epoch
    assert all([lengths[i] for i in b] == sorted(lengths[i] for i in b) for b in epoch)
    assert plan.batch(12) != epoch[0] and BatchPlan(lengths, 8, seed=2).batch(0) != epoch[0]
    tiny = BatchPlan([3, 1, 2], global_size=8, seed=0)  # fewer examples than one batch
    assert sorted(set(tiny.batch(0))) == [0, 1, 2] and len(tiny.batch(5)) == 8


def test_micro_batches_are_shared_by_every_process_whatever_their_count() -> None:
    """The distributed trainer's data split: the micro-batches do not depend on the process
    count, and the processes' shares of each are its rows, each once, in order."""
    batch = list(range(16))
    micro = micro_batches(batch, 4)  # grad_accum 4
    assert micro == [batch[0:4], batch[4:8], batch[8:12], batch[12:16]]
    for world in (1, 2, 3, 4):
        for m in micro:
            shares = [share(m, world, r) for r in range(world)]
            assert [i for s in shares for i in s] == m and all(shares)


def test_collate_masks_by_length_so_eos_counts_when_pad_is_eos() -> None:
    eos = 2
    a, b = Example([5, 6, 7], [8, eos]), Example([5], [9, 9, 9, eos])
    batch = collate([a, b], pad_id=eos)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, eos], [5, 9, 9, 9, eos]]
    # position t predicts token t + 1: row 0 predicts 8 (t=2) and eos (t=3); row 1 t=0..3
    assert batch.loss_mask.tolist() == [[False, False, True, True], [True, True, True, True]]
    assert batch.labels[0, 3] == eos and batch.labels[1, 3] == eos
    padded = collate([a, Example([5], [eos])], pad_id=eos)
    assert padded.loss_mask[1].tolist() == [True, False, False, False]  # its pads are not targets


def test_fit_examples_cuts_targets_and_drops_overlong_prompts() -> None:
    top = np.zeros((4, 2), dtype=np.int64)
    ex = Example([1] * 10, [2, 3, 4, 5], top, top.astype(np.float32))
    kept, dropped, truncated = fit_examples([ex, Example([1] * 20, [2])], max_length=12)
    assert (dropped, truncated) == (1, 1)
    assert kept[0].target_ids == [2, 3] and kept[0].topk_ids.shape == (2, 2)


def test_scores_are_dequantised_with_logprob_scale() -> None:
    """Stored as rank-order gaps: [5, 1995] is [-5, -2000], [0, 32000] is [0, -32000]."""
    ex = example_from_scores([1], [7, 8], [7, 3, 8, 4], [5, 1995, 0, 32000], k=2)
    assert ex.topk_ids.tolist() == [[7, 3], [8, 4]]
    np.testing.assert_allclose(ex.topk_logprobs, [[-0.005, -2.0], [0.0, -32.0]], rtol=1e-6)


# ---- The step: reduction, alignment, accumulation, skipping -----------------------------------


def test_first_step_loss_equals_naive_full_logits_ce_with_pad_equal_eos(world, examples) -> None:
    """The trainer's CE equals Σ −log p(y) over every target token (EOS too) / their count."""
    tok = copy.deepcopy(world["tok"])
    tok.pad_token = IM_END  # Qwen's situation: pad == eos
    assert tok.pad_token_id == tok.eos_token_id
    batch_examples = examples[:8]
    model = student(tok)
    with torch.no_grad():
        b = collate(batch_examples, pad_id=tok.pad_token_id)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1]
        per = cross_entropy(logits, b.labels, b.loss_mask, vocab_limit=len(tok))
        want = float(reduce_tokens(per, b.loss_mask))
    rows: list[dict] = []
    cfg = cfg_(loss="ce", steps=1, batch_size=2, grad_accum=4)  # global batch = all 8
    train(model, batch_examples, cfg, tokenizer=tok, log_fn=rows.append)
    assert rows[0]["tokens"] == sum(len(ex.target_ids) for ex in batch_examples)  # EOS counted
    assert all(ex.target_ids[-1] == tok.eos_token_id for ex in batch_examples)
    assert rows[0]["loss"] == pytest.approx(want, rel=1e-5)


def test_eos_is_learnt_when_pad_is_eos(world, examples) -> None:
    tok = copy.deepcopy(world["tok"])
    tok.pad_token = IM_END
    few = examples[:4]
    model = student(tok, seed=1)
    cfg = cfg_(loss="ce", steps=60, batch_size=4, schedule="constant")
    train(model, few, cfg, tokenizer=tok)
    with torch.no_grad():
        for ex in few:
            ids = torch.tensor([ex.prompt_ids + ex.target_ids[:-1]])
            p_eos = torch.softmax(model(ids).logits[0, -1, : len(tok)], -1)[tok.eos_token_id]
            assert p_eos > 0.5  # masked by token id it would stay near 1 / len(tok)


@pytest.mark.parametrize(
    "loss,mode", [("ce", "offline_topk"), ("reverse_kl", "offline_topk"), ("jsd", "online")]
)
def test_grad_accumulation_of_4_equals_one_big_batch(world, scored, loss: str, mode: str) -> None:
    """Online: JSD(β=0.3) at τ=1.5 from a wider teacher, so every term of the fused gradient counts."""
    teacher = None
    if mode == "online":
        teacher = student(world["tok"], TinyModelConfig(hidden_size=48, num_hidden_layers=1), 5)
    runs = {}
    for name, (bs, accum) in {"big": (8, 1), "accum": (2, 4)}.items():
        model = student(world["tok"])
        rows: list[dict] = []
        cfg = cfg_(
            loss=loss,
            teacher_mode=mode,
            beta=0.3,
            temperature=1.5 if mode == "online" else 1.0,
            steps=2,
            batch_size=bs,
            grad_accum=accum,
        )
        train(model, scored, cfg, teacher=teacher, tokenizer=world["tok"], log_fn=rows.append)
        runs[name] = (weights(model), [r["loss"] for r in rows])
    assert runs["big"][1] == pytest.approx(runs["accum"][1], rel=1e-5)
    assert_same_weights(runs["big"][0], runs["accum"][0], atol=1e-5)
    assert not torch.equal(
        runs["big"][0]["model.embed_tokens.weight"], student(world["tok"]).model.embed_tokens.weight
    )


def test_nan_batch_is_skipped_counted_and_leaves_weights_alone(world, scored) -> None:
    data = list(scored[:24])
    bad = data[5]
    nan_lp = bad.topk_logprobs.copy()
    nan_lp[len(bad.target_ids) // 2, 0] = np.nan
    data[5] = Example(bad.prompt_ids, bad.target_ids, bad.topk_ids, nan_lp)
    cfg = cfg_(steps=3, batch_size=8)  # 24 examples: each appears once in 3 steps
    plan = BatchPlan([ex.length for ex in data], 8, seed=0)
    bad_step = next(s for s in (1, 2, 3) if 5 in plan.batch(s - 1))
    model = student(world["tok"])
    snapshots, rows = [weights(model)], []

    def log_fn(row: dict) -> None:
        rows.append(row)
        snapshots.append(weights(model))

    result = train(model, data, cfg, tokenizer=world["tok"], log_fn=log_fn)
    assert result.skipped_steps == 1 and [r["skipped"] for r in rows].count(True) == 1
    assert rows[bad_step - 1]["skipped"] and rows[bad_step - 1]["loss"] is None
    assert_same_weights(snapshots[bad_step - 1], snapshots[bad_step], atol=0)
    for step in {1, 2, 3} - {bad_step}:
        assert not rows[step - 1]["skipped"] and rows[step - 1]["loss"] > 0
        assert not torch.equal(
            snapshots[step - 1]["model.embed_tokens.weight"],
            snapshots[step]["model.embed_tokens.weight"],
        )
    conform(pa.Table.from_pylist(rows), TRAIN_LOG, name="train_log")  # rows match the schema


def test_online_teacher_loss_equals_full_logits_reverse_kl(world, examples) -> None:
    """Online mode from hidden states = reverse KL on full logits, with and without own prompts."""
    tok, vocab = world["tok"], len(world["tok"])
    teacher = student(tok, TinyModelConfig(hidden_size=48, num_hidden_layers=1), seed=5).eval()
    instruction = tok.encode("Be concise.\n")
    plain = examples[:4]
    own = [
        Example(e.prompt_ids, e.target_ids, None, None, instruction + e.prompt_ids) for e in plain
    ]
    for data in (plain, own):
        model = student(tok)
        with torch.no_grad():
            b = collate(data, pad_id=0)
            s_logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1]
            t_ids = b.input_ids if b.teacher_input_ids is None else b.teacher_input_ids
            t_mask = b.loss_mask if b.teacher_loss_mask is None else b.teacher_loss_mask
            t_logits = teacher(input_ids=t_ids).logits[:, :-1]
            per_s = s_logits[b.loss_mask][:, :vocab]
            per_t = t_logits[t_mask][:, :vocab]
            ones = torch.ones(per_s.shape[0], dtype=torch.bool)
            want = float(reverse_kl(per_s, per_t, ones, temperature=1.5).mean())
        rows: list[dict] = []
        cfg = cfg_(teacher_mode="online", temperature=1.5, steps=1, batch_size=4)
        train(model, data, cfg, teacher=teacher, tokenizer=tok, log_fn=rows.append)
        assert rows[0]["loss"] == pytest.approx(want, rel=1e-5)


def test_runs_that_cannot_work_are_refused_up_front(world, examples, scored) -> None:
    model = student(world["tok"])
    with pytest.raises(TrainInputError, match="needs a teacher"):
        train(model, examples[:8], cfg_(teacher_mode="online"))
    with pytest.raises(TrainInputError, match="frozen copy"):
        train(model, examples[:8], cfg_(teacher_mode="online"), teacher=model)
    with pytest.raises(ValueError, match="topk_ids"):
        train(model, examples[:8], cfg_(teacher_mode="offline_topk"))
    with pytest.raises(TrainInputError, match="no example fits"):
        train(model, examples[:8], cfg_(max_length=16))


# ---- Checkpoints and resuming -----------------------------------------------------------------


def test_partial_checkpoints_are_never_picked_up(tmp_path: Path, world, examples) -> None:
    cfg = cfg_(loss="ce", steps=4, checkpoint_every=2)
    train(student(world["tok"]), examples[:16], cfg, out_dir=tmp_path)
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(tmp_path) == root / checkpoint_name(4)
    (root / ".tmp-step-000006").mkdir()  # killed before the rename
    (root / ".tmp-step-000006" / "trainable.pt").write_bytes(b"half")
    (root / checkpoint_name(8)).mkdir()  # a directory without its state file
    assert latest_checkpoint(tmp_path) == root / checkpoint_name(4)
    result = train(student(world["tok"]), examples[:16], cfg, out_dir=tmp_path)
    assert result.resumed_from == 4 and not (root / ".tmp-step-000006").exists()
    with pytest.raises(CheckpointMismatchError, match="lr differ"):
        train(
            student(world["tok"]), examples[:16], cfg_(loss="ce", steps=4, lr=1.0), out_dir=tmp_path
        )


# quiet logs: DCP's "assuming single process" warning at every checkpoint is filtered
@pytest.mark.filterwarnings("error:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("merge", [True, False])
def test_lora_resume_and_save(tmp_path: Path, world, scored, merge: bool) -> None:
    """Adapters only; a resumed LoRA run (adapter dropout on) equals an uninterrupted one."""
    base_dir = tmp_path / "base"
    student(world["tok"]).save_pretrained(base_dir)
    lora = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.1, merge=merge)
    cfg = cfg_(steps=4, checkpoint_every=2, lora=lora)
    straight = train(load_model(base_dir, device="cpu"), scored, cfg, out_dir=tmp_path / "a")
    train(load_model(base_dir, device="cpu"), scored, cfg, out_dir=tmp_path / "b")
    # crash after step 2: drop the step-4 checkpoint and the final model, then rerun
    os.rename(tmp_path / "b/checkpoints/step-000004", tmp_path / "b/gone")
    resumed = train(load_model(base_dir, device="cpu"), scored, cfg, out_dir=tmp_path / "b")
    assert resumed.resumed_from == 2 and [r["step"] for r in resumed.log] == [1, 2, 3, 4]
    assert_same_weights(weights(straight.model), weights(resumed.model), atol=1e-6)
    saved = load_model(tmp_path / "a/model", device="cpu")
    assert (tmp_path / "a/model/adapter_config.json").is_file() != merge
    base = load_model(base_dir, device="cpu")
    ids = torch.tensor([scored[0].prompt_ids + scored[0].target_ids])
    with torch.no_grad():
        got, want = saved(ids).logits, straight.model(ids).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(got, base(ids).logits)  # the adapters did something
    trained = [n for n, p in straight.model.named_parameters() if p.requires_grad]
    assert merge or all("lora_" in n for n in trained)


def write_spec(
    tmp_path: Path, world, examples, model_dir: Path, out: Path, cfg: TrainConfig
) -> Path:
    """A LaunchSpec file (and its examples) for `python -m train.trainer` or torchrun."""
    data = tmp_path / "examples.jsonl"
    if not data.exists():
        save_examples(data, examples)
    spec = LaunchSpec(
        model=str(model_dir), examples=str(data), out_dir=str(out), config=cfg,
        tokenizer=str(world["tok_dir"]), threads=1, cpu=True,
    )  # fmt: skip
    path = tmp_path / f"spec-{out.name}.json"
    path.write_text(spec.model_dump_json())
    return path


def test_kill_9_and_resume_ends_with_the_same_weights(tmp_path: Path, world, examples) -> None:
    """A subprocess killed with SIGKILL mid-run, rerun, ends where an uninterrupted run does.

    Attention dropout is on, so this also proves the RNG state is restored; steps span a cosine
    schedule and AdamW moments, so scheduler and optimizer state are too.
    """
    model_dir = tmp_path / "student"
    student(world["tok"], dropout=0.1).save_pretrained(model_dir)
    # 60 steps: ~50 left after the kill point, so a slow poll on a busy machine still lands mid-run
    cfg = cfg_(loss="ce", steps=60, batch_size=8, warmup_steps=3, lr=3e-3, checkpoint_every=3)
    data = examples[:64]
    out = tmp_path / "killed"
    spec = write_spec(tmp_path, world, data, model_dir, out, cfg)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "train.trainer", str(spec)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while latest_checkpoint(out) is None or latest_checkpoint(out).name < checkpoint_name(9):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(out).name < checkpoint_name(60) and not (out / "model").exists()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    straight = train(load_model(model_dir, device="cpu"), data, cfg, tokenizer=world["tok"])
    resumed = load_model(out / "model", device="cpu")
    assert_same_weights(weights(straight.model), weights(resumed), atol=1e-5)
    log = json.loads((out / "log.json").read_text())
    assert [r["step"] for r in log] == list(range(1, 61))
    assert [r["loss"] for r in log] == pytest.approx([r["loss"] for r in straight.log], rel=1e-5)


# ---- Learning -----------------------------------------------------------------------------------


@torch.no_grad()
def heldout_kl(model, teacher, examples: list[Example], vocab: int) -> float:
    """Mean per-token full-vocabulary reverse KL(student‖teacher) on the examples' targets."""
    b = collate(examples, pad_id=0)
    s = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1]
    t = teacher(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1]
    return float(reduce_tokens(reverse_kl(s, t, b.loss_mask, vocab_limit=vocab), b.loss_mask))


def test_offline_topk_reverse_kl_lowers_heldout_kl_to_the_teacher(world, examples) -> None:
    """Teacher = tiny model fine-tuned on concise traces; student = random init.

    Fifty steps of top-k (k=16, tail) reverse KL on the teacher's scores of concise targets must
    clearly lower the full-vocabulary KL to the teacher on concise traces of unseen problems.
    """
    tok, vocab = world["tok"], len(world["tok"])
    teacher = student(tok, seed=11)
    train(
        teacher,
        examples,
        cfg_(loss="ce", steps=60, batch_size=16, lr=3e-3, warmup_steps=5),
        tokenizer=tok,
    )
    heldout = concise_examples(tok, world["test"])
    distil = score_topk(teacher, examples, k=16, vocab=vocab)
    model = student(tok, seed=12)
    before = heldout_kl(model, teacher, heldout, vocab)
    cfg = cfg_(loss="reverse_kl", steps=50, batch_size=16, lr=3e-3, warmup_steps=5)
    result = train(model, distil, cfg, tokenizer=tok)
    after = heldout_kl(model, teacher, heldout, vocab)
    assert result.skipped_steps == 0
    assert after < 0.3 * before, (before, after)
