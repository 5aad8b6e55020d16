"""The world's tokenizer: byte-level BPE trained on the world's own text.

Choices, each for a reason:

- every digit is its own token (``Digits(individual_digits=True)`` before the
  byte-level split), because tiny models learn column arithmetic on digits and
  failed with whole numbers as tokens (FACTS.md);
- byte-level, so any text (a user's rewrite instruction, a typo) encodes;
- ``<|endoftext|>`` (pad), ``<|im_start|>`` and ``<|im_end|>`` (end of turn =
  EOS) are special tokens; ``<think>`` and ``</think>`` are added tokens that
  are NOT special, as in Qwen3, so ``decode(..., skip_special_tokens=True)``
  keeps them and graders still find the last ``</think>``;
- a chat template that renders exactly ``data.answers.format_prompt``.

Training is deterministic for the same texts in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END)
THINK_TOKENS = (THINK_OPEN, THINK_CLOSE)

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def _base_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train the raw ``tokenizers`` BPE; special and think tokens get the first ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *THINK_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Re-register with explicit flags: special or not, never normalised or stripped.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return tok


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1024,
    out_dir: str | Path | None = None,
) -> PreTrainedTokenizerFast:
    """Train, wrap for transformers, and (with ``out_dir``) save for ``AutoTokenizer``.

    The saved directory loads offline with ``AutoTokenizer.from_pretrained``;
    eos is ``<|im_end|>`` because generation must stop at the end of the turn.
    """
    tok = _base_tokenizer(texts, vocab_size)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START],
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast
