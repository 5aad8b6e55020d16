"""The bench's statistics against naive loops: the paired difference to MPD seed by seed
(view ``bench_paired``), the per-family rows (``bench_family``) summing to ``bench``, and the
mean ± s.e. over seeds (:mod:`flows.bench_stats`) of both.

A bench root is built by hand: three methods x three seeds, three rounds each, evals of two
test families and a held-out one with random correctness and lengths (seeded), so every
number has something to be wrong about.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from data.catalog import run_query
from flows.bench_stats import at_final_round, final_rounds, mean_se, over_seeds
from tests.test_catalog import commit, eval_row

METHODS = ("mpd", "on_policy", "self_train")
SEEDS = (0, 1, 2)
FAMILIES = {("test", "arith"): 6, ("test", "lists"): 4, ("heldout", "shopping"): 5}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """The bench root, and every eval row with its method and seed."""
    rng = random.Random(11)
    root = tmp_path_factory.mktemp("bench-stats")
    members, everything = [], []
    for method in METHODS:
        for seed in SEEDS:
            path = f"{method}/seed={seed}"
            for rnd in range(3):
                rows = []
                for (split, family), n in FAMILIES.items():
                    for i in range(n):
                        think = rng.randint(10, 300)
                        row = eval_row(
                            rnd, f"{family}-{split}-{i}", split, correct=rng.random() < 0.6,
                            think_tokens=think, total_tokens=think + 4,
                        )  # fmt: skip
                        rows.append({**row, "family": family})
                commit(root / path, "evals", rnd, rows)
                everything += [{**r, "method": method, "seed": seed} for r in rows]
            members.append({"method": method, "seed": seed, "path": path})
    (root / "bench.json").write_text(json.dumps({"members": members}))
    return root, everything


def naive_paired(evals: list[dict]) -> dict[tuple, tuple[float, float]]:
    """(method, seed, round, split) -> mean and s.e. of correct(method) - correct(mpd)."""
    mpd = {
        (e["seed"], e["round"], e["split"], e["problem_id"]): e
        for e in evals
        if e["method"] == "mpd"
    }
    diffs: dict[tuple, list[float]] = {}
    thinks: dict[tuple, list[float]] = {}
    for e in evals:
        if e["method"] == "mpd":
            continue
        m = mpd[(e["seed"], e["round"], e["split"], e["problem_id"])]
        key = (e["method"], e["seed"], e["round"], e["split"])
        diffs.setdefault(key, []).append(float(e["correct"]) - float(m["correct"]))
        thinks.setdefault(key, []).append(e["think_tokens"] - m["think_tokens"])
    out = {}
    for key, d in diffs.items():
        mean = sum(d) / len(d)
        var = sum((x - mean) ** 2 for x in d) / (len(d) - 1)
        out[key] = (mean, math.sqrt(var / len(d)), sum(thinks[key]) / len(d))
    return out


def test_bench_paired_is_the_naive_per_problem_difference(root: tuple[Path, list[dict]]) -> None:
    path, evals = root
    got = run_query(path, "select * from bench_paired").to_pylist()
    want = naive_paired(evals)
    assert {(g["method"], g["seed"], g["round"], g["split"]) for g in got} == set(want)
    for g in got:
        mean, se, think = want[(g["method"], g["seed"], g["round"], g["split"])]
        assert g["n"] == sum(n for (split, _), n in FAMILIES.items() if split == g["split"])
        assert g["vs_mpd"] == pytest.approx(mean)
        assert g["vs_mpd_se"] == pytest.approx(se)
        assert g["think_vs_mpd"] == pytest.approx(think)


def test_mean_and_se_over_seeds_are_the_textbook_ones(root: tuple[Path, list[dict]]) -> None:
    """Each method's difference to mpd in its last round: the mean of the three seeds' paired
    differences, and sd / sqrt(3) of them, from the raw evals by hand."""
    path, evals = root
    paired = run_query(path, "select * from bench_paired").to_pylist()
    last = final_rounds(paired)
    assert last == {"on_policy": 2, "self_train": 2}
    got = {
        (a["method"], a["split"]): a
        for a in over_seeds(at_final_round(paired, last), ("method", "split"), ("vs_mpd",))
    }
    want = naive_paired(evals)
    for (method, split), a in got.items():
        per_seed = [want[(method, s, 2, split)][0] for s in SEEDS]
        mean = sum(per_seed) / 3
        sd = math.sqrt(sum((x - mean) ** 2 for x in per_seed) / 2)
        assert a["seeds"] == 3 and a["seed_list"] == [0, 1, 2]
        assert a["vs_mpd"] == pytest.approx(mean)
        assert a["vs_mpd_se"] == pytest.approx(sd / math.sqrt(3))
    assert set(got) == {(m, s) for m in METHODS[1:] for s in ("test", "heldout")}
    assert mean_se([0.5]) == (0.5, None) and mean_se([None, None]) == (None, None)


def test_bench_family_sums_to_bench(root: tuple[Path, list[dict]]) -> None:
    """Weighted by eval_n, a (method, seed, round, split)'s family rows give its bench row,
    paired change included; the held-out family is a row of its own."""
    path, _ = root
    bench = run_query(path, "select * from bench").to_pylist()
    fams = run_query(path, "select * from bench_family").to_pylist()
    assert len(bench) == len(METHODS) * len(SEEDS) * 3 * 2
    for b in bench:
        rows = [
            f
            for f in fams
            if (f["method"], f["seed"], f["round"], f["split"])
            == (b["method"], b["seed"], b["round"], b["split"])
        ]
        n = sum(f["eval_n"] for f in rows)
        assert n == b["eval_n"]
        for mine in ("accuracy", "accuracy_change", "mean_think_tokens"):
            weighted = sum(f[mine] * f["eval_n"] for f in rows) / n
            assert weighted == pytest.approx(b[mine]), (b["method"], b["seed"], mine)
    assert {f["family"] for f in fams if f["split"] == "heldout"} == {"shopping"}


def test_bench_change_against_round_0_has_its_paired_se(root: tuple[Path, list[dict]]) -> None:
    path, evals = root
    for b in run_query(path, "select * from bench where round > 0").to_pylist():
        start = {
            e["problem_id"]: e["correct"]
            for e in evals
            if (e["method"], e["seed"], e["round"], e["split"])
            == (b["method"], b["seed"], 0, b["split"])
        }
        d = [
            float(e["correct"]) - float(start[e["problem_id"]])
            for e in evals
            if (e["method"], e["seed"], e["round"], e["split"])
            == (b["method"], b["seed"], b["round"], b["split"])
        ]
        mean = sum(d) / len(d)
        se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
        assert b["accuracy_change"] == pytest.approx(mean)
        assert b["accuracy_change_se"] == pytest.approx(se)


def test_one_seed_shows_the_paired_se_and_several_the_se_over_seeds() -> None:
    rows = [
        {"method": "a", "seed": 0, "accuracy_change": 0.02, "accuracy_change_se": 0.025},
        {"method": "b", "seed": 0, "accuracy_change": 0.02, "accuracy_change_se": 0.025},
        {"method": "b", "seed": 1, "accuracy_change": 0.06, "accuracy_change_se": 0.021},
    ]
    paired = {"accuracy_change": "accuracy_change_se"}
    a, b = over_seeds(rows, ("method",), ("accuracy_change",), paired)
    assert a["accuracy_change_se"] == 0.025  # one seed: its own paired s.e.
    assert b["accuracy_change"] == pytest.approx(0.04)
    assert b["accuracy_change_se"] == pytest.approx(0.02)  # sd 0.0283 / sqrt(2), over seeds
    (bare,) = over_seeds(rows[:1], ("method",), ("accuracy_change",))
    assert bare["accuracy_change_se"] is None
