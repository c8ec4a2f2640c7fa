"""Shared fixtures. Docker-backed tests skip on a dev box without an engine but FAIL under CI=true."""
from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

# Lines a test adds for the end of the run (request.config.stash.setdefault(SUMMARY, []).append(...)).
SUMMARY = pytest.StashKey[list[str]]()


def pytest_terminal_summary(terminalreporter, config) -> None:
    for line in config.stash.get(SUMMARY, []):
        terminalreporter.write_line(line)


def missing_prerequisite(message: str) -> None:
    """Skip on a developer's machine; under CI=true (where .ci/run sets everything up) fail instead."""
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(message + " — under CI=true a missing prerequisite is a failure", pytrace=False)
    pytest.skip(message)


def _engine_or_fail():
    import docker

    try:
        client = docker.from_env()
        client.ping()
        return client
    except Exception as exc:  # noqa: BLE001 - any engine failure means "no engine"
        missing_prerequisite(f"Docker engine not reachable ({exc}); run scripts/setup_host.sh")


@pytest.fixture(scope="session")
def docker_client():
    """A docker SDK client for a running engine."""
    client = _engine_or_fail()
    yield client
    client.close()


@pytest.fixture(scope="session")
def tiny_recipe(tmp_path_factory):
    """tiny_recipe("qwen3/lora") → (RecipeContext, folder of its tiny random model), made once per
    recipe for the whole session through the runtime's own make_smoke_model."""
    from selfllm_recipes.layout import RECIPES_DIR
    from selfllm_runtime.context import load_context
    from selfllm_runtime.smoke_model import make_smoke_model

    made: dict[str, tuple] = {}

    def make(recipe: str):
        if recipe not in made:
            context = load_context(RECIPES_DIR / recipe)
            folder = tmp_path_factory.mktemp(recipe.replace("/", "-")) / "smoke-model"
            made[recipe] = (context, make_smoke_model(context, folder))
        return made[recipe]

    return make


@pytest.fixture(scope="session")
def real_parameters():
    """real_parameters("glm4.5-air", config fields) → the parameters (total, unquantized) in billions, rounded as
    model.yaml's parameters_b writes them, of a meta-device model of the family's class with those shapes: unquantized
    is what bitsandbytes leaves alone (every parameter outside an nn.Linear's weight, and lm_head's)."""
    import torch
    import transformers

    from selfllm_recipes.layout import RECIPES_DIR
    from selfllm_runtime.metadata import load_family

    def count(family: str, config: dict) -> tuple[float, float]:
        model_class = getattr(transformers, load_family(RECIPES_DIR / family).architecture)
        with torch.device("meta"):
            model = model_class(model_class.config_class(**config))
        total = sum(p.numel() for p in model.parameters())
        linear = sum(m.weight.numel() for m in model.modules()
                     if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings())
        return round(total / 1e9, 2), round((total - linear) / 1e9, 2)

    return count


# The chat recipes' tiny engine (qwen3/fastapi); test modules of other recipes override `context`.
@pytest.fixture(scope="session")
def context(tiny_recipe):
    return tiny_recipe("qwen3/fastapi")[0]


@pytest.fixture(scope="session")
def engine(tiny_recipe):
    from selfllm_runtime.chat_engine import ChatEngine

    return ChatEngine(*tiny_recipe("qwen3/fastapi"))


@contextmanager
def uvicorn_on_loopback(app) -> Iterator[str]:
    """A real uvicorn serving app on 127.0.0.1 in a thread (client threads hit one event loop, as in
    production); yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(10)
        sock.close()


@contextmanager
def fastapi_client(engine) -> Iterator:
    """A TestClient of task fastapi's app (legacy route + /v1) serving engine."""
    from fastapi.testclient import TestClient
    from selfllm_runtime.tasks.fastapi_server import create_app

    with TestClient(create_app(engine)) as client:
        yield client


def script_model(engine, monkeypatch, answer) -> None:
    """Make engine.model.generate 'write' answer(prompt) (a str, or a function of the decoded prompt),
    then EOS, through the engine's real decode / reasoning split / stream code."""
    torch = engine.torch

    def generate(input_ids, streamer=None, **_):
        prompt = engine.tokenizer.decode(input_ids[0], skip_special_tokens=False)
        text = answer(prompt) if callable(answer) else answer
        ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"] + [engine.stop_token_ids[0]]
        out = torch.cat([input_ids, torch.tensor([ids], dtype=input_ids.dtype)], dim=1)
        if streamer is not None:
            streamer.put(input_ids)
            for token in ids:
                streamer.put(torch.tensor([token]))
            streamer.end()
        return out

    monkeypatch.setattr(engine.model, "generate", generate)


@pytest.fixture
def start_until_download(monkeypatch):
    """start("glm4.5-air/vllm") → the exit code of `selfllm start` of that recipe, which must stop before the model is
    fetched: reaching resolve_model raises AssertionError("the model was fetched before the GPU check")."""
    import selfllm_runtime.cli as cli
    from selfllm_recipes.layout import RECIPES_DIR

    def no_download(request):
        raise AssertionError("the model was fetched before the GPU check")

    monkeypatch.setattr(cli, "resolve_model", no_download)
    monkeypatch.setattr(cli, "check_port_free", lambda host, port: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return lambda recipe: cli.main(["start", "--recipe", str(RECIPES_DIR / recipe)])
