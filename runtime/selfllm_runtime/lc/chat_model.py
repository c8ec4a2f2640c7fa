"""`ChatSelfLLM`: a LangChain chat model (langchain-core 1.x `BaseChatModel`) over one ChatEngine.

invoke/batch go through `_generate`, stream through `_stream`; async variants use LangChain's
executor defaults. The engine's lock serializes generations, so `batch` queues safely.
Reasoning (Qwen3's <think>…</think>) is kept out of the content and returned in
`additional_kwargs["reasoning_content"]`, the convention of LangChain's DeepSeek/Qwen integrations.
`bind_tools` works for families with tool calls (model.yaml `tool_calls`): the tools go into the
family's chat template and the calls the model writes come back as `AIMessage.tool_calls` (streamed:
one `tool_call_chunks` entry per call, after the content); AIMessage tool calls and ToolMessages in the
history are rendered the family's way (tool_calls.py).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..chat_engine import ChatEngine, Completion, GenerationParams, Message
from ..media import MediaError, check_media, load_image
from ..settings import MediaSettings
from ..tool_calls import ToolCall, ToolCallStream, parse_tool_calls, tool_names, tool_parameters

ROLES: dict[type[BaseMessage], str] = {
    SystemMessage: "system", HumanMessage: "user", AIMessage: "assistant", ToolMessage: "tool",
}


def message_text(message: BaseMessage) -> str:
    """The text of a message; content blocks other than text (images, tool calls) are dropped."""
    if isinstance(message.content, str):
        return message.content
    parts = []
    for block in message.content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
    return "".join(parts)


ImageReader = Callable[[str, dict[str, Any], int], Any]  # (role, content block, number from 1) → a PIL image


def image_url(block: dict[str, Any]) -> str | None:
    """The URL (a data: URL or http(s)) of an image content block in any of LangChain's shapes: OpenAI's
    `image_url` (a dict or a string), the standard `image` block with `url`, or with `base64` / `data` + `mime_type`;
    None for a block that is no image."""
    kind = block.get("type")
    if kind == "image_url":
        value = block.get("image_url")
        return str(value.get("url", "")) if isinstance(value, dict) else str(value or "")
    if kind != "image":
        return None
    if block.get("url"):
        return str(block["url"])
    data = block.get("base64") or (block.get("data") if block.get("source_type", "base64") == "base64" else None)
    return f"data:{block.get('mime_type') or 'image/png'};base64,{data or ''}"


def to_engine_messages(messages: list[BaseMessage], read_image: ImageReader | None = None) -> list[Message]:
    """LangChain messages → the role/content dicts the chat template takes. Image blocks go through read_image
    (ChatSelfLLM's: checked and decoded by media.py) into a list content of text and image parts; without a
    reader, or in text-only content, only the text is kept."""
    out: list[Message] = []
    images = 0
    for message in messages:
        if isinstance(message, ChatMessage):
            role = message.role
        else:
            role = next((r for cls, r in ROLES.items() if isinstance(message, cls)), None)
            if role is None:
                raise ValueError(f"unsupported message type {type(message).__name__}")
        item: Message = {"role": role, "content": message_text(message)}
        blocks = [] if isinstance(message.content, str) else [b for b in message.content if isinstance(b, dict)]
        if read_image is not None and any(image_url(b) is not None for b in blocks):
            parts: list[dict[str, Any]] = []
            for block in message.content:
                if isinstance(block, str) or block.get("type") == "text":
                    parts.append({"type": "text", "text": block if isinstance(block, str) else str(block.get("text", ""))})
                elif image_url(block) is not None:
                    images += 1
                    parts.append({"type": "image", "image": read_image(role, block, images)})
            item["content"] = parts
        if isinstance(message, AIMessage) and message.tool_calls:
            item["tool_calls"] = [{"id": call.get("id") or "", "type": "function", "function": {
                "name": call["name"], "arguments": json.dumps(call["args"], ensure_ascii=False)}}
                for call in message.tool_calls]
        if isinstance(message, ToolMessage):
            item["tool_call_id"] = message.tool_call_id
        out.append(item)
    return out


def langchain_call(call: ToolCall) -> dict[str, Any]:
    return {"name": call.name, "args": json.loads(call.arguments), "id": call.id, "type": "tool_call"}


def usage(completion: Completion) -> UsageMetadata:
    return UsageMetadata(input_tokens=completion.prompt_tokens, output_tokens=completion.completion_tokens,
                         total_tokens=completion.prompt_tokens + completion.completion_tokens)


class ChatSelfLLM(BaseChatModel):
    """A local chat model for LangChain chains: `ChatSelfLLM(engine=ChatEngine(context, model_dir))`.

    Call-time keyword arguments (`llm.invoke(msgs, max_new_tokens=64)`, or `.bind(...)`) override
    the fields below for that call.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    engine: ChatEngine = Field(exclude=True)
    max_new_tokens: int = 512
    temperature: float | None = None  # None: the checkpoint's generation_config
    top_p: float | None = None
    seed: int | None = None
    enable_thinking: bool | None = None  # None: the model family's default (model.yaml)
    reasoning_effort: str | None = None  # families with effort levels instead (gpt-oss); None: the family's default

    @model_validator(mode="after")
    def _known_effort(self) -> "ChatSelfLLM":
        self.engine.family.effort_kwargs(self.reasoning_effort)  # ValueError for a level the family lacks
        return self

    @property
    def _llm_type(self) -> str:
        return "selfllm-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.engine.model_name, "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "enable_thinking": self.enable_thinking,
                "reasoning_effort": self.reasoning_effort}

    def bind_tools(self, tools: Sequence[dict[str, Any] | type[BaseModel] | Callable | BaseTool], *,
                   tool_choice: str | None = None, **kwargs: Any) -> Runnable:
        """Bind tools (anything convert_to_openai_tool takes). tool_choice: None/"auto" (the model decides),
        "none" (tools not shown), or a tool's name (only that one shown); decoding is not constrained, so a
        model that writes no call answers in content."""
        if self.engine.family.tool_calls is None:
            raise ValueError(f"{self.engine.family.display_name}'s chat template does not render tools "
                             "(no tool_calls in its model.yaml)")
        formatted = [convert_to_openai_tool(tool) for tool in tools]
        if tool_choice not in (None, "auto", "any", "required", "none"):
            formatted = [t for t in formatted if t["function"]["name"] == tool_choice]
            if not formatted:
                raise ValueError(f"tool_choice {tool_choice!r} names none of the bound tools")
        return self.bind(tools=[] if tool_choice == "none" else formatted, **kwargs)

    def _params(self, stop: list[str] | None, overrides: dict[str, Any]) -> GenerationParams:
        template_kwargs: dict[str, Any] = dict(overrides.get("template_kwargs") or {})
        thinking = overrides.get("enable_thinking", self.enable_thinking)
        switch = self.engine.family.thinking
        if thinking is not None and switch is not None:
            template_kwargs.setdefault(switch.template_kwarg, thinking)
        effort = self.engine.family.effort_kwargs(overrides.get("reasoning_effort", self.reasoning_effort))
        template_kwargs = {**effort, **template_kwargs}
        temperature, top_p = overrides.get("temperature", self.temperature), overrides.get("top_p", self.top_p)
        return self.engine.params(
            max_new_tokens=int(overrides.get("max_new_tokens", self.max_new_tokens)),
            temperature=None if temperature is None else float(temperature),
            top_p=None if top_p is None else float(top_p),
            seed=overrides.get("seed", self.seed),
            stop=list(stop or []),
            template_kwargs=template_kwargs,
            tools=overrides.get("tools") or None,
        )

    def _read_image(self, role: str, block: dict[str, Any], number: int) -> Any:
        """An image block, held to the family's limits (MEDIA_* settings); ValueError in plain words (a text-only
        family, a checkpoint without a vision tower, too many, undecodable, too large)."""
        media = self.engine.context.settings(MediaSettings)
        try:
            check_media(self.engine.family, self.engine.takes_images, type(self.engine.model).__name__, "image", role,
                        number, media.media_max_images)
            return load_image(image_url(block) or "", media)
        except MediaError as exc:
            raise ValueError(f"image {number} ({role} message): {exc}") from None

    def _response_metadata(self, completion: Completion) -> dict[str, Any]:
        return {"model_name": self.engine.model_name, "finish_reason": completion.finish_reason}

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        params = self._params(stop, kwargs)
        completion = self.engine.generate(to_engine_messages(messages, self._read_image), params)
        extra = {"reasoning_content": completion.reasoning} if completion.reasoning else {}
        content, calls = completion.text, []
        spec = self.engine.family.tool_calls
        if params.tools and spec is not None:
            content, calls = parse_tool_calls(completion.text, spec, tool_names(params.tools),
                                              tool_parameters(params.tools))
        message = AIMessage(content=content, additional_kwargs=extra, usage_metadata=usage(completion),
                            tool_calls=[langchain_call(call) for call in calls],
                            response_metadata=self._response_metadata(completion))
        return ChatResult(generations=[ChatGeneration(message=message)],
                          llm_output={"model_name": self.engine.model_name})

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        params = self._params(stop, kwargs)
        spec = self.engine.family.tool_calls
        calls_stream = (ToolCallStream(spec, tool_names(params.tools), tool_parameters(params.tools))
                        if params.tools and spec is not None else None)
        for piece in self.engine.stream(to_engine_messages(messages, self._read_image), params):
            if isinstance(piece, Completion):
                if calls_stream is not None:
                    rest, calls = calls_stream.finish()
                    if rest:
                        yield ChatGenerationChunk(message=AIMessageChunk(content=rest))
                    for index, call in enumerate(calls):
                        yield ChatGenerationChunk(message=AIMessageChunk(content="", tool_call_chunks=[{
                            "name": call.name, "args": call.arguments, "id": call.id, "index": index,
                            "type": "tool_call_chunk"}]))
                chunk = ChatGenerationChunk(message=AIMessageChunk(
                    content="", usage_metadata=usage(piece), response_metadata=self._response_metadata(piece),
                    chunk_position="last"))
                yield chunk
                continue
            kind, delta = piece
            if kind == "content" and calls_stream is not None:
                delta = calls_stream.feed(delta)
                if not delta:
                    continue
            if kind == "reasoning":
                chunk = ChatGenerationChunk(message=AIMessageChunk(content="", additional_kwargs={"reasoning_content": delta}))
            else:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
            if run_manager is not None:
                run_manager.on_llm_new_token(delta, chunk=chunk)
            yield chunk
