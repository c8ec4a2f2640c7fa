"""The matrix builder: discover → plan (base before recipes) → build → smoke-test → report.

    python scripts/build_matrix.py [--only MODEL[/TASK]]... [--changed-since REF] [--report-dir DIR]
    python scripts/build_matrix.py --github-matrix        # selected recipes as a GitHub Actions matrix
    python scripts/build_matrix.py lock [--only ...]      # regenerate the task kinds' locks, then generate
    python scripts/build_matrix.py generate [--only ...]  # rewrite generated recipe files + README catalogue
    python scripts/build_matrix.py new MODEL [--tasks T ...]  # a new family's recipe folders from its model.yaml
    python scripts/build_matrix.py catalogue              # rewrite the README's recipe table
    python scripts/build_matrix.py list                   # validate every recipe (stale generated files too)
    python scripts/build_matrix.py publish --registry HOST/NS --only ...  # push smoke-tested images (make publish)
--only all (make matrix RECIPES=all) selects every recipe.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from selfllm_runtime.metadata import TASK_FILE, MetadataError, TaskKind, kind_info

from . import catalogue
from .build import BuildError, BuildResult, build_node
from .discover import BrokenRecipe, RecipeSpec, default_base, discover, load_base, load_metadata, recipe_dirs
from .engine import EngineError, choose_base, connect, has_nvidia_runtime
from .generate import expected_files, own_lock_input, write_generated
from .images import DEFAULT_LANE, NodeKind, plan_images, recipe_of
from .layout import CACHE_DIR, LOCK_FILE, LOCK_INPUT, RECIPES_DIR, REPO_ROOT, STACKS_DIR, TASKS_DIR
from .locks import LOCK_PYTHON, compile_lock
from .scaffold import new_family
from .plan import SelectionError, select, select_by_name
from .report import RecipeReport, render_table, write_reports
from .secret_scan import url_has_credentials
from .smoke.runner import SmokeResult, cached_pass, remember_pass, remove_leftovers, run_smoke

log = logging.getLogger("selfllm")
SOURCE_URL = "https://github.com/datawhalechina/self-llm"


_interrupted = False


def _interrupt(signum, frame) -> None:  # noqa: ARG001
    """SIGINT and SIGTERM raise KeyboardInterrupt and are remembered: code that swallows the exception
    (a finalizer, where Python drops it, or a library's broad except) cannot make the run go on,
    for the matrix checks again after every build and smoke step."""
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def raise_if_interrupted() -> None:
    if _interrupted:
        raise KeyboardInterrupt


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="build_matrix", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", choices=["matrix", "lock", "list", "generate", "new", "catalogue", "publish"],
                   default="matrix")
    p.add_argument("family", nargs="?", metavar="MODEL", help="new: the family folder under recipes/ (model.yaml written)")
    p.add_argument("--tasks", nargs="+", choices=[t.value for t in TaskKind],
                   default=[t.value for t in TaskKind if kind_info(t).every_family],
                   help="new: the task kinds to scaffold (default: the kinds every family has, task.yaml kind.every_family)")
    p.add_argument("--only", action="append", default=[], metavar="MODEL[/TASK]", help="select recipes (repeatable)")
    p.add_argument("--changed-since", metavar="GIT_REF", help="only recipes whose inputs changed since GIT_REF")
    p.add_argument("--base", choices=["auto", "official", "local"], default="auto",
                   help="CUDA base: official nvidia/cuda image, the local Debian stand-in, or auto (default)")
    p.add_argument("--gpu", choices=["auto", "on", "off"], default="auto", help="GPU device request for smoke tests")
    p.add_argument("--report-dir", type=Path, help="write report.json, report.md and junit.xml here")
    p.add_argument("--github-matrix", action="store_true", help="print the selection as a GitHub Actions matrix and exit")
    p.add_argument("--no-smoke", action="store_true", help="build only")
    p.add_argument("--smoke-jobs", type=int, default=int(os.environ.get("SMOKE_JOBS", "2")), metavar="N",
                   help="smoke tests run side by side (builds stay one at a time, beside them); default $SMOKE_JOBS or 2 "
                   "(on 2 cores: 5 qwen2.5 smoke tests in 88 s instead of 128 s one at a time)")
    p.add_argument("--lane", action="append", metavar="NAME", help="which GPU builds: `default` (tag latest, or the CPU "
                   "variant without a GPU), a lane of task.yaml `lanes:` (e.g. cu13, tag :cu13) or `all`; repeatable. "
                   "matrix: default only unless given; lock: every one unless given")
    p.add_argument("--rebuild", action="store_true", help="rebuild even when inputs are unchanged")
    p.add_argument("--pip-index-url", help="PIP_INDEX_URL for image builds (e.g. the Tsinghua mirror); a build arg, "
                   "recorded in `docker history`: no credentials")
    p.add_argument("--hf-endpoint", help="HF_ENDPOINT baked into images (e.g. https://hf-mirror.com)")
    p.add_argument("--find-links", action="append", default=[], metavar="DIR_OR_URL",
                   help="lock: also resolve from here (CPU torch: https://download.pytorch.org/whl/cpu)")
    p.add_argument("--registry", metavar="HOST[:PORT]/NAMESPACE",
                   help="publish: where to push (e.g. 127.0.0.1:5000/selfllm, docker.io/selfllm)")
    p.add_argument("--stacks-only", action="store_true",
                   help="publish: only the base and the stacks of the selected recipes (CI's first job)")
    p.add_argument("--stack-from", metavar="HOST[:PORT]/NAMESPACE",
                   help="matrix: take the base and stacks published there (by input hash) instead of building them")
    return p.parse_args(argv)


def selected(args: argparse.Namespace) -> tuple[list[RecipeSpec], list[BrokenRecipe]]:
    good, broken = discover()
    keys = select([*good, *broken], args.only, args.changed_since)
    return [s for s in good if s.key in keys], [b for b in broken if b.key in keys]


def repo_recipes() -> bool:
    """Whether the builder works on the repository's own recipes (not a test's tree): only then are
    the README catalogue and recipes/last-matrix.json kept up to date."""
    return RECIPES_DIR == (REPO_ROOT / "recipes").resolve()


def lane_asked(asked: list[str], lane: str) -> bool:
    return "all" in asked or lane in asked


def lane_of_lock(recipe, lock_name: str) -> str:
    """The lane a lock of the recipe belongs to (the default build's and the CPU variant's: `default`)."""
    return next((name for name, lane in recipe.lanes.items() if lane.lock == lock_name), DEFAULT_LANE)


def check_lanes(asked: list[str], specs: list[RecipeSpec]) -> None:
    """--lane names the default build, `all` or a lane some selected recipe has; else a SelectionError."""
    known = {name for spec in specs for name in spec.recipe.lanes}
    for name in asked:
        if name not in (DEFAULT_LANE, "all") and name not in known:
            raise SelectionError(f"--lane {name!r}: no selected recipe has this lane (theirs: "
                                 f"{', '.join(sorted(known)) or 'none'}; `default` is the default build, `all` every one)")


def cmd_lock(args: argparse.Namespace, console: Console) -> int:
    """Regenerate locks, stacks first: each selected recipe's task kind (tasks/<task>/, one lock per
    task kind) or the recipe's own requirements.in where it has one; then copy them into the recipe
    folders (generate). Works on a recipe whose lock is missing or invalid (that is what it repairs),
    as long as its metadata is valid."""
    folders = {f"{d.parent.name}/{d.name}": d for d in recipe_dirs()}
    keys = select_by_name(list(folders), args.only)
    failures = 0
    links = [arg for link in args.find_links for arg in ("--find-links", link)]
    # (stack folder, lock Python, platform) → {(folder to lock, lock file): extra uv args}; a CPU variant is
    # locked against its own stack, for its own Python, without the packages it excludes; the platform is the
    # task kind's (kind.lock_platform).
    stacks: dict[tuple[Path, str, str], dict[tuple[Path, str], list[str]]] = {}
    for key in keys:
        try:
            recipe, _ = load_metadata(folders[key])
        except MetadataError as exc:
            console.print(f"[red]{key}[/]: {exc}")
            failures += 1
            continue
        platform = kind_info(recipe.task).lock_platform
        builds = [(recipe.stack, LOCK_PYTHON, LOCK_FILE, [], platform)]
        if (variant := recipe.cpu_variant) is not None:
            excluded = [arg for name in variant.lock_exclude for arg in ("--no-emit-package", name)]
            builds.append((variant.stack, variant.python, variant.lock, excluded, platform))
        try:  # a lane's lock is resolved for its base's Python
            builds += [(lane.stack, load_base(lane.base, TASKS_DIR / recipe.task.value / TASK_FILE,
                                              f"lanes.{name}.base").python, lane.lock, [], lane.lock_platform or platform)
                       for name, lane in recipe.lanes.items()]
        except MetadataError as exc:
            console.print(f"[red]{key}[/]: {exc}")
            failures += 1
            continue
        for stack, python, lock_name, extra, lock_platform in builds:
            if args.lane and not lane_asked(args.lane, lane_of_lock(recipe, lock_name)):
                continue
            own = own_lock_input(folders[key], lock_name).is_file()
            folder = folders[key] if own else TASKS_DIR / recipe.task.value
            stacks.setdefault((STACKS_DIR / stack, python, lock_platform), {})[(folder, lock_name)] = extra
    for (stack_dir, python, platform), members in sorted(stacks.items()):
        if not (stack_dir / LOCK_INPUT).is_file():
            console.print(f"[red]{stack_dir.name}[/]: no stack {stack_dir.name!r} ({stack_dir / LOCK_INPUT} missing)")
            failures += len(members)
            continue
        console.print(f"locking stack {stack_dir.relative_to(REPO_ROOT)}")
        compile_lock(stack_dir, extra_args=links, python=python, platform=platform)
        for (folder, lock_name), excluded in sorted(members.items()):
            console.print(f"locking {folder.relative_to(REPO_ROOT)}/{lock_name}")
            compile_lock(folder, constraints=stack_dir / LOCK_FILE, extra_args=links + excluded,
                         lock_name=lock_name, python=python, platform=platform)
    # A task kind's lock is shared by all its recipes: copy it into every one, not only the selected.
    return max(1 if failures else 0, cmd_generate(args, console, every_recipe=True))


def cmd_generate(args: argparse.Namespace, console: Console, every_recipe: bool = False) -> int:
    """Rewrite every selected recipe's generated files that are out of date, then the catalogue."""
    folders = {f"{d.parent.name}/{d.name}": d for d in recipe_dirs()}
    failures = 0
    for key in select_by_name(list(folders), [] if every_recipe else args.only):
        folder = folders[key]
        try:
            recipe, family = load_metadata(folder)
            written = write_generated(folder, expected_files(folder, recipe, family, folder.parent, TASKS_DIR))
        except MetadataError as exc:
            console.print(f"[red]{key}[/]: {exc}")
            failures += 1
            continue
        if written:
            console.print(f"{key}: wrote {', '.join(written)}")
    if repo_recipes() and not failures:
        good, broken = discover()
        if not broken and catalogue.update_readme(good):
            console.print(f"README.md: recipe table rewritten ({len(good)} recipes)")
    return 1 if failures else 0


