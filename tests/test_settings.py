"""One settings mechanism for every task kind (runtime/selfllm_runtime/settings.py): precedence, strict
parsing, errors that name the variable before any download, and README tables made from the definitions."""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any, get_args

import pytest

from selfllm_recipes.layout import RECIPES_DIR, REPO_ROOT
from selfllm_runtime import cli, settings
from selfllm_runtime.context import load_context
from selfllm_runtime.metadata import TaskKind, reads_quantization
from selfllm_runtime.settings import (task_settings, AdapterSettings, EngineSettings, FastapiSettings, LoraSettings, ModelSettings,
                                      SettingsError, resolve)

RUNTIME = REPO_ROOT / "runtime" / "selfllm_runtime"
TASKS = [kind.value for kind in TaskKind]


def qwen3(task: str):
    return load_context(RECIPES_DIR / "qwen3" / task)


def having(task: str, variable: str):
    """Qwen3's recipe of the task, or the first of Gemma-3's (images) and Qwen2-VL's (video) where the setting
    exists only for a family that takes what it limits (its `when`)."""
    info = next(i for i in task_settings(TaskKind(task)).infos() if i.env == variable)
    for family in ("qwen3", "gemma3", "qwen2-vl"):
        context = load_context(RECIPES_DIR / family / task)
        if not info.when or settings.family_value(context.family, info.when) is not None:
            return context
    raise AssertionError(f"no family of the test has {variable} ({info.when})")


def with_recipe_env(context, **env: str):
    """The context with extra `env:` entries in its recipe (as recipe.yaml / task.yaml would give)."""
    recipe = context.recipe.model_copy(update={"env": {**context.recipe.env, **env}})
    return type(context)(context.recipe_dir, recipe, context.family_dir, context.family)


def infos_of(kind: str, type_: type) -> list[tuple[str, str]]:
    """(task, variable) of the task's settings of type_ (or type_ | None)."""
    model = task_settings(TaskKind(kind))
    return [(kind, i.env) for i in model.infos()
            if type_ in (model.model_fields[i.field].annotation, *get_args(model.model_fields[i.field].annotation))]


# ----------------------------------------------------------------------------- precedence

def test_precedence_flag_over_env_over_recipe_over_family_over_default():
    context = qwen3("lora")
    family_r = context.family.lora.r
    assert context.settings(LoraSettings, env={}).r == family_r  # model.yaml's lora.r
    recipe = with_recipe_env(context, LORA_R=str(family_r + 4))
    assert recipe.settings(LoraSettings, env={}).r == family_r + 4  # recipe env: beats the family
    assert recipe.settings(LoraSettings, env={"LORA_R": "16"}).r == 16  # environment beats the recipe
    assert recipe.settings(LoraSettings, cli={"r": "2"}, env={"LORA_R": "16"}).r == 2  # flag beats all
    assert context.settings(LoraSettings, env={}).learning_rate == 1e-4  # the field's default


@pytest.mark.parametrize("task", ["fastapi", "webdemo", "langchain"])
def test_the_recipe_env_is_honoured_by_every_task(task):
    """Old behaviour: only LoRA read the recipe's `env:`."""
    context = with_recipe_env(qwen3(task), MAX_BATCH="3", MODEL_SOURCE="huggingface")
    settings = context.settings(env={})
    assert settings.max_batch == 3 and settings.model_source.value == "huggingface"
    assert context.settings(env={"MAX_BATCH": "5"}).max_batch == 5


def test_vllm_reads_the_recipe_env_too():
    context = with_recipe_env(qwen3("vllm"), MAX_MODEL_LEN="4096")
    assert context.settings(env={}).max_model_len == 4096


def test_empty_means_unset_but_an_empty_system_prompt_clears_the_recipe_one():
    context = qwen3("lora")
    assert context.settings(LoraSettings, env={"LORA_R": "", "HOST": ""}).r == context.family.lora.r
    assert context.settings(LoraSettings, env={}).system_prompt  # the recipe's, with the default data
    assert context.settings(LoraSettings, env={"SYSTEM_PROMPT": ""}).system_prompt is None


