"""Training data: upstream's instruction format and a conversation format, detected per record,
tokenized through the chat template CHAT_TEMPLATE picks (chat_template.py: the checkpoint's own, the
family's copy where it ships none), as at inference time, with the prompt masked out of the loss.

Formats (a JSON list, or JSONL with one record a line; both may be mixed in one file):
- instruction (upstream's huanhuan.json): {"instruction": str, "input": str (optional), "output": str,
  "system": str (optional)}
- conversation: {"conversation": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
  (the key "messages" is accepted too). Every assistant turn becomes one example whose prompt is the
  conversation before it, rendered exactly as at inference time.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..model_source import file_sha256
from ..settings import DEFAULT_DATA
from ..system_role import render_chat

IGNORE_INDEX = -100  # label of tokens that carry no loss (the prompt, padding)
ROLES = {"system", "user", "assistant"}
Message = dict[str, str]


# Upstream's huanhuan.json, shipped with the runtime (provenance and license: data/README.md): the data of a
# run with neither DATA_PATH nor DATA_URL, used without network access and checked against this digest.
DEFAULT_DATA_SHA256 = "1bbe8b09857274adc58186919622554df7f71dcee8655537f6a8b80993d6e6f3"


class DataSourceError(ValueError):
    """Training data that can't be had (a bad or unreachable DATA_URL, a damaged shipped file); the message
    names it and what to set instead."""


def default_data(path: Path = DEFAULT_DATA, sha256: str = DEFAULT_DATA_SHA256,
                 digest_of: Callable[[Path], str] = file_sha256) -> Path:
    """The shipped default data file, after checking its sha256 (digest_of: of the file, or of the file and the
    images it names: vision_data.data_digest)."""
    try:
        digest = digest_of(path)
    except (OSError, ValueError) as exc:  # ValueError: a DataError of digest_of
        raise DataSourceError(f"the shipped default data {path} can't be read ({getattr(exc, 'strerror', None) or exc}): "
                              "reinstall the runtime, or set DATA_PATH to a mounted file") from None
    if digest != sha256:
        raise DataSourceError(f"the shipped default data {path} has sha256 {digest}, not {sha256}: reinstall the "
                              "runtime, or set DATA_PATH to a mounted file")
    return path


class DataError(ValueError):
    """A training file or record that can't be used; the message names the file and the record."""

    def __init__(self, path: Path | str, index: int | None, problem: str):
        self.path, self.index, self.problem = Path(path), index, problem
        where = f"{path}" if index is None else f"{path}: record {index}"
        super().__init__(f"{where}: {problem}")


