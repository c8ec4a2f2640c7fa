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
- images for a family that takes them (model.yaml `modalities`, a checkpoint with a vision tower): `image_url`
  parts in user messages and in assistant history, several a turn, read by media.py (data: URLs, http(s) within
  limits, MEDIA_* settings) and turned into the model's inputs by the family's processor (ChatEngine.encode);
  `usage.prompt_tokens` counts the image tokens. `video_url` parts (vLLM's shape) likewise for a family that takes
  video (Qwen2-VL, Qwen3-VL, Qwen3.5, GLM-4.1V): decoded with PyAV and sampled by media.py (two frames a second,
  MEDIA_MAX_VIDEO_FRAMES at most). Media a family doesn't take, an image or video that can't be read or
  decoded, one too large or too many: 400 naming the message and part (`messages[1].content[2]: ...`). The
  OpenAPI document shows image and video parts and `reasoning_effort` only where the family takes them
  (family_openapi); the request schema itself lives in openai_schema.py;
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

A chat template's own refusal of a conversation (its raise_exception, e.g. Gemma's "roles must alternate") is
the client's: 400 naming the template in use (CHAT_TEMPLATE, chat_template.py) and its message; a template that
is broken (does not parse, reads an undefined name) is the server's problem: 500 (server_error).
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from jinja2 import TemplateError

from ..access import bearer_token, keys_match
from ..batching import EngineBusy
from ..chat_engine import ChatEngine, Completion, GenerationParams, Message, PromptImagesError
from ..chat_template import template_failure
from ..continuous import ContinuousUnsupported
from ..media import MediaError, check_media, check_mix, load_image, load_video
from ..metadata import ModelFamily
from ..model_source import served_names
from ..settings import FastapiSettings
from ..tool_calls import ToolCallStream, parse_tool_calls, tool_names, tool_parameters
from .openai_schema import (  # noqa: F401 - whole_number, ErrorResponse: imported from here by fastapi_server
    SSE_EVENT, ChatCompletion, ChatCompletionRequest, ErrorResponse, ImagePart, ModelCard, ModelList,
    NamedToolChoice, OpenAIError, TextPart, error_body, error_responses, internal_error_message, new_request_id,
    whole_number, describe_validation_errors,
)

log = logging.getLogger("selfllm.openai")

DEFAULT_MAX_TOKENS = 4096  # when a request gives none (capped by what the context has left)
OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


# ----------------------------------------------------------------------------- the API

