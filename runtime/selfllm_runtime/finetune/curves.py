"""Training curves as a plain PNG in the run folder, for a user without a dashboard.

`CurvesCallback` records every numeric value a transformers Trainer logs (LoRA: loss, learning rate, grad norm;
TRL's GRPO: reward, kl, completion length, ...) with its step, adds tokens/s where the Trainer counts input
tokens, and draws one panel per metric into `<run>/curves.png` (matplotlib's Agg backend, no display) at each
checkpoint and at the end. `<run>/curves.json` holds the plotted points. No metric is named in code: any
Trainer-based task gets its own curves from the same callback.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from transformers import TrainerCallback

CURVES_PNG = "curves.png"
CURVES_JSON = "curves.json"
# Counters and end-of-training summaries the Trainer logs: not curves (each is one number or only grows).
NOT_CURVES = frozenset({"epoch", "step", "num_input_tokens_seen", "total_flos", "train_runtime", "train_loss",
                        "train_samples_per_second", "train_steps_per_second"})
# panel order; other metrics follow by name. train_tokens_per_second: the Trainer's tokens/s since the start
# (logged with include_num_input_tokens_seen)
FIRST = ("loss", "learning_rate", "grad_norm", "train_tokens_per_second")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass
class MetricHistory:
    """Every numeric metric as [(step, value)], in the order logged; the last step training reached."""

    points: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    last_step: int = 0

    def record(self, step: int, logs: Mapping[str, Any]) -> None:
        self.last_step = max(self.last_step, int(step))
        for name, raw in logs.items():
            value = _number(raw)
            if value is None or name in NOT_CURVES:
                continue
            series = self.points.setdefault(name, [])
            if series and series[-1][0] == step:  # one value per step: a metric logged twice keeps the last
                series[-1] = (int(step), value)
            else:
                series.append((int(step), value))

    def ordered(self) -> list[str]:
        return ([name for name in FIRST if name in self.points]
                + sorted(name for name in self.points if name not in FIRST))

    def to_json(self, title: str) -> dict[str, Any]:
        return {"title": title, "last_step": self.last_step, "png": CURVES_PNG,
                "metrics": {name: [[step, value] for step, value in self.points[name]] for name in self.ordered()}}


def plot(history: MetricHistory, png: Path, title: str) -> Path:
    """One line chart per metric (value over step), two per row, into png; a run with no metric yet gets a
    single empty panel saying so."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    names = history.ordered()
    columns = 2 if len(names) > 1 else 1
    rows = max(1, math.ceil(len(names) / columns))
    figure = Figure(figsize=(6 * columns, 3.2 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, name in zip(axes, names):
        steps, values = zip(*history.points[name])
        axis.plot(steps, values, marker="." if len(steps) < 50 else None, linewidth=1.4)
        axis.set_title(name.replace("_", " "))
        axis.set_xlabel("step")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
    for axis in axes[len(names):]:
        axis.set_axis_off()
    if not names:
        axes[0].text(0.5, 0.5, "no metrics logged yet", ha="center", va="center")
    figure.suptitle(f"{title} — {history.last_step} steps")
    png.parent.mkdir(parents=True, exist_ok=True)
    partial = png.with_name(png.name + ".partial")
    figure.savefig(partial, format="png")
    partial.replace(png)  # a reader never sees half a picture
    return png


class CurvesCallback(TrainerCallback):
    """Records what the Trainer logs (main process only); writes curves.json at every log and curves.png at
    each checkpoint and at the end of training. A resumed run starts from the checkpoint's log history."""

    def __init__(self, run_dir: Path, title: str):
        self.run_dir = Path(run_dir)
        self.title = title
        self.history = MetricHistory()
        self._seeded = False

    @property
    def png(self) -> Path:
        return self.run_dir / CURVES_PNG

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if not self._seeded:  # a resumed run: the checkpoint's earlier logs (the last entry is this one)
            self._seeded = True
            for entry in state.log_history[:-1]:
                self.history.record(int(entry.get("step", 0)), entry)
        self.history.record(state.global_step, logs)
        self.write_json()

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.draw()

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.history.last_step = max(self.history.last_step, int(state.global_step))
            self.draw()

    def write_json(self) -> Path:
        path = self.run_dir / CURVES_JSON
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.history.to_json(self.title), ensure_ascii=False), encoding="utf-8")
        return path

    def draw(self) -> Path:
        self.write_json()
        return plot(self.history, self.png, self.title)
