"""A GGUF file (llama.cpp's format) as a normal checkpoint folder: config.json, generation_config.json,
model.safetensors and the tokenizer files, loadable by `from_pretrained(folder)` like any hub download.

  selfllm convert-gguf IN.gguf OUT_DIR [--dtype float32|bfloat16|float16]

transformers reads a GGUF file (`from_pretrained(folder, gguf_file=name)`) and dequantizes its weights,
but refuses to `save_pretrained` the model it loaded that way (it counts as quantized). So the model is
rebuilt from the file's config and the dequantized weights are copied into it; the tokenizer (with the
file's chat template and special tokens) and the generation config (its end token) come from the file too.

Nothing half-written is left at OUT_DIR: the folder is written beside it under a temporary name and
renamed into place at the end; a file that can't be converted raises GGUFConversionError, one line that
names the file (the CLI prints it and exits 2). Needs the `gguf` package (`pip install gguf`), which
transformers uses to read the file.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .model_source import file_sha256

GGUF_MAGIC = b"GGUF"
SOURCE_FILE = "selfllm-gguf.json"  # what the folder was converted from: file name, sha256, dtype
DType = Literal["float32", "bfloat16", "float16"]


class GGUFConversionError(ValueError):
    """One line naming the file and why it can't be converted."""


@dataclass(frozen=True)
class ConvertedCheckpoint:
    folder: Path
    architecture: str
    parameters: int
    sha256: str


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise GGUFConversionError(f"{path}: no such file")
    with open(path, "rb") as stream:
        if stream.read(4) != GGUF_MAGIC:
            raise GGUFConversionError(f"{path}: not a GGUF file (it does not start with {GGUF_MAGIC.decode()!r})")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def convert_gguf(gguf: Path | str, out_dir: Path | str, dtype: DType = "float32") -> ConvertedCheckpoint:
    """Write the checkpoint of `gguf` to `out_dir` (which must not exist yet, or be empty). `dtype`: the
    saved weights' type; float32 keeps the dequantized values exactly."""
    gguf, out_dir = Path(gguf).resolve(), Path(out_dir)
    _check_gguf(gguf)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise GGUFConversionError(f"{gguf}: the output folder {out_dir} already exists and is not empty")
    try:
        import gguf as _gguf  # noqa: F401 - transformers reads GGUF files with it
    except ImportError:
        raise GGUFConversionError(f"{gguf}: reading GGUF files needs the gguf package (pip install gguf)") from None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        converted = _write(gguf, staging, dtype)
        _readable(staging)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        staging.rename(out_dir)
    except GGUFConversionError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    except Exception as exc:  # noqa: BLE001 - transformers/gguf raise many kinds for a file they can't read
        shutil.rmtree(staging, ignore_errors=True)
        raise GGUFConversionError(f"{gguf}: cannot convert: {type(exc).__name__}: {_one_line(exc)}") from exc
    return ConvertedCheckpoint(out_dir, converted.architecture, converted.parameters, converted.sha256)


def _readable(folder: Path) -> None:
    """The modes a plain mkdir / open would have given (mkdtemp and safetensors make them owner-only), so the
    folder can be mounted into a container that runs as another user."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _write(gguf: Path, folder: Path, dtype: DType) -> ConvertedCheckpoint:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    where, name = str(gguf.parent), gguf.name
    config = AutoConfig.from_pretrained(where, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: the same architecture, built from the config, takes its weights.
    config.dtype = torch_dtype
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise GGUFConversionError(f"{gguf}: the file's weights do not fit {type(model).__name__} "
                                  f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    sha256 = file_sha256(gguf)
    architecture = type(model).__name__
    parameters = sum(p.numel() for p in model.parameters())
    (folder / SOURCE_FILE).write_text(json.dumps(
        {"gguf": gguf.name, "sha256": sha256, "dtype": dtype, "architecture": architecture,
         "parameters": parameters}, indent=2) + "\n", encoding="utf-8")
    return ConvertedCheckpoint(folder, architecture, parameters, sha256)
