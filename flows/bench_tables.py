"""bench.md: the bench's tables as markdown, from rows the report has already read.

Sections, in the order a reader needs them:

1. **Summary** (test split, each method's last round): Δ accuracy against round 0 and Δ think
   tokens, mean ± s.e. over seeds; the difference to MPD, mean ± s.e. over seeds, and seed by
   seed with its paired s.e. over problems; the learning rate each method ran with.
2. **Per family** (last round): Δ accuracy per problem family, the held-out family apart with
   what it means; an aggregate that holds can hide a trade between families.
3. **Every round** per split: the full numbers, mean ± s.e. over seeds.
4. Notes a row cannot carry (off_policy on the reference world), the Pareto front, the plot.

Nothing here computes a statistic: :mod:`flows.bench_stats` does, and SQL before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flows.bench_stats import at_final_round, final_rounds, over_seeds

METRICS = (
    "accuracy",
    "accuracy_change",
    "mean_think_tokens",
    "mean_answer_tokens",
    "mean_total_tokens",
    "tokens_change",
    "think_change",
    "truncation_rate",
    "train_tokens",
    "wall_s",
)
SPLITS = {"test": "Test split", "heldout": "Held-out family"}
# With one seed, a change's ± is its paired s.e. over problems (the rows' own column).
PAIRED = {"accuracy_change": "accuracy_change_se"}
HELDOUT_MEANING = (
    "The held-out split holds problem families that no training problem comes from: no round "
    "trains on them, so their row says whether a method's new length habit carries over to an "
    "unseen kind of problem (or breaks it), not whether the method helps where it trained."
)
BUILTIN_HELDOUT = (
    "On the reference world that family is shopping bills, which neither the student nor the "
    "teacher was ever trained on: they solve a few percent of it before any round, so read a "
    'change there as "nothing broke" at best.'
)


@dataclass
class ReportData:
    """What the report shows: the ``bench``, ``bench_family`` and ``bench_paired`` rows, and
    what the members ran with."""

    rows: list[dict[str, Any]]
    families: list[dict[str, Any]]
    paired: list[dict[str, Any]]
    members: list[Any]
    budget: str
    minutes: float
    failures: dict[str, str] = field(default_factory=dict)
    solve_accuracy: float | None = None  # off_policy's teacher answering alone (solutions)
    tuning: list[dict[str, Any]] = field(default_factory=list)  # the lr choice per method


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and s.e. over seeds, per (method, round, split), in the rows' order."""
    return over_seeds(rows, ("method", "round", "split"), METRICS, PAIRED)


def pts(v: float | None, se: float | None = None) -> str:
    """A change in points, signed, with its s.e."""
    if v is None:
        return ""
    return f"{v * 100:+.1f}" + (f" ± {se * 100:.1f}" if se is not None else "")


def pct(v: float | None, se: float | None = None) -> str:
    if v is None:
        return ""
    return f"{v * 100:.1f}%" + (f" ± {se * 100:.1f}" if se is not None else "")


def num(v: float | None, se: float | None = None) -> str:
    if v is None:
        return ""
    return f"{v:.0f}" + (f" ± {se:.0f}" if se is not None else "")


