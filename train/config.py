"""Model identities and the training step's knobs (the world's own config is world/config.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

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


class DistributedConfig(StrictModel):
    """How many processes train, and how they share the model. None of it is in a stage key:
    the global batch and the loss's normalisation do not depend on it (train.trainer), so 1 and
    8 processes, DDP or FSDP, train the same student within float rounding."""

    nproc: int = Field(
        1,
        ge=1,
        le=4096,
        description="Training processes on this host (torchrun --nproc-per-node; one per GPU). "
        "1 trains in the stage's own process.",
        json_schema_extra=NOT_IN_KEY,
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every process holds the whole model; fsdp: PyTorch FSDP2 "
        "(fully_shard), each process holds 1/N of weights, gradients and optimizer state.",
        json_schema_extra=NOT_IN_KEY,
    )
    launcher: list[str] | None = Field(
        None,
        description="Command (argv words, no shell) that starts the processes instead of "
        "torchrun on this host, e.g. for several hosts; `-m train.trainer SPEC` is appended. "
        "It runs as given: set it only in configs you trust.",
        json_schema_extra=NOT_IN_KEY,
    )
    activation_checkpointing: bool = Field(
        False,
        description="Recompute each decoder layer's activations in backward (less memory, "
        "~1/3 more compute; the same values).",
        json_schema_extra=NOT_IN_KEY,
    )

    @property
    def launched(self) -> bool:
        """Whether the train stage starts separate processes (else it trains in its own)."""
        return self.nproc > 1 or bool(self.launcher)


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
    precision: Literal["model", "bf16-mixed"] = Field(
        "model",
        description="model: weights, optimizer and compute in models.dtype; bf16-mixed: "
        "float32 master weights and optimizer, bf16 compute (FSDP casts the parameters, one "
        "process or DDP autocast), so a small learning rate is not rounded away.",
    )
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, json_schema_extra=NOT_IN_KEY
    )

    @model_validator(mode="after")
    def _shared_by_every_process(self) -> TrainConfig:
        """Each process takes a share of every micro-batch (train.batching.share): a process
        with none would leave the others waiting in their collectives."""
        if self.batch_size < self.distributed.nproc:
            raise ValueError(
                f"batch_size {self.batch_size} cannot be shared by distributed.nproc "
                f"{self.distributed.nproc} processes: raise it (lower grad_accum to keep the "
                "step's size)"
            )
        return self