class OpenAIChat:
    """Request → engine parameters → OpenAI-shaped answers, for one engine."""

    def __init__(self, engine: ChatEngine, settings: FastapiSettings):
        self.engine, self.settings = engine, settings
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

    def engine_messages(self, body: ChatCompletionRequest) -> list[Message]:
        """The messages as the engine takes them: text joined; a message with images or videos gets a list content
        of text, image and video parts in order. 400 naming the message and part for media the family doesn't take,
        one in a role whose turn shows none, one that can't be read or decoded, or more than MEDIA_MAX_IMAGES /
        MEDIA_MAX_VIDEOS."""
        family, counts = self.engine.family, {"image": 0, "video": 0}
        limits = {"image": self.settings.media_max_images, "video": self.settings.media_max_videos}
        messages = []
        for number, message in enumerate(body.messages):
            engine_message = message.to_engine()
            media = message.media_parts()
            for index, part in media:
                kind = "image" if isinstance(part, ImagePart) else "video"
                counts[kind] += 1
                try:
                    check_media(family, self.engine.reads(kind), type(self.engine.model).__name__, kind, message.role,
                                counts[kind], limits[kind])
                except MediaError as exc:
                    raise self.media_error(f"messages[{number}].content[{index}]", str(exc)) from None
            if media:
                engine_message["content"] = [self.content_part(number, index, part)
                                             for index, part in enumerate(message.content or [])]
            messages.append(engine_message)
        try:
            check_mix(family, counts["image"], counts["video"])
        except MediaError as exc:
            raise OpenAIError(400, f"messages: {exc}", param="messages", code="invalid_media") from None
        return messages

    def content_part(self, number: int, index: int, part: Any) -> dict[str, Any]:
        if isinstance(part, TextPart):
            return {"type": "text", "text": part.text}
        try:
            if isinstance(part, ImagePart):
                return {"type": "image", "image": load_image(part.image_url.url, self.settings)}
            return {"type": "video", "video": load_video(part.video_url.url, self.settings)}
        except MediaError as exc:
            raise self.media_error(f"messages[{number}].content[{index}]", str(exc)) from None

    @staticmethod
    def media_error(where: str, reason: str) -> OpenAIError:
        return OpenAIError(400, f"{where}: {reason}", param=where.replace("[", ".").replace("]", ""),
                           code="invalid_media")

    def prepare(self, body: ChatCompletionRequest) -> tuple[list[Message], GenerationParams, int]:
        """Engine messages and parameters; 400 when the template fails or the context is too short."""
        messages = self.engine_messages(body)
        template_kwargs = body.template_kwargs(self.thinking_kwarg)
        try:  # OpenAI's field; wins over chat_template_kwargs
            template_kwargs.update(self.engine.family.effort_kwargs(body.reasoning_effort))
        except ValueError as exc:
            raise OpenAIError(400, str(exc), param="reasoning_effort") from None
        tools = self.tools(body)
        try:
            prompt = self.engine.encode(messages, template_kwargs, tools)
        except PromptImagesError as exc:
            raise OpenAIError(400, str(exc), param="messages", code="invalid_media") from None
        except TemplateError as exc:  # raise_exception in the template (400), or a broken template (500)
            log.warning("the chat template (%s) failed: %s", self.engine.chat_template.describe(), exc)
            status, message = template_failure(self.engine.chat_template, exc)
            if status == 400:
                raise OpenAIError(400, message, param="messages", code="chat_template_refused") from None
            raise OpenAIError(500, message, "server_error", code="chat_template_error") from None
        prompt_tokens = len(prompt.ids)
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


def family_openapi(document: dict[str, Any], family: ModelFamily, takes_images: bool,
                   takes_videos: bool = False) -> dict[str, Any]:
    """The OpenAPI document as this family's server answers it: image parts only where the loaded model reads
    images, video parts only where it reads video, `reasoning_effort` only for a family with levels, as the enum
    of its levels. The request model itself takes them all, so what is not advertised gets a plain 400 rather
    than a schema error."""
    schemas = document.get("components", {}).get("schemas", {})
    shown = {"TextPart", *(["ImagePart"] if takes_images else []), *(["VideoPart"] if takes_videos else [])}
    for name in ("ChatMessage", "AssistantMessage"):
        for branch in schemas.get(name, {}).get("properties", {}).get("content", {}).get("anyOf", []):
            items = branch.get("items") if isinstance(branch, dict) else None
            if not isinstance(items, dict) or "oneOf" not in items:
                continue
            refs = [ref for ref in items["oneOf"] if ref.get("$ref", "").rsplit("/", 1)[-1] in shown]
            mapping = {tag: ref for tag, ref in items.get("discriminator", {}).get("mapping", {}).items()
                       if ref.rsplit("/", 1)[-1] in shown}
            branch["items"] = refs[0] if len(refs) == 1 else {**items, "oneOf": refs,
                                                              "discriminator": {"propertyName": "type", "mapping": mapping}}
    for name in ([] if takes_videos else ["VideoPart", "VideoUrl"]) + ([] if takes_images else ["ImagePart", "ImageUrl"]):
        schemas.pop(name, None)
    request = schemas.get("ChatCompletionRequest", {}).get("properties", {})
    effort = family.reasoning_effort
    if effort is None:
        request.pop("reasoning_effort", None)
    elif "reasoning_effort" in request:
        request["reasoning_effort"] = {"anyOf": [{"type": "string", "enum": list(effort.choices)}, {"type": "null"}],
                                       "title": "Reasoning Effort",
                                       "description": f"OpenAI's reasoning effort: {', '.join(effort.choices)}"}
    return document


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


