"""README.md and docs/*.md say only what is true of this repository.

A user reads the README on a fresh clone, with nothing beside it: a path outside the repository
(``../shared/...``) names what they do not have, a renamed file or config key sends them to
something that is gone, and a command with a wrong flag fails as written. Each check reads the
real thing: the files in the working tree, the config model (``flows/config.py``'s RunConfig),
the ``mpd`` argument parser (``flows/cli.py``) and the Makefile's targets.
"""

from __future__ import annotations

import argparse
import itertools
import re
import shlex
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from flows.cli import build_parser
from flows.config import RunConfig
from tests.conftest import REPO

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 250

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"\]\(([^)\s]+)\)")
SET_ITEM = re.compile(r"--set[ =]['\"]?([a-z_][\w.]*)=")  # KEY=VALUE is a placeholder
REFUSED = re.compile(r"^.*\nmpd: error: .*$", re.M)  # a command shown with its refusal
DOTTED = re.compile(r"[a-z_]+(?:\.(?:[a-z_0-9]+|<\w+>))+")
# A backticked word ending in one of these is a file name (bench.md, filter.sql), not a key.
FILE_SUFFIXES = {
    "md",
    "png",
    "json",
    "jsonl",
    "parquet",
    "yaml",
    "yml",
    "sql",
    "py",
    "duckdb",
    "arrow",
}
SHELL = {"bash", "sh", "shell", "console"}


def _rel(page: Path) -> str:
    return str(page.relative_to(REPO))


def _prose(text: str) -> str:
    """The page without its fenced blocks (their paths are workspaces and examples)."""
    return FENCE.sub("", text)


# -- paths ----------------------------------------------------------------------------------


# What runs make in the checkout (`make run`'s runs/, the environments): not the repository's
# files, so a page naming runs/tiny/summary.png is not checked against whatever run was last.
NOT_THE_REPOSITORY = {".git", ".venv", ".venv-vllm", "runs"}


def _top_level() -> set[str]:
    return {p.name for p in REPO.iterdir() if p.name not in NOT_THE_REPOSITORY}


def _repo_paths(text: str) -> list[str]:
    """Backticked words that name a file or folder of the repository: a path whose first part
    is a top-level entry (``flows/cli.py``, ``configs/tiny.yaml``, ``data/sql/``). Placeholders
    (``tasks/<stage>.py``), globs, hive partitions (``round=1``) and URLs are not paths."""
    top = _top_level()
    out = []
    for word in INLINE.findall(_prose(text)):
        word = word.strip()
        if "/" not in word or any(c in word for c in "<>*…= $:{}") or word.startswith("~"):
            continue
        if word.split("/", 1)[0] in top:
            out.append(word.rstrip("/"))
    return out


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_no_page_names_a_path_outside_the_repository(page: Path) -> None:
    text = page.read_text()
    for target in LINK.findall(text):  # docs/x.md may link ../README.md: inside, and checked
        if (page.parent / target.split("#", 1)[0]).resolve().is_relative_to(REPO):
            text = text.replace(f"]({target})", "]()")
    outside = [line.strip() for line in text.splitlines() if "../" in line]
    assert not outside, f"{_rel(page)} names a path outside the repository: {outside[:3]}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_repository_path_a_page_names_exists(page: Path) -> None:
    missing = [p for p in _repo_paths(page.read_text()) if not (REPO / p).exists()]
    assert not missing, f"{_rel(page)} names paths the repository does not have: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_link_of_a_page_leads_to_a_file_of_the_repository(page: Path) -> None:
    bad = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor of the same page
        path = (page.parent / target.split("#", 1)[0]).resolve()
        if not path.is_relative_to(REPO) or not path.exists():
            bad.append(target)
    assert not bad, f"{_rel(page)} links to what the repository does not have: {bad}"


