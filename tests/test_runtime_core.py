"""The in-image runtime on the host: model acquisition, reasoning split, tiny model, legacy API."""
from __future__ import annotations

from pathlib import Path

import pytest

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
