"""``mpd bench``: the comparison table is SQL over the members' evals, and mistakes are one line.

One tiny bench (mpd and two methods that share its stages, two seeds, one round, a few
problems) runs once per module in this process against the session's Prefect server; the tests
read what it left. The bench
numbers are recomputed here independently: from each member workspace's own views (not the
bench root's stacked ones) and from the manifests on disk.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data import catalog
from flows.bench_report import aggregate, pareto
from flows.bench_tables import HELDOUT_MEANING, ReportData, off_policy_note
from flows.bench_tune import choose
from flows.cli import main
from flows.config import load_config
from flows.errors import UserError
from flows.modes import MODES

pytestmark = pytest.mark.usefixtures("prefect_api")

KEEP_FIRST = Path(__file__).resolve().parent / "fixtures" / "keep_first_filter.sql"
TINY = {
    "problems.n_train": 40,
    "problems.n_test": 10,
    "problems.n_heldout": 5,
    "sample.problems_per_round": 4,
    "sample.n": 2,
    "sample.max_tokens": 48,
    "rewrite.max_tokens": 48,
    "filter.sql": KEEP_FIRST,
    "train.steps": 2,
    "train.batch_size": 2,
    "train.warmup_steps": 0,
    "evaluate.limit": 3,
    "evaluate.max_tokens": 24,
}
SETS = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
METHODS = ["mpd", "sft_compressed", "mpd_unfiltered"]
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "bench"
    argv = [
        "bench",
        "-w",
        str(path),
        "--methods",
        ",".join(METHODS),
        "--rounds",
        "1",
        "--seeds",
        ",".join(map(str, SEEDS)),
        "--jobs",
        "2",  # side by side, each campaign an `mpd run` process (flows/bench_pool.py)
    ]
    argv += SETS
    assert main(argv) == 0
    return path


def recompute(ws: Path) -> dict[tuple[int, str], dict]:
    """The bench numbers of one member, from its own evals and train_log and its manifests."""
    evals = catalog.run_query(
        ws,
        """
        with ev as (
            select round, split, count(*) as eval_n, avg(correct::double) as accuracy,
                   avg(think_tokens) as think, avg(answer_tokens) as answer,
                   avg(total_tokens) as total, avg(truncated::double) as truncation_rate
            from evals group by round, split
        )
        select ev.*, ev.accuracy - b.accuracy as accuracy_change,
               ev.total / b.total - 1 as tokens_change,
               coalesce((select sum(tokens)::bigint from train_log t where t.round = ev.round), 0)
                   as train_tokens
        from ev join ev as b on b.round = 0 and b.split = ev.split
        """,
    ).to_pylist()
    wall: dict[int, float] = {}
    for man in ws.glob("*/round=*/_manifest.json"):
        m = json.loads(man.read_text())
        if m["stage"] not in ("problems", "bootstrap"):
            wall[m["round"]] = wall.get(m["round"], 0.0) + m["duration_s"]
    return {(e["round"], e["split"]): {**e, "wall_s": wall[e["round"]]} for e in evals}


def test_bench_table_equals_sql_over_the_members_evals(root: Path) -> None:
    rows = pq.read_table(root / "bench.parquet").to_pylist()
    members = json.loads((root / "bench.json").read_text())["members"]
    assert [(m["method"], m["seed"]) for m in members] == [(m, s) for s in SEEDS for m in METHODS]
    # 2 rounds x 2 splits per seed
    assert [r["method"] for r in rows] == [m for m in METHODS for _ in range(4 * len(SEEDS))]
    for member in members:
        want = recompute(root / member["path"])
        got = {
            (r["round"], r["split"]): r
            for r in rows
            if (r["method"], r["seed"]) == (member["method"], member["seed"])
        }
        assert (
            got.keys() == want.keys() == {(0, "test"), (0, "heldout"), (1, "test"), (1, "heldout")}
        )
        for where, w in want.items():
            g = got[where]
            assert g["eval_n"] == w["eval_n"] == 3
            for mine, theirs in [
                ("accuracy", "accuracy"),
                ("mean_think_tokens", "think"),
                ("mean_answer_tokens", "answer"),
                ("mean_total_tokens", "total"),
                ("truncation_rate", "truncation_rate"),
                ("accuracy_change", "accuracy_change"),
                ("tokens_change", "tokens_change"),
                ("train_tokens", "train_tokens"),
                ("wall_s", "wall_s"),
            ]:
                assert g[mine] == pytest.approx(w[theirs], abs=1e-9), (member, where, mine)
        assert got[(1, "test")]["train_steps"] == TINY["train.steps"]
        assert got[(0, "test")]["train_tokens"] == 0


def test_the_bench_root_answers_sql_and_the_report_is_written(root: Path) -> None:
    """``mpd sql -w <root>`` sees every member's tables with method and seed columns; the
    markdown states the training budget and the PNG is a real image."""
    shared = catalog.run_query(
        root,
        "select method, stage, shared_from is not null as shared from stage_runs "
        "where round = 1 and seed = 0 and stage in ('sample', 'rewrite', 'score', 'filter') "
        "order by method, stage",
    ).to_pylist()
    assert [(r["method"], r["stage"], r["shared"]) for r in shared] == [
        ("mpd", "filter", False),
        ("mpd", "rewrite", False),
        ("mpd", "sample", False),
        ("mpd", "score", False),
        ("mpd_unfiltered", "rewrite", True),  # MPD without the filter: the same stages
        ("mpd_unfiltered", "sample", True),
        ("mpd_unfiltered", "score", True),
        ("sft_compressed", "filter", True),
        ("sft_compressed", "rewrite", True),
        ("sft_compressed", "sample", True),
    ]
    bench = catalog.run_query(root, "select * from bench order by method, round, split")
    assert bench.num_rows == 4 * len(METHODS) * len(SEEDS)
    text = (root / "bench.md").read_text()
    assert "2 optimizer steps x 2 sequences" in text and "## Held-out family" in text
    for method in METHODS:
        assert f"| {method} | 1 | 0, 1 |" in text  # the summary: last round, seeds
        assert f"| {method} | 1 |" in text
    png = (root / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 300 and height > 200


def test_every_method_ran_on_the_same_seeds_and_problems(root: Path) -> None:
    """Each seed's members answered the same evaluation problems in every round, from one
    problem set (one problems key for all), and the members are every method on every seed."""
    members = catalog.run_query(root, "select distinct method, seed from evals").to_pylist()
    assert sorted((m["method"], m["seed"]) for m in members) == sorted(
        (m, s) for m in METHODS for s in SEEDS
    )
    keys = catalog.run_query(
        root, "select count(distinct key) as n from stage_runs where stage = 'problems'"
    ).to_pylist()
    assert keys == [{"n": 1}]
    asked = catalog.run_query(
        root,
        "select seed, round, split, method, list(problem_id order by problem_id) as ids "
        "from evals group by all",
    ).to_pylist()
    by_place: dict[tuple, set] = {}
    for a in asked:
        by_place.setdefault((a["seed"], a["round"], a["split"]), set()).add(tuple(a["ids"]))
    assert len(by_place) == len(SEEDS) * 2 * 2  # rounds 0, 1 x test, held-out
    assert all(len(ids) == 1 for ids in by_place.values()), "a method saw other problems"
    paired = pq.read_table(root / "bench_paired.parquet").to_pylist()
    assert {(p["method"], p["seed"]) for p in paired} == {
        (m, s) for m in METHODS if m != "mpd" for s in SEEDS
    }


def test_the_report_has_per_family_rows_and_says_what_the_held_out_family_is(root: Path) -> None:
    text = (root / "bench.md").read_text()
    assert "## Summary (test split, each method's last round)" in text
    assert "## Per problem family" in text and "shopping (held out)" in text
    assert HELDOUT_MEANING in text
    fams = pq.read_table(root / "bench_family.parquet").to_pylist()
    for method in METHODS:
        assert f"| {method} | +" in text.split("## Per problem family")[1]
        assert {f["family"] for f in fams if f["method"] == method} >= {"shopping"}


def test_a_rerun_resumes_from_the_cache_with_a_line_per_method_and_seed(root: Path) -> None:
    """The same bench again computes nothing (every member's stages are cached: an interrupted
    bench resumes where it stopped) and logs each member's progress."""
    import logging

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("mpd").addHandler(handler)
    try:
        argv = ["bench", "-w", str(root), "--methods", ",".join(METHODS), "--rounds", "1"]
        argv += ["--jobs", "1"]  # in this process, where the fixture's ran as processes
        assert main([*argv, "--seeds", ",".join(map(str, SEEDS)), *SETS]) == 0
    finally:
        logging.getLogger("mpd").removeHandler(handler)
    n = len(METHODS) * len(SEEDS)
    for i, (method, seed) in enumerate(((m, s) for s in SEEDS for m in METHODS), 1):
        where = f"bench [{i}/{n}] {method} seed {seed}"
        assert any(line.startswith(f"{where}: r0 acc ") for line in lines), where
        last = json.loads((root / method / f"seed={seed}" / ".mpd" / "last_run.json").read_text())
        assert {o["state"] for o in last["stages"].values()} == {"cached"}, (method, seed)


