"""The in-image runtime on the host: model acquisition, reasoning split, tiny model, legacy API."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfllm_recipes.layout import RECIPES_DIR
from selfllm_runtime.chat_engine import ReasoningStream, split_reasoning
from selfllm_runtime.metadata import Reasoning
from selfllm_runtime.model_source import ModelNotFound, find_cached, request_from_env, resolve_model
from selfllm_runtime.settings import SettingsError

THINK = Reasoning(start="<think>", end="</think>")


def test_model_path_must_hold_a_model(context, tmp_path: Path):
    request = request_from_env(context.recipe, {"MODEL_PATH": str(tmp_path)})
    with pytest.raises(ModelNotFound, match="has no config.json"):
        resolve_model(request)


def test_unknown_model_source_is_named(context):
    with pytest.raises(SettingsError, match="MODEL_SOURCE='hub'"):
        request_from_env(context.recipe, {"MODEL_SOURCE": "hub"})


def test_defaults_come_from_the_recipe(context):
    request = request_from_env(context.recipe, {})
    assert request.model_id == "Qwen/Qwen3-8B" and request.source.value == "modelscope"
    assert str(request.cache) == "/root/autodl-tmp"


@pytest.mark.parametrize("folder", ["Qwen/Qwen2___5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct"])
def test_modelscope_cache_is_found_under_escaped_or_plain_name(context, tmp_path: Path, folder: str):
    (tmp_path / folder).mkdir(parents=True)
    (tmp_path / folder / "config.json").write_text("{}")
    (tmp_path / folder / "model.safetensors").write_bytes(b"weights")
    env = {"MODEL_ID": "Qwen/Qwen2.5-7B-Instruct", "MODEL_CACHE": str(tmp_path)}
    request = request_from_env(context.recipe, env)
    assert find_cached(request) == tmp_path / folder
    assert resolve_model(request) == tmp_path / folder  # no download attempted


def test_huggingface_cache_layout(context, tmp_path: Path):
    snap = tmp_path / "huggingface/hub/models--Qwen--Qwen3-8B/snapshots/abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (snap / "model.safetensors").write_bytes(b"weights")
    request = request_from_env(context.recipe, {"MODEL_SOURCE": "huggingface", "MODEL_CACHE": str(tmp_path)})
    assert resolve_model(request) == snap


def test_split_reasoning():
    assert split_reasoning("<think>\nplan\n</think>\n\nanswer", THINK) == ("plan", "answer")
    assert split_reasoning("just answer", THINK) == (None, "just answer")
    assert split_reasoning("<think>cut off", THINK) == ("cut off", "")
    assert split_reasoning("<think>x</think>", None) == (None, "<think>x</think>")
    assert split_reasoning("opened in the prompt\n</think>\n\nanswer", THINK, opened=True) == ("opened in the prompt", "answer")
    assert split_reasoning("a stray </think> in an answer", THINK) == (None, "a stray </think> in an answer")
    assert split_reasoning("an answer that mentions <think> later", THINK) == (None, "an answer that mentions <think> later")


def test_reasoning_stream_agrees_with_split_when_the_prompt_opened_the_block():
    stream = ReasoningStream(THINK, opened=True)
    pieces = [p for d in ["plan ", "more</th", "ink>\n\nans", "wer"] for p in stream.feed(d)] + stream.feed("", final=True)
    reasoning = "".join(t for k, t in pieces if k == "reasoning")
    content = "".join(t for k, t in pieces if k == "content")
    assert (reasoning.strip(), content) == split_reasoning("plan more</think>\n\nanswer", THINK, opened=True)


def test_reasoning_stream_handles_markers_split_across_deltas():
    stream = ReasoningStream(THINK)
    pieces = []
    for delta in ["<th", "ink>\nfirst ", "step</thi", "nk>\n\nthe ", "answer"]:
        pieces += stream.feed(delta)
    pieces += stream.feed("", final=True)
    reasoning = "".join(t for k, t in pieces if k == "reasoning")
    content = "".join(t for k, t in pieces if k == "content")
    assert reasoning == "first step" and content == "the answer"


def test_reasoning_stream_holds_back_a_long_end_marker_until_it_is_whole():
    """gpt-oss's end marker is 50 characters: a shorter reasoning buffer is held back whole, never a piece
    of the marker emitted as reasoning."""
    from selfllm_runtime.metadata import Reasoning

    harmony = Reasoning(start="<|channel|>analysis<|message|>", end="<|end|><|start|>assistant<|channel|>final<|message|>")
    text = "<|channel|>analysis<|message|>想一想。<|end|><|start|>assistant<|channel|>final<|message|>我是甄嬛。"
    stream = ReasoningStream(harmony)
    pieces = [p for i in range(0, len(text), 3) for p in stream.feed(text[i:i + 3])] + stream.feed("", final=True)
    assert "".join(t for k, t in pieces if k == "reasoning") == "想一想。"
    assert "".join(t for k, t in pieces if k == "content") == "我是甄嬛。"


def test_thinking_switch_goes_through_the_chat_template(engine):
    on = engine.format_prompt([{"role": "user", "content": "hi"}])
    off = engine.format_prompt([{"role": "user", "content": "hi"}], {"enable_thinking": False})
    assert on.endswith("<|im_start|>assistant\n")
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_tiny_model_is_the_real_architecture(engine):
    assert type(engine.model).__name__ == "Qwen3ForCausalLM"
    assert engine.model.config.num_hidden_layers == 2 and engine.model.config.hidden_size == 64


def test_generation_counts_tokens_and_respects_max_tokens(engine):
    from selfllm_runtime.chat_engine import GenerationParams

    done = engine.generate([{"role": "user", "content": "你好"}], GenerationParams(max_new_tokens=7, seed=3))
    assert 0 < done.completion_tokens <= 7 and done.prompt_tokens > 3
    again = engine.generate([{"role": "user", "content": "你好"}], GenerationParams(max_new_tokens=7, seed=3))
    assert again.text == done.text  # same seed, same sample


def test_legacy_api(engine):
    from fastapi.testclient import TestClient

    from selfllm_runtime.tasks.fastapi_server import create_app

    client = TestClient(create_app(engine))
    assert client.get("/health").json()["status"] == "ok"
    body = {"prompt": "你好", "history": [["hi", "hello"]], "max_length": 8, "top_p": 0.8, "temperature": 0.7}
    data = client.post("/", json=body).json()
    assert set(data) >= {"response", "history", "status", "time"}
    assert data["status"] == 200 and data["history"][0] == ["hi", "hello"] and data["history"][1][0] == "你好"
    assert client.post("/", json={"prompt": ""}).status_code == 422
    assert client.post("/", json={"prompt": "x", "history": [1]}).status_code == 422


def test_legacy_api_of_a_reasoning_family_splits_think_and_answer(tiny_recipe):
    """DeepSeek-R1-Distill's template opens <think> in the prompt: as upstream's R1 tutorial, the
    response is the whole text with its think block, plus `think` and `answer`; history keeps the answer."""
    from fastapi.testclient import TestClient

    from selfllm_runtime.chat_engine import ChatEngine
    from selfllm_runtime.tasks.fastapi_server import create_app

    client = TestClient(create_app(ChatEngine(*tiny_recipe("deepseek-r1-distill-qwen/fastapi"))))
    data = client.post("/", json={"prompt": "你好", "history": [], "max_length": 8}).json()
    assert data["response"] == f"<think>\n{data['think']}\n</think>\n\n{data['answer']}"
    assert data["history"] == [["你好", data["answer"]]]
    plain = TestClient(create_app(ChatEngine(*tiny_recipe("qwen2.5/fastapi")))).post("/", json={"prompt": "你好", "max_length": 4}).json()
    assert "think" not in plain and "answer" not in plain


@pytest.mark.parametrize("folder,name", [
    ("/c/huggingface/hub/models--Qwen--Qwen3-8B/snapshots/0123abc", "Qwen3-8B"),
    ("/c/models/Qwen--Qwen2.5-7B-Instruct/snapshots/master", "Qwen2.5-7B-Instruct"),  # modelscope >= 1.38
    ("/c/Qwen/Qwen2___5-7B-Instruct", "Qwen2___5-7B-Instruct"),  # an older ModelScope SDK's folder
    ("/models/my-merged", "my-merged"),
])
def test_checkpoint_name_sees_through_hub_cache_layouts(folder, name):
    """Old behaviour: the LoRA run was named `master-huanhuan` / `<commit>-huanhuan`, and /health said `master`."""
    from selfllm_runtime.model_source import checkpoint_name
    from selfllm_runtime.settings import LoraSettings, resolve

    assert checkpoint_name(folder) == name
    assert resolve(LoraSettings, env={}).run_dir(Path(folder)).name == f"{name}-huanhuan"


# ------------------------------------------------- system_role: a template without a system role (Gemma-2)

SYSTEM_USER = [{"role": "system", "content": "你是甄嬛。"}, {"role": "user", "content": "你是谁？"}]


@pytest.fixture(scope="module")
def gemma2(tiny_recipe):
    from selfllm_runtime.chat_engine import ChatEngine

    return ChatEngine(*tiny_recipe("gemma2/fastapi"))


def test_gemma2s_own_template_refuses_a_system_message(gemma2):
    """The template file is the checkpoint's, unchanged: rendered directly, it raises as the real one does."""
    with pytest.raises(Exception, match="System role not supported"):
        gemma2.tokenizer.apply_chat_template(SYSTEM_USER, tokenize=False, add_generation_prompt=True)


