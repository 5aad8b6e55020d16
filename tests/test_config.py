"""Run config: defaults, overrides, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import get_args

import pytest
import yaml
from pydantic import BaseModel

from flows.cli import main
from flows.config import (
    DEFAULT_CONFIG,
    DEPLOYMENT,
    ConfigError,
    RunConfig,
    dump_config,
    load_config,
)

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
        ("train: [1, 2\n", [], "c.yaml:2: not valid YAML"),
        ("- a\n- b\n", [], "expected a mapping of sections"),
        ("", ["train.lr"], "--set expects key=value"),
        ("", ["train.lr=1", "train.lr.x=1"], "--set train.lr.x=1: train.lr is not a section"),
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
        f"mpd: error: {path}:2: unknown key 'sample.temprature' (did you mean 'sample.temperature'?)"
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


# -- strict input (issue 26): every value named by who set it, nothing silently reread ----------


def _float_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every float field of ``model`` and the models it nests, as dotted keys."""
    out = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        inner = [a for a in (annotation, *get_args(annotation)) if isinstance(a, type)]
        models = [a for a in inner if issubclass(a, BaseModel)]
        for sub in models:
            out += _float_fields(sub, f"{prefix}{name}.")
        if float in inner:
            out.append(prefix + name)
    return out


FLOAT_FIELDS = _float_fields(RunConfig)


def test_every_float_field_is_found() -> None:
    assert {"train.lr", "sample.temperature", "engines.student.timeout_s"} <= set(FLOAT_FIELDS)
    assert len(FLOAT_FIELDS) > 40


@pytest.mark.parametrize("key", FLOAT_FIELDS)
@pytest.mark.parametrize("value", ["inf", "-Infinity", "nan"])
def test_no_float_field_takes_a_non_finite_number(key: str, value: str) -> None:
    """``allow_inf_nan=False`` on StrictModel reaches every float field, nested ones too (the
    sections that are null by default are created by the override)."""
    sets = []
    if key.startswith("problems.file."):
        sets = ["problems.file={path: p.jsonl}"]
    if key.startswith("problems.reasoning_gym."):
        sets = ["problems.reasoning_gym={dataset: basic_arithmetic}"]
    with pytest.raises(ConfigError, match=f"--set {key}={value}: '{key}': .*finite"):
        load_config(None, [*sets, f"{key}={value}"])


def test_errors_name_the_file_line_of_a_base(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("seed: 1\ntrain:\n  steps: 5\n  lr: fast\n")
    (tmp_path / "top.yaml").write_text("base: base.yaml\ntrain:\n  steps: 7\n")
    with pytest.raises(ConfigError, match=r"base\.yaml:4: 'train\.lr'"):
        load_config(tmp_path / "top.yaml")
    (tmp_path / "top.yaml").write_text("base: base.yaml\ntrain:\n  lr: 1.0e-4\n  steps: x\n")
    with pytest.raises(ConfigError, match=r"top\.yaml:4: 'train\.steps'"):
        load_config(tmp_path / "top.yaml")


def test_override_errors_name_the_override_not_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1.0e-4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["seed=1", "train.lr=-3", "rounds=2"])
    assert str(err.value).startswith("--set train.lr=-3: 'train.lr': Input should be greater")
    # a section's own check fails because of the override set inside it
    with pytest.raises(ConfigError, match=r"^--set problems\.source=file: 'problems'"):
        load_config(path, ["problems.source=file"])
    with pytest.raises(ConfigError, match=r"^overrides item rounds=x: 'rounds'"):
        load_config(None, ["rounds=x"], labels=DEPLOYMENT)


def test_section_override_merges_key_by_key(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1.0e-4\n  steps: 7\nstorage:\n  options: {a: {b: 1, c: 2}}\n")
    cfg = load_config(path, ["train={lr: 5}", "storage.options={a: {c: 3}}"])
    assert cfg.train.lr == 5 and cfg.train.steps == 7
    assert cfg.storage.options == {"a": {"b": 1, "c": 3}}
    cfg = load_config(path, ["train.steps=9", "train={lr: 2}"])
    assert (cfg.train.lr, cfg.train.steps) == (2, 9)
    assert load_config(path, ["evaluate.splits=[test]"]).evaluate.splits == [
        "test"
    ]  # a list replaces


def test_workspace_is_taken_literally() -> None:
    assert str(load_config(None, workspace="runs/a #1").workspace) == "runs/a #1"
    assert str(load_config(None, ["workspace=elsewhere"], workspace="[x]").workspace) == "[x]"


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  <<: {lr: 0.1, steps: 3}\n  lr: 0.2\n")
    cfg = load_config(path)
    assert (cfg.train.lr, cfg.train.steps) == (0.2, 3)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "train:\n  lr: 1\ntrain:\n  steps: 2\n",
            "c.yaml:3: duplicate key 'train' (first at line 1)",
        ),
        ("a:\n  - {x: 1, x: 2}\n", "c.yaml:2: duplicate key 'a.x' (first at line 2)"),
        ("train: {lr: .NaN}\n", "c.yaml:1: 'train.lr': .NaN is not a finite number"),
        ("evaluate:\n  splits: [.inf]\n", "c.yaml:2: 'evaluate.splits': .inf is not a finite"),
        ("storage: &s {options: *s}\n", "an alias refers to a value that contains it"),
        ("\ufefftrain:\n  lr: .inf\n", "c.yaml:2: 'train.lr'"),
        (
            "train:\r\n  lr: 1\r\n  lr: 2\r\n",
            "c.yaml:3: duplicate key 'train.lr' (first at line 2)",
        ),
    ],
)
def test_strict_yaml(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_bom_and_crlf_configs_read(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xef\xbb\xbftrain:\r\n  lr: 0.5\r\n")
    assert load_config(path).train.lr == 0.5
