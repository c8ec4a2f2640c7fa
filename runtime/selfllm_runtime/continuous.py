"""Continuous batching: transformers' own manager (paged attention; `model.init_continuous_batching`)
behind the interface of batching.Scheduler, chosen with BATCHING=continuous (see ChatEngine).

A request joins the running batch at the next step instead of waiting for the batch to finish, and
its KV cache lives in pages, not in a padded rectangle. That is meant to pay on a GPU with long,
uneven answers; on CPU it served ~0.6x the requests/s of batching.Scheduler with the tiny model
(benchmarks/fastapi_throughput.py --batching static continuous; GPU: benchmarks/gpu_check.py).

Sampling is per request (the manager's per-request temperature/top-k/top-p processors): a greedy
request is top_k=1, which keeps only the most likely token, so it is exact. A seeded request is
refused (`SeedUnsupported`): all rows draw from one generator, so a seed could not be kept exact.

One dispatcher thread routes the manager's outputs to their jobs and cancels the jobs whose
consumer went away; the manager's own thread is the only one that runs the model.
"""
from __future__ import annotations

import itertools
import logging
import threading
from typing import Any

from .batching import DONE, EngineBusy, Job, SchedulerBase

log = logging.getLogger("selfllm.continuous")


class ContinuousUnsupported(ValueError):
    """A request continuous batching can't serve: the client's 400, naming its field (`param`)."""

    param = ""


class SeedUnsupported(ContinuousUnsupported):
    """A seeded sampled request while continuous batching is on."""

    param = "seed"

    def __init__(self) -> None:
        super().__init__("`seed` needs BATCHING=static: with continuous batching every row samples from one "
                         "generator, so a seeded answer could not be reproduced")


class ImagesUnsupported(ContinuousUnsupported):
    """Images or videos while continuous batching is on: its manager takes token ids only, no pixel values."""

    param = "messages"

    def __init__(self) -> None:
        super().__init__("image and video input need BATCHING=static: transformers' continuous batching takes "
                         "token ids only, not pixel values")


def unpaged_layer_types(config: Any) -> list[str]:
    """The layer types of a model config (its text config: a vision-language model's language model) that
    transformers' continuous batching has no paged cache for (Qwen3.5's Gated-DeltaNet `linear_attention`);
    empty where it pages them all (full and sliding attention)."""
    from transformers.generation.continuous_batching.cache import ATTN_TYPE_TO_ALLOCATOR

    layer_types = getattr(config.get_text_config(), "layer_types", None) or []
    return sorted({kind for kind in layer_types if kind not in ATTN_TYPE_TO_ALLOCATOR})


def check_continuous(config: Any) -> None:
    """ValueError naming BATCHING where transformers' continuous batching can't run the model (before it loads:
    otherwise the first request fails with transformers' "Invalid layer type")."""
    unpaged = unpaged_layer_types(config)
    if unpaged:
        raise ValueError(f"BATCHING=continuous: transformers' continuous batching keeps a paged KV cache of full and "
                         f"sliding attention layers only; {type(config).__name__} has {', '.join(unpaged)} layers: "
                         "use BATCHING=static (or auto)")


