"""Model identities and the training step's knobs (the world's own config is world/config.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from data.configbase import NOT_IN_KEY, StrictModel


class ModelsConfig(StrictModel):
    student: str = Field(
        "builtin:tiny-student",
        description="builtin:tiny-student, packaged:smollm2 (SmolLM2-135M-Instruct, imported "
        "into the workspace on first use), or a path to a Hugging Face causal LM directory.",
    )
    teacher: str = Field(
        "builtin:tiny-teacher",
        description="Scores targets; must share the student's tokenizer.",
    )
    rewriter: str | None = Field(
        None,
        description="Model that rewrites student traces; None means the teacher. May be any "
        "model (e.g. a large instruction model behind an API): it need not share the tokenizer.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights and compute dtype (losses are always float32)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda if present.")


class LoraConfig(StrictModel):
    enabled: bool = Field(False, description="Train LoRA adapters instead of all weights.")
    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="Adapter scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names that get adapters.",
    )
    merge: bool = Field(True, description="Merge adapters into the saved round checkpoint.")


class TrainConfig(StrictModel):
    loss: Literal["reverse_kl", "forward_kl", "jsd", "ce"] = Field(
        "reverse_kl", description="Divergence to the teacher (ce = SFT on the target trace)."
    )
    beta: float = Field(0.5, ge=0, le=1, description="jsd only: interpolation weight.")
    temperature: float = Field(1.0, gt=0, description="Applied to student and teacher alike.")
    teacher_mode: Literal["offline_topk", "online"] = Field(
        "offline_topk",
        description="offline_topk: stored top-k from the score stage; online: run the teacher "
        "in the trainer (full vocabulary, no score stage).",
    )
    topk_tail: bool = Field(True, description="Top-k losses keep one bucket for the rest mass.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "constant"] = Field("cosine")
    warmup_steps: int = Field(10, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor, as a share of lr.")
    steps: int = Field(100, ge=1, description="Optimizer steps per round.")
    batch_size: int = Field(16, ge=1, description="Sequences per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_grad_norm: float = Field(1.0, gt=0)
    max_length: int = Field(1024, ge=16, description="Prompt + target tokens; longer are cut.")
    checkpoint_every: int = Field(
        25,
        ge=1,
        description="Steps between resumable checkpoints. A resumed run ends with the weights "
        "an uninterrupted one would have, so it is in no stage key.",
        json_schema_extra=NOT_IN_KEY,
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
