"""What the built-in models are trained on (world/corpus.py): the mix is what the config says."""

from __future__ import annotations

import pytest

from data.answers import format_prompt
from data.prompts import cued_prompt
from world import STUDENT_OPENER, build_problems, style_of
from world.config import BootstrapConfig
from world.corpus import make_texts


def test_style_of_reads_the_first_think_line() -> None:
    import random

    from world import generate, render_concise, render_steps, render_verbose

    p = generate("transfer", random.Random(3), 2)
    assert style_of(render_verbose(p, random.Random(0))) == "verbose"
    assert style_of(render_steps(p)) == "steps"
    assert style_of(render_concise(p)) == "concise"
    assert style_of("<think>\nhello\n</think>") == style_of("no think at all") == "other"


def test_student_mix_shares_and_the_one_opener() -> None:
    cfg = BootstrapConfig(student_mix={"plain_target_forced": 0})  # cue 0.3, plain 0.4 steps
    texts = make_texts("student", 2000, cfg, seed=1, workers=1)
    cued = [(p, c) for p, c in texts if "Solve this as concisely" in p]
    plain = [(p, c) for p, c in texts if "Solve this as concisely" not in p]
    assert len(cued) / len(texts) == pytest.approx(0.3, abs=0.04)
    assert all(style_of(c) == "steps" for _, c in cued)
    steps = [c for _, c in plain if style_of(c) == "steps"]
    assert len(steps) / len(plain) == pytest.approx(0.4, abs=0.04)
    verbose = [c for _, c in plain if style_of(c) == "verbose"]
    assert len(verbose) + len(steps) == len(plain)
    assert all(c.split("\n")[1] == STUDENT_OPENER for c in verbose)
    question = cued[0][0].split("\n", 1)[1].split("\n\nSolve this")[0]
    assert cued[0][0] == cued_prompt(question) and format_prompt(question) != cued[0][0]


def test_the_first_world_is_one_setting_away() -> None:
    """cue_share 0, plain_target_share 0, openers drawn: the verbose-only student of old."""
    cfg = BootstrapConfig(
        student_mix={"cue_share": 0, "plain_target_share": 0, "fixed_opener": False}
    )
    texts = make_texts("student", 300, cfg, seed=1, workers=1)
    assert all(style_of(c) == "verbose" for _, c in texts)
    assert len({c.split("\n")[1] for _, c in texts}) == 3


def test_teacher_rewrites_into_the_target_style_and_never_sees_eval_problems() -> None:
    cfg = BootstrapConfig()
    evals = build_problems(0, 0, 200, 50, (1, 2))
    exclude = [r["prompt"] for r in evals]
    texts = make_texts("teacher", 1000, cfg, seed=2, exclude=exclude, workers=1)
    assert all(style_of(c) == "steps" for _, c in texts)
    shown = [p.split("Solution:\n", 1)[1] for p, _ in texts]
    inputs = [style_of(s.split("<|im_end|>")[0]) for s in shown]
    assert inputs.count("steps") / len(inputs) == pytest.approx(0.15, abs=0.04)
    assert set(inputs) == {"steps", "verbose"}
    questions = {p.split("Problem:\n", 1)[1].split("\n\nSolution:")[0] for p, _ in texts}
    assert not questions & set(exclude)
    with pytest.raises(ValueError, match="role must be"):
        make_texts("critic", 1, cfg, seed=0)


def test_forced_examples_train_the_short_branch_but_not_its_choice() -> None:
    """plain_target_forced: the first think word moves into the prompt, on a token boundary."""
    from flows.bootstrap import SHIPPED
    from train.models import load_tokenizer
    from world.corpus import encode

    cfg = BootstrapConfig(
        student_mix={"cue_share": 0, "plain_target_share": 0.5, "plain_target_forced": 0.5}
    )
    texts = make_texts("student", 800, cfg, seed=4, workers=1)
    forced = [(p, c) for p, c in texts if p.endswith("<think>\nStep")]
    chosen = [(p, c) for p, c in texts if style_of(c) == "steps"]
    assert len(forced) / len(texts) == pytest.approx(0.25, abs=0.05)
    assert len(chosen) / len(texts) == pytest.approx(0.25, abs=0.05)
    assert all(c.startswith(" 1: ") for _, c in forced)
    tok = load_tokenizer(SHIPPED / "student")
    for (p, c), ex in zip(forced[:20], encode(tok, forced[:20]), strict=True):
        whole = tok(p + c + "<|im_end|>", add_special_tokens=False)["input_ids"]
        assert ex.prompt_ids + ex.target_ids == whole, "the split is a token boundary"
        assert tok.convert_ids_to_tokens(ex.prompt_ids[-1]) == "Step"
