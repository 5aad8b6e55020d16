"""Issue 5's "done when": distilling the shipped student on the shipped teacher's rewrites works.

The models are the real ones of the pipeline, `world/assets/{tokenizer,student,teacher}`: a
student that writes verbose traces from the plain prompt and a teacher trained to rewrite them
into the short steps style. The data
is made the way one MPD round makes it, in miniature:

    problem (world generator) → student trace (verbose) → teacher rewrite (greedy, hf engine)
    example = (plain problem prompt, the rewrite's token ids as generated, EOS included)

and the measure is the one the round optimises: the student's mean per-token KL to the teacher
over the full vocabulary, on rewrites of problems it never trained on, with the teacher reading
the rewrite request as the default run's score stage does (`score.context: rewrite`: the tiny
teacher is a rewriter, not a solver; under the plain prompt its distribution is neither sharp
nor right, and the student, a better solver than it, has nothing to learn there). A few dozen
steps must cut it clearly, in both teacher modes: online (the teacher in the step, the fused
full-vocabulary path of `train.fused`) and offline top-k (the teacher's scores from the engine,
stored as the `scores` table stores them).

Student traces come from the verbose renderer the student was trained to imitate, not from
sampling the student: the same style, without decoding ~300 tokens per trace on a CPU. The
rewrites, what the student trains on, are the teacher's own greedy generations: they are most of
the test's time (the module fixture), the two training runs a few seconds each.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data.answers import format_prompt
from data.prompts import rewrite_prompt
from data.schemas import LOGPROB_MIN, LOGPROB_SCALE, logprob_gaps
from engines.base import GenerationParams
from engines.hf import HFEngine
from train.batching import Example, collate, example_from_scores
from train.config import TrainConfig
from train.losses import reduce_tokens, reverse_kl
from train.models import load_model, load_tokenizer
from train.trainer import train
from world import TRAIN_FAMILIES, Problem, generate, render_verbose

ASSETS = Path(__file__).resolve().parents[1] / "world" / "assets"
N_TRAIN, N_HELDOUT = 48, 16
DIFFICULTY = (1, 2)  # the bootstrap's range: what both models were trained on
VERBOSITY = 2  # the student's trained style; the teacher was trained to rewrite it
TOP_K = 32  # ScoreConfig's default

pytestmark = pytest.mark.skipif(
    not (ASSETS / "teacher" / "model.safetensors").is_file(), reason="no shipped world models"
)


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ASSETS / "tokenizer")


@pytest.fixture(scope="module")
def teacher():
    return load_model(ASSETS / "teacher", device="cpu")


@pytest.fixture(scope="module")
def rewrites(tok, teacher) -> tuple[list[Example], list[Example]]:
    """(train, held-out) examples: plain problem prompt → the teacher's greedy rewrite."""
    rng = random.Random(5)
    problems: dict[str, Problem] = {}
    while len(problems) < N_TRAIN + N_HELDOUT:  # distinct questions: held-out means unseen
        problem = generate(rng.choice(TRAIN_FAMILIES), rng, rng.randint(*DIFFICULTY))
        problems.setdefault(problem.question, problem)
    chosen = list(problems.values())
    requests = [
        encode(tok, rewrite_prompt(p.question, render_verbose(p, rng, VERBOSITY))) for p in chosen
    ]
    # steps-style rewrites: median ~170 tokens, the longest ~410 (configs/tiny.yaml rewrite:)
    params = GenerationParams(temperature=0.0, max_tokens=448, stop_token_ids=(tok.eos_token_id,))
    outs = [row[0] for row in HFEngine(teacher, tok).generate(requests, params)]
    assert sum(o.finish_reason == "stop" for o in outs) >= 0.9 * len(outs)  # real rewrites
    examples = [
        Example(encode(tok, format_prompt(p.question)), o.token_ids, teacher_prompt_ids=request)
        for p, o, request in zip(chosen, outs, requests, strict=True)
    ]
    return examples[:N_TRAIN], examples[N_TRAIN:]


def with_topk_scores(engine: HFEngine, examples: list[Example]) -> list[Example]:
    """The score stage in miniature: top-k under the rewrite request, stored as int16 as the
    `scores` table stores them (data.schemas.quantize_logprobs), read back as the train stage reads them."""
    prompts, targets = [e.teacher_prompt_ids for e in examples], [e.target_ids for e in examples]
    out = []
    for e, s in zip(examples, engine.score(prompts, targets, TOP_K), strict=True):
        q = np.round(np.clip(s.topk_logprobs, LOGPROB_MIN, 0.0) / LOGPROB_SCALE).astype(np.int16)
        flat_ids, flat_q = s.topk_ids.reshape(-1).tolist(), logprob_gaps(q).reshape(-1).tolist()
        out.append(example_from_scores(e.prompt_ids, e.target_ids, flat_ids, flat_q, TOP_K))
    return out


@torch.no_grad()
def heldout_kl(student, teacher, examples: list[Example], vocab: int) -> float:
    """Mean per-token reverse KL(student‖teacher), full vocabulary, on the examples' targets:
    the student reading the plain prompt, the teacher its own context (the rewrite request)."""
    student.eval()
    b = collate(examples, pad_id=0)
    s = student(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1]
    t = teacher(input_ids=b.teacher_input_ids, attention_mask=b.teacher_attention_mask).logits
    s, t = s[b.loss_mask.bool()][None], t[:, :-1][b.teacher_loss_mask.bool()][None]
    mask = torch.ones(s.shape[:2])
    return float(reduce_tokens(reverse_kl(s, t, mask, vocab_limit=vocab), mask))


@pytest.mark.parametrize(
    "teacher_mode,loss", [("online", "reverse_kl"), ("offline_topk", "forward_kl")]
)
def test_distilling_on_teacher_rewrites_lowers_heldout_kl(
    tok, teacher, rewrites, teacher_mode: str, loss: str
) -> None:
    """24 steps of 8 rewrites cut the held-out KL to the teacher by at least 10%.

    The student starts close (0.08 nats per token: its short branch already writes what the
    teacher rewrites; the first world's verbose-only student started at 0.86 and lost half in
    the same steps): measured 0.079 → 0.064 online, → 0.069 offline top-k.

    Online reverse KL is MPD's loss; offline top-k forward KL covers the other teacher mode and
    direction. Everything is seeded and greedy, so the numbers repeat run to run.
    """
    train_set, heldout = rewrites
    if teacher_mode == "offline_topk":
        train_set = with_topk_scores(HFEngine(teacher, tok), train_set)
    student = load_model(ASSETS / "student", device="cpu")
    vocab = len(tok)
    before = heldout_kl(student, teacher, heldout, vocab)
    cfg = TrainConfig(
        loss=loss, teacher_mode=teacher_mode, steps=24, batch_size=8, lr=1e-3, warmup_steps=2
    )
    start = time.perf_counter()
    result = train(student, train_set, cfg, teacher=teacher, tokenizer=tok)
    seconds = time.perf_counter() - start
    after = heldout_kl(result.model, teacher, heldout, vocab)
    print(f"{teacher_mode} {loss}: held-out KL {before:.3f} → {after:.3f} ({seconds:.1f} s)")
    assert result.skipped_steps == 0
    assert after < 0.9 * before, (before, after)