def cmd_new(args: argparse.Namespace, console: Console) -> int:
    if not args.family:
        raise SelectionError("new: name the family folder, e.g. `build_matrix.py new glm4` (write recipes/glm4/model.yaml first)")
    tasks = [TaskKind(t) for t in dict.fromkeys(args.tasks)]
    try:
        written = new_family(args.family, tasks)
    except MetadataError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    for folder in written:
        console.print(f"wrote {folder.relative_to(REPO_ROOT)}/")
    if repo_recipes():
        good, broken = discover()
        if not broken:
            catalogue.update_readme(good)
    console.print(f"next: make matrix RECIPES={args.family}")
    return 0


def cmd_catalogue(console: Console) -> int:
    good, broken = discover()
    for item in broken:
        console.print(f"[red]{item.key}\tBROKEN: {item.error}[/]")
    changed = catalogue.update_readme(good)
    console.print(f"README.md: recipe table {'rewritten' if changed else 'up to date'} ({len(good)} recipes)")
    return 1 if broken else 0


def cmd_list(console: Console) -> int:
    good, broken = discover()
    for spec in good:
        console.print(f"{spec.key}\t{spec.recipe.task.value}\t{spec.stack.name}\t{spec.image}")
    for item in broken:
        console.print(f"[red]{item.key}\tBROKEN: {item.error}[/]")
    stale = 0
    if repo_recipes() and not broken:
        try:
            catalogue.check_readme(good)
        except MetadataError as exc:
            console.print(f"[red]{exc}[/]")
            stale = 1
    return 1 if broken or stale else 0


