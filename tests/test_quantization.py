"""QUANTIZATION (runtime/selfllm_runtime/loading.py) on the tiny model through bitsandbytes' CPU backend: the
engine every chat task shares loads 4-bit / 8-bit layers, the servers say so and answer, and LoRA trains on
a 4-bit base (QLoRA), infers as it was trained and merges into the full-precision base."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfllm_runtime.chat_engine import ChatEngine
from selfllm_runtime.finetune.data import write_sample_data
from selfllm_runtime.finetune.lora import infer, merge, train
from selfllm_runtime.loading import parameter_count
from selfllm_runtime.settings import EngineSettings, LoraSettings

QUANTIZED_LAYER = {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}


@pytest.fixture(scope="module", params=["4bit", "8bit"])
def quantized(request, tiny_recipe) -> ChatEngine:
    context, model = tiny_recipe("qwen3/fastapi")
    return ChatEngine(context, model, context.settings(EngineSettings, env={"QUANTIZATION": request.param}))


def test_the_engine_loads_quantized_layers_that_take_less_memory(quantized, engine):
    layers = {type(m).__name__ for m in quantized.model.modules()}
    assert QUANTIZED_LAYER[quantized.quantization] in layers
    assert not {"Linear4bit", "Linear8bitLt"} & {type(m).__name__ for m in engine.model.modules()}
    assert quantized.loaded.weights_gb < engine.loaded.weights_gb
    completion = quantized.generate([{"role": "user", "content": "你好"}], quantized.params(max_new_tokens=6, temperature=0))
    assert completion.completion_tokens > 0


def test_the_vram_formula_gives_the_weights_bitsandbytes_keeps(quantized, engine):
    """The README's quantized estimates rest on ParameterCount.weights_gb: on the tiny model (fp32 on CPU) it
    gives what bitsandbytes' layers take, within 2%."""
    count = parameter_count(engine.model)
    assert count.weights_gb("none", full_bytes=4) == pytest.approx(engine.loaded.weights_gb, rel=0.02)
    assert count.weights_gb(quantized.quantization, full_bytes=4) == pytest.approx(quantized.loaded.weights_gb, rel=0.02)


def test_the_server_reports_and_serves_its_quantization(quantized):
    from fastapi.testclient import TestClient

    from selfllm_runtime.tasks.fastapi_server import create_app

    with TestClient(create_app(quantized)) as client:
        assert client.get("/health").json()["quantization"] == quantized.quantization
        name = client.get("/v1/models").json()["data"][0]["id"]
        answer = client.post("/v1/chat/completions", json={
            "model": name, "messages": [{"role": "user", "content": "你好"}], "max_tokens": 6, "temperature": 0})
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] > 0


def test_the_langchain_chat_model_runs_on_a_quantized_engine(quantized):
    from selfllm_runtime.lc.chat_model import ChatSelfLLM

    llm = ChatSelfLLM(engine=quantized, max_new_tokens=6, temperature=0)
    assert llm.invoke("你好").usage_metadata["output_tokens"] > 0


@pytest.fixture(scope="module")
def qlora(tiny_recipe, tmp_path_factory):
    context, model = tiny_recipe("qwen3/lora")
    work = tmp_path_factory.mktemp("qlora")
    env = {"DATA_PATH": str(write_sample_data(work / "sample.json", 36)), "OUTPUT_DIR": str(work / "out"),
           "RUN_NAME": "q", "MAX_STEPS": "20", "LEARNING_RATE": "5e-3", "BATCH_SIZE": "4", "GRAD_ACCUM": "1",
           "LOGGING_STEPS": "1", "QUANTIZATION": "4bit"}
    return context, model, train(context, model, context.settings(LoraSettings, env=env))


def test_qlora_trains_on_a_4bit_base(qlora):
    _, _, trained = qlora
    losses = trained["losses"]
    assert trained["quantization"] == "4bit" and trained["steps"] == 20
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses
    adapter = Path(trained["adapter_dir"])
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 8  # a plain LoRA adapter
    assert json.loads((adapter / "selfllm_lora.json").read_text())["settings"]["quantization"] == "4bit"