def test_gemma2_engine_merges_the_system_text_into_the_first_user_turn(gemma2):
    assert gemma2.family.system_role == "merge_into_first_user"
    prompt = gemma2.format_prompt(SYSTEM_USER)
    assert prompt == "<bos><start_of_turn>user\n你是甄嬛。\n\n你是谁？<end_of_turn>\n<start_of_turn>model\n"
    # a system message with no user turn after it becomes one; later ones join the next user turn
    assert gemma2.format_prompt(SYSTEM_USER[:1]) == "<bos><start_of_turn>user\n你是甄嬛。<end_of_turn>\n<start_of_turn>model\n"
    later = gemma2.format_prompt([*SYSTEM_USER, {"role": "assistant", "content": "臣妾甄嬛。"},
                                  {"role": "system", "content": "简短回答。"}, {"role": "user", "content": "多大了？"}])
    assert later.endswith("<start_of_turn>model\n臣妾甄嬛。<end_of_turn>\n"
                          "<start_of_turn>user\n简短回答。\n\n多大了？<end_of_turn>\n<start_of_turn>model\n")
    # without a system message the prompt is exactly what the checkpoint's own template makes
    plain = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "嗯"}, {"role": "user", "content": "再见"}]
    assert gemma2.format_prompt(plain) == gemma2.tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    # the checkpoint's tokenizer is left as it was (what LoRA saves beside an adapter)
    assert "selfllm" not in gemma2.tokenizer.chat_template


