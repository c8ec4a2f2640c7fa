"""Discover: find every recipe folder and validate it into a RecipeSpec, or a BrokenRecipe."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field
from selfllm_runtime.metadata import (
    MODEL_FILE,
    task_kind_names,
    RECIPE_FILE,
    GpuLane,
    MetadataError,
    ModelFamily,
    Recipe,
    Strict,
    _validate,
    load_family,
    load_recipe,
)

from .generate import check_generated, expected_files
from .layout import (BASE_FILE, BASE_IMAGES_DIR, DEFAULT_BASE, LOCK_FILE, RECIPES_DIR, SHARED_STACK_DOCKERFILE,
                     STACKS_DIR, TASKS_DIR, image_name)
from .locks import Pin, check_against_stack, parse_lock


class CudaBase(Strict):
    """base-images/<base>/base.yaml: what the builder needs of a CUDA base besides its Dockerfile."""

    image: str = Field(pattern=r"^[\w./-]+:[\w.-]+$", description="the official image it builds on (--base official)")
    python: str = Field(pattern=r"^3\.\d+$", description="its python3: the locks of the builds on it are resolved for it")
    dockerfile: str = Field("Dockerfile", description="its Dockerfile, relative to its folder (another base's: the "
                            "same steps on another image)")


@dataclass(frozen=True)
class BaseSpec:
    name: str  # folder under base-images/, e.g. cuda13.0; its image is selfllm/base:<name>
    dir: Path
    image: str  # the official image (base.yaml)
    python: str
    dockerfile: Path


def load_base(name: str, referenced_by: Path, field_name: str = "base") -> BaseSpec:
    folder = BASE_IMAGES_DIR / name
    if not (folder / BASE_FILE).is_file():
        raise MetadataError(referenced_by, field_name, f"no CUDA base {name!r} (expected {folder / BASE_FILE})")
    data: CudaBase = _validate(CudaBase, folder / BASE_FILE)
    dockerfile = (folder / data.dockerfile).resolve()
    if not dockerfile.is_file():
        raise MetadataError(folder / BASE_FILE, "dockerfile", f"{dockerfile} not found")
    return BaseSpec(name, folder, data.image, data.python, dockerfile)


def default_base() -> BaseSpec:
    return load_base(DEFAULT_BASE, BASE_IMAGES_DIR / DEFAULT_BASE)


@dataclass(frozen=True)
class StackSpec:
    name: str
    dir: Path
    pins: tuple[Pin, ...]
    dockerfile: Path  # the folder's own, else base-images/stacks/Dockerfile (shared by the CUDA stacks)


@dataclass(frozen=True)
class LaneSpec:
    """One of a recipe's lanes (task.yaml lanes:, GpuLane): its base, stack and lock, tagged :<name>."""

    name: str
    lane: GpuLane
    base: BaseSpec
    stack: StackSpec

    def build_args(self) -> dict[str, str]:
        return {"RECIPE_LOCK": self.lane.lock}


@dataclass(frozen=True)
class RecipeSpec:
    key: str  # "qwen3/fastapi"
    dir: Path
    model_dir: Path
    recipe: Recipe
    family: ModelFamily
    stack: StackSpec
    pins: tuple[Pin, ...] = field(repr=False)
    cpu_stack: StackSpec | None = None  # recipe.cpu_variant's stack, when the recipe has a CPU build
    lanes: dict[str, LaneSpec] = field(default_factory=dict)  # its GPU builds besides the default one, by tag

    def variant(self, cpu: bool) -> tuple[StackSpec, str, dict[str, str]]:
        """(stack, lock file name, build args) of the build to make: the CPU variant when asked for
        and declared, else the recipe's own (GPU) build."""
        variant = self.recipe.cpu_variant
        if cpu and variant is not None and self.cpu_stack is not None:
            return self.cpu_stack, variant.lock, {"RECIPE_LOCK": variant.lock, **variant.build_args}
        return self.stack, LOCK_FILE, {}

    @property
    def image(self) -> str:
        return image_name(self.key)


@dataclass(frozen=True)
class BrokenRecipe:
    key: str
    dir: Path
    error: MetadataError


def recipe_dirs(root: Path = RECIPES_DIR) -> list[Path]:
    """Folders recipes/<model>/<task>/ (a task folder is one holding a recipe.yaml or a Dockerfile)."""
    found = {p.parent for pattern in (f"*/*/{RECIPE_FILE}", "*/*/Dockerfile") for p in root.glob(pattern)}
    return sorted(found)


