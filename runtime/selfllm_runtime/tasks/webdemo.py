"""Task `webdemo`: upstream's Streamlit chat page on port 6006 (health: `GET /_stcore/health`).

`run()` replaces this process with `streamlit run webdemo_app.py`; the page finds the recipe and
the model folder through the two variables below (set by run()) and loads the ChatEngine once per
process. Its settings (settings.WebdemoSettings) are resolved by `selfllm start` before the model is
fetched and again, from the same environment, by the page: HOST and PORT are where Streamlit listens; with
API_KEY set the page asks for that key (a password field, nothing else) before it shows the chat.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..access import warn_if_exposed
from ..chat_engine import GenerationParams
from ..context import RUNTIME_ROOT, RecipeContext
from ..settings import AccessSettings, WebdemoSettings

APP_FILE = Path(__file__).with_name("webdemo_app.py")
ENV_RECIPE_DIR = "RECIPE_DIR"  # the same variable load_context() reads
ENV_MODEL_DIR = "SELFLLM_MODEL_DIR"


@dataclass(frozen=True)
class Slider:
    label: str
    min_value: float
    max_value: float
    value: float
    step: float


MAX_LENGTH = Slider("max_length", 16, 8192, 2048, 16)
TEMPERATURE = Slider("temperature", 0.0, 2.0, 0.7, 0.05)
TOP_P = Slider("top_p", 0.05, 1.0, 0.8, 0.05)


def generation_params(context: RecipeContext, max_length: int, temperature: float, top_p: float,
                      thinking: bool | str | None) -> GenerationParams:
    """Sidebar values → GenerationParams; `thinking`: the family's switch (bool), its reasoning effort (str,
    gpt-oss), or None when it has neither."""
    template_kwargs: dict[str, Any] = {}
    if context.family.thinking is not None and isinstance(thinking, bool):
        template_kwargs[context.family.thinking.template_kwarg] = thinking
    if isinstance(thinking, str):
        template_kwargs.update(context.family.effort_kwargs(thinking))
    return GenerationParams(max_new_tokens=int(max_length), temperature=float(temperature), top_p=float(top_p),
                            template_kwargs=template_kwargs)


def streamlit_command(context: RecipeContext, settings: AccessSettings, app_file: Path = APP_FILE) -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(app_file),
            "--server.port", str(settings.port_for(context.recipe)), "--server.address", settings.host,
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--client.toolbarMode", "minimal"]


def streamlit_env(context: RecipeContext, model_dir: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env[ENV_RECIPE_DIR] = str(Path(context.recipe_dir).resolve())
    env[ENV_MODEL_DIR] = str(Path(model_dir).resolve())
    # the page imports selfllm_runtime; streamlit puts only the page's own folder on sys.path
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(RUNTIME_ROOT) not in paths:
        env["PYTHONPATH"] = os.pathsep.join([str(RUNTIME_ROOT), *paths])
    return env


def page_inputs() -> tuple[str, str]:
    """What run() hands the page: the recipe folder and the model folder."""
    return os.environ.get(ENV_RECIPE_DIR, ""), os.environ[ENV_MODEL_DIR]


def run(context: RecipeContext, model_dir: Path, settings: WebdemoSettings) -> None:
    command = streamlit_command(context, settings)
    warn_if_exposed(*settings.address(context.recipe), settings.api_key)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, streamlit_env(context, model_dir))
