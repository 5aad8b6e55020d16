"""``mpd bench``: the comparison table is SQL over the members' evals, and mistakes are one line.

One tiny bench (mpd and sft_compressed, one round, a few problems) runs once per module in
this process against the session's Prefect server; the tests read what it left. The bench
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
from flows.cli import main

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
METHODS = ["mpd", "sft_compressed"]


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
        "0",
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
    assert [(m["method"], m["seed"]) for m in members] == [(m, 0) for m in METHODS]
    assert [r["method"] for r in rows] == [m for m in METHODS for _ in range(4)]  # 2 rounds x 2
    for member in members:
        want = recompute(root / member["path"])
        got = {(r["round"], r["split"]): r for r in rows if r["method"] == member["method"]}
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
        "where round = 1 and stage in ('sample', 'rewrite', 'filter') order by method, stage",
    ).to_pylist()
    assert [(r["method"], r["shared"]) for r in shared] == [
        ("mpd", False),
        ("mpd", False),
        ("mpd", False),
        ("sft_compressed", True),
        ("sft_compressed", True),
        ("sft_compressed", True),
    ]
    bench = catalog.run_query(root, "select * from bench order by method, round, split")
    assert bench.num_rows == 8
    text = (root / "bench.md").read_text()
    assert "2 optimizer steps x 2 sequences" in text and "## Held-out family" in text
    for method in METHODS:
        assert f"| {method} | 1 |" in text
    png = (root / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 300 and height > 200


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "mpd,nope"], "unknown method 'nope' in --methods (methods: mpd, on_policy"),
        (["--rounds", "0"], "--rounds must be at least 1, got 0"),
        (["--rounds", "two"], "--rounds expects a positive integer, got 'two'"),
        (["--seeds", "0,x"], "--seeds expects integers, got '0,x'"),
        (["--set", "train.lrr=1"], "unknown key 'train.lrr'"),
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
    from flows.bench import check_budget, plan
    from flows.errors import UserError

    _, members = plan(None, [f"workspace={tmp_path}"], ["mpd", "on_policy"], [0], 1)
    check_budget(members)
    members[1].cfg.train.steps += 1
    with pytest.raises(UserError, match="same training budget"):
        check_budget(members)


def test_several_seeds_report_mean_and_spread_and_the_front() -> None:
    """With --seeds, bench.md shows mean ± sample sd per (method, round, split); the Pareto
    front keeps the points no other beats on both accuracy and tokens, round 0 once."""
    from flows.bench_report import aggregate, pareto

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
    assert agg[("a", 1)]["accuracy_sd"] == pytest.approx(0.1414213562)
    assert agg[("a", 1)]["mean_total_tokens"] == 210 and agg[("a", 1)]["seeds"] == 2
    assert agg[("b", 1)]["accuracy_sd"] is None  # one seed: no spread to report
    front = pareto(agg.values())
    assert [(p["method"], p["round"]) for p in front] == [("a", 1)]  # 60% at 210 beats r0


def test_method_seeds_run_the_method_of_interest_over_more_seeds(tmp_path: Path) -> None:
    """bench.method_seeds: mpd over three seeds, the baselines once; --seeds overrides all."""
    from flows.bench import plan

    sets = [f"workspace={tmp_path}", "bench.method_seeds={mpd: [0, 1, 2]}"]
    _, members = plan(None, sets, ["mpd", "truncation"], None, 1)
    assert [(m.method, m.seed) for m in members] == [
        ("mpd", 0),
        ("truncation", 0),
        ("mpd", 1),
        ("mpd", 2),
    ]
    assert members[2].workspace == tmp_path / "mpd" / "seed=1"
    assert tmp_path / "truncation" / "seed=0" in members[3].cfg.cache_from
    _, every = plan(None, sets, ["mpd", "truncation"], [4], 1)
    assert [(m.method, m.seed) for m in every] == [("mpd", 4), ("truncation", 4)]