def test_gemma2_chat_with_a_system_message_through_both_apis(gemma2):
    from fastapi.testclient import TestClient

    from selfllm_runtime.chat_engine import GenerationParams
    from selfllm_runtime.tasks.fastapi_server import create_app

    done = gemma2.generate(SYSTEM_USER, GenerationParams(max_new_tokens=3, seed=0))
    assert done.completion_tokens <= 3
    client = TestClient(create_app(gemma2))
    answer = client.post("/v1/chat/completions", json={"model": "google/gemma-2-9b-it", "messages": SYSTEM_USER,
                                                        "max_tokens": 3})
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["prompt_tokens"] == len(gemma2.tokenizer(gemma2.format_prompt(SYSTEM_USER),
                                                                           add_special_tokens=False)["input_ids"])


def test_a_native_family_renders_system_messages_as_its_template_does(engine):
    """Qwen3 (system_role native): format_prompt is the tokenizer's own template, system turn and all."""
    from selfllm_runtime.system_role import render_chat, with_system_role

    assert engine.family.system_role == "native"
    prompt = engine.format_prompt(SYSTEM_USER)
    assert prompt == engine.tokenizer.apply_chat_template(SYSTEM_USER, tokenize=False, add_generation_prompt=True,
                                                          **engine.context.template_kwargs())
    assert prompt.startswith("<|im_start|>system\n你是甄嬛。<|im_end|>\n<|im_start|>user\n你是谁？<|im_end|>")
    assert with_system_role("{{ x }}", "native") == "{{ x }}"
    assert render_chat(engine.tokenizer, SYSTEM_USER, "native", add_generation_prompt=True,
                       **engine.context.template_kwargs()) == prompt


