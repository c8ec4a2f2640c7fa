"""Tool calling, per the family's `tool_calls` data (metadata.ToolCalls):

- `template_inputs`: OpenAI-shaped messages and tools → what the family's chat template reads
  (arguments as objects, GLM-4's `metadata` / `observation` turns, tools on the system message);
- `parse_tool_calls`: the model's finished answer → (content, calls); markup that does not parse is
  returned as plain content, never an error;
- `ToolCallStream`: streamed content, held back from where a call may begin.

Formats (as vLLM's tool parsers read them):
- hermes (Qwen2.5, Qwen3): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, any number,
  text before them is content; a last call left unterminated still counts if its JSON is whole;
- llama3_json (Llama 3.1): the whole answer is `{"name": ..., "parameters": {...}}` (calls joined by
  `;`), maybe after `<|python_tag|>`; the name must be one of the request's tools;
- glm4 (GLM-4): the whole answer is `name\\n{json args}`; the name must be one of the request's tools;
- minicpm5 (MiniCPM5): `<function name="...">` + `<param name="...">value</param>` (a value with <, & or
  newlines inside `<![CDATA[...]]>`) + `</function>`, any number, text before them is content; values are
  text, typed by the request's JSON schema of that parameter (integer, number, boolean, object, array;
  a parameter the schema does not type stays a string), the way vLLM's XML parser qwen3_coder types them.
"""
from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass
from typing import Any

from .metadata import ToolCalls

PYTHON_TAG = "<|python_tag|>"  # Llama 3.1's marker before a call (special: usually decoded away)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def tool_names(tools: list[dict[str, Any]] | None) -> set[str]:
    return {t["function"]["name"] for t in tools or [] if isinstance(t.get("function"), dict) and "name" in t["function"]}


Schemas = dict[str, dict[str, Any]]  # tool name → {parameter name: its JSON schema}


def tool_parameters(tools: list[dict[str, Any]] | None) -> Schemas:
    """Each tool's parameter schemas (`function.parameters.properties`), for formats whose values are text."""
    out: Schemas = {}
    for tool in tools or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            parameters = function.get("parameters")
            properties = parameters.get("properties") if isinstance(parameters, dict) else None
            out[function["name"]] = properties if isinstance(properties, dict) else {}
    return out


