"""The OpenAI-compatible API of task `fastapi` (tasks/openai_api.py) on the tiny model, on CPU."""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from conftest import fastapi_client, script_model, uvicorn_on_loopback

from fastapi.testclient import TestClient

URL = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Hello, who are you?"}]


@pytest.fixture(scope="session")
def client(engine) -> Iterator[TestClient]:
    with fastapi_client(engine) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def server(engine) -> Iterator[str]:
    """A real uvicorn on 127.0.0.1 (threads of clients hit one event loop, as in production)."""
    from selfllm_runtime.tasks.fastapi_server import create_app

    with uvicorn_on_loopback(create_app(engine)) as url:
        yield url


def chat(client: TestClient, **body: Any) -> dict[str, Any]:
    answer = client.post(URL, json={"model": "Qwen/Qwen3-8B", "messages": HELLO, "max_tokens": 64, **body})
    assert answer.status_code == 200, answer.text
    return answer.json()


def sse_chunks(lines: Iterator[str]) -> list[Any]:
    """Parsed `data:` payloads; the last one must be [DONE]."""
    events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def stream(client: TestClient, **body: Any) -> list[dict[str, Any]]:
    payload = {"model": "Qwen/Qwen3-8B", "messages": HELLO, "max_tokens": 64, "stream": True, **body}
    with client.stream("POST", URL, json=payload) as answer:
        assert answer.status_code == 200, answer.read()
        assert answer.headers["content-type"].startswith("text/event-stream")
        return sse_chunks(answer.iter_lines())


def joined(chunks: list[dict[str, Any]], field: str = "content") -> str:
    return "".join(c["choices"][0]["delta"].get(field) or "" for c in chunks if c["choices"])


def assert_error_shape(answer: Any, status: int | None = None) -> dict[str, Any]:
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text)
    if status is not None:
        assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


# ----------------------------------------------------------------------------- basics

def test_models_lists_the_served_name(client):
    data = client.get("/v1/models").json()
    assert data["object"] == "list" and [m["id"] for m in data["data"]] == ["Qwen/Qwen3-8B"]
    assert client.get("/v1/models/Qwen/Qwen3-8B").json()["id"] == "Qwen/Qwen3-8B"
    assert_error_shape(client.get("/v1/models/other"), 404)


def test_served_model_name_from_env_and_folder_name_accepted(engine, monkeypatch):
    from selfllm_runtime.tasks.fastapi_server import create_app

    monkeypatch.setenv("SERVED_MODEL_NAME", "my-qwen")
    with TestClient(create_app(engine)) as custom:
        assert custom.get("/v1/models").json()["data"][0]["id"] == "my-qwen"
        for name in ("my-qwen", engine.model_dir.name):
            answer = custom.post(URL, json={"model": name, "messages": HELLO, "max_tokens": 2})
            assert answer.status_code == 200 and answer.json()["model"] == name


def test_non_streaming_answer_and_usage(client, engine):
    data = chat(client, temperature=0, max_tokens=12)
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    choice = data["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in {"stop", "length"}
    usage = data["usage"]
    prompt = engine.format_prompt(HELLO)
    assert usage["prompt_tokens"] == len(engine.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert 1 <= usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 12


def test_streaming_matches_non_streaming_and_reports_usage(client):
    whole = chat(client, temperature=0)
    chunks = stream(client, temperature=0, stream_options={"include_usage": True})
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and chunks[0]["object"] == "chat.completion.chunk"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == whole["choices"][0]["finish_reason"] and not any(finishes[:-1])
    assert joined(chunks).strip() == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])


def test_streaming_without_include_usage_has_no_usage(client):
    chunks = stream(client, temperature=0)
    assert all("usage" not in c for c in chunks) and chunks[-1]["choices"][0]["finish_reason"]


# ----------------------------------------------------------------------------- sampling controls

