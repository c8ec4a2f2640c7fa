"""What a Trainer-based run (lora, grpo) leaves for a user to look at, checked by the smoke checks of those tasks:
`<run>/curves.png` + `curves.json` (runtime finetune/curves.py) and the offline SwanLab log `<run>/swanlog`
(REPORT_TO=swanlab, the default). `run_files` runs inside the recipe's image (standard library only) and prints
what it found as a result line; `verify_run_files` judges it here against what training reported."""
from __future__ import annotations

import base64
import inspect
import io
from pathlib import Path

from .checks import RESULT_PREFIX, SmokeSession, expect


def run_files(run_dir: str, tag: str = "train/loss") -> dict:
    """curves.png (base64), curves.json, and the points [[step, value]] of SwanLab metric `tag` in the folder's
    newest SwanLab run (its database names the metric's log folder); read with the standard library only (this
    function's source runs inside the image, by run_files_step)."""
    import base64
    import glob
    import json
    import os
    import sqlite3

    with open(os.path.join(run_dir, "curves.png"), "rb") as png, open(os.path.join(run_dir, "curves.json")) as curves:
        found = {"action": "run_files", "run_dir": run_dir, "png": base64.b64encode(png.read()).decode(),
                 "curves": json.load(curves), "swanlab_tag": tag, "swanlab_points": None}
    swanlog = os.path.join(run_dir, "swanlog")
    if os.path.isfile(os.path.join(swanlog, "runs.swanlab")):
        database = sqlite3.connect(f"file:{os.path.join(swanlog, 'runs.swanlab')}?mode=ro", uri=True)
        row = database.execute("SELECT experiment.run_id, tag.folder FROM tag JOIN experiment ON tag.experiment_id = "
                               "experiment.id WHERE tag.name = ? ORDER BY experiment.id DESC", (tag,)).fetchone()
        database.close()
        points = []
        for log in sorted(glob.glob(os.path.join(swanlog, row[0], "logs", row[1], "*.log"))) if row else []:
            with open(log) as lines:
                points += [[record["index"], record["data"]] for record in map(json.loads, lines) if record]
        found["swanlab_points"] = sorted(points)
    return found


def run_files_step(run_dir: str, tag: str) -> str:
    """The shell step that prints run_files(run_dir, tag) as a result line, in the recipe's image."""
    source = inspect.getsource(run_files) + (f"\nprint({RESULT_PREFIX!r} + __import__('json').dumps("
                                             f"run_files({run_dir!r}, {tag!r})), flush=True)\n")
    encoded = base64.b64encode(source.encode()).decode()
    return f"python3 -c \"import base64; exec(base64.b64decode('{encoded}'))\""


def _same(points: list, values: list[float], steps: int) -> bool:
    return ([step for step, _ in points] == list(range(1, steps + 1))
            and all(abs(value - expected) < 1e-3 for (_, value), expected in zip(points, values)))


def verify_run_files(files: dict, steps: int, values: list[float], metric: str,
                     session: SmokeSession | None = None) -> str:
    """curves.png is a PNG with a panel per plotted metric, drawn for the `steps` trained, whose `metric` points are
    the `values` training reported; the SwanLab log holds the same values at every step. The picture is saved
    beside the container log (<recipe>.curves.png)."""
    from PIL import Image

    picture = base64.b64decode(files["png"])
    with Image.open(io.BytesIO(picture)) as image:
        expect(image.format == "PNG", f"curves.png is not a PNG ({image.format})")
        size = image.size
        image.verify()
    curves = files["curves"]
    metrics = curves["metrics"]
    expect(curves["last_step"] == steps and {metric, "learning_rate"} <= set(metrics),
           f"curves.png drawn for step {curves['last_step']} (trained {steps}) with {sorted(metrics)}")
    expect(_same(metrics[metric], values, steps),
           f"curves.png's {metric} {metrics[metric]} is not the {metric} training logged {values}")
    rows = -(-len(metrics) // 2)
    expect(size == ((1200 if len(metrics) > 1 else 600), 320 * rows),
           f"curves.png is {size[0]}×{size[1]} px for {len(metrics)} panels")
    tag, swanlab = files["swanlab_tag"], files["swanlab_points"]
    expect(swanlab is not None, f"no SwanLab log in {files['run_dir']}/swanlog (REPORT_TO=swanlab is the default)")
    expect(_same(swanlab, values, steps), f"the SwanLab log's {tag} {swanlab} is not the {metric} training logged {values}")
    saved = ""
    if session is not None and session.artifacts_dir is not None:
        folder = Path(session.artifacts_dir)
        folder.mkdir(parents=True, exist_ok=True)
        shot = folder / f"{session.recipe_key.replace('/', '-')}.curves.png"
        shot.write_bytes(picture)
        saved = f" ({shot.name})"
    return (f"curves.png {size[0]}×{size[1]} px, {len(picture) // 1024} KiB, {len(metrics)} curves over {steps} steps"
            f"{saved}; the offline SwanLab log holds {len(swanlab)} {metric} points")
