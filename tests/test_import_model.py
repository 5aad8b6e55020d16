"""The one real pretrained model here: SmolLM2-135M-Instruct, imported from its packaged GGUF.

``mpd import-model smollm2 --out DIR`` writes a plain model directory; the project's own
loaders and engine then read it like any downloaded checkpoint: its chat template, its stop
token, greedy generation of a GSM8K question and teacher-forced top-k logprobs at its full
49,152-token vocabulary.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import GSM8K_FIXTURE, REPO

GSM8K_TEST = GSM8K_FIXTURE / "test.jsonl"


def mpd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "smollm2"
    done = mpd("import-model", "smollm2", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "134.5M parameters, vocabulary 49152" in done.stderr
    assert "Traceback" not in done.stderr and "de-quantizing" not in done.stderr  # quiet
    return out


def test_the_import_is_a_plain_model_directory(smollm2: Path) -> None:
    info = json.loads((smollm2 / "IMPORT.json").read_text())
    assert info["architecture"] == "LlamaForCausalLM" and info["parameters"] == 134_515_008
    assert info["vocab_size"] == 49152 and info["eos_token"] == "<|im_end|>"
    assert (smollm2 / "model.safetensors").is_file()
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config


def test_the_engine_generates_and_scores_with_its_chat_template(smollm2: Path) -> None:
    import torch

    from engines.base import GenerationParams
    from engines.hf import HFEngine
    from tasks.generation import chat_prompt
    from train.models import load_model, load_tokenizer

    tok = load_tokenizer(smollm2)
    question = json.loads(GSM8K_TEST.read_text().splitlines()[1])["question"]
    prompt = chat_prompt(tok, question)
    text = tok.decode(prompt)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    engine = HFEngine(load_model(smollm2, device="cpu"), tok)
    params = GenerationParams(
        n=1, temperature=0.0, max_tokens=24, stop_token_ids=(tok.eos_token_id,)
    )
    (out,) = engine.generate([prompt], params)[0]
    assert out.text.strip() and len(out.token_ids) <= 24
    # teacher-forced top-k over the full vocabulary: log-probabilities, best first
    (scored,) = engine.score([prompt], [out.token_ids], 8)
    assert scored.topk_ids.shape == (len(out.token_ids), 8)
    lp = torch.as_tensor(scored.topk_logprobs)
    assert bool((lp <= 0).all()) and bool((lp[:, :-1] >= lp[:, 1:]).all())
    assert int(scored.topk_ids.max()) < 49152
    # greedy decoding picked each token the model ranks first
    assert list(scored.topk_ids[:, 0]) == list(out.token_ids)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "x"], "name a packaged model (smollm2) or give --gguf FILE"),
        (["--gguf", "nope.gguf", "--out", "x"], "GGUF file not found: nope.gguf"),
        (["smollm2", "--gguf", "a.gguf", "--out", "x"], "name a packaged model"),
    ],
)
def test_import_mistakes_are_one_line(args: list[str], message: str) -> None:
    done = mpd("import-model", *args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
