"""LoRA run settings: command-line flag, else environment variable, else the recipe's `env:`,
else the model family's `lora:` defaults (recipes/<model>/model.yaml) and upstream's tutorial values."""
from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from ..context import RecipeContext, SettingsError
from ..metadata import LoraDefaults
from .data import DEFAULT_DATA

DEFAULT_OUTPUT_ROOT = Path("/root/autodl-tmp/lora")
DEFAULT_DATA_DIR = Path("/root/autodl-tmp/data")


class LoraSettings(LoraDefaults):
    """The family's LoRA fields (r, alpha, dropout, target_modules) plus this run's."""

    data: list[Path] = Field(default_factory=list, description="training files; empty: data_url, else DEFAULT_DATA")
    data_url: str | None = Field(None, description="http(s) URL fetched into data_dir when data is empty")
    data_dir: Path = DEFAULT_DATA_DIR
    output_root: Path = DEFAULT_OUTPUT_ROOT
    run_name: str | None = None
    epochs: float = Field(3, gt=0)
    max_steps: int = -1
    learning_rate: float = Field(1e-4, gt=0)
    batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(4, gt=0)
    max_length: int = Field(1024, gt=8)
    logging_steps: int = Field(10, gt=0)
    save_steps: int = Field(100, gt=0)
    report_to: Literal["none", "tensorboard", "swanlab"] = "none"
    system_prompt: str | None = None
    enable_thinking: bool = False
    seed: int = 42
    gradient_checkpointing: bool = True
    max_samples: int | None = Field(None, gt=0)

    def run_dir(self, model_dir: Path) -> Path:
        return self.output_root / (self.run_name or default_run_name(model_dir, self.data, self.data_url))


def default_run_name(model_dir: Path, data: list[Path], data_url: str | None) -> str:
    source = Path(data[0]).stem if data else Path(data_url).stem if data_url else DEFAULT_DATA.stem
    return re.sub(r"[^\w.-]+", "-", f"{Path(model_dir).name}-{source}").strip("-")


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {value!r}")


def _list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


# field: (environment variable, parser of its text, command-line flag)
OPTIONS: dict[str, tuple[str, Any, str]] = {
    "data": ("DATA_PATH", lambda v: [Path(p) for p in _list(v)], "--data"),
    "data_url": ("DATA_URL", str, "--data-url"),
    "data_dir": ("DATA_DIR", Path, "--data-dir"),
    "output_root": ("OUTPUT_DIR", Path, "--output-dir"),
    "run_name": ("RUN_NAME", str, "--run-name"),
    "epochs": ("NUM_EPOCHS", float, "--epochs"),
    "max_steps": ("MAX_STEPS", int, "--max-steps"),
    "learning_rate": ("LEARNING_RATE", float, "--learning-rate"),
    "batch_size": ("BATCH_SIZE", int, "--batch-size"),
    "grad_accum": ("GRAD_ACCUM", int, "--grad-accum"),
    "max_length": ("MAX_LENGTH", int, "--max-length"),
    "logging_steps": ("LOGGING_STEPS", int, "--logging-steps"),
    "save_steps": ("SAVE_STEPS", int, "--save-steps"),
    "r": ("LORA_R", int, "--lora-r"),
    "alpha": ("LORA_ALPHA", int, "--lora-alpha"),
    "dropout": ("LORA_DROPOUT", float, "--lora-dropout"),
    "target_modules": ("LORA_TARGET_MODULES", _list, "--target-modules"),
    "report_to": ("REPORT_TO", str, "--report-to"),
    "system_prompt": ("SYSTEM_PROMPT", str, "--system"),
    "enable_thinking": ("ENABLE_THINKING", _bool, "--enable-thinking"),
    "seed": ("SEED", int, "--seed"),
    "gradient_checkpointing": ("GRADIENT_CHECKPOINTING", _bool, "--gradient-checkpointing"),
    "max_samples": ("MAX_SAMPLES", int, "--max-samples"),
}
# The recipe's SYSTEM_PROMPT belongs to its default data (upstream's huanhuan.json, shipped with the
# runtime), so it applies only when neither DATA_PATH / --data nor DATA_URL / --data-url is given.
DATA_BOUND = {"system_prompt"}


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    for field, (env, parse, flag) in OPTIONS.items():
        kwargs: dict[str, Any] = {"dest": field, "default": None, "metavar": env,
                                  "help": f"(env {env})"}
        if parse is _bool:
            kwargs.update(type=_bool, nargs="?", const=True)
        elif field == "report_to":
            kwargs.update(choices=["none", "tensorboard", "swanlab"])
        parser.add_argument(flag, **kwargs)


def resolve_settings(context: RecipeContext, cli: Mapping[str, Any] | None = None,
                     env: Mapping[str, str] | None = None) -> LoraSettings:
    import os

    cli = dict(cli or {})
    env = dict(os.environ if env is None else env)
    lora = context.family.lora
    values: dict[str, Any] = {"target_modules": list(lora.target_modules), "r": lora.r, "alpha": lora.alpha,
                              "dropout": lora.dropout}
    user_data = any(cli.get(field) is not None for field in ("data", "data_url")) or any(
        env.get(name) for name in ("DATA_PATH", "DATA_URL"))
    for field, (name, parse, flag) in OPTIONS.items():
        if cli.get(field) is not None:
            value = cli[field]
            values[field] = parse(value) if isinstance(value, str) and parse is not str else value
            continue
        text = env.get(name)
        if text is None and not (field in DATA_BOUND and user_data):
            text = context.recipe.env.get(name)
        if text is None:
            continue
        try:
            values[field] = parse(text)
        except ValueError as exc:
            raise SettingsError(f"{name}={text!r}: {exc}") from None
    if values.get("system_prompt") == "":
        values["system_prompt"] = None
    return LoraSettings.model_validate(values)
