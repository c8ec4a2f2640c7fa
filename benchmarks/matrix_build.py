#!/usr/bin/env python3
"""Figures for the matrix builder on one recipe (default qwen3/fastapi):

  cold build time      --cold: every selfllm image and the builder cache removed first (downloads torch);
                       default: the recipe's own layers only (base and torch stack kept)
  no-change rerun time the same command again, nothing changed (reuse of image and smoke result)
  image size           total, and how much of it is the shared torch stack
  start-to-ready       container start → GET /health 200, on the tiny smoke model (model creation included)

    python benchmarks/matrix_build.py [--recipe qwen3/fastapi] [--cold]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import docker

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "runtime")]
os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

from selfllm_recipes.discover import load_spec  # noqa: E402
from selfllm_recipes.layout import CACHE_DIR, RECIPES_DIR  # noqa: E402
from selfllm_recipes.smoke.checks import (  # noqa: E402
    SMOKE_MODEL_DIR,
    SmokeSession,
    start_on_smoke_model,
    wait_until_healthy,
)
from selfllm_recipes.smoke.runner import LOOPBACK, owner_label  # noqa: E402


def timed_matrix(recipe: str) -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, str(ROOT / "scripts/build_matrix.py"), "--only", recipe], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def start_to_ready(image: str, port: int) -> float:
    """Container start → GET /health 200, through the smoke runner's own wait."""
    client = docker.from_env()
    container = client.containers.run(image, [start_on_smoke_model()], entrypoint=["/bin/sh", "-c"],
                                      environment={"MODEL_PATH": SMOKE_MODEL_DIR}, labels=owner_label(),
                                      ports={f"{port}/tcp": (LOOPBACK, None)}, detach=True)
    try:
        container.reload()
        host_port = container.attrs["NetworkSettings"]["Ports"][f"{port}/tcp"][0]["HostPort"]

        def exit_code() -> int | None:
            container.reload()
            return container.attrs["State"]["ExitCode"] if container.status == "exited" else None

        session = SmokeSession(f"http://{LOOPBACK}:{host_port}", image, lambda: "", exit_code)
        return wait_until_healthy(session, "/health", 600)
    finally:
        container.remove(force=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="qwen3/fastapi")
    parser.add_argument("--cold", action="store_true", help="remove every selfllm image and the build cache first")
    args = parser.parse_args()
    spec = load_spec(RECIPES_DIR / args.recipe)
    client = docker.from_env()
    subprocess.run(["rm", "-rf", str(CACHE_DIR / "smoke")], check=True)
    doomed = [spec.image + ":latest", "selfllm/runtime:latest"]
    if args.cold:
        doomed += ["selfllm/base:cuda12.1", f"selfllm/stack:{spec.stack.name}"]
    for tag in doomed:
        try:
            client.images.remove(tag, force=True)
        except docker.errors.ImageNotFound:
            pass
    if args.cold:
        client.api.prune_builds() if hasattr(client.api, "prune_builds") else None
        client.images.prune(filters={"dangling": False, "label": "org.selfllm.input-hash"})
    cold = timed_matrix(args.recipe)
    rerun = timed_matrix(args.recipe)
    image = client.images.get(spec.image + ":latest")
    stack = client.images.get(f"selfllm/stack:{spec.stack.name}")
    ready = start_to_ready(spec.image + ":latest", spec.recipe.port)
    gb = 1024 ** 3
    print(f"recipe                     {args.recipe}")
    print(f"build ({'cold: all layers' if args.cold else 'recipe layers; base + torch stack cached'}) "
          f"{cold:8.1f} s  (build + smoke test)")
    print(f"no-change rerun            {rerun:8.1f} s")
    print(f"image size                 {image.attrs['Size'] / gb:8.2f} GiB  (shared torch stack {stack.attrs['Size'] / gb:.2f} GiB)")
    print(f"container start-to-ready   {ready:8.1f} s  (tiny model, CPU, model creation included)")


if __name__ == "__main__":
    main()
