"""Serving under load (batching.py + the fastapi task) on the tiny Qwen3, CPU: concurrent requests
share generate calls and answer exactly as alone; health never waits; the queue is bounded."""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import uvicorn_on_loopback

pytest.importorskip("fastapi")

from selfllm_runtime.batching import EngineBusy  # noqa: E402
from selfllm_runtime.chat_engine import ChatEngine, GenerationParams  # noqa: E402

PROMPTS = [[{"role": "user", "content": f"第 {i} 个问题：你好，请介绍一下你自己。"}] for i in range(8)]


def greedy(tokens: int = 12) -> GenerationParams:
    return GenerationParams(max_new_tokens=tokens, temperature=0, template_kwargs={"enable_thinking": False})


def test_concurrent_greedy_requests_are_batched_and_answer_as_alone(engine):
    alone = [engine.generate(m, greedy()).text for m in PROMPTS]
    before = engine.scheduler.batches
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda m: engine.generate(m, greedy()).text, PROMPTS))
    assert together == alone
    assert engine.scheduler.largest_batch >= 2
    assert engine.scheduler.batches - before < len(PROMPTS)  # fewer generate calls than requests


def test_rows_keep_their_own_budget_and_stop_strings(engine):
    short, long_ = greedy(3), greedy(20)
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda p: engine.generate(PROMPTS[0], p), [short, long_])
    assert a.completion_tokens <= 3 and b.completion_tokens <= 20
    text = engine.generate(PROMPTS[0], greedy(20)).text
    if len(text) > 4:  # stop at a piece of the greedy answer: it is cut there, under load too
        stop = text[2:4]
        params = GenerationParams(max_new_tokens=20, temperature=0, stop=[stop], template_kwargs={"enable_thinking": False})
        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda p: engine.generate(PROMPTS[0], p), [params, greedy(20), params]))
        assert results[0].text == results[2].text == text[:2] and results[0].finish_reason == "stop"


def test_a_seeded_request_gives_the_same_text_alone_and_under_load(engine):
    seeded = GenerationParams(max_new_tokens=12, temperature=1.0, top_p=1.0, seed=42)
    alone = engine.generate(PROMPTS[1], seeded).text
    noise = GenerationParams(max_new_tokens=12, temperature=1.0, top_p=1.0)
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(engine.generate, PROMPTS[i], noise) for i in range(5)]
        under_load = pool.submit(engine.generate, PROMPTS[1], seeded).result().text
        [f.result() for f in futures]
    assert under_load == alone


def test_full_queue_answers_503_with_retry_after(tiny_recipe, monkeypatch):
    """A one-slot queue: while a generation runs and one request waits, the next gets 503."""
    from fastapi.testclient import TestClient

    from selfllm_runtime.tasks.fastapi_server import create_app

    engine = ChatEngine(*tiny_recipe("qwen3/fastapi"), max_queue=1)
    release = threading.Event()
    real_generate = engine.model.generate

    def held_generate(**kwargs):
        release.wait(60)
        return real_generate(**kwargs)

    monkeypatch.setattr(engine.model, "generate", held_generate)
    client = TestClient(create_app(engine))
    body = {"messages": PROMPTS[0], "max_tokens": 2}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.post, "/v1/chat/completions", json=body)
        while engine.scheduler.running == 0:
            time.sleep(0.01)
        second = pool.submit(client.post, "/v1/chat/completions", json=body)
        while engine.scheduler.waiting() == 0:
            time.sleep(0.01)
        busy = client.post("/v1/chat/completions", json=body)
        legacy = client.post("/", json={"prompt": "你好", "max_length": 2})
        release.set()
        assert first.result(60).status_code == 200 and second.result(60).status_code == 200
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
    assert busy.json()["error"]["code"] == "server_busy" and "busy" in busy.json()["error"]["message"]
    assert legacy.status_code == 503 and "busy" in legacy.json()["detail"]
    assert client.post("/v1/chat/completions", json=body).status_code == 200  # room again


def test_health_answers_fast_with_64_requests_queued(tiny_recipe):
    import httpx

    from selfllm_runtime.tasks.fastapi_server import create_app

    engine = ChatEngine(*tiny_recipe("qwen3/fastapi"), max_batch=4)
    body = {"messages": PROMPTS[0], "max_tokens": 48, "temperature": 1.0}

    async def load_and_probe(url: str) -> tuple[list[int], list[float], int]:
        async with httpx.AsyncClient(timeout=300) as http:
            tasks = [asyncio.create_task(http.post(url + "/v1/chat/completions", json=body)) for _ in range(64)]
            deadline = time.monotonic() + 60
            while engine.scheduler.waiting() < 32:  # most of the 64 wait while a batch of 4 runs
                assert time.monotonic() < deadline, f"only {engine.scheduler.waiting()} requests queued"
                await asyncio.sleep(0.01)
            queued = engine.scheduler.waiting()
            probes = []
            for path in ("/health", "/v1/models", "/health"):
                started = time.monotonic()
                answer = await http.get(url + path)
                probes.append(time.monotonic() - started)
                assert answer.status_code == 200
            codes = [r.status_code for r in await asyncio.gather(*tasks)]
            return codes, probes, queued

    with uvicorn_on_loopback(create_app(engine)) as url:
        codes, probes, queued = asyncio.run(load_and_probe(url))
    assert codes == [200] * 64
    assert max(probes) < 0.1, f"/health and /v1/models took {probes} s with {queued} requests queued"


def test_bad_queue_settings_name_the_variable(tiny_recipe, monkeypatch):
    from selfllm_runtime.context import SettingsError

    monkeypatch.setenv("MAX_QUEUE", "lots")
    with pytest.raises(SettingsError, match="MAX_QUEUE='lots'"):
        ChatEngine(*tiny_recipe("qwen3/fastapi"))


def test_engine_busy_names_the_depth():
    assert "3 requests are already waiting" in str(EngineBusy(3))


def test_replacing_the_model_replaces_what_the_scheduler_runs(tiny_recipe):
    """The LoRA task wraps the loaded model in a PeftModel: generation must go through the wrapper."""
    engine = ChatEngine(*tiny_recipe("qwen3/fastapi"))
    calls = []

    class Wrapper:
        def __init__(self, inner):
            self.inner, self.device = inner, inner.device

        def generate(self, **kwargs):
            calls.append(len(kwargs["input_ids"]))
            return self.inner.generate(**kwargs)

    engine.model = Wrapper(engine.model)
    engine.generate(PROMPTS[0], greedy(2))
    assert calls == [1] and engine.scheduler.model is engine.model
