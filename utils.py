#!/usr/bin/env python3
"""Contributor credits and image-hour tallies, with upstream self-llm's utils.py interface.

    python utils.py contributors [--source FILE]... [--add-unknown] [--root DIR]
    python utils.py docker-hours [--source codewithgpu|local] [--user NAME] [--api-base URL] [--json]

``update_contributors()`` returns the contributors dict it writes to contributors.json;
``calculate_docker_hours()`` returns ``(docker_list, total_hours)`` with items ``{"uuid", "runtime_hour"}``.
Failures the user can act on raise ``UtilsError``; the CLI prints them as one line and exits 2.
"""
from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "runtime"))  # selfllm_runtime.metadata: the recipes' schema
CONTRIBUTORS_FILE = "contributors.json"
CONFIG_FILE = "contributors_config.json"
README_FILE = "README.md"
RECIPES_DIR = "recipes"
RECIPE_LABEL = "org.selfllm.recipe"  # set on every recipe image by the matrix builder (selfllm_recipes/build.py)
DEFAULT_API = "https://www.codewithgpu.com"
DEFAULT_USER = "Datawhale"
PAGE_SIZE = 100
MAX_PAGES = 1000  # a server that never sends a short page must not loop forever

# A checked checklist item that names someone: "- [x] [Title](link) @Name" ([x] or [X], any indent).
TASK_LINE = re.compile(r"^\s*[-*+]\s+\[[xX]\]\s.*@")

Credit = tuple[str, int, str]  # (name, points, where it came from: "file:line" or a file)


class UtilsError(Exception):
    """A failure reported to the user as one line (CLI exit code 2)."""


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------- contributors


def task_points(is_lora: bool) -> int:
    """A LoRA / fine-tune task is worth 2 points, any other task 1."""
    return 2 if is_lora else 1


def markdown_credits(path: Path) -> list[Credit]:
    """One credit per checked task line; the name is the text after the last '@', stripped."""
    credits: list[Credit] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not TASK_LINE.match(line):
            continue
        name = line.rsplit("@", 1)[1].strip()
        if not name:
            warn(f"{path}:{lineno}: task line has no name after '@'")
            continue
        credits.append((name, task_points("lora" in line.lower() or "微调" in line), f"{path}:{lineno}"))
    return credits


