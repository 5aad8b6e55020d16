"""Loading models and tokenizers from disk, the same way for tiny and real models.

``builtin:tiny-student`` and ``builtin:tiny-teacher`` resolve to directories the
bootstrap wrote; anything else is a path to a Hugging Face causal-LM directory
(a downloaded Qwen3 checkpoint, a round's student, or a LoRA adapter whose
``adapter_config.json`` names its base). Nothing here reaches a hub: every call
passes ``local_files_only=True``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

BUILTIN_PREFIX = "builtin:"


class ModelLoadError(ValueError):
    """A model or tokenizer path that cannot be used; the message says why."""


class TokenizerMismatchError(ValueError):
    """Student and teacher tokenize differently, so token-level KL is meaningless."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device: cuda was asked for but no GPU is visible")
    return torch.device(device)


def _check_dir(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"model path does not exist: {path}")
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise ModelLoadError(
            f"{path} is not a Hugging Face model directory (no config.json or adapter_config.json)"
        )


def load_model(path: Path | str, *, dtype: str = "float32", device: str = "auto"):
    """A causal LM in eval mode; LoRA adapter directories load onto their base."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    _check_dir(path)
    torch_dtype = getattr(torch, dtype)
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        from peft import PeftModel

        base_path = Path(json.loads(adapter.read_text())["base_model_name_or_path"])
        if not base_path.is_absolute():
            base_path = (path / base_path).resolve()
        base = load_model(base_path, dtype=dtype, device=device)
        return PeftModel.from_pretrained(base, str(path), is_trainable=False).eval()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch_dtype, local_files_only=True
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model from {path}: {str(exc).splitlines()[0]}") from None
    return model.to(resolve_device(device)).eval()


def load_tokenizer(path: Path | str):
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"tokenizer path does not exist: {path}")
    adapter = path / "adapter_config.json"
    if adapter.is_file() and not (path / "tokenizer_config.json").is_file():
        path = Path(json.loads(adapter.read_text())["base_model_name_or_path"])
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load tokenizer from {path}: {str(exc).splitlines()[0]}"
        ) from None


def check_same_tokenizer(
    student, teacher, *, names: tuple[str, str] = ("student", "teacher")
) -> None:
    """Refuse two tokenizers that map any token to a different id.

    Differing model ``vocab_size`` (padding rows for GPU-friendly shapes) is
    fine and handled by slicing logits to ``len(tokenizer)``; differing
    vocabularies are not.
    """
    a, b = student.get_vocab(), teacher.get_vocab()
    if a == b:
        if student.eos_token_id != teacher.eos_token_id:
            raise TokenizerMismatchError(
                f"{names[0]} and {names[1]} tokenizers agree on the vocabulary but end turns "
                f"differently (eos ids {student.eos_token_id} vs {teacher.eos_token_id})"
            )
        return
    only_a = sorted(set(a) - set(b))
    moved = sorted(t for t in set(a) & set(b) if a[t] != b[t])
    detail = (
        f"{len(only_a)} token(s) only in the {names[0]}'s (e.g. {only_a[0]!r})"
        if only_a
        else f"{len(moved)} token(s) with different ids (e.g. {moved[0]!r})"
        if moved
        else f"{len(set(b) - set(a))} token(s) only in the {names[1]}'s"
    )
    raise TokenizerMismatchError(
        f"{names[0]} and {names[1]} use different tokenizers ({len(a)} vs {len(b)} tokens; "
        f"{detail}); token-level distillation needs the same tokenizer"
    )
