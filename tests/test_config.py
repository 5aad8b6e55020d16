"""Run config: defaults, overrides, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from flows.cli import main
from flows.config import DEFAULT_CONFIG, ConfigError, RunConfig, dump_config, load_config

REPO = Path(__file__).resolve().parents[1]


def test_default_config_is_tiny_and_complete() -> None:
    cfg = load_config()
    assert DEFAULT_CONFIG.name == "tiny.yaml"
    assert cfg.method == "mpd" and cfg.rounds == 3 and cfg.models.student == "builtin:tiny-student"
    dumped = yaml.safe_load(dump_config(cfg))
    assert RunConfig.model_validate(dumped) == cfg, "config show output is a valid config"
    assert "prompt" in dumped["rewrite"], "defaults are shown, not only what the file sets"


def test_overrides_are_parsed_as_yaml() -> None:
    cfg = load_config(None, ["train.lr=1e-4", "rounds=5", "evaluate.splits=[test]"])
    assert cfg.train.lr == 1e-4 and cfg.rounds == 5 and cfg.evaluate.splits == ["test"]


@pytest.mark.parametrize(
    ("content", "overrides", "expected"),
    [
        ("train:\n  lrr: 0.1\n", [], "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
        ("trian:\n  lr: 0.1\n", [], "unknown key 'trian' (did you mean 'train'?)"),
        ("", ["filter.ratoi=0.5"], "unknown key 'filter.ratoi' (did you mean 'filter.ratio'?)"),
        ("train:\n  lr: fast\n", [], "'train.lr': Input should be a valid number"),
        ("rounds: -1\n", [], "'rounds': Input should be greater than or equal to 0"),
        ("method: magic\n", [], "'method': Input should be 'mpd'"),
        ("train: [1, 2\n", [], "is not valid YAML"),
        ("- a\n- b\n", [], "expected a mapping of sections"),
        ("", ["train.lr"], "--set expects key=value"),
        ("", ["train.lr=1", "train.lr.x=1"], "--set train.lr.x: train.lr is not a section"),
        ("engines:\n  student:\n    kind: openai\n", [], "an openai engine needs base_url"),
        ("rewrite:\n  prompt: 'be short {trace}'\n", [], "must contain {problem}"),
    ],
)
def test_config_errors_are_one_line(
    tmp_path: Path, content: str, overrides: list[str], expected: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_cli_config_error_exit_code_and_no_traceback(tmp_path: Path, capsys) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("sample:\n  temprature: 0.7\n")
    assert main(["config", "show", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        f"mpd: error: {path}: unknown key 'sample.temprature' (did you mean 'sample.temperature'?)"
    )


def test_cli_subprocess_config_show_and_error(tmp_path: Path) -> None:
    mpd = REPO / ".venv" / "bin" / "mpd"
    if not mpd.exists():
        pytest.skip("mpd console script not installed in .venv")
    ok = subprocess.run(
        [str(mpd), "config", "show", "--set", "seed=7"], capture_output=True, text=True, cwd=REPO
    )
    assert ok.returncode == 0 and yaml.safe_load(ok.stdout)["seed"] == 7
    bad = subprocess.run(
        [str(mpd), "config", "show", "-c", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1
    assert "config file not found" in bad.stderr
