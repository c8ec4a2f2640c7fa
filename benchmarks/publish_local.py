#!/usr/bin/env python3
"""`make publish` end to end with the real images, against a real registry on 127.0.0.1 (Debian's docker-registry):

  1. publish qwen3/fastapi (base + torch stack + recipe), then qwen3/lora: registry storage after each push
     (the second recipe should add its own layers only, well under one stack);
  2. remove the local qwen3/fastapi image, pull it back by its `in-<hash>` tag, smoke-test the pulled image;
  3. untag the local stack and run the matrix with --stack-from: the stack comes from the registry, not a build.

Needs `make matrix RECIPES="qwen3/fastapi qwen3/lora"` first (reports/latest must hold their PASS results).

    python benchmarks/publish_local.py [--recipes qwen3/fastapi qwen3/lora] [--keep]
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import docker
import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "runtime"))

GB = 1e9


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def storage_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run(*argv: str) -> float:
    started = time.monotonic()
    subprocess.run(argv, cwd=REPO, check=True)
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["qwen3/fastapi", "qwen3/lora"])
    parser.add_argument("--keep", action="store_true", help="leave the registry's storage folder")
    args = parser.parse_args()

    from selfllm_recipes.discover import load_spec
    from selfllm_recipes.layout import RECIPES_DIR
    from selfllm_recipes.smoke.runner import run_smoke

    work = Path(tempfile.mkdtemp(prefix="selfllm-registry-"))
    port = free_port()
    (work / "config.yml").write_text(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: "
                                     f"{work / 'data'}\nhttp:\n  addr: 127.0.0.1:{port}\n")
    registry = subprocess.Popen(["/usr/bin/docker-registry", "serve", str(work / "config.yml")])
    name = f"127.0.0.1:{port}/selfllm"
    try:
        for _ in range(100):
            try:
                requests.get(f"http://127.0.0.1:{port}/v2/", timeout=1)
                break
            except requests.RequestException:
                time.sleep(0.1)
        figures: dict[str, object] = {"registry": name}
        before = 0
        for key in args.recipes:
            seconds = run("make", "publish", f"REGISTRY={name}", f"RECIPES={key}")
            now = storage_bytes(work / "data")
            figures[key] = {"push_s": round(seconds, 1), "storage_added_gb": round((now - before) / GB, 3),
                            "storage_total_gb": round(now / GB, 3)}
            print(f"{key}: pushed in {seconds:.0f} s, registry storage +{(now - before) / GB:.3f} GB "
                  f"(total {now / GB:.3f} GB)", flush=True)
            before = now

        client = docker.from_env()
        first = args.recipes[0]
        rows = {r["recipe"]: r for r in json.loads((REPO / "reports/latest/report.json").read_text())}
        local = rows[first]["image"]
        tag = f"in-{rows[first]['input_hash']}"
        image_id = client.images.get(local).id
        client.images.remove(local)
        pulled = client.images.pull(f"{name}/{first.replace('/', '-')}", tag=tag)
        pulled.tag(local)
        print(f"{first}: local image removed, pulled back {name}/{first.replace('/', '-')}:{tag} "
              f"(same id: {pulled.id == image_id})", flush=True)
        smoke = run_smoke(load_spec(RECIPES_DIR / first), local, False, work / "smoke")
        figures["pulled_smoke"] = {"ok": smoke.ok, "detail": smoke.detail.splitlines()[0], "seconds": round(smoke.seconds, 1)}
        print(f"{first}: smoke test of the pulled image: {'PASS' if smoke.ok else 'FAIL'} — {smoke.detail.splitlines()[0]}",
              flush=True)

        spec = load_spec(RECIPES_DIR / first)
        stack_tag = f"selfllm/stack:{spec.stack.name}"
        client.images.remove(stack_tag)  # untag: the registry must supply it
        log = work / "matrix.log"
        with log.open("w") as out:
            done = subprocess.run(["make", "matrix", f"RECIPES={first}", f"STACK_FROM={name}",
                                   f"REPORT_DIR={work / 'report'}"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        text = log.read_text()
        took = f"took {stack_tag} from {name}" in text
        rebuilt = f"built stack/{spec.stack.name}" in text and f"reused stack/{spec.stack.name}" not in text
        figures["stack_from_registry"] = {"took": took, "rebuilt": rebuilt, "matrix_rc": done.returncode}
        print(f"matrix with STACK_FROM: stack taken from the registry: {took}, rebuilt: {rebuilt}, rc {done.returncode}")
        print(json.dumps(figures, ensure_ascii=False, indent=2))
        return 0 if smoke.ok and took and not rebuilt and done.returncode == 0 else 1
    finally:
        registry.terminate()
        registry.wait(timeout=30)
        if not args.keep:
            subprocess.run(["rm", "-rf", str(work / "data")])


if __name__ == "__main__":
    sys.exit(main())
