"""Run tracking for Trainer-based tasks (finetune/tracking.py, curves.py, dashboard.py): the curves PNG from
whatever a Trainer logs (LoRA's loss and learning rate, GRPO's reward and kl alike), REPORT_TO / SWANLAB_MODE,
and the SwanLab dashboard command's checks. Training end to end with SwanLab: tests/test_lora.py."""
from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest
from PIL import Image

from selfllm_runtime.finetune.curves import CURVES_JSON, CURVES_PNG, CurvesCallback, MetricHistory, plot
from selfllm_runtime.finetune.dashboard import exposure_line, find_swanlog, watch_argv
from selfllm_runtime.finetune.tracking import swanlog_dir, tracking_for
from selfllm_runtime.settings import LoraSettings, SettingsError, TrackingSettings

LORA = {"target_modules": ["q_proj"]}
# What TRL's GRPOTrainer logs per step (names as it writes them): no code of its own draws them
GRPO_LOGS = [{"loss": 0.01 * i, "reward": 0.1 * i, "reward_std": 0.3, "kl": 0.002 * i, "completions/mean_length": 40 + i,
              "learning_rate": 1e-6, "epoch": 0.1 * i, "num_input_tokens_seen": 500 * i} for i in range(1, 7)]


@pytest.fixture(scope="module")
def context():
    from selfllm_recipes.layout import RECIPES_DIR
    from selfllm_runtime.context import load_context

    return load_context(RECIPES_DIR / "qwen3" / "lora")


def test_history_keeps_every_numeric_metric_and_leaves_counters_and_text_out():
    history = MetricHistory()
    history.record(1, {"loss": 2.5, "grad_norm": 1, "epoch": 0.1, "num_input_tokens_seen": 100, "done": True,
                       "note": "text", "bad": math.nan, "reward": 0.5})
    history.record(2, {"loss": 2.0, "reward": 0.75, "learning_rate": 1e-4})
    history.record(2, {"loss": 1.9})  # the same step again: one value per step, the last
    history.record(3, {"train_runtime": 4.2, "train_loss": 2.1, "total_flos": 1e9})  # the end-of-training summary
    assert history.points == {"loss": [(1, 2.5), (2, 1.9)], "grad_norm": [(1, 1.0)], "reward": [(1, 0.5), (2, 0.75)],
                              "learning_rate": [(2, 1e-4)]}
    assert history.ordered() == ["loss", "learning_rate", "grad_norm", "reward"]
    assert history.last_step == 3


def test_plot_draws_one_panel_per_metric_into_a_png(tmp_path):
    history = MetricHistory()
    for step, logs in enumerate(GRPO_LOGS, 1):
        history.record(step, logs)
    png = plot(history, tmp_path / "run" / CURVES_PNG, "grpo · t")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1200, 960)  # 5 metrics: 2 columns × 3 rows of 6×3.2 in
        colours = len(image.convert("RGB").getcolors(maxcolors=1 << 20))
    assert colours > 50  # lines and text, not a blank canvas
    assert not list(png.parent.glob("*.partial"))


def test_a_run_with_nothing_logged_yet_still_gets_a_picture(tmp_path):
    with Image.open(plot(MetricHistory(), tmp_path / CURVES_PNG, "empty")) as image:
        assert image.format == "PNG" and image.size == (600, 320)


def _state(step: int, history: list[dict]):
    from transformers import TrainerState

    state = TrainerState()
    state.global_step, state.log_history, state.is_world_process_zero = step, history, True
    return state


def test_the_callback_draws_grpo_metrics_with_no_code_of_its_own(tmp_path):
    from transformers import TrainerControl

    callback, log_history = CurvesCallback(tmp_path, "selfllm-grpo · t"), []
    for step, logs in enumerate(GRPO_LOGS, 1):
        log_history.append({**logs, "step": step})
        callback.on_log(None, _state(step, log_history), TrainerControl(), logs=logs)
    written = json.loads((tmp_path / CURVES_JSON).read_text())  # after every log, before any picture
    assert list(written["metrics"]) == ["loss", "learning_rate", "completions/mean_length", "kl", "reward", "reward_std"]
    assert written["metrics"]["reward"] == [[i, pytest.approx(0.1 * i)] for i in range(1, 7)]
    assert not (tmp_path / CURVES_PNG).exists()
    callback.on_train_end(None, _state(6, log_history), TrainerControl())
    assert json.loads((tmp_path / CURVES_JSON).read_text())["last_step"] == 6
    with Image.open(tmp_path / CURVES_PNG) as image:
        assert image.format == "PNG" and image.size == (1200, 960)


