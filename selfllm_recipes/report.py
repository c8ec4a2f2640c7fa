"""Report: a rich table on the console, and report.json, report.md, junit.xml in --report-dir."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from xml.etree import ElementTree as ET

from rich.console import Console
from rich.table import Table

STATUS_STYLE = {"pass": "bold green", "fail": "bold red", "skip": "yellow"}


@dataclass
class RecipeReport:
    recipe: str  # "qwen3/fastapi"
    status: str  # pass | fail | skip
    seconds: float
    image: str
    error: str = ""
    build: str = ""  # built | reused | failed | not built
    smoke: str = ""  # one-line detail of the smoke check
    level: str = ""  # where the smoke test ran: cpu | gpu (+ any reduced level the check names)
    image_id: str = ""  # the image the result is about: `make publish` pushes only that image
    input_hash: str = ""  # its org.selfllm.input-hash label
    image_bytes: int = 0  # its size as the engine reports it (the README's publishing section quotes these)
    needs_gpu: bool = False  # skipped: the recipe's smoke test can't run without a GPU (recipe smoke.needs_gpu)
    phases: dict[str, float] = field(default_factory=dict)  # seconds: build (its own layers), then the smoke phases
    # What the smoke test ran on: the matrix always uses a tiny random model of the real class ("tiny"); real
    # checkpoints are the `real` test level of `make test` (tests/test_real_weights.py), not the matrix's.
    weights: str = "tiny"

    @property
    def where(self) -> str:
        """'cpu, tiny weights' — the level of the smoke result, as the reports show it."""
        return ", ".join(filter(None, [self.level, f"{self.weights} weights" if self.level else ""]))


def phases_text(phases: dict[str, float]) -> str:
    """'build 12.0 · start 0.4 · ready 8.1 · check 9.9'"""
    return " · ".join(f"{name} {seconds:.1f}" for name, seconds in phases.items())


def render_table(rows: list[RecipeReport], console: Console) -> None:
    table = Table(title="self-llm recipes: build & smoke test")
    for column in ("recipe", "status", "build", "smoke", "seconds", "image / error"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row.recipe, f"[{STATUS_STYLE[row.status]}]{row.status.upper()}[/]", row.build,
                      (row.smoke or "-") + (f" [{row.where}]" if row.where else ""),
                      f"{row.seconds:.1f}" + (f"\n{phases_text(row.phases)}" if row.phases else ""),
                      row.error.splitlines()[0] if row.error else row.image)
    console.print(table)
    for row in rows:
        if row.error and len(row.error.splitlines()) > 1:
            console.print(f"[red]{row.recipe}[/]: {row.error}")


def write_reports(rows: list[RecipeReport], folder: Path, meta: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps([asdict(r) for r in rows], ensure_ascii=False, indent=2))
    lines = [f"# self-llm recipes — matrix report", "", f"base: {meta.get('base', '')}  ",
             f"engine: {meta.get('engine', '')}", "",
             "| recipe | status | build | smoke | seconds | image / error |", "|---|---|---|---|---|---|"]
    for r in rows:
        cell = (r.error.splitlines()[0] if r.error else r.image).replace("|", "\\|")
        smoke = (r.smoke + (f" [{r.where}]" if r.where else "")).replace("|", "\\|")
        seconds = f"{r.seconds:.1f}" + (f" ({phases_text(r.phases)})" if r.phases else "")
        lines.append(f"| {r.recipe} | {r.status.upper()} | {r.build} | {smoke} | {seconds} | {cell} |")
    (folder / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    suite = ET.Element("testsuite", name="selfllm-matrix", tests=str(len(rows)),
                       failures=str(sum(r.status == "fail" for r in rows)),
                       skipped=str(sum(r.status == "skip" for r in rows)),
                       time=f"{sum(r.seconds for r in rows):.1f}")
    for r in rows:
        case = ET.SubElement(suite, "testcase", classname="recipes", name=r.recipe, time=f"{r.seconds:.1f}")
        if r.status == "fail":
            ET.SubElement(case, "failure", message=r.error.splitlines()[0] if r.error else "failed").text = r.error
        elif r.status == "skip":
            ET.SubElement(case, "skipped", message=r.error or "skipped")
        ET.SubElement(case, "system-out").text = f"image={r.image} build={r.build} smoke={r.smoke} level={r.level} weights={r.weights}"
    ET.ElementTree(suite).write(folder / "junit.xml", encoding="utf-8", xml_declaration=True)
