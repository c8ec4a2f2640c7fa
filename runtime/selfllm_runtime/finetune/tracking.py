"""Experiment tracking of every Trainer-based task (lora, grpo): the one place that says what a run reports to
and with which callbacks, so a change here (a tracker, a curves picture) applies to every such task."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Tracking:
    report_to: list[str]  # TrainingArguments.report_to
    callbacks: list[Any] = field(default_factory=list)  # TrainerCallbacks to add


def tracking(settings: Any, run_dir: Path, project: str = "selfllm-lora") -> Tracking:
    """REPORT_TO (settings.report_to) as TrainingArguments.report_to and callbacks; project: SwanLab's."""
    if settings.report_to == "none":
        return Tracking([])
    if settings.report_to == "tensorboard":
        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            raise ValueError("REPORT_TO=tensorboard needs the tensorboard package: pip install tensorboard")
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(run_dir / "runs"))
        return Tracking(["tensorboard"])
    if importlib.util.find_spec("swanlab") is None:
        raise ValueError("REPORT_TO=swanlab needs the swanlab package (not in the image): pip install swanlab")
    os.environ.setdefault("SWANLAB_MODE", "local")  # offline; SWANLAB_MODE=cloud with SWANLAB_API_KEY to upload
    os.environ.setdefault("SWANLAB_LOG_DIR", str(run_dir / "swanlog"))
    os.environ.setdefault("SWANLAB_PROJECT", project)
    return Tracking(["swanlab"])
