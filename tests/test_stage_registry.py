"""The stage declarations hold: every method's round plan runs a stage after the stages it reads,
and each declared config section is a section of the run config."""

from __future__ import annotations

import pytest

from flows.config import RunConfig
from flows.modes import MODES, round_stages
from tasks.registry import STAGES, per_round_stages


@pytest.mark.parametrize("method", sorted(MODES))
@pytest.mark.parametrize(
    ("loss", "teacher_mode"), [("reverse_kl", "offline_topk"), ("ce", "online")]
)
def test_each_plan_runs_a_stage_after_what_it_reads(
    method: str, loss: str, teacher_mode: str
) -> None:
    cfg = RunConfig.model_validate(
        {"method": method, "train": {"loss": loss, "teacher_mode": teacher_mode}}
    )
    plan = round_stages(cfg)
    assert set(plan) <= set(per_round_stages()), plan
    for i, name in enumerate(plan):
        for read in STAGES[name].reads:
            if read in plan:
                assert plan.index(read) < i, f"{method}: {name} runs before {read}, which it reads"


def test_declared_config_sections_exist() -> None:
    for stage in STAGES.values():
        assert stage.summary
        if stage.config is not None:
            assert stage.config in RunConfig.model_fields, stage.name