def test_a_resumed_run_draws_the_checkpoints_earlier_points_too(tmp_path):
    from transformers import TrainerControl

    earlier = [{"loss": 3.0 - 0.1 * step, "step": step} for step in range(1, 4)]
    callback = CurvesCallback(tmp_path, "t")
    callback.on_log(None, _state(4, earlier + [{"loss": 2.6, "step": 4}]), TrainerControl(), logs={"loss": 2.6})
    callback.on_log(None, _state(5, earlier + [{"loss": 2.6, "step": 4}, {"loss": 2.5, "step": 5}]), TrainerControl(),
                    logs={"loss": 2.5})
    assert [step for step, _ in callback.history.points["loss"]] == [1, 2, 3, 4, 5]


def test_other_processes_record_nothing(tmp_path):
    from transformers import TrainerControl

    state = _state(1, [{"loss": 1.0, "step": 1}])
    state.is_world_process_zero = False
    callback = CurvesCallback(tmp_path, "t")
    callback.on_log(None, state, TrainerControl(), logs={"loss": 1.0})
    callback.on_train_end(None, state, TrainerControl())
    assert not callback.history.points and not list(tmp_path.iterdir())


def test_report_to_none_and_tensorboard_still_draw_curves(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    real_find_spec = importlib.util.find_spec  # the images have tensorboard, the host's test venv need not
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: real_find_spec("json") if name == "tensorboard" else real_find_spec(name))
    report_to, callbacks = tracking_for(LoraSettings(**LORA, report_to="none"), tmp_path, "p")
    assert report_to == [] and [type(c).__name__ for c in callbacks] == ["CurvesCallback"]
    report_to, callbacks = tracking_for(LoraSettings(**LORA, report_to="tensorboard"), tmp_path / "r", "p")
    assert report_to == ["tensorboard"] and [type(c).__name__ for c in callbacks] == ["CurvesCallback"]
    import os

    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "r" / "runs")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if "tensorboard" in name.lower()
                        else real_find_spec(name))
    with pytest.raises(ValueError, match="^REPORT_TO=tensorboard needs the tensorboard package"):
        tracking_for(LoraSettings(**LORA, report_to="tensorboard"), tmp_path, "p")


def test_swanlab_is_the_default_offline_and_logs_into_the_run_folder(tmp_path):
    settings = LoraSettings(**LORA)
    assert (settings.report_to, settings.swanlab_mode) == ("swanlab", "local")
    report_to, callbacks = tracking_for(settings, tmp_path, "selfllm-lora")
    assert report_to == []  # SwanLab's own callback, not transformers' report_to="swanlab"
    swanlab = next(c for c in callbacks if type(c).__name__ == "SwanLabCallback")
    assert swanlab._init_kwargs == {"project": "selfllm-lora", "experiment_name": tmp_path.name,
                                    "log_dir": str(swanlog_dir(tmp_path)), "mode": "local"}


def test_a_missing_swanlab_package_is_one_line_naming_it(tmp_path, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "swanlab" else real_find_spec(name))
    with pytest.raises(ValueError, match="REPORT_TO=swanlab needs the swanlab package .*or set REPORT_TO=none"):
        tracking_for(LoraSettings(**LORA), tmp_path, "p")


def test_cloud_without_a_key_is_refused_by_the_settings_and_the_key_never_reaches_the_run_info(context):
    with pytest.raises(SettingsError, match=r"^SWANLAB_MODE='cloud': uploading to SwanLab needs SWANLAB_API_KEY"):
        context.settings(LoraSettings, env={"SWANLAB_MODE": "cloud"})
    context.settings(LoraSettings, env={"SWANLAB_MODE": "cloud", "REPORT_TO": "none"})  # not uploading: no key needed
    keyed = context.settings(LoraSettings, env={"SWANLAB_MODE": "Cloud", "SWANLAB_API_KEY": "sk-secret"})
    assert keyed.swanlab_mode == "cloud" and keyed.swanlab_api_key == "sk-secret"
    assert "sk-secret" not in keyed.model_dump_json()
    with pytest.raises(SettingsError, match="^SWANLAB_MODE='online'"):
        context.settings(LoraSettings, env={"SWANLAB_MODE": "online"})


