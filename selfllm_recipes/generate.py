"""Generate: the files of a recipe folder that every recipe of its task kind shares in shape
(Dockerfile, README, dependency locks), made from tasks/ and the family's data, never hand-copied.

A recipe folder stays a complete Docker build context; only recipe.yaml (and, where a family
really needs other pins, its own requirements.in) is written by hand. `check_generated` finds a
generated file that is out of date with its inputs; `write_generated` rewrites them.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from selfllm_runtime.metadata import (PROJECT_CREDIT, QUANTIZATIONS, MetadataError, ModelFamily, Recipe, TaskKind,
                                      kind_info, vram_text)
from selfllm_runtime.settings import settings_table
from selfllm_runtime.model_source import upstream_names
from selfllm_runtime.tasks.vllm_server import mm_limits

from .layout import DOCKERFILE_TEMPLATE, LOCK_FILE, LOCK_INPUT, README_TEMPLATE, REPO_ROOT, image_name
from .locks import parse_lock

GENERATE_COMMAND = "python scripts/build_matrix.py generate"


@dataclass(frozen=True)
class GeneratedFile:
    name: str  # file name in the recipe folder
    content: bytes
    sources: tuple[Path, ...]  # the inputs it is made from


SHARED_README_PARTS = ("access.md.j2", "lanes.md.j2", "settings.md.j2", "vram.md.j2")  # macros the README templates import
SETTINGS_SOURCE = REPO_ROOT / "runtime" / "selfllm_runtime" / "settings.py"  # the READMEs' settings tables


def _environment(tasks_dir: Path) -> Environment:
    return Environment(loader=FileSystemLoader(str(tasks_dir)), undefined=StrictUndefined,
                       keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True, autoescape=False)


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def own_lock_input(recipe_dir: Path, lock_name: str) -> Path:
    """The recipe's own hand-edited lock input (a family that needs other pins), if any."""
    return recipe_dir / (LOCK_INPUT if lock_name == LOCK_FILE else lock_name.removesuffix(".lock") + ".in")


def lock_names(recipe: Recipe) -> list[str]:
    """Its locks: the default build's, the CPU variant's, each lane's."""
    return [LOCK_FILE] + ([recipe.cpu_variant.lock] if recipe.cpu_variant else []) + [
        lane.lock for lane in recipe.lanes.values()]


def vram_table(family: ModelFamily, task: TaskKind, lang: str) -> str:
    """The family's VRAM table (GB): a row per QUANTIZATION, a column per task kind, this recipe's in bold."""
    bf16 = "（bf16）" if lang == "zh" else " (bf16)"
    head = ["`QUANTIZATION`"] + [f"**{kind_info(t).heading}**" if t is task else kind_info(t).heading for t in TaskKind]
    rows = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for quantization in QUANTIZATIONS:
        cells = [f"`{quantization}`" + (bf16 if quantization == "none" else "")]
        for kind in TaskKind:
            gb = family.vram_estimate(kind, quantization)
            cell = "—" if gb is None else vram_text(gb, family.gpus_for(kind))[0]
            cells.append(f"**{cell}**" if kind is task and gb is not None else cell)
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def pinned_versions(task_dir: Path, recipe: Recipe) -> dict[str, dict[str, str]]:
    """{"gpu": {package: version}, "cpu": {...}, <lane>: {...}} from the task kind's locks, for the README's version
    lines."""
    found = {"gpu": {p.key: p.version for p in parse_lock(task_dir / LOCK_FILE)}, "cpu": {}}
    if recipe.cpu_variant is not None:
        found["cpu"] = {p.key: p.version for p in parse_lock(task_dir / recipe.cpu_variant.lock)}
    for name, lane in recipe.lanes.items():
        found[name] = {p.key: p.version for p in parse_lock(task_dir / lane.lock)}
    return found


