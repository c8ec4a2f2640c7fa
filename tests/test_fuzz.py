"""Fuzzing task `fastapi`'s HTTP API (legacy `POST /`, `/health`, the OpenAI-compatible /v1) against
its own OpenAPI schema with schemathesis, in process (ASGI), on CPU: on the tiny Qwen3 (text only, a thinking
switch) and on the tiny Gemma-3 (a vision-language model: its schema advertises `image_url` parts, which the
fuzzer fills with URLs that are not images, answered 400; host names are not resolved here).

Every operation of /openapi.json gets schema-valid cases and, where it has inputs, schema-violating
ones; each answer must be no 5xx, a documented status code and content type, a body that matches the
documented schema, and a rejection (4xx) of every schema-violating request. Left out: schemathesis'
`positive_data_acceptance`, as an OpenAI-compatible server rejects some schema-valid requests by
design (context length, `n` > 1, a `tool_choice` naming no given tool, the chat template's rules) with a documented 400, as
OpenAI's own API does. Afterwards the server must still answer a greedy request exactly.

Reproducible: derandomized Hypothesis, no example database; a failure prints a curl command.
Hypothesis drives each operation's strategy here (`operation.as_strategy`) because schemathesis'
`pytest.from_fixture(...).parametrize()` fails under pytest 9.2 (it sets `Function._nodeid`).
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import SUMMARY

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import positive_data_acceptance  # noqa: E402

from selfllm_runtime.chat_engine import GenerationParams  # noqa: E402

MAX_EXAMPLES = 80  # per operation and mode: ~1 minute in all on 2 CPU cores
MAX_NEW_TOKENS = 4  # what the fuzzed server generates at most: the cases test the API, not the model
POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
STREAMED = "positive+stream"  # schema-valid bodies with "stream": true (seldom drawn by chance)
# Schema-violating data exists only for an operation with inputs a schema constrains.
RUNS = [("GET /health", POSITIVE), ("GET /v1/models", POSITIVE), ("GET /v1/models/{model_id}", POSITIVE),
        ("POST /", POSITIVE), ("POST /", NEGATIVE),
        ("POST /v1/chat/completions", POSITIVE), ("POST /v1/chat/completions", NEGATIVE),
        ("POST /v1/chat/completions", STREAMED)]
NO_INPUTS = {"GET /health", "GET /v1/models"}  # one case each is all there is
STATUSES: Counter[tuple[str, str, int]] = Counter()  # (operation, mode, status) → answers
FAILED: list[str] = []  # "operation [mode]" runs that found a failure


def capped(params: Callable[..., GenerationParams]) -> Callable[..., GenerationParams]:
    """engine.params generating at most MAX_NEW_TOKENS (a request may ask for thousands)."""
    def cap(**given: Any) -> GenerationParams:
        given["max_new_tokens"] = min(given.get("max_new_tokens") or MAX_NEW_TOKENS, MAX_NEW_TOKENS)
        return params(**given)
    return cap


def assert_stream_completes(text: str) -> None:
    """Chunks, the last with a finish_reason, then [DONE]; an in-band error (a failure after the
    headers went out) is a server error."""
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk.get("object") == "chat.completion.chunk" for chunk in chunks), chunks
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] in {"stop", "length", "tool_calls"}


TEMPLATE_REFUSALS: Counter[str] = Counter()  # reason → 400s of the chat template's own raise_exception


def count_template_refusal(response: Any) -> None:
    """Gemma's template refuses roles that don't alternate: a 400 naming the template (counted for the summary)."""
    if response.status_code != 400:
        return
    error = response.json().get("error") or {}
    if error.get("code") == "chat_template_refused":
        TEMPLATE_REFUSALS[error["message"].rsplit(": ", 1)[-1][:60]] += 1


def streamed(case: Any) -> Any:
    case.body = {**case.body, "stream": True}
    return case


RECIPES = ["qwen3/fastapi", "gemma3/fastapi"]


@pytest.fixture(scope="module", params=RECIPES)
def served(request, tiny_recipe) -> Any:
    """The engine under test: the shared tiny Qwen3, or a tiny Gemma-3 with its vision tower."""
    if request.param == "qwen3/fastapi":
        return request.getfixturevalue("engine")
    from selfllm_runtime.chat_engine import ChatEngine

    return ChatEngine(*tiny_recipe(request.param))


def no_dns(*_: Any, **__: Any) -> Any:
    raise OSError("no name resolution in the fuzz test")


@pytest.fixture(scope="module")
def fuzz_app(served) -> Iterator[Any]:
    from selfllm_runtime.tasks.fastapi_server import create_app

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(served, "params", capped(served.params))
        patch.setattr("selfllm_runtime.media.socket.getaddrinfo", no_dns)  # fuzzed image URLs name random hosts
        yield create_app(served)


@pytest.fixture(scope="module")
def api_schema(fuzz_app, request) -> Iterator[Any]:
    yield schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    if STATUSES:  # the numbers, at the end of the run
        lines = request.config.stash.setdefault(SUMMARY, [])
        lines.append(f"schemathesis: {sum(STATUSES.values())} generated cases, {len(FAILED)} failing runs "
                     f"{FAILED or ''}")
        lines += [f"  {label} [{mode}] -> {status}: {count}"
                  for (label, mode, status), count in sorted(STATUSES.items())]
        lines += [f"  the chat template's 400 ({reason}): {count}"
                  for reason, count in sorted(TEMPLATE_REFUSALS.items())]


def test_the_schema_lists_every_operation(api_schema):
    assert {op.ok().label for op in api_schema.get_all_operations()} == {label for label, _ in RUNS}


@pytest.mark.parametrize(("label", "mode"), RUNS, ids=[f"{label}-{mode}" for label, mode in RUNS])
def test_operation_conforms_to_its_schema(api_schema, served, label: str, mode: str) -> None:
    operation = api_schema.find_operation_by_label(label)
    strategy = operation.as_strategy(generation_mode=NEGATIVE if mode == NEGATIVE else POSITIVE)
    if mode == STREAMED:
        strategy = strategy.map(streamed)
    before = sum(STATUSES.values())

    @settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def fuzz(case: Any) -> None:
        response = case.call()
        count_template_refusal(response)
        case.validate_response(response, excluded_checks=[positive_data_acceptance])
        if response.status_code == 200 and response.headers["content-type"][0].startswith("text/event-stream"):
            assert_stream_completes(response.text)
        STATUSES[f"{served.family.display_name} {label}", str(mode), response.status_code] += 1

    try:
        fuzz()
    except BaseException:
        FAILED.append(f"{served.family.display_name} {label} [{mode}]")
        raise
    ran = sum(STATUSES.values()) - before
    assert ran >= (1 if label in NO_INPUTS else MAX_EXAMPLES // 2), f"only {ran} cases for {label} [{mode}]"


def test_the_schema_shows_what_the_family_takes(fuzz_app, served):
    """Image parts only for a model that reads images, video parts and reasoning_effort (neither family has
    levels) nowhere: a schema-valid request is never refused for a field the family lacks."""
    with TestClient(fuzz_app) as client:
        document = client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    assert ("ImagePart" in schemas) is served.takes_images is (served.family.display_name == "Gemma-3")
    assert "VideoPart" not in schemas and "reasoning_effort" not in schemas["ChatCompletionRequest"]["properties"]
    assert "ImagePart" not in json.dumps(document) or served.takes_images


def test_still_serving_after_the_fuzzing(api_schema, fuzz_app, served):
    """Nothing the fuzzer sent left the engine stuck: a greedy request answers as the engine alone
    (and the served model's card, which random ids never hit, matches its schema)."""
    card = api_schema.find_operation_by_label("GET /v1/models/{model_id}")
    model_id = served.context.recipe.default_model.modelscope
    assert card.Case(path_parameters={"model_id": model_id}).call_and_validate().status_code == 200
    messages = [{"role": "user", "content": "Hello, who are you?"}]
    with TestClient(fuzz_app) as client:
        assert client.get("/health").json()["status"] == "ok"
        answer = client.post("/v1/chat/completions", json={
            "messages": messages, "temperature": 0, "max_tokens": MAX_NEW_TOKENS, "enable_thinking": False})
    assert answer.status_code == 200, answer.text
    alone = served.generate(messages, GenerationParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0,
                                                       template_kwargs={"enable_thinking": False}))
    assert answer.json()["choices"][0]["message"]["content"] == alone.text
    assert served.scheduler.running == 0 and served.scheduler.waiting() == 0