def test_an_older_variable_name_is_read():
    settings = resolve(ModelSettings, env={"MODELSCOPE_DOMAIN": "http://127.0.0.1:9"})
    assert settings.endpoint() == "http://127.0.0.1:9"


def test_the_engine_takes_its_settings_from_the_one_mechanism():
    context = with_recipe_env(qwen3("fastapi"), BATCHING="continuous")
    assert context.settings(EngineSettings, env={}).batching_kind == "continuous"
    assert context.settings(EngineSettings, env={"BATCHING": "AUTO"}).batching_kind == "static"


# ----------------------------------------------------------------------------- strict parsing

BOOLEANS = sorted({pair for kind in TASKS for pair in infos_of(kind, bool)})
INTEGERS = sorted({pair for kind in TASKS for pair in infos_of(kind, int)})


def test_the_typed_settings_are_found():
    assert ("lora", "GRADIENT_CHECKPOINTING") in BOOLEANS and ("langchain", "LANGCHAIN_SELFTEST") in BOOLEANS
    assert ("fastapi", "MAX_BATCH") in INTEGERS and ("vllm", "MAX_MODEL_LEN") in INTEGERS


@pytest.mark.parametrize("task,variable", BOOLEANS)
@pytest.mark.parametrize("text", ["maybe", "2", "enabled"])
def test_a_boolean_is_never_guessed(task, variable, text):
    """Old behaviour: two of the three boolean parsers turned garbage into False."""
    with pytest.raises(SettingsError, match=f"^{variable}='{text}': "):
        having(task, variable).settings(env={variable: text})


@pytest.mark.parametrize("task,variable", BOOLEANS)
def test_booleans_take_the_usual_words(task, variable):
    field = next(i.field for i in task_settings(TaskKind(task)).infos() if i.env == variable)
    for text, value in (("1", True), ("YES", True), ("on", True), ("0", False), ("False", False), ("off", False)):
        assert getattr(having(task, variable).settings(env={variable: text}), field) is value


@pytest.mark.parametrize("task,variable", INTEGERS)
@pytest.mark.parametrize("text", ["1.5", "lots", "0x10"])
def test_an_integer_is_a_whole_number(task, variable, text):
    with pytest.raises(SettingsError, match=f"^{variable}='{re.escape(text)}': "):
        having(task, variable).settings(env={variable: text})


@pytest.mark.parametrize("variable,text", [("MAX_QUEUE", "0"), ("BATCHING", "dynamic"), ("TOP_P", "1.5"),
                                           ("TEMPERATURE", "nan"), ("CHUNK_OVERLAP", "-1"), ("MODEL_SOURCE", "hub")])
def test_out_of_range_values_are_refused(variable, text):
    with pytest.raises(SettingsError, match=f"^{variable}='{text}': "):
        qwen3("langchain").settings(env={variable: text})


@pytest.mark.parametrize("task", TASKS)
def test_quantization_is_a_setting_of_exactly_the_tasks_that_load_through_bitsandbytes(task, monkeypatch):
    """QUANTIZATION exists where metadata says the task is quantized (the README's VRAM table reads that), takes
    none/4bit/8bit in any case, and refuses anything else by name."""
    variables = {i.env for i in task_settings(TaskKind(task)).infos()}
    assert ("QUANTIZATION" in variables) == reads_quantization(task)
    if not reads_quantization(task):
        return
    assert qwen3(task).settings(env={}).quantization == "none"
    with pytest.raises(SettingsError, match="^QUANTIZATION='int4': Input should be 'none', '8bit' or '4bit'"):
        qwen3(task).settings(env={"QUANTIZATION": "int4"})
    monkeypatch.setattr(settings, "bitsandbytes_installed", lambda: True)
    assert qwen3(task).settings(env={"QUANTIZATION": "4BIT"}).quantization == "4bit"
    monkeypatch.setattr(settings, "bitsandbytes_installed", lambda: False)  # checked before any download
    with pytest.raises(SettingsError, match="^QUANTIZATION='8bit': needs the bitsandbytes package"):
        qwen3(task).settings(env={"QUANTIZATION": "8bit"})
    assert qwen3(task).settings(env={"QUANTIZATION": "none"}).quantization == "none"