def test_off_policy_is_said_to_be_no_contest_on_the_reference_world(tmp_path: Path) -> None:
    """Where off_policy's row is shown, the report says its teacher cannot solve (measured)."""
    from flows.bench import plan  # Prefect reads its settings at import: after prefect_env()

    _, members = plan(None, [f"workspace={tmp_path}"], ["mpd", "off_policy"], [0], 1)
    data = ReportData([], [], [], members, "budget", 1.0, solve_accuracy=0.0225)
    (note,) = off_policy_note(data, builtin=True)
    assert "cannot work by construction" in note and "solved 2.2% of the problems" in note
    _, without = plan(None, [f"workspace={tmp_path}"], ["mpd"], [0], 1)
    assert off_policy_note(ReportData([], [], [], without, "budget", 1.0), builtin=True) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "mpd,nope"], "unknown method 'nope' in --methods (methods: mpd, on_policy"),
        (["--rounds", "0"], "--rounds must be at least 1, got 0"),
        (["--rounds", "two"], "--rounds expects a positive integer, got 'two'"),
        (["--seeds", "0,x"], "--seeds expects integers, got '0,x'"),
        (["--jobs", "0"], "--jobs must be at least 1, got 0"),
        (["--jobs", "two"], "--jobs expects a positive integer, got 'two'"),
        (["--set", "train.lrr=1"], "unknown key 'train.lrr'"),
        (["--tune", "lr=1e-5"], "--tune lr needs at least two distinct rates"),
        (["--tune", "beta=1,2"], "--tune expects lr=V1,V2,..."),
        (["--tune", "lr=1e-5,x"], "--tune lr: 'x' is not a number"),
        (["--tune", "lr=1e-5,-1"], "'-1' is not a positive learning rate"),
        (["--tune", "lr=1e-5,1e-4", "--set", "problems.n_dev=0"], "these problems have none"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "-w", str(tmp_path / "b"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mpd: error: ") and message in err[0], err
    assert not (tmp_path / "b").exists(), "nothing ran"


def test_a_method_with_another_budget_is_refused(tmp_path: Path) -> None:
    from flows.bench import check_budget, plan  # Prefect: imported after prefect_env()

    _, members = plan(None, [f"workspace={tmp_path}"], ["mpd", "on_policy"], [0], 1)
    check_budget(members)
    members[1].cfg.train.steps += 1
    with pytest.raises(UserError, match="same training budget"):
        check_budget(members)


def test_several_seeds_report_mean_and_standard_error_and_the_front() -> None:
    """bench.md shows mean ± s.e. over seeds per (method, round, split); the Pareto front
    keeps the points no other beats on both accuracy and tokens, round 0 once."""

    def row(method: str, seed: int, round_: int, acc: float, tokens: float) -> dict:
        base = dict.fromkeys(
            ("accuracy_change", "mean_think_tokens", "mean_answer_tokens", "tokens_change"), 0.0
        )
        return {
            **base,
            "method": method,
            "seed": seed,
            "round": round_,
            "split": "test",
            "accuracy": acc,
            "mean_total_tokens": tokens,
            "think_change": 0.0,
            "truncation_rate": 0.0,
            "train_tokens": 100,
            "wall_s": 60.0,
        }

    rows = [
        row("a", 0, 0, 0.6, 300),
        row("a", 1, 0, 0.6, 300),
        row("b", 0, 0, 0.6, 300),
        row("a", 0, 1, 0.5, 200),
        row("a", 1, 1, 0.7, 220),
        row("b", 0, 1, 0.5, 310),
    ]
    agg = {(a["method"], a["round"]): a for a in aggregate(rows)}
    assert agg[("a", 1)]["accuracy"] == pytest.approx(0.6)
    assert agg[("a", 1)]["accuracy_se"] == pytest.approx(0.1)  # sd 0.1414 / sqrt(2)
    assert agg[("a", 1)]["mean_total_tokens"] == 210 and agg[("a", 1)]["seeds"] == 2
    assert agg[("b", 1)]["accuracy_se"] is None  # one seed: no spread to report
    front = pareto(agg.values())
    assert [(p["method"], p["round"]) for p in front] == [("a", 1)]  # 60% at 210 beats r0


def test_every_method_is_planned_on_the_same_seeds(tmp_path: Path) -> None:
    """The default bench: every method (the ablations too) on seeds 0, 1, 2, seed by seed,
    each with the same problems section; --seeds replaces the three for every method."""
    from flows.bench import plan  # Prefect: imported after prefect_env()

    _, members = plan(None, [f"workspace={tmp_path}"], None, None, 1)
    assert [(m.method, m.seed) for m in members] == [(m, s) for s in (0, 1, 2) for m in MODES]
    assert {"self_train", "mpd_unfiltered"} <= set(MODES)
    assert len({m.cfg.problems.model_dump_json() for m in members}) == 1
    assert members[1].workspace == tmp_path / list(MODES)[1] / "seed=0"
    assert tmp_path / "mpd" / "seed=2" in members[0].cfg.cache_from
    _, some = plan(None, [f"workspace={tmp_path}"], ["mpd", "truncation"], [4], 1)
    assert [(m.method, m.seed) for m in some] == [("mpd", 4), ("truncation", 4)]


# -- --tune: the learning rate chosen on dev, then test once ------------------------------------
GRID = [1e-5, 1e-3]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tuned") / "bench"
    argv = ["bench", "-w", str(path), "--methods", "mpd,sft_compressed", "--rounds", "1"]
    argv += ["--seeds", "0", "--tune", "lr=" + ",".join(map(str, GRID))]
    assert main([*argv, *SETS, "--set", "problems.n_dev=4"]) == 0
    return path


def manifests(root: Path, stage: str) -> list[tuple[Path, dict]]:
    return [
        (p, json.loads(p.read_text()))
        for p in sorted(root.rglob(f"{stage}/round=*/_manifest.json"))
    ]


def test_no_test_row_exists_before_the_choice_is_committed(tuned: Path) -> None:
    """The dev campaigns evaluated dev only; every one of their stages finished before
    tune.json was committed, and every evaluation of the test split after it."""
    committed_at = json.loads((tuned / "tune.json").read_text())["committed_at"]
    dev = sorted(p for p in (tuned / "tune").glob("*/lr=*") if p.is_dir())  # not their logs
    assert len(dev) == 2 * len(GRID)
    for ws in dev:
        splits = catalog.run_query(ws, "select distinct split from evals").to_pylist()
        assert splits == [{"split": "dev"}], ws
        for path, man in manifests(ws, "*"):
            assert man["finished_at"] <= committed_at, path
    test_evals = [
        (path, man)
        for path, man in manifests(tuned, "eval")
        if "tune" not in path.relative_to(tuned).parts
    ]
    assert len(test_evals) == 2 * 2  # two methods, rounds 0 and 1
    for path, man in test_evals:
        splits = pq.read_table(path.parent, columns=["split"]).column("split").unique()
        assert "test" in splits.to_pylist() and "dev" not in splits.to_pylist(), path
        assert man["finished_at"] > committed_at, path


def test_every_method_tried_the_same_grid_and_runs_at_its_choice(tuned: Path) -> None:
    record = json.loads((tuned / "tune.json").read_text())
    assert record["grid"] == GRID and record["tolerance"] == 0.02
    trials = record["trials"]
    assert sorted((t["method"], t["lr"]) for t in trials) == sorted(
        (m, lr) for m in ("mpd", "sft_compressed") for lr in GRID
    )
    for method, lr in record["chosen"].items():
        assert [t["lr"] for t in trials if t["method"] == method and t["chosen"]] == [lr]
        ran = load_config(tuned / method / "seed=0" / "run.yaml")
        assert ran.train.lr == lr and ran.evaluate.splits == ["test", "heldout"]
        assert all(t["eval_n"] == TINY["evaluate.limit"] for t in trials if t["method"] == method)
    text = (tuned / "bench.md").read_text()
    assert "## Learning rate, chosen on the dev split" in text
    assert text.count("| yes |") == 2


def test_the_rule_picks_the_shortest_rate_that_keeps_dev_accuracy() -> None:
    def t(method: str, lr: float, acc: float | None, think: float | None) -> dict:
        return {"method": method, "lr": lr, "accuracy_change": acc, "think_change": think}

    trials = [
        t("a", 1e-5, 0.00, -0.10),
        t("a", 3e-5, -0.01, -0.50),  # within 2 points, shortest: chosen
        t("a", 1e-4, -0.05, -0.60),  # shorter still, but loses 5 points
        t("b", 1e-5, -0.04, -0.2),
        t("b", 3e-5, -0.03, -0.1),  # none keeps accuracy: the most accurate
        t("c", 1e-5, 0.01, -0.3),
        t("c", 3e-5, 0.02, -0.3),  # a tie on think tokens: the more accurate
        t("d", 1e-5, None, None),
        t("d", 3e-5, 0.0, None),  # no think tokens measured: still eligible, ranked last
    ]
    assert choose(trials, 0.02) == {"a": 3e-5, "b": 3e-5, "c": 3e-5, "d": 3e-5}
    assert choose(trials, 0.0)["a"] == 1e-5


def test_side_by_side_a_seeds_first_campaign_runs_before_the_rest_of_its_seed() -> None:
    """flows/bench_pool.order: the first campaign of a seed (it computes the stages its seed
    shares) is ready at once, the others once it finished; first campaigns go first."""
    from flows.bench_pool import order

    seeds = [0, 0, 0, 1, 1, 1, 2, 2]  # plan order: seed by seed, mpd first
    assert order(seeds, done=set(), started=set()) == [0, 3, 6]
    assert order(seeds, done=set(), started={0, 3}) == [6]
    assert order(seeds, done={0}, started={0, 3}) == [6, 1, 2]
    assert order(seeds, done={0, 3, 6}, started={0, 3, 6, 1}) == [2, 4, 5, 7]
    # a naive reference: simulate two workers, each campaign one tick; no campaign of a seed
    # starts before its first one ended, and every campaign runs once
    done: set[int] = set()
    started: dict[int, int] = {}
    tick = 0
    while len(done) < len(seeds):
        for i in order(seeds, done, set(started))[: 2 - (len(started) - len(done))]:
            started[i] = tick
        tick += 1
        done |= {i for i, t in started.items() if t < tick}
    first = {s: seeds.index(s) for s in set(seeds)}
    for i, s in enumerate(seeds):
        if i != first[s]:
            assert started[i] > started[first[s]], (i, started)
    assert tick == 4  # 8 campaigns on 2 workers, never idle once the first ones ended
