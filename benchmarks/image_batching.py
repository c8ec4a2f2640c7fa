"""Image requests batched together vs one at a time, on the tiny random Gemma-3 (Gemma3ForConditionalGeneration
with a tiny SigLIP tower; selfllm_runtime.smoke_model), in process, on CPU.

The same greedy requests (one generated PNG each, a different one per request) go to one ChatEngine from
`--clients` threads at once, with MAX_BATCH=1 (every request its own `generate` call) and with MAX_BATCH=N
(image rows stacked: pixel values concatenated, token_type_ids left-padded; batching.Scheduler). Prints
requests/s, p50 latency and the generate calls made, and checks each request's tokens are the same both ways.
A text-only run of the same prompts is the reference.

    .venv/bin/python benchmarks/image_batching.py [--requests 16] [--clients 16] [--max-tokens 16] [--rounds 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "runtime"), str(REPO)]


def images(count: int) -> list[Any]:
    from PIL import Image

    out = []
    for i in range(count):
        image = Image.new("RGB", (96, 64))
        image.putdata([((x * 3 + i * 40) % 256, (y * 4 + i * 17) % 256, (i * 60) % 256)
                       for y in range(64) for x in range(96)])
        out.append(image)
    return out


def run(engine: Any, requests: list[list[dict[str, Any]]], clients: int, max_tokens: int,
        max_batch: int) -> tuple[float, float, int, list[str]]:
    from selfllm_runtime.chat_engine import GenerationParams

    engine.scheduler.max_batch = max_batch
    before = engine.scheduler.batches

    def one(messages: list[dict[str, Any]]) -> tuple[float, str]:
        start = time.perf_counter()
        done = engine.generate(messages, GenerationParams(max_new_tokens=max_tokens, temperature=0))
        return time.perf_counter() - start, done.text

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, requests))
    elapsed = time.perf_counter() - start
    return (len(requests) / elapsed, statistics.median(r[0] for r in results), engine.scheduler.batches - before,
            [r[1] for r in results])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from selfllm_runtime.chat_engine import ChatEngine
    from selfllm_runtime.context import load_context
    from selfllm_runtime.loading import apply_torch_threads
    from selfllm_runtime.smoke_model import make_smoke_model

    context = load_context(REPO / "recipes" / "gemma3" / "fastapi")
    with tempfile.TemporaryDirectory() as folder:
        model_dir = make_smoke_model(context, Path(folder) / "model")
        engine = ChatEngine(context, model_dir)
        print(f"{type(engine.model).__name__}, {sum(p.numel() for p in engine.model.parameters())} parameters, "
              f"{apply_torch_threads('auto')}")
        pictures = images(args.requests)
        prompts = [f"Picture {i}: what is in it?" for i in range(args.requests)]
        with_images = [[{"role": "user", "content": [{"type": "image", "image": picture},
                                                     {"type": "text", "text": prompt}]}]
                       for picture, prompt in zip(pictures, prompts)]
        text_only = [[{"role": "user", "content": prompt}] for prompt in prompts]
        run(engine, with_images[:2], 2, 2, 2)  # warm-up
        for name, requests in (("images", with_images), ("text", text_only)):
            answers: dict[int, list[str]] = {}
            for max_batch in (1, args.clients):
                figures = [run(engine, requests, args.clients, args.max_tokens, max_batch) for _ in range(args.rounds)]
                best = max(figures, key=lambda f: f[0])
                answers[max_batch] = best[3]
                print(f"{name:6} MAX_BATCH={max_batch:<3} {best[0]:6.2f} requests/s  p50 {best[1]:.2f} s  "
                      f"{best[2]} generate calls for {len(requests)} requests")
            same = answers[1] == answers[args.clients]
            print(f"{name:6} batched answers equal one-at-a-time answers: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
