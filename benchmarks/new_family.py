#!/usr/bin/env python3
"""Cold time of one family's recipes once the shared layers exist (base, torch stacks, each task
kind's dependency layer — what adding a family to a working machine costs): its images are
removed, then `build_matrix.py --only FAMILY` builds and smoke-tests them again.

    python benchmarks/new_family.py [--family phi4]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import docker
from docker.errors import ImageNotFound

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="phi4", help="folder under recipes/")
    args = parser.parse_args()
    client = docker.from_env()
    tasks = sorted(p.parent.name for p in (ROOT / "recipes" / args.family).glob("*/recipe.yaml"))
    if not tasks:
        raise SystemExit(f"recipes/{args.family}/ has no recipes")
    for task in tasks:
        for tag in ("latest", "cpu"):
            try:
                client.images.remove(f"selfllm/{args.family}-{task}:{tag}", force=True)
            except ImageNotFound:
                pass
    report = Path(tempfile.mkdtemp(prefix="new-family-"))
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(ROOT / "scripts/build_matrix.py"), "--only", args.family,
                             "--report-dir", str(report)], cwd=ROOT)
    wall = time.monotonic() - started
    rows = json.loads((report / "report.json").read_text())
    print(f"\n{args.family}: {len(rows)} recipes built and smoke-tested in {wall:.0f} s (exit {result.returncode})")
    for row in rows:
        print(f"  {row['recipe']:40s} {row['status']:5s} {row['seconds']:6.1f} s  build: {row['build']}")
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main())
