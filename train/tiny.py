"""Tiny Qwen3-architecture models built from config, for the reference world.

They are real ``Qwen3ForCausalLM`` models: saved with ``save_pretrained`` they
load through exactly the code path that loads a downloaded Qwen3 checkpoint,
so every engine and trainer test exercises production loading.
"""

from __future__ import annotations

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
