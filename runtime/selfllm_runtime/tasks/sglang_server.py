"""Task `sglang`: SGLang's OpenAI-compatible server (`python -m sglang.launch_server`: `/v1/chat/completions`,
`/v1/models`, `/health`), as upstream's SGLang tutorials start it.

The same code serves the GPU build (PyPI's `sglang` with its CUDA kernels `sglang-kernel`) and the CPU build (the
same `sglang` with SGLang's CPU kernels `sglang-kernel-cpu`, built in the recipe's CPU stack; used by smoke tests on
a machine without GPU). Which one is installed is read from the environment's distributions; the CPU build adds
`--device cpu` and SGLANG_USE_CPU_ENGINE=1 (SGLang's CPU platform), nothing else.

Settings (settings.SglangSettings): SERVED_MODEL_NAME (SGLang answers to one name: by default the short name
upstream's tutorials give it, e.g. Qwen3-8B, the last of model_source.served_names), MAX_MODEL_LEN
(`--context-length`), TENSOR_PARALLEL_SIZE / PIPELINE_PARALLEL_SIZE / ENABLE_EXPERT_PARALLEL (`--tp-size`,
`--pp-size`, `--ep-size` of the tensor-parallel size; default: the family's model.yaml `parallel:`; more cards than
this machine shows are refused before the download, engine_server.gpu_shortfall, as for vLLM), MEM_FRACTION_STATIC,
HOST, PORT, API_KEY (`--api-key`; never in the logged command line), CHAT_TEMPLATE (engine_server.served_chat_template,
as for vLLM), SGLANG_ARGS (extra arguments, shell-quoted, appended last so they win). The family's reasoning and
tool-call parsers are data in model.yaml (`reasoning.sglang_parser`, `tool_calls.sglang_parser` or
`sglang_tool_parser`: SGLang's names, which differ from vLLM's).
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..context import RecipeContext
from ..engine_server import (API_KEY_OPTION, ParallelOptions, announce, exec_server, gpu_shortfall,
                             served_chat_template, visible_gpus)
from ..model_source import served_names
from ..settings import SettingsError, SglangSettings

log = logging.getLogger("selfllm.sglang")

PACKAGE = "sglang"
CPU_KERNEL_PACKAGE = "sglang-kernel-cpu"  # SGLang's CPU kernels (sgl-kernel/pyproject_cpu.toml), in the CPU stack
SERVER_MODULE = "sglang.launch_server"
CPU_ENGINE_ENV = "SGLANG_USE_CPU_ENGINE"  # SGLang's CPU platform (sglang.srt.platforms), with --device cpu
# SGLang's server_args names each option twice: the short form is the one its docs use.
PARALLEL_OPTIONS = ParallelOptions(tensor=("--tp-size", "--tensor-parallel-size"),
                                   pipeline=("--pp-size", "--pipeline-parallel-size"))


@dataclass(frozen=True)
class SglangBuild:
    """The installed SGLang and where it runs: with its CUDA kernels (GPU) or SGLang's CPU kernels (CPU)."""

    version: str
    on_cpu: bool

    def __str__(self) -> str:
        return f"{PACKAGE} {self.version} on {'CPU' if self.on_cpu else 'GPU'}"


def installed_build() -> SglangBuild:
    try:
        version = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        raise RuntimeError("SGLang is not installed: install the recipe's lock "
                           "(python runtime/bin/selfllm-install recipes/<model>/sglang)") from None
    try:
        metadata.version(CPU_KERNEL_PACKAGE)
    except metadata.PackageNotFoundError:
        return SglangBuild(version, on_cpu=False)
    return SglangBuild(version, on_cpu=True)


def served_model_name(context: RecipeContext, settings: SglangSettings) -> str:
    """`--served-model-name` (SGLang takes one): SERVED_MODEL_NAME, else upstream's short name (`Qwen3-8B`), so that
    upstream's client code (`model="Qwen3-8B"`) works unchanged."""
    return served_names(context.recipe, context.family, settings, settings.served_model_name)[-1]


