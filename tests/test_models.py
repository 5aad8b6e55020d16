"""Model and tokenizer loading (plain checkpoints, LoRA adapters), tokenizer checks, tiny models.

Checkpoints are written with ``save_pretrained`` (safetensors) next to their tokenizer, which is
exactly the layout of a downloaded Qwen3 directory, and loaded offline through ``train.models``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from engines.base import GenerationParams
from engines.hf import HFEngine, load_hf_engine
from tests.conftest import REPO
from train.models import (
    ModelLoadError,
    TokenizerMismatchError,
    check_same_tokenizer,
    load_model,
    load_tokenizer,
)
from world import build_problems, corpus_texts
from world.config import TinyModelConfig, build_tiny_model
from world.tokenizer import train_tokenizer

TINY = TinyModelConfig(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(corpus_texts(build_problems(0, 200, 20, 0)), vocab_size=1024)


@pytest.fixture(scope="module")
def model(tok) -> torch.nn.Module:
    m = build_tiny_model(tok, TINY, seed=1).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from the default init, so a wrong load shows in the logits
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return m


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, model, tok) -> Path:
    """A checkpoint directory laid out like a downloaded Qwen3."""
    out = tmp_path_factory.mktemp("ckpt") / "base"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def batch(tok) -> torch.Tensor:
    return torch.tensor([tok.encode("Start with 482. Multiply by 9. What is the final number?")])


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def one_line_error(exc_info: pytest.ExceptionInfo) -> str:
    message = str(exc_info.value)
    assert message and "\n" not in message
    return message


# -- plain checkpoints ----------------------------------------------------------------------
def test_checkpoint_layout_and_roundtrip(saved: Path, model, tok, batch) -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    files = {p.name for p in saved.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json"} <= files
    assert {"tokenizer.json", "tokenizer_config.json"} <= files
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["head_dim"] == 16
    loaded = load_model(saved, device="cpu")
    assert not loaded.training and type(loaded).__name__ == "Qwen3ForCausalLM"
    assert loaded.get_output_embeddings().weight.data_ptr() == (
        loaded.get_input_embeddings().weight.data_ptr()
    )  # tied embeddings survive the round trip
    assert torch.equal(logits_of(loaded, batch), logits_of(model, batch))
    loaded_tok = load_tokenizer(saved)
    assert loaded_tok.get_vocab() == tok.get_vocab() and loaded_tok.eos_token_id == tok.eos_token_id
    assert loaded_tok.encode("Add 548. <think>") == tok.encode("Add 548. <think>")


def test_dtype_and_engine_over_a_directory(saved: Path, model, tok, batch) -> None:
    half = load_model(saved, dtype="bfloat16", device="cpu")
    assert next(half.parameters()).dtype == torch.bfloat16
    engine = load_hf_engine(saved, device="cpu")
    params = GenerationParams(temperature=0, max_tokens=12, stop_token_ids=(tok.eos_token_id,))
    prompt = batch[0].tolist()
    assert engine.generate([prompt], params) == HFEngine(model, tok).generate([prompt], params)


# -- LoRA adapters --------------------------------------------------------------------------
def test_lora_adapter_loads_onto_its_base(saved: Path, tmp_path: Path, tok, batch) -> None:
    from peft import LoraConfig, get_peft_model

    base = load_model(saved, device="cpu")
    base_logits = logits_of(base, batch)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # lora_B starts at zero: make the adapter change something
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    adapted = logits_of(peft_model.eval(), batch)
    assert (adapted - base_logits).abs().max() > 1e-2
    adapter_dir = tmp_path / "adapter"
    peft_model.save_pretrained(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == saved
    assert not (adapter_dir / "config.json").exists()

    loaded = load_model(adapter_dir, device="cpu")
    torch.testing.assert_close(logits_of(loaded, batch), adapted, rtol=0, atol=1e-5)
    assert load_tokenizer(adapter_dir).get_vocab() == tok.get_vocab()  # the base's tokenizer

    # base and adapter side by side, the base named relative to the adapter: still loads
    root = tmp_path / "moved"
    shutil.copytree(saved, root / "base")
    shutil.copytree(adapter_dir, root / "adapter")
    config["base_model_name_or_path"] = "../base"
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    moved = load_model(root / "adapter", device="cpu")
    torch.testing.assert_close(logits_of(moved, batch), adapted, rtol=0, atol=1e-5)

    # and an engine generates and scores through the adapter (cache, logits_to_keep)
    engine = HFEngine(moved, tok)
    params = GenerationParams(temperature=0, max_tokens=8)
    prompt = batch[0].tolist()
    (row,) = engine.generate([prompt], params)
    assert (
        row[0].token_ids
        == HFEngine(moved, tok, use_cache=False).generate([prompt], params)[0][0].token_ids
    )
    (s,) = engine.score([prompt[:5]], [prompt[5:]], top_k=3)
    assert s.topk_ids.shape == (len(prompt) - 5, 3)
    with torch.no_grad():
        ref = torch.log_softmax(adapted[0, 4:-1, : len(tok)], dim=-1)
    torch.testing.assert_close(
        torch.from_numpy(s.topk_logprobs), ref.topk(3).values, atol=1e-5, rtol=0
    )


def test_adapter_with_missing_base(saved: Path, tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "Qwen/Qwen3-8B", "peft_type": "LORA"})
    )
    with pytest.raises(ModelLoadError, match="not a local directory") as exc:
        load_model(adapter, device="cpu")
    assert "Qwen/Qwen3-8B" in one_line_error(exc)
    with pytest.raises(ModelLoadError, match="not a local directory"):
        load_tokenizer(adapter)


# -- clear errors ---------------------------------------------------------------------------
def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist") as exc:
        load_model(tmp_path / "nope", device="cpu")
    one_line_error(exc)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"no config\.json") as exc:
        load_model(tmp_path, device="cpu")
    one_line_error(exc)


def test_corrupt_weights(saved: Path, tmp_path: Path) -> None:
    shutil.copy(saved / "config.json", tmp_path / "config.json")
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelLoadError, match="cannot load model") as exc:
        load_model(tmp_path, device="cpu")
    one_line_error(exc)


# A child process that loads a model with its address space capped 1 GiB above what it holds
# once torch and transformers are imported: an allocation past that fails for real, in torch's
# allocator, on any machine (whatever its memory or its overcommit setting), and nothing else
# in the test run is starved.
OOM_CHILD = """
import resource, sys
import torch, transformers  # mapped before the cap
from data.errors import kind_of
from train.models import load_model

held = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1])
resource.setrlimit(resource.RLIMIT_AS, (held * 1024 + (1 << 30), resource.RLIM_INFINITY))
try:
    load_model(sys.argv[1], device="cpu")
except Exception as exc:
    print(kind_of(exc), type(exc).__name__, exc, sep="\\t")
"""


def test_out_of_memory_while_loading_is_the_machines_not_the_users(
    saved: Path, tmp_path: Path
) -> None:
    """A model too big for the memory there is: one line naming the model, its dtype and the
    device, kind "resource" (exit 1, not retried), not "cannot load model" as if the directory
    were wrong. Its embedding alone (2**24 tokens x 64 x 4 bytes = 4 GiB) cannot be allocated
    under the child's cap; its weights file is empty, so transformers allocates the weights
    itself (the failure is the allocation, not a read)."""
    big = tmp_path / "big"
    big.mkdir()
    config = json.loads((saved / "config.json").read_text())
    (big / "config.json").write_text(json.dumps({**config, "vocab_size": 2**24}))
    save_file({}, str(big / "model.safetensors"))
    out = subprocess.run(
        [sys.executable, "-c", OOM_CHILD, str(big)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    kind, name, message = out.stdout.strip().splitlines()[-1].split("\t")
    assert (kind, name) == ("resource", "MemoryExhaustedError"), message
    assert message.startswith(f"out of memory loading model {big} (float32) on cpu: ")
    assert "can't allocate memory" in message and "\n" not in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu(saved: Path) -> None:
    for device in ("cuda", "cuda:0"):
        with pytest.raises(ModelLoadError, match="no GPU") as exc:
            load_model(saved, device=device)
        one_line_error(exc)


def test_bad_settings_and_builtin_names(saved: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a torch dtype"):
        load_model(saved, dtype="float33", device="cpu")
    with pytest.raises(ModelLoadError, match="not a torch device"):
        load_model(saved, device="tpu-ish")
    with pytest.raises(ModelLoadError, match="built-in name") as exc:
        load_model("builtin:tiny-student")
    one_line_error(exc)


# -- tokenizer agreement --------------------------------------------------------------------
def test_same_tokenizer_passes(saved: Path, tok) -> None:
    check_same_tokenizer(tok, load_tokenizer(saved))
    check_same_tokenizer(load_tokenizer(saved), load_tokenizer(saved))


def test_different_vocabulary_refused(tok) -> None:
    other = train_tokenizer(corpus_texts(build_problems(9, 40, 0, 0), seed=9), vocab_size=400)
    assert other.get_vocab() != tok.get_vocab()
    with pytest.raises(TokenizerMismatchError, match=r"e\.g\. [\"']") as exc:
        check_same_tokenizer(tok, other)
    message = one_line_error(exc)
    assert "student" in message and "teacher" in message
    with pytest.raises(TokenizerMismatchError, match="rewriter"):
        check_same_tokenizer(tok, other, names=("student", "rewriter"))


def test_same_vocabulary_different_eos_refused(saved: Path, tok) -> None:
    other = load_tokenizer(saved)
    other.eos_token = "<|endoftext|>"
    assert other.get_vocab() == tok.get_vocab() and other.eos_token_id != tok.eos_token_id
    with pytest.raises(TokenizerMismatchError, match="eos") as exc:
        check_same_tokenizer(tok, other)
    one_line_error(exc)


def test_padded_model_vocab_is_fine(tok) -> None:
    """Configs padded past len(tokenizer) (and to different sizes) share the tokenizer."""
    student = build_tiny_model(tok, TINY)
    teacher = build_tiny_model(tok, TINY.model_copy(update={"hidden_size": 128}))
    assert student.config.vocab_size > len(tok)
    check_same_tokenizer(tok, tok)
    for m in (student, teacher):
        engine = HFEngine(m, tok)
        assert engine.vocab_limit == len(tok)
        (s,) = engine.score([[1, 5, 9]], [[7, 8]], top_k=10**6)
        assert s.topk_ids.shape == (2, len(tok))


# -- tiny models ----------------------------------------------------------------------------
def fake_tokenizer(size: int) -> SimpleNamespace:
    """Just what build_tiny_model reads: len() and the special ids."""

    class Tok(SimpleNamespace):
        def __len__(self) -> int:
            return size

    return Tok(bos_token_id=None, eos_token_id=2, pad_token_id=0)


@pytest.mark.parametrize(("size", "vocab"), [(670, 704), (128, 128), (129, 192), (1, 64)])
def test_tiny_vocab_rounded_to_64(size: int, vocab: int) -> None:
    m = build_tiny_model(fake_tokenizer(size), TINY)
    assert m.config.vocab_size == vocab and m.get_input_embeddings().weight.shape[0] == vocab


def test_tiny_head_dim_explicit(tok) -> None:
    m = build_tiny_model(tok, TINY)
    assert m.config.head_dim == 16  # hidden / heads, not Qwen3's default of 128
    attn = m.model.layers[0].self_attn
    assert attn.q_proj.out_features == 4 * 16 and attn.k_proj.out_features == 2 * 16
    wide = build_tiny_model(tok, TINY.model_copy(update={"head_dim": 32}))
    assert wide.model.layers[0].self_attn.q_proj.out_features == 4 * 32


def test_tiny_seed_and_global_rng(tok) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_model(tok, TINY, seed=5)
    assert torch.equal(torch.rand(3), expected)  # the caller's random stream is untouched
    b = build_tiny_model(tok, TINY, seed=5)
    c = build_tiny_model(tok, TINY, seed=6)
    pa, pb, pc = (next(iter(m.model.layers[0].parameters())) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert a.config.tie_word_embeddings and a.config.eos_token_id == tok.eos_token_id
