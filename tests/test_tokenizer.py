"""The world tokenizer: digits, special tokens, chat template, offline loading."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from data.answers import count_tokens, format_prompt
from world import build_problems, corpus_texts, corrupt, problem_from_record
from world.styles import render_concise, render_verbose
from world.tokenizer import SPECIAL_TOKENS, THINK_TOKENS, train_tokenizer


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return build_problems(5, n_train=300, n_test=20, n_heldout=20, difficulty=(1, 5))


@pytest.fixture(scope="module")
def texts(records: list[dict]) -> list[str]:
    return corpus_texts(records, seed=5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, texts: list[str]) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts, vocab_size=1024, out_dir=out)
    return out


@pytest.fixture(scope="module")
def tok(saved: Path):
    return AutoTokenizer.from_pretrained(saved)


def _completions(records: list[dict]) -> list[str]:
    rng = random.Random(0)
    out = []
    for record in records[:60]:
        problem = problem_from_record(record)
        out += [render_concise(problem), render_verbose(problem, rng, verbosity=3)]
        out.append(render_verbose(corrupt(problem, rng), rng))
    return out


def test_loads_with_hub_offline_in_a_fresh_process(saved: Path) -> None:
    """HF_HUB_OFFLINE is read at import time, so only a fresh interpreter tests it."""
    code = (
        "import sys; from transformers import AutoTokenizer;"
        "t = AutoTokenizer.from_pretrained(sys.argv[1]);"
        "print(t.eos_token, t.pad_token, t.encode('<think>12'))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(saved)], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    eos, pad, ids = out.stdout.split(" ", 2)
    assert (eos, pad) == ("<|im_end|>", "<|endoftext|>")
    assert len(json.loads(ids)) == 3


def test_loads_with_contract_tokens(tok) -> None:
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id != tok.pad_token_id
    assert len(tok) <= 1024


def test_special_and_think_tokens_are_single_ids(tok) -> None:
    ids = {t: tok.encode(t, add_special_tokens=False) for t in (*SPECIAL_TOKENS, *THINK_TOKENS)}
    assert all(len(v) == 1 for v in ids.values()), ids
    assert len({v[0] for v in ids.values()}) == 5
    in_text = tok.encode("<think>\n1</think>\n\nAnswer: 1<|im_end|>", add_special_tokens=False)
    assert in_text[0] == ids["<think>"][0]
    assert ids["</think>"][0] in in_text
    assert in_text[-1] == ids["<|im_end|>"][0]


def test_every_digit_is_its_own_token(tok) -> None:
    ids = tok.encode("x 12345 + 67890 = 80235", add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("1234567890" + "80235")
    for token_id in range(len(tok)):
        text = tok.decode([token_id])
        if any(c.isdigit() for c in text):
            assert len(text) == 1, repr(text)


def test_round_trip_of_completions(tok, records: list[dict]) -> None:
    for text in _completions(records):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text


def test_skip_special_tokens_keeps_think_tags(tok) -> None:
    ids = tok.encode(
        "<think>\n1 + 1 = 2\n</think>\n\nAnswer: 2<|im_end|>", add_special_tokens=False
    )
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\n1 + 1 = 2\n</think>\n\nAnswer: 2"


def test_chat_template_is_the_prompt_contract(tok) -> None:
    question = "Start with 12. Add 30. What is the final number?"
    messages = [{"role": "user", "content": question}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == format_prompt(question)
    encoded = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    assert list(ids) == tok.encode(format_prompt(question), add_special_tokens=False)


def test_encode_adds_nothing(tok) -> None:
    assert tok.encode("Answer: 1") == tok.encode("Answer: 1", add_special_tokens=False)


def test_count_tokens_matches_whole_encoding(tok, records: list[dict]) -> None:
    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    for text in _completions(records):
        think, answer, total = count_tokens(encode, text)
        assert total == len(encode(text))
        assert answer > 0 and think > answer


def test_training_is_deterministic(texts: list[str], saved: Path, tmp_path: Path) -> None:
    train_tokenizer(texts, vocab_size=1024, out_dir=tmp_path)
    assert (tmp_path / "tokenizer.json").read_text() == (saved / "tokenizer.json").read_text()
