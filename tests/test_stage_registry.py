"""The stage declarations hold: every method's round plan runs a stage after the stages it reads,
the plan is the one the methods have always run, and each declared config section is a section
of the run config."""

from __future__ import annotations

import pytest

from flows.config import RunConfig
from flows.modes import MODES, recipe, round_stages
from tasks.context import ModelRef, Round
from tasks.registry import STAGES, campaign_stages, per_round_stages
from tasks.stage import config_value

# What the hand-written if-chain of 4c4a540 (flows/modes.py) planned, now computed from the
# declarations: (method, score needed) -> the round's stages.
EXPECTED = {
    ("mpd", True): ["sample", "rewrite", "score", "filter", "train", "eval"],
    ("mpd", False): ["sample", "rewrite", "filter", "train", "eval"],
    ("on_policy", True): ["sample", "score", "train", "eval"],
    ("on_policy", False): ["sample", "train", "eval"],
    ("off_policy", True): ["solve", "score", "train", "eval"],
    ("off_policy", False): ["solve", "train", "eval"],
    ("self_distill", True): ["sample", "score", "train", "eval"],
    ("self_distill", False): ["sample", "train", "eval"],
    ("sft_compressed", True): ["sample", "rewrite", "score", "filter", "train", "eval"],
    ("sft_compressed", False): ["sample", "rewrite", "filter", "train", "eval"],
    ("truncation", True): ["sample", "rewrite", "filter", "truncate", "score", "train", "eval"],
    ("truncation", False): ["sample", "rewrite", "filter", "truncate", "train", "eval"],
    ("self_train", True): ["sample", "self_select", "score", "train", "eval"],
    ("self_train", False): ["sample", "self_select", "train", "eval"],
    ("mpd_unfiltered", True): ["sample", "rewrite", "score", "train", "eval"],
    ("mpd_unfiltered", False): ["sample", "rewrite", "train", "eval"],
}
# self_train refuses fewer than four samples per problem (flows/config.py)
SAMPLE = {"sample": {"n": 4}}


@pytest.mark.parametrize("method", sorted(MODES))
@pytest.mark.parametrize(
    ("loss", "teacher_mode"), [("reverse_kl", "offline_topk"), ("ce", "online")]
)
def test_each_plan_runs_a_stage_after_what_it_reads(
    method: str, loss: str, teacher_mode: str
) -> None:
    cfg = RunConfig.model_validate(
        {"method": method, "train": {"loss": loss, "teacher_mode": teacher_mode}, **SAMPLE}
    )
    plan = round_stages(cfg)
    assert plan == EXPECTED[(method, loss != "ce")]
    assert set(plan) <= set(per_round_stages()), plan
    for i, name in enumerate(plan):
        for read in STAGES[name].reads_for(recipe(cfg)):
            if STAGES[read].per_round:  # a round reads a campaign-level stage (problems) as done
                assert read in plan[:i], f"{method}: {name} runs before {read}, which it reads"


@pytest.mark.parametrize("method", sorted(MODES))
def test_declared_config_sections_exist(method: str) -> None:
    """Each name a stage's key gives its config is a path of the run config (or the round)."""
    cfg = RunConfig.model_validate({"method": method, "score": {"context": "rewrite"}, **SAMPLE})
    rnd = Round(1, ModelRef("", ""), recipe=recipe(cfg))
    for stage in STAGES.values():
        assert stage.summary
        for path, value in stage.config_for(cfg, rnd).items():
            if path != "round":
                assert config_value(cfg, path) is not None, (stage.name, path)
            assert value is not None, (stage.name, path)


def test_campaign_stages_follow_the_config() -> None:
    """The world is installed only where a model is built-in; the problems always run."""
    assert campaign_stages(RunConfig()) == ["bootstrap", "problems"]
    paths = RunConfig.model_validate({"models": {"student": "/m/s", "teacher": "/m/t"}})
    assert campaign_stages(paths) == ["problems"]
