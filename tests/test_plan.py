"""Selection (--only, --changed-since), the image graph, and --github-matrix."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from selfllm_recipes.discover import discover
from selfllm_recipes.images import NodeKind, plan_images
from selfllm_recipes.layout import REPO_ROOT
from selfllm_recipes.plan import SelectionError, select_by_name


def test_only_selects_model_or_model_task():
    keys = ["qwen3/fastapi", "qwen3/lora", "glm4/fastapi"]
    assert select_by_name(keys, ["qwen3"]) == ["qwen3/fastapi", "qwen3/lora"]
    assert select_by_name(keys, ["glm4/fastapi", "qwen3/lora"]) == ["glm4/fastapi", "qwen3/lora"]
    assert select_by_name(keys, []) == keys


def test_unknown_only_names_the_parameter():
    with pytest.raises(SelectionError, match="--only 'nope'"):
        select_by_name(["qwen3/fastapi"], ["nope"])


def test_graph_orders_base_stack_runtime_before_recipes_and_shares_stacks():
    good, _ = discover()
    nodes = plan_images(good, "debian:bookworm", "sha256:x", {})
    kinds = [n.kind for n in nodes]
    assert kinds[0] is NodeKind.base
    first_recipe = kinds.index(NodeKind.recipe)
    assert NodeKind.recipe not in kinds[:first_recipe] and all(k is NodeKind.recipe for k in kinds[first_recipe:])
    stacks = [n for n in nodes if n.kind is NodeKind.stack]
    assert len(stacks) == len({s.stack.name for s in good})  # one stack image per torch pin


def test_input_hash_changes_with_inputs_only():
    good, _ = discover()
    a = {n.key: n.input_hash for n in plan_images(good, "img", "sha256:1", {})}
    b = {n.key: n.input_hash for n in plan_images(good, "img", "sha256:1", {})}
    c = {n.key: n.input_hash for n in plan_images(good, "img", "sha256:2", {})}
    assert a == b
    runtimes = [k for k in a if k.startswith("runtime/")]
    assert runtimes and all(a[k] != c[k] for k in a if k not in runtimes)  # a new base changes everything built on it
    assert all(a[k] == c[k] for k in runtimes)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/build_matrix.py", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_github_matrix_prints_selection_json():
    result = _cli("--github-matrix", "--only", "qwen3/fastapi")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"recipe": ["qwen3/fastapi"]}


def test_changed_since_head_selects_nothing_when_clean_tree_or_only_changed():
    result = _cli("--github-matrix", "--changed-since", "HEAD")
    assert result.returncode == 0, result.stderr
    changed = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True).stdout
    if not changed.strip():
        assert json.loads(result.stdout) == {"recipe": []}


def test_bad_git_ref_is_a_clear_error():
    result = _cli("--github-matrix", "--changed-since", "no-such-ref-xyz")
    assert result.returncode == 2 and "--changed-since 'no-such-ref-xyz'" in result.stdout + result.stderr


def test_a_ref_that_looks_like_an_option_never_reaches_git_as_one(tmp_path):
    """`git diff --output=FILE` would write a file: the ref is resolved to a commit first."""
    target = tmp_path / "written-by-git"
    result = _cli("--github-matrix", f"--changed-since=--output={target}")
    assert result.returncode == 2 and "not a commit" in result.stdout + result.stderr
    assert not target.exists()


@pytest.mark.parametrize(("args", "message"), [
    (["publish", "--only", "qwen3/fastapi"], "name the registry: --registry HOST[:PORT]/NAMESPACE"),
    (["publish", "--registry", "127.0.0.1:5000", "--only", "qwen3/fastapi"], "REGISTRY='127.0.0.1:5000': expected <host"),
    (["publish", "--registry", "127.0.0.1:5000/selfllm", "--only", "qwen3/fastapi", "--report-dir", "{empty}"],
     "no matrix report; run `make matrix` first"),
])
def test_publish_refuses_bad_input_in_one_line_before_touching_the_engine(args, message, tmp_path):
    args = [a.replace("{empty}", str(tmp_path)) for a in args]
    done = subprocess.run([sys.executable, "scripts/build_matrix.py", *args], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and message in done.stdout.replace("\n", " ") and "Traceback" not in done.stderr


@pytest.mark.parametrize(("edited", "tasks"), [
    ("runtime/selfllm_runtime/finetune/lora.py", {"lora", "grpo"}),  # grpo trains and merges with lora's code
    ("runtime/selfllm_runtime/finetune/resume.py", {"lora", "grpo"}),
    ("runtime/selfllm_runtime/finetune/grpo.py", {"grpo"}),
    ("runtime/selfllm_runtime/tasks/openai_api.py", {"fastapi", "eval"}),  # eval serves with fastapi's app
    ("runtime/selfllm_runtime/lc/rag.py", {"langchain"}),
    ("runtime/selfllm_runtime/tasks/webdemo_app.py", {"webdemo"}),
    ("runtime/selfllm_runtime/chat_engine.py", {"fastapi", "webdemo", "langchain", "lora", "grpo", "eval"}),
    ("runtime/selfllm_runtime/settings.py", {"fastapi", "webdemo", "langchain", "lora", "vllm", "sglang", "grpo", "eval"}),
    # settings.py reads --host/--port back from VLLM_ARGS / SGLANG_ARGS with engine_server.option_values
    ("runtime/selfllm_runtime/engine_server.py",
     {"fastapi", "webdemo", "langchain", "lora", "vllm", "sglang", "grpo", "eval"}),
    ("selfllm_recipes/smoke/task_sglang.py", {"sglang"}),
    ("selfllm_recipes/smoke/task_vllm.py", {"vllm"}),
    ("selfllm_recipes/smoke/task_grpo.py", {"grpo"}),
    ("selfllm_recipes/smoke/runner.py", {"fastapi", "webdemo", "langchain", "lora", "vllm", "sglang", "grpo", "eval"}),
    ("runtime/selfllm_runtime/evaluation/report.py", {"eval"}),
    ("selfllm_recipes/smoke/task_eval.py", {"eval"}),
])
def test_a_runtime_edit_selects_the_recipes_whose_task_runs_it(monkeypatch, edited, tasks):
    """--changed-since: a runtime module selects exactly the recipes whose task kind imports it (its import closure,
    selfllm_recipes/runtime_closure.py); a smoke check module, the recipes it judges."""
    from selfllm_recipes import plan

    specs, _ = discover()
    monkeypatch.setattr(plan, "changed_paths", lambda ref: [edited])
    chosen = plan.select_changed(specs, "HEAD")
    assert chosen == [s.key for s in specs if s.recipe.task.value in tasks]


def test_a_family_edit_selects_its_recipes_only(monkeypatch):
    from selfllm_recipes import plan

    specs, _ = discover()
    monkeypatch.setattr(plan, "changed_paths", lambda ref: ["recipes/gemma3/model.yaml"])
    assert plan.select_changed(specs, "HEAD") == [s.key for s in specs if s.key.startswith("gemma3/")]


def test_each_recipe_image_carries_its_task_runtime_and_family_only():
    """The runtime image of a recipe: its task's closure, its own family's data; so the input hash of a fastapi
    recipe does not move when finetune/lora.py or another family's model.yaml changes."""
    good, _ = discover()
    nodes = {n.key: n for n in plan_images(good, "img", "sha256:1", {})}
    fastapi, lora = nodes["runtime/qwen3/fastapi"], nodes["runtime/qwen3/lora"]
    assert "selfllm_runtime/finetune/lora.py" in lora.files and "selfllm_runtime/finetune/lora.py" not in fastapi.files
    assert "selfllm_runtime/tasks/openai_api.py" in fastapi.files and "selfllm_runtime/tasks/openai_api.py" not in lora.files
    assert {n for n in fastapi.files if n.startswith("recipes/")} == {"recipes/qwen3/model.yaml",
                                                                       "recipes/qwen3/chat_template.jinja"}
    assert nodes["qwen3/fastapi"].parents == ["stack/torch2.6.0-cu12", "runtime/qwen3/fastapi"]
    assert nodes["qwen3/fastapi"].buildargs["RUNTIME_IMAGE"] == "selfllm/runtime:qwen3-fastapi"