def test_the_merge_prelude_is_added_once():
    from selfllm_runtime.system_role import MARKER, with_system_role

    once = with_system_role("{{ messages }}", "merge_into_first_user")
    assert MARKER in once and once.endswith("{{ messages }}")
    assert with_system_role(once, "merge_into_first_user") == once


# ---------------------------------------------------------------- the smoke model's size, in every report


def test_smoke_model_records_and_logs_its_parameter_count(tmp_path: Path, capsys):
    from selfllm_recipes.smoke.runner import tiny_model_size
    from selfllm_runtime import cli
    from selfllm_runtime.smoke_model import PARAMETERS_PATTERN

    recipe = RECIPES_DIR / "ernie4.5" / "fastapi"
    assert cli.main(["smoke-model", str(tmp_path / "tiny"), "--recipe", str(recipe)]) == 0
    logged = capsys.readouterr().err
    found = PARAMETERS_PATTERN.search(logged)
    assert found and found["architecture"] == "Ernie4_5ForCausalLM"
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny")
    assert int(found["parameters"]) == sum(p.numel() for p in model.parameters()) < 1_000_000
    assert tiny_model_size(logged) == f"tiny Ernie4_5ForCausalLM: {int(found['parameters']):,} parameters"


def test_a_smoke_model_above_the_bound_is_refused(tmp_path: Path, monkeypatch, capsys):
    """A config that ignores the smoke shape (a composite one's flat fields) makes a large model: refused by
    name in the image, and refused again by the host when it reads the logged count."""
    from selfllm_recipes.smoke.checks import SmokeFailure
    from selfllm_recipes.smoke.runner import tiny_model_size
    from selfllm_runtime import cli, smoke_model

    monkeypatch.setattr(smoke_model, "MAX_SMOKE_PARAMETERS", 10_000)
    assert cli.main(["smoke-model", str(tmp_path / "tiny"), "--recipe", str(RECIPES_DIR / "qwen3" / "fastapi")]) == 2
    error = capsys.readouterr().err
    assert "Qwen3ForCausalLM has" in error and "above the bound of 10,000" in error
    assert not (tmp_path / "tiny" / "config.json").exists()  # nothing half-made
    with pytest.raises(SmokeFailure, match="above the bound of 10,000"):
        tiny_model_size("selfllm: smoke model Gemma3ForConditionalGeneration: 2700000000 parameters (random weights)")
    with pytest.raises(SmokeFailure, match="never logged"):
        tiny_model_size("no such line")


# ------------------------------------------------- MiniCPM5 (thinking switch, think block when off) and ERNIE-4.5

@pytest.fixture(scope="module")
def minicpm5(tiny_recipe):
    from selfllm_runtime.chat_engine import ChatEngine

    return ChatEngine(*tiny_recipe("minicpm5/fastapi"))


