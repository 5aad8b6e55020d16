"""The run config: one YAML file, validated by the stage configs it composes.

Every stage owns its config model next to its code (``tasks/sample.py`` has
``SampleConfig`` ...); this module only composes them, loads YAML, applies
``--set key=value`` overrides, and turns pydantic's errors into one line that
names the key, who set it (``file.yaml:LINE``, the ``--set``, the deployment's
override) and, for a misspelling, the closest valid key. Reading the text
strictly (duplicate keys, infinity, alias bombs) is ``flows/configfile.py``'s job.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from data.configbase import StrictModel
from data.objstore import default_cache, is_url
from engines.config import EnginesConfig
from flows.configfile import ConfigError, Origins, deep_merge, parse_yaml, read_yaml
from flows.trusted import check_config_path, check_overrides
from tasks.cluster import RunnerConfig
from tasks.evaluate import EvaluateConfig
from tasks.filter import FilterConfig
from tasks.problems import ProblemsConfig
from tasks.rewrite import RewriteConfig
from tasks.sample import SampleConfig
from tasks.score import ScoreConfig, SelfDistillConfig
from train.config import ModelsConfig, TrainConfig
from world.config import BootstrapConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "tiny.yaml"

Method = Literal[
    "mpd",
    "on_policy",
    "off_policy",
    "self_distill",
    "sft_compressed",
    "truncation",
    "self_train",
    "mpd_unfiltered",
]
# self_train keeps the shortest correct of n samples per problem: with fewer than four tries
# there is little to choose from, and the baseline would be a weak straw man.
SELF_TRAIN_MIN_N = 4


class BenchConfig(StrictModel):
    """``mpd bench`` only: the seeds every method runs with, and how ``--tune`` chooses."""

    seeds: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=lambda: [0, 1, 2],
        min_length=1,
        description="Seeds every method runs with, the same for all (mean ± s.e. over them, and "
        "each method against mpd seed by seed). `mpd bench --seeds` overrides.",
    )
    jobs: int = Field(
        1,
        ge=1,
        description="Campaigns run side by side, each in its own process (a seed's first one "
        "before the rest of its seed, which read its shared stages; flows/bench_pool.py). "
        "configs/bench.yaml sets 2, one per core of a 2-core machine. `mpd bench --jobs` "
        "overrides.",
    )
    tune_tolerance: float = Field(
        0.02,
        ge=0.0,
        le=1.0,
        description="`mpd bench --tune`: a learning rate counts only if its last round loses at "
        "most this much dev accuracy against round 0 (0.02 = 2 points); among those, the one "
        "with the fewest dev think tokens is chosen (flows/bench_tune.py).",
    )


class StorageConfig(StrictModel):
    """Where a workspace given as a URL (``workspace: s3://bucket/prefix``) lives (data/objstore.py)."""

    url: str | None = Field(
        None,
        description="The workspace's object-storage URL (set from `workspace:` when that is a "
        "URL). Committed stages live there; `workspace` is then its local working copy.",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options, e.g. {client_kwargs: {endpoint_url: "
        "http://127.0.0.1:9000}}. Credentials belong in the environment (AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY; AWS_ENDPOINT_URL works too), not here: this is saved in run.yaml.",
    )
    cache: Path | None = Field(
        None,
        description="The local working copy of a URL workspace (default: "
        "$MPD_CACHE_DIR/workspaces/<name>, $MPD_CACHE_DIR defaulting to ~/.cache/mpd).",
    )


class RunConfig(StrictModel):
    """A whole campaign. Relative paths are relative to the current directory."""

    method: Method = Field(
        "mpd",
        description="What the rounds train on (flows/modes.py): mpd (teacher rewrites of the "
        "student's samples), on_policy (the student's samples), off_policy (the teacher's own "
        "solutions), self_distill (the student's samples, teacher = the student told to be "
        "concise), sft_compressed (filtered rewrites, CE), truncation (samples cut to the "
        "rewrites' length, CE), self_train (the student's own shortest correct sample of "
        f"sample.n >= {SELF_TRAIN_MIN_N}, CE), mpd_unfiltered (mpd without the filter).",
    )
    workspace: Path = Field(
        Path("runs/tiny"),
        description="Where every table and model goes: a directory, or an object-storage URL "
        "(s3://bucket/prefix, any fsspec URL; see `storage`).",
    )
    storage: StorageConfig = Field(default_factory=StorageConfig)
    cache_from: list[Path] = Field(
        default_factory=list,
        description="Other workspaces whose committed stages this run reuses when the stage key "
        "matches (hard-linked, reported as cached): how methods share a sample stage.",
    )
    seed: int = Field(
        0,
        ge=0,
        description="Seeds sampling and training (and problems, unless problems.seed is set). "
        "0 or more: numpy refuses a negative seed, which surfaced only at the train stage.",
    )
    rounds: int = Field(3, ge=0, description="Rounds in the campaign (0 = evaluate only).")
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    engines: EnginesConfig = Field(default_factory=EnginesConfig)
    runner: RunnerConfig = Field(
        default_factory=RunnerConfig,
        description="Where the generating stages' shards run: the flow's threads or a Dask "
        "cluster (tasks/cluster.py). Not part of any stage key: the rows are the same.",
    )
    problems: ProblemsConfig = Field(default_factory=ProblemsConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    rewrite: RewriteConfig = Field(default_factory=RewriteConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    self_distill: SelfDistillConfig = Field(default_factory=SelfDistillConfig)
    bootstrap: BootstrapConfig = Field(
        default_factory=BootstrapConfig,
        description="How the built-in world's tokenizer, student and teacher are trained.",
    )
    bench: BenchConfig = Field(default_factory=BenchConfig)

    @model_validator(mode="before")
    @classmethod
    def _workspace_url(cls, data: Any) -> Any:
        """``workspace: s3://…`` becomes ``storage.url`` plus a local working copy, so every
        command keeps a local directory to compute in and the URL says where commits go."""
        if not isinstance(data, dict) or not is_url(data.get("workspace", "")):
            return data
        storage = dict(data.get("storage") or {})
        storage["url"] = str(data["workspace"])
        data = {**data, "storage": storage}
        data["workspace"] = storage.get("cache") or default_cache(storage["url"])
        return data

    @model_validator(mode="after")
    def _self_train_tries(self) -> RunConfig:
        if self.method == "self_train" and self.sample.n < SELF_TRAIN_MIN_N:
            raise ValueError(
                f"method self_train keeps the shortest correct of sample.n samples per problem "
                f"and needs sample.n >= {SELF_TRAIN_MIN_N}, got {self.sample.n}"
            )
        return self


@dataclass(frozen=True)
class Labels:
    """How messages name an override and the workspace: as the CLI spells them, or as the
    parameters of a Prefect deployment (``flows/campaign.py``) that anyone may set."""

    override: str = "--set"
    workspace: str = "-w"
    config: str = "-c"
    untrusted: bool = False  # a deployment's: flows/trusted.py says what it may not set


CLI = Labels()
DEPLOYMENT = Labels(
    override="overrides item",
    workspace="workspace parameter",
    config="config parameter",
    untrusted=True,
)
SERVED = Labels(  # mpd serve: the CLI's options become the deployment's parameters
    override="--set (a deployment parameter)",
    workspace="-w",
    config="-c (a deployment parameter)",
    untrusted=True,
)


def load_config(
    path: Path | str | None = None,
    overrides: list[str] | None = None,
    workspace: Path | str | None = None,
    labels: Labels = CLI,
) -> RunConfig:
    """Read ``path`` (default ``configs/tiny.yaml``), apply overrides, validate.

    ``overrides`` are ``key=value`` strings (:func:`apply_override`); ``workspace``, when
    given, is taken literally (a path is not YAML: ``runs/a #1`` must not become ``runs/a``)
    and set last. An error names where the value came from: ``file.yaml:LINE``, the
    override, or the workspace, as ``labels`` spell them.
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if labels.untrusted:
        check_config_path(path, labels.config)
    data, origins = read_yaml(path)
    as_read = copy.deepcopy(data) if labels.untrusted else None
    for item in overrides or []:
        apply_override(data, item, origins, labels.override)
    if as_read is not None:
        check_overrides(as_read, data, labels.override)
    if workspace is not None:
        data["workspace"] = str(workspace)
        origins.note(("workspace",), f"{labels.workspace} {workspace}", override=True)
    return validate(data, source=str(path), origins=origins)


def validate(
    data: dict[str, Any], source: str = "config", origins: Origins | None = None
) -> RunConfig:
    """``data`` as a RunConfig; the first error in one line, after who set the value."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        loc = tuple(str(p) for p in exc.errors()[0]["loc"] if not isinstance(p, int))
        where = origins.of(loc, source) if origins is not None else source
        raise ConfigError(f"{where}: {describe_error(exc)}") from None


def apply_override(
    data: dict[str, Any], item: str, origins: Origins | None = None, label: str = "--set"
) -> None:
    """Apply ``a.b.c=value`` to nested ``data``; the value is parsed as YAML, as strictly as a
    file (no duplicate keys, no infinity or NaN).

    A mapping given for a section merges into it key by key, as a file merges over its
    ``base:``: ``--set 'train={lr: 5}'`` changes ``train.lr`` and keeps the section's other
    keys (replacing the whole section silently reset them to their defaults). A scalar or a
    list replaces. A path through a key that is not a section is refused.
    """
    where = f"{label} {item}"
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise ConfigError(f"{label} expects key=value, got {item!r}")
    try:
        value, lines = parse_yaml(raw, where, prefix=tuple(parts)) if raw.strip() else (None, {})
    except yaml.YAMLError:
        value, lines = raw, {}  # not YAML: the text itself (a prompt with a colon, say)
    _check_sections(parts, where)
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    last, path = parts[-1], tuple(parts)
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        node[last] = deep_merge(node[last], value)
    else:
        node[last] = value
        if origins is not None:
            origins.forget_below(path)
    if origins is not None:
        for noted in (path, *lines):
            origins.note(noted, where, override=True)


def _check_sections(parts: list[str], where: str) -> None:
    """Every key on the way to the last one is a section of the schema (a model or a free
    mapping such as ``storage.options``); an unknown key is left to pydantic's "did you
    mean"."""
    model: type[BaseModel] = RunConfig
    for i, part in enumerate(parts[:-1]):
        field = model.model_fields.get(part)
        if field is None:
            return
        if _is_mapping(field.annotation):
            return
        inner = _model_of(field.annotation)
        if inner is None:
            raise ConfigError(f"{where}: {'.'.join(parts[: i + 1])} is not a section")
        model = inner


def _is_mapping(annotation: Any) -> bool:
    return get_origin(annotation) is dict or any(
        get_origin(arg) is dict for arg in get_args(annotation)
    )


def describe_error(exc: ValidationError) -> str:
    """One line for the first error (pydantic lists every one; the first is enough to act on)."""
    errors = exc.errors()
    err = errors[0]
    loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
    key = ".".join(loc) or "(top level)"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    if err["type"] == "extra_forbidden":
        hint = _closest_key(loc)
        return f"unknown key '{key}'" + (f" (did you mean '{hint}'?)" if hint else "") + more
    if err["type"] == "missing":
        return f"missing key '{key}'{more}"
    got = err.get("input")
    shown = f", got {got!r}" if got is not None and not isinstance(got, dict | list) else ""
    msg = err["msg"].removeprefix("Value error, ")
    return f"'{key}': {msg}{shown}{more}"


def _closest_key(loc: list[str]) -> str | None:
    """The valid key nearest to the misspelt last element of ``loc``."""
    model: type[BaseModel] | None = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part) if model else None
        model = _model_of(field.annotation) if field else None
    if model is None:
        return None
    match = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.5)
    return ".".join([*loc[:-1], match[0]]) if match else None


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML, defaults included (what ``run.yaml`` holds)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, width=100)
