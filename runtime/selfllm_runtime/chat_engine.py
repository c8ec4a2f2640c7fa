"""One loaded chat model, shared by every task kind: prompt formatting through the family's chat
template, generation (whole or streamed), stop strings, reasoning split, token counts.

Generations on one model are serialized by a lock: concurrent requests queue instead of
interleaving on shared model state.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .context import RecipeContext
from .metadata import Reasoning

log = logging.getLogger("selfllm.chat")
Message = dict[str, str]


@dataclass
class GenerationParams:
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.8
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Completion:
    text: str  # the answer, reasoning removed
    reasoning: str | None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"

    @property
    def raw(self) -> str:
        return self.text if self.reasoning is None else f"<think>\n{self.reasoning}\n</think>\n\n{self.text}"


def split_reasoning(text: str, markers: Reasoning | None, opened: bool = False) -> tuple[str | None, str]:
    """('reasoning', 'answer') from '<think>…</think>answer', or from 'reasoning</think>answer' when the
    prompt already opened the block (`opened`, R1-style templates); (None, text) otherwise."""
    if markers is None:
        return None, text.strip()
    body = text.lstrip()
    if not opened:
        if not body.startswith(markers.start):
            return None, text.strip()
        body = body[len(markers.start):]
    if markers.end not in body:  # cut off while thinking
        return body.strip(), ""
    reasoning, answer = body.split(markers.end, 1)
    return reasoning.strip(), answer.strip()


class ReasoningStream:
    """Splits streamed text deltas into ('reasoning' | 'content', text) pieces."""

    def __init__(self, markers: Reasoning | None, opened: bool = False):
        self.markers = markers
        self.state = ("reasoning" if opened else "start") if markers else "content"
        self.buffer = ""

    def feed(self, delta: str, final: bool = False) -> list[tuple[str, str]]:
        if self.markers is None:
            return [("content", delta)] if delta else []
        self.buffer += delta
        out: list[tuple[str, str]] = []
        while True:
            if self.state == "start":
                stripped = self.buffer.lstrip()
                if stripped.startswith(self.markers.start):
                    self.buffer, self.state = stripped[len(self.markers.start):].lstrip("\n"), "reasoning"
                    continue
                if not final and self.markers.start.startswith(stripped):
                    return out  # may still become the start marker
                self.state = "content"
                self.buffer = self.buffer.lstrip("\n") if stripped else self.buffer
            if self.state == "reasoning":
                if self.markers.end in self.buffer:
                    head, self.buffer = self.buffer.split(self.markers.end, 1)
                    if head.strip():
                        out.append(("reasoning", head.rstrip("\n")))
                    self.buffer, self.state = self.buffer.lstrip("\n"), "content"
                    continue
                keep = 0 if final else len(self.markers.end) - 1
                emit, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
                if emit:
                    out.append(("reasoning", emit))
                return out
            if self.buffer:
                out.append(("content", self.buffer))
                self.buffer = ""
            return out


def pick_device() -> tuple[str, Any]:
    import torch

    if torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported()
        return "cuda", torch.bfloat16 if bf16 else torch.float16
    return "cpu", torch.float32


class ChatEngine:
    def __init__(self, context: RecipeContext, model_dir: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.context = context
        self.family = context.family
        self.model_dir = Path(model_dir)
        self.device, dtype = pick_device()
        trust = self.family.trust_remote_code
        log.info("loading %s on %s (%s)", self.model_dir, self.device, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, trust_remote_code=trust)
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=dtype, trust_remote_code=trust,
            device_map="auto" if self.device == "cuda" else None,
        )
        self.model.eval()
        self.torch = torch
        self.lock = threading.Lock()
        self.stop_token_ids = self._stop_token_ids()

    @property
    def model_name(self) -> str:
        return self.model_dir.name

    def _stop_token_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        vocab = self.tokenizer.get_vocab()  # a stop token the checkpoint lacks is skipped, not mapped to unk
        ids |= {vocab[token] for token in self.family.stop_tokens if token in vocab}
        return sorted(i for i in ids if i is not None)

    def format_prompt(self, messages: list[Message], template_kwargs: dict[str, Any] | None = None) -> str:
        kwargs = self.context.template_kwargs(**(template_kwargs or {}))
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)

    def opens_reasoning(self, prompt: str) -> bool:
        """Whether the chat template already opened the reasoning block in the prompt."""
        markers = self.family.reasoning
        return markers is not None and prompt.rstrip().endswith(markers.start)

    def _generate_kwargs(self, messages: list[Message], params: GenerationParams) -> tuple[dict[str, Any], bool]:
        """(model.generate kwargs, whether the prompt opened the reasoning block)."""
        prompt = self.format_prompt(messages, params.template_kwargs)
        inputs = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(self.model.device)
        kwargs: dict[str, Any] = dict(
            **inputs,
            max_new_tokens=params.max_new_tokens,
            eos_token_id=self.stop_token_ids,
            pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_token_ids[0],
        )
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
        else:
            kwargs.update(do_sample=False)
        if params.stop:
            kwargs.update(stop_strings=params.stop, tokenizer=self.tokenizer)
        return kwargs, self.opens_reasoning(prompt)

    def _seed(self, params: GenerationParams) -> None:
        if params.seed is not None:
            self.torch.manual_seed(params.seed)

    @staticmethod
    def _cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
        cuts = [text.index(s) for s in stop if s and s in text]
        return (text[: min(cuts)], True) if cuts else (text, False)

    @staticmethod
    def _stop_prefix_len(text: str, stop: list[str]) -> int:
        """Length of the longest tail of text that may still grow into a stop string."""
        return max((n for s in stop for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
                   default=0)

    def _finish(self, raw: str, prompt_tokens: int, new_ids: list[int], params: GenerationParams,
                opened: bool) -> Completion:
        text, stopped = self._cut_at_stop(raw, params.stop)
        hit_eos = bool(new_ids) and new_ids[-1] in self.stop_token_ids
        finish = "stop" if stopped or hit_eos or len(new_ids) < params.max_new_tokens else "length"
        reasoning, answer = split_reasoning(text, self.family.reasoning, opened)
        return Completion(answer, reasoning, prompt_tokens, len(new_ids), finish)

    def generate(self, messages: list[Message], params: GenerationParams) -> Completion:
        kwargs, opened = self._generate_kwargs(messages, params)
        prompt_tokens = kwargs["input_ids"].shape[1]
        with self.lock, self.torch.inference_mode():
            self._seed(params)
            output = self.model.generate(**kwargs)
        new_ids = output[0][prompt_tokens:].tolist()
        raw = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        return self._finish(raw, prompt_tokens, new_ids, params, opened)

    def stream(self, messages: list[Message], params: GenerationParams) -> Iterator[tuple[str, str] | Completion]:
        """Yields ('reasoning' | 'content', delta) pieces, then one Completion with the totals."""
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        kwargs, opened = self._generate_kwargs(messages, params)
        prompt_tokens = kwargs["input_ids"].shape[1]
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        result: dict[str, Any] = {}
        abandoned = threading.Event()  # set when the consumer stops early (client gone): free the model
        torch = self.torch

        class _Abandoned(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:
                return torch.full((input_ids.shape[0],), abandoned.is_set(), dtype=torch.bool, device=input_ids.device)

        kwargs["stopping_criteria"] = StoppingCriteriaList([_Abandoned()])

        def run() -> None:
            try:
                with self.lock, self.torch.inference_mode():
                    self._seed(params)
                    result["output"] = self.model.generate(**kwargs, streamer=streamer)
            except Exception as exc:  # noqa: BLE001 - re-raised in the consumer
                result["error"] = exc
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        splitter = ReasoningStream(self.family.reasoning, opened)
        emitted, sent, stopped, finished = "", 0, False, False
        try:
            for delta in streamer:
                emitted += delta
                cut, stopped = self._cut_at_stop(emitted, params.stop)
                # hold text back while it could be the start of a stop string
                safe = len(cut) if stopped else len(cut) - self._stop_prefix_len(cut, params.stop)
                if safe > sent:
                    yield from splitter.feed(cut[sent:safe])
                    sent = safe
                if stopped:
                    abandoned.set()
                    break
            if not stopped:
                yield from splitter.feed(self._cut_at_stop(emitted, params.stop)[0][sent:])
            yield from splitter.feed("", final=True)
            finished = True
        finally:
            if not finished:
                abandoned.set()
        worker.join()
        if "error" in result:
            raise result["error"]
        new_ids = result["output"][0][prompt_tokens:].tolist()
        raw = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        yield self._finish(raw, prompt_tokens, new_ids, params, opened)
