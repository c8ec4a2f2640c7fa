"""Serving under load (batching.py + the fastapi task) on the tiny Qwen3, CPU: concurrent requests
share generate calls and answer exactly as alone; health never waits; the queue is bounded."""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import uvicorn_on_loopback


from selfllm_runtime.batching import EngineBusy  # noqa: E402
from selfllm_runtime.chat_engine import ChatEngine, GenerationParams  # noqa: E402
from selfllm_runtime.cli import HEALTH_TIMEOUT_S  # noqa: E402

PROMPTS = [[{"role": "user", "content": f"第 {i} 个问题：你好，请介绍一下你自己。"}] for i in range(8)]


def engine_with(made: tuple, **settings) -> ChatEngine:
    """A ChatEngine on tiny_recipe(...)'s (context, model folder) with these engine settings."""
    from selfllm_runtime.settings import EngineSettings

    context, model_dir = made
    return ChatEngine(context, model_dir, context.settings(EngineSettings, cli=settings))


def greedy(tokens: int = 12) -> GenerationParams:
    return GenerationParams(max_new_tokens=tokens, temperature=0, template_kwargs={"enable_thinking": False})


def test_a_vanishing_temperature_is_greedy(engine):
    """1e-300 would turn the logits into inf (NaN probabilities, a crash): below 1e-5 it is greedy."""
    for tiny in (5e-225, 1e-300, 1e-6):
        params = GenerationParams(max_new_tokens=6, temperature=tiny, template_kwargs={"enable_thinking": False})
        assert engine.generate(PROMPTS[0], params).text == engine.generate(PROMPTS[0], greedy(6)).text


def hold_first_generate(engine, monkeypatch) -> threading.Event:
    """The next model.generate call waits until the returned event is set (the queue fills meanwhile)."""
    release = threading.Event()
    real_generate = engine.model.generate
    held = []

    def generate(**kwargs):
        if not held:
            held.append(True)
            release.wait(120)
        return real_generate(**kwargs)

    monkeypatch.setattr(engine.model, "generate", generate)
    return release


def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_concurrent_greedy_requests_are_batched_and_answer_as_alone(engine, monkeypatch):
    alone = [engine.generate(m, greedy()).text for m in PROMPTS]
    release = hold_first_generate(engine, monkeypatch)
    with ThreadPoolExecutor(len(PROMPTS) + 1) as pool:
        blocker = pool.submit(engine.generate, PROMPTS[0], greedy(2))
        wait_for(lambda: engine.scheduler.running == 1, "the first request never started")
        before = engine.scheduler.batches
        futures = [pool.submit(engine.generate, m, greedy()) for m in PROMPTS]
        wait_for(lambda: engine.scheduler.waiting() == len(PROMPTS), "the requests never queued")
        release.set()
        together = [f.result(120).text for f in futures]
        blocker.result(120)
    assert together == alone
    assert engine.scheduler.batches - before == 1  # the eight waiting requests shared one generate call


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

    engine = engine_with(tiny_recipe("qwen3/fastapi"), max_queue=1)
    release = hold_first_generate(engine, monkeypatch)
    client = TestClient(create_app(engine))
    body = {"messages": PROMPTS[0], "max_tokens": 2}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(client.post, "/v1/chat/completions", json=body)
        wait_for(lambda: engine.scheduler.running == 1, "the first request never started")
        second = pool.submit(client.post, "/v1/chat/completions", json=body)
        wait_for(lambda: engine.scheduler.waiting() == 1, "the second request never queued")
        busy = client.post("/v1/chat/completions", json=body)
        legacy = client.post("/", json={"prompt": "你好", "max_length": 2})
        release.set()
        assert first.result(60).status_code == 200 and second.result(60).status_code == 200
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
    assert busy.json()["error"]["code"] == "server_busy" and "busy" in busy.json()["error"]["message"]
    assert legacy.status_code == 503 and "busy" in legacy.json()["detail"]
    assert client.post("/v1/chat/completions", json=body).status_code == 200  # room again


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_health_answers_with_64_requests_queued(tiny_recipe, monkeypatch, stream):
    """64 requests queue behind a held generation; /health and /v1/models still answer within `selfllm health`'s
    timeout while they wait (its latency: benchmarks/fastapi_throughput.py). 64 is more
    than the event loop's shared pool has threads (40): requests waiting on the model must not hold those."""
    import httpx
    import requests

    from selfllm_runtime.tasks.fastapi_server import create_app

    engine = ChatEngine(*tiny_recipe("qwen3/fastapi"))
    release = hold_first_generate(engine, monkeypatch)
    body = {"messages": PROMPTS[0], "max_tokens": 8, "temperature": 1.0, "stream": stream}

    async def one(http: httpx.AsyncClient, url: str) -> int:
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as answer:
            await answer.aread()
            return answer.status_code

    async def load_and_probe(url: str) -> tuple[list[int], list[int]]:
        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=80)) as http:
            idle = await asyncio.to_thread(requests.get, url + "/health", timeout=5)  # client warm-up, idle server
            assert idle.status_code == 200
            blocker = asyncio.create_task(one(http, url))
            while engine.scheduler.running == 0:
                await asyncio.sleep(0.01)
            tasks = [asyncio.create_task(one(http, url)) for _ in range(64)]
            deadline = time.monotonic() + 60
            while engine.scheduler.waiting() < 64:
                assert time.monotonic() < deadline, f"only {engine.scheduler.waiting()} requests queued"
                await asyncio.sleep(0.01)
            queued = engine.scheduler.waiting()
            await asyncio.sleep(0.5)  # past the burst of 64 responses starting: the queue stays full (held)
            for path in ("/health", "/v1/models", "/health"):  # a new connection each, as Docker's check makes
                answer = await asyncio.to_thread(requests.get, url + path, timeout=HEALTH_TIMEOUT_S)
                assert answer.status_code == 200
            still_queued = engine.scheduler.waiting()  # the probes answered while all of them waited
            release.set()
            codes = [await blocker] + [await task for task in tasks]
            return codes, [queued, still_queued]

    with uvicorn_on_loopback(create_app(engine)) as url:
        codes, queued = asyncio.run(load_and_probe(url))
    assert queued == [64, 64] and codes == [200] * 65


