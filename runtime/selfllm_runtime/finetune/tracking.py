"""How a Trainer-based run is tracked: one call for every training task kind (LoRA, GRPO, ...).

`tracking_for(settings, run_dir, project)` gives the Trainer's `report_to` list and the callbacks to add:
- REPORT_TO=swanlab (default): SwanLab's own transformers callback (`swanlab.integration.transformers`, as
  upstream's tutorials use it; transformers' `report_to="swanlab"` integration calls an API swanlab 0.10 changed),
  its log in `<run>/swanlog`. SWANLAB_MODE=local (default) writes local files only: no login, no network;
  `selfllm lora dashboard` serves them. cloud uploads with SWANLAB_API_KEY (settings refuse cloud without one
  before any download); offline keeps them for a later `swanlab sync`. The SwanLab run is finished at the end of
  training, so a second run in the same process gets its own.
- REPORT_TO=tensorboard: event files in `<run>/runs`.
- always: `<run>/curves.png` + `<run>/curves.json` (curves.py).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, NamedTuple

from ..settings import TrackingSettings

SWANLOG = "swanlog"  # <run>/swanlog: SwanLab's local log folder (what `swanlab watch` / the dashboard reads)
TENSORBOARD_RUNS = "runs"


def swanlog_dir(run_dir: Path) -> Path:
    return Path(run_dir) / SWANLOG


def _need(report_to: str, package: str, *or_instead: str) -> None:
    if all(importlib.util.find_spec(name) is None for name in (package, *or_instead)):
        raise ValueError(f"REPORT_TO={report_to} needs the {package} package (not in this image): pip install "
                         f"{package}, or set REPORT_TO=none")


class Tracking(NamedTuple):
    report_to: list[str]  # TrainingArguments.report_to
    callbacks: list[Any]  # TrainerCallbacks to add


def tracking_for(settings: TrackingSettings, run_dir: Path, project: str) -> Tracking:
    """(report_to for TrainingArguments, callbacks for the Trainer) of a run writing into run_dir; project: the
    SwanLab project (e.g. selfllm-lora). SwanLab comes as callbacks (report_to stays empty for it)."""
    from .curves import CurvesCallback

    run_dir = Path(run_dir)
    callbacks: list[Any] = [CurvesCallback(run_dir, title=f"{project} · {run_dir.name}")]
    if settings.report_to == "tensorboard":
        _need("tensorboard", "tensorboard", "tensorboardX")
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / TENSORBOARD_RUNS)
        return Tracking(["tensorboard"], callbacks)
    if settings.report_to == "none":
        return Tracking([], callbacks)
    _need("swanlab", "swanlab")
    if settings.swanlab_mode == "local":
        _need("swanlab", "swanboard")  # SwanLab's local mode writes through swanboard's database
    # cloud: swanlab logs in with SWANLAB_API_KEY, read from the environment by itself (settings only checked it
    # is there; the key is never written into the run folder)
    from swanlab.integration.transformers import SwanLabCallback

    swanlab = SwanLabCallback(project=project, experiment_name=run_dir.name, log_dir=str(swanlog_dir(run_dir)),
                              mode=settings.swanlab_mode)  # swanlab reads cloud as online
    return Tracking([], callbacks + [swanlab, _swanlab_finisher()])


def _swanlab_finisher() -> Any:
    from transformers import TrainerCallback

    class FinishSwanLabRun(TrainerCallback):
        """Ends the SwanLab run after the Trainer's last log (the integration leaves it open)."""

        def on_train_end(self, args, state, control, **kwargs):
            import swanlab

            if state.is_world_process_zero and swanlab.has_run():
                swanlab.finish()

    return FinishSwanLabRun()
