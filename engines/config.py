"""Which engine serves each role (student sampling, teacher scoring, rewriting).

The API key of an ``openai`` engine is never a field: ``api_key_env`` names the
environment variable that holds it, so ``run.yaml``, manifests and logs carry
the variable's name only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from data.configbase import StrictModel

REPO = Path(__file__).resolve().parents[1]

# The settings that shape an engine's output, per kind, besides ``kind`` and the weights' dtype:
# they choose the computation (its numerics, its context limit, which random draw a row gets).
# Every other field says where the engine runs, how fast or how patiently, and is in no stage
# key (``NOT_SHAPING``); a field meant for another kind is ignored by this one, and so is out of
# its key. tests/test_key_coverage.py checks that every field is in exactly one of the two.
SHAPING: dict[str, tuple[str, ...]] = {
    # hf draws every random number of a call from one generator, row after row of each batch:
    # the batch sizes decide which draw a row gets.
    "hf": ("batch_size", "max_batch_tokens"),
    "vllm": (
        "tensor_parallel_size",  # the all-reduce order of a sharded model
        "max_model_len",
        "enforce_eager",  # CUDA graphs and compiled kernels, or eager ones
        "max_logprobs",
        "env",  # free-form (an attention backend, a kernel switch): cannot be told apart
        "vllm_args",  # free-form, e.g. kv_cache_dtype
    ),
    "openai": ("served_model_name", "max_logprobs"),
}
# Requests are seeded one by one (engines/remote.py), so replicas, batching and retries give
# the same rows; the interpreter is named by its library versions, the server by its model.
NOT_SHAPING = (
    "shard_workers",
    "python",
    "data_parallel_size",
    "gpu_memory_utilization",
    "startup_timeout_s",
    "base_url",
    "api_key_env",
    "max_concurrency",
    "timeout_s",
    "max_retries",
    "retry_backoff_s",
)


class EngineConfig(StrictModel):
    kind: Literal["hf", "vllm", "openai"] = Field(
        "hf",
        description="hf: transformers in-process (default, CPU or GPU); vllm: vLLM offline in a "
        "subprocess with its own interpreter; openai: any OpenAI-compatible completions server.",
    )
    batch_size: int | None = Field(
        None, ge=1, description="Prompts per forward batch; None picks one that bounds memory."
    )
    max_batch_tokens: int = Field(
        32768, ge=256, description="Upper bound on batch_size x sequence length (hf engine)."
    )
    shard_workers: int = Field(
        1,
        ge=1,
        description="Shards in flight at once on the flow's task runner. 1 suits an in-process "
        "engine (it already uses every core or the GPU); more suits a served endpoint.",
    )
    python: str | None = Field(
        None,
        description="vllm: interpreter of the environment that has vLLM (`make vllm-env` builds "
        ".venv-vllm). A relative path is tried from the current directory, then from the "
        "repository; None means $MPD_VLLM_PYTHON, else <repo>/.venv-vllm/bin/python.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="vllm: weights dtype; None means models.dtype."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs per model replica.")
    data_parallel_size: int = Field(1, ge=1, description="vllm: model replicas.")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="vllm: share of GPU memory vLLM may take."
    )
    max_model_len: int | None = Field(None, ge=64, description="vllm: context length limit.")
    enforce_eager: bool = Field(
        False, description="vllm: no CUDA graphs (faster start-up, slower decoding; CPU: true)."
    )
    max_logprobs: int = Field(
        64,
        ge=1,
        description="vllm/openai: most logprobs per position a request may ask for. vLLM refuses "
        "prompt_logprobs above its max_logprobs (default 20), so score.top_k must not exceed "
        "this; for an openai engine the server needs --max-logprobs at least as large.",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="vllm: extra environment of the worker, e.g. {VLLM_CPU_KVCACHE_SPACE: '1'} "
        "(GiB of KV cache on a CPU). Never put secrets here: it is written to run.yaml.",
    )
    vllm_args: dict[str, Any] = Field(
        default_factory=dict,
        description="vllm: further keyword arguments for vllm.LLM (e.g. {kv_cache_dtype: fp8}).",
    )
    startup_timeout_s: float = Field(
        1800.0, gt=0, description="vllm: how long loading the model may take before giving up."
    )
    base_url: str | None = Field(None, description="openai: e.g. http://127.0.0.1:8000/v1")
    served_model_name: str | None = Field(
        None, description="openai: the model name the server expects (default: the model path)."
    )
    api_key_env: str | None = Field(
        None,
        description="openai: NAME of the environment variable holding the API key. The key "
        "itself never goes in a config, a log or a manifest.",
    )
    max_concurrency: int = Field(16, ge=1, description="openai: requests in flight at once.")
    timeout_s: float = Field(120.0, gt=0, description="openai: per-request timeout.")
    max_retries: int = Field(5, ge=0, description="openai: retries on 429/5xx/connection errors.")
    retry_backoff_s: float = Field(
        1.0, gt=0, description="openai: first retry delay; doubles each retry (capped at 60 s)."
    )

    def key_settings(self, models_dtype: str) -> dict[str, Any]:
        """What of this engine shapes a stage's output: its kind, the dtype its weights run in
        (none for a server: it chose its own), and its kind's ``SHAPING`` settings."""
        settings: dict[str, Any] = {"kind": self.kind}
        if self.kind != "openai":
            settings["dtype"] = (self.dtype if self.kind == "vllm" else None) or models_dtype
        for name in SHAPING[self.kind]:
            settings[name] = getattr(self, name)
        return settings

    def computing_python(self) -> Path | None:
        """The interpreter whose libraries compute this engine's output when it is not this
        one: vLLM's own (None: this process's, or a server's that no key can see)."""
        return vllm_python(self.python) if self.kind == "vllm" else None

    @model_validator(mode="after")
    def _needs(self) -> EngineConfig:
        if self.kind == "openai" and not self.base_url:
            raise ValueError("an openai engine needs base_url (e.g. http://127.0.0.1:8000/v1)")
        return self


class EnginesConfig(StrictModel):
    student: EngineConfig = Field(default_factory=EngineConfig, description="Samples the student.")
    teacher: EngineConfig = Field(
        default_factory=EngineConfig, description="Scores targets (top-k logprobs)."
    )
    rewriter: EngineConfig | None = Field(
        None, description="Rewrites student traces; None means the teacher's engine."
    )


def vllm_python(python: str | None) -> Path:
    """The vLLM interpreter: ``python``, else $MPD_VLLM_PYTHON, else <repo>/.venv-vllm/bin/python.

    Relative paths are tried from the current directory, then from the repository.
    Not resolved through symlinks: a venv's python is a link to the base one.
    """
    raw = python or os.environ.get("MPD_VLLM_PYTHON") or str(REPO / ".venv-vllm/bin/python")
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path if (Path.cwd() / path).exists() else REPO / path
    return path.absolute()