def cmd_publish(args: argparse.Namespace, console: Console) -> int:
    """Push the selected recipes' smoke-tested images (and the base and stacks under them) to --registry."""
    import datetime

    from .publish import PublishError, Registry, check_reachable, git_sha12, plan, plan_stacks, push, read_results

    try:
        if not args.registry:
            raise PublishError("publish: name the registry: --registry HOST[:PORT]/NAMESPACE (make publish REGISTRY=...)")
        registry = Registry.parse(args.registry)
        recipes, broken = selected(args)
        if broken:
            raise PublishError(f"{broken[0].key}: broken recipe ({broken[0].error}): not published")
        if not recipes:
            raise PublishError("publish: no recipe selected (RECIPES=...)")
        results = {} if args.stacks_only else read_results(args.report_dir or REPO_ROOT / "reports" / "latest")
        client = connect()
        if args.stacks_only:
            items = plan_stacks(client, registry, recipes, cpu=args.gpu == "off")
        else:
            items = plan(client, registry, recipes, results, datetime.date.today(), git_sha12())
        check_reachable(registry)
        push(client, items, say=lambda line: console.print(f"[green]✓[/] {line}"))
    except PublishError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    console.print(f"published {len(items)} images to {registry.host}/{registry.namespace}")
    return 0


def finish_step(progress: Progress, task, line: str) -> None:
    """A finished step leaves the live view and stays as a printed line (also in CI logs, where
    rich shows no live view)."""
    progress.remove_task(task)
    progress.console.print(line)


