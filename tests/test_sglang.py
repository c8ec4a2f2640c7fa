"""Task `sglang` on the host: settings → `python -m sglang.launch_server` argv for the two builds (GPU: PyPI's sglang
with its CUDA kernels; CPU: the same sglang with SGLang's CPU kernels), the families' parser names, the locks, the CPU
stack's kernel source, and how the smoke check names the build."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from selfllm_recipes.discover import load_spec
from selfllm_recipes.images import local_sources
from selfllm_recipes.layout import LOCK_FILE, RECIPES_DIR, STACKS_DIR
from selfllm_recipes.locks import parse_lock
from selfllm_recipes.smoke.checks import SmokeFailure
from selfllm_recipes.smoke.task_sglang import expected_name, served_by
from selfllm_runtime.context import load_context
from selfllm_runtime.engine_server import option_values
from selfllm_runtime.metadata import MetadataError, load_family
from selfllm_runtime.settings import SettingsError
from selfllm_runtime.tasks.sglang_server import SglangBuild, build_argv

RECIPE = RECIPES_DIR / "qwen3" / "sglang"
GPU = SglangBuild("0.5.10.post1", on_cpu=False)
CPU = SglangBuild("0.5.21", on_cpu=True)
# The parser names both pinned SGLang builds register (0.5.10.post1 and 0.5.21: sglang/srt/parser/reasoning_parser.py
# ReasoningParser.DetectorMap, sglang/srt/function_call/function_call_parser.py ToolCallParserEnum): a family's
# model.yaml may name only these.
REASONING_PARSERS = {"deepseek-r1", "deepseek-v3", "glm45", "gpt-oss", "kimi", "kimi_k2", "mimo", "qwen3",
                     "qwen3-thinking", "minimax", "minimax-append-think", "step3", "step3p5", "mistral", "nemotron_3",
                     "interns1"}
TOOL_CALL_PARSERS = {"deepseekv3", "deepseekv31", "deepseekv32", "glm", "glm45", "glm47", "gpt-oss", "kimi_k2", "lfm2",
                     "llama3", "mimo", "mistral", "pythonic", "qwen", "qwen25", "qwen3_coder", "step3", "step3p5",
                     "minimax-m2", "trinity", "interns1", "hermes", "gigachat3"}


@pytest.fixture(scope="module")
def context():
    return load_context(RECIPE)


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_gpu_argv_serves_upstreams_name_with_the_family_parsers(context):
    argv = build_argv(context, "/models/qwen3", GPU, context.settings(env={}), python="/py")
    assert argv[:3] == ["/py", "-m", "sglang.launch_server"]
    assert _option(argv, "--model-path") == "/models/qwen3"
    assert option_values(argv, "--served-model-name") == ["Qwen3-8B"]  # one name: upstream's
    assert _option(argv, "--context-length") == "8192"
    assert _option(argv, "--port") == str(context.recipe.port) == "8000"
    assert _option(argv, "--host") == "0.0.0.0"
    assert _option(argv, "--reasoning-parser") == "qwen3" and _option(argv, "--tool-call-parser") == "qwen"
    for absent in ("--device", "--api-key", "--tp-size", "--mem-fraction-static", "--trust-remote-code",
                   "--chat-template", "--enable-multimodal"):
        assert absent not in argv


def test_the_cpu_build_serves_a_hybrid_linear_attention_model_without_the_extra_buffer(tmp_path: Path):
    """Qwen3.5 (Gated DeltaNet layers in text_config.layer_types) on the CPU build: SGLang's no_buffer radix cache and
    no overlap schedule (its auto choice, extra_buffer, needs CUDA kernels); the GPU build and other models keep
    SGLang's own choice."""
    context = load_context(RECIPES_DIR / "qwen3.5" / "sglang")
    (tmp_path / "config.json").write_text(json.dumps(
        {"text_config": {"layer_types": ["linear_attention", "full_attention"]}}), encoding="utf-8")
    settings = context.settings(env={})
    cpu = build_argv(context, tmp_path, CPU, settings, python="/py")
    assert _option(cpu, "--mamba-radix-cache-strategy") == "no_buffer" and "--disable-overlap-schedule" in cpu
    assert "--mamba-radix-cache-strategy" not in build_argv(context, tmp_path, GPU, settings, python="/py")
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2}), encoding="utf-8")
    assert "--mamba-radix-cache-strategy" not in build_argv(context, tmp_path, CPU, settings, python="/py")


def test_a_family_that_takes_images_is_served_multimodal():
    """SGLang serves some vision-language classes text-only unless --enable-multimodal (Gemma-3: "Multimodal is
    disabled for gemma3"); every family whose model.yaml takes images or video asks for it, text families don't."""
    for family in ("gemma3", "qwen2-vl", "qwen3-vl", "qwen3.5", "glm4.1v"):
        context = load_context(RECIPES_DIR / family / "sglang")
        assert "--enable-multimodal" in build_argv(context, "/m", CPU, context.settings(env={}), python="/py"), family