@pytest.mark.parametrize("task", ["fastapi", "webdemo", "langchain", "lora", "vllm"])
def test_the_computed_closure_holds_every_import_the_task_makes(task, tmp_path):
    """Against the real imports: with only the task's closure on the path, every module of it imports (a module it
    needs but the closure missed would fail here), and in a fastapi image `selfllm lora` says plainly it isn't there."""
    import shutil

    from selfllm_recipes.layout import RUNTIME_DIR
    from selfllm_recipes.runtime_closure import task_files
    from selfllm_runtime.metadata import TaskKind

    files = task_files(TaskKind(task))
    for path in files:
        target = tmp_path / path.relative_to(RUNTIME_DIR)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    modules = sorted(".".join(p.relative_to(RUNTIME_DIR).with_suffix("").parts).removesuffix(".__init__")
                     for p in files if p.suffix == ".py" and p.name not in ("__main__.py", "webdemo_app.py"))
    probe = ("import importlib, selfllm_runtime, sys; assert selfllm_runtime.__file__.startswith(sys.argv[1]), "
             "selfllm_runtime.__file__\nfor m in sys.argv[2:]: importlib.import_module(m)")
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path), *modules], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    if task == "fastapi":
        env = {**os.environ, "PYTHONPATH": str(tmp_path), "RECIPE_DIR": str(REPO_ROOT / "recipes/qwen3/fastapi"),
               "SELFLLM_RECIPES_ROOT": str(REPO_ROOT / "recipes"), "SELFLLM_TASKS_ROOT": str(REPO_ROOT / "tasks")}
        asked = subprocess.run([sys.executable, "-m", "selfllm_runtime", "lora", "train"], capture_output=True,
                               text=True, env=env, timeout=120)
        assert asked.returncode == 2 and "Traceback" not in asked.stderr
        assert asked.stderr.strip() == ("selfllm: error: `selfllm lora` is not in this image: it carries the runtime "
                                        "of its own task (fastapi) only; use a lora recipe image (e.g. selfllm/qwen3-lora)")