def test_bad_queue_settings_name_the_variable(tiny_recipe, monkeypatch):
    from selfllm_runtime.settings import SettingsError

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


# ---------------------------------------------------------------- BATCHING=continuous (continuous.py)

@pytest.fixture(scope="module")
def continuous(tiny_recipe):
    engine = engine_with(tiny_recipe("qwen3/fastapi"), batching="continuous")
    assert engine.scheduler.kind == "continuous"
    return engine


def test_continuous_greedy_answers_under_load_match_static_one_at_a_time(engine, continuous):
    """16 concurrent greedy requests, half streamed, through transformers' continuous batching: the
    same answers, token counts and finish reasons as the static scheduler gives one at a time."""
    prompts = PROMPTS * 2
    alone = [engine.generate(m, greedy()) for m in prompts]

    def ask(i: int):
        if i % 2:
            return continuous.generate(prompts[i], greedy())
        pieces = list(continuous.stream(prompts[i], greedy()))
        done = pieces[-1]
        assert "".join(text for _, text in pieces[:-1]).strip() == done.text
        return done

    with ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(ask, range(len(prompts))))
    assert [(c.text, c.completion_tokens, c.finish_reason) for c in together] == \
        [(c.text, c.completion_tokens, c.finish_reason) for c in alone]
    assert continuous.scheduler.largest_batch > 1 and not continuous.scheduler.jobs


def test_continuous_rows_keep_their_budget_and_sampling(continuous):
    short = continuous.generate(PROMPTS[0], greedy(3))
    assert short.completion_tokens == 3 and short.finish_reason == "length"
    sampled = continuous.generate(PROMPTS[0], GenerationParams(max_new_tokens=6, temperature=1.0, top_p=0.9))
    assert sampled.completion_tokens == 6


def test_continuous_refuses_a_seed_with_400(continuous):
    from fastapi.testclient import TestClient

    from selfllm_runtime.continuous import SeedUnsupported
    from selfllm_runtime.tasks.fastapi_server import create_app

    with pytest.raises(SeedUnsupported, match="BATCHING=static"):
        continuous.generate(PROMPTS[0], GenerationParams(max_new_tokens=4, temperature=1.0, seed=1))
    answer = TestClient(create_app(continuous)).post(
        "/v1/chat/completions", json={"messages": PROMPTS[0], "max_tokens": 4, "temperature": 1.0, "seed": 1})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "seed"


def test_continuous_queue_is_bounded_and_a_closed_stream_frees_its_row(tiny_recipe):
    engine = engine_with(tiny_recipe("qwen3/fastapi"), batching="continuous", max_batch=1, max_queue=1)
    long_ = greedy(4000)
    running = engine.stream(PROMPTS[0], long_)
    waiting = engine.stream(PROMPTS[1], long_)
    assert engine.scheduler.waiting() == 1
    with pytest.raises(EngineBusy):
        engine.stream(PROMPTS[2], long_)
    next(running)  # the first row is generating
    running.close()  # client gone: its row is cancelled, the waiting one moves up
    waiting.close()
    wait_for(lambda: not engine.scheduler.jobs, "the cancelled rows were never dropped")
    assert engine.generate(PROMPTS[2], greedy(2)).completion_tokens == 2


def test_bad_batching_setting_names_the_variable(tiny_recipe, monkeypatch):
    from selfllm_runtime.settings import SettingsError

    monkeypatch.setenv("BATCHING", "dynamic")
    with pytest.raises(SettingsError, match="BATCHING='dynamic'"):
        ChatEngine(*tiny_recipe("qwen3/fastapi"))