def test_the_path_check_finds_a_missing_file_and_skips_workspace_paths() -> None:
    """The checks above catch what they exist to catch (a moved file, a stray ../)."""
    text = "See `flows/cli.py`, `flows/nothing.py`, `tasks/<stage>.py`, `runs/tiny/`, `a=b/c`."
    assert _repo_paths(text) == ["flows/cli.py", "flows/nothing.py"]
    assert _config_keys("`train.lr`, `train.lrr`, `bench.md`, `data.errors.UserError`") == [
        "train.lr",
        "train.lrr",
    ]
    assert _key_exists("engines.<role>.shard_workers") and not _key_exists("train.lrr")


# -- config keys ----------------------------------------------------------------------------


def _models_in(annotation: object) -> list[object]:
    """The alternatives of a field's type: ``X | None`` gives X, ``Annotated[X, ...]`` gives X."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _models_in(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in _models_in(a)]
    return [annotation]


def _resolves(annotation: object, parts: list[str]) -> bool:
    """Whether ``parts`` name a key below a value of this type: a field of a config model, any
    key of a mapping (``storage.options.x``, ``engines.student.env.X``)."""
    if not parts:
        return True
    for kind in _models_in(annotation):
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            head, rest = parts[0], parts[1:]
            names = kind.model_fields if head.startswith("<") else [head]
            if any(
                n in kind.model_fields and _resolves(kind.model_fields[n].annotation, rest)
                for n in names
            ):
                return True
        elif typing.get_origin(kind) is dict:
            return _resolves(typing.get_args(kind)[1], parts[1:])
    return False


def _key_exists(key: str) -> bool:
    return _resolves(RunConfig, key.split("."))


def _config_keys(text: str) -> list[str]:
    """Backticked ``section.key`` words whose section is one of RunConfig's, and every key a
    ``--set`` assigns, anywhere on the page."""
    sections = set(RunConfig.model_fields)
    keys = []
    for word in INLINE.findall(text):
        for found in DOTTED.findall(word):
            parts = found.split(".")
            if found != word.split("=")[0].split(":")[0].strip():
                continue  # part of a longer expression (a path, a call, a URL)
            if parts[0] in sections and not (len(parts) == 2 and parts[1] in FILE_SUFFIXES):
                keys.append(found)
    keys += SET_ITEM.findall(REFUSED.sub("", text))
    return keys


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_config_key_a_page_names_exists(page: Path) -> None:
    unknown = sorted({k for k in _config_keys(page.read_text()) if not _key_exists(k)})
    assert not unknown, f"{_rel(page)} names config keys RunConfig does not have: {unknown}"


def test_the_readme_lists_every_config_section() -> None:
    """The README's list of sections is the config model's, every one (storage, bootstrap,
    bench included)."""
    text = README.read_text()
    missing = [s for s in RunConfig.model_fields if f"`{s}`" not in text]
    assert not missing, f"README.md does not list the config sections {missing}"
    table = (REPO / "docs" / "configuration.md").read_text()
    rows = [s for s in RunConfig.model_fields if f"| `{s}` |" not in table]
    assert not rows, f"docs/configuration.md's table of sections lacks {rows}"


# -- commands -------------------------------------------------------------------------------


def _shell_commands(text: str) -> list[list[str]]:
    """Every command of the page's shell blocks, as words: continuation lines joined, comments
    dropped, ``a && b`` and ``a; b`` split, redirections (``> file``) and leading
    ``VAR=value`` assignments left out."""
    commands = []
    for lang, body in FENCE.findall(text):
        if lang not in SHELL:
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            commands += _split_commands(shlex.split(line, comments=True))
    return commands


def _split_commands(words: list[str]) -> list[list[str]]:
    out: list[list[str]] = [[]]
    redirected = False
    for word in words:
        if word in {"&&", ";", "||", "|"}:
            out.append([])
        elif redirected:
            redirected = False  # the file a redirection names
        elif word in {">", ">>", "2>"}:
            redirected = True
        else:
            out[-1].append(word)
    for command in out:
        while command and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", command[0]):
            command.pop(0)
    return [c for c in out if c]


def _make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([a-z0-9][\w-]*):", text, re.M))


def _mpd_refusal(args: list[str]) -> str | None:
    """argparse's own verdict on ``mpd ARGS``: None when it parses, else its error."""
    parser = build_parser()
    errors: list[str] = []

    def error(message: str) -> typing.NoReturn:
        errors.append(message)
        raise SystemExit(2)

    for p in [parser, *_subparsers(parser)]:
        p.error = error  # type: ignore[method-assign]
    try:
        parser.parse_args(args)
    except SystemExit:
        return errors[0] if errors else "exited"
    return None


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below ``parser`` (``mpd config show`` is two levels down)."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                out += [child, *_subparsers(child)]
    return out


