"""The round report published to the Prefect UI (the flow-level test is in test_campaign.py)."""

from __future__ import annotations

from pathlib import Path

from flows.artifacts import artifact_slug, round_markdown

ROWS = [
    {"round": 1, "accuracy": 0.55, "heldout_accuracy": 0.02, "mean_think_tokens": 250.0,
     "mean_answer_tokens": 7.5, "truncation_rate": 0.01, "kept": 140, "dropped": 116,
     "dropped_wrong": 110, "dropped_truncated": 4, "dropped_no_answer": 2,
     "dropped_not_shorter": 0, "dropped_duplicate": 0},
    {"round": 0, "accuracy": 0.60, "heldout_accuracy": 0.03, "mean_think_tokens": 400.0,
     "mean_answer_tokens": 8.0, "truncation_rate": 0.0, "kept": 0, "dropped": 0},
]  # fmt: skip


def test_round_report_compares_with_round_zero_and_lists_drop_reasons() -> None:
    md = round_markdown(ROWS, 1, "sample 30s, train 7s")
    assert md.startswith("# Round 1\n")
    assert "| accuracy (test) | 0.550 (-5.0 points vs round 0) |" in md
    assert "| mean think tokens | 250.0 (-38% vs round 0) |" in md
    assert "| rewrites kept / dropped | 140 / 116 |" in md
    for line in ("| wrong | 110 |", "| truncated | 4 |", "| no_answer | 2 |", "| duplicate | 0 |"):
        assert line in md
    assert md.rstrip().endswith("Stage wall times: sample 30s, train 7s.")


def test_round_zero_report_has_no_filter_section_and_missing_values_show() -> None:
    md = round_markdown([{**ROWS[1], "heldout_accuracy": None}], 0)
    assert "Drop reasons" not in md and "vs round 0" not in md
    assert "| accuracy (held-out family) | n/a |" in md


def test_artifact_keys_use_only_what_prefect_accepts(tmp_path: Path) -> None:
    assert artifact_slug(tmp_path / "Nightly_Runs.v2") == "nightly-runs-v2"
    assert artifact_slug(tmp_path / "___") == "workspace"