def build_argv(context: RecipeContext, model_dir: Path | str, build: SglangBuild, settings: SglangSettings,
               python: str = sys.executable, chat_template: Path | None = None) -> list[str]:
    """The full command line of the server (pure: no process, no import of sglang); chat_template: the file
    served_chat_template wrote (run() passes it), given to SGLang as `--chat-template`."""
    argv = [python, "-m", SERVER_MODULE,
            "--model-path", str(model_dir),
            "--served-model-name", served_model_name(context, settings),
            "--context-length", str(settings.max_model_len),
            "--host", settings.host,
            "--port", str(settings.port_for(context.recipe))]
    if settings.api_key:
        argv += [API_KEY_OPTION, settings.api_key]
    if settings.tensor_parallel_size > 1:  # SGLang's own parallelism: one scheduler process per card
        argv += ["--tp-size", str(settings.tensor_parallel_size)]
    if settings.pipeline_parallel_size > 1:
        argv += ["--pp-size", str(settings.pipeline_parallel_size)]
    if settings.expert_parallel:  # the experts spread over the tensor-parallel cards (upstream: --tp-size 8 --ep-size 8)
        argv += ["--ep-size", str(settings.tensor_parallel_size)]
    if settings.mem_fraction_static is not None:
        argv += ["--mem-fraction-static", str(settings.mem_fraction_static)]
    reasoning = context.family.reasoning
    if reasoning is not None and reasoning.sglang_parser:
        argv += ["--reasoning-parser", reasoning.sglang_parser]
    tool_parser = context.family.sglang_tool_call_parser
    if tool_parser:  # `tools` in requests, parsed into tool_calls
        argv += ["--tool-call-parser", tool_parser]
    if context.family.modalities.vision:  # SGLang serves some VL classes text-only unless asked (measured: Gemma-3)
        argv += ["--enable-multimodal"]
    if chat_template is not None:
        argv += ["--chat-template", str(chat_template)]
    if context.family.trust_remote_code:
        argv.append("--trust-remote-code")
    if build.on_cpu:
        argv += ["--device", "cpu"]
        if has_linear_attention(model_dir):
            # SGLang 0.5.21 picks the extra_buffer radix cache for hybrid linear-attention models without asking the
            # platform, then refuses it on CPU ("extra_buffer needs CUDA/MUSA/NPU/ROCm/XPU (FLA)", measured:
            # Qwen3.5); no_buffer is the CPU's, and it runs without the overlap schedule.
            argv += ["--mamba-radix-cache-strategy", "no_buffer", "--disable-overlap-schedule"]
    argv += settings.extra_argv
    return argv


def has_linear_attention(model_dir: Path | str) -> bool:
    """The checkpoint's config.json (its text_config for a composite one) has linear-attention layers (Qwen3.5's
    Gated DeltaNet: `layer_types`); False where there is no config.json to read."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return False
    config = json.loads(path.read_text(encoding="utf-8"))
    layer_types = (config.get("text_config") or config).get("layer_types") or []
    return "linear_attention" in layer_types


def before_download(context: RecipeContext, settings: SglangSettings) -> None:
    """`selfllm start`, before the model is fetched: the GPU build needs the cards its layout names (the CPU build
    runs its tensor-parallel ranks on CPU cores: nothing to count)."""
    if installed_build().on_cpu:
        return
    problem = gpu_shortfall(settings, PARALLEL_OPTIONS, visible_gpus())
    if problem is not None:
        raise SettingsError(problem)


def run(context: RecipeContext, model_dir: Path, settings: SglangSettings) -> None:
    build = installed_build()
    template_file, template = served_chat_template(context, model_dir, settings.chat_template)
    argv = build_argv(context, model_dir, build, settings, chat_template=template_file)
    announce(log, argv, build, model_dir, template)
    if build.on_cpu:
        os.environ[CPU_ENGINE_ENV] = "1"
        # SGLang torch.compile()s some ops (the vision towers' rotary embedding); on CPU, inductor needs a C++
        # compiler the image doesn't carry (measured: "InvalidCxxCompiler: No working C++ compiler found", glm4.1v
        # with an image): run them eagerly. An explicit TORCHDYNAMO_DISABLE=0 wins.
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    exec_server(argv)
