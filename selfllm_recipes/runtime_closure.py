"""Which runtime files a task kind runs: the import closure of its entry points, computed from the source.

A recipe image carries only these (plus its family's data), so its input hash changes only when code it runs
changes: an edit of `finetune/lora.py` re-tests the lora recipes, an edit of `settings.py` every recipe. Every
`import` counts, also one inside a function (it runs when that path runs); besides imports, a module that names
a sibling file in a string (`webdemo.py` starts `streamlit run webdemo_app.py`) needs that file, and a package's
data folders (finetune/data/, lc/sample_docs/) go with the modules beside them. `selfllm` finds a task's module
by name (task.yaml `kind.module`, importlib), so no task module imports another's."""
from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

from selfllm_runtime.metadata import TaskKind, kind_info

from .layout import RUNTIME_DIR

PACKAGE = "selfllm_runtime"
PACKAGE_DIR = RUNTIME_DIR / PACKAGE
# What every image runs before its task: `python3 -m selfllm_runtime` → cli (start, health, settings, smoke-model).
COMMON_ENTRIES = ("__init__.py", "__main__.py", "cli.py", "tasks/__init__.py")


def _module_file(dotted: str) -> Path | None:
    """selfllm_runtime.a.b → runtime/selfllm_runtime/a/b.py (or its package's __init__.py)."""
    parts = dotted.split(".")
    if parts[0] != PACKAGE:
        return None
    base = PACKAGE_DIR.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _dotted(path: Path) -> str:
    parts = list(path.relative_to(RUNTIME_DIR).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def direct_needs(path: Path) -> frozenset[Path]:
    """Runtime files `path` needs itself: what it imports (anywhere in it), sibling files it names in a string,
    and the __init__.py of its package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _dotted(path) if path.name == "__init__.py" else _dotted(path).rpartition(".")[0]
    needs: set[Path] = set()

    def add(dotted: str) -> None:
        if (found := _module_file(dotted)) is not None:
            needs.add(found)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            add(origin)
            for alias in node.names:  # `from . import resume`: a submodule
                add(f"{origin}.{alias.name}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(".py"):
            sibling = path.parent / node.value
            if "/" not in node.value and sibling.is_file():
                needs.add(sibling)
    if path.parent != PACKAGE_DIR or path.name != "__init__.py":
        init = path.parent / "__init__.py"
        if init.is_file() and init != path:
            needs.add(init)
    needs.discard(path)
    return frozenset(needs)


def _data_files(folder: Path) -> set[Path]:
    """Files of the non-package subfolders of `folder` (a package's data), recursively."""
    found: set[Path] = set()
    for sub in folder.iterdir():
        if sub.is_dir() and not (sub / "__init__.py").exists() and sub.name != "__pycache__":
            found |= {p for p in sub.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    return found


@cache
def task_files(task: TaskKind) -> frozenset[Path]:
    """Every runtime file task kind `task` may run or read, from its entry points."""
    entries = [PACKAGE_DIR / e for e in COMMON_ENTRIES] + [PACKAGE_DIR / "tasks" / f"{kind_info(task).module}.py"]
    seen: set[Path] = set()
    todo = list(entries)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo.extend(direct_needs(path) - seen)
    for folder in {p.parent for p in seen}:
        seen |= _data_files(folder)
    return frozenset(seen)


def task_context_files(task: TaskKind) -> dict[str, Path]:
    """The task's runtime files as build-context names (selfllm_runtime/...)."""
    return {str(p.relative_to(RUNTIME_DIR)): p for p in sorted(task_files(task))}
