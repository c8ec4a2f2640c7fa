"""Tool calling: the families' templates render tools and tool turns, the parser reads recorded
model outputs per format, and the OpenAI API round trip (SDK, streaming and not) on the tiny Qwen3."""
from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import script_model

from selfllm_runtime.metadata import ToolCalls
from selfllm_runtime.system_role import render_chat
from selfllm_runtime.tool_calls import ToolCallStream, parse_tool_calls, template_inputs

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the local time of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOLS = [WEATHER, TIME]
NAMES = {"get_weather", "get_time"}
ASKED = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
CALLED = [*ASKED,
          {"role": "assistant", "content": "", "tool_calls": [
              {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
          {"role": "tool", "tool_call_id": "call_1", "content": "31C and sunny"}]

HERMES = ToolCalls(format="hermes", start="<tool_call>", end="</tool_call>", vllm_parser="hermes")
LLAMA = ToolCalls(format="llama3_json", vllm_parser="llama3_json")
GLM4 = ToolCalls(format="glm4", tools_in="system_message")
MINICPM5 = ToolCalls(format="minicpm5", start="<function", end="</function>", vllm_parser="minicpm5")

WITH_TOOLS = ["qwen3", "qwen3-moe", "qwen2.5", "qwen2.5-coder", "llama3.1", "glm4", "minicpm5"]
WITHOUT_TOOLS = ["deepseek-r1-distill-qwen", "phi3", "phi4", "gemma", "gemma2", "ernie4.5", "gemma3", "gpt-oss", "llama3",
                 "yi", "deepseek-llm", "qwen2", "qwen1.5", "qwen1.5-moe", "deepseek-coder-v2-lite", "glm4.7-flash"]


# ----------------------------------------------------------------------------- model data + templates

def test_families_with_tool_calls_are_those_whose_template_renders_tools():
    from selfllm_recipes.layout import RECIPES_DIR
    from selfllm_runtime.metadata import load_family

    formats = {d.name: (f.tool_calls.format if (f := load_family(d)).tool_calls else None)
               for d in sorted(RECIPES_DIR.iterdir()) if (d / "model.yaml").is_file()}
    assert formats == {"qwen3": "hermes", "qwen3-moe": "hermes", "qwen2.5": "hermes", "qwen2.5-coder": "hermes",
                       "llama3.1": "llama3_json", "glm4": "glm4", "minicpm5": "minicpm5",
                       "deepseek-r1-distill-qwen": None, "phi3": None, "phi4": None, "gemma": None, "gemma2": None,
                       "ernie4.5": None, "gemma3": None, "gpt-oss": None, "llama3": None, "yi": None,
                       "deepseek-llm": None, "qwen2": None, "qwen1.5": None, "qwen3-vl": "hermes", "qwen2-vl": None,
                       "glm4.1v": None, "gemma4": None, "qwen3.5": None, "qwen1.5-moe": None,
                       "deepseek-coder-v2-lite": None, "glm4.7-flash": None,
                       # vLLM-only multi-GPU families: vLLM's own tool parsers (model.yaml), no transformers-engine format
                       "glm4.5-air": None, "hunyuan-a13b": None, "minimax-m2": None,
                       # remote-code families: no tool-call format in the shipped templates
                       "chatglm3": None, "internlm3": None}


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, Any]:
    """Each family's context and a small tokenizer carrying its real chat template."""
    from selfllm_recipes.layout import RECIPES_DIR
    from selfllm_runtime.context import load_context
    from selfllm_runtime.smoke_model import _train_tokenizer

    made = {}
    for family in [*WITH_TOOLS, *WITHOUT_TOOLS]:
        context = load_context(RECIPES_DIR / family / "fastapi")
        made[family] = (context, _train_tokenizer(context, 512))
    return made


def render(tokenizers: dict[str, Any], family: str, messages: list[dict[str, Any]],
           tools: list[dict[str, Any]] | None) -> str:
    context, tokenizer = tokenizers[family]
    messages, extra = template_inputs(messages, tools, context.family.tool_calls)
    return render_chat(tokenizer, messages, context.family.system_role, add_generation_prompt=True,
                       **context.template_kwargs(), **extra)


@pytest.mark.parametrize("family", WITH_TOOLS)
def test_template_shows_the_tools(tokenizers, family):
    prompt = render(tokenizers, family, ASKED, TOOLS)
    for tool in TOOLS:
        assert tool["function"]["name"] in prompt and tool["function"]["description"] in prompt
    assert "Be brief." in prompt and "Weather in Paris?" in prompt
    assert "get_weather" not in render(tokenizers, family, ASKED, None)


# What each template makes of the assistant's call and the tool's answer (the model's own format).
RENDERED_CALL = {
    "qwen3": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
             "<|im_start|>user\n<tool_response>\n31C and sunny\n</tool_response><|im_end|>",
    "qwen2.5": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
               "<|im_start|>user\n<tool_response>\n31C and sunny\n</tool_response><|im_end|>",
    "qwen3-moe": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
                 "<|im_start|>user\n<tool_response>\n31C and sunny\n</tool_response><|im_end|>",
    "qwen2.5-coder": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
                     "<|im_end|>\n<|im_start|>user\n<tool_response>\n31C and sunny\n</tool_response><|im_end|>",
    # Llama's template writes a string result with tojson (a string is iterable in Jinja).
    "llama3.1": '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
                '<|start_header_id|>ipython<|end_header_id|>\n\n"31C and sunny"<|eot_id|>',
    "glm4": '<|assistant|>get_weather\n{"city": "Paris"}<|observation|>\n31C and sunny<|assistant|>',
    # MiniCPM5: XML call; the tool's answer goes into a user turn (enable_thinking is on by default, so the
    # next generation prompt opens <think>)
    "minicpm5": '<|im_start|>assistant\n<function name="get_weather"><param name="city">Paris</param></function>'
                "<|im_end|>\n<|im_start|>user\n<tool_response>\n31C and sunny\n</tool_response><|im_end|>\n"
                "<|im_start|>assistant\n<think>\n",
}


@pytest.mark.parametrize("family", WITH_TOOLS)
def test_template_renders_calls_and_results_in_the_models_format(tokenizers, family):
    prompt = render(tokenizers, family, CALLED, TOOLS)
    assert RENDERED_CALL[family] in prompt, prompt
    # what the template rendered of the earlier call parses back to the same call
    spec = tokenizers[family][0].family.tool_calls
    head = {"qwen3": "<tool_call>", "qwen3-moe": "<tool_call>", "qwen2.5": "<tool_call>", "qwen2.5-coder": "<tool_call>",
            "llama3.1": '{"name"', "glm4": "get_weather\n", "minicpm5": "<function"}[family]
    call_text = RENDERED_CALL[family][RENDERED_CALL[family].index(head):]
    call_text = call_text.split({"llama3.1": "<|eot_id|>", "glm4": "<|observation|>"}.get(family, "<|im_end|>"))[0]
    content, calls = parse_tool_calls(call_text, spec, NAMES)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})], call_text


