"""RESUME in the recipe image: in the qwen3/lora image, on the tiny model, run A trains 12 steps uninterrupted;
run B is SIGKILLed right after checkpoint-8 and started again with the same command: it says it resumed at
step 8, trains only the 4 remaining steps, and ends with A's adapter and A's last loss."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from selfllm_recipes.layout import REPO_ROOT
from test_lora_resume import STOP_AFTER_CHECKPOINT

pytestmark = pytest.mark.docker

IMAGE = "selfllm/qwen3-lora:latest"
# Runs inside the image (its python, its selfllm); prints one RESUME_TEST line of JSON.
DRIVER = f"""
import json, os, subprocess, sys
from safetensors.torch import load_file

def run(argv, **env):
    done = subprocess.run(argv, env={{**os.environ, **env}}, capture_output=True, text=True)
    sys.stderr.write(done.stderr[-3000:])
    results = [json.loads(l.split(" ", 1)[1]) for l in done.stdout.splitlines() if l.startswith("SELFLLM_RESULT ")]
    return done.returncode, done.stderr, results[-1] if results else None

subprocess.run(["selfllm", "smoke-model", "/tmp/tiny"], check=True, capture_output=True)
subprocess.run(["selfllm", "lora", "sample-data", "/tmp/data.json", "--count", "24"], check=True, capture_output=True)
env = dict(MODEL_PATH="/tmp/tiny", DATA_PATH="/tmp/data.json", OUTPUT_DIR="/tmp/out", MAX_STEPS="12", SAVE_STEPS="4",
           LEARNING_RATE="5e-3", BATCH_SIZE="2", GRAD_ACCUM="2", LOGGING_STEPS="1", OMP_NUM_THREADS="1")
code_a, _, a = run(["selfllm", "start"], RUN_NAME="a", **env)
code_killed, _, _ = run([sys.executable, "-c", {STOP_AFTER_CHECKPOINT!r}], RUN_NAME="b", STOP_AT_STEP="8", **env)
left = sorted(os.listdir("/tmp/out/b"))
code_b, log_b, b = run(["selfllm", "start"], RUN_NAME="b", **env)
wa, wb = load_file("/tmp/out/a/adapter_model.safetensors"), load_file("/tmp/out/b/adapter_model.safetensors")
print("RESUME_TEST " + json.dumps(dict(
    codes=[code_a, code_killed, code_b], left_after_kill=left, a=a, b=b,
    resumed_line=[l for l in log_b.splitlines() if "RESUME=" in l],
    same_keys=wa.keys() == wb.keys(), max_diff=max(float((wa[k] - wb[k]).abs().max()) for k in wa))))
"""


def test_a_killed_run_resumes_in_the_recipe_image(docker_client):
    built = subprocess.run([sys.executable, "scripts/build_matrix.py", "--only", "qwen3/lora", "--no-smoke"],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=3000)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    started = time.monotonic()
    logs = docker_client.containers.run(IMAGE, ["python3", "-c", DRIVER], entrypoint=[], remove=True, stdout=True,
                                        stderr=True, network_disabled=True).decode()
    seconds = time.monotonic() - started
    lines = [line for line in logs.splitlines() if line.startswith("RESUME_TEST ")]
    assert lines, logs[-4000:]
    found = json.loads(lines[-1].removeprefix("RESUME_TEST "))
    assert found["codes"] == [0, -9, 0], logs[-4000:]
    assert [n for n in found["left_after_kill"] if n.startswith(("checkpoint-", "adapter_"))] == [
        "checkpoint-4", "checkpoint-8"]  # no final adapter from the killed run
    assert any("RESUME=auto: resuming from checkpoint-8 at step 8" in line for line in found["resumed_line"])
    a, b = found["a"], found["b"]
    assert b["resumed_from_step"] == 8 and b["trained_steps"] == 4 and len(b["losses"]) == 4
    assert b["steps"] == a["steps"] == 12
    assert b["loss_last"] == pytest.approx(a["loss_last"], rel=1e-4, abs=1e-4)
    assert found["same_keys"] and found["max_diff"] < 1e-5, found["max_diff"]
    print(f"RESUME in {IMAGE}: {seconds:.1f} s; resumed at step 8 of 12, last loss {b['loss_last']} vs "
          f"{a['loss_last']}, largest adapter difference {found['max_diff']:.2e}")
