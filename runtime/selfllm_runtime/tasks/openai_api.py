"""OpenAI-compatible chat API on any FastAPI app that serves one ChatEngine.

`add_openai_routes(app, engine)` adds:
- `GET /v1/models`, `GET /v1/models/{id}`;
- `POST /v1/chat/completions`: whole answers or SSE streams (`data: {...}` chunks, then
  `data: [DONE]`), `usage` counts (also as a last stream chunk with `stream_options.include_usage`),
  `stop`, `temperature`, `top_p`, `max_tokens` / `max_completion_tokens`, `seed`;
  the family's thinking switch (Qwen3's `enable_thinking`) as a top-level field or inside
  `chat_template_kwargs` as vLLM takes it, or its reasoning effort (gpt-oss) as OpenAI's
  `reasoning_effort`, with the thinking returned as `reasoning_content` (message and delta) as
  vLLM's reasoning parsers do;
- tool calling for families whose chat template renders tools (model.yaml `tool_calls`; see
  tool_calls.py): `tools` (functions) go into the template, the answer's calls come back as
  `message.tool_calls` / `delta.tool_calls` (one chunk per call, after the content) with
  finish_reason "tool_calls"; history takes assistant `tool_calls` and `tool` messages.
  `tool_choice`: "auto" (default), "none" (tools are neither shown nor parsed), "required" or a named
  function (only that function is shown). Decoding is not constrained: when the model writes no
  call, its answer is returned as it is. Families without tool support answer 400 (param `tools`);
- errors in OpenAI's shape `{"error": {"message", "type", "param", "code"}}` under /v1 (bad JSON,
  wrong types, empty `messages`, out-of-range `max_tokens`, unknown model), other routes keep
  FastAPI's default answers;
- an optional API key (env `API_KEY`, see access.py): `Authorization: Bearer <key>` (scheme in any
  case) on every route but /health and the docs;
- an unexpected failure answers 500 with a generic message and a request id, never the exception's
  text; the log line of the traceback carries the same id.

Served model name (model_source.served_names, as vLLM's): env `SERVED_MODEL_NAME`, else the checkpoint's own
name (MODEL_PATH's folder, else MODEL_ID, else the recipe's default id); requests may also name its aliases
(the recipe's default ids, upstream's short names such as `Qwen3-8B`) and the model folder.

A chat template that fails on a conversation is the server's problem, not the client's: 500 (server_error),
naming the template in use (CHAT_TEMPLATE, chat_template.py) and, for the template's own raise_exception,
its message.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any, Literal

from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from ..access import bearer_token, keys_match
from ..batching import EngineBusy
from ..continuous import SeedUnsupported
from ..chat_engine import ChatEngine, Completion, GenerationParams, Message
from ..model_source import served_names
from ..settings import FastapiSettings
from ..tool_calls import ToolCallStream, parse_tool_calls, tool_names, tool_parameters

log = logging.getLogger("selfllm.openai")

DEFAULT_MAX_TOKENS = 4096  # when a request gives none (capped by what the context has left)
MAX_STOP_STRINGS = 16
OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
# apply_chat_template's own arguments: a chat_template_kwargs entry may not collide with them
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
})


# ----------------------------------------------------------------------------- errors

class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:16]}"


def internal_error_message(request_id: str) -> str:
    """What a client sees of a crash: no exception text (it may hold paths, prompts or settings)."""
    return f"internal server error (request id {request_id}; the server's log has the details)"


def describe_validation_errors(errors: list[Any]) -> tuple[str, str | None]:
    """('field: problem; ...', first param) from pydantic/FastAPI validation errors."""
    parts: list[str] = []
    param: str | None = None
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx") or {}
            parts.append(f"the body is not valid JSON ({ctx.get('error', 'parse error')})")
            continue
        if err.get("type") == "missing" and not loc:
            parts.append("the request needs a JSON body")
            continue
        if not loc and err.get("type") in {"model_attributes_type", "dict_type"}:
            parts.append("the body must be a JSON object sent with Content-Type: application/json")
            continue
        where = ".".join(loc)
        param = param or (loc[0] if loc else None)
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request", param


# ----------------------------------------------------------------------------- request schema

def whole_number(value: Any) -> Any:
    """78.0 → 78 before a strict int field: a whole float is a JSON Schema integer (and "78" or true,
    which pydantic's lax int would convert, are not)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


class RequestPart(BaseModel):
    """A part of a request body: keys this server does not know are ignored, as OpenAI's API does."""

    model_config = ConfigDict(extra="ignore")


class TextPart(RequestPart):
    type: Literal["text"]
    text: str


class ChatMessage(RequestPart):
    """A system, developer, user or tool message: content is required."""

    role: Literal["system", "developer", "user", "tool"]
    content: str | list[TextPart]
    name: str | None = None
    tool_call_id: str | None = Field(None, description="a tool message: the id of the call it answers")

    def to_engine(self) -> Message:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        message: Message = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.role == "tool" and self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class FunctionCallIn(RequestPart):
    name: str = Field(min_length=1)
    arguments: str = Field(description="the arguments as a JSON object, in text (as OpenAI returns them)")

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            decoded = json.loads(value)
        except ValueError:
            decoded = None
        if not isinstance(decoded, dict):
            raise ValueError("must be a JSON object in a string, e.g. '{\"city\": \"Paris\"}'")
        return value


class ToolCallIn(RequestPart):
    """A call of an earlier assistant turn."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class AssistantMessage(ChatMessage):
    """An assistant turn may come without content (as OpenAI's tool-call turns)."""

    role: Literal["assistant"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCallIn] | None = None

    def to_engine(self) -> Message:
        message = super().to_engine()
        if self.tool_calls:  # only then: Llama's template tests `'tool_calls' in message`
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        return message


def message_kind(value: Any) -> str:
    role = value.get("role") if isinstance(value, dict) else getattr(value, "role", None)
    return "assistant" if role == "assistant" else "other"


# A callable discriminator: the schema's oneOf carries no role mapping (schemathesis would pin the
# many roles of ChatMessage to one), and errors still name one branch ("messages.0.other.content").
AnyMessage = Annotated[Annotated[ChatMessage, Tag("other")] | Annotated[AssistantMessage, Tag("assistant")],
                       Discriminator(message_kind)]


class FunctionSpec(RequestPart):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON Schema of the arguments")
    strict: bool | None = Field(None, strict=True)


class ToolSpec(RequestPart):
    type: Literal["function"]
    function: FunctionSpec


class FunctionName(RequestPart):
    name: str


class NamedToolChoice(RequestPart):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(RequestPart):
    include_usage: bool = Field(False, strict=True)


class ChatCompletionRequest(RequestPart):
    """The subset of OpenAI's chat-completions body this server honours; unknown fields are ignored.
    Numbers and booleans are strict, as OpenAI's: "0.5", true or "yes" where a number or a boolean
    belongs is a 400, not silently converted."""

    model: str | None = None
    messages: list[AnyMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)
    temperature: float | None = Field(None, ge=0, le=2, strict=True)
    top_p: float | None = Field(None, gt=0, le=1, strict=True)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64, strict=True)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    # what this server supports, documented; the validator below rejects the rest with its reason
    n: int = Field(1, ge=1, strict=True, json_schema_extra={"maximum": 1})
    logprobs: bool | None = Field(None, strict=True, json_schema_extra={"enum": [False, None]})
    tools: Annotated[list[ToolSpec], Field(max_length=128)] | None = Field(
        None, description="functions the model may call; 400 (param `tools`) for a family without tool calling")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    enable_thinking: bool | None = Field(None, strict=True)
    reasoning_effort: str | None = Field(
        None, min_length=1, max_length=32, description="OpenAI's reasoning effort (gpt-oss: low / medium / high); "
        "400 (param `reasoning_effort`) for a family without it or a level it does not know")
    chat_template_kwargs: dict[str, Any] | None = None

    _whole_numbers = field_validator("max_tokens", "max_completion_tokens", "seed", "n", mode="before")(whole_number)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        return [s for s in stops if s]

    @field_validator("chat_template_kwargs")
    @classmethod
    def _safe_template_kwargs(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        clash = sorted(set(value or {}) & RESERVED_TEMPLATE_KWARGS)
        if clash:
            raise ValueError(f"keys {clash} are reserved by the chat template call")
        return value

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        if self.n != 1:
            raise ValueError("n > 1 is not supported by this server")
        if self.logprobs:
            raise ValueError("logprobs are not supported by this server")
        return self

    def template_kwargs(self, thinking_kwarg: str | None) -> dict[str, Any]:
        kwargs = dict(self.chat_template_kwargs or {})
        if self.enable_thinking is not None:  # vLLM-style top-level switch; wins over chat_template_kwargs
            kwargs[thinking_kwarg or "enable_thinking"] = self.enable_thinking
        return kwargs


# ----------------------------------------------------------------------------- response schema (OpenAPI docs)

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error under /v1 (and the API key's 401 on any route), as OpenAI answers them."""

    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class AnswerMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = Field(description="null when the answer is tool calls only")
    reasoning_content: str | None
    tool_calls: list[ToolCallOut]


class Choice(BaseModel):
    index: int
    logprobs: None
    finish_reason: Literal["stop", "length", "tool_calls"]
    message: AnswerMessage


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[Choice]
    usage: Usage


# One server-sent event of a stream (OpenAPI 3.1: a text/event-stream schema describes each event).
SSE_EVENT: dict[str, Any] = {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "contentMediaType": "application/json",
                            "description": "a chat.completion.chunk, an in-band error object, or [DONE] last"},
                   "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}},
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` of a /v1 route: the given statuses, and any other 4xx (405...), in OpenAI's error
    shape (a "4XX" entry also keeps FastAPI from documenting a 422 that /v1 never answers)."""
    meaning = {400: "Invalid request (wrong types, out-of-range values, context length exceeded)",
               401: "Missing or wrong API key (when the server has one)", 404: "Unknown model",
               503: "The engine's queue is full (see Retry-After)",
               500: "The server failed (e.g. its chat template could not render the messages)"}
    return {**{status: {"model": ErrorResponse, "description": meaning[status]} for status in statuses},
            "4XX": {"model": ErrorResponse, "description": "Other client errors"}}


# ----------------------------------------------------------------------------- the API

class OpenAIChat:
    """Request → engine parameters → OpenAI-shaped answers, for one engine."""

    def __init__(self, engine: ChatEngine, settings: FastapiSettings):
        self.engine = engine
        context = engine.context
        names = served_names(context.recipe, context.family, settings, settings.served_model_name)
        self.served_name = names[0]
        self.aliases = {*names, engine.model_name}
        self.created = int(time.time())
        config = getattr(engine.model, "config", None)
        self.max_model_len = int(getattr(config, "max_position_embeddings", 0) or 32768)
        thinking = engine.family.thinking
        self.thinking_kwarg = thinking.template_kwarg if thinking else None

    def model_card(self) -> dict[str, Any]:
        return {"id": self.served_name, "object": "model", "created": self.created, "owned_by": "self-llm",
                "root": self.served_name, "parent": None, "max_model_len": self.max_model_len}

    def check_model(self, name: str | None) -> str:
        if name is None or name in self.aliases:
            return name or self.served_name
        raise OpenAIError(404, f"The model `{name}` does not exist. This server serves `{self.served_name}` "
                          "(GET /v1/models).", param="model", code="model_not_found")

    def tools(self, body: ChatCompletionRequest) -> list[dict[str, Any]] | None:
        """The tools to show the model (None: no tool calling for this request); 400 for tools this
        family's template can't show, or a tool_choice that names no given tool."""
        choice = body.tool_choice
        if not body.tools:
            if choice not in (None, "none", "auto"):
                raise OpenAIError(400, "tool_choice requires tools", param="tool_choice")
            return None
        if choice == "none":
            return None
        if self.engine.family.tool_calls is None:
            raise OpenAIError(400, f"tool calling is not supported for {self.engine.family.display_name}: its chat "
                              "template renders no tools (send tool_choice \"none\" to leave them out)", param="tools")
        tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
        if isinstance(choice, NamedToolChoice):
            tools = [t for t in tools if t["function"]["name"] == choice.function.name]
            if not tools:
                raise OpenAIError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools",
                                  param="tool_choice")
        return tools

    def prepare(self, body: ChatCompletionRequest) -> tuple[list[Message], GenerationParams, int]:
        """Engine messages and parameters; 400 when the template fails or the context is too short."""
        messages = [m.to_engine() for m in body.messages]
        template_kwargs = body.template_kwargs(self.thinking_kwarg)
        try:  # OpenAI's field; wins over chat_template_kwargs
            template_kwargs.update(self.engine.family.effort_kwargs(body.reasoning_effort))
        except ValueError as exc:
            raise OpenAIError(400, str(exc), param="reasoning_effort") from None
        tools = self.tools(body)
        try:
            prompt = self.engine.format_prompt(messages, template_kwargs, tools)
        except TemplateError as exc:  # raise_exception in the template, or a template that does not parse
            log.warning("the chat template (%s) failed: %s", self.engine.chat_template.describe(), exc)
            raise OpenAIError(500, f"this server's chat template ({self.engine.chat_template.source}) could not "
                              f"render the messages: {exc}", "server_error", code="chat_template_error") from None
        prompt_tokens = len(self.engine.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        room = self.max_model_len - prompt_tokens
        asked = body.max_completion_tokens or body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        if room < 1 or (asked is not None and asked > room):
            raise OpenAIError(
                400, f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_tokens + (asked or 0)} tokens ({prompt_tokens} in the messages, {asked or 0} in the "
                "completion). Please reduce the length of the messages or completion.",
                param=param if room >= 1 else "messages", code="context_length_exceeded")
        params = self.engine.params(
            max_new_tokens=asked or min(DEFAULT_MAX_TOKENS, room), temperature=body.temperature, top_p=body.top_p,
            seed=body.seed, stop=list(body.stop or []), template_kwargs=template_kwargs, tools=tools,
        )
        return messages, params, prompt_tokens

    @staticmethod
    def usage(completion: Completion) -> dict[str, int]:
        return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
                "total_tokens": completion.prompt_tokens + completion.completion_tokens}

    def response(self, model: str, completion: Completion, tools: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        content: str | None = completion.text
        calls = []
        spec = self.engine.family.tool_calls
        if tools and spec is not None:
            content, calls = parse_tool_calls(completion.text, spec, tool_names(tools), tool_parameters(tools))
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "logprobs": None,
                         "finish_reason": "tool_calls" if calls else completion.finish_reason,
                         "message": {"role": "assistant", "content": content if content or not calls else None,
                                     "reasoning_content": completion.reasoning,
                                     "tool_calls": [call.to_openai() for call in calls]}}],
            "usage": self.usage(completion),
        }

    def sse_events(self, model: str, pieces: Iterator[tuple[str, str] | Completion],
                   include_usage: bool, tools: list[dict[str, Any]] | None = None) -> Iterator[str]:
        """`data: {...}` lines of one streamed answer, from the engine's pieces, ending with [DONE]."""
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": model, "system_fingerprint": None}

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            data = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                    **extra}
            if include_usage:
                data.setdefault("usage", None)
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        spec = self.engine.family.tool_calls
        calls_stream = (ToolCallStream(spec, tool_names(tools), tool_parameters(tools))
                        if tools and spec is not None else None)
        yield chunk({"role": "assistant", "content": ""})
        try:
            for piece in pieces:
                if isinstance(piece, Completion):
                    calls = []
                    if calls_stream is not None:  # what was held back: calls, or content after all
                        rest, calls = calls_stream.finish()
                        if rest:
                            yield chunk({"content": rest})
                        for index, call in enumerate(calls):
                            yield chunk({"tool_calls": [call.to_openai(index)]})
                    yield chunk({}, "tool_calls" if calls else piece.finish_reason)
                    if include_usage:
                        yield f"data: {json.dumps({**base, 'choices': [], 'usage': self.usage(piece)})}\n\n"
                    continue
                kind, text = piece
                if kind == "content" and calls_stream is not None:
                    text = calls_stream.feed(text)
                if text:
                    yield chunk({"reasoning_content": text} if kind == "reasoning" else {"content": text})
        except Exception:  # noqa: BLE001 - headers are sent; report in-band as vLLM does
            request_id = new_request_id()
            log.exception("stream failed [%s]", request_id)
            body = error_body(internal_error_message(request_id), "server_error", code="500")
            yield f"data: {json.dumps(body)}\n\n"
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()
        yield "data: [DONE]\n\n"


class ApiKeyMiddleware:
    """Pure ASGI (streams pass through untouched): every HTTP route but OPEN_PATHS needs the key,
    as `Authorization: Bearer <key>` with the scheme in any case, compared in constant time."""

    def __init__(self, app: Any, api_key: str):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        token = bearer_token(given)
        if token is not None and keys_match(token, self.api_key):
            await self.app(scope, receive, send)
            return
        from fastapi.responses import JSONResponse

        message = ("Incorrect API key provided." if given else
                   "Missing API key: send the header `Authorization: Bearer <API_KEY>`.")
        answer = JSONResponse(error_body(message, code="invalid_api_key"), status_code=401,
                              headers={"WWW-Authenticate": "Bearer"})
        await answer(scope, receive, send)


async def iterate_in_thread(iterator: Iterator[str]) -> AsyncIterator[str]:
    """Pull a blocking iterator from worker threads; close it (freeing the model) if the client leaves."""
    from fastapi.concurrency import run_in_threadpool

    done = object()
    try:
        while True:
            item = await run_in_threadpool(next, iterator, done)
            if item is done:
                return
            yield item
    finally:  # not awaited: a cancelled scope (client gone) would skip an await here
        close = getattr(iterator, "close", None)
        if close is not None:
            close()  # GeneratorExit in the engine's stream: its request is cancelled (queue slot, batch row)


def add_openai_routes(app: Any, engine: ChatEngine, settings: FastapiSettings | None = None) -> OpenAIChat:
    """Add /v1/models and /v1/chat/completions (+ OpenAI-shaped errors and the optional API key) to app.
    settings: API_KEY, MODEL_ID, SERVED_MODEL_NAME (default: resolved from the environment and the recipe)."""
    from fastapi import APIRouter, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = engine.context.settings(FastapiSettings) if settings is None else settings
    chat = OpenAIChat(engine, settings)
    router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])

    # response_model=None with documented `responses`: the schema describes the answers, which are
    # built as plain dicts (no second validation on the way out).
    @router.get("/models", response_model=None, responses={200: {"model": ModelList}, **error_responses(401)})
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [chat.model_card()]}

    @router.get("/models/{model_id:path}", response_model=None,
                responses={200: {"model": ModelCard}, **error_responses(401, 404)})
    async def get_model(model_id: str) -> dict[str, Any]:
        chat.check_model(model_id)
        return chat.model_card()

    @router.post("/chat/completions", response_model=None, responses={
        200: {"model": ChatCompletion, "description": "The answer; with `stream: true` an SSE stream of "
              "`data: {chat.completion.chunk}` events ending with `data: [DONE]`",
              "content": {"text/event-stream": {"schema": SSE_EVENT}}},
        **error_responses(400, 401, 404, 500, 503)})
    async def chat_completions(body: ChatCompletionRequest) -> Any:
        model = chat.check_model(body.model)
        messages, params, _ = await run_in_threadpool(chat.prepare, body)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = chat.sse_events(model, engine.stream(messages, params), include_usage, params.tools)
            return StreamingResponse(iterate_in_thread(events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        completion = await run_in_threadpool(engine.generate, messages, params)
        return chat.response(model, completion, params.tools)

    app.include_router(router)

    def is_v1(request: Request) -> bool:
        return request.url.path == "/v1" or request.url.path.startswith("/v1/")

    async def on_openai_error(request: Request, exc: Exception) -> Any:
        assert isinstance(exc, OpenAIError)
        return JSONResponse(exc.body(), status_code=exc.status)

    async def on_validation_error(request: Request, exc: Exception) -> Any:
        assert isinstance(exc, RequestValidationError)
        if not is_v1(request):
            return await request_validation_exception_handler(request, exc)
        message, param = describe_validation_errors(list(exc.errors()))
        return JSONResponse(error_body(message, param=param), status_code=400)

    async def on_http_error(request: Request, exc: Exception) -> Any:
        assert isinstance(exc, StarletteHTTPException)
        if not is_v1(request):
            return await http_exception_handler(request, exc)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(str(exc.detail), param=None, code=code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def on_busy(request: Request, exc: Exception) -> Any:
        """The engine's queue is full: 503 with Retry-After (OpenAI's shape under /v1)."""
        assert isinstance(exc, EngineBusy)
        headers = {"Retry-After": str(exc.retry_after)}
        body = error_body(str(exc), "server_error", code="server_busy") if is_v1(request) else {"detail": str(exc)}
        return JSONResponse(body, status_code=503, headers=headers)

    async def on_no_seed(request: Request, exc: Exception) -> Any:
        """A seed while continuous batching is on (continuous.py): the client's request, not a crash."""
        return JSONResponse(error_body(str(exc), param="seed"), status_code=400)

    async def on_crash(request: Request, exc: Exception) -> Any:
        request_id = new_request_id()
        log.error("request failed [%s] %s %s", request_id, request.method, request.url.path, exc_info=exc)
        message, headers = internal_error_message(request_id), {"X-Request-ID": request_id}
        if not is_v1(request):
            return JSONResponse({"detail": message}, status_code=500, headers=headers)
        return JSONResponse(error_body(message, "server_error"), status_code=500, headers=headers)

    app.add_exception_handler(OpenAIError, on_openai_error)
    app.add_exception_handler(EngineBusy, on_busy)
    app.add_exception_handler(SeedUnsupported, on_no_seed)
    app.add_exception_handler(Exception, on_crash)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)

    key = settings.api_key
    if key:
        app.add_middleware(ApiKeyMiddleware, api_key=key)
    log.info("OpenAI-compatible API at /v1 serving %r%s", chat.served_name, " (API key required)" if key else "")
    return chat
