"""The reference world's models: tiny Qwen3 architectures built from config, and the
``bootstrap:`` section that says how the world's student and teacher are trained.

They are real ``Qwen3ForCausalLM`` models: saved with ``save_pretrained`` they
load through exactly the code path that loads a downloaded Qwen3 checkpoint,
so every engine and trainer test exercises production loading.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from data.configbase import StrictModel


class TinyModelConfig(StrictModel):
    hidden_size: int = Field(128, ge=16)
    num_hidden_layers: int = Field(3, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    num_key_value_heads: int = Field(2, ge=1)
    head_dim: int | None = Field(None, description="default hidden / heads (Qwen3 defaults to 128)")
    intermediate_size: int = Field(512, ge=16)
    max_position_embeddings: int = Field(2048, ge=64)
    tie_word_embeddings: bool = True
    rope_theta: float = 10000.0


class Recipe(StrictModel):
    steps: int = Field(1500, ge=1, description="Optimizer steps.")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(50, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    examples: int = Field(24000, ge=1, description="Distinct training examples generated.")


class StudentMix(StrictModel):
    """What the built-in student is trained on (world/corpus.py explains the design)."""

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
        "only the equations (the first world's target; world/styles.py).",
    )
    checkpoint_every: int = Field(
        50, ge=1, description="Steps between resumable checkpoints of a training run."
    )
    exclude_test: int = Field(1000, ge=0, description="Test problems never trained on.")
    eval_problems: int = Field(400, ge=1, description="Test problems in the bootstrap eval.")
    eval_heldout: int = Field(100, ge=0, description="Held-out problems in the bootstrap eval.")
    max_new_tokens: int = Field(768, ge=16)


def build_tiny_model(tokenizer, cfg: TinyModelConfig, *, seed: int = 0):
    """A randomly initialised Qwen3 causal LM sized for ``tokenizer``.

    ``vocab_size`` is rounded up to a multiple of 64 (as real checkpoints pad
    theirs), so every consumer has to slice logits to ``len(tokenizer)``:
    the padding rows exist in tests exactly as they do in production.
    ``head_dim`` is always set explicitly because Qwen3 defaults it to 128
    whatever the hidden size. The same ``seed`` gives the same weights.
    """
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    vocab = -(-len(tokenizer) // 64) * 64
    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_theta=cfg.rope_theta,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Seed a forked RNG: building a model must not reset the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen3ForCausalLM(config)
