"""Batching scheduler of one loaded model: requests that wait while a batch runs are generated
together in the next `model.generate` call (left padding), each row with its own stop handling,
token budget, streaming and cancellation.

- Rows share one call only when their sampling can: greedy rows together, sampled rows with the
  same temperature/top_p together. A seeded sampled request runs alone under a forked RNG, so it
  gives the same text alone or under load and never reseeds the generator other requests use.
- Rows with images (a processor's model inputs besides the token ids: pixel_values, token_type_ids...) share a
  call with rows whose inputs have the same names and per-image shapes: per-token inputs are left-padded like
  the ids, per-image ones concatenated in row order (the model fills each row's image tokens in that order).
  Measured on CPU: benchmarks/image_batching.py.
- The queue is bounded (`max_queue` waiting requests): past it `submit` raises `EngineBusy`.
- A cancelled job (client gone, stop string found) is dropped from the queue, or its row is
  finished at the next step; the rest of the batch goes on.

The worker thread is the only one that touches the model. Consumers read token ids from their
job's queue (see ChatEngine.stream).
"""
from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("selfllm.batching")
DONE = object()  # the last item of a job's queue


class EngineBusy(RuntimeError):
    """The request queue is full; the client should retry after `retry_after` seconds."""

    def __init__(self, depth: int, retry_after: int = 1):
        self.depth, self.retry_after = depth, retry_after
        super().__init__(f"the server is busy: {depth} requests are already waiting; retry in {retry_after} s")


SAMPLING_EPS = 1e-5  # a lower temperature is greedy, as in vLLM (logits / 1e-300 are inf: NaN probabilities)


@dataclass(eq=False)
class Job:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None
    streaming: bool = True  # hand out each token as it comes (else only DONE: read `tokens` then)
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # token ids, then DONE or an exception
    tokens: list[int] = field(default_factory=list)  # every token of the row (worker side)
    cancelled: threading.Event = field(default_factory=threading.Event)
    produced: int = 0  # tokens handed out (worker side)
    closed: bool = False  # the row takes no more tokens (worker side)
    inputs: dict[str, Any] = field(default_factory=dict)  # model inputs besides the ids (images' pixel_values...)

    def __post_init__(self) -> None:
        if self.temperature < SAMPLING_EPS:
            self.temperature = 0.0

    def per_token(self, value: Any) -> bool:
        """Whether a model input runs along the prompt's tokens (token_type_ids), not one entry per image."""
        return tuple(value.shape) == (1, len(self.prompt_ids))

    @property
    def media(self) -> tuple[Any, ...]:
        """What its extra inputs look like: rows share a call only with rows whose inputs stack with theirs."""
        return tuple(sorted((name, "token" if self.per_token(value) else tuple(value.shape[1:]), str(value.dtype))
                            for name, value in self.inputs.items()))

    @property
    def group(self) -> tuple[Any, ...]:
        """Jobs of one group can share a generate call."""
        if self.temperature <= 0:
            return ("greedy", self.media)
        if self.seed is not None:
            return ("seeded", id(self))
        return ("sample", self.temperature, self.top_p, self.media)

    def cancel(self) -> None:
        self.cancelled.set()


class SchedulerBase:
    """What every scheduler of ChatEngine has: the model it runs (replaceable until the first request),
    the stop tokens, and its bounds: `max_batch` rows at once, `max_queue` waiting requests."""

    kind = ""

    def __init__(self, model: Any, stop_token_ids: list[int], pad_token_id: int, *, max_batch: int = 16,
                 max_queue: int = 128):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        self.model, self.stop_token_ids, self.pad_token_id = model, stop_token_ids, pad_token_id
        self.max_batch, self.max_queue = max_batch, max_queue
        self.largest_batch = 0


