"""Select which recipes to build: --only MODEL[/TASK] (repeatable) and --changed-since GIT_REF."""
from __future__ import annotations

import subprocess
from collections.abc import Sequence

from .discover import BrokenRecipe, RecipeSpec
from .layout import REPO_ROOT
from .runtime_closure import task_files
from .smoke.runner import check_files

# Paths whose change affects every recipe (the runtime's modules and the smoke checks: only where a recipe's task
# kind runs them, recipe_inputs).
SHARED_PATHS = ("base-images/cuda12.1/", "runtime/Dockerfile", "runtime/bin/", "tasks/Dockerfile.j2")


class SelectionError(ValueError):
    pass


ALL = "all"  # --only all (make matrix RECIPES=all): every recipe


def _matches(key: str, selector: str) -> bool:
    selector = selector.strip().strip("/")
    return selector == ALL or key == selector or key.split("/")[0] == selector


def select_by_name(keys: Sequence[str], only: Sequence[str]) -> list[str]:
    if not only:
        return list(keys)
    chosen: list[str] = []
    for selector in only:
        hits = [k for k in keys if _matches(k, selector)]
        if not hits:
            raise SelectionError(f"--only {selector!r}: no such recipe (known: {', '.join(keys) or 'none'})")
        chosen += [k for k in hits if k not in chosen]
    return chosen


def changed_paths(ref: str) -> list[str]:
    def git(*args: str) -> list[str]:
        result = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            raise SelectionError(f"--changed-since {ref!r}: {result.stderr.strip() or 'git failed'}")
        return [line for line in result.stdout.splitlines() if line]

    # the ref is resolved to a commit first (a ref such as `--output=FILE` is never an option to git diff)
    resolved = subprocess.run(["git", "rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}"],
                              cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    if not resolved:
        raise SelectionError(f"--changed-since {ref!r}: not a commit of this repository")
    return git("diff", "--name-only", resolved, "--") + git("ls-files", "--others", "--exclude-standard")


def recipe_inputs(spec: RecipeSpec) -> list[str]:
    """Repo paths (a folder ends in /) whose change changes the recipe's image or the check that judges it."""
    rel = lambda p: str(p.relative_to(REPO_ROOT)) + "/"  # noqa: E731
    task = spec.recipe.task
    code = [rel(spec.model_dir) + spec.family.remote_code.folder + "/"] if spec.family.remote_code else []
    return ([rel(spec.dir), rel(spec.model_dir) + "model.yaml", rel(spec.model_dir) + spec.family.chat_template, *code,
             f"tasks/{task.value}/", rel(spec.stack.dir)] + ([rel(spec.cpu_stack.dir)] if spec.cpu_stack else [])
            + [rel(folder) for lane in spec.lanes.values() for folder in (lane.stack.dir, lane.base.dir)]
            + [rel(p).rstrip("/") for p in sorted(task_files(task))]
            + [rel(p).rstrip("/") for p in check_files(task.value)])


def select_changed(specs: Sequence[RecipeSpec | BrokenRecipe], ref: str) -> list[str]:
    paths = changed_paths(ref)
    if any(p.startswith(SHARED_PATHS) for p in paths):
        return [s.key for s in specs]
    chosen = []
    for spec in specs:
        inputs = recipe_inputs(spec) if isinstance(spec, RecipeSpec) else [str(spec.dir.relative_to(REPO_ROOT)) + "/"]
        if any(p == i.rstrip("/") or p.startswith(i) for p in paths for i in inputs):
            chosen.append(spec.key)
    return chosen


def select(specs: Sequence[RecipeSpec | BrokenRecipe], only: Sequence[str], changed_since: str | None) -> list[str]:
    keys = select_by_name([s.key for s in specs], only)
    if changed_since:
        changed = set(select_changed(specs, changed_since))
        keys = [k for k in keys if k in changed]
    return keys
