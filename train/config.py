"""Model identities and the training step's knobs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from data.configbase import StrictModel
from train.tiny import TinyModelConfig


class ModelsConfig(StrictModel):
    student: str = Field(
        "builtin:tiny-student",
        description="builtin:tiny-student, or a path to a Hugging Face causal LM directory.",
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
    checkpoint_every: int = Field(25, ge=1, description="Steps between resumable checkpoints.")
    lora: LoraConfig = Field(default_factory=LoraConfig)


class Recipe(StrictModel):
    steps: int = Field(1500, ge=1, description="Optimizer steps.")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(50, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    examples: int = Field(24000, ge=1, description="Distinct training examples generated.")


class StudentMix(StrictModel):
    """What the built-in student is trained on (train/world_data.py explains the design)."""

    cue_share: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Examples whose problem comes inside the concise cue (data/prompts.py "
        "CONCISE_CUE), answered in the target style: the student's concise mode.",
    )
    plain_target_share: float = Field(
        0.4,
        ge=0,
        lt=1,
        description="Of the plain-prompt examples, the share answered in the target style "
        "(the rest are verbose): a minority branch of the plain prompt that MPD can move. "
        "0 with cue_share 0 is the verbose-only student of the first world.",
    )
    plain_target_forced: float = Field(
        0.8,
        ge=0,
        le=1,
        description="Of the plain-prompt target-style examples, the share whose first think "
        "word comes with the prompt instead of being trained: they make the plain prompt's "
        "short branch as competent as the cued mode without moving the plain prompt's choice "
        "of branch (a larger plain_target_share alone tipped greedy decoding into the short "
        "style on 75% of test problems). The shipped world's last fine-tune used 0.8.",
    )
    fixed_opener: bool = Field(
        True,
        description="Every verbose trace opens with the same line, so greedy decoding of the "
        "plain prompt takes the verbose branch (several openers split its mass).",
    )


class BootstrapConfig(StrictModel):
    vocab_size: int = Field(1024, ge=300, description="BPE target (the world needs ~740).")
    difficulty: tuple[int, int] = Field((1, 2), description="Inclusive difficulty range.")
    verbosity: int = Field(2, ge=1, le=3, description="Verbose style level of student traces.")
    student: TinyModelConfig = Field(default_factory=TinyModelConfig)
    teacher: TinyModelConfig = Field(
        default_factory=lambda: TinyModelConfig(
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            intermediate_size=1024,
        )
    )
    student_mix: StudentMix = Field(default_factory=StudentMix)
    student_train: Recipe = Field(
        default_factory=lambda: Recipe(steps=4000, examples=60000),
        description="Training the student from scratch (--from-scratch).",
    )
    teacher_train: Recipe = Field(
        default_factory=lambda: Recipe(steps=7000, lr=2e-3, examples=100000),
        description="Training the teacher from scratch (--from-scratch).",
    )
    student_finetune: Recipe = Field(
        default_factory=lambda: Recipe(
            steps=1500, batch_size=32, lr=1e-3, warmup_steps=20, examples=48000
        ),
        description="Fine-tuning an existing student into student_mix (--finetune SRC).",
    )
    teacher_finetune: Recipe = Field(
        default_factory=lambda: Recipe(
            steps=2000, batch_size=16, lr=1e-3, warmup_steps=20, examples=32000
        ),
        description="Fine-tuning an existing teacher into target_style (--finetune SRC).",
    )
    rewrite_share: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Teacher examples that rewrite (the rest solve directly). 1.0: the tiny "
        "teacher rewrites reliably but is no direct solver, so score under the rewrite context.",
    )
    error_rate: float = Field(0.1, ge=0, le=1, description="Rewrite inputs with a slip.")
    target_input_share: float = Field(
        0.15,
        ge=0,
        le=1,
        description="Rewrite inputs already in the target style (the student's own short "
        "samples): the teacher learns to copy them.",
    )
    target_style: Literal["concise", "steps"] = Field(
        "steps",
        description="The short style: what the teacher rewrites into and what the student "
        "writes under the cue. 'steps' keeps each step's header, equation and running value "
        "(about half the verbose length; the tiny student computes as well in it), 'concise' "
        "only the equations (the first world's target; data/world/styles.py).",
    )
    checkpoint_every: int = Field(
        50, ge=1, description="Steps between resumable checkpoints of a training run."
    )
    exclude_test: int = Field(1000, ge=0, description="Test problems never trained on.")
    eval_problems: int = Field(400, ge=1, description="Test problems in the bootstrap eval.")
    eval_heldout: int = Field(100, ge=0, description="Held-out problems in the bootstrap eval.")
    max_new_tokens: int = Field(768, ge=16)