def test_lora_infer_loads_the_base_as_the_adapter_was_trained_unless_told(monkeypatch):
    """AdapterSettings leaves QUANTIZATION unset (infer falls back to the run's); the flag and the variable set it."""
    monkeypatch.setattr(settings, "bitsandbytes_installed", lambda: True)
    context = qwen3("lora")
    assert context.settings(AdapterSettings, env={}).quantization is None
    assert context.settings(AdapterSettings, cli={"quantization": "none"}, env={"QUANTIZATION": "4bit"}).quantization == "none"
    assert context.settings(LoraSettings, env={"QUANTIZATION": "8bit"}).quantization == "8bit"


def test_a_bad_flag_is_named_by_its_flag():
    with pytest.raises(SettingsError, match="^--lora-r='x': "):
        qwen3("lora").settings(LoraSettings, cli={"r": "x"}, env={})


def test_a_bad_recipe_value_names_where_it_came_from():
    context = with_recipe_env(qwen3("fastapi"), MAX_BATCH="many")
    with pytest.raises(SettingsError, match=r"^MAX_BATCH \(recipe env:\)='many': "):
        context.settings(env={})


# ----------------------------------------------------------------------------- selfllm start

BAD_VALUE = {"fastapi": ("MAX_BATCH", "abc"), "webdemo": ("BATCHING", "dynamic"), "vllm": ("VLLM_ARGS", "--x 'open"),
             "sglang": ("SGLANG_ARGS", "--x 'open"),
             "langchain": ("TOP_K", "three"), "lora": ("NUM_EPOCHS", "many"), "grpo": ("NUM_GENERATIONS", "1"),
             "eval": ("PERF_PARALLEL", "1,zero")}


