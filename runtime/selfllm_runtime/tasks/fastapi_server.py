"""Task `fastapi`: upstream's API (`POST /`) on port 6006 (PORT), plus `GET /health` (the model, the device, the
quantization and the chat template in use).

The legacy route logs each exchange's sizes at INFO; the prompt and answer themselves only at DEBUG.
"""
from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..access import warn_if_exposed
from ..chat_engine import ChatEngine, Message
from ..chat_template import template_failure
from ..context import RecipeContext
from ..settings import FastapiSettings
from .openai_api import ErrorResponse, EngineThreads, add_openai_routes, whole_number

log = logging.getLogger("selfllm.fastapi")


class HistoryMessage(BaseModel):
    """A history turn as {"role", "content"} (values are taken as text; other keys are kept)."""

    model_config = ConfigDict(extra="allow")
    role: Any
    content: Any


class LegacyRequest(BaseModel):
    """Upstream tutorial's body. history: [[user, assistant], ...] or [{"role", "content"}, ...].
    Numbers are strict (a string or a boolean is a 422, not converted)."""

    model_config = ConfigDict(extra="ignore")
    prompt: str = Field(min_length=1)
    history: list[tuple[Any, Any] | HistoryMessage] = []
    max_length: int = Field(2048, ge=1, le=32768, strict=True)
    # None: the checkpoint's generation_config.json (as /v1 and vLLM); upstream's tutorial sent 0.8 / 0.7.
    top_p: float | None = Field(None, gt=0, le=1, strict=True)
    temperature: float | None = Field(None, ge=0, le=2, strict=True)

    _whole_numbers = field_validator("max_length", mode="before")(whole_number)


class LegacyError(BaseModel):
    """FastAPI's own error body (HTTPException) on the legacy route."""

    detail: str


class LegacyResponse(BaseModel):
    """Upstream's reply shape. For a family with reasoning markers (Qwen3, DeepSeek-R1-Distill) it is
    upstream's R1 tutorial's: `response` is the whole text with its think block, `think` and `answer`
    its two parts; the history keeps the answer only."""

    response: str
    history: list[Any]
    status: int
    time: str
    think: str | None = None
    answer: str | None = None


def history_to_messages(history: list[tuple[Any, Any] | HistoryMessage]) -> list[Message]:
    messages: list[Message] = []
    for turn in history:
        if isinstance(turn, HistoryMessage):
            messages.append({"role": str(turn.role), "content": str(turn.content)})
        else:
            messages += [{"role": "user", "content": str(turn[0])}, {"role": "assistant", "content": str(turn[1])}]
    return messages


def create_app(engine: ChatEngine, settings: FastapiSettings | None = None):
    """settings: default resolved from the environment and the recipe (settings.py)."""
    from fastapi import FastAPI, HTTPException

    recipe = engine.context.recipe
    app = FastAPI(title=recipe.name, version="1")
    threads = EngineThreads(engine)  # waits on the model: threads of their own, shared with /v1 (tasks/openai_api.py)

    @app.get("/health")  # async: answered on the event loop, never behind queued generations
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.model_name, "device": engine.device,
                "quantization": engine.quantization, "chat_template": engine.chat_template.as_dict()}

    @app.post("/", response_model=LegacyResponse, response_model_exclude_none=True, responses={
        401: {"model": ErrorResponse, "description": "Missing or wrong API key (when the server has one)"},
        400: {"model": LegacyError, "description": "The body is not parseable, or the chat template refuses the "
              "conversation"},
        500: {"model": LegacyError, "description": "The chat template is broken"},
        503: {"model": LegacyError, "description": "The engine's queue is full (see Retry-After)"}})
    async def legacy_chat(body: LegacyRequest) -> LegacyResponse:
        messages = history_to_messages(body.history)
        messages.append({"role": "user", "content": body.prompt})
        params = engine.params(max_new_tokens=body.max_length, temperature=body.temperature, top_p=body.top_p)
        try:
            completion = await threads.generate(messages, params)
        except TemplateError as exc:  # as /v1 answers it: the template named, not a traceback
            raise HTTPException(*template_failure(engine.chat_template, exc)) from None
        pairs_style = not body.history or isinstance(body.history[0], tuple)
        turn: list[Any] = ([[body.prompt, completion.text]] if pairs_style else
                           [{"role": "user", "content": body.prompt}, {"role": "assistant", "content": completion.text}])
        now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        log.info("[%s] POST / prompt: %d chars, history: %d turns, response: %d chars", now, len(body.prompt),
                 len(body.history), len(completion.raw))
        log.debug('[%s] prompt:"%s", response:"%s"', now, body.prompt, completion.raw)
        reply = LegacyResponse(response=completion.text, history=[*body.history, *turn], status=200, time=now)
        if engine.family.reasoning is not None:
            reply.response, reply.think, reply.answer = completion.raw, completion.reasoning or "", completion.text
        return reply

    add_openai_routes(app, engine, settings, threads)  # GET /v1/models, POST /v1/chat/completions (tasks/openai_api.py)
    return app


def run(context: RecipeContext, model_dir: Path, settings: FastapiSettings) -> None:
    import uvicorn

    host, port = settings.address(context.recipe)
    warn_if_exposed(host, port, settings.api_key)  # HOST, PORT, API_KEY: see access.py
    app = create_app(ChatEngine(context, model_dir, settings), settings)
    uvicorn.run(app, host=host, port=port, workers=1)