def test_infer_loads_the_base_as_the_adapter_was_trained_unless_told(qlora):
    context, model, trained = qlora
    adapter = Path(trained["adapter_dir"])
    ask = dict(max_new_tokens=4, temperature=0)
    as_trained = infer(context, model, adapter, "你是谁？", **ask)
    on_bf16 = infer(context, model, adapter, "你是谁？", quantization="none", **ask)
    base = infer(context, model, None, "你是谁？", quantization="4bit", **ask)
    assert (as_trained["quantization"], on_bf16["quantization"], base["quantization"]) == ("4bit", "none", "4bit")
    assert abs(as_trained["prompt_logprob"] - base["prompt_logprob"]) > 1e-4  # the adapter moved the 4-bit model


def test_a_qlora_adapter_merges_into_the_full_precision_base(qlora, tmp_path):
    context, model, trained = qlora
    adapter = Path(trained["adapter_dir"])
    result = merge(context, model, adapter, tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert result["trained_on"] == "4bit" and result["merged_dtype"] == "float32"
    assert "quantization_config" not in config
    merged = infer(context, tmp_path / "merged", None, "你是谁？", max_new_tokens=4, temperature=0)
    on_full = infer(context, model, adapter, "你是谁？", quantization="none", max_new_tokens=4, temperature=0)
    assert merged["quantization"] == "none"
    assert abs(merged["prompt_logprob"] - on_full["prompt_logprob"]) < 1e-3  # merged = full base + adapter


def test_generation_spreads_over_the_visible_cards_or_pins_the_named_ones(monkeypatch):
    """GPUS=all: device_map=auto over every visible card, named at start; GPUS=1: that card only; an unknown card
    is refused by name (the CUDA calls are stand-ins: this machine has no GPU)."""
    import torch

    from selfllm_runtime.loading import card_placement

    class Props:
        total_memory = 24 * 2**30

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "RTX 4090")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props())
    kwargs, where = card_placement(None)
    assert kwargs == {"device_map": "auto", "max_memory": {0: 24 * 2**30, 1: 24 * 2**30}}
    assert where == "layers spread over 2 cards (device_map=auto): cuda:0 RTX 4090 24 GiB, cuda:1 RTX 4090 24 GiB"
    kwargs, where = card_placement([1])
    assert kwargs == {"device_map": {"": 1}} and where == "on one card: cuda:1 RTX 4090 24 GiB"
    with pytest.raises(ValueError, match="GPUS=3: no card 3"):
        card_placement([3])


def test_gpus_setting_is_checked_by_name():
    from selfllm_recipes.layout import RECIPES_DIR
    from selfllm_runtime.context import load_context
    from selfllm_runtime.settings import SettingsError

    context = load_context(RECIPES_DIR / "qwen3" / "fastapi")
    assert context.settings(env={}).gpu_indices() is None
    assert context.settings(env={"GPUS": "0,2"}).gpu_indices() == [0, 2]
    with pytest.raises(SettingsError, match="GPUS='first'"):
        context.settings(env={"GPUS": "first"})


def test_4bit_on_cpu_leaves_the_layers_the_cpu_kernel_cant_pack_unquantized(tiny_recipe, tmp_path):
    """Qwen1.5-MoE's shared-expert gate maps the hidden state to one number: bitsandbytes' CPU 4-bit kernel packs 32
    output rows at a time, so that Linear (and any other of such a shape) stays unquantized on CPU; the rest is 4-bit."""
    import torch
    import transformers
    from selfllm_runtime.loading import cpu_4bit_unpackable, load_causal_lm

    config = transformers.Qwen2MoeConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, num_experts=4,
                                         num_experts_per_tok=2, moe_intermediate_size=64,
                                         shared_expert_intermediate_size=64)
    folder = tmp_path / "qwen2-moe"
    transformers.Qwen2MoeForCausalLM(config).save_pretrained(folder)
    unpackable = cpu_4bit_unpackable(transformers.Qwen2MoeForCausalLM, folder, trust_remote_code=False)
    assert unpackable == ["model.layers.0.mlp.shared_expert_gate", "model.layers.1.mlp.shared_expert_gate"]
    context = tiny_recipe("qwen3-moe/lora")[0]
    loaded = load_causal_lm(context, folder, "4bit")
    linear4 = {name for name, m in loaded.model.named_modules() if type(m).__name__ == "Linear4bit"}
    assert "model.layers.0.self_attn.q_proj" in linear4 and not set(unpackable) & linear4
    assert type(loaded.model.get_submodule(unpackable[0])) is torch.nn.Linear
    assert loaded.model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 512)