def test_tracking_settings_are_their_own_group_for_other_trainer_tasks():
    assert {"report_to", "swanlab_mode", "swanlab_api_key"} <= set(TrackingSettings.model_fields)
    assert issubclass(LoraSettings, TrackingSettings)


def test_the_dashboard_finds_the_newest_run_or_names_what_is_missing(tmp_path):
    with pytest.raises(SettingsError, match=r"^OUTPUT_DIR=.*: no run with a SwanLab log yet"):
        find_swanlog(None, tmp_path)
    old, new = (tmp_path / name / "swanlog" for name in ("old", "new"))
    for folder in (old, new):
        folder.mkdir(parents=True)
        (folder / "runs.swanlab").write_bytes(b"")
    import os

    os.utime(old / "runs.swanlab", (1, 1))
    assert find_swanlog(None, tmp_path) == new
    assert find_swanlog(tmp_path / "old", tmp_path) == old == find_swanlog(old, tmp_path)
    with pytest.raises(SettingsError, match=r"no SwanLab log here"):
        find_swanlog(tmp_path / "elsewhere", tmp_path)
    assert watch_argv(new, "127.0.0.1", 6006, python="py") == ["py", "-m", "swanlab", "watch", str(new), "--host",
                                                                 "127.0.0.1", "--port", "6006"]
    assert exposure_line("127.0.0.1", 6006) is None and "no login" in exposure_line("0.0.0.0", 6006)


def test_the_dashboard_refuses_a_taken_port_in_one_line(context, tmp_path, capsys):
    from selfllm_runtime.cli import main

    (tmp_path / "t" / "swanlog").mkdir(parents=True)
    (tmp_path / "t" / "swanlog" / "runs.swanlab").write_bytes(b"")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["lora", "--recipe", str(context.recipe_dir), "dashboard", str(tmp_path / "t"), "--host",
                     "127.0.0.1", "--port", str(port)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"selfllm lora: error: PORT={port}: can't listen on 127.0.0.1:{port}")


def test_start_refuses_cloud_without_a_key_before_any_download(tmp_path):
    """`selfllm start` as the image runs it, with no local model (the hub on a closed port): the one line names
    SWANLAB_MODE, not the hub, so nothing was fetched first."""
    import os
    import subprocess
    import sys

    import selfllm_runtime
    from fake_hub import closed_port_url
    from selfllm_recipes.layout import RECIPES_DIR

    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SWANLAB_", "MODEL_"))},
           "RECIPE_DIR": str(RECIPES_DIR / "qwen3" / "lora"), "MODELSCOPE_ENDPOINT": closed_port_url(),
           "MODEL_CACHE": str(tmp_path / "cache"), "OUTPUT_DIR": str(tmp_path / "out"), "SWANLAB_MODE": "cloud",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(selfllm_runtime.__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "selfllm_runtime", "start"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "SWANLAB_MODE='cloud': uploading to SwanLab needs SWANLAB_API_KEY" in lines[0], lines
    assert not (tmp_path / "cache").exists()


def test_the_hosts_tracking_packages_are_the_lora_locks():
    """tests/tracking-packages.txt (installed on the host for these tests) pins what every lora image has."""
    from selfllm_recipes.locks import parse_lock

    repo = Path(__file__).resolve().parent.parent
    lock = {pin.key: pin for pin in parse_lock(repo / "tasks" / "lora" / "requirements.lock")}
    host = parse_lock(repo / "tests" / "tracking-packages.txt")
    assert {"swanlab", "swanboard", "matplotlib"} <= {pin.key for pin in host}
    for pin in host:
        assert pin.key in lock and lock[pin.key].version == pin.version, f"{pin.name}=={pin.version}: the lock has " \
            f"{lock[pin.key].version if pin.key in lock else 'none'}; regenerate tests/tracking-packages.txt"
        assert set(pin.hashes) == set(lock[pin.key].hashes), pin.name