def test_cpu_argv_adds_the_cpu_device_only(context):
    gpu = build_argv(context, "/m", GPU, context.settings(env={}), python="/py")
    cpu = build_argv(context, "/m", CPU, context.settings(env={}), python="/py")
    assert cpu == gpu + ["--device", "cpu"]


def test_settings_map_to_sglangs_flags(context):
    settings = context.settings(env={"MAX_MODEL_LEN": "2048", "TENSOR_PARALLEL_SIZE": "4", "MEM_FRACTION_STATIC": "0.8",
                                     "API_KEY": " sk-abc ", "HOST": "127.0.0.1", "PORT": "7000",
                                     "SERVED_MODEL_NAME": "my-qwen"})
    argv = build_argv(context, "/m", GPU, settings)
    assert _option(argv, "--context-length") == "2048" and _option(argv, "--tp-size") == "4"
    assert _option(argv, "--mem-fraction-static") == "0.8" and _option(argv, "--api-key") == "sk-abc"
    assert (_option(argv, "--host"), _option(argv, "--port")) == ("127.0.0.1", "7000")
    assert option_values(argv, "--served-model-name") == ["my-qwen"]


def test_sglang_args_come_last_and_win_also_for_the_address(context):
    settings = context.settings(env={"SGLANG_ARGS": "--port 31000 --chunked-prefill-size '4096'"})
    argv = build_argv(context, "/m", CPU, settings)
    assert argv[-4:] == ["--port", "31000", "--chunked-prefill-size", "4096"]
    assert option_values(argv, "--port")[-1] == "31000"
    assert settings.address(context.recipe) == ("0.0.0.0", 31000)


@pytest.mark.parametrize(("env", "named"), [
    ({"MEM_FRACTION_STATIC": "1.5"}, "MEM_FRACTION_STATIC"),
    ({"MEM_FRACTION_STATIC": "most"}, "MEM_FRACTION_STATIC"),
    ({"TENSOR_PARALLEL_SIZE": "0"}, "TENSOR_PARALLEL_SIZE"),
    ({"SGLANG_ARGS": "--x 'open"}, "SGLANG_ARGS"),
    ({"MAX_MODEL_LEN": "8k"}, "MAX_MODEL_LEN"),
])
def test_a_bad_setting_is_named(context, env, named):
    with pytest.raises(SettingsError, match=named):
        context.settings(env=env)


def test_run_execs_the_server_with_the_cpu_engine_on_the_cpu_build_only(context, monkeypatch, tmp_path: Path):
    """run(): SGLANG_USE_CPU_ENGINE=1 (SGLang's CPU platform) and eager ops (TORCHDYNAMO_DISABLE=1: no C++ compiler
    for inductor in the image) for the CPU build, not for the GPU build; the logged command line hides the API key."""
    from selfllm_runtime.tasks import sglang_server

    execs: list[list[str]] = []
    monkeypatch.setattr(sglang_server.os, "execv", lambda path, argv: execs.append(argv))
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "")  # recorded, so what run() sets is undone after the test
    monkeypatch.delenv("SGLANG_USE_CPU_ENGINE")
    monkeypatch.setenv("TORCHDYNAMO_DISABLE", "")
    monkeypatch.delenv("TORCHDYNAMO_DISABLE")
    settings = context.settings(env={"HOST": "127.0.0.1", "API_KEY": "sk-secret"})
    monkeypatch.setattr(sglang_server, "installed_build", lambda: GPU)
    sglang_server.run(context, tmp_path, settings)
    assert "SGLANG_USE_CPU_ENGINE" not in os.environ and "--device" not in execs[-1]
    assert "TORCHDYNAMO_DISABLE" not in os.environ
    monkeypatch.setattr(sglang_server, "installed_build", lambda: CPU)
    sglang_server.run(context, tmp_path, settings)
    assert os.environ["SGLANG_USE_CPU_ENGINE"] == "1" and execs[-1][-2:] == ["--device", "cpu"]
    assert os.environ["TORCHDYNAMO_DISABLE"] == "1"
    assert _option(execs[-1], "--api-key") == "sk-secret"


def test_every_familys_sglang_parsers_are_names_both_builds_know():
    for model_yaml in sorted(RECIPES_DIR.glob("*/model.yaml")):
        family = load_family(model_yaml.parent)
        if family.reasoning is not None and family.reasoning.sglang_parser:
            assert family.reasoning.sglang_parser in REASONING_PARSERS, model_yaml
        if family.sglang_tool_call_parser:
            assert family.sglang_tool_call_parser in TOOL_CALL_PARSERS, model_yaml


