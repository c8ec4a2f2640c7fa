"""What the task kinds that exec an inference engine's own OpenAI-compatible server share (vLLM: tasks/vllm_server.py,
SGLang: tasks/sglang_server.py): the chat-template file they pass as `--chat-template`, reading options back from an
argv (extra arguments come last and win), the refusal of a parallel layout needing more GPUs than are visible, hiding
the API key in the logged command line, and exec-ing the server."""
from __future__ import annotations

import hashlib
import logging
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .access import warn_if_exposed
from .chat_template import ChatTemplate, choose_chat_template
from .context import RecipeContext
from .settings import EngineServerSettings
from .system_role import with_system_role

log = logging.getLogger("selfllm.engine")

API_KEY_OPTION = "--api-key"  # vLLM's and SGLang's alike: they then want `Authorization: Bearer <key>` on /v1/*
REDACTED = "<API_KEY>"


def served_chat_template(context: RecipeContext, model_dir: Path | str, setting: str = "auto",
                         directory: Path | None = None) -> tuple[Path | None, ChatTemplate]:
    """(file to pass as `--chat-template`, the template CHAT_TEMPLATE picks). No file where the engine serves the
    checkpoint's own template as it is (system_role native); else the chosen template (behind the family's
    system-role prelude), written under `directory` (default: the temp folder), named by its content."""
    chosen = choose_chat_template(context, model_dir, setting)
    policy = context.family.system_role
    if chosen.source == "checkpoint" and policy == "native":
        return None, chosen
    text = with_system_role(chosen.text, policy)
    folder = Path(directory) if directory is not None else Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"selfllm-chat-template-{hashlib.sha256(text.encode()).hexdigest()[:16]}.jinja"
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)
    return path, chosen


def option_values(argv: list[str], name: str) -> list[str]:
    """Every value given to option `name` (`name V`, `name V1 V2` for list options, `name=V`), in order."""
    values: list[str] = []
    taking = False
    for arg in argv:
        if arg == name:
            taking = True
        elif arg.startswith(name + "="):
            values.append(arg.split("=", 1)[1])
            taking = False
        elif taking and not arg.startswith("-"):
            values.append(arg)
        else:
            taking = False
    return values


@dataclass(frozen=True)
class ParallelOptions:
    """An engine's own names of its tensor- and pipeline-parallel options (in VLLM_ARGS / SGLANG_ARGS they win)."""

    tensor: tuple[str, ...]
    pipeline: tuple[str, ...]


def parallel_sizes(settings: EngineServerSettings, options: ParallelOptions) -> tuple[int, int]:
    """(tensor, pipeline) parallel sizes the server will get: the settings, unless the extra arguments give the
    engine's own options (they come last, so they win)."""
    sizes = [settings.tensor_parallel_size, settings.pipeline_parallel_size]
    for index, names in enumerate((options.tensor, options.pipeline)):
        given = [value for name in names for value in option_values(settings.extra_argv, name)]
        if given and given[-1].isdigit():
            sizes[index] = int(given[-1])
    return sizes[0], sizes[1]


def gpu_shortfall(settings: EngineServerSettings, options: ParallelOptions, visible: int,
                  other_machines: bool = False) -> str | None:
    """The one line that refuses a layout needing more GPUs than `visible` (None: it fits). other_machines: the
    pipeline stages beyond the first may run on other machines (vLLM on a Ray cluster): then only the
    tensor-parallel cards must be here."""
    tensor, pipeline = parallel_sizes(settings, options)
    if tensor * pipeline <= visible or (pipeline > 1 and other_machines and tensor <= visible):
        return None
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f"CUDA_VISIBLE_DEVICES={shown}" if shown is not None else "torch.cuda.device_count()"
    return (f"TENSOR_PARALLEL_SIZE={tensor} × PIPELINE_PARALLEL_SIZE={pipeline} needs {tensor * pipeline} GPUs, but "
            f"{visible} {'is' if visible == 1 else 'are'} visible ({where}): give the container the cards "
            f"(docker run --gpus all), or set TENSOR_PARALLEL_SIZE lower knowingly (the weights must still fit)")


def visible_gpus() -> int:
    import torch  # every engine build brings it; the count respects CUDA_VISIBLE_DEVICES

    return torch.cuda.device_count()


def redacted(argv: list[str]) -> list[str]:
    """argv with every --api-key value replaced, for logging."""
    shown: list[str] = []
    taking = False
    for arg in argv:
        if arg.startswith(API_KEY_OPTION + "="):
            shown.append(f"{API_KEY_OPTION}={REDACTED}")
            taking = False
        elif taking and not arg.startswith("-"):
            shown.append(REDACTED)
        else:
            shown.append(arg)
            taking = arg == API_KEY_OPTION
    return shown


def announce(logger: logging.Logger, argv: list[str], build: object, model_dir: Path | str,
             template: ChatTemplate) -> None:
    """Warn where the server would be open without an API key, and log the build that serves (the smoke tests read
    that line to name the build that really served: never assume the GPU one), its address and its names; the
    address and names as the argv gives them last (the user's extra arguments win)."""
    host, port = option_values(argv, "--host")[-1], option_values(argv, "--port")[-1]
    warn_if_exposed(host, port, "set" if option_values(argv, API_KEY_OPTION) else "")
    logger.info("selfllm: serving with %s", build)
    logger.info("selfllm: %s on %s:%s as %s; chat template: %s", model_dir, host, port,
                ", ".join(option_values(argv, "--served-model-name")), template.describe())


def exec_server(argv: list[str]) -> None:
    """Replace this process by the server (its logged command line without the API key)."""
    log.info("exec %s", shlex.join(redacted(argv)))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