def cmd_matrix(args: argparse.Namespace, console: Console) -> int:
    extra = {k: v for k, v in {"PIP_INDEX_URL": args.pip_index_url, "HF_ENDPOINT": args.hf_endpoint}.items() if v}
    if leaks := [k for k, v in extra.items() if url_has_credentials(v)]:
        console.print(f"refused: {', '.join(leaks)} holds credentials (user:password@), which would ship in every "
                      "image's config or history; use a mirror that needs none")
        return 2
    recipes, broken = selected(args)
    rows: dict[str, RecipeReport] = {
        b.key: RecipeReport(b.key, "fail", 0.0, "", error=str(b.error), build="not built") for b in broken}
    for b in broken:
        log.error("broken recipe %s", b.error)
    if not recipes:
        console.print("no recipe selected" + (" (all selected ones are broken)" if broken else ""))
        return finish(list(rows.values()), args, console, {})

    lanes = args.lane or [DEFAULT_LANE]
    check_lanes(lanes, recipes)
    client = connect()
    gpu = {"on": True, "off": False}.get(args.gpu, has_nvidia_runtime(client))
    default = default_base()
    # A GPU build's stand-in has the base's python3 (its locks); the CPU variants' has Debian 12's (theirs).
    base = choose_base(client, args.base, default.image, default.python if gpu else None)
    log.info("CUDA base: %s (%s)", base.image, base.reason)
    lane_bases = {}  # the lanes' own bases: their official image, or the same stand-in
    for lane_base in {lane.base.name: lane.base for spec in recipes for name, lane in spec.lanes.items()
                      if lane_asked(lanes, name)}.values():
        choice = choose_base(client, args.base, lane_base.image, lane_base.python)
        log.info("CUDA base of %s: %s (%s)", lane_base.name, choice.image, choice.reason)
        lane_bases[lane_base.name] = (choice.image, client.images.get(choice.image).id)
    nodes = plan_images(recipes, base.image, client.images.get(base.image).id, extra, cpu=not gpu, lanes=lanes,
                        lane_bases=lane_bases)
    by_key = {spec.key: spec for spec in recipes}
    built: dict[str, BuildResult] = {}
    failed_parents: dict[str, str] = {}
    report_dir = args.report_dir or CACHE_DIR / "last-run"
    meta = {"base": f"{base.image} ({base.reason})", "engine": "nvidia runtime (GPU)" if gpu else "no nvidia runtime (CPU)"}
    left = remove_leftovers(client)
    if left:
        log.warning("removed %d container(s) left by an interrupted run", left)
    pending: list[Future] = []
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=False) as progress, ThreadPoolExecutor(max(args.smoke_jobs, 1)) as smokers:
        for node in nodes:
            started = time.monotonic()
            task = progress.add_task(f"build {node.key}", total=None)
            blocked = next((failed_parents[p] for p in node.parents if p in failed_parents), None)
            if blocked:
                failed_parents[node.key] = blocked
                finish_step(progress, task, f"[red]✗[/] {node.key}: not built ({blocked})")
                if node.kind is NodeKind.recipe:
                    rows[node.key] = RecipeReport(node.key, "fail", 0.0, node.tag, error=blocked, build="not built")
                continue
            if args.stack_from and node.kind in (NodeKind.base, NodeKind.stack) and not args.rebuild:
                from .publish import Registry, pull_published

                if pull_published(client, Registry.parse(args.stack_from), node.tag, node.input_hash):
                    log.info("took %s from %s (input hash %s)", node.tag, args.stack_from, node.input_hash)
            try:
                result = build_node(client, node, report_dir / "logs", SOURCE_URL, force=args.rebuild)
                raise_if_interrupted()
            except BuildError as exc:
                raise_if_interrupted()
                failed_parents[node.key] = f"build of {node.key} failed"
                finish_step(progress, task, f"[red]✗[/] build {node.key}")
                if node.kind is NodeKind.recipe:
                    rows[node.key] = RecipeReport(node.key, "fail", time.monotonic() - started, node.tag,
                                                  error=str(exc), build="failed")
                else:
                    log.error("%s", exc)
                continue
            built[node.key] = result
            how = "reused" if result.reused else "built"
            finish_step(progress, task, f"[green]✓[/] {how} {node.key} ({node.tag})")
            if node.kind is not NodeKind.recipe:
                continue
            spec = by_key[recipe_of(node.key)]
            build_seconds = time.monotonic() - started
            row = RecipeReport(node.key, "pass", build_seconds, node.tag, build=how,
                               image_id=result.image_id, input_hash=node.input_hash,
                               image_bytes=client.images.get(result.image_id).attrs.get("Size", 0))
            rows[node.key] = row
            if args.no_smoke:
                row.status, row.smoke = "skip", "--no-smoke"
                continue
            if not gpu and node.key != spec.key:  # a lane is a GPU build only: its engine's CPU build is the variant
                row.status, row.level = "skip", "cpu"
                row.smoke = f"not run without a GPU: the {node.tag.rsplit(':', 1)[1]} lane is a GPU build only"
                log.warning("%s: smoke test not run (no GPU): a lane has no CPU variant", node.key)
                continue
            if not gpu and spec.recipe.smoke.needs_gpu:  # said in the table, the reports and the README
                row.status, row.level, row.needs_gpu = "skip", "cpu", True
                row.smoke = f"not run without a GPU: {spec.recipe.smoke.needs_gpu}"
                log.warning("%s: smoke test not run (no GPU): %s", node.key, spec.recipe.smoke.needs_gpu)
                continue
            smoke = cached_pass(spec, result.image_id, gpu)
            if smoke is not None:
                record_smoke(row, smoke, build_seconds, build_seconds, progress, None)
                continue
            smoke_task = progress.add_task(f"smoke {node.key}", total=None)
            pending.append(smokers.submit(smoke_and_record, spec, node, row, result.image_id, gpu, report_dir,
                                          build_seconds, progress, smoke_task))
            if args.smoke_jobs <= 1:  # one at a time: the next build waits for this smoke
                pending.pop().result()
        for future in pending:
            future.result()
    raise_if_interrupted()
    return finish(list(rows.values()), args, console, meta)


