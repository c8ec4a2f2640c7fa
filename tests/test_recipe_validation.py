"""Discovery and validation: a broken recipe gets one clear error naming file and field."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from selfllm_recipes.discover import discover
from selfllm_recipes.generate import expected_files, write_generated
from selfllm_recipes.layout import RECIPES_DIR, TASKS_DIR
from selfllm_recipes.locks import parse_lock
from selfllm_runtime.metadata import MetadataError, load_family, load_recipe

QWEN3 = RECIPES_DIR / "qwen3"


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """recipes/qwen3 with only its fastapi task."""
    root = tmp_path / "recipes"
    (root / "qwen3").mkdir(parents=True)
    for path in QWEN3.iterdir():
        if path.is_file():
            shutil.copy(path, root / "qwen3" / path.name)
    shutil.copytree(QWEN3 / "fastapi", root / "qwen3" / "fastapi", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def own_lock(tree: Path) -> Path:
    """Give qwen3/fastapi its own requirements.in: its lock is then compiled for it, not generated."""
    folder = tree / "qwen3/fastapi"
    shutil.copy(TASKS_DIR / "fastapi/requirements.in", folder / "requirements.in")
    return folder / "requirements.lock"


def regenerate(recipe_dir: Path) -> None:
    recipe = load_recipe(recipe_dir, recipe_dir.parent.parent, TASKS_DIR)
    write_generated(recipe_dir, expected_files(recipe_dir, recipe, load_family(recipe_dir.parent), recipe_dir.parent, TASKS_DIR))


def test_repository_recipes_are_valid():
    good, broken = discover()
    assert not broken, [str(b.error) for b in broken]
    assert "qwen3/fastapi" in [g.key for g in good]


def test_bad_yaml_names_file_and_line(tree: Path):
    (tree / "qwen3/fastapi/recipe.yaml").write_text("name: x\ntask: [fastapi\n")
    good, broken = discover(tree)
    (item,) = [b for b in broken if b.key == "qwen3/fastapi"]
    assert item.error.path.name == "recipe.yaml"
    assert item.error.field.startswith("line ")
    assert "invalid YAML" in str(item.error)


def test_unknown_field_is_named(tree: Path):
    path = tree / "qwen3/fastapi/recipe.yaml"
    path.write_text(path.read_text() + "gpus_please: 8\n")
    _, broken = discover(tree)
    assert broken[0].error.field == "gpus_please"
    assert "Extra inputs are not permitted" in broken[0].error.problem


def test_wrong_task_value_is_named(tree: Path):
    path = tree / "qwen3/fastapi/recipe.yaml"
    path.write_text(path.read_text().replace("task: fastapi", "task: finetune"))
    _, broken = discover(tree)
    assert broken[0].error.field == "task"


def test_missing_file_is_named(tree: Path):
    (tree / "qwen3/fastapi/README.md").unlink()
    _, broken = discover(tree)
    assert broken[0].error.path.name == "README.md" and broken[0].error.problem.startswith("missing")


def test_unpinned_requirement_names_lock_line(tree: Path):
    lock = own_lock(tree)
    lock.write_text("transformers>=4.51 \\\n    --hash=sha256:abc\n" + lock.read_text())
    _, broken = discover(tree)
    assert broken[0].error.path == lock and broken[0].error.field == "line 1"
    assert "not pinned with ==" in broken[0].error.problem


def test_requirement_without_hash_is_rejected(tmp_path: Path):
    lock = tmp_path / "requirements.lock"
    lock.write_text("torch==2.6.0\n")
    with pytest.raises(MetadataError, match="has no --hash"):
        parse_lock(lock)


def test_lock_must_match_the_stack(tree: Path):
    lock = own_lock(tree)
    lock.write_text(lock.read_text().replace("torch==2.6.0", "torch==2.5.1"))
    _, broken = discover(tree)
    assert "torch must be ==2.6.0" in broken[0].error.problem


def test_broken_model_yaml_breaks_only_its_recipes(tree: Path):
    other = tree / "other"
    shutil.copytree(tree / "qwen3", other)
    (other / "fastapi/recipe.yaml").write_text((other / "fastapi/recipe.yaml").read_text().replace("model: qwen3", "model: other"))
    regenerate(other / "fastapi")
    (tree / "qwen3/model.yaml").write_text("display_name: Qwen3\n")
    good, broken = discover(tree)
    assert [g.key for g in good] == ["other/fastapi"]
    assert broken[0].key == "qwen3/fastapi" and broken[0].error.path.name == "model.yaml"


def test_real_locks_are_fully_pinned_and_hashed():
    for lock in [*RECIPES_DIR.glob("*/*/requirements.lock")]:
        pins = parse_lock(lock)
        assert all(p.hashes for p in pins)


@pytest.mark.parametrize("own_shape,expected", [
    ({"extra": {"num_experts": 4}}, {"hidden_size": 128, "head_dim": 64, "extra": {"num_experts": 4}}),
    ({"hidden_size": 64, "extra": {"vocab_size": 2048}}, {"hidden_size": 64, "head_dim": 64, "num_attention_heads": 2,
                                                           "extra": {"vocab_size": 2048}}),
])
def test_a_recipes_smoke_shape_adds_to_its_tasks(own_shape, expected):
    """recipe.yaml's smoke_model changes only what it gives; the rest is the task's engine shape (head_dim 64)."""
    from selfllm_runtime.metadata import RecipeOverrides, TaskKind, load_task_defaults, merge_recipe

    task = load_task_defaults(TASKS_DIR, TaskKind.vllm, QWEN3 / "vllm/recipe.yaml")
    assert task.smoke_model is not None and task.smoke_model.hidden_size == 128 and task.smoke_model.extra == {}
    own = RecipeOverrides.model_validate({"model": "qwen3", "task": "vllm", "smoke_model": own_shape})
    shape = merge_recipe(QWEN3 / "vllm/recipe.yaml", task, load_family(QWEN3), own).smoke_model
    assert shape is not None and shape.model_dump(include=set(expected)) == expected
    assert shape.intermediate_size == task.smoke_model.intermediate_size