def test_minicpm5_thinking_switch_shapes_the_prompt(minicpm5):
    """Thinking on (the default) opens <think> after the generation prompt; off writes an empty block there."""
    head = "<s><|im_start|>system\n你是甄嬛。<|im_end|>\n<|im_start|>user\n你是谁？<|im_end|>\n<|im_start|>assistant\n"
    on = minicpm5.format_prompt(SYSTEM_USER)
    assert on == head + "<think>\n" and minicpm5.opens_reasoning(on)
    off = minicpm5.format_prompt(SYSTEM_USER, {"enable_thinking": False})
    assert off == head + "<think>\n\n</think>\n\n" and not minicpm5.opens_reasoning(off)
    assert minicpm5.format_prompt(SYSTEM_USER[1:], {"enable_thinking": False}).startswith("<s><|im_start|>user\n")


@pytest.mark.parametrize("thinking, written", [
    (False, "<think>\n嗯，用户问我是谁。\n</think>\n\n我是甄嬛。"),  # what upstream saw with thinking off
    (False, "我是甄嬛。"),
    (True, "嗯，用户问我是谁。\n</think>\n\n我是甄嬛。"),  # the prompt opened the block
])
def test_minicpm5_think_block_is_split_off_with_thinking_on_or_off(minicpm5, monkeypatch, thinking, written):
    """No runtime special case: a reply that starts with a think block (thinking off) or ends one the prompt
    opened (thinking on) is split like Qwen3's; the answer never carries the block, in either API."""
    from conftest import script_model
    from fastapi.testclient import TestClient

    from selfllm_runtime.tasks.fastapi_server import create_app

    script_model(minicpm5, monkeypatch, written)
    reasoning = "嗯，用户问我是谁。" if "</think>" in written else None
    body = {"model": "openbmb/MiniCPM5-1B", "messages": SYSTEM_USER, "max_tokens": 64,
            "chat_template_kwargs": {"enable_thinking": thinking}}
    with TestClient(create_app(minicpm5)) as client:
        message = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
        assert message["content"] == "我是甄嬛。" and message["reasoning_content"] == reasoning
        events = client.post("/v1/chat/completions", json={**body, "stream": True}).text.splitlines()
    deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in events if line.startswith("data: {")]
    assert "".join(d.get("content") or "" for d in deltas).strip() == "我是甄嬛。"
    assert "".join(d.get("reasoning_content") or "" for d in deltas).strip() == (reasoning or "")


def test_ernie45_prompt_is_its_template_and_generation_stops_at_end_of_sentence(tiny_recipe, monkeypatch):
    """ERNIE-4.5's template: <|begin_of_sentence|>, the system text on its own line, `User: …\\n`, `Assistant: `;
    upstream's tutorial printed the same. A reply stops at <|end_of_sentence|> (or </s>)."""
    from conftest import script_model

    from selfllm_runtime.chat_engine import ChatEngine, GenerationParams

    ernie = ChatEngine(*tiny_recipe("ernie4.5/fastapi"))
    assert ernie.format_prompt(SYSTEM_USER) == "<|begin_of_sentence|>你是甄嬛。\nUser: 你是谁？\nAssistant: "
    history = [*SYSTEM_USER, {"role": "assistant", "content": "臣妾甄嬛。"}, {"role": "user", "content": "多大了？"}]
    assert ernie.format_prompt(history).endswith("Assistant: 臣妾甄嬛。<|end_of_sentence|>User: 多大了？\nAssistant: ")
    vocab = ernie.tokenizer.get_vocab()
    assert ernie.stop_token_ids == sorted([vocab["<|end_of_sentence|>"], vocab["</s>"]])
    script_model(ernie, monkeypatch, "我是甄嬛。<|end_of_sentence|>User: 还有呢")  # the stop token ends it
    done = ernie.generate(SYSTEM_USER, GenerationParams(max_new_tokens=32, seed=0))
    assert done.text == "我是甄嬛。" and done.reasoning is None and done.finish_reason == "stop"