def test_locks_pin_the_cuda12_gpu_build_and_the_cpu_build_without_cuda():
    spec = load_spec(RECIPE)
    gpu = {p.key: p.version for p in parse_lock(RECIPE / LOCK_FILE)}
    assert gpu["sglang"] == "0.5.10.post1" and gpu["torch"] == "2.9.1" and gpu["cuda-python"].startswith("12.")
    assert spec.stack.name == "torch2.9.1-cu12"
    cpu = {p.key: p.version for p in parse_lock(RECIPE / "requirements-cpu.lock")}
    assert cpu["sglang"] == "0.5.21" and cpu["torch"] == "2.13.0+cpu"
    # nvidia-ml-py stays: pure-Python NVML bindings sglang imports, no CUDA
    leaked = sorted(k for k in cpu if k.startswith(("nvidia-", "cuda-", "flashinfer")) and k != "nvidia-ml-py" or k in {
        "sglang-kernel", "torchvision", "torchaudio", "torchcodec", "tilelang", "sgl-deep-gemm"})
    assert leaked == []
    assert spec.cpu_stack is not None and spec.cpu_stack.name == "torch2.13.0-cpu-sglang"


def test_the_cpu_stack_shares_the_cpu_torch_layer_and_pins_its_kernel_source(tmp_path: Path):
    """The SGLang CPU stack pins what the vllm CPU stack pins (so their torch layers are one), and its kernel source
    enters the build context only with the sha256 sources.sha256 names; else one line says how to make it."""
    own, shared = STACKS_DIR / "torch2.13.0-cpu-sglang", STACKS_DIR / "torch2.13.0-cpu"
    assert (own / LOCK_FILE).read_bytes() == (shared / LOCK_FILE).read_bytes()
    sha, name = (own / "sources.sha256").read_text().split()
    assert name == "sgl-kernel-2f14d6c6f23fc06d59249ce4663b94f8a92ad02e.tar" and len(sha) == 64
    with pytest.raises(MetadataError, match="not in the wheelhouse"):
        local_sources(own, [tmp_path])
    (tmp_path / name).write_bytes(b"not the archive")
    with pytest.raises(MetadataError, match=sha):
        local_sources(own, [tmp_path])
    stack = tmp_path / "stack"
    stack.mkdir()
    (stack / "sources.sha256").write_text(f"{hashlib.sha256(b'not the archive').hexdigest()}  {name}\n")
    assert local_sources(stack, [tmp_path]) == {f"sources/{name}": tmp_path / name}


def test_the_smoke_check_names_the_build_and_the_served_name():
    assert expected_name("qwen3/sglang") == "Qwen3-8B"
    logs = "… selfllm: serving with sglang 0.5.21 on CPU\n…"
    assert served_by(logs) == "sglang 0.5.21 on CPU"
    with pytest.raises(SmokeFailure):
        served_by("no such line")


def test_glm47_flash_is_served_as_upstreams_tutorial_serves_it():
    """GLM-4.7-Flash (smoke SKIP on a CPU without AMX: SGLang's torch_native attention can't run MLA): upstream's
    SGLang tutorial's name and reasoning parser; no tool-call parser (the runtime has none of its XML format)."""
    context = load_context(RECIPES_DIR / "glm4.7-flash" / "sglang")
    argv = build_argv(context, "/m", CPU, context.settings(env={}))
    assert option_values(argv, "--served-model-name") == ["glm-4.7-flash"]
    assert _option(argv, "--reasoning-parser") == "glm45" and "--tool-call-parser" not in argv
    assert "SGLang 0.5.21's CPU engine" in context.recipe.smoke.needs_gpu


# ----------------------------------------------------------------------------- the multi-GPU MoE families

@pytest.mark.parametrize(("family", "reasoning", "tools"), [("hunyuan-a13b", "qwen3", None),
                                                            ("minimax-m2", "minimax-append-think", "minimax-m2")])
def test_the_moe_families_are_served_as_upstreams_sglang_tutorials_serve_them(family, reasoning, tools):
    """Hunyuan-A13B (03-…-SGLang部署调用.md: `--reasoning-parser qwen3`; SGLang has no parser of its JSON tool calls) and
    MiniMax-M2 (3-MiniMax-M2-SGLang.md: `--tool-call-parser minimax-m2 --reasoning-parser minimax-append-think`), on the
    family's 4 cards by default (model.yaml parallel:), the README's figure per card."""
    context = load_context(RECIPES_DIR / family / "sglang")
    assert context.recipe.gpu.count == 4 and context.recipe.gpu.vram_shown == "4 × 80 GB"
    argv = build_argv(context, "/m", GPU, context.settings(env={}))
    assert _option(argv, "--tp-size") == "4" and "--pp-size" not in argv and "--ep-size" not in argv
    assert _option(argv, "--reasoning-parser") == reasoning
    assert (_option(argv, "--tool-call-parser") if tools else "--tool-call-parser" not in argv) == (tools or True)
    # upstream's 8-card MiniMax-M2 layout: --tp-size 8 --ep-size 8; pipeline stages as SGLang names them
    eight = build_argv(context, "/m", GPU, context.settings(env={"TENSOR_PARALLEL_SIZE": "8", "ENABLE_EXPERT_PARALLEL": "1",
                                                                "PIPELINE_PARALLEL_SIZE": "2"}))
    assert (_option(eight, "--tp-size"), _option(eight, "--ep-size"), _option(eight, "--pp-size")) == ("8", "8", "2")
    readme = (RECIPES_DIR / family / "sglang" / "README.md").read_text(encoding="utf-8")
    assert "--tp-size 4" in readme and "**4 cards of 80 GB or more**" in readme