def template_context(recipe: Recipe, family: ModelFamily, tasks_dir: Path = REPO_ROOT / "tasks") -> dict:
    key = f"{recipe.model}/{recipe.task.value}"
    return {
        "key": key,
        "model": recipe.model,
        "task": recipe.task.value,
        "image": image_name(key),
        "recipe": recipe,
        "family": family,
        "credits": [n for n in recipe.contributors if n != PROJECT_CREDIT],
        # every setting of the task, from its one definition (runtime/selfllm_runtime/settings.py)
        "settings_zh": settings_table(recipe, family, "zh"),
        "settings_en": settings_table(recipe, family, "en"),
        "vram_zh": vram_table(family, recipe.task, "zh"),
        "vram_en": vram_table(family, recipe.task, "en"),
        "versions": pinned_versions(tasks_dir / recipe.task.value, recipe),
        # the names vLLM serves the default checkpoint under (the model id MODEL_SOURCE picks by default first)
        "served_names": upstream_names(recipe.default_model.modelscope, recipe, family),
        # vLLM's --limit-mm-per-prompt of a family that takes images / video ({} for text only)
        "mm_limits": mm_limits(family.modalities),
    }


def expected_files(recipe_dir: Path, recipe: Recipe, family: ModelFamily, model_dir: Path,
                   tasks_dir: Path) -> list[GeneratedFile]:
    """What the generated files of recipe_dir must hold, given their inputs."""
    env = _environment(tasks_dir)
    context = template_context(recipe, family, tasks_dir)
    task_dir = tasks_dir / recipe.task.value
    family_inputs = (model_dir / "model.yaml", recipe_dir / "recipe.yaml", task_dir / "task.yaml")
    files: list[GeneratedFile] = []
    for name, template in (("Dockerfile", DOCKERFILE_TEMPLATE), ("README.md", f"{recipe.task.value}/{README_TEMPLATE}")):
        source = tasks_dir / template
        if not source.is_file():
            raise MetadataError(source, "(file)", f"missing: the template of every recipe's {name}")
        text = env.get_template(template).render(**context)
        shared = tuple(tasks_dir / part for part in SHARED_README_PARTS if name == "README.md") + (
            (SETTINGS_SOURCE, *(task_dir / lock for lock in lock_names(recipe))) if name == "README.md" else ())
        files.append(GeneratedFile(name, text.encode("utf-8"), (source, *shared, *family_inputs)))
    for lock in lock_names(recipe):
        if own_lock_input(recipe_dir, lock).is_file():
            continue  # this recipe pins its own dependencies: its lock is compiled, not copied
        source = task_dir / lock
        if not source.is_file():
            raise MetadataError(source, "(file)", "missing; run `make lock` to generate the task's lock")
        files.append(GeneratedFile(lock, source.read_bytes(), (source,)))
    return files


def stale_files(recipe_dir: Path, files: list[GeneratedFile]) -> list[GeneratedFile]:
    return [f for f in files if not (recipe_dir / f.name).is_file() or (recipe_dir / f.name).read_bytes() != f.content]


def check_generated(recipe_dir: Path, files: list[GeneratedFile]) -> None:
    """A MetadataError naming the first generated file that is missing or out of date."""
    for item in stale_files(recipe_dir, files):
        path = recipe_dir / item.name
        if not path.is_file():
            raise MetadataError(path, "(file)", f"missing; run `{GENERATE_COMMAND}`")
        inputs = ", ".join(_shown(s) for s in item.sources)
        raise MetadataError(path, "(generated)", f"out of date with its inputs ({inputs}); run `{GENERATE_COMMAND}`")


def write_atomically(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "wb") as out:
        out.write(content)
    os.chmod(temp, 0o644)
    os.replace(temp, path)


def write_generated(recipe_dir: Path, files: list[GeneratedFile]) -> list[str]:
    """Rewrite the stale files; the names of those rewritten."""
    stale = stale_files(recipe_dir, files)
    for item in stale:
        write_atomically(recipe_dir / item.name, item.content)
    return [item.name for item in stale]
