"""One loaded chat model, shared by every task kind: prompt formatting through the chat template CHAT_TEMPLATE
picks (chat_template.py: by default the checkpoint's own, the family's copy where it ships none; the family's
system-role policy on top), generation (whole or streamed), stop strings, reasoning split, token counts.

Concurrent requests are batched by one scheduler thread (batching.py), the only one that touches
the model; each request reads its own tokens back, so answers never interleave.
"""
from __future__ import annotations

import functools
import gc
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .batching import DONE, Job, Scheduler
from .chat_template import use_chat_template
from .context import RecipeContext
from .continuous import ContinuousScheduler, check_continuous
from .loading import apply_torch_threads, load_causal_lm
from .metadata import ModelFamily, Reasoning
from .model_source import checkpoint_name
from .settings import EngineSettings, SettingsError
from .system_role import render_chat
from .tool_calls import template_inputs

log = logging.getLogger("selfllm.chat")
Message = dict[str, Any]  # {"role", "content"}, and OpenAI's "tool_calls" / "tool_call_id" where given
# A message with images (or videos) has a list content: {"type": "text", "text"}, {"type": "image", "image": PIL
# image} and {"type": "video", "video": media.Video} parts in order (what a vision family's chat template loops
# over); every other message has a string.


def message_media(messages: list[Message], kind: str = "image") -> list[Any]:
    """The images (or videos) of a conversation, in the order its chat template places them."""
    return [part[kind] for message in messages if isinstance(message.get("content"), list)
            for part in message["content"] if isinstance(part, dict) and part.get("type") == kind]


class PromptImagesError(ValueError):
    """The processor could not match the request's images (or videos) to the rendered prompt (the chat template
    left one out); the text says so."""


@dataclass
class EncodedPrompt:
    """A rendered prompt as the model reads it: its token ids (image placeholders expanded to the image's
    tokens) and the model inputs besides them (a processor's pixel_values, token_type_ids...; empty for text)."""

    text: str
    ids: list[int]
    inputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class GenerationParams:
    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.8
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] | None = None  # OpenAI function tools shown to the model (its template's way)


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


def hidden_special_ids(tokenizer: Any, markers: Reasoning | None) -> frozenset[int] | None:
    """The special token ids decoding drops when a reasoning marker is made of special tokens (they are kept);
    None where no marker is (decode then skips every special token, as usual)."""
    if markers is None:
        return None
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    kept = {i for marker in (markers.start, markers.end)
            for i in tokenizer(marker, add_special_tokens=False)["input_ids"] if i in special}
    return frozenset(special - kept) if kept else None


def end_of_turn(tokenizer: Any, family: ModelFamily) -> str:
    """The token that ends a reply: the family's eos where the checkpoint has it, else the checkpoint's own
    (its tokenizer's eos). A checkpoint of another lineage mounted as MODEL_PATH (SmolLM2: Llama's architecture,
    ChatML, <|im_end|>, served by a llama3.1 recipe) ends its turns with its own token, not Llama's <|eot_id|>."""
    eos = family.special_tokens.eos
    if eos in tokenizer.get_vocab() or not tokenizer.eos_token:
        return eos
    return str(tokenizer.eos_token)


def stop_token_ids(tokenizer: Any, family: ModelFamily, generation_config: Any = None) -> list[int]:
    """Where generation stops: the checkpoint's own end tokens (its tokenizer's eos and its generation_config's
    eos_token_id, one id or a list, as transformers and vLLM read them) and the family's stop tokens that the
    checkpoint has (one it lacks is skipped, not mapped to unk)."""
    vocab = tokenizer.get_vocab()
    configured = getattr(generation_config, "eos_token_id", None)
    ids = {tokenizer.eos_token_id, *(configured if isinstance(configured, (list, tuple)) else [configured])}
    ids |= {vocab[token] for token in (end_of_turn(tokenizer, family), *family.stop_tokens) if token in vocab}
    return sorted(i for i in ids if isinstance(i, int))


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
                keep = 0 if final else len(self.markers.end) - 1  # the end marker may be arriving
                cut = max(0, len(self.buffer) - keep)  # (a buffer shorter than the marker is all kept)
                emit, self.buffer = self.buffer[:cut], self.buffer[cut:]
                if emit:
                    out.append(("reasoning", emit))
                return out
            if self.buffer:
                out.append(("content", self.buffer))
                self.buffer = ""
            return out