def smoke_and_record(spec: RecipeSpec, node, row: RecipeReport, image_id: str, gpu: bool, report_dir: Path,
                     build_seconds: float, progress: Progress, smoke_task) -> None:
    """One recipe's smoke test (on a worker thread with --smoke-jobs > 1), remembered when it passes."""
    started = time.monotonic()
    smoke = run_smoke(spec, node.tag, gpu, report_dir)
    if smoke.ok:
        remember_pass(spec, image_id, gpu, smoke)
    record_smoke(row, smoke, build_seconds, build_seconds + time.monotonic() - started, progress, smoke_task)


def record_smoke(row: RecipeReport, smoke: SmokeResult, build_seconds: float, seconds: float, progress: Progress,
                 smoke_task) -> None:
    row.seconds = seconds
    if not smoke.reused:
        row.phases = {"build": round(build_seconds, 2), **smoke.phases}
    row.smoke = ("reused: " if smoke.reused else "") + smoke.detail.splitlines()[0]
    row.level = smoke.level
    if not smoke.ok:
        row.status, row.error = "fail", smoke.detail
    mark = "[green]✓[/]" if smoke.ok else "[red]✗[/]"
    line = f"{mark} smoke {row.recipe}: {row.smoke}"
    if smoke_task is None:
        progress.console.print(line)
    else:
        finish_step(progress, smoke_task, line)