def load_stack(name: str, referenced_by: Path) -> StackSpec:
    folder = STACKS_DIR / name
    if not folder.is_dir():
        raise MetadataError(referenced_by, "stack", f"no stack {name!r} (expected the folder {folder})")
    own = folder / "Dockerfile"
    return StackSpec(name, folder, tuple(parse_lock(folder / LOCK_FILE)),
                     own if own.is_file() else SHARED_STACK_DOCKERFILE)


def load_metadata(task_dir: Path, tasks_dir: Path = TASKS_DIR) -> tuple[Recipe, ModelFamily]:
    """The recipe's effective metadata and its family (what its generated files are made from)."""
    model_dir = task_dir.parent
    if not (task_dir / RECIPE_FILE).is_file():
        raise MetadataError(task_dir / RECIPE_FILE, "(file)", "missing")
    recipe = load_recipe(task_dir, model_dir.parent, tasks_dir)
    if recipe.model != model_dir.name:
        raise MetadataError(task_dir / RECIPE_FILE, "model", f"{recipe.model!r} must equal its folder {model_dir.name!r}")
    if recipe.task.value != task_dir.name:
        raise MetadataError(task_dir / RECIPE_FILE, "task", f"{recipe.task.value!r} must equal its folder {task_dir.name!r}")
    family = load_family(model_dir)
    unknown = sorted(family.task_names() - set(task_kind_names(tasks_dir)))
    if unknown:
        raise MetadataError(model_dir / MODEL_FILE, "vram_gb / contributors",
                            f"{', '.join(map(repr, unknown))}: no such task kind (the folders of {tasks_dir})")
    return recipe, family


def load_spec(task_dir: Path, tasks_dir: Path = TASKS_DIR) -> RecipeSpec:
    """One recipe folder, validated: metadata (task defaults, family, recipe.yaml), generated files
    up to date, locks pinned and hashed and agreeing with their stack."""
    model_dir = task_dir.parent
    key = f"{model_dir.name}/{task_dir.name}"
    recipe, family = load_metadata(task_dir, tasks_dir)
    lane_bases = {name: load_base(lane.base, tasks_dir / recipe.task.value / "task.yaml", f"lanes.{name}.base")
                  for name, lane in recipe.lanes.items()}
    check_generated(task_dir, expected_files(task_dir, recipe, family, model_dir, tasks_dir))
    stack = load_stack(recipe.stack, task_dir / RECIPE_FILE)
    pins = parse_lock(task_dir / LOCK_FILE)
    check_against_stack(task_dir / LOCK_FILE, pins, stack.dir / LOCK_FILE, list(stack.pins))
    cpu_stack = None
    if recipe.cpu_variant is not None:
        cpu_stack = load_stack(recipe.cpu_variant.stack, task_dir / RECIPE_FILE)
        cpu_lock = task_dir / recipe.cpu_variant.lock
        check_against_stack(cpu_lock, parse_lock(cpu_lock), cpu_stack.dir / LOCK_FILE, list(cpu_stack.pins))
    lanes = {}
    for name, lane in recipe.lanes.items():
        lane_stack = load_stack(lane.stack, task_dir / RECIPE_FILE)
        lane_lock = task_dir / lane.lock
        check_against_stack(lane_lock, parse_lock(lane_lock), lane_stack.dir / LOCK_FILE, list(lane_stack.pins))
        lanes[name] = LaneSpec(name, lane, lane_bases[name], lane_stack)
    return RecipeSpec(key, task_dir, model_dir, recipe, family, stack, tuple(pins), cpu_stack, lanes)


def discover(root: Path = RECIPES_DIR, tasks_dir: Path = TASKS_DIR) -> tuple[list[RecipeSpec], list[BrokenRecipe]]:
    """All recipes under root. A broken one is reported, never fatal to the others."""
    good: list[RecipeSpec] = []
    broken: list[BrokenRecipe] = []
    for task_dir in recipe_dirs(root):
        try:
            good.append(load_spec(task_dir, tasks_dir))
        except MetadataError as exc:
            broken.append(BrokenRecipe(f"{task_dir.parent.name}/{task_dir.name}", task_dir, exc))
    return good, broken


__all__ = ["BaseSpec", "BrokenRecipe", "LaneSpec", "RecipeSpec", "StackSpec", "discover", "load_metadata", "load_spec", "recipe_dirs", "MODEL_FILE"]
