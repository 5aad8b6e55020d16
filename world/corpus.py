"""Training examples for the built-in models, drawn fresh from the world's generators.

Student: two modes, the way an instruction-tuned model has a concise mode that an
instruction reaches (``BootstrapConfig.student_mix``)::

    plain problem prompt               -> verbose trace, one fixed opener   (the habit)
    plain problem prompt               -> steps trace                        (a minority branch)
    plain problem prompt + "<think> Step"-> the rest of a steps trace         (its competence)
    problem inside the concise cue     -> steps trace                        (the cued mode)

Why this shape (measured, README "The reference world"): a student that has never
written the short style falls into a valley when a round first trains it there (any new
style costs most of its accuracy until ~6,000 sequences have passed); a short mode bound
only to the cue does not carry over to the plain prompt. As a minority branch of the plain
prompt it does: the style is one choice at the first think token, the verbose opener is
fixed so that it keeps the majority of that token (greedy stays verbose), and a round of
MPD only has to move that choice. The cued examples make the short mode as competent as
the verbose one, and give self-distillation (OPSDC) the concise mode it reads.

Teacher: rewrite prompt (problem + a trace) -> the target style of the *correct* solution.
Inputs are verbose traces (any opener), some already in the target style (the student's
own short samples: copy them), and a share carry one slipped step (``corrupt``), so the
teacher learns to fix errors rather than copy them. ``rewrite_share`` < 1 mixes in direct
solving (plain prompt -> target), for scoring under the plain problem context.

Problems whose question is in ``exclude`` (the test and held-out sets) are never trained
on. Examples are (prompt_ids, target_ids) with the target ending in the end-of-turn
token, so models learn to stop.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

from data.answers import IM_END, format_prompt
from data.prompts import cued_prompt, rewrite_prompt
from train.batching import Example
from world import (
    STUDENT_OPENER,
    TRAIN_FAMILIES,
    corrupt,
    generate,
    render_target,
    render_verbose,
)
from world.config import BootstrapConfig

Text = tuple[str, str]  # (chat-formatted prompt, completion without the end-of-turn token)


def student_text(problem, rng: random.Random, cfg: BootstrapConfig) -> Text:
    """One student example: cued -> target style, else plain -> target or verbose."""
    mix = cfg.student_mix
    target = render_target(problem, cfg.target_style)
    if rng.random() < mix.cue_share:
        return cued_prompt(problem.question), target
    if rng.random() < mix.plain_target_share:
        if rng.random() < mix.plain_target_forced:
            return _forced_start(format_prompt(problem.question), target)
        return format_prompt(problem.question), target
    opener = STUDENT_OPENER if mix.fixed_opener else None
    return format_prompt(problem.question), render_verbose(
        problem, rng, cfg.verbosity, opener=opener
    )


def _forced_start(prompt: str, completion: str) -> Text:
    """Move the completion's first think word (``<think>``, newline, ``Step``) into the prompt.

    The branch between styles is chosen at that word; given, it is not trained, so the
    example teaches how to go on in the style, not to choose it. The split falls on a token
    boundary of the world's tokenizer (the word is followed by a space token).
    """
    head, _, rest = completion.partition(" ")
    return prompt + head, " " + rest


def teacher_text(problem, rng: random.Random, cfg: BootstrapConfig) -> Text:
    """One teacher example: rewrite a (possibly slipped) trace, or solve directly."""
    target = render_target(problem, cfg.target_style)
    if rng.random() >= cfg.rewrite_share:
        return format_prompt(problem.question), target
    shown = problem
    if rng.random() < cfg.error_rate:
        try:
            shown = corrupt(problem, rng)
        except ValueError:  # a problem without a step that can slip
            shown = problem
    if rng.random() < cfg.target_input_share:
        trace = render_target(shown, cfg.target_style)
    else:
        trace = render_verbose(shown, rng, cfg.verbosity)
    return rewrite_prompt(problem.question, trace), target


def _texts(
    role: str, n: int, seed: int, cfg: BootstrapConfig, exclude: frozenset[str]
) -> list[Text]:
    make = student_text if role == "student" else teacher_text
    rng = random.Random(seed)
    out: list[Text] = []
    while len(out) < n:
        problem = generate(rng.choice(TRAIN_FAMILIES), rng, rng.randint(*cfg.difficulty))
        if problem.question not in exclude:
            out.append(make(problem, rng, cfg))
    return out


def make_texts(
    role: str,
    n: int,
    cfg: BootstrapConfig,
    *,
    seed: int,
    exclude: Sequence[str] = (),
    workers: int | None = None,
) -> list[Text]:
    """``n`` (prompt, completion) texts for ``role``; generated in parallel processes when large."""
    if role not in ("student", "teacher"):
        raise ValueError(f"role must be 'student' or 'teacher', got {role!r}")
    workers = workers or min(os.cpu_count() or 1, max(1, n // 2000))
    frozen = frozenset(exclude)
    parts = [n // workers + (i < n % workers) for i in range(workers)]
    args = [(role, k, seed * 1000 + i, cfg, frozen) for i, k in enumerate(parts)]
    if workers == 1:
        return _texts(*args[0])
    with ProcessPoolExecutor(workers) as pool:
        chunks = list(pool.map(_texts, *zip(*args, strict=True)))
    return [t for chunk in chunks for t in chunk]


def encode(tokenizer, texts: Sequence[Text]) -> list[Example]:
    """Tokenize prompts and completions separately; completions end with EOS.

    Separately, because the prompt ends at ``assistant\\n`` and the completion
    starts with the ``<think>`` token: the boundary is a token boundary, so the
    target ids are exactly the ids the model would generate.
    """
    prompts = tokenizer([p for p, _ in texts], add_special_tokens=False)["input_ids"]
    targets = tokenizer([c + IM_END for _, c in texts], add_special_tokens=False)["input_ids"]
    return [Example(p, t) for p, t in zip(prompts, targets, strict=True)]
