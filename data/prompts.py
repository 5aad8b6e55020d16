"""Prompt templates shared by the rewrite stage and the built-in teacher's training.

The built-in teacher is trained on exactly ``DEFAULT_REWRITE_PROMPT``: a tiny
model reads the instruction as a fixed marker, so a run that changes the
template must use a teacher that understands instructions (a real model).
"""

from __future__ import annotations

from data.answers import format_prompt

DEFAULT_REWRITE_PROMPT = (
    "Rewrite the solution below so it is as concise as possible. Keep the same approach and "
    "the same steps, remove restatements, narration and repeated checks, fix any error, and end "
    "with the final answer in the same format. Output only the rewritten solution.\n\n"
    "Problem:\n{problem}\n\nSolution:\n{trace}"
)


def rewrite_prompt(problem: str, trace: str, template: str = DEFAULT_REWRITE_PROMPT) -> str:
    """The chat-formatted rewrite request for one student trace."""
    return format_prompt(template.format(problem=problem, trace=trace))
