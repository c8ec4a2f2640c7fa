"""utils.py contributors: task-line parsing, recipe credits, extra points, contributors.json output."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import utils  # noqa: E402

SAMPLE = REPO / "tests" / "data" / "utils" / "support_sample.md"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "utils.py"), *args],
                          capture_output=True, text=True, timeout=60)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=4, ensure_ascii=False), encoding="utf-8")


def valid_recipe(model: str, task: str, contributors: str) -> str:
    """The repository's qwen3/fastapi recipe.yaml with another model, task and contributors."""
    text = (REPO / "recipes/qwen3/fastapi/recipe.yaml").read_text(encoding="utf-8")
    text = text.replace("model: qwen3", f"model: {model}").replace("task: fastapi", f"task: {task}")
    return "\n".join(line for line in text.splitlines() if not line.startswith("contributors:")) + f"\ncontributors: {contributors}\n"


def write_recipe(root: Path, model: str, task: str, text: str) -> Path:
    """recipes/<model>/<task>/recipe.yaml, with the family's model.yaml + template and tasks/ beside."""
    path = root / "recipes" / model / task / "recipe.yaml"
    path.parent.mkdir(parents=True)
    for name in ("model.yaml", "chat_template.jinja"):
        if not (root / "recipes" / model / name).exists():
            shutil.copy(REPO / "recipes" / model / name, root / "recipes" / model / name)
    if not (root / "tasks").exists():
        shutil.copytree(REPO / "tasks", root / "tasks")
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A root with contributors.json (stale counts, a tie), no README, no recipes, no config."""
    write_json(tmp_path / "contributors.json", {
        "Carol": {"info": "[Carol](https://github.com/carol)", "task_num": 50},
        "Alice": {"info": "[Alice](https://github.com/alice)（内容创作者）", "task_num": 1},
        "Bob": {"info": "[Bob](https://github.com/bob)", "task_num": 7},
        "Dave": {"info": "[Dave](https://github.com/dave)", "task_num": 3},
        "Erin": {"info": "[Erin](https://github.com/erin)", "task_num": 9},
    })
    return tmp_path


def test_markdown_credits_parse_checked_lines_with_lora_points():
    credits = [(name, points, where.rsplit(":", 1)[1]) for name, points, where in utils.markdown_credits(SAMPLE)]
    assert credits == [
        ("Alice", 1, "6"),
        ("Bob", 1, "7"),       # [X] and a trailing space
        ("Alice", 2, "8"),     # Lora
        ("Bob", 2, "9"),       # LoRA, "@ Bob"
        ("Carol", 2, "10"),    # lowercase "lora" in the link, trailing tab
        ("Carol", 2, "11"),    # 微调
        ("Mallory", 1, "14"),  # unknown name: still a credit here, reported later
        ("Bob", 1, "15"),
        ("Dave", 1, "21"),     # the last line counts too
    ]


def test_update_contributors_recounts_sorts_and_writes_upstream_format(project: Path, capsys):
    result = utils.update_contributors(project, [SAMPLE])

    assert {name: entry["task_num"] for name, entry in result.items()} == {
        "Bob": 4, "Carol": 4, "Alice": 3, "Dave": 1, "Erin": 0}
    assert list(result) == ["Carol", "Bob", "Alice", "Dave", "Erin"]  # ties keep file order
    written = (project / "contributors.json").read_text(encoding="utf-8")
    assert written == json.dumps(result, indent=4, ensure_ascii=False)
    assert "（内容创作者）" in written  # non-ASCII kept
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "- [Carol](https://github.com/carol)"
    assert f"unknown contributor 'Mallory' at {SAMPLE}:14" in err
    assert "Mallory" not in result


def test_counts_are_recomputed_from_zero_each_run(project: Path):
    first = utils.update_contributors(project, [SAMPLE], echo=False)
    second = utils.update_contributors(project, [SAMPLE], echo=False)
    assert first == second


def test_add_unknown_adds_names_with_empty_info(project: Path):
    result = utils.update_contributors(project, [SAMPLE], add_unknown=True, echo=False)
    assert result["Mallory"] == {"info": "", "task_num": 1}
    assert json.loads((project / "contributors.json").read_text(encoding="utf-8"))["Mallory"]["info"] == ""


def test_readme_recipes_and_extra_points_all_count(project: Path, capsys):
    (project / "README.md").write_text("- [x] [Qwen3 vLLM](./q.md) @Erin\n", encoding="utf-8")
    write_recipe(project, "qwen3", "lora", valid_recipe("qwen3", "lora", "[Erin, ' Dave ']"))
    write_recipe(project, "qwen3", "fastapi", valid_recipe("qwen3", "fastapi", "[Erin]"))
    broken = write_recipe(project, "qwen3", "vllm", "task: vllm\ncontributors: [Erin\n")
    nameless = write_recipe(project, "glm4", "webdemo", valid_recipe("glm4", "webdemo", "[]"))
    write_json(project / "contributors_config.json", {"extra_points": {"Alice": 300, "Zed": 150}})

    result = utils.update_contributors(project, echo=False)

    assert result["Erin"]["task_num"] == 1 + 2 + 1
    assert result["Dave"]["task_num"] == 2
    assert result["Alice"]["task_num"] == 300
    assert list(result)[:2] == ["Alice", "Erin"]
    err = capsys.readouterr().err
    assert f"skipping {broken}: line 2: invalid YAML" in err
    assert f"skipping {nameless}: contributors: List should have at least 1 item" in err
    assert "unknown contributor 'Zed' at" in err and "contributors_config.json" in err


def test_recipe_credits_without_recipes_dir(tmp_path: Path):
    assert utils.recipe_credits(tmp_path / "recipes") == []


def test_repo_files_follow_the_schema():
    contributors = json.loads((REPO / "contributors.json").read_text(encoding="utf-8"))
    assert contributors and all(
        set(entry) == {"info", "task_num"} and isinstance(entry["info"], str) and isinstance(entry["task_num"], int)
        for entry in contributors.values())
    config = json.loads((REPO / "contributors_config.json").read_text(encoding="utf-8"))
    assert config["extra_points"] == {"不要葱姜蒜": 300, "Logan Zou": 300, "刘十一": 150}


def test_cli_end_to_end(project: Path):
    proc = run_cli("contributors", "--root", str(project), "--source", str(SAMPLE))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[:2] == ["- [Carol](https://github.com/carol)", "- [Bob](https://github.com/bob)"]
    assert "unknown contributor 'Mallory'" in proc.stderr
    assert json.loads((project / "contributors.json").read_text(encoding="utf-8"))["Bob"]["task_num"] == 4


def test_no_task_lines_leaves_contributors_json_untouched(project: Path):
    before = (project / "contributors.json").read_text(encoding="utf-8")
    proc = run_cli("contributors", "--root", str(project))
    assert proc.returncode == 2 and "no task lines" in proc.stderr and "Traceback" not in proc.stderr
    assert (project / "contributors.json").read_text(encoding="utf-8") == before


@pytest.mark.parametrize("case", ["missing-source", "missing-contributors", "broken-contributors"])
def test_cli_errors_are_one_line_exit_2(project: Path, case: str):
    args = ["contributors", "--root", str(project)]
    if case == "missing-source":
        args += ["--source", str(project / "nope.md")]
    elif case == "missing-contributors":
        (project / "contributors.json").unlink()
    else:
        (project / "contributors.json").write_text("{not json", encoding="utf-8")
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")