# ------------------------------------------------- Gemma-3: a composite (vision-language) config, LoRA on its LM

def test_a_composite_config_gets_the_flat_shape_in_its_text_config_and_a_small_vision_tower():
    """Gemma3Config ignores flat text fields: tiny_config puts them into text_config. A config that still ignores
    a shape field is refused by name (never a silently large "tiny" model)."""
    from selfllm_runtime.metadata import SmokeModelShape, load_family
    from selfllm_runtime.smoke_model import tiny_config

    family = load_family(RECIPES_DIR / "gemma3")
    model_class, config = tiny_config(family.architecture, family.smoke, 1024, pad_token_id=0, eos_token_id=1)
    assert (config.text_config.hidden_size, config.text_config.num_hidden_layers, config.text_config.vocab_size) == (
        family.smoke.hidden_size, family.smoke.num_hidden_layers, 1024)
    assert config.vision_config.hidden_size == 32 and config.mm_tokens_per_image == 4
    import torch

    with torch.device("meta"):
        parameters = sum(p.numel() for p in model_class(config).parameters())
    assert 100_000 < parameters < 1_000_000, parameters
    # text_config given in extra without the flat fields it overrides: refused, naming the field
    shape = SmokeModelShape(extra={"text_config": {"hidden_size": 512}})
    with pytest.raises(ValueError, match=r"ignored the smoke shape fields \{'hidden_size': 64\}"):
        tiny_config(family.architecture, shape, 1024)


def test_the_tiny_vision_language_model_ships_its_processor_and_takes_images(tiny_recipe):
    """The tiny Gemma-3 (model.yaml smoke.vision) is what vLLM serves images with: its processor loads from the
    folder, the image tokens are in the small vocabulary (config ids match the tokenizer's), '\\n' to '\\n\\n\\n\\n'
    are one token each, the weights carry the hub checkpoints' names (vision_tower.vision_model.*), transformers
    loads them all, and an image becomes the processor's image tokens."""
    import json

    from PIL import Image
    from safetensors import safe_open
    from transformers import AutoConfig, AutoProcessor, Gemma3ForConditionalGeneration

    context, folder = tiny_recipe("gemma3/vllm")
    processor = AutoProcessor.from_pretrained(folder)
    assert type(processor).__name__ == context.family.modalities.processor
    tokenizer, config = processor.tokenizer, AutoConfig.from_pretrained(folder)
    vocab = tokenizer.get_vocab()
    assert all(text in vocab for text in ["\n", "\n\n", "\n\n\n", "\n\n\n\n"])
    assert (config.image_token_index, config.boi_token_index, config.eoi_token_index) == (
        vocab[tokenizer.image_token], vocab[tokenizer.boi_token], vocab[tokenizer.eoi_token])
    assert max(config.image_token_index, config.boi_token_index) < config.text_config.vocab_size
    with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
        names = list(weights.keys())
    assert any(n.startswith("vision_tower.vision_model.") for n in names)
    assert not any(n.startswith("vision_tower.") and not n.startswith("vision_tower.vision_model.") for n in names)
    model = Gemma3ForConditionalGeneration.from_pretrained(folder)
    parameters = sum(p.numel() for p in model.parameters())
    assert parameters == json.loads((folder / "SMOKE_MODEL.json").read_text())["parameters"] < 1_000_000
    # no weight matrix is left all zero (Gemma-3's image projection is, fresh): every image would look the same
    assert all(p.any() for p in model.parameters() if p.dim() >= 2)
    inputs = processor(text=tokenizer.boi_token, images=Image.new("RGB", (96, 96), (200, 30, 30)), return_tensors="pt")
    assert (inputs["input_ids"] == config.image_token_index).sum().item() == config.mm_tokens_per_image