def rel(v: float | None, se: float | None = None) -> str:
    """A relative change (-0.5 = half), in percent, with its s.e."""
    if v is None:
        return ""
    return f"{v * 100:+.0f}%" + (f" ± {se * 100:.0f}" if se is not None else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def _lr(data: ReportData, method: str) -> str:
    lrs = {m.cfg.train.lr for m in data.members if m.method == method}
    return ", ".join(f"{lr:g}" for lr in sorted(lrs))


def summary(data: ReportData) -> list[str]:
    """Section 1: each method's last round on the test split, against round 0 and MPD."""
    last = final_rounds(data.rows)
    agg = {
        a["method"]: a for a in aggregate(at_final_round(data.rows, last)) if a["split"] == "test"
    }
    vs = over_seeds(
        (p for p in at_final_round(data.paired, last) if p["split"] == "test"),
        ("method",),
        ("vs_mpd", "think_vs_mpd"),
        {"vs_mpd": "vs_mpd_se"},
    )
    vs_mpd = {v["method"]: v for v in vs}
    per_seed: dict[str, list[str]] = {}
    for p in sorted(data.paired, key=lambda p: p["seed"]):
        if p["split"] == "test" and p["round"] == last.get(p["method"]):
            per_seed.setdefault(p["method"], []).append(
                f"s{p['seed']} {pts(p['vs_mpd'], p['vs_mpd_se'])}"
            )
    header = ["method", "round", "seeds", "accuracy", "Δ acc (points)", "think", "Δ think"]
    header += ["vs mpd (points)", "vs mpd per seed (± paired s.e.)", "lr"]
    body = []
    for method, a in agg.items():
        v = vs_mpd.get(method, {})
        body.append(
            [
                method,
                str(a["round"]),
                ", ".join(map(str, a["seed_list"])),
                pct(a["accuracy"], a["accuracy_se"]),
                pts(a["accuracy_change"], a["accuracy_change_se"]),
                num(a["mean_think_tokens"], a["mean_think_tokens_se"]),
                rel(a["think_change"], a["think_change_se"]),
                "(reference)" if method == "mpd" else pts(v.get("vs_mpd"), v.get("vs_mpd_se")),
                "; ".join(per_seed.get(method, [])),
                _lr(data, method),
            ]
        )
    return [
        "## Summary (test split, each method's last round)",
        "",
        "Δ acc: accuracy minus round 0's on the same problems, in points; Δ think: mean think "
        "tokens against round 0's. vs mpd: the method's accuracy minus MPD's on the same "
        "problems and seed. Cells are mean ± standard error over seeds (with one seed, a "
        "change's ± is its paired standard error over problems); per seed, ± is the paired "
        "standard error over problems.",
        "",
        *_table(header, body),
    ]


def families(data: ReportData, builtin: bool) -> list[str]:
    """Section 2: Δ accuracy per family in each method's last round, round 0 first."""
    last = final_rounds(data.families)
    start = over_seeds(
        (f for f in data.families if f["round"] == 0), ("split", "family"), ("accuracy",)
    )
    agg = over_seeds(
        at_final_round(data.families, last),
        ("method", "split", "family"),
        ("accuracy_change", "think_change", "eval_n"),
        PAIRED,
    )
    cols = [
        (s["split"], s["family"])
        for s in sorted(start, key=lambda s: (s["split"] != "test", s["family"]))
    ]
    if not cols:
        return []
    names = [f"{fam} (held out)" if split == "heldout" else fam for split, fam in cols]
    first = {(s["split"], s["family"]): s for s in start}
    body = [["round 0 (accuracy)", *(pct(first[c]["accuracy"]) for c in cols)]]
    cells = {(a["method"], a["split"], a["family"]): a for a in agg}
    for method in dict.fromkeys(a["method"] for a in agg):
        row = [method]
        for split, fam in cols:
            a = cells.get((method, split, fam))
            row.append(
                ""
                if a is None
                else f"{pts(a['accuracy_change'], a['accuracy_change_se'])} "
                f"({rel(a['think_change'])} think)"
            )
        body.append(row)
    n_of = {(a["split"], a["family"]): a["eval_n"] for a in agg}
    counts = ", ".join(f"{name} {n_of.get(c, 0):.0f}" for name, c in zip(names, cols, strict=True))
    notes = [HELDOUT_MEANING] + ([BUILTIN_HELDOUT] if builtin else [])
    return [
        "## Per problem family (each method's last round)",
        "",
        "Δ accuracy in points against round 0 on the family's problems (mean ± s.e. over seeds; "
        "one seed: ± its paired s.e.), "
        f"and the change of its mean think tokens. Problems per family and seed: {counts}.",
        "",
        *_table(["method", *names], body),
        "",
        *(f"- {n}" for n in notes),
    ]


def _cells(a: dict[str, Any]) -> list[str]:
    def se(name: str) -> Any:
        return a.get(f"{name}_se")

    first = a["round"] == 0
    return [
        a["method"],
        str(a["round"]),
        pct(a["accuracy"], se("accuracy")),
        "" if first else pts(a["accuracy_change"], se("accuracy_change")),
        num(a["mean_think_tokens"], se("mean_think_tokens")),
        num(a["mean_answer_tokens"], se("mean_answer_tokens")),
        num(a["mean_total_tokens"], se("mean_total_tokens")),
        "" if first else rel(a["tokens_change"], se("tokens_change")),
        pct(a["truncation_rate"], se("truncation_rate")),
        "" if first else num(a["train_tokens"], se("train_tokens")),
        "" if a["wall_s"] is None else f"{a['wall_s'] / 60:.1f}",
    ]


HEADER = [
    "method",
    "round",
    "accuracy",
    "Δ acc (points)",
    "think",
    "answer",
    "total",
    "Δ tokens",
    "truncated",
    "train tokens",
    "wall (min)",
]


def every_round(agg: list[dict[str, Any]]) -> list[str]:
    """Section 3: every (method, round) per split."""
    lines: list[str] = []
    for split, title in SPLITS.items():
        rows = [a for a in agg if a["split"] == split]
        if rows:
            lines += [
                "",
                f"## {title}, every round",
                "",
                *_table(HEADER, [_cells(a) for a in rows]),
            ]
    return lines


def off_policy_note(data: ReportData, builtin: bool) -> list[str]:
    """Why off_policy's row is no contest on the reference world, measured where it can be."""
    if not any(m.method == "off_policy" for m in data.members):
        return []
    solved = (
        f"it solved {pct(data.solve_accuracy)} of the problems it answered for training here "
        "(table solutions)"
        if data.solve_accuracy is not None
        else "its solutions are in table solutions"
    )
    world = (
        "On the reference world off_policy cannot work by construction: the world's teacher is "
        "a rewriter, not a solver, "
        if builtin
        else "off_policy trains on the teacher's own solutions, right or wrong: "
    )
    return [f"- off_policy: {world}{solved}; its targets are mostly wrong answers."]


def tuning(data: ReportData) -> list[str]:
    """The learning rates tried on the dev split and the one each method kept."""
    if not data.tuning:
        return []
    header = ["method", "lr", "dev Δ acc (points)", "dev Δ think", "chosen"]
    body = [
        [
            t["method"],
            f"{t['lr']:g}",
            pts(t["accuracy_change"], t.get("accuracy_change_se")),
            rel(t["think_change"]),
            "yes" if t["chosen"] else "",
        ]
        for t in data.tuning
    ]
    return [
        "## Learning rate, chosen on the dev split",
        "",
        "Every method tried the same grid with the same budget on the dev split (problems "
        "disjoint from train and test), on the bench's first seed; the rule is in docs/bench.md. "
        "The test split was evaluated only after every choice was committed (tune.json).",
        "",
        *_table(header, body),
    ]
