"""``mpd bench --tune lr=GRID``: each method's learning rate, chosen on the dev split.

A reviewer's first question about a method comparison is whose recipe was tuned, and on what.
Here every method gets the same grid, the same budget and the same rule, on problems disjoint
from train and test (``problems.n_dev`` / ``dev_fraction``), and the test split is evaluated
only after every choice is committed:

1. one dev campaign per (method, rate), on the bench's first seed, evaluating the dev split
   only (``flows/bench.py`` ``tune_plan``), in ``<root>/tune/<method>/lr=<lr>``;
2. each method's rate by :func:`choose` from those campaigns' dev evals alone
   (:func:`dev_result` refuses a workspace holding any other split);
3. ``<root>/tune.json`` written atomically (grid, rule, every trial, the choice, the time);
4. only then the bench's own campaigns, each method at its rate, evaluated on test.

The rule, the same for every method: among the rates whose last round loses at most
``bench.tune_tolerance`` of dev accuracy against round 0, the one with the fewest think
tokens (ties: the more accurate, then the smaller rate); if none keeps its accuracy, the most
accurate. Compression methods are judged on both axes; the rule says in advance how.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from data import catalog
from data.fsutil import atomic_write_json
from flows.errors import UserError

log = logging.getLogger("mpd")

TUNE_FILE = "tune.json"
KNOBS = ("lr",)  # what --tune can choose

# The last round's dev evals against round 0's, paired by problem (mpd's own query).
DEV_RESULT = """
SELECT
    e.round,
    count(*) AS eval_n,
    avg(e.correct::DOUBLE) AS accuracy,
    avg(e.correct::DOUBLE - b.correct::DOUBLE) AS accuracy_change,
    stddev_samp(e.correct::DOUBLE - b.correct::DOUBLE) / sqrt(count(*)) AS accuracy_change_se,
    avg(e.think_tokens) / nullif(avg(b.think_tokens), 0) - 1 AS think_change
FROM evals AS e
JOIN evals AS b
    ON b.round = 0
    AND b.split = e.split
    AND b.problem_id = e.problem_id
    AND b.sample_idx = e.sample_idx
WHERE e.split = 'dev'
GROUP BY e.round
ORDER BY e.round DESC
LIMIT 1
"""
OTHER_SPLITS = "SELECT count(*) AS n FROM evals WHERE split <> 'dev'"


def parse_tune(text: str) -> list[float]:
    """``lr=1e-5,3e-5,1e-4`` -> the grid (positive, finite, distinct); a mistake is one line."""
    knob, sep, values = text.partition("=")
    if not sep or knob.strip() not in KNOBS:
        raise UserError(f"--tune expects lr=V1,V2,... (e.g. lr=1e-5,3e-5,1e-4), got {text!r}")
    grid: list[float] = []
    for item in (v.strip() for v in values.split(",")):
        try:
            value = float(item)
        except ValueError:
            raise UserError(f"--tune lr: {item!r} is not a number") from None
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"--tune lr: {item!r} is not a positive learning rate")
        grid.append(value)
    if len(set(grid)) < 2:
        raise UserError(f"--tune lr needs at least two distinct rates, got {text!r}")
    return sorted(set(grid))


def dev_result(workspace: Path) -> dict[str, Any]:
    """A dev campaign's last round against round 0, on dev problems only.

    A dev workspace that holds an evaluation of any other split is a bug (the choice must
    not have read a test row): it raises rather than choose."""
    result, other = catalog.internal_queries(workspace, DEV_RESULT, OTHER_SPLITS)
    if other.column("n")[0].as_py():
        raise RuntimeError(f"{workspace}: a dev campaign evaluated a split other than dev")
    rows = result.to_pylist()
    empty = dict.fromkeys(("round", "eval_n", "accuracy", "accuracy_change", "think_change"))
    return rows[0] if rows else {**empty, "accuracy_change_se": None}


def dev_progress(member: Any, where: str) -> None:
    """One log line per finished dev campaign."""
    try:
        r = dev_result(member.workspace)
    except catalog.SqlError as exc:
        log.warning("%s: no dev result (%s)", where, exc)
        return
    if r["accuracy_change"] is None:
        log.info("%s: no dev evaluation", where)
        return
    log.info(
        "%s: dev round %d Δacc %+.1f points, Δthink %+.0f%%",
        where,
        r["round"],
        r["accuracy_change"] * 100,
        (r["think_change"] or 0.0) * 100,
    )


def choose(trials: list[dict[str, Any]], tolerance: float) -> dict[str, float]:
    """Each method's rate (module docstring's rule) from its trials' dev results."""
    chosen: dict[str, float] = {}
    for method in dict.fromkeys(t["method"] for t in trials):
        mine = [t for t in trials if t["method"] == method]
        kept = [
            t
            for t in mine
            if t["accuracy_change"] is not None and t["accuracy_change"] >= -tolerance
        ]
        if kept:
            best = min(
                kept,
                key=lambda t: (
                    math.inf if t["think_change"] is None else t["think_change"],
                    -t["accuracy_change"],
                    t["lr"],
                ),
            )
        else:
            best = max(
                mine,
                key=lambda t: (
                    -math.inf if t["accuracy_change"] is None else t["accuracy_change"],
                    -t["lr"],
                ),
            )
        chosen[method] = best["lr"]
    return chosen


def tune_lrs(
    root: Path, trials: list[Any], grid: list[float], tolerance: float
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Read every dev campaign, choose, commit ``tune.json``; the trials (with ``chosen``) and
    the choice. A rerun that chooses the same keeps the file (and the time it was committed)."""
    rows = [
        {"method": t.method, "seed": t.seed, "lr": t.cfg.train.lr, **dev_result(t.workspace)}
        for t in trials
    ]
    chosen = choose(rows, tolerance)
    for row in rows:
        row["chosen"] = chosen[row["method"]] == row["lr"]
    record = {
        "grid": grid,
        "tolerance": tolerance,
        "rule": "fewest dev think tokens among rates losing at most `tolerance` dev accuracy; "
        "else the most accurate",
        "trials": rows,
        "chosen": chosen,
    }
    path = root / TUNE_FILE
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = {}
    if {k: old.get(k) for k in record} != json.loads(json.dumps(record)):
        atomic_write_json(path, {**record, "committed_at": time.time()})
    log.info("bench tune: chose %s (%s)", chosen, path)
    return rows, chosen