def test_seed_gives_the_same_text(client):
    runs = [chat(client, temperature=1.0, top_p=1.0, seed=seed, max_tokens=16)["choices"][0]["message"]["content"]
            for seed in (7, 7, 8)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@pytest.mark.parametrize("as_list", [False, True])
def test_stop_cuts_the_answer(client, as_list):
    text = chat(client, temperature=0, max_tokens=24)["choices"][0]["message"]["content"]
    assert len(text) > 8, text
    stop = text[5:8]
    expected = text[: text.index(stop)].strip()
    body = {"temperature": 0, "max_tokens": 24, "stop": ["no-such-stop", stop] if as_list else stop}
    data = chat(client, **body)
    assert data["choices"][0]["message"]["content"] == expected
    assert data["choices"][0]["finish_reason"] == "stop"
    chunks = stream(client, **body)
    assert joined(chunks).strip() == expected and stop not in joined(chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_max_tokens_bounds_the_answer(client):
    data = chat(client, temperature=1.0, seed=3, max_tokens=3)
    assert data["usage"]["completion_tokens"] <= 3


# ----------------------------------------------------------------------------- thinking

def captured_prompts(engine, monkeypatch) -> list[str]:
    prompts: list[str] = []
    original = engine.format_prompt

    def spy(messages, template_kwargs=None, tools=None):
        prompt = original(messages, template_kwargs, tools)
        prompts.append(prompt)
        return prompt

    monkeypatch.setattr(engine, "format_prompt", spy)
    return prompts


@pytest.mark.parametrize("switch", [
    {"enable_thinking": False},
    {"chat_template_kwargs": {"enable_thinking": False}},
])
def test_thinking_off_ends_prompt_with_empty_think_block(client, engine, monkeypatch, switch):
    prompts = captured_prompts(engine, monkeypatch)
    chat(client, max_tokens=2, **switch)
    assert prompts and all(p.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") for p in prompts)


def test_thinking_on_by_default(client, engine, monkeypatch):
    prompts = captured_prompts(engine, monkeypatch)
    chat(client, max_tokens=2)
    chat(client, max_tokens=2, chat_template_kwargs={"enable_thinking": True})
    assert len(prompts) >= 2 and all(p.endswith("<|im_start|>assistant\n") for p in prompts)


def test_reasoning_content_in_message_and_deltas(client, engine, monkeypatch):
    script_model(engine, monkeypatch, "<think>\nThe user says hello.\n</think>\n\nHello! I am a helpful assistant.")
    message = chat(client)["choices"][0]["message"]
    assert message["reasoning_content"] == "The user says hello."
    assert message["content"] == "Hello! I am a helpful assistant."
    chunks = stream(client)
    assert joined(chunks, "reasoning_content").strip() == "The user says hello."
    assert joined(chunks).strip() == "Hello! I am a helpful assistant."
    assert "<think>" not in joined(chunks) + joined(chunks, "reasoning_content")


def test_no_reasoning_content_when_thinking_is_off(client, engine, monkeypatch):
    script_model(engine, monkeypatch, "Hello! I am a helpful assistant.")
    message = chat(client, enable_thinking=False)["choices"][0]["message"]
    assert message["reasoning_content"] is None and message["content"] == "Hello! I am a helpful assistant."
    chunks = stream(client, enable_thinking=False)
    assert joined(chunks, "reasoning_content") == "" and joined(chunks) == "Hello! I am a helpful assistant."


# ----------------------------------------------------------------------------- bad requests

GOOD = {"model": "Qwen/Qwen3-8B", "messages": HELLO, "max_tokens": 4}
MALFORMED: list[tuple[str, Any, str | None]] = [
    ("not json", "{'messages': oops", None),
    ("empty body", "", None),
    ("json list", [1, 2], None),
    ("no messages", {"model": "Qwen/Qwen3-8B"}, "messages"),
    ("empty messages", {**GOOD, "messages": []}, "messages"),
    ("messages a string", {**GOOD, "messages": "hi"}, "messages"),
    ("unknown role", {**GOOD, "messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    ("content a number", {**GOOD, "messages": [{"role": "user", "content": 5}]}, "messages"),
    ("user without content", {**GOOD, "messages": [{"role": "user"}]}, "messages"),
    ("negative max_tokens", {**GOOD, "max_tokens": -5}, "max_tokens"),
    ("zero max_tokens", {**GOOD, "max_tokens": 0}, "max_tokens"),
    ("huge max_tokens", {**GOOD, "max_tokens": 10**12}, "max_tokens"),
    ("max_tokens a string", {**GOOD, "max_tokens": "many"}, "max_tokens"),
    ("temperature too high", {**GOOD, "temperature": 7}, "temperature"),
    ("temperature a boolean", {**GOOD, "temperature": True}, "temperature"),
    ("temperature a string", {**GOOD, "temperature": "0.5"}, "temperature"),
    ("stream a string", {**GOOD, "stream": "true"}, "stream"),
    ("max_tokens not whole", {**GOOD, "max_tokens": 4.5}, "max_tokens"),
    ("top_p zero", {**GOOD, "top_p": 0}, "top_p"),
    ("stop a number", {**GOOD, "stop": 3}, "stop"),
    ("unknown model", {**GOOD, "model": "gpt-4o"}, "model"),
    ("n > 1", {**GOOD, "n": 2}, None),
    ("reserved template kwarg", {**GOOD, "chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
]


@pytest.mark.parametrize("label,body,param", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_request_gets_openai_error_then_server_still_serves(client, label, body, param):
    content = body if isinstance(body, str) else json.dumps(body)
    answer = client.post(URL, content=content, headers={"Content-Type": "application/json"})
    error = assert_error_shape(answer)
    if param is not None:
        assert error["param"] == param, error
    assert client.post(URL, json=GOOD).status_code == 200


def test_legacy_route_keeps_fastapi_422(client):
    answer = client.post("/", json={"prompt": ""})
    assert answer.status_code == 422 and "detail" in answer.json()
    assert client.post("/", json={"prompt": "hi", "max_length": "4"}).status_code == 422  # no coercion
    assert client.post("/", json={"prompt": "hi", "temperature": True}).status_code == 422
    assert client.post("/", json={"prompt": "hi", "max_length": 4.0}).status_code == 200  # a JSON integer


def test_a_whole_float_is_an_integer(client):
    assert chat(client, max_tokens=4.0, n=1.0)["usage"]["completion_tokens"] <= 4
    legacy = client.post("/", json={"prompt": "你好", "history": [], "max_length": 4})
    assert legacy.status_code == 200 and legacy.json()["status"] == 200


def test_unknown_v1_route_is_openai_shaped(client):
    assert_error_shape(client.get("/v1/nothing-here"), 404)


# ----------------------------------------------------------------------------- API key

def test_api_key_required_when_set(engine, monkeypatch):
    from selfllm_runtime.tasks.fastapi_server import create_app

    monkeypatch.setenv("API_KEY", "s3cret")
    with TestClient(create_app(engine)) as keyed:
        assert keyed.get("/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            for method, path in (("GET", "/v1/models"), ("POST", URL), ("POST", "/")):
                answer = keyed.request(method, path, json=GOOD, headers=headers)
                assert answer.status_code == 401, (headers, path, answer.text)
                assert answer.json()["error"]["code"] == "invalid_api_key"
        auth = {"Authorization": "Bearer s3cret"}
        assert keyed.get("/v1/models", headers=auth).status_code == 200
        assert keyed.post(URL, json=GOOD, headers=auth).status_code == 200
        with keyed.stream("POST", URL, json={**GOOD, "stream": True}, headers=auth) as answer:
            assert answer.status_code == 200 and sse_chunks(answer.iter_lines())


def test_no_api_key_by_default(client):
    assert client.get("/v1/models").status_code == 200


def test_bearer_scheme_is_case_insensitive_and_key_must_match_exactly(engine, monkeypatch):
    from selfllm_runtime.tasks.fastapi_server import create_app

    monkeypatch.setenv("API_KEY", "s3cret")
    with TestClient(create_app(engine)) as keyed:
        for scheme in ("Bearer", "bearer", "BEARER", "bEaReR"):
            answer = keyed.get("/v1/models", headers={"Authorization": f"{scheme} s3cret"})
            assert answer.status_code == 200, (scheme, answer.text)
        for value in ("Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "Bearer", "s3cret"):
            assert keyed.get("/v1/models", headers={"Authorization": value}).status_code == 401, value


# ----------------------------------------------------------------------------- failures and logs

SECRET_TEXT = "/root/private/path token=hunter2"


def _crash(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError(SECRET_TEXT)


@pytest.mark.parametrize("path,body", [(URL, GOOD), ("/", {"prompt": "你好", "max_length": 4})])
def test_500_hides_the_exception_and_gives_a_request_id_found_in_the_log(engine, monkeypatch, caplog, path, body):
    from selfllm_runtime.tasks.fastapi_server import create_app

    monkeypatch.setattr(engine.model, "generate", _crash)  # fails inside the engine, as a real failure would
    with TestClient(create_app(engine), raise_server_exceptions=False) as crashing:
        with caplog.at_level("ERROR", logger="selfllm.openai"):
            answer = crashing.post(path, json=body)
    assert answer.status_code == 500
    assert SECRET_TEXT not in answer.text and "hunter2" not in answer.text and "RuntimeError" not in answer.text
    request_id = answer.headers["X-Request-ID"]
    if path == URL:
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
        message = error["message"]
    else:
        message = answer.json()["detail"]
    assert request_id.startswith("req-") and request_id in message
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and logged[0].exc_info is not None and SECRET_TEXT in str(logged[0].exc_info[1])


def test_stream_failure_hides_the_exception(engine, monkeypatch, caplog):
    from selfllm_runtime.tasks.fastapi_server import create_app

    def failing_stream(messages, params):
        yield ("content", "partial")
        raise RuntimeError(SECRET_TEXT)

    monkeypatch.setattr(engine, "stream", failing_stream)
    with TestClient(create_app(engine)) as app_client, caplog.at_level("ERROR", logger="selfllm.openai"):
        with app_client.stream("POST", URL, json={**GOOD, "stream": True}) as answer:
            chunks = sse_chunks(answer.iter_lines())
    error = chunks[-1]["error"]
    assert SECRET_TEXT not in error["message"] and error["type"] == "server_error"
    request_id = error["message"].split("request id ")[1].split(";")[0]
    assert any(request_id in r.getMessage() for r in caplog.records)


def test_legacy_route_logs_sizes_at_info_and_texts_only_at_debug(client, caplog):
    prompt = "请记住这个独一无二的提示词 XYZZY"
    with caplog.at_level("INFO", logger="selfllm.fastapi"):
        assert client.post("/", json={"prompt": prompt, "max_length": 4}).status_code == 200
    info = [r.getMessage() for r in caplog.records if r.name == "selfllm.fastapi"]
    assert info and all("XYZZY" not in m for m in info)
    assert any(f"prompt: {len(prompt)} chars" in m for m in info), info
    caplog.clear()
    with caplog.at_level("DEBUG", logger="selfllm.fastapi"):
        assert client.post("/", json={"prompt": prompt, "max_length": 4}).status_code == 200
    assert any("XYZZY" in r.getMessage() and r.levelname == "DEBUG" for r in caplog.records)


# ----------------------------------------------------------------------------- a real server

def test_openai_client_against_uvicorn(server):
    import openai

    api = openai.OpenAI(base_url=server + "/v1", api_key="dummy", max_retries=0, timeout=60)
    assert [m.id for m in api.models.list().data] == ["Qwen/Qwen3-8B"]
    answer = api.chat.completions.create(model="Qwen/Qwen3-8B", messages=HELLO, max_tokens=8, seed=1,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert isinstance(answer.choices[0].message.content, str) and answer.usage.completion_tokens <= 8
    pieces = list(api.chat.completions.create(model="Qwen/Qwen3-8B", messages=HELLO, max_tokens=8, stream=True,
                                              stream_options={"include_usage": True}))
    assert pieces[-1].usage is not None and pieces[-1].usage.completion_tokens <= 8
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model="Qwen/Qwen3-8B", messages=[], max_tokens=8)


def test_sixteen_concurrent_requests_are_all_answered_correctly(server):
    """Greedy answers under 16 concurrent clients (half streaming) equal the ones given one at a time."""
    import httpx

    def ask(i: int, streaming: bool, http: httpx.Client) -> tuple[str, dict[str, Any]]:
        body = {"model": "Qwen/Qwen3-8B", "messages": [{"role": "user", "content": f"Question number {i}?"}],
                "max_tokens": 10, "temperature": 0, "stream": streaming}
        if not streaming:
            answer = http.post(server + URL, json=body)
            assert answer.status_code == 200, answer.text
            data = answer.json()
            return data["choices"][0]["message"]["content"], data["usage"]
        body["stream_options"] = {"include_usage": True}
        with http.stream("POST", server + URL, json=body) as answer:
            assert answer.status_code == 200
            chunks = sse_chunks(answer.iter_lines())
        assert len({c["id"] for c in chunks}) == 1, "chunks of two answers interleaved"
        return joined(chunks).strip(), chunks[-1]["usage"]

    with httpx.Client(timeout=120) as http:
        expected = [ask(i, False, http) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        clients = [httpx.Client(timeout=120) for _ in range(16)]
        futures = [pool.submit(ask, i, i % 2 == 1, clients[i]) for i in range(16)]
        got = [f.result(timeout=300) for f in futures]
        for http in clients:
            http.close()
    assert got == expected
    with httpx.Client(timeout=30) as http:
        assert http.get(server + "/health").status_code == 200


def test_client_leaving_a_stream_frees_the_model(server, engine, monkeypatch):
    """A stream whose client disconnects stops generating, so queued requests are not held up."""
    import httpx

    jobs = []
    submit = engine.scheduler.submit
    monkeypatch.setattr(engine.scheduler, "submit", lambda job: jobs.append(job) or submit(job))
    body = {"messages": HELLO, "max_tokens": 3000, "temperature": 1.0, "seed": 1, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server + URL, json=body) as answer:
            for line in answer.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:
                    break  # generating now; leave
    [job] = jobs
    deadline = time.monotonic() + 10
    while engine.scheduler.running or not job.closed:
        assert time.monotonic() < deadline, "the model is still generating for a client that left"
        time.sleep(0.05)
    assert job.cancelled.is_set()
    # ended by the client leaving, not by the model (a stop token) or its budget
    assert job.produced < job.max_new_tokens and job.tokens[-1] not in engine.scheduler.stop_token_ids, job.produced


def test_stream_holds_back_a_possible_stop_string(client, engine, monkeypatch):
    """Text that may be the start of a stop string is not streamed until it is known not to be."""
    script_model(engine, monkeypatch, "Hello! I am a helpful assistant.")
    body = {"enable_thinking": False, "stop": ["a help", "am a robot"]}
    assert chat(client, **body)["choices"][0]["message"]["content"] == "Hello! I am"
    chunks = stream(client, **body)
    assert joined(chunks) == "Hello! I am " and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    script_model(engine, monkeypatch, "Hello! I am a helpful assistant.")
    assert joined(stream(client, enable_thinking=False, stop=["a helper"])) == "Hello! I am a helpful assistant."
