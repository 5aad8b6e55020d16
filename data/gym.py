"""Problems from the procedural families of ``reasoning-gym``, graded by their own scorers.

``problems: {source: reasoning_gym, reasoning_gym: {dataset: chain_sum, size: 500}}`` draws
``size`` problems of one family (``gsm_symbolic``, ``basic_arithmetic``, ``chain_sum``, or any
other ``reasoning_gym.create_dataset`` name), seeded, split train/test by a seeded hash like a
problem file. A completion is correct when the family's ``score_answer`` gives exactly 1.0 for
the extracted answer against the problem's entry (``gsm_symbolic`` gives 0.01 to a wrong
number: partial credit is not correct).
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Callable
from functools import cache
from typing import Any

from pydantic import Field

from data.configbase import StrictModel
from data.errors import UserError


class GymConfig(StrictModel):
    dataset: str = Field(
        min_length=1, description="A reasoning-gym dataset name, e.g. chain_sum, gsm_symbolic."
    )
    size: int = Field(500, ge=1, description="Problems drawn (train and test together).")
    test_fraction: float = Field(0.2, ge=0, le=1, description="Share put in test by hash.")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="The dataset's own config keys (e.g. chain_sum: {min_terms: 2, max_terms: "
        "4}), passed to reasoning_gym.create_dataset.",
    )


@cache
def _dataset(name: str, size: int, seed: int, options: tuple[tuple[str, Any], ...]) -> Any:
    """``reasoning_gym.create_dataset(name, ...)``, its steps apart so that each failure has its
    meaning: an unknown name and a config the family refuses (an unknown key: TypeError; a value
    out of range: its ``validate`` asserts, or raises ValueError) are the user's; the family
    failing to build from a config it accepted is a bug (reasoning-gym's), with its traceback."""
    from reasoning_gym.factory import DATASETS

    if name not in DATASETS:
        close = difflib.get_close_matches(name, DATASETS, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"reasoning_gym.dataset {name!r}: no such reasoning-gym dataset{hint}")
    dataset_cls, config_cls = DATASETS[name]
    try:
        config = config_cls(size=size, seed=seed, **dict(options))
        if hasattr(config, "validate"):
            config.validate()
    except (TypeError, ValueError, AssertionError) as exc:  # the options, as the family says
        raise UserError(
            f"reasoning_gym.dataset {name!r}: options refused ({type(exc).__name__}: "
            f"{(str(exc).splitlines() or [''])[0][:200]})"
        ) from None
    return dataset_cls(config=config)


def dataset(cfg: GymConfig, seed: int) -> Any:
    return _dataset(cfg.dataset, cfg.size, seed, tuple(sorted(cfg.options.items())))


def gym_records(cfg: GymConfig, seed: int) -> list[dict[str, Any]]:
    """The family's problems as problem records (see data/sources.py for the columns)."""
    ds = dataset(cfg, seed)
    out = []
    for i in range(cfg.size):
        entry = ds[i]
        u = int(hashlib.sha256(f"{seed}\0{entry['question']}".encode()).hexdigest()[:16], 16)
        out.append(
            {
                "problem_id": f"{cfg.dataset}-{i:06d}",
                "family": cfg.dataset,
                "split": "test" if u / 2**64 < cfg.test_fraction else "train",
                "difficulty": 0,
                "prompt": entry["question"],
                "answer": str(entry["answer"]),
                "source": f"reasoning_gym:{cfg.dataset}",
            }
        )
    return out


def gym_grader(cfg: GymConfig, seed: int) -> Callable[[str | None, str], bool]:
    """The family's scorer as a grader: correct when ``score_answer`` is 1.0 for the entry
    whose gold answer this is (the first such entry: the three families above score by the
    answer alone, and entries with one answer score alike)."""
    ds = dataset(cfg, seed)
    entries: dict[str, dict] = {}
    for i in range(cfg.size):
        entries.setdefault(str(ds[i]["answer"]), ds[i])

    def grade(pred: str | None, gold: str) -> bool:
        entry = entries.get(gold, {"answer": gold, "metadata": {}})
        return pred is not None and ds.score_answer(pred, entry) == 1.0

    return grade