class RequestStream(Iterator[Any]):
    """The pieces of one queued request; close() cancels it even before the first piece was read
    (closing a generator that never started runs none of its code)."""

    def __init__(self, job: Job, pieces: Iterator[Any]):
        self.job, self.pieces = job, pieces

    def __next__(self) -> Any:
        return next(self.pieces)

    def close(self) -> None:
        self.job.cancel()
        close = getattr(self.pieces, "close", None)
        if close is not None:
            close()


class ChatEngine:
    """One loaded model. Generation goes through a batching scheduler (batching.py): concurrent
    requests are generated together, each with its own stop handling and stream.

    settings: QUANTIZATION, GPUS, MAX_BATCH, MAX_QUEUE, BATCHING, CHAT_TEMPLATE and TORCH_THREADS
    (settings.EngineSettings; default: resolved from the environment and the recipe; in code,
    `context.settings(EngineSettings, cli={"max_batch": 1})`). The start line names the model, the device,
    the torch threads and the chat template in use.

    BATCHING=auto is static on CPU and on GPU: on CPU static served 1.6x the requests/s of continuous
    at 1 and 32 clients (benchmarks/fastapi_throughput.py --batching static continuous, tiny model); on
    GPU it has not been measured by this project yet (benchmarks/gpu_check.py prints the comparison)."""

    def __init__(self, context: RecipeContext, model_dir: Path, settings: EngineSettings | None = None):
        import torch
        from transformers import AutoTokenizer

        engine = context.settings(EngineSettings) if settings is None else settings
        kind = engine.batching_kind  # a bad setting fails before the model loads
        self.context = context
        self.family = context.family
        self.model_dir = Path(model_dir)
        if kind == "continuous":  # a model it can't page fails here, before the weights load
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(self.model_dir, trust_remote_code=self.family.trust_remote_code)
            try:
                check_continuous(config)
            except ValueError as exc:
                raise SettingsError(str(exc)) from None
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, trust_remote_code=self.family.trust_remote_code)
        self.chat_template = use_chat_template(self.tokenizer, context, self.model_dir, engine.chat_template)
        self.threads = apply_torch_threads(engine.torch_threads)
        self.loaded = load_causal_lm(context, self.model_dir, engine.quantization, gpus=engine.gpu_indices())
        self.device, self.quantization = self.loaded.device, self.loaded.quantization
        self.model = self.loaded.model
        self.model.eval()
        self.processor = self._load_processor()
        self.torch = torch
        self.stop_token_ids = self._stop_token_ids()
        self._hidden_ids = hidden_special_ids(self.tokenizer, self.family.reasoning)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_token_ids[0]
        scheduler_class = ContinuousScheduler if kind == "continuous" else Scheduler
        self.scheduler = scheduler_class(self.model, self.stop_token_ids, pad,
                                         max_batch=engine.max_batch, max_queue=engine.max_queue)
        log.info("selfllm: %s on %s, %s; chat template: %s; batching: %s, up to %d rows, %d waiting",
                 self.model_name, self.device, self.threads, self.chat_template.describe(), self.scheduler.kind,
                 self.scheduler.max_batch, self.scheduler.max_queue)
        # The model and the libraries behind it live as long as the process: move them out of the
        # garbage collector's reach, so a full collection under load costs milliseconds instead of a
        # ~0.3 s pause of every thread (measured: /health stalled so with 64 requests queued).
        gc.collect()
        gc.freeze()

    def _load_processor(self) -> Any:
        """The checkpoint's processor (AutoProcessor) where the family takes images (model.yaml modalities) and the
        loaded model has a vision tower (not Gemma-3 1b's text-only class); None otherwise."""
        modalities = self.family.modalities
        config = getattr(self.model, "config", None)
        if not modalities.takes("image") or getattr(config, "vision_config", None) is None:
            return None
        from transformers import AutoProcessor

        try:
            processor = AutoProcessor.from_pretrained(self.model_dir, trust_remote_code=self.family.trust_remote_code)
        except (ImportError, OSError) as exc:  # no torchvision (a text task's environment), no preprocessor_config
            log.warning("image input off: %s can't be loaded here (%s)", modalities.processor,
                        str(exc).splitlines()[0][:200])
            return None
        log.info("image input: %s (%s)", type(processor).__name__, modalities.processor)
        return processor

    @property
    def takes_images(self) -> bool:
        return self.processor is not None

    @property
    def takes_videos(self) -> bool:
        """The family takes video (model.yaml modalities) and the loaded processor has a video processor."""
        return (self.family.modalities.takes("video") and
                getattr(self.processor, "video_processor", None) is not None)

    def reads(self, kind: str) -> bool:
        """Whether the loaded model reads this kind of media ("image" or "video")."""
        return self.takes_images if kind == "image" else self.takes_videos

    @property
    def model(self) -> Any:
        return self._model

    @model.setter
    def model(self, value: Any) -> None:
        """Replacing the model (e.g. by a PeftModel with an adapter) replaces the one the scheduler runs."""
        self._model = value
        if getattr(self, "scheduler", None) is not None:
            self.scheduler.model = value

    @property
    def model_name(self) -> str:
        """The checkpoint's name (not a hub cache's snapshot folder name)."""
        return checkpoint_name(self.model_dir)

    def sampling_defaults(self) -> tuple[float, float]:
        """(temperature, top_p) of the checkpoint's generation_config.json, as vLLM's OpenAI server
        uses them; 1.0 where it gives none. Every route and task starts from these."""
        gen = getattr(self.model, "generation_config", None)
        return float(getattr(gen, "temperature", None) or 1.0), float(getattr(gen, "top_p", None) or 1.0)

    def params(self, **given: Any) -> GenerationParams:
        """GenerationParams with the checkpoint's sampling defaults where temperature/top_p are None."""
        temperature, top_p = self.sampling_defaults()
        if given.get("temperature") is None:
            given["temperature"] = temperature
        if given.get("top_p") is None:
            given["top_p"] = top_p
        return GenerationParams(**given)

    def decode(self, ids: list[int]) -> str:
        """Generated text without special tokens, except those a reasoning marker is made of (gpt-oss's harmony
        `<|channel|>analysis<|message|>`), which split_reasoning needs to see."""
        if self._hidden_ids is None:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode([i for i in ids if i not in self._hidden_ids], skip_special_tokens=False)

    def _stop_token_ids(self) -> list[int]:
        return stop_token_ids(self.tokenizer, self.family, getattr(self.model, "generation_config", None))

    def format_prompt(self, messages: list[Message], template_kwargs: dict[str, Any] | None = None,
                      tools: list[dict[str, Any]] | None = None) -> str:
        """The prompt, rendered with the chat template in use (self.chat_template); messages with tool calls /
        tool results and the tools are first put in the shape the family's template reads
        (tool_calls.template_inputs), then rendered under the family's system-role policy (system_role.render_chat)."""
        kwargs = self.context.template_kwargs(**(template_kwargs or {}))
        messages, tool_kwargs = template_inputs(messages, tools, self.family.tool_calls)
        return render_chat(self.tokenizer, messages, self.family.system_role, add_generation_prompt=True,
                           **kwargs, **tool_kwargs)

    def encode(self, messages: list[Message], template_kwargs: dict[str, Any] | None = None,
               tools: list[dict[str, Any]] | None = None) -> EncodedPrompt:
        """The prompt of messages as the model reads it: rendered (format_prompt), then tokenized; with images,
        through the family's processor, which expands each image's placeholder to its tokens and makes the
        pixel values. ValueError for images where the loaded model takes none."""
        text = self.format_prompt(messages, template_kwargs, tools)
        images, videos = message_media(messages, "image"), message_media(messages, "video")
        if not images and not videos:
            return EncodedPrompt(text, self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if self.processor is None or (videos and not self.takes_videos):
            raise ValueError(f"the loaded {type(self.model).__name__} reads no {'videos' if videos else 'images'}")
        media: dict[str, Any] = {"images": images} if images else {}
        if videos:  # frames sampled already (media.decode_video), with where they came from
            media.update(videos=[video.frames for video in videos], do_sample_frames=False,
                         video_metadata=[video.metadata() for video in videos])
        try:
            encoded = self.processor(text=text, **media, add_special_tokens=False, return_tensors="pt")
        except ValueError as exc:  # e.g. "Prompt contained 1 image tokens but received 2 images"
            raise PromptImagesError(f"the chat template placed the images or videos where the model can't read them "
                                    f"all ({exc}); they go in user messages") from None
        ids = encoded["input_ids"][0].tolist()
        inputs = {key: value for key, value in encoded.items() if key not in ("input_ids", "attention_mask")}
        return EncodedPrompt(text, ids, inputs)

    def opens_reasoning(self, prompt: str) -> bool:
        """Whether the chat template already opened the reasoning block in the prompt."""
        markers = self.family.reasoning
        return markers is not None and prompt.rstrip().endswith(markers.start)

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

    def _submit(self, messages: list[Message], params: GenerationParams, streaming: bool) -> tuple[Job, int, bool]:
        """(queued job, prompt tokens, whether the prompt opened the reasoning block); EngineBusy when full."""
        prompt = self.encode(messages, params.template_kwargs, params.tools)
        job = Job(prompt.ids, params.max_new_tokens, params.temperature, params.top_p, params.seed, streaming=streaming,
                  inputs=prompt.inputs)
        return self.scheduler.submit(job), len(prompt.ids), self.opens_reasoning(prompt.text)

    def generate(self, messages: list[Message], params: GenerationParams) -> Completion:
        return self.submit(messages, params)()

    def submit(self, messages: list[Message], params: GenerationParams) -> Callable[[], Completion]:
        """Queue the request now (EngineBusy when the queue is full); the returned call waits for the whole
        answer. A server queues on a short-lived thread and waits on one of its own (tasks/openai_api.py)."""
        if params.stop:  # stop strings are found token by token, as in a stream
            pieces = self.stream(messages, params)
            return lambda: next(piece for piece in pieces if isinstance(piece, Completion))
        job, prompt_tokens, opened = self._submit(messages, params, streaming=False)
        return functools.partial(self._wait, job, prompt_tokens, opened, params)

    def _wait(self, job: Job, prompt_tokens: int, opened: bool, params: GenerationParams) -> Completion:
        try:
            item = job.out.get()  # only DONE or an exception: the tokens are in job.tokens
        finally:
            job.cancel()  # no-op once done; frees the row if this thread is interrupted
        if isinstance(item, Exception):
            raise item
        raw = self.decode(job.tokens)
        return self._finish(raw, prompt_tokens, list(job.tokens), params, opened)

    def stream(self, messages: list[Message], params: GenerationParams) -> Iterator[tuple[str, str] | Completion]:
        """Queue the request now (EngineBusy when the queue is full), then iterate: ('reasoning' |
        'content', delta) pieces, and one Completion with the totals last. Closing the iterator early
        (client gone) cancels the request."""
        job, prompt_tokens, opened = self._submit(messages, params, streaming=True)
        return RequestStream(job, self._consume(job, params, prompt_tokens, opened))

    def _consume(self, job: Job, params: GenerationParams, prompt_tokens: int,
                 opened: bool) -> Iterator[tuple[str, str] | Completion]:
        splitter = ReasoningStream(self.family.reasoning, opened)
        new_ids: list[int] = []
        emitted, sent, stopped, finished = "", 0, False, False
        try:
            while True:
                item = job.out.get()
                if item is DONE:
                    break
                if isinstance(item, Exception):
                    raise item
                new_ids.append(item)
                text = self.decode(new_ids)
                if text.endswith("\ufffd"):
                    continue  # the middle of a multi-byte character
                emitted = text
                cut, stopped = self._cut_at_stop(emitted, params.stop)
                # hold text back while it could be the start of a stop string
                safe = len(cut) if stopped else len(cut) - self._stop_prefix_len(cut, params.stop)
                if safe > sent:
                    yield from splitter.feed(cut[sent:safe])
                    sent = safe
                if stopped:
                    job.cancel()
                    break
            emitted = self.decode(new_ids)
            if not stopped:
                yield from splitter.feed(self._cut_at_stop(emitted, params.stop)[0][sent:])
            yield from splitter.feed("", final=True)
            finished = True
        finally:
            if not finished:
                job.cancel()
        yield self._finish(emitted, prompt_tokens, new_ids, params, opened)

