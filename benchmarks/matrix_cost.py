#!/usr/bin/env python3
"""What a one-file edit costs the matrix: for each runtime module (and smoke check module), the recipes its edit
selects (`--changed-since`: the import closure of each task kind, selfllm_recipes/runtime_closure.py); the average
seconds per recipe of each task kind in the last matrix report; and from both, the re-test time of the recipes a
one-module edit selects (build of the recipe layers + smoke, as the report measured them).

    .venv/bin/python benchmarks/matrix_cost.py [--report reports/latest/report.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "runtime")]

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from selfllm_recipes import plan  # noqa: E402
from selfllm_recipes.discover import discover  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", type=Path, default=ROOT / "reports" / "latest" / "report.json")
    args = parser.parse_args()
    specs, _ = discover()
    task_of = {s.key: s.recipe.task.value for s in specs}
    seconds: dict[str, list[float]] = defaultdict(list)
    phases: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    if args.report.is_file():
        for row in json.loads(args.report.read_text()):
            if row.get("phases") and row.get("status") == "pass" and row["recipe"] in task_of:  # smoke ran, not reused
                seconds[task_of[row["recipe"]]].append(float(row["seconds"]))
                for name, value in (row.get("phases") or {}).items():
                    phases[task_of[row["recipe"]]][name].append(float(value))
    average = {task: sum(v) / len(v) for task, v in seconds.items()}
    overall = sum(sum(v) for v in seconds.values()) / max(sum(len(v) for v in seconds.values()), 1)

    console = Console(width=150)
    per_task = Table(title=f"seconds per recipe whose smoke test ran (build of its own layers + smoke), from {args.report}")
    for column in ("task", "recipes measured", "average s", "average of each phase, s"):
        per_task.add_column(column)
    for task in sorted(average):
        split = " · ".join(f"{name} {sum(v) / len(v):.1f}" for name, v in phases[task].items())
        per_task.add_row(task, str(len(seconds[task])), f"{average[task]:.1f}", split or "—")
    per_task.add_row("all", str(sum(len(v) for v in seconds.values())), f"{overall:.1f}", "")
    console.print(per_task if average else f"no smoke test ran in {args.report}: run `make matrix` first")

    modules = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "runtime" / "selfllm_runtime").rglob("*.py"))
    modules += sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "selfllm_recipes" / "smoke").glob("*.py"))
    table = Table(title=f"a one-file edit re-tests ({len(specs)} recipes in all)")
    for column in ("edited file", "recipes selected", "task kinds", "re-test ≈ min"):
        table.add_column(column)
    for module in modules:
        original = plan.changed_paths
        plan.changed_paths = lambda ref, m=module: [m]
        try:
            chosen = plan.select_changed(specs, "HEAD")
        finally:
            plan.changed_paths = original
        kinds = sorted({task_of[k] for k in chosen})
        minutes = sum(average.get(task_of[k], overall) for k in chosen) / 60
        table.add_row(module.removeprefix("runtime/"), str(len(chosen)), ", ".join(kinds), f"{minutes:.0f}" if average else "—")
    console.print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
