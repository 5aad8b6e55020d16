"""The bench's statistics over seeds: plain functions of rows, tested against naive loops.

Two kinds of spread, kept apart because they answer different questions:

- within one seed, over problems: the paired standard error of a difference on the same
  evaluation problems (``bench.accuracy_change_se``, ``bench_paired.vs_mpd_se``, computed in
  SQL). It says how much one run's number would move with other problems.
- over seeds: the standard error of the mean of a number across seeds (this module). It says
  how much the method's number moves with other samples and another training order: the
  spread of problems *and* of the run. With three seeds it is a rough figure (two degrees of
  freedom), and the report says how many seeds each mean has.

A row is a dict (``bench``, ``bench_family`` or ``bench_paired`` rows); nothing here reads a
file.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any


def mean_se(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and standard error of the mean (sample sd / sqrt(k)) of the values that are not
    None; the error is None below two values (one seed has no spread to report)."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None
    if len(xs) < 2:
        return xs[0], None
    return statistics.fmean(xs), statistics.stdev(xs) / math.sqrt(len(xs))


def over_seeds(
    rows: Iterable[dict[str, Any]],
    keys: Sequence[str],
    metrics: Sequence[str],
    one_seed_se: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """One row per distinct ``keys`` (in first-seen order): ``seeds`` (how many rows), and per
    metric its mean over the rows and ``<metric>_se``, the standard error over seeds.

    A group of one seed has no spread over seeds; for a metric named in ``one_seed_se`` its
    ``_se`` is then that row's own column of that name (the paired s.e. over problems), so a
    one-seed bench still says how far its numbers can be trusted."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, group in groups.items():
        agg: dict[str, Any] = dict(zip(keys, key, strict=True))
        agg["seeds"] = len(group)
        agg["seed_list"] = sorted(g["seed"] for g in group if "seed" in g)
        for name in metrics:
            agg[name], agg[f"{name}_se"] = mean_se([g.get(name) for g in group])
            if len(group) == 1 and name in (one_seed_se or {}):
                agg[f"{name}_se"] = group[0].get((one_seed_se or {})[name])
        out.append(agg)
    return out


def final_rounds(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Each method's last evaluated round (what a campaign of it ends with)."""
    last: dict[str, int] = {}
    for r in rows:
        last[r["method"]] = max(last.get(r["method"], 0), r["round"])
    return last


def at_final_round(rows: Iterable[dict[str, Any]], last: dict[str, int]) -> list[dict[str, Any]]:
    """The rows of each method's last round."""
    return [r for r in rows if r["round"] == last.get(r["method"])]
