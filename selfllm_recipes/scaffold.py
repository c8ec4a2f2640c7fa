"""Scaffold: a new model family's recipe folders, written from its model.yaml in one step.

    python scripts/build_matrix.py new MODEL [--tasks fastapi webdemo ...]

The contributor writes recipes/MODEL/model.yaml and the chat template; this checks them (schema,
template file, architecture class, LoRA targets against a tiny model of that class), then writes
every task folder (recipe.yaml + generated Dockerfile, README, locks). Everything is staged in a
temporary folder and moved into place only when all of it was made: a failure leaves nothing.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from selfllm_runtime.metadata import (
    MODEL_FILE,
    RECIPE_FILE,
    MetadataError,
    ModelFamily,
    RecipeOverrides,
    TaskKind,
    load_family,
    load_task_defaults,
    merge_recipe,
)

from .generate import expected_files, write_atomically
from .layout import RECIPES_DIR, TASKS_DIR


def check_family_model(model_dir: Path, family: ModelFamily) -> None:
    """The architecture is a transformers class and every LoRA target is a module of it."""
    from selfllm_runtime.smoke_model import module_names

    path = model_dir / MODEL_FILE
    try:
        names = module_names(family)
    except ImportError as exc:
        raise MetadataError(path, "architecture", f"cannot check it: {exc} (install the test extras)") from None
    except ValueError as exc:
        raise MetadataError(path, "architecture", str(exc)) from None
    for index, target in enumerate(family.lora.target_modules):
        if target not in names:
            linear = sorted(n for n in names if n.endswith("proj"))
            raise MetadataError(path, f"lora.target_modules.{index}",
                                f"{target!r} is no module of {family.architecture} (its projections: {', '.join(linear)})")


def recipe_yaml(model: str, task: TaskKind) -> str:
    return (f"# Only what differs from tasks/{task.value}/task.yaml and ../{MODEL_FILE}.\n"
            f"model: {model}\ntask: {task.value}\n")


def new_family(model: str, tasks: list[TaskKind], recipes_dir: Path = RECIPES_DIR,
               tasks_dir: Path = TASKS_DIR) -> list[Path]:
    """Write recipes/<model>/<task>/ for each task; the folders written."""
    model_dir = recipes_dir / model
    if not (model_dir / MODEL_FILE).is_file():
        raise MetadataError(model_dir / MODEL_FILE, "(file)",
                            "missing: write the family's model.yaml and chat template first (see README)")
    for task in tasks:
        if (model_dir / task.value).exists():
            raise MetadataError(model_dir / task.value, "(folder)",
                                "already exists: this family has that recipe (edit its recipe.yaml, then run generate)")
    family = load_family(model_dir)
    check_family_model(model_dir, family)
    staging = Path(tempfile.mkdtemp(prefix=".new-", dir=model_dir))
    try:
        for task in tasks:
            folder = staging / task.value
            text = recipe_yaml(model, task)
            own = RecipeOverrides(model=model, task=task)
            defaults = load_task_defaults(tasks_dir, task, model_dir / task.value / RECIPE_FILE)
            recipe = merge_recipe(model_dir / task.value / RECIPE_FILE, defaults, family, own)
            write_atomically(folder / RECIPE_FILE, text.encode())
            for item in expected_files(folder, recipe, family, model_dir, tasks_dir):
                write_atomically(folder / item.name, item.content)
        written = []
        for task in tasks:
            (staging / task.value).rename(model_dir / task.value)
            written.append(model_dir / task.value)
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
