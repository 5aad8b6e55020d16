"""Which engine serves each role (student sampling, teacher scoring, rewriting)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from data.configbase import StrictModel


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
    python: str | None = Field(
        None, description="vllm: interpreter of the environment that has vLLM (e.g. .venv-vllm)."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs per model replica.")
    data_parallel_size: int = Field(1, ge=1, description="vllm: model replicas.")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="vllm: share of GPU memory vLLM may take."
    )
    max_model_len: int | None = Field(None, ge=64, description="vllm: context length limit.")
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