@pytest.mark.parametrize("task", TASKS)
def test_selfllm_start_names_a_bad_setting_in_one_line_before_any_download(task, monkeypatch, capsys):
    variable, text = BAD_VALUE[task]

    def download(request: Any) -> Path:
        raise AssertionError("the model was fetched before the settings were checked")

    monkeypatch.setattr(cli, "resolve_model", download)
    for name in ("MODEL_PATH", "MODEL_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, text)
    assert cli.main(["start", "--recipe", str(RECIPES_DIR / "qwen3" / task)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"selfllm: error: {variable}={text!r}: "), err


def test_selfllm_lora_train_names_a_bad_flag(monkeypatch, capsys):
    from selfllm_runtime.finetune import commands
    from selfllm_runtime.tasks import lora

    monkeypatch.setattr(commands, "resolve_model", lambda request: pytest.fail("fetched before checking the flags"))
    code = lora.main(["train", "--enable-thinking", "maybe"], recipe=str(RECIPES_DIR / "qwen3" / "lora"))
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "selfllm lora: error: --enable-thinking='maybe': Input should be a valid boolean, unable to interpret input")


# ----------------------------------------------------------------------------- one definition

def settings_read_outside_settings_py() -> list[str]:
    """Every `os.environ[...]`, `os.environ.get(...)`, `os.getenv(...)` or `env.get(...)` of a setting's
    variable in the runtime, except in settings.py."""
    names = {name for model in map(task_settings, TaskKind) for i in model.infos() for name in (i.env, *i.aliases)}
    found = []
    for path in RUNTIME.rglob("*.py"):
        if path.name == "settings.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            key = None
            if isinstance(node, ast.Subscript):
                key = node.slice
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
                if node.func.attr in {"get", "getenv", "setdefault", "pop"}:
                    key = node.args[0]
            if isinstance(key, ast.Constant) and key.value in names:
                found.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {key.value}")
    return found


def test_no_task_reads_a_setting_around_the_mechanism():
    """Old behaviour: fastapi, vLLM, the engine and LangChain read os.environ inline."""
    assert settings_read_outside_settings_py() == []


@pytest.mark.parametrize("recipe_dir", sorted(p.parent for p in RECIPES_DIR.glob("*/*/recipe.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_setting_is_in_the_recipe_readme_in_both_languages(recipe_dir):
    context = load_context(recipe_dir)
    readme = (recipe_dir / "README.md").read_text(encoding="utf-8")
    english = readme.index("# English")
    for info in task_settings(context.recipe.task).infos():
        if info.when and settings.family_value(context.family, info.when) is None:
            assert f"| `{info.env}` |" not in readme
            continue
        row = f"| `{info.env}` |"
        assert readme.find(row) != -1 and readme.find(row) < english, f"{info.env} not in the 中文 table"
        assert readme.find(row, english) != -1, f"{info.env} not in the English table"


def test_the_tables_show_the_recipe_and_family_defaults():
    lora = (RECIPES_DIR / "qwen3" / "lora" / "README.md").read_text(encoding="utf-8")
    family = qwen3("lora").family.lora
    assert f"| `--lora-r` | `LORA_R` | `{family.r}` |" in lora
    assert f"| `--target-modules` | `LORA_TARGET_MODULES` | `{','.join(family.target_modules)}` |" in lora
    for model in ("qwen3", "qwen2.5"):
        context = load_context(RECIPES_DIR / model / "fastapi")
        readme = (context.recipe_dir / "README.md").read_text(encoding="utf-8")
        assert f"| `MODEL_ID` | `{context.recipe.default_model.modelscope}`" in readme


def test_every_task_has_one_settings_model(tmp_path, monkeypatch):
    assert len({task_settings(t) for t in TaskKind}) == len(TaskKind)
    assert all(issubclass(model, ModelSettings) for model in map(task_settings, TaskKind))
    assert issubclass(FastapiSettings, EngineSettings)
    # a task.yaml naming a class that is no settings model: one line naming the file and the field
    import shutil

    from selfllm_runtime import metadata
    shutil.copytree(REPO_ROOT / "tasks" / "fastapi", tmp_path / "fastapi")
    text = (tmp_path / "fastapi" / "task.yaml").read_text(encoding="utf-8")
    (tmp_path / "fastapi" / "task.yaml").write_text(text.replace("settings: FastapiSettings", "settings: NoSuchSettings"))
    monkeypatch.setenv("SELFLLM_TASKS_ROOT", str(tmp_path))
    metadata.kind_info.cache_clear()
    try:
        with pytest.raises(metadata.MetadataError, match=r"fastapi/task.yaml: kind.settings: .NoSuchSettings. is no"):
            task_settings(TaskKind.fastapi)
    finally:
        metadata.kind_info.cache_clear()


def test_selfllm_settings_shows_each_value_and_its_layer(monkeypatch, capsys):
    for name in ("LORA_R", "LORA_ALPHA", "SYSTEM_PROMPT", "DATA_PATH", "DATA_URL", "API_KEY", "NUM_EPOCHS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LORA_R", "16")
    monkeypatch.setenv("API_KEY", "sk-never-printed")
    assert cli.main(["settings", "--recipe", str(RECIPES_DIR / "qwen3" / "lora")]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: (line.split()[1], line.rsplit("  (", 1)[1].rstrip(")")) for line in out.splitlines()[1:]}
    assert rows["LORA_R"] == ("16", "environment") and rows["LORA_ALPHA"][1] == "model.yaml"
    assert rows["SYSTEM_PROMPT"][1] == "recipe env:" and rows["NUM_EPOCHS"] == ("3", "default")
    assert len(rows) == len(LoraSettings.infos())  # qwen3 has a thinking switch: every setting is listed
    assert cli.main(["settings", "--recipe", str(RECIPES_DIR / "qwen3" / "fastapi")]) == 0
    out = capsys.readouterr().out
    assert "sk-never-printed" not in out
    assert any(line.split()[:2] == ["API_KEY", "<set>"] for line in out.splitlines())


@pytest.mark.parametrize("text", ["1", "0", "YES", "no", "On", "false", "maybe", "2", ""])
def test_a_flag_outside_the_settings_reads_a_boolean_as_the_settings_do(text):
    """`selfllm lora infer --enable-thinking` is not a setting; it must not be a fourth boolean parser."""
    from selfllm_runtime.settings import parse_bool

    try:
        expected = resolve(LoraSettings, env={"GRADIENT_CHECKPOINTING": text}).gradient_checkpointing if text else None
    except SettingsError:
        expected = None
    if expected is None:
        with pytest.raises(ValueError, match="not a boolean"):
            parse_bool(text)
    else:
        assert parse_bool(text) is expected
