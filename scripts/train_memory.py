"""Memory per training process, computed from a Qwen3 model's shapes (no weights, no GPU).

    .venv/bin/python scripts/train_memory.py          # the table in docs/distributed-training.md

The model is built on PyTorch's meta device from its published config, so every parameter
count is the architecture's own. Per process, with `train.precision: bf16-mixed` (float32
master weights, bf16 compute) and AdamW:

- trained weights: 4 B weight + 4 B gradient + 8 B AdamW moments = 16 B a parameter; frozen
  weights (LoRA's base): 4 B. DDP holds all of it on every process; FSDP 1/N of it.
- FSDP's gathered copies, in bf16 (2 B a parameter): the root unit (embeddings, final norm,
  lm_head) stays gathered from its forward to its backward (train.distributed), plus two
  decoder layers at a time (the one computing and the one prefetched). DDP's autocast keeps
  a bf16 copy of the weights it multiplies (2 B a parameter of the decoder).
- Activations come on top, per sequence: with activation checkpointing, each layer's input
  (T x hidden x 2 B) plus one layer recomputed; the loss's logits are made 1024 positions at a
  time (train.fused: 1024 x vocab x 4 B, ~0.6 GB for Qwen3's 151,936).
"""

from __future__ import annotations

import torch

GIB = 2**30
SIZES = {  # Qwen/Qwen3-*/config.json
    "Qwen3-0.6B": dict(hidden_size=1024, num_hidden_layers=28, intermediate_size=3072,
                       num_attention_heads=16, tie_word_embeddings=True),
    "Qwen3-1.7B": dict(hidden_size=2048, num_hidden_layers=28, intermediate_size=6144,
                       num_attention_heads=16, tie_word_embeddings=True),
    "Qwen3-4B": dict(hidden_size=2560, num_hidden_layers=36, intermediate_size=9728,
                     num_attention_heads=32, tie_word_embeddings=True),
    "Qwen3-8B": dict(hidden_size=4096, num_hidden_layers=36, intermediate_size=12288,
                     num_attention_heads=32, tie_word_embeddings=False),
}  # fmt: skip
COMMON = dict(num_key_value_heads=8, head_dim=128, vocab_size=151936)
PROCESSES = (1, 2, 4, 8)
LORA_R, LORA_TARGETS = 16, ("q_proj", "k_proj", "v_proj", "o_proj")


def counts(shape: dict) -> dict[str, int]:
    """Parameters: all, the root unit's, the largest decoder layer's, LoRA's adapters."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config(**shape, **COMMON))
    total = sum(p.numel() for p in model.parameters())  # tied weights counted once
    layers = model.model.layers
    layer = max(sum(p.numel() for p in m.parameters()) for m in layers)
    lora = sum(
        LORA_R * (mod.in_features + mod.out_features)
        for name, mod in model.named_modules()
        if name.rsplit(".", 1)[-1] in LORA_TARGETS
    )
    return {"total": total, "root": total - layer * len(layers), "layer": layer, "lora": lora}


def per_process(c: dict[str, int], n: int, strategy: str, lora: bool) -> float:
    """Model states of one process (GiB): see the module docstring."""
    trained = c["lora"] if lora else c["total"]
    frozen = c["total"] if lora else 0
    states = 16 * trained + 4 * frozen
    if strategy == "ddp":
        return (states + 2 * (c["total"] - c["root"])) / GIB
    gathered = 2 * (c["root"] + 2 * c["layer"])
    return (states / n + gathered) / GIB


def table() -> str:
    head = "| model | params | training | DDP, any N | " + " | ".join(
        f"FSDP N={n}" for n in PROCESSES
    )
    rows = [head + " |", "|" + "---|" * (4 + len(PROCESSES))]
    for name, shape in SIZES.items():
        c = counts(shape)
        for lora in (False, True):
            cells = [f"{per_process(c, n, 'fsdp', lora):.1f}" for n in PROCESSES]
            kind = f"LoRA r={LORA_R} (q,k,v,o)" if lora else "full"
            ddp = per_process(c, 1, "ddp", lora)
            row = f"| {name} | {c['total'] / 1e9:.2f} B | {kind} | {ddp:.1f} | " + " | ".join(cells)
            rows.append(row + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
