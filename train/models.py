"""Loading models and tokenizers from disk, the same way for tiny and real models.

``builtin:tiny-student`` and ``builtin:tiny-teacher`` resolve to directories the
bootstrap wrote; anything else is a path to a Hugging Face causal-LM directory
(a downloaded Qwen3 checkpoint, a round's student, or a LoRA adapter whose
``adapter_config.json`` names its base). Nothing here reaches a hub: every call
passes ``local_files_only=True``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError

from data.errors import UserError, is_out_of_memory
from data.memory import naming_memory

BUILTIN_PREFIX = "builtin:"


class ModelLoadError(UserError):
    """A model or tokenizer path that cannot be used; the message says why."""


class TokenizerMismatchError(UserError):
    """Student and teacher tokenize differently, so token-level KL is meaningless."""


def resolve_device(device: str) -> torch.device:
    """``auto`` means cuda when a GPU is visible; asking for cuda without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ModelLoadError(
            f"device: {device!r} is not a torch device (auto, cpu, cuda, cuda:N)"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device: {device} was asked for but no GPU is visible")
    return dev


def _resolve_dtype(dtype: str) -> torch.dtype:
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise ModelLoadError(f"dtype: {dtype!r} is not a torch dtype (float32, bfloat16, float16)")
    return value


def _local_path(path: Path | str, what: str) -> Path:
    """The directory behind ``path``; ``builtin:`` names are resolved by the bootstrap."""
    if str(path).startswith(BUILTIN_PREFIX):
        raise ModelLoadError(
            f"{what} {path!s} is a built-in name: resolve it to the directory the bootstrap "
            "wrote before loading"
        )
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{what} path does not exist: {path}")
    return path


def _check_dir(path: Path) -> None:
    if not path.is_dir():
        raise ModelLoadError(f"{path} is not a directory (expected a Hugging Face model directory)")
    if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        raise ModelLoadError(
            f"{path} is not a Hugging Face model directory (no config.json or adapter_config.json)"
        )


def adapter_base(adapter_dir: Path) -> Path:
    """The base model directory a LoRA adapter names in its ``adapter_config.json``.

    A relative base is tried against the adapter's own directory first (so a
    workspace that holds base and adapter side by side can move), then against
    the current directory (what peft writes when the base was loaded by a
    relative path). Hub names are refused: nothing here downloads.
    """
    config = adapter_dir / "adapter_config.json"
    try:
        base = json.loads(config.read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(
            f"{config}: cannot read base_model_name_or_path ({type(exc).__name__}: {exc})"
        ) from None
    if not base:
        raise ModelLoadError(f"{config} names no base model (base_model_name_or_path is empty)")
    base_path = Path(base)
    candidates = [base_path] if base_path.is_absolute() else [adapter_dir / base_path, base_path]
    for candidate in candidates:
        if candidate.exists():
            return candidate.resolve()
    raise ModelLoadError(
        f"the base model of adapter {adapter_dir} ({base}) is not a local directory; "
        "download it and point base_model_name_or_path at it"
    )


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


# How the libraries say that a directory the user gave cannot be used (seen with transformers 5,
# peft 0.18, safetensors 0.7): a file missing or unreadable, config.json not JSON (OSError); an
# unknown architecture, an adapter whose target modules the base lacks (ValueError); weights
# that are not safetensors (SafetensorError). An adapter_config.json adds an unknown peft_type
# (KeyError) and a field of the wrong type (TypeError: peft compares it).
BAD_MODEL = (OSError, ValueError, SafetensorError)
BAD_ADAPTER = (*BAD_MODEL, KeyError, TypeError)
# Weights whose shapes disagree with the config are a RuntimeError, told apart by its words:
# transformers' "You set `ignore_mismatched_sizes` to `False`, thus raising an error", peft's
# "Error(s) in loading state_dict for PeftModel" (an adapter trained on another base).
SHAPE_MISMATCH = ("ignore_mismatched_sizes", "Error(s) in loading state_dict", "size mismatch")


def _mismatch_detail(exc: BaseException) -> str:
    """The first tensor named in a shape mismatch (peft lists them; transformers logs its own
    report before raising, and says only "look at the above report")."""
    for line in str(exc).splitlines():
        if "size mismatch" in line:
            return f" ({line.strip()[:200]})"
    return " (the log shows each tensor)"


@contextlib.contextmanager
def _loading(what: str, path: Path, dtype: str, device: object, bad: tuple) -> Iterator[None]:
    """Errors while loading, by meaning: a directory that cannot be used is the user's
    (:class:`ModelLoadError`); an allocation that failed is the machine's (one line naming the
    model, its dtype and the device, not retried: ``data.memory``); anything else is a bug and
    keeps its traceback."""
    with naming_memory(f"loading {what} {path} ({dtype})", device):
        try:
            yield
        except (*bad, RuntimeError) as exc:
            if is_out_of_memory(exc):
                raise  # named by naming_memory, around
            if isinstance(exc, RuntimeError) and not isinstance(exc, bad):
                if not any(text in str(exc) for text in SHAPE_MISMATCH):
                    raise  # a bug
                raise ModelLoadError(
                    f"cannot load {what} from {path}: its weights' shapes do not match its "
                    f"config{_mismatch_detail(exc)}"
                ) from None
            raise ModelLoadError(f"cannot load {what} from {path}: {_first_line(exc)}") from None


def load_model(path: Path | str, *, dtype: str = "float32", device: str = "auto"):
    """A causal LM in eval mode; LoRA adapter directories load onto their base.

    Device and dtype are checked before anything is read, so a bad setting
    fails at once with one line, not after loading weights.
    """
    from transformers import AutoModelForCausalLM

    target = resolve_device(device)
    torch_dtype = _resolve_dtype(dtype)
    path = _local_path(path, "model")
    _check_dir(path)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base = load_model(adapter_base(path), dtype=dtype, device=device)
        with _loading("adapter", path, dtype, target, BAD_ADAPTER):
            model = PeftModel.from_pretrained(base, str(path), is_trainable=False)
            return model.to(target).eval()
    with _loading("model", path, dtype, target, BAD_MODEL):
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch_dtype, local_files_only=True
        )
        return model.to(target).eval()  # a GPU too small fails here, as memory


def load_tokenizer(path: Path | str):
    """The tokenizer saved with a model; an adapter without one uses its base's."""
    from transformers import AutoTokenizer

    path = _local_path(path, "tokenizer")
    if (path / "adapter_config.json").is_file() and not (path / "tokenizer_config.json").is_file():
        path = adapter_base(path)
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:  # no tokenizer files, a JSON that is not one
        raise ModelLoadError(f"cannot load tokenizer from {path}: {_first_line(exc)}") from None
    except Exception as exc:  # boundary: the tokenizers binding (Rust) raises a bare Exception
        if type(exc) is not Exception:  # for a tokenizer.json it cannot parse; only that type
            raise  # is the user's file, anything else a bug
        raise ModelLoadError(f"cannot load tokenizer from {path}: {_first_line(exc)}") from None


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
