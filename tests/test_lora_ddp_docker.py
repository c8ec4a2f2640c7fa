"""LoRA data-parallel in the recipe image: `NPROC=2 selfllm start` in the qwen3/lora image runs two real
processes through torchrun (gloo on CPU) on the tiny model; both ranks end with the same adapter, only rank 0
writes it, the loss falls, and the merged model generates."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from selfllm_recipes.layout import REPO_ROOT

pytestmark = pytest.mark.docker

IMAGE = "selfllm/qwen3-lora:latest"
SCRIPT = " && ".join([
    "selfllm smoke-model /tmp/tiny >/dev/null",
    "selfllm lora sample-data /tmp/data.json >/dev/null",
    "NPROC=2 MODEL_PATH=/tmp/tiny DATA_PATH=/tmp/data.json OUTPUT_DIR=/tmp/out RUN_NAME=ddp MAX_STEPS=12 "
    "LEARNING_RATE=5e-3 BATCH_SIZE=2 GRAD_ACCUM=1 LOGGING_STEPS=1 OMP_NUM_THREADS=1 selfllm start",
    "selfllm lora merge --model /tmp/tiny --adapter /tmp/out/ddp --out /tmp/merged",
    "selfllm lora infer --model /tmp/merged --prompt 你好 --max-new-tokens 6 --temperature 0",
])


def test_two_processes_train_one_adapter_in_the_recipe_image(docker_client):
    built = subprocess.run([sys.executable, "scripts/build_matrix.py", "--only", "qwen3/lora", "--no-smoke"],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=3000)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    started = time.monotonic()
    logs = docker_client.containers.run(IMAGE, ["/bin/sh", "-c", SCRIPT], entrypoint=[], remove=True,
                                        stdout=True, stderr=True, shm_size="1g").decode()  # networked: torchrun needs localhost
    seconds = time.monotonic() - started
    assert "2 processes through torchrun" in logs
    ranks = dict(re.findall(r"selfllm: rank (\d)/2 adapter sha256 (\w+)", logs))
    assert set(ranks) == {"0", "1"} and ranks["0"] == ranks["1"], logs[-3000:]
    results = [json.loads(line.split(" ", 1)[1]) for line in logs.splitlines() if line.startswith("SELFLLM_RESULT ")]
    train = [r for r in results if r["action"] == "train"]
    assert len(train) == 1, results  # rank 0 only
    losses = train[0]["losses"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    infer = [r for r in results if r["action"] == "infer"]
    assert infer and infer[0]["completion_tokens"] > 0
    final = dict(re.findall(r"selfllm: rank (\d)/2 adapter sha256 \w+ last loss ([\d.]+)", logs))
    print(f"2-process LoRA in {IMAGE}: {seconds:.1f} s (tiny model, 12 steps + merge + infer), final losses {final}")