class Scheduler(SchedulerBase):
    kind = "static"

    def input_dtype(self, value: Any) -> Any:
        """Floating inputs (pixel values) in the model's dtype (bf16 on a GPU); others as they are."""
        return getattr(self.model, "dtype", value.dtype) if value.is_floating_point() else value.dtype

    def __init__(self, model: Any, stop_token_ids: list[int], pad_token_id: int, **bounds: int):
        super().__init__(model, stop_token_ids, pad_token_id, **bounds)
        self.pending: deque[Job] = deque()
        self.cond = threading.Condition()
        self.worker: threading.Thread | None = None
        self.batches = 0  # generate calls made (for tests and logs)
        self.running = 0  # rows of the batch being generated now

    # ------------------------------------------------------------------ consumer side

    def waiting(self) -> int:
        with self.cond:
            return sum(not job.cancelled.is_set() for job in self.pending)

    def submit(self, job: Job) -> Job:
        with self.cond:
            depth = sum(not j.cancelled.is_set() for j in self.pending)
            if depth >= self.max_queue:
                raise EngineBusy(depth)
            self.pending.append(job)
            if self.worker is None:
                self.worker = threading.Thread(target=self._loop, name="selfllm-batching", daemon=True)
                self.worker.start()
            self.cond.notify()
        return job

    # ------------------------------------------------------------------ worker side

    def _next_batch(self) -> list[Job]:
        with self.cond:
            while not self.pending:
                self.cond.wait()
            first = self.pending.popleft()
            batch, rest = [first], deque()
            for job in self.pending:
                if job.cancelled.is_set():
                    job.out.put(DONE)
                elif len(batch) < self.max_batch and job.group == first.group:
                    batch.append(job)
                else:
                    rest.append(job)
            self.pending = rest
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            live = [job for job in batch if not job.cancelled.is_set()]
            for job in batch:
                if job not in live:
                    job.out.put(DONE)
            if not live:
                continue
            self.running = len(live)
            try:
                self._run(live)
            except Exception as exc:  # noqa: BLE001 - handed to every consumer of the batch
                log.exception("generation failed for a batch of %d", len(live))
                for job in live:
                    job.out.put(exc)
                continue
            finally:
                self.running = 0
            for job in live:
                job.out.put(DONE)

    def _run(self, batch: list[Job]) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        stops = set(self.stop_token_ids)
        width = max(len(job.prompt_ids) for job in batch)
        ids = [[self.pad_token_id] * (width - len(job.prompt_ids)) + job.prompt_ids for job in batch]
        mask = [[0] * (width - len(job.prompt_ids)) + [1] * len(job.prompt_ids) for job in batch]
        device = self.model.device

        class RowStreamer(BaseStreamer):
            """Hands each row's new token to its job; ignores rows that are closed."""

            def __init__(self) -> None:
                self.prompt_seen = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:  # generate's first call carries the prompts
                    self.prompt_seen = True
                    return
                for job, token in zip(batch, value.reshape(-1).tolist()):
                    if job.closed:
                        continue
                    job.tokens.append(token)
                    if job.streaming:
                        job.out.put(token)
                    job.produced += 1
                    if token in stops or job.produced >= job.max_new_tokens:
                        job.closed = True

            def end(self) -> None:
                pass

        class RowStops(StoppingCriteria):
            """Per row: finished when closed (stop token, own budget) or cancelled by its consumer."""

            def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:
                for job in batch:
                    if job.cancelled.is_set():
                        job.closed = True
                return torch.tensor([job.closed for job in batch], dtype=torch.bool, device=input_ids.device)

        first = batch[0]
        extra: dict[str, Any] = {}
        for name, value in first.inputs.items():  # one group: every row has the same names and shapes
            if first.per_token(value):
                extra[name] = torch.cat([torch.cat([value.new_zeros((1, width - len(job.prompt_ids))), job.inputs[name]],
                                                   dim=1) for job in batch]).to(device)
            else:
                extra[name] = torch.cat([job.inputs[name] for job in batch]).to(device, self.input_dtype(value))
        kwargs: dict[str, Any] = dict(**extra,
            input_ids=torch.tensor(ids, device=device), attention_mask=torch.tensor(mask, device=device),
            max_new_tokens=max(job.max_new_tokens for job in batch), eos_token_id=self.stop_token_ids,
            pad_token_id=self.pad_token_id, streamer=RowStreamer(), stopping_criteria=StoppingCriteriaList([RowStops()]),
        )
        if first.temperature > 0:
            kwargs.update(do_sample=True, temperature=first.temperature, top_p=first.top_p)
        else:
            kwargs.update(do_sample=False)
        with torch.inference_mode():
            if first.seed is not None and first.temperature > 0:
                devices = [device] if device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(first.seed)
                    self.model.generate(**kwargs)
            else:
                self.model.generate(**kwargs)