def test_minimax_m2s_thinking_stays_in_content_and_the_smoke_checks_it_there():
    from selfllm_recipes.smoke.task_sglang import reasoning_markers, thinking_in_content

    assert load_family(RECIPES_DIR / "minimax-m2").reasoning.sglang_in_content
    assert reasoning_markers("minimax-m2/sglang") is None  # no split to check: the parser keeps it whole
    assert reasoning_markers("hunyuan-a13b/sglang") == ("<think>", "</think>", "enable_thinking")
    assert "<think>" in thinking_in_content("minimax-m2/sglang", "<think>\nhm", "", "<think>\nh")
    for content, reasoning, streamed in (("hm", "", "<think>"), ("<think>", "moved", "<think>"), ("<think>", "", "x")):
        with pytest.raises(SmokeFailure):
            thinking_in_content("minimax-m2/sglang", content, reasoning, streamed)
    assert thinking_in_content("hunyuan-a13b/sglang", "", "thinking", "") == ""


def hunyuan_settings(env: dict[str, str]):
    return load_context(RECIPES_DIR / "hunyuan-a13b" / "sglang").settings(env=env)


@pytest.mark.parametrize(("env", "visible", "refused"), [
    ({}, 4, False),
    ({}, 1, True),
    ({"TENSOR_PARALLEL_SIZE": "1"}, 1, False),                      # set lower knowingly
    ({"SGLANG_ARGS": "--tp-size 2"}, 2, False),                     # SGLang's own option wins, as in the argv
    ({"SGLANG_ARGS": "--tensor-parallel-size 8"}, 4, True),         # its long name too
    ({"PIPELINE_PARALLEL_SIZE": "2"}, 4, True),                     # 8 cards on a machine of 4
    ({"TENSOR_PARALLEL_SIZE": "2", "SGLANG_ARGS": "--pp-size 2"}, 4, False),
])
def test_the_sglang_layout_is_refused_on_too_few_gpus(env, visible, refused):
    from selfllm_runtime.engine_server import gpu_shortfall
    from selfllm_runtime.tasks.sglang_server import PARALLEL_OPTIONS

    problem = gpu_shortfall(hunyuan_settings(env), PARALLEL_OPTIONS, visible)
    assert (problem is not None) == refused
    if refused:
        assert problem.startswith("TENSOR_PARALLEL_SIZE=") and "\n" not in problem and f"but {visible} " in problem


@pytest.fixture
def start_hunyuan_without_download(start_until_download):
    """`selfllm start` of hunyuan-a13b/sglang up to the download."""
    return lambda: start_until_download("hunyuan-a13b/sglang")


def test_start_of_the_gpu_build_on_one_card_exits_2_in_one_line_before_the_download(start_hunyuan_without_download,
                                                                                    monkeypatch, capsys):
    from selfllm_runtime.tasks import sglang_server

    monkeypatch.setattr(sglang_server, "installed_build", lambda: GPU)
    monkeypatch.setattr(sglang_server, "visible_gpus", lambda: 1)
    assert start_hunyuan_without_download() == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "TENSOR_PARALLEL_SIZE=4 × PIPELINE_PARALLEL_SIZE=1 needs 4 GPUs, but 1 is visible" in err
    monkeypatch.setenv("TENSOR_PARALLEL_SIZE", "1")
    with pytest.raises(AssertionError, match="fetched before"):
        start_hunyuan_without_download()


def test_start_of_the_cpu_build_counts_no_gpus(start_hunyuan_without_download, monkeypatch):
    """SGLang's CPU engine runs its tensor-parallel ranks on CPU cores (the smoke test's TENSOR_PARALLEL_SIZE=2)."""
    from selfllm_runtime.tasks import sglang_server

    monkeypatch.setattr(sglang_server, "installed_build", lambda: CPU)

    def counted():
        raise AssertionError("GPUs counted on the CPU build")

    monkeypatch.setattr(sglang_server, "visible_gpus", counted)
    with pytest.raises(AssertionError, match="fetched before"):
        start_hunyuan_without_download()