def test_lora_targets_of_a_vision_language_model_are_under_its_language_model():
    import re

    from selfllm_runtime.metadata import load_family
    from selfllm_runtime.smoke_model import missing_lora_targets, module_names

    family = load_family(RECIPES_DIR / "gemma3")
    pattern = family.lora.peft_target_modules(["q_proj", "v_proj"])
    assert re.fullmatch(pattern, "model.language_model.layers.0.self_attn.q_proj")
    assert not re.fullmatch(pattern, "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj")
    assert not re.fullmatch(pattern, "model.language_model.layers.0.self_attn.k_proj")
    assert "fc1" not in module_names(family) and "q_proj" in module_names(family)  # fc1: SigLIP's MLP
    assert missing_lora_targets(family.model_copy(update={"lora": family.lora.model_copy(
        update={"target_modules": ["q_proj", "fc1"]})})) == ["fc1"]
    assert load_family(RECIPES_DIR / "qwen3").lora.peft_target_modules(["q_proj"]) == ["q_proj"]


# ------------------------------------------------- gpt-oss: harmony channels, a string reasoning effort

@pytest.fixture(scope="module")
def gptoss(tiny_recipe):
    from selfllm_runtime.chat_engine import ChatEngine

    return ChatEngine(*tiny_recipe("gpt-oss/fastapi"))


HARMONY_REPLY = ("<|channel|>analysis<|message|>用户问我是谁。<|end|>"
                 "<|start|>assistant<|channel|>final<|message|>我是甄嬛。<|return|>")


def test_gptoss_prompt_is_harmony_with_the_effort_and_the_system_message_as_developer(gptoss):
    prompt = gptoss.format_prompt(SYSTEM_USER)
    assert prompt.startswith("<|start|>system<|message|>You are ChatGPT") and "Reasoning: medium\n\n" in prompt
    assert prompt.endswith("<|start|>developer<|message|># Instructions\n\n你是甄嬛。\n\n<|end|>"
                           "<|start|>user<|message|>你是谁？<|end|><|start|>assistant")
    assert "Reasoning: high\n\n" in gptoss.format_prompt(SYSTEM_USER, {"reasoning_effort": "high"})
    vocab = gptoss.tokenizer.get_vocab()
    assert gptoss.stop_token_ids == sorted({vocab["<|return|>"], vocab["<|call|>"], vocab["<|endoftext|>"]})


def test_gptoss_analysis_channel_is_the_reasoning_in_both_apis(gptoss, monkeypatch):
    """The channel markers are special tokens: decoding keeps exactly those (not <|return|>), so the analysis
    channel becomes reasoning_content and the final channel the answer, whole and streamed."""
    from conftest import script_model
    from fastapi.testclient import TestClient

    from selfllm_runtime.tasks.fastapi_server import create_app

    script_model(gptoss, monkeypatch, HARMONY_REPLY)
    body = {"model": "openai/gpt-oss-20b", "messages": SYSTEM_USER, "max_tokens": 64}
    with TestClient(create_app(gptoss)) as client:
        message = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
        assert (message["content"], message["reasoning_content"]) == ("我是甄嬛。", "用户问我是谁。")
        events = client.post("/v1/chat/completions", json={**body, "stream": True}).text.splitlines()
    deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in events if line.startswith("data: {")]
    assert "".join(d.get("content") or "" for d in deltas).strip() == "我是甄嬛。"
    assert "".join(d.get("reasoning_content") or "" for d in deltas).strip() == "用户问我是谁。"