class EngineThreads:
    """Threads for the calls that wait on the model (a whole answer, a stream's next piece), apart from the
    event loop's shared pool (anyio's, 40 threads). Every request the engine admits may hold one while it
    waits, so there are as many as it admits (MAX_BATCH running + MAX_QUEUE waiting): requests waiting on the
    model never take the threads that new requests need to be prepared and queued, or refused with a 503."""

    def __init__(self, engine: ChatEngine) -> None:
        self.engine = engine
        self.size = engine.scheduler.max_batch + engine.scheduler.max_queue
        self._loop: object = None
        self._limiter: Any = None

    async def run(self, call: Callable[..., Any], *args: Any) -> Any:
        import asyncio

        import anyio

        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a limiter serves one event loop (a server has one; tests start several)
            self._loop, self._limiter = loop, anyio.CapacityLimiter(self.size)
        return await anyio.to_thread.run_sync(call, *args, limiter=self._limiter)

    async def generate(self, messages: list[Message], params: GenerationParams) -> Completion:
        """A whole answer: queued (or EngineBusy) at once on a short-lived thread of the shared pool, waited for
        on one of these."""
        from fastapi.concurrency import run_in_threadpool

        return await self.run(await run_in_threadpool(self.engine.submit, messages, params))

    async def iterate(self, iterator: Iterator[str]) -> AsyncIterator[str]:
        """Pull a blocking iterator; close it (freeing the model) if the client leaves."""
        done = object()
        try:
            while True:
                item = await self.run(next, iterator, done)
                if item is done:
                    return
                yield item
        finally:  # not awaited: a cancelled scope (client gone) would skip an await here
            close = getattr(iterator, "close", None)
            if close is not None:
                close()  # GeneratorExit in the engine's stream: its request is cancelled (queue slot, batch row)


def add_openai_routes(app: Any, engine: ChatEngine, settings: FastapiSettings | None = None,
                      threads: EngineThreads | None = None) -> OpenAIChat:
    """Add /v1/models and /v1/chat/completions (+ OpenAI-shaped errors and the optional API key) to app.
    settings: API_KEY, MODEL_ID, SERVED_MODEL_NAME (default: resolved from the environment and the recipe);
    threads: the app's EngineThreads when its other routes wait on the engine too (default: its own)."""
    from fastapi import APIRouter, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    settings = engine.context.settings(FastapiSettings) if settings is None else settings
    chat = OpenAIChat(engine, settings)
    threads = EngineThreads(engine) if threads is None else threads
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
            return StreamingResponse(threads.iterate(events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        completion = await threads.generate(messages, params)
        return chat.response(model, completion, params.tools)

    app.include_router(router)
    full_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = family_openapi(full_openapi(), engine.family, engine.takes_images, engine.takes_videos)
        return app.openapi_schema

    app.openapi = openapi

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

    async def on_continuous_unsupported(request: Request, exc: Exception) -> Any:
        """A seed or images while continuous batching is on (continuous.py): the client's request, not a crash."""
        assert isinstance(exc, ContinuousUnsupported)
        return JSONResponse(error_body(str(exc), param=exc.param), status_code=400)

    async def on_crash(request: Request, exc: Exception) -> Any:
        request_id = new_request_id()
        log.error("request failed [%s] %s %s", request_id, request.method, request.url.path, exc_info=exc)
        message, headers = internal_error_message(request_id), {"X-Request-ID": request_id}
        if not is_v1(request):
            return JSONResponse({"detail": message}, status_code=500, headers=headers)
        return JSONResponse(error_body(message, "server_error"), status_code=500, headers=headers)

    app.add_exception_handler(OpenAIError, on_openai_error)
    app.add_exception_handler(EngineBusy, on_busy)
    app.add_exception_handler(ContinuousUnsupported, on_continuous_unsupported)
    app.add_exception_handler(Exception, on_crash)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)

    key = settings.api_key
    if key:
        app.add_middleware(ApiKeyMiddleware, api_key=key)
    log.info("OpenAI-compatible API at /v1 serving %r%s", chat.served_name, " (API key required)" if key else "")
    return chat