class ContinuousScheduler(SchedulerBase):
    kind = "continuous"

    def __init__(self, model: Any, stop_token_ids: list[int], pad_token_id: int, **bounds: int):
        super().__init__(model, stop_token_ids, pad_token_id, **bounds)
        self.jobs: dict[str, Job] = {}  # in flight: running in the manager or waiting in its queue
        self.lock = threading.Lock()
        self.ids = itertools.count()
        self.manager: Any = None
        self.dispatcher: threading.Thread | None = None

    # ------------------------------------------------------------------ consumer side

    @property
    def running(self) -> int:
        with self.lock:
            return min(len(self.jobs), self.max_batch)

    def waiting(self) -> int:
        with self.lock:
            return self._waiting()

    def _waiting(self) -> int:
        live = sum(not job.cancelled.is_set() for job in self.jobs.values())
        return max(0, live - self.max_batch)

    def submit(self, job: Job) -> Job:
        if job.seed is not None and job.temperature > 0:
            raise SeedUnsupported()
        if job.inputs:
            raise ImagesUnsupported()
        with self.lock:
            depth = self._waiting()
            if depth >= self.max_queue:
                raise EngineBusy(depth)
            self._start()
            request_id = f"selfllm-{next(self.ids)}"
            self.jobs[request_id] = job
            self.largest_batch = max(self.largest_batch, min(len(self.jobs), self.max_batch))
        sampling = ({"top_k": 1, "temperature": 1.0, "top_p": 1.0} if job.temperature <= 0 else
                    {"temperature": float(job.temperature), "top_p": float(job.top_p)})
        self.manager.add_request(job.prompt_ids, request_id=request_id, max_new_tokens=job.max_new_tokens,
                                 streaming=job.streaming, eos_token_id=self.stop_token_ids, **sampling)
        return job

    # ------------------------------------------------------------------ manager side

    def _start(self) -> None:
        """The manager and the dispatcher, at the first request (the model may be replaced before it)."""
        if self.manager is not None:
            return
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        checkpoint = getattr(self.model, "generation_config", None)
        # Every processor must exist for per-request values to apply: temperature != 1, top_p < 1 and
        # top_k set make the manager build all three; each request then brings its own values.
        generation = GenerationConfig(
            do_sample=True, temperature=0.5, top_p=0.9, top_k=getattr(checkpoint, "top_k", None) or 50,
            max_new_tokens=512, eos_token_id=self.stop_token_ids, pad_token_id=self.pad_token_id,
        )
        cpu = getattr(self.model, "device", None) is not None and self.model.device.type == "cpu"
        # On a GPU the manager sizes its KV pages from free memory; on CPU that would claim most of the
        # RAM (and took ~30 s): there, give every row 16 pages of 256 tokens.
        sizing = {"num_blocks": self.max_batch * 16, "max_batch_tokens": 2048} if cpu else {}
        config = ContinuousBatchingConfig(max_requests_per_batch=self.max_batch, per_request_processors=True,
                                          max_queue_size=self.max_queue + self.max_batch, **sizing)
        self.manager = self.model.init_continuous_batching(generation_config=generation,
                                                           continuous_batching_config=config)
        started = threading.Event()
        self.dispatcher = threading.Thread(target=self._dispatch, args=(started,), name="selfllm-continuous",
                                           daemon=True)
        self.dispatcher.start()
        started.wait()

    def _dispatch(self, started: threading.Event) -> None:
        # Started from this daemon thread, the manager's generation thread is a daemon too (threads
        # inherit it): a server that exits is not kept alive by an idle generation loop.
        self.manager.start()
        started.set()
        while True:
            self._drop_cancelled()
            result = self.manager.get_result(timeout=0.05)
            if result is None:
                failure = self.manager.background_thread_status.fatal_error
                if failure is not None:
                    self._fail_all(RuntimeError(f"continuous batching stopped: {failure}"))
                    return
                continue
            with self.lock:
                job = self.jobs.get(result.request_id)
            if job is None:
                continue  # cancelled meanwhile
            for token in result.generated_tokens[len(job.tokens):]:
                job.tokens.append(token)
                if job.streaming:
                    job.out.put(token)
            if result.is_finished():
                with self.lock:
                    self.jobs.pop(result.request_id, None)
                job.out.put(RuntimeError(f"generation failed: {result.error}") if result.error else DONE)

    def _drop_cancelled(self) -> None:
        with self.lock:
            gone = [request_id for request_id, job in self.jobs.items() if job.cancelled.is_set()]
            jobs = [self.jobs.pop(request_id) for request_id in gone]
        for request_id, job in zip(gone, jobs):
            self.manager.cancel_request(request_id)
            job.out.put(DONE)

    def _fail_all(self, exc: Exception) -> None:
        log.error("%s", exc)
        with self.lock:
            jobs, self.jobs = list(self.jobs.values()), {}
            self.manager = None
        for job in jobs:
            job.out.put(exc)