def test_glm4_tools_join_an_existing_system_message_or_get_their_own():
    with_system, _ = template_inputs(ASKED, TOOLS, GLM4)
    assert with_system[0] == {**ASKED[0], "tools": TOOLS} and with_system[1:] == ASKED[1:]
    without, extra = template_inputs(ASKED[1:], TOOLS, GLM4)
    assert without[0] == {"role": "system", "content": "", "tools": TOOLS} and extra == {}


def test_families_without_tool_support_get_messages_unchanged():
    messages, extra = template_inputs(CALLED, TOOLS, None)
    assert messages is CALLED and extra == {}


@pytest.mark.parametrize("family", WITHOUT_TOOLS)
def test_families_without_tool_support_render_system_and_user(tokenizers, family):
    """Gemma-2's template has no system role: the system text goes into the user turn instead of failing."""
    prompt = render(tokenizers, family, ASKED, None)
    assert "Be brief." in prompt and "Weather in Paris?" in prompt and "get_weather" not in prompt


# ----------------------------------------------------------------------------- parser (recorded outputs)

def calls_of(text: str, spec: ToolCalls) -> tuple[str, list[tuple[str, Any]]]:
    content, calls = parse_tool_calls(text, spec, NAMES)
    assert all(c.id.startswith("call_") and len(c.id) > 10 for c in calls)
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


