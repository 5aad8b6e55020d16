"""Prompt templates shared by the stages and the built-in models' training.

The built-in teacher is trained on exactly ``DEFAULT_REWRITE_PROMPT``, and the
built-in student on exactly ``CONCISE_CUE``: a tiny model reads an instruction
as a fixed marker, so a run that changes a template must use models that
understand instructions (real ones).

``CONCISE_CUE`` is the reference world's version of "answer concisely": the
built-in student answers in its short (steps) style when the problem comes
inside it and in its verbose habit otherwise, the way an instruction-tuned
model has a concise mode an instruction reaches. The self-distillation teacher
(OPSDC, ``self_distill.instruction``) reads the same cue by default.
"""

from __future__ import annotations

from data.answers import format_prompt

DEFAULT_REWRITE_PROMPT = (
    "Rewrite the solution below so it is as concise as possible. Keep the same approach and "
    "the same steps, remove restatements, narration and repeated checks, fix any error, and end "
    "with the final answer in the same format. Output only the rewritten solution.\n\n"
    "Problem:\n{problem}\n\nSolution:\n{trace}"
)


CONCISE_CUE = (
    "{problem}\n\nSolve this as concisely as possible: only the steps you need, no "
    "restating, no narration, no re-checking, then the final answer."
)


def cued_prompt(problem: str, template: str = CONCISE_CUE) -> str:
    """The chat-formatted problem inside the concise cue."""
    return format_prompt(template.format(problem=problem))


def rewrite_prompt(problem: str, trace: str, template: str = DEFAULT_REWRITE_PROMPT) -> str:
    """The chat-formatted rewrite request for one student trace."""
    return format_prompt(template.format(problem=problem, trace=trace))
