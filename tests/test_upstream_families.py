"""recipes/upstream-families.yaml: a verdict on every upstream family, checked against the recipes on disk, and the
README's upstream table rendered from it."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from selfllm_runtime.metadata import MODEL_FILE, MetadataError

from selfllm_recipes import catalogue
from selfllm_recipes.discover import discover
from selfllm_recipes.layout import REPO_ROOT
from selfllm_recipes.upstream import UPSTREAM_FILE, load_upstream, render_upstream, tasks_by_folder

RECIPES = REPO_ROOT / "recipes"


@pytest.fixture(scope="module")
def upstream():
    return load_upstream()


@pytest.fixture(scope="module")
def specs():
    good, broken = discover()
    assert not broken, broken
    return good


def test_every_named_project_folder_exists(upstream):
    named = [folder for family in upstream.families for folder in family.packaged]
    assert named
    assert [folder for folder in named if not (RECIPES / folder / MODEL_FILE).is_file()] == []


def test_every_project_family_has_an_upstream_entry(upstream):
    families = sorted(path.parent.name for path in RECIPES.glob(f"*/{MODEL_FILE}"))
    named = {folder for family in upstream.families for folder in family.packaged}
    assert families and [folder for folder in families if folder not in named] == []


def test_every_not_packaged_entry_says_why_and_where_it_was_checked(upstream):
    rejected = [family for family in upstream.families if family.not_packaged]
    assert rejected
    for family in rejected:
        verdict = family.not_packaged
        assert verdict.reason.zh.strip() and verdict.reason.en.strip() and verdict.evidence.strip(), family.name
        assert not family.packaged, family.name


def test_remote_code_verdicts_are_pinned(upstream):
    """The families that need the checkpoint's own code each name a public copy at a commit and what it does today."""
    pinned = {family.name: family.pinned_code for family in upstream.families if family.pinned_code}
    assert {"InternLM2", "InternLM3", "ChatGLM3", "Baichuan 百川智能", "MiniCPM", "MiniCPM-o-2_6"} <= set(pinned)
    assert all(len(code.commit) == 40 and code.on_transformers and code.tutorial_pins for code in pinned.values())


def test_packaged_remote_code_families_ship_the_pinned_copy_the_table_names(upstream):
    """A packaged family that runs the checkpoint's own code ships it from the repository and commit its upstream
    entry names, with a patch where it has one; the others' model.yaml ship none."""
    from selfllm_runtime.metadata import load_family

    shipped = {family.packaged[0]: family.remote_code for family in upstream.families
               if family.packaged and family.remote_code}
    assert {"internlm3", "chatglm3"} <= set(shipped)
    for folder, code in shipped.items():
        model = load_family(REPO_ROOT / "recipes" / folder).remote_code
        assert model is not None and (model.repo, model.commit) == (code.repo, code.commit), folder
        assert code.path.startswith(model.path + "/"), folder


def _write(tmp_path: Path, families: list[dict]) -> Path:
    data = yaml.safe_load(UPSTREAM_FILE.read_text(encoding="utf-8"))
    data["families"] = families
    path = tmp_path / "upstream-families.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def test_a_not_packaged_entry_without_a_reason_is_refused_naming_the_field(tmp_path):
    path = _write(tmp_path, [{"name": "X", "tutorials": ["models/X"],
                              "not_packaged": {"vllm": None, "evidence": "registry"}}])
    field = r"upstream-families\.yaml: families\.0\.not_packaged\.reason"
    with pytest.raises(MetadataError, match=field + ": Field required"):
        load_upstream(path)


@pytest.mark.parametrize("entry", [
    {"name": "X", "tutorials": ["models/X"]},
    {"name": "X", "tutorials": ["models/X"], "packaged": ["qwen3"],
     "not_packaged": {"reason": {"zh": "因", "en": "why"}, "vllm": None, "evidence": "registry"}},
])
def test_an_entry_needs_exactly_one_verdict(tmp_path, entry):
    with pytest.raises(MetadataError, match=r"families\.0: .*either packaged .* or not_packaged"):
        load_upstream(_write(tmp_path, [entry]))


def test_a_folder_claimed_twice_is_refused(tmp_path):
    entries = [{"name": name, "tutorials": ["models/Qwen3"], "packaged": ["qwen3"]} for name in ("A", "B")]
    with pytest.raises(MetadataError, match="packaged folder listed twice: qwen3"):
        load_upstream(_write(tmp_path, entries))


def test_the_table_shows_the_task_kinds_found_on_disk(upstream, specs):
    table = render_upstream(upstream, specs)
    tasks = tasks_by_folder(specs)
    assert set(tasks["qwen3"]) >= {"fastapi", "grpo", "lora", "vllm"}
    assert f"[`qwen3`](recipes/qwen3): {' · '.join(tasks['qwen3'])}" in table
    rows = [line for line in table.splitlines()[2:]]
    assert len(rows) == len(upstream.families)
    assert all(line.count(" | ") == 4 for line in rows)  # five cells: no stray column separator


def test_a_packaged_folder_without_recipes_is_named(upstream, specs, tmp_path):
    others = [spec for spec in specs if spec.model_dir.name != "yi"]
    with pytest.raises(MetadataError, match=r"families\.\d+\.packaged: no recipes found in recipes/yi/"):
        render_upstream(upstream, others)


def test_readme_upstream_table_is_fresh(specs):
    catalogue.check_readme(specs)  # raises, naming README.md, when either generated section is stale
    assert render_upstream(load_upstream(), specs) in (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def test_stale_upstream_table_is_named_and_rewritten(specs, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text((REPO_ROOT / "README.md").read_text(encoding="utf-8").replace(
        "[`yi`](recipes/yi): ", "[`yi`](recipes/yi): lora · ", 1), encoding="utf-8")
    with pytest.raises(MetadataError, match="upstream families table is out of date"):
        catalogue.check_readme(specs, readme)
    assert catalogue.update_readme(specs, readme)
    catalogue.check_readme(specs, readme)


def test_a_broken_upstream_file_stops_the_catalogue_command_with_one_line(monkeypatch, capsys):
    from selfllm_recipes import cli

    def broken(path: Path = UPSTREAM_FILE):
        raise MetadataError(path, "families.3.not_packaged.reason", "Field required")

    monkeypatch.setattr(catalogue, "load_upstream", broken)
    monkeypatch.setattr(cli.signal, "signal", lambda *_: None)  # keep pytest's own SIGINT/SIGTERM handlers
    before = (REPO_ROOT / "README.md").read_bytes()
    assert cli.main(["catalogue"]) == 2
    out = capsys.readouterr().out
    assert "upstream-families.yaml: families.3.not_packaged.reason: Field required" in " ".join(out.split())
    assert "Traceback" not in out and (REPO_ROOT / "README.md").read_bytes() == before