def test_every_readme_command_names_a_real_mpd_subcommand_or_make_target() -> None:
    targets = _make_targets()
    bad = []
    made: set[str] = set()  # files an earlier command made: cp configs/tiny.yaml mine.yaml
    commands = _shell_commands(README.read_text())
    for words in commands:
        if words[0] == "cp" and len(words) == 3:
            made.add(words[2]) if (REPO / words[1]).is_file() else bad.append(shlex.join(words))
        elif words[0] == "make":
            unknown = [w for w in words[1:] if "=" not in w and w not in targets]
            if unknown:
                bad.append(f"{shlex.join(words)}: no make target {unknown}")
        elif words[0] == "mpd":
            refusal = _mpd_refusal(words[1:])
            if refusal:
                bad.append(f"{shlex.join(words)}: {refusal}")
            for flag, value in itertools.pairwise(words):
                if flag in {"-c", "--config"} and not ((REPO / value).is_file() or value in made):
                    bad.append(f"{shlex.join(words)}: no config file {value}")
    assert {w[0] for w in commands} >= {"make", "mpd"}, "README shows no make or mpd command"
    assert not bad, "README commands that do not run as written:\n" + "\n".join(bad)


def test_the_command_check_refuses_an_unknown_subcommand_flag_and_target() -> None:
    assert _mpd_refusal(["run", "-c", "configs/tiny.yaml"]) is None
    assert _mpd_refusal(["config", "show", "--set", "train.lr=1e-4"]) is None
    assert _mpd_refusal(["frobnicate"]) is not None
    assert _mpd_refusal(["run", "--no-such-flag"]) is not None
    assert "run" in _make_targets() and "frobnicate" not in _make_targets()
    block = "```bash\nFOO=1 mpd run --rounds 2  # two\nmake test && mpd sql 'select 1' > x\n```\n"
    assert _shell_commands(block) == [
        ["mpd", "run", "--rounds", "2"],
        ["make", "test"],
        ["mpd", "sql", "select 1"],
    ]


def test_the_readme_is_one_short_page() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"


def test_docs_has_an_index_that_links_every_page() -> None:
    index = REPO / "docs" / "README.md"
    assert index.is_file(), "docs/README.md (the index) is missing"
    text = index.read_text()
    pages = [p.name for p in (REPO / "docs").glob("*.md") if p.name != "README.md"]
    unlinked = [p for p in pages if f"]({p})" not in text]
    assert not unlinked, f"docs/README.md does not link {unlinked}"


def test_the_readme_config_commands_run_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``cp`` and ``mpd config show`` of the README, run for real from the repository root (the
    copies land in a temporary directory): the config a user starts from resolves, with the
    overrides the README shows."""
    from flows.cli import main

    monkeypatch.chdir(REPO)
    made: dict[str, str] = {}
    ran = 0
    for words in _shell_commands(README.read_text()):
        words = [made.get(w, w) for w in words]
        if words[0] == "cp":
            made[words[2]] = str(tmp_path / Path(words[2]).name)
            Path(made[words[2]]).write_text((REPO / words[1]).read_text())
        elif words[:3] == ["mpd", "config", "show"]:
            assert main(words[1:]) == 0, shlex.join(words)
            assert "workspace:" in capsys.readouterr().out
            ran += 1
    assert ran >= 1, "README shows no `mpd config show`"