HERMES_CASES = [
    ("one call", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "", [("get_weather", {"city": "Paris"})]),
    ("two calls with text before",
     'Let me check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "巴黎"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_time", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Let me check both.", [("get_weather", {"city": "巴黎"}), ("get_time", {"city": "Paris"})]),
    ("unterminated but whole JSON", '<tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n',
     "", [("get_time", {"city": "Oslo"})]),
    ("cut off inside the JSON", '<tool_call>\n{"name": "get_time", "argum', None, []),
    ("malformed JSON", '<tool_call>\n{"name": get_time, "arguments": {}}\n</tool_call>', None, []),
    ("JSON but no name", '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>', None, []),
    ("arguments not an object", '<tool_call>\n{"name": "get_time", "arguments": "Paris"}\n</tool_call>', None, []),
    ("no markup", "It is sunny in Paris.", None, []),
]


@pytest.mark.parametrize("label,text,content,calls", HERMES_CASES, ids=[c[0] for c in HERMES_CASES])
def test_hermes_parser(label, text, content, calls):
    assert calls_of(text, HERMES) == (text if content is None else content, calls)


LLAMA_CASES = [
    ("one call", '{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [("get_weather", {"city": "Paris"})]),
    ("after python_tag", '<|python_tag|>{"name": "get_time", "parameters": {"city": "Oslo"}}', "",
     [("get_time", {"city": "Oslo"})]),
    ("two calls", '{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                  '{"name": "get_time", "parameters": {"city": "Paris"}}', "",
     [("get_weather", {"city": "Paris"}), ("get_time", {"city": "Paris"})]),
    ("arguments key", '{"name": "get_time", "arguments": {"city": "Rome"}}', "", [("get_time", {"city": "Rome"})]),
    ("cut off", '{"name": "get_weather", "parameters": {"ci', None, []),
    ("unknown function", '{"name": "send_mail", "parameters": {"to": "x"}}', None, []),
    ("prose after the JSON", '{"name": "get_time", "parameters": {"city": "Rome"}} is what I would call.', None, []),
    ("plain JSON answer", '{"city": "Paris", "temperature": 31}', None, []),
    ("prose", "The weather in Paris is sunny.", None, []),
]


@pytest.mark.parametrize("label,text,content,calls", LLAMA_CASES, ids=[c[0] for c in LLAMA_CASES])
def test_llama3_json_parser(label, text, content, calls):
    assert calls_of(text, LLAMA) == (text if content is None else content, calls)


GLM_CASES = [
    ("one call", 'get_weather\n{"city": "Paris"}', "", [("get_weather", {"city": "Paris"})]),
    ("empty arguments", "get_time\n{}", "", [("get_time", {})]),
    ("cut off", 'get_weather\n{"city": "Par', None, []),
    ("unknown name", 'send_mail\n{"to": "x"}', None, []),
    ("answer mentioning a tool", "get_weather\nis the tool I would use.", None, []),
    ("plain answer", "\n巴黎今天晴，31 度。", None, []),
]


@pytest.mark.parametrize("label,text,content,calls", GLM_CASES, ids=[c[0] for c in GLM_CASES])
def test_glm4_parser(label, text, content, calls):
    assert calls_of(text, GLM4) == (text if content is None else content, calls)


# The request's tools type MiniCPM5's text values (as their JSON schema says).
TYPED = {"get_weather": {"city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
                         "hours": {"type": "array"}, "zip": {"type": "string"}, "ratio": {"type": ["number", "null"]}}}
MINICPM5_CASES = [
    ("one call", '<function name="get_weather"><param name="city">Paris</param></function>',
     "", [("get_weather", {"city": "Paris"})]),
    ("two calls with text before",
     'Let me check both.\n<function name="get_weather"><param name="city">巴黎</param></function>\n'
     '<function name="get_time"><param name="city">Paris</param></function>',
     "Let me check both.", [("get_weather", {"city": "巴黎"}), ("get_time", {"city": "Paris"})]),
    ("typed by the schema",
     '<function name="get_weather"><param name="city">Paris</param><param name="days">3</param>'
     '<param name="metric">true</param><param name="hours">[9, 12]</param><param name="zip">75001</param>'
     '<param name="ratio">0.5</param><param name="extra">42</param></function>', "",
     [("get_weather", {"city": "Paris", "days": 3, "metric": True, "hours": [9, 12], "zip": "75001", "ratio": 0.5,
                       "extra": "42"})]),
    ("CDATA value", '<function name="get_time"><param name="city"><![CDATA[New\n<York> & Co]]></param></function>',
     "", [("get_time", {"city": "New\n<York> & Co"})]),
    ("no parameters", '<function name="get_time"></function>', "", [("get_time", {})]),
    ("value that does not parse as its type stays text",
     '<function name="get_weather"><param name="days">three</param></function>', "", [("get_weather", {"days": "three"})]),
    ("cut off", '<function name="get_weather"><param name="city">Par', None, []),
    ("text inside the call", '<function name="get_weather">city=Paris</function>', None, []),
    ("the system prompt's wording", "I would answer without any <function ... </function>.", None, []),
    ("no markup", "It is sunny in Paris.", None, []),
]


@pytest.mark.parametrize("label,text,content,calls", MINICPM5_CASES, ids=[c[0] for c in MINICPM5_CASES])
def test_minicpm5_parser(label, text, content, calls):
    got, found = parse_tool_calls(text, MINICPM5, NAMES, TYPED)
    assert (got, [(c.name, json.loads(c.arguments)) for c in found]) == (text if content is None else content, calls)


def test_tool_parameters_are_each_tools_property_schemas():
    from selfllm_runtime.tool_calls import tool_parameters

    assert tool_parameters(TOOLS) == {"get_weather": {"city": {"type": "string"}}, "get_time": {"city": {"type": "string"}}}
    assert tool_parameters([{"type": "function", "function": {"name": "ping"}}]) == {"ping": {}}
    assert tool_parameters(None) == {}


def test_each_call_gets_its_own_id():
    _, calls = parse_tool_calls(HERMES_CASES[1][1], HERMES, NAMES)
    assert len({c.id for c in calls}) == 2


def streamed(spec: ToolCalls, text: str, step: int = 3) -> tuple[list[str], str, list[tuple[str, Any]]]:
    """(content pieces sent while streaming, content at the end, calls) for text fed `step` chars at a time."""
    stream = ToolCallStream(spec, NAMES)
    sent = [piece for i in range(0, len(text), step) if (piece := stream.feed(text[i:i + step]))]
    rest, calls = stream.finish()
    return sent, rest, [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("spec,text", [
    (HERMES, "Let me check.\n" + HERMES_CASES[1][1].split("\n", 1)[1]),
    (LLAMA, LLAMA_CASES[2][1]), (GLM4, GLM_CASES[0][1]), (MINICPM5, MINICPM5_CASES[1][1])],
    ids=["hermes", "llama3_json", "glm4", "minicpm5"])
def test_stream_holds_back_calls_and_parses_them_at_the_end(spec, text):
    sent, rest, calls = streamed(spec, text)
    assert calls and not any(marker in "".join(sent) for marker in ("<tool", "<func", "{", "get_"))
    whole_content, whole_calls = calls_of(text, spec)
    assert ("".join(sent) + rest).strip() == whole_content and calls == whole_calls


@pytest.mark.parametrize("spec,text", [
    (HERMES, "It is <b>sunny</b> in Paris; <tool maybe."), (HERMES, HERMES_CASES[4][1]),
    (LLAMA, "The weather in Paris is sunny."), (LLAMA, LLAMA_CASES[4][1]),
    (GLM4, "\n巴黎今天晴，31 度。"), (GLM4, GLM_CASES[2][1]),
    (MINICPM5, "Use <b>bold</b>; <func maybe."), (MINICPM5, MINICPM5_CASES[6][1])],
    ids=["hermes prose", "hermes malformed", "llama prose", "llama cut off", "glm prose", "glm cut off",
         "minicpm5 prose", "minicpm5 cut off"])
def test_stream_without_a_call_gives_back_all_the_text(spec, text):
    sent, rest, calls = streamed(spec, text)
    assert calls == [] and "".join(sent) + rest == text


def test_prose_streams_before_the_end():
    sent, _, _ = streamed(HERMES, "It is sunny in Paris today, enjoy it.")
    assert len(sent) > 3
    sent, _, _ = streamed(LLAMA, "It is sunny in Paris today, enjoy it.")
    assert len(sent) > 3
    sent, _, _ = streamed(MINICPM5, "It is sunny in Paris today, enjoy it.")
    assert len(sent) > 3


# ----------------------------------------------------------------------------- the OpenAI API (tiny Qwen3)

URL = "/v1/chat/completions"
MODEL = "Qwen/Qwen3-8B"
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
THINKING = "<think>\nThe user wants the weather; I should call get_weather.\n</think>\n\n"
CALL_TEXT = 'I will look it up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
FINAL = "It is 31C and sunny in Paris."


def scripted_model(engine, monkeypatch, prompts: list[str]) -> None:
    """model.generate 'writes' a tool call, or the final answer once the prompt holds a tool
    response; the text goes through the real decode / reasoning split / stream code."""
    def answer(prompt: str) -> str:
        prompts.append(prompt)
        return THINKING + (FINAL if "<tool_response>" in prompt else CALL_TEXT)

    script_model(engine, monkeypatch, answer)


@pytest.fixture
def prompts(engine, monkeypatch) -> list[str]:
    seen: list[str] = []
    scripted_model(engine, monkeypatch, seen)
    return seen


@pytest.fixture(scope="module")
def server_url(engine):
    """The fastapi task's app on a real uvicorn on 127.0.0.1: its OpenAI base URL."""
    from conftest import uvicorn_on_loopback

    from selfllm_runtime.tasks.fastapi_server import create_app

    with uvicorn_on_loopback(create_app(engine)) as url:
        yield url + "/v1"


@pytest.fixture(scope="module")
def api(server_url):
    import openai

    return openai.OpenAI(base_url=server_url, api_key="dummy", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def client(engine):
    from fastapi.testclient import TestClient

    from selfllm_runtime.tasks.fastapi_server import create_app

    with TestClient(create_app(engine)) as test_client:
        yield test_client


def test_sdk_round_trip_without_streaming(api, prompts):
    first = api.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, max_tokens=200)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I will look it up."
    assert choice.message.reasoning_content == "The user wants the weather; I should call get_weather."
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert "get_weather" in prompts[-1] and "Get the current weather of a city" in prompts[-1]

    history = [*QUESTION, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "31C, sunny"}]
    second = api.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=200)
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == FINAL and not second.choices[0].message.tool_calls
    # the call went back into the prompt in Qwen's own format, arguments as an object
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompts[-1]
    assert "<tool_response>\n31C, sunny\n</tool_response>" in prompts[-1]


def test_sdk_round_trip_streaming(api, prompts):
    chunks = list(api.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, max_tokens=200,
                                              stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    content = "".join(d.content or "" for d in deltas)
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert content.strip() == "I will look it up." and "<tool_call>" not in content
    assert "get_weather" in reasoning
    [call_delta] = [d.tool_calls for d in deltas if d.tool_calls]
    [call] = call_delta
    assert call.index == 0 and call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

    history = [*QUESTION, {"role": "assistant", "content": content, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "31C, sunny"}]
    chunks = list(api.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=200,
                                              stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip() == FINAL
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_tool_choice_none_neither_shows_nor_parses_the_tools(client, prompts):
    answer = client.post(URL, json={"model": MODEL, "messages": QUESTION, "tools": TOOLS, "tool_choice": "none",
                                    "max_tokens": 200}).json()
    choice = answer["choices"][0]
    assert "get_weather" not in prompts[-1] and "# Tools" not in prompts[-1]
    assert choice["finish_reason"] == "stop" and choice["message"]["tool_calls"] == []
    assert "<tool_call>" in choice["message"]["content"]  # what the model wrote, untouched


def test_named_tool_choice_shows_only_that_function(client, prompts):
    answer = client.post(URL, json={"model": MODEL, "messages": QUESTION, "tools": TOOLS, "max_tokens": 200,
                                    "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"] == "tool_calls"
    assert "get_weather" in prompts[-1] and "get_time" not in prompts[-1]


def test_required_tool_choice_returns_the_answer_when_the_model_makes_no_call(client, engine, monkeypatch):
    """No constrained decoding: a model that answers in prose is not turned into a call."""
    scripted_model(engine, monkeypatch, [])
    history = [*CALLED[1:]]
    answer = client.post(URL, json={"model": MODEL, "messages": history, "tools": TOOLS, "tool_choice": "required",
                                    "max_tokens": 200}).json()
    assert answer["choices"][0]["message"]["content"] == FINAL
    assert answer["choices"][0]["finish_reason"] == "stop" and answer["choices"][0]["message"]["tool_calls"] == []


BAD_TOOL_REQUESTS = [
    ("tool_choice without tools", {"tool_choice": "required"}, "tool_choice"),
    ("unknown named function", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "tool_choice"),
    ("tool name with spaces", {"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools"),
    ("tool of another type", {"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools"),
    ("arguments not JSON", {"messages": [*QUESTION, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "Paris"}}]}]}, "messages"),
]


@pytest.mark.parametrize("label,body,param", BAD_TOOL_REQUESTS, ids=[b[0] for b in BAD_TOOL_REQUESTS])
def test_bad_tool_requests_are_400(client, label, body, param):
    answer = client.post(URL, json={"model": MODEL, "messages": QUESTION, "max_tokens": 4, **body})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param


@pytest.fixture(scope="module")
def phi4_client(tiny_recipe):
    from fastapi.testclient import TestClient

    from selfllm_runtime.chat_engine import ChatEngine
    from selfllm_runtime.tasks.fastapi_server import create_app

    with TestClient(create_app(ChatEngine(*tiny_recipe("phi4/fastapi")))) as test_client:
        yield test_client


def test_family_without_tool_support_refuses_tools(phi4_client):
    body = {"messages": QUESTION, "max_tokens": 4}
    answer = phi4_client.post(URL, json={**body, "tools": TOOLS})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "tools"
    assert "phi" in answer.json()["error"]["message"].lower()
    # tool_choice "none" leaves the tools out instead
    assert phi4_client.post(URL, json={**body, "tools": TOOLS, "tool_choice": "none"}).status_code == 200


# --- LangChain: ChatSelfLLM.bind_tools in process, and langchain-openai's ChatOpenAI against the server ----------

def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return "31C and sunny"


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("chat_model", ["ChatSelfLLM", "ChatOpenAI"])
def test_langchain_bind_tools_round_trip(engine, server_url, prompts, chat_model, streaming):
    from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    from selfllm_runtime.lc.chat_model import ChatSelfLLM

    if chat_model == "ChatSelfLLM":
        llm = ChatSelfLLM(engine=engine, max_new_tokens=200).bind_tools([get_weather])
    else:  # an agent framework speaking the OpenAI protocol to the fastapi recipe
        llm = ChatOpenAI(base_url=server_url, api_key="dummy", model=MODEL, max_tokens=200, max_retries=0,
                         timeout=60).bind_tools([get_weather])

    def ask(history):
        if not streaming:
            return llm.invoke(history)
        chunks = list(llm.stream(history))
        return sum(chunks[1:], chunks[0])

    history = [HumanMessage("What is the weather in Paris?")]
    first = ask(history)
    assert [(c["name"], c["args"]) for c in first.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert first.content.strip() == "I will look it up." and "get_weather" in prompts[-1]  # the tool was shown
    if chat_model == "ChatSelfLLM":  # ChatOpenAI drops the non-standard reasoning_content
        assert first.additional_kwargs["reasoning_content"].strip().startswith("The user wants the weather")
    call = first.tool_calls[0]
    history += [AIMessage(content=first.content, tool_calls=first.tool_calls),
                ToolMessage(get_weather("Paris"), tool_call_id=call["id"])]
    final = ask(history)
    assert final.content.strip() == FINAL and not final.tool_calls
    assert "<tool_response>\n31C and sunny\n</tool_response>" in prompts[-1]  # Qwen3's template, our history
    assert f'"name": "get_weather", "arguments": {{"city": "Paris"}}' in prompts[-1]


def test_langchain_tool_choice_none_hides_the_tools(engine, prompts):
    from selfllm_runtime.lc.chat_model import ChatSelfLLM

    answer = ChatSelfLLM(engine=engine, max_new_tokens=200).bind_tools([get_weather], tool_choice="none").invoke("hi")
    assert "get_weather" not in prompts[-1] and not answer.tool_calls  # not shown, not parsed
    assert "<tool_call>" in answer.content


def test_langchain_bind_tools_needs_a_family_with_tool_calls(tiny_recipe):
    from selfllm_runtime.lc.chat_model import ChatSelfLLM

    from selfllm_runtime.chat_engine import ChatEngine

    phi4 = ChatEngine(*tiny_recipe("phi4/fastapi"))
    with pytest.raises(ValueError, match="does not render tools"):
        ChatSelfLLM(engine=phi4).bind_tools([get_weather])


# --- MiniCPM5's XML calls through the OpenAI API and ChatSelfLLM (tiny MiniCPM5, scripted output) -----------------

FORECAST = {"type": "function", "function": {
    "name": "get_forecast", "description": "Forecast of a city for some days",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city", "days"]}}}
XML_CALL = ('<think>\n要查天气。\n</think>\n\n好的。\n'
            '<function name="get_forecast"><param name="city">Paris</param><param name="days">3</param></function>')


@pytest.fixture(scope="module")
def minicpm5(tiny_recipe):
    from selfllm_runtime.chat_engine import ChatEngine

    return ChatEngine(*tiny_recipe("minicpm5/fastapi"))


@pytest.mark.parametrize("stream", [False, True])
def test_minicpm5_xml_call_comes_back_typed_by_the_tools_schema(minicpm5, monkeypatch, stream):
    """Thinking off, the model still writes a think block (upstream saw it): it goes to reasoning_content; the
    XML call becomes tool_calls with `days` an integer, as the tool's schema says; content keeps the prose."""
    from fastapi.testclient import TestClient

    from selfllm_runtime.tasks.fastapi_server import create_app

    seen: list[str] = []
    script_model(minicpm5, monkeypatch, lambda prompt: seen.append(prompt) or XML_CALL)
    body = {"model": "openbmb/MiniCPM5-1B", "messages": QUESTION, "tools": [FORECAST], "max_tokens": 200,
            "chat_template_kwargs": {"enable_thinking": False}, "stream": stream}
    with TestClient(create_app(minicpm5)) as client:
        answer = client.post(URL, json=body)
    assert answer.status_code == 200, answer.text
    assert "Forecast of a city for some days" in seen[-1] and seen[-1].endswith("<think>\n\n</think>\n\n")
    if stream:
        deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in answer.text.splitlines()
                  if line.startswith("data: {")]
        content = "".join(d.get("content") or "" for d in deltas)
        reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
        [calls] = [d["tool_calls"] for d in deltas if d.get("tool_calls")]
    else:
        message = answer.json()["choices"][0]["message"]
        content, reasoning, calls = message["content"], message["reasoning_content"], message["tool_calls"]
        assert answer.json()["choices"][0]["finish_reason"] == "tool_calls"
    assert content.strip() == "好的。" and reasoning.strip() == "要查天气。" and "<function" not in content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_forecast", {"city": "Paris", "days": 3})]


def test_minicpm5_chat_model_parses_its_xml_call(minicpm5, monkeypatch):
    from selfllm_runtime.lc.chat_model import ChatSelfLLM

    def get_forecast(city: str, days: int) -> str:
        """Forecast of a city for some days."""
        return "sunny"

    script_model(minicpm5, monkeypatch, XML_CALL)
    llm = ChatSelfLLM(engine=minicpm5, max_new_tokens=200, enable_thinking=False).bind_tools([get_forecast])
    answer = llm.invoke("Weather in Paris for 3 days?")
    assert [(c["name"], c["args"]) for c in answer.tool_calls] == [("get_forecast", {"city": "Paris", "days": 3})]
    assert answer.additional_kwargs["reasoning_content"] == "要查天气。"
    chunks = list(llm.stream("Weather in Paris for 3 days?"))
    merged = sum(chunks[1:], chunks[0])
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [("get_forecast", {"city": "Paris", "days": 3})]