def recipe_credits(recipes_root: Path) -> list[Credit]:
    """One task per recipes/<model>/<task>/recipe.yaml, credited to each of its contributors (its
    family's upstream authors for that task, or the recipe's own `contributors:`).

    Read through the recipes' own schema (selfllm_runtime.metadata); a recipe that fails it is
    skipped with a warning naming the file and field, and the others still count. Recipes credited
    to the project itself (no upstream tutorial) give nobody points.
    """
    from selfllm_runtime.metadata import PROJECT_CREDIT, MetadataError, kind_info, load_recipe

    credits: list[Credit] = []
    for path in sorted(recipes_root.glob("*/*/recipe.yaml")) if recipes_root.is_dir() else []:
        try:
            recipe = load_recipe(path.parent)
        except MetadataError as exc:
            warn(f"skipping {_one_line(exc)}")
            continue
        points = task_points(kind_info(recipe.task).weights == "fp32")  # a fine-tuning kind (lora)
        credits.extend((name, points, str(path)) for name in recipe.contributors if name != PROJECT_CREDIT)
    return credits


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UtilsError(f"{path} not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UtilsError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UtilsError(f"{path}: expected a JSON object")
    return data


def extra_credits(config_path: Path) -> list[Credit]:
    """Fixed extra points per person from the config (`{"extra_points": {"Name": points}}`)."""
    if not config_path.is_file():
        return []
    extra = _load_json(config_path).get("extra_points", {})
    if not isinstance(extra, dict) or not all(isinstance(p, int) for p in extra.values()):
        raise UtilsError(f"{config_path}: 'extra_points' must map names to integers")
    return [(name, points, str(config_path)) for name, points in extra.items()]


def update_contributors(
    root: Path | str = ROOT,
    sources: Iterable[Path | str] = (),
    add_unknown: bool = False,
    echo: bool = True,
) -> dict:
    """Recount every contributor's task_num from zero and rewrite `root`/contributors.json.

    Sources: `root`/README.md (when present) plus `sources`, the recipes under `root`/recipes,
    and the extra points in `root`/contributors_config.json. Names missing from contributors.json
    are reported with their file and line, or added with an empty `info` when `add_unknown`.
    """
    root = Path(root)
    contributors_path = root / CONTRIBUTORS_FILE
    contributors = _load_json(contributors_path)
    for entry in contributors.values():
        entry["task_num"] = 0

    credits: list[Credit] = []
    readme = root / README_FILE
    for source in ([readme] if readme.is_file() else []) + [Path(s) for s in sources]:
        try:
            credits += markdown_credits(source)
        except FileNotFoundError:
            raise UtilsError(f"source {source} not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UtilsError(f"cannot read source {source}: {_one_line(exc)}") from None
    if not credits:
        raise UtilsError(f"no task lines ('- [x] [Title](link) @Name') in {readme.name} or --source files: "
                         "pass upstream's support list, e.g. --source support_model.md; contributors.json left as it is")
    credits += recipe_credits(root / RECIPES_DIR)
    credits += extra_credits(root / CONFIG_FILE)

    for name, points, where in credits:
        if name not in contributors:
            if not add_unknown:
                warn(f"unknown contributor {name!r} at {where} (not in {CONTRIBUTORS_FILE}; --add-unknown adds it)")
                continue
            warn(f"adding contributor {name!r} from {where} with an empty info")
            contributors[name] = {"info": "", "task_num": 0}
        contributors[name]["task_num"] += points

    # sorted() is stable: ties keep their order in the file.
    contributors = dict(sorted(contributors.items(), key=lambda kv: kv[1]["task_num"], reverse=True))
    contributors_path.write_text(json.dumps(contributors, indent=4, ensure_ascii=False), encoding="utf-8")
    if echo:
        for name, entry in contributors.items():
            print(f"- {entry['info'] or name}")
    return contributors


# --------------------------------------------------------------------------- docker hours


def get_json(url: str, timeout: float = 10.0, retries: int = 2, backoff: float = 0.5) -> object:
    """GET `url` and decode JSON. Retries 5xx answers, timeouts and connection errors `retries` times."""
    request = urllib.request.Request(
        url, headers={"Accept": "application/json", "User-Agent": "selfllm-recipes-utils"}
    )
    tries = max(retries, 0) + 1
    for attempt in range(tries):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, body = response.status, response.read()
        except urllib.error.HTTPError as exc:
            failure = f"{url} answered HTTP {exc.code} {_one_line(exc.reason)}"
            if exc.code < 500:
                raise UtilsError(failure) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:  # refused, reset, timeouts
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError) or "timed out" in str(reason):
                failure = f"{url} did not answer within {timeout:g} s"
            else:
                failure = f"cannot reach {url}: {_one_line(reason)}"
        else:
            if status != 200:
                raise UtilsError(f"{url} answered HTTP {status}, expected 200")
            try:
                return json.loads(body)
            except ValueError as exc:  # also UnicodeDecodeError
                raise UtilsError(f"{url} answered malformed JSON: {_one_line(exc)}") from None
    raise UtilsError(f"{failure} ({tries} {'try' if tries == 1 else 'tries'})")


def codewithgpu_hours(
    user: str = DEFAULT_USER,
    api_base: str | None = None,
    timeout: float = 10.0,
    retries: int = 2,
    backoff: float = 0.5,
    page_size: int = PAGE_SIZE,
) -> list[dict]:
    """Runtime hours of `user`'s images on CodeWithGPU, every page (page_index from 1)."""
    api_base = (api_base or os.environ.get("CODEWITHGPU_API") or DEFAULT_API).rstrip("/")
    rows: list[dict] = []
    for page in range(1, MAX_PAGES + 1):
        query = urllib.parse.urlencode({"page_index": page, "page_size": page_size, "username": user})
        url = f"{api_base}/api/v1/image/home/{urllib.parse.quote(user)}?{query}"
        body = get_json(url, timeout=timeout, retries=retries, backoff=backoff)
        if not isinstance(body, dict):
            raise UtilsError(f"{url} answered JSON that is not an object")
        if body.get("code") != "Success":
            raise UtilsError(
                f"CodeWithGPU answered code {body.get('code')!r}: {_one_line(body.get('message') or 'no message')}"
            )
        try:
            items = body["data"]["list"] or []
            for item in items:
                if item["runtime_hour"] is not None:
                    rows.append({"uuid": str(item["uuid"]).split("/")[-1], "runtime_hour": float(item["runtime_hour"])})
        except (KeyError, TypeError, ValueError) as exc:
            raise UtilsError(f"{url} answered an unexpected shape ({type(exc).__name__}: {_one_line(exc)})") from None
        if len(items) < page_size:
            return rows
    raise UtilsError(f"CodeWithGPU kept sending full pages past page {MAX_PAGES}")


def parse_docker_time(value: str | None) -> datetime | None:
    """Docker's RFC 3339 times (nanoseconds, 'Z'); None for empty or the zero time 0001-01-01."""
    match = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", value or "")
    if not match or match.group(1).startswith("0001-"):
        return None
    fraction = (match.group(2) or "0")[:6].ljust(6, "0")
    zone = "+00:00" if match.group(3) == "Z" else match.group(3)
    return datetime.fromisoformat(f"{match.group(1)}.{fraction}{zone}")


def local_hours(client=None, now: datetime | None = None) -> list[dict]:
    """Hours of this project's containers on the local engine (label org.selfllm.recipe), per recipe.

    Uses each container's last run: State.StartedAt to State.FinishedAt, or to now while it runs.
    """
    import docker  # only this source needs the engine
    import requests

    now = now or datetime.now(timezone.utc)
    try:
        client = client or docker.from_env()
        containers = client.containers.list(all=True, filters={"label": RECIPE_LABEL}, ignore_removed=True)
    except (docker.errors.DockerException, requests.RequestException) as exc:
        raise UtilsError(f"Docker engine not reachable: {_one_line(exc)}") from None
    hours: dict[str, float] = {}
    for container in containers:
        state = container.attrs.get("State", {})
        started = parse_docker_time(state.get("StartedAt"))
        ended = now if state.get("Running") else parse_docker_time(state.get("FinishedAt"))
        if started is None or ended is None or ended < started:
            continue  # never started, or no finished run to count
        recipe = container.labels.get(RECIPE_LABEL, "")
        hours[recipe] = hours.get(recipe, 0.0) + (ended - started).total_seconds() / 3600
    return [{"uuid": recipe, "runtime_hour": value} for recipe, value in hours.items()]


def calculate_docker_hours(source: str = "codewithgpu", echo: bool = True, **options) -> tuple[list[dict], float]:
    """Return `(docker_list, total_hours)`, docker_list ranked by runtime_hour; print a table if `echo`.

    `options` go to codewithgpu_hours() (user, api_base, timeout, retries, backoff, page_size)
    or local_hours() (client, now).
    """
    if source not in ("codewithgpu", "local"):
        raise UtilsError(f"unknown source {source!r} (codewithgpu or local)")
    rows = codewithgpu_hours(**options) if source == "codewithgpu" else local_hours(**options)
    docker_list = sorted(rows, key=lambda row: row["runtime_hour"], reverse=True)
    total_hours = math.fsum(row["runtime_hour"] for row in docker_list)
    if echo:
        print_hours(docker_list, total_hours, source)
    return docker_list, total_hours


def print_hours(docker_list: list[dict], total_hours: float, source: str) -> None:
    table = Table(title=f"Image runtime ({source})", show_footer=True)
    table.add_column("Rank", justify="right", footer="")
    table.add_column("Image", footer=f"Total ({len(docker_list)} images)")
    table.add_column("Runtime (hours)", justify="right", footer=f"{total_hours:.1f}")
    for rank, row in enumerate(docker_list, start=1):
        table.add_row(str(rank), row["uuid"], f"{row['runtime_hour']:.1f}")
    Console().print(table)


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    credits = commands.add_parser("contributors", help="recount contributors.json from task lines and recipes")
    credits.add_argument("--source", action="append", default=[], metavar="FILE",
                         help="another markdown file with task lines (repeatable), e.g. support_model.md")
    credits.add_argument("--add-unknown", action="store_true", help="add unknown names with an empty info")
    credits.add_argument("--root", type=Path, default=ROOT,
                         help="folder with contributors.json, contributors_config.json, README.md, recipes/")

    hours = commands.add_parser("docker-hours", help="rank images by runtime hours")
    hours.add_argument("--source", choices=("codewithgpu", "local"), default="codewithgpu")
    hours.add_argument("--user", default=DEFAULT_USER, help="CodeWithGPU user (default: %(default)s)")
    hours.add_argument("--api-base", help=f"CodeWithGPU base URL (default: $CODEWITHGPU_API or {DEFAULT_API})")
    hours.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default: %(default)s)")
    hours.add_argument("--retries", type=int, default=2, help="retries on 5xx/connection errors (default: %(default)s)")
    hours.add_argument("--json", action="store_true", help="print JSON instead of a table")

    args = parser.parse_args(argv)
    try:
        if args.command == "contributors":
            update_contributors(args.root, args.source, add_unknown=args.add_unknown)
            return 0
        options = {} if args.source == "local" else {
            "user": args.user, "api_base": args.api_base, "timeout": args.timeout, "retries": args.retries}
        docker_list, total = calculate_docker_hours(args.source, echo=not args.json, **options)
        if args.json:
            print(json.dumps({"source": args.source, "total_hours": round(total, 6), "images": docker_list},
                             indent=2, ensure_ascii=False))
        return 0
    except UtilsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