def _call(obj: Any, argument_keys: tuple[str, ...], names: set[str] | None) -> ToolCall | None:
    """A call from a decoded {"name", <arguments>} object; None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    if names is not None and obj["name"] not in names:
        return None
    present = [k for k in argument_keys if k in obj]
    arguments = obj[present[0]] if present else {}
    if not isinstance(arguments, dict):
        return None
    return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


def _hermes(text: str, start: str, end: str) -> tuple[str, list[ToolCall]]:
    content: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    while (begin := text.find(start, pos)) >= 0:
        content.append(text[pos:begin])
        close = text.find(end, begin + len(start))
        body = text[begin + len(start): close if close >= 0 else len(text)]
        try:
            call = _call(json.loads(body), ("arguments", "parameters"), None)
        except ValueError:
            call = None
        if call is None:
            return text, []
        calls.append(call)
        if close < 0:  # cut off after whole JSON (max_tokens): still a call, as vLLM takes it
            return "".join(content).strip(), calls
        pos = close + len(end)
    content.append(text[pos:])
    return ("".join(content).strip(), calls) if calls else (text, [])


def _llama3_json(text: str, names: set[str]) -> tuple[str, list[ToolCall]]:
    body = text.strip()
    if body.startswith(PYTHON_TAG):
        body = body[len(PYTHON_TAG):].lstrip()
    if not body.startswith("{"):
        return text, []
    decoder, pos, calls = json.JSONDecoder(), 0, []
    while pos < len(body):
        try:
            obj, pos = decoder.raw_decode(body, pos)
        except ValueError:
            return text, []
        call = _call(obj, ("parameters", "arguments"), names)
        if call is None:
            return text, []
        calls.append(call)
        rest = body[pos:].lstrip()
        if rest.startswith(";"):
            rest = rest[1:].lstrip()
        elif rest:
            return text, []  # prose after the JSON: an answer, not a call
        pos = len(body) - len(rest)
    return "", calls


def _glm4(text: str, names: set[str]) -> tuple[str, list[ToolCall]]:
    name, newline, arguments = text.strip().partition("\n")
    if not newline or name.strip() not in names:
        return text, []
    try:
        call = _call({"name": name.strip(), "arguments": json.loads(arguments)}, ("arguments",), names)
    except ValueError:
        return text, []
    return ("", [call]) if call else (text, [])


# The start marker of a call in the formats that mark calls inside the answer (text may come before them).
MARKERS = {"hermes": "<tool_call>", "minicpm5": "<function"}
XML_FUNCTION = re.compile(r"""<function\s+name\s*=\s*(["'])(.*?)\1\s*>(.*?)</function>""", re.DOTALL)
XML_PARAM = re.compile(r"""<param\s+name\s*=\s*(["'])(.*?)\1\s*>(?:<!\[CDATA\[(.*?)\]\]>|(.*?))</param>""", re.DOTALL)


def _typed(value: str, schema: Any) -> Any:
    """A parameter's text as its JSON schema types it; the text itself where it does not parse as that type."""
    kind = schema.get("type") if isinstance(schema, dict) else None
    if isinstance(kind, list):  # ["integer", "null"]
        kind = next((k for k in kind if k != "null"), None)
    if kind in (None, "string"):
        return value
    text = value.strip()
    if text == "null":
        return None
    try:
        if kind == "integer":
            return int(text)
        if kind == "number":
            try:
                return int(text)
            except ValueError:
                number = float(text)
                return number if math.isfinite(number) else value
        if kind == "boolean":
            return {"true": True, "false": False}[text.lower()]
        if kind in ("object", "array"):
            parsed = json.loads(text)
            return parsed if isinstance(parsed, dict if kind == "object" else list) else value
    except (ValueError, KeyError):
        pass
    return value


def _xml_call(match: re.Match[str], parameters: Schemas) -> ToolCall | None:
    """A call from one `<function name=...>...</function>`; None if its body is not only params."""
    name, body = match.group(2).strip(), match.group(3)
    if not name:
        return None
    schemas = parameters.get(name, {})
    arguments: dict[str, Any] = {}
    pos = 0
    for param in XML_PARAM.finditer(body):
        if body[pos:param.start()].strip():
            return None
        value = param.group(3) if param.group(3) is not None else param.group(4)
        arguments[param.group(2)] = _typed(value, schemas.get(param.group(2)))
        pos = param.end()
    if body[pos:].strip():
        return None
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def _minicpm5(text: str, start: str, parameters: Schemas) -> tuple[str, list[ToolCall]]:
    content: list[str] = []
    calls: list[ToolCall] = []
    pos = 0
    while (begin := text.find(start, pos)) >= 0:
        content.append(text[pos:begin])
        match = XML_FUNCTION.match(text, begin)
        call = _xml_call(match, parameters) if match else None
        if call is None:  # cut off, or markup that is no call: the answer as it is
            return text, []
        calls.append(call)
        pos = match.end()
    content.append(text[pos:])
    return ("".join(content).strip(), calls) if calls else (text, [])


def parse_tool_calls(text: str, spec: ToolCalls, names: set[str],
                     parameters: Schemas | None = None) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a finished answer; (text, []) when it holds no well-formed call.
    parameters: the request's tool_parameters(tools), which type minicpm5's text values."""
    if spec.format == "hermes":
        return _hermes(text, spec.start or "<tool_call>", spec.end or "</tool_call>")
    if spec.format == "minicpm5":
        return _minicpm5(text, spec.start or MARKERS["minicpm5"], parameters or {})
    if spec.format == "llama3_json":
        return _llama3_json(text, names)
    return _glm4(text, names)


class ToolCallStream:
    """Streamed answer text → the content that can go out now; `finish()` → (rest of the content,
    calls). Text is held back from where a call may begin: hermes / minicpm5 at its start marker (and
    while the tail may still grow into it), llama3_json / glm4 from the first character of the answer
    while it may still be a call."""

    def __init__(self, spec: ToolCalls, names: set[str], parameters: Schemas | None = None):
        self.spec, self.names, self.parameters = spec, names, parameters
        self.held = ""  # text not sent yet
        self.capturing = False  # a call has begun: hold everything to the end
        self.plain = False  # the answer can no longer be a call (llama3_json / glm4)

    def _could_start(self, text: str) -> bool:
        """Whether an answer starting with text may still be a whole-answer call."""
        body = text.lstrip()
        if self.spec.format == "llama3_json":
            return body[:1] in {"", "{"} or PYTHON_TAG.startswith(body[: len(PYTHON_TAG)])
        name, newline, _ = body.partition("\n")  # glm4
        if not newline:
            return any(n.startswith(name) for n in self.names)
        return name.strip() in self.names

    def feed(self, delta: str) -> str:
        self.held += delta
        if self.capturing:
            return ""
        if self.spec.format not in MARKERS:
            if self.plain or not self._could_start(self.held):
                self.plain, out, self.held = True, self.held, ""
                return out
            return ""
        start = self.spec.start or MARKERS[self.spec.format]
        begin = self.held.find(start)
        if begin >= 0:
            out, self.held, self.capturing = self.held[:begin], self.held[begin:], True
            return out
        keep = max((n for n in range(min(len(start) - 1, len(self.held)), 0, -1) if self.held.endswith(start[:n])),
                   default=0)
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        held, self.held = self.held, ""
        if not held or self.plain:
            return held, []
        content, calls = parse_tool_calls(held, self.spec, self.names, self.parameters)
        return (content, calls) if calls else (held, [])


def _arguments_object(arguments: Any) -> Any:
    """OpenAI sends arguments as a JSON string; the Qwen and Llama templates render them with tojson."""
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def template_inputs(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                    spec: ToolCalls | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages, extra apply_chat_template kwargs) in the shape the family's template reads.
    Without tool support (spec None) messages pass unchanged (DeepSeek-R1's template concatenates
    the arguments string as sent) and tools are not passed."""
    if spec is None:
        return messages, {}
    out: list[dict[str, Any]] = []
    for message in messages:
        calls = message.get("tool_calls")
        if spec.format == "glm4":
            if message["role"] == "tool":
                out.append({"role": "observation", "content": message["content"]})
            elif calls:
                if message.get("content"):
                    out.append({"role": "assistant", "content": message["content"]})
                out += [{"role": "assistant", "metadata": c["function"]["name"],
                         "content": json.dumps(_arguments_object(c["function"]["arguments"]), ensure_ascii=False)}
                        for c in calls]
            else:
                out.append(message)
        elif calls:
            out.append({**message, "tool_calls": [
                {**c, "function": {**c["function"], "arguments": _arguments_object(c["function"]["arguments"])}}
                for c in calls]})
        else:
            out.append(message)
    if not tools:
        return out, {}
    if spec.tools_in == "argument":
        return out, {"tools": tools}
    if out and out[0]["role"] == "system":
        return [{**out[0], "tools": tools}, *out[1:]], {}
    return [{"role": "system", "content": "", "tools": tools}, *out], {}
