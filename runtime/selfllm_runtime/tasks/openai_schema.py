"""The OpenAI chat-completions API's schema as this server takes and answers it (tasks/openai_api.py serves it):
request bodies (pydantic, validated as OpenAI validates them), the answers and errors as the OpenAPI docs show them.
Image (`image_url`) and video (`video_url`) parts are part of every family's request model, so a text-only family
answers them with a plain 400 (openai_api.OpenAIChat.engine_messages); the OpenAPI document shows them only for a
family that takes them (openai_api.family_openapi)."""
from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from ..chat_engine import Message

MAX_STOP_STRINGS = 16
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


class ImageUrl(RequestPart):
    url: str = Field(min_length=1, description="a data: URL (`data:image/png;base64,...`) or an http(s) URL the "
                     "server downloads; local paths and other schemes are refused")
    detail: Literal["auto", "low", "high"] | None = Field(None, description="accepted, not used")


class ImagePart(RequestPart):
    """An image (OpenAI's shape), for a family that takes images (model.yaml `modalities`)."""

    type: Literal["image_url"]
    image_url: ImageUrl


class VideoUrl(RequestPart):
    url: str = Field(min_length=1)


class VideoPart(RequestPart):
    """A video (vLLM's shape), for a family that takes video."""

    type: Literal["video_url"]
    video_url: VideoUrl


MediaPart = ImagePart | VideoPart
ContentPart = Annotated[TextPart | ImagePart | VideoPart, Discriminator("type")]


class ChatMessage(RequestPart):
    """A system, developer, user or tool message: content is required."""

    role: Literal["system", "developer", "user", "tool"]
    content: str | list[ContentPart]
    name: str | None = None
    tool_call_id: str | None = Field(None, description="a tool message: the id of the call it answers")

    def media_parts(self) -> list[tuple[int, MediaPart]]:
        """(index in content, part) of its image and video parts."""
        parts = [] if isinstance(self.content, str) else list(enumerate(self.content or []))
        return [(index, part) for index, part in parts if not isinstance(part, TextPart)]

    def to_engine(self) -> Message:
        """The message with its text parts joined (media parts are the API's to read: OpenAIChat.engine_messages)."""
        text = self.content if isinstance(self.content, str) else "".join(
            p.text for p in self.content or [] if isinstance(p, TextPart))
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
    content: str | list[ContentPart] | None = None
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
    meaning = {400: "Invalid request (wrong types, out-of-range values, context length exceeded, a conversation the "
                    "chat template refuses)",
               401: "Missing or wrong API key (when the server has one)", 404: "Unknown model",
               503: "The engine's queue is full (see Retry-After)",
               500: "The server failed (e.g. its chat template is broken)"}
    return {**{status: {"model": ErrorResponse, "description": meaning[status]} for status in statuses},
            "4XX": {"model": ErrorResponse, "description": "Other client errors"}}