def read_records(path: Path | str) -> list[Any]:
    """A JSON list, or JSON Lines (one object a line, blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "file not found")
    text = path.read_text(encoding="utf-8-sig")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(path, None, f"invalid JSON at line {exc.lineno}: {exc.msg}") from None
        if not isinstance(data, list):
            raise DataError(path, None, "expected a JSON list of records")
        return data
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(path, len(records), f"line {number} is not valid JSON: {exc.msg}") from None
    if not records:
        raise DataError(path, None, "no records (expected a JSON list or JSON Lines)")
    return records


def _text(value: Any, field: str, path: Path, index: int, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(path, index, f"{field!r} must be a string, got {type(value).__name__}")
    return value


def record_to_messages(record: Any, path: Path, index: int, system_prompt: str | None = None) -> list[Message]:
    """One record of either format as chat messages; a bad record raises DataError."""
    if not isinstance(record, dict):
        raise DataError(path, index, f"expected an object, got {type(record).__name__}")
    turns = record.get("conversation", record.get("messages"))
    if turns is not None:
        if not isinstance(turns, list) or not turns:
            raise DataError(path, index, "'conversation' must be a non-empty list of {role, content}")
        messages: list[Message] = []
        for number, turn in enumerate(turns):
            if not isinstance(turn, dict) or not {"role", "content"} <= turn.keys():
                raise DataError(path, index, f"conversation turn {number} needs 'role' and 'content'")
            role = turn["role"]
            if role not in ROLES:
                raise DataError(path, index, f"conversation turn {number}: role {role!r} is not one of {sorted(ROLES)}")
            messages.append({"role": role, "content": _text(turn["content"], f"turn {number} content", path, index)})
        if not any(m["role"] == "assistant" for m in messages[1:]):
            raise DataError(path, index, "conversation has no assistant turn after a user turn")
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        return messages
    if "instruction" in record and "output" in record:
        instruction = _text(record["instruction"], "instruction", path, index)
        extra = _text(record.get("input"), "input", path, index, required=False)
        output = _text(record["output"], "output", path, index)
        system = _text(record.get("system"), "system", path, index, required=False) or system_prompt
        user = "\n".join(part for part in (instruction, extra) if part)
        if not user.strip() or not output.strip():
            raise DataError(path, index, "'instruction' (with 'input') and 'output' must not be empty")
        return ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": output}]
    keys = ", ".join(sorted(map(str, record.keys()))) or "none"
    raise DataError(path, index, f"unknown format (keys: {keys}); expected {{instruction, input, output}} "
                                 "or {conversation: [{role, content}, ...]}")


def turns_to_examples(messages: list[Message]) -> Iterator[tuple[list[Message], Message]]:
    """(conversation so far, assistant reply) for every assistant turn that follows a user turn."""
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and any(m["role"] == "user" for m in messages[:i]):
            yield messages[:i], message


@dataclass
class ChatTokenizer:
    """Turns (prompt messages, reply) into input_ids/labels through the chat template.

    The prompt is what the template renders with add_generation_prompt=True (for Qwen3 with
    enable_thinking=False that ends in an empty think block); the learned part is the reply up to
    and including the end-of-turn token (eos, e.g. <|im_end|>), so the model learns to stop.
    Template shapes are handled as data from model.yaml:
    - `closes_reply=False` (GLM-4): the template leaves the turn open, so eos is appended;
    - a prompt that opens the reasoning block (R1-style `<think>\n` after the assistant tag) while
      the rendered reply does not: the reply learns an empty block first (`\n</think>\n\n` + text);
    - a prompt that ends in an empty closed block (thinking off) that the rendered conversation does not
      hold (MiniCPM5's template drops it from a finished turn): the prompt keeps it, the reply follows it;
    - `system_role` (Gemma-2: merge_into_first_user): rendered as at inference time (system_role.render_chat),
      so a SYSTEM_PROMPT goes into the first user turn of the prompt, never into the learned part;
    - reasoning answer markers (Hunyuan-A13B: `<answer>\n…\n</answer>`): the reply is learned inside them.
    """

    tokenizer: Any
    template_kwargs: dict[str, Any]
    eos_token: str
    max_length: int = 1024
    closes_reply: bool = True
    reasoning: Any = None  # metadata.Reasoning of the family, or None
    system_role: str = "native"  # metadata.SystemRole of the family

    def _reply_after(self, prompt: str, full: str) -> str:
        if full.startswith(prompt):
            return full[len(prompt):]
        opener = self.reasoning.start if self.reasoning is not None else None
        head = prompt.rstrip()
        if opener and head.endswith(opener) and full.startswith(head[: -len(opener)]):
            # The prompt opened the think block, the finished turn holds none: an empty block closes before the
            # reply; a template that writes a bare close in a finished turn (GLM-4.7-Flash: `</think>text`) keeps one.
            rest = full[len(head) - len(opener):].lstrip()
            if rest.startswith(self.reasoning.end):
                rest = rest[len(self.reasoning.end):].lstrip()
            return "\n" + self.reasoning.end + "\n\n" + rest
        if opener and head.endswith(self.reasoning.end):
            # Thinking off (MiniCPM5): the prompt ends in an empty, closed think block that the rendered
            # conversation does not hold; the reply is learned as rendered, after the prompt's block.
            begin = head.rfind(opener)
            inside = head[begin + len(opener): len(head) - len(self.reasoning.end)] if begin >= 0 else "x"
            if not inside.strip() and full.startswith(prompt[:begin]):
                return full[begin:]
        raise ValueError("the chat template renders the prompt differently when the reply follows it; "
                         f"cannot mask the prompt (prompt ends {prompt[-40:]!r})")

    def render(self, context: list[Message], reply: Message) -> tuple[str, str]:
        if self.reasoning is not None and isinstance(reply.get("content"), str):  # Hunyuan: <answer>\n…\n</answer>
            reply = {**reply, "content": self.reasoning.wrap_answer(reply["content"])}
        prompt = render_chat(self.tokenizer, context, self.system_role, add_generation_prompt=True,
                             **self.template_kwargs)
        full = render_chat(self.tokenizer, [*context, reply], self.system_role, add_generation_prompt=False,
                           **self.template_kwargs)
        answer = self._reply_after(prompt, full)
        if not self.closes_reply:
            return prompt, answer.rstrip() + self.eos_token
        end = answer.find(self.eos_token)
        if end < 0:
            raise ValueError(f"the chat template did not end the reply with {self.eos_token!r}")
        return prompt, answer[: end + len(self.eos_token)]

    def encode(self, context: list[Message], reply: Message) -> dict[str, list[int]] | None:
        """None when truncation to max_length leaves no reply token to learn."""
        prompt, answer = self.render(context, reply)
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if self.closes_reply:
            answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        else:  # the appended eos by its id: a SentencePiece control token (ChatGLM3's </s>) is never read from text
            answer_ids = (self.tokenizer(answer[: -len(self.eos_token)], add_special_tokens=False)["input_ids"]
                          + [self.tokenizer.convert_tokens_to_ids(self.eos_token)])
        input_ids = (prompt_ids + answer_ids)[: self.max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            return None
        return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


@dataclass
class EncodedData:
    examples: list[dict[str, list[int]]]
    records: int
    skipped: int  # examples with no reply token left after truncation

    @property
    def tokens(self) -> int:
        return sum(len(e["input_ids"]) for e in self.examples)


def encode_files(paths: Iterable[Path | str], chat: ChatTokenizer, system_prompt: str | None = None,
                 max_samples: int | None = None) -> EncodedData:
    paths = [Path(p) for p in paths]
    examples: list[dict[str, list[int]]] = []
    records = skipped = 0
    for path in paths:
        for index, record in enumerate(read_records(path)):
            if max_samples is not None and records >= max_samples:
                break
            messages = record_to_messages(record, path, index, system_prompt)
            records += 1
            for context, reply in turns_to_examples(messages):
                try:
                    encoded = chat.encode(context, reply)
                except ValueError as exc:
                    raise DataError(path, index, str(exc)) from None
                if encoded is None:
                    skipped += 1
                else:
                    examples.append(encoded)
    if not examples:
        raise DataError(paths[0] if paths else "(no data)", None, "no trainable example")
    return EncodedData(examples, records, skipped)


SAMPLE_PAIRS = [
    ("你是谁？", "我是甄嬛，家父是大理寺少卿甄远道。"),
    ("小主，皇上今日翻了您的牌子。", "知道了，替我更衣吧。"),
    ("Hello! Who are you?", "I am a helpful assistant. How can I help you today?"),
    ("What is the answer?", "The answer is yes. Thank you."),
    ("写一个加法函数", "def add(a, b): return a + b"),
    ("嬛嬛，朕的心意你可明白？", "臣妾明白，皇上的心意臣妾一直记在心里。"),
]


def sample_records(count: int = 36) -> list[dict[str, Any]]:
    """A small synthetic data set mixing both formats (for smoke tests and the benchmark)."""
    out: list[dict[str, Any]] = []
    for i in range(count):
        question, answer = SAMPLE_PAIRS[i % len(SAMPLE_PAIRS)]
        if i % 3 == 2:
            follow_q, follow_a = SAMPLE_PAIRS[(i + 1) % len(SAMPLE_PAIRS)]
            out.append({"conversation": [
                {"role": "user", "content": question}, {"role": "assistant", "content": answer},
                {"role": "user", "content": follow_q}, {"role": "assistant", "content": follow_a}]})
        else:
            out.append({"instruction": question, "input": "" if i % 2 else "请回答。", "output": answer})
    return out


def write_sample_data(path: Path | str, count: int = 36) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = sample_records(count)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path
