#!/usr/bin/env python3
"""The runtime's CUDA paths on a GPU machine, with tiny random models (no hub, no Docker):

- ChatEngine loads in bf16 with device_map="auto" and generates / streams / is seeded on the GPU;
- the fastapi task's legacy and OpenAI routes answer through FastAPI's TestClient;
- a random model of Qwen3-0.6B's shape: load time, generation tokens/s and peak memory in bf16.

    PYTHONPATH=runtime python benchmarks/gpu_check.py
Exits non-zero on the first failed check; prints one line per check and the figures.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "runtime")]

import torch  # noqa: E402

from selfllm_runtime.chat_engine import ChatEngine, GenerationParams  # noqa: E402
from selfllm_runtime.context import load_context  # noqa: E402
from selfllm_runtime.metadata import SmokeModelShape  # noqa: E402
from selfllm_runtime.settings import EngineSettings  # noqa: E402
from selfllm_runtime.smoke_model import make_smoke_model  # noqa: E402

QWEN3_06B = SmokeModelShape(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                            head_dim=128, intermediate_size=3072, vocab_size=1024)


def ok(name: str, detail: str = "") -> None:
    print(f"PASS {name}" + (f": {detail}" if detail else ""), flush=True)


def main() -> int:
    assert torch.cuda.is_available(), "no CUDA device"
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    import transformers

    print(f"transformers {transformers.__version__}", flush=True)
    context = load_context(ROOT / "recipes/qwen3/fastapi")
    work = Path(tempfile.mkdtemp())
    engine = ChatEngine(context, make_smoke_model(context, work / "tiny"))
    param = next(engine.model.parameters())
    assert engine.device == "cuda" and param.is_cuda and param.dtype == torch.bfloat16, (engine.device, param.dtype)
    placed = {str(p.device) for p in engine.model.parameters()}
    assert placed == {"cuda:0"}, placed  # device_map="auto" on one GPU: everything on it
    ok("load bf16 + device_map", f"{param.dtype}, parameters on {sorted(placed)}, "
       f"map {getattr(engine.model, 'hf_device_map', '(single device)')}")

    messages = [{"role": "user", "content": "你好"}]
    a = engine.generate(messages, GenerationParams(max_new_tokens=16, seed=7))
    b = engine.generate(messages, GenerationParams(max_new_tokens=16, seed=7))
    assert a.completion_tokens > 0 and a.text == b.text, (a, b)
    ok("generate + seed", f"{a.completion_tokens} tokens, same text for same seed")
    pieces = list(engine.stream(messages, GenerationParams(max_new_tokens=16, seed=7)))
    done = pieces[-1]
    streamed = "".join(t for k, t in pieces[:-1] if k == "content")
    assert done.completion_tokens > 0 and streamed.strip() == done.text.strip(), (streamed, done.text)
    ok("stream", f"{len(pieces) - 1} deltas match the final text")

    from fastapi.testclient import TestClient

    from selfllm_runtime.tasks.fastapi_server import create_app

    client = TestClient(create_app(engine))
    legacy = client.post("/", json={"prompt": "你好", "history": [], "max_length": 8}).json()
    assert legacy["status"] == 200 and isinstance(legacy["response"], str), legacy
    chat = client.post("/v1/chat/completions", json={"model": "Qwen/Qwen3-8B", "messages": messages, "max_tokens": 8})
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] > 0, chat.text
    with client.stream("POST", "/v1/chat/completions",
                       json={"model": "Qwen/Qwen3-8B", "messages": messages, "max_tokens": 8, "stream": True}) as s:
        lines = [ln for ln in s.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    ok("fastapi on GPU", f"legacy + /v1 + SSE ({len(lines)} events)")

    del engine, client
    torch.cuda.empty_cache()
    big_dir = work / "qwen3-0.6b-shape"
    shaped = context.family.model_copy(update={"smoke": QWEN3_06B})
    started = time.monotonic()
    make_smoke_model(type(context)(context.recipe_dir, context.recipe, context.family_dir, shaped), big_dir)
    created = time.monotonic() - started
    torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    big = ChatEngine(context, big_dir)
    loaded = time.monotonic() - started
    params = sum(p.numel() for p in big.model.parameters()) / 1e6
    big.generate(messages, GenerationParams(max_new_tokens=8, temperature=0))  # warm-up
    torch.cuda.synchronize()
    started = time.monotonic()
    out = big.generate(messages, GenerationParams(max_new_tokens=256, temperature=0))
    torch.cuda.synchronize()
    seconds = time.monotonic() - started
    peak = torch.cuda.max_memory_allocated() / 2**30
    ok("Qwen3-0.6B-shaped random model",
       f"{params:.0f} M params, created {created:.1f} s, loaded {loaded:.1f} s, "
       f"{out.completion_tokens / seconds:.1f} tokens/s greedy (batch 1, {out.completion_tokens} tokens), "
       f"peak {peak:.2f} GiB")
    del big
    torch.cuda.empty_cache()
    compare_batching(context, big_dir)
    return 0


def compare_batching(context, model_dir: Path, tokens: int = 128) -> None:
    """BATCHING=static vs continuous on the 0.6B-shaped model: tokens/s at 1, 8 and 32 concurrent
    greedy requests, and how many answers agree between the two (bf16: paged vs sdpa attention may
    break near-ties differently). The figures decide BATCHING=auto's choice on GPU."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = [[{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}] for i in range(32)]
    params = GenerationParams(max_new_tokens=tokens, temperature=0, template_kwargs={"enable_thinking": False})
    answers: dict[str, list[str]] = {}
    for kind in ("static", "continuous"):
        engine = ChatEngine(context, model_dir, context.settings(EngineSettings, cli={"batching": kind}))
        engine.generate(prompts[0], params)  # warm-up
        figures = []
        for clients in (1, 8, 32):
            torch.cuda.synchronize()
            started = time.monotonic()
            with ThreadPoolExecutor(clients) as pool:
                done = list(pool.map(lambda m: engine.generate(m, params), prompts[:clients]))
            seconds = time.monotonic() - started
            figures.append(f"{clients}: {sum(c.completion_tokens for c in done) / seconds:.0f} tok/s")
            answers[kind] = [c.text for c in done]
        ok(f"BATCHING={kind}", ", ".join(figures))
        if engine.scheduler.kind == "continuous":
            engine.scheduler.manager.stop(block=True, timeout=30)
        del engine
        torch.cuda.empty_cache()
    same = sum(a == b for a, b in zip(answers["static"], answers["continuous"]))
    print(f"greedy answers equal across backends: {same}/{len(answers['static'])}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