def finish(rows: list[RecipeReport], args: argparse.Namespace, console: Console, meta: dict) -> int:
    rows.sort(key=lambda r: r.recipe)
    render_table(rows, console)
    if repo_recipes() and rows:
        catalogue.record_results(rows)
        good, broken = discover()
        if not broken and catalogue.update_readme(good):
            console.print("README.md: recipe table updated with this run's results")
    if args.report_dir:
        write_reports(rows, args.report_dir, meta)
        console.print(f"report: {args.report_dir}/report.json, report.md, junit.xml")
    return 1 if any(r.status == "fail" for r in rows) else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stream = sys.stderr if args.github_matrix else sys.stdout
    console = Console(stderr=args.github_matrix, width=None if stream.isatty() else 160)
    logging.basicConfig(level=logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, show_time=False)])
    for noisy in ("httpx", "httpx2", "testcontainers"):  # per-request and per-container lines of smoke clients
        logging.getLogger(noisy).setLevel(logging.WARNING)
    global _interrupted
    _interrupted = False
    # Ctrl-C cleans up even when started from a script's background job (which inherits SIGINT ignored).
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        if args.github_matrix:
            recipes, broken = selected(args)
            keys = sorted([s.key for s in recipes] + [b.key for b in broken])
            print(json.dumps({"recipe": keys}))
            return 0
        if args.command != "new" and args.family:
            raise SelectionError(f"unexpected argument {args.family!r} (only `new` takes a family name)")
        commands = {"lock": lambda: cmd_lock(args, console), "generate": lambda: cmd_generate(args, console),
                    "new": lambda: cmd_new(args, console), "list": lambda: cmd_list(console),
                    "catalogue": lambda: cmd_catalogue(console), "matrix": lambda: cmd_matrix(args, console),
                    "publish": lambda: cmd_publish(args, console)}
        return commands[args.command]()
    except (SelectionError, EngineError, MetadataError) as exc:  # MetadataError: e.g. recipes/upstream-families.yaml
        console.print(f"[red]error:[/] {exc}")
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: removing smoke-test containers[/]")
        try:
            remove_leftovers(connect(), own=True)
        except EngineError:
            pass
        return 130
