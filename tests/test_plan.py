"""Selection (--only, --changed-since), the image graph, and --github-matrix."""
from __future__ import annotations

import json
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
    assert all(a[k] != c[k] for k in a if k != "runtime")  # a new base image changes everything built on it
    assert a["runtime"] == c["runtime"]


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