def test_reasoning_effort_field_reaches_the_template_or_is_refused_by_name(gptoss, tiny_recipe, monkeypatch):
    from conftest import script_model
    from fastapi.testclient import TestClient

    from selfllm_runtime.chat_engine import ChatEngine
    from selfllm_runtime.tasks.fastapi_server import create_app

    seen: list[str] = []
    script_model(gptoss, monkeypatch, lambda prompt: seen.append(prompt) or HARMONY_REPLY)
    body = {"model": "openai/gpt-oss-20b", "messages": SYSTEM_USER, "max_tokens": 32}
    with TestClient(create_app(gptoss)) as client:
        assert client.post("/v1/chat/completions", json={**body, "reasoning_effort": "low"}).status_code == 200
        assert "Reasoning: low\n\n" in seen[-1]
        bad = client.post("/v1/chat/completions", json={**body, "reasoning_effort": "max"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "reasoning_effort"
    assert "['low', 'medium', 'high']" in bad.json()["error"]["message"]
    qwen3 = ChatEngine(*tiny_recipe("qwen3/fastapi"))
    with TestClient(create_app(qwen3)) as client:
        none = client.post("/v1/chat/completions", json={**body, "model": "Qwen/Qwen3-8B", "reasoning_effort": "low"})
    assert none.status_code == 400 and none.json()["error"]["param"] == "reasoning_effort"


def test_langchain_and_webdemo_take_the_effort_levels(gptoss, tiny_recipe):
    from selfllm_runtime.lc.chat_model import ChatSelfLLM
    from selfllm_runtime.tasks.webdemo import generation_params

    llm = ChatSelfLLM(engine=gptoss, reasoning_effort="high")
    assert llm._params(None, {}).template_kwargs == {"reasoning_effort": "high"}
    assert llm._params(None, {"reasoning_effort": "low"}).template_kwargs == {"reasoning_effort": "low"}
    with pytest.raises(ValueError, match=r"'max' is not one of \['low', 'medium', 'high'\]"):
        ChatSelfLLM(engine=gptoss, reasoning_effort="max")
    context = gptoss.context
    assert generation_params(context, 64, 0.7, 0.9, "low").template_kwargs == {"reasoning_effort": "low"}
    with pytest.raises(ValueError, match="not one of"):
        generation_params(context, 64, 0.7, 0.9, "max")
    from selfllm_runtime.settings import LangchainSettings, _exists

    envs = {i.env for i in LangchainSettings.infos() if _exists(i, gptoss.family)}
    assert "REASONING_EFFORT" in envs and "ENABLE_THINKING" not in envs


def test_a_checkpoint_shipped_in_mxfp4_trains_dequantized_and_refuses_bitsandbytes(tmp_path: Path):
    """gpt-oss ships MXFP4 experts: LoRA loads them dequantized (upstream's Mxfp4Config(dequantize=True)),
    generation leaves MXFP4 to transformers, and QUANTIZATION=8bit/4bit is refused by name."""
    from selfllm_runtime.loading import prequantized_kwargs, shipped_quantization

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_oss",
                                                      "quantization_config": {"quant_method": "mxfp4"}}))
    assert shipped_quantization(tmp_path) == "mxfp4"
    assert shipped_quantization(tmp_path / "missing") is None
    config = prequantized_kwargs("mxfp4", "none", training=True)["quantization_config"]
    assert type(config).__name__ == "Mxfp4Config" and config.dequantize is True
    assert prequantized_kwargs("mxfp4", "none", training=False) == {}
    assert prequantized_kwargs(None, "4bit", training=True) == {}
    with pytest.raises(ValueError, match="QUANTIZATION=4bit: the checkpoint ships mxfp4-quantized weights"):
        prequantized_kwargs("mxfp4", "4bit", training=False)


def test_only_markers_made_of_special_tokens_change_decoding(engine, gptoss):
    """Qwen3's <think> is an ordinary token: its engine decodes as before (every special token skipped). gpt-oss's
    harmony markers are special tokens: exactly those are kept, <|return|> and the rest are dropped."""
    assert engine._hidden_ids is None
    vocab = gptoss.tokenizer.get_vocab()
    kept = {vocab[t] for t in ("<|channel|>", "<|message|>", "<|end|>", "<|start|>")}
    assert not kept & gptoss._hidden_ids and {vocab["<|return|>"], vocab["<|call|>"]} <= gptoss._hidden_ids
    assert gptoss.decode([vocab["<|channel|>"], vocab["<|return|>"]]) == "<|channel|>"
