"""Throughput of task `fastapi`'s /v1/chat/completions next to upstream's tutorial handler, on CPU.

Both servers run the tiny random Qwen3 (selfllm_runtime.smoke_model) in their own process, one
after the other, on 127.0.0.1; client threads in this process send the same greedy requests.

- `selfllm`: tasks/fastapi_server.py (ChatEngine + tasks/openai_api.py), POST /v1/chat/completions;
- `tutorial`: written the way upstream's self-llm tutorial does it (model loaded once at start,
  an `async def` handler calling `model.generate` per request, no streaming) — see BASELINE below.

Prints requests/s and p50/p95 latency at 1, 8 and 32 concurrent clients (and the selfllm/tutorial
ratio: the batching scheduler's gain), and the streaming
time-to-first-token of /v1/chat/completions, and /health's latency with 64 streamed requests in flight
(what Docker's health check waits for; tests only demand `selfllm health`'s timeout). Request counts are bounded (under 2 minutes on 2 cores).

    .venv/bin/python benchmarks/fastapi_throughput.py [--max-tokens 32] [--requests 8] [--rounds 2] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "qwen3" / "fastapi"

# ---------------------------------------------------------------------------- the baseline server
# Upstream's tutorial (self-llm, "Qwen3-8B FastApi 部署调用"), trimmed to what matters for speed:
# load once, then an async handler that runs tokenizer + model.generate inline for each request.
BASELINE = '''
import datetime, json, sys
import torch, uvicorn
from fastapi import FastAPI, Request
from transformers import AutoModelForCausalLM, AutoTokenizer

app = FastAPI()

@app.post("/")
async def create_item(request: Request):
    global model, tokenizer
    json_post_list = json.loads(json.dumps(await request.json()))
    prompt = json_post_list.get("prompt")
    max_length = json_post_list.get("max_length", 512)
    messages = [{"role": "user", "content": prompt}]
    input_ids = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    model_inputs = tokenizer([input_ids], return_tensors="pt").to(model.device)
    generated_ids = model.generate(model_inputs.input_ids, max_new_tokens=max_length, do_sample=False)
    generated_ids = [out[len(inp):] for inp, out in zip(model_inputs.input_ids, generated_ids)]
    response = tokenizer.batch_decode(generated_ids, skip_special_tokens=True)[0]
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    return {"response": response, "status": 200, "time": now}

@app.get("/health")
def health():
    return {"status": "ok"}

if __name__ == "__main__":
    model_dir, port = sys.argv[1], int(sys.argv[2])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    uvicorn.run(app, host="127.0.0.1", port=port, workers=1, log_level="warning")
'''

SELFLLM = '''
import sys
from pathlib import Path
import uvicorn
from selfllm_runtime.chat_engine import ChatEngine
from selfllm_runtime.context import load_context
from selfllm_runtime.tasks.fastapi_server import create_app

recipe, model_dir, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
app = create_app(ChatEngine(load_context(recipe), Path(model_dir)))
uvicorn.run(app, host="127.0.0.1", port=port, workers=1, log_level="warning")
'''


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(code: str, args: list[str], port: int, workdir: Path, threads: int,
          extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    import httpx

    script = workdir / f"server_{port}.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "runtime"), os.environ.get("PYTHONPATH", "")]),
           **(extra_env or {})}
    env.pop("API_KEY", None)
    # one intra-op thread: a 64-wide model gains nothing from more, and on a shared 2-core box
    # OpenMP barriers of 2 threads make each step 5-10x slower and the figures noisy
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen([sys.executable, str(script), *args, str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not become healthy")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def load(send, n_requests: int, concurrency: int) -> dict[str, float]:
    """send(i) -> None, timed; n_requests spread over `concurrency` client threads."""
    def timed(i: int) -> float:
        t0 = time.perf_counter()
        send(i)
        return time.perf_counter() - t0

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(timed, range(n_requests)))
    wall = time.perf_counter() - started
    return {"rps": n_requests / wall, "p50": percentile(latencies, 0.5) * 1000,
            "p95": percentile(latencies, 0.95) * 1000}


def health_under_load(url: str, prompts: list[str], max_tokens: int, clients: int = 64,
                      probes: int = 10) -> list[float]:
    """/health latencies (ms, a new connection each, as Docker's check makes) while `clients` streamed requests
    are in flight: MAX_BATCH of them generating, the rest in the engine's queue."""
    import httpx

    from selfllm_runtime.cli import HEALTH_TIMEOUT_S

    def stream(i: int) -> None:
        body = {"messages": [{"role": "user", "content": prompts[i % len(prompts)]}], "max_tokens": max_tokens,
                "temperature": 1.0, "seed": i, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as answer:
            for _ in answer.iter_lines():
                pass

    latencies: list[float] = []
    with ThreadPoolExecutor(clients) as pool:
        streams = [pool.submit(stream, i) for i in range(clients)]
        time.sleep(1.0)  # every request sent
        while len(latencies) < probes and not all(s.done() for s in streams):
            t0 = time.perf_counter()
            httpx.get(url + "/health", timeout=HEALTH_TIMEOUT_S).raise_for_status()
            latencies.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.1)
        for s in streams:
            s.result()
    return latencies


def main() -> int:
    import httpx

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=8, help="requests with 1 client (n clients get 2n)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of each server")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per setting; the best is shown")
    parser.add_argument("--batching", nargs="+", default=["static"], choices=["static", "continuous"],
                        help="ChatEngine batching backends to compare (one server each, env BATCHING)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "runtime"))

    def send_selfllm(url: str):
        def send(i: int) -> None:
            body = {"messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                    "max_tokens": args.max_tokens, "temperature": 0}
            http.post(url + "/v1/chat/completions", json=body).raise_for_status()
        return send

    from selfllm_runtime.context import load_context
    from selfllm_runtime.smoke_model import make_smoke_model

    workdir = Path(tempfile.mkdtemp(prefix="selfllm-bench-"))
    model_dir = make_smoke_model(load_context(RECIPE), workdir / "tiny")
    prompts = [f"Please answer question number {i}: what is {i} + {i}?" for i in range(64)]
    http = httpx.Client(timeout=300, limits=httpx.Limits(max_connections=32))
    results: dict[str, dict[str, dict[str, float]]] = {}
    started = time.perf_counter()

    procs: list[subprocess.Popen] = []
    ttft: list[float] = []
    try:
        servers = {}
        for batching in args.batching:
            port = free_port()
            procs.append(start(SELFLLM, [str(RECIPE), str(model_dir)], port, workdir, args.threads,
                               {"BATCHING": batching}))
            servers[f"selfllm /v1 BATCHING={batching}"] = send_selfllm(f"http://127.0.0.1:{port}")
        port_b = free_port()
        procs.append(start(BASELINE, [str(model_dir)], port_b, workdir, args.threads))
        base_s, base_b = f"http://127.0.0.1:{procs[0].args[-1]}", f"http://127.0.0.1:{port_b}"

        def send_tutorial(i: int) -> None:
            body = {"prompt": prompts[i % len(prompts)], "max_length": args.max_tokens}
            http.post(base_b + "/", json=body).raise_for_status()

        servers["tutorial POST / (baseline)"] = send_tutorial
        for send in servers.values():
            for _ in range(2):
                send(0)  # warm-up
        # the two servers take turns (best of `rounds`), so load from other processes hits both alike
        for clients in args.clients:
            for _ in range(args.rounds):
                for name, send in servers.items():
                    run = load(send, max(args.requests, 2 * clients), clients)
                    best = results.setdefault(name, {}).get(f"c={clients}")
                    if best is None or run["rps"] > best["rps"]:
                        results[name][f"c={clients}"] = run
        for i in range(8):
            body = {"messages": [{"role": "user", "content": prompts[i]}], "max_tokens": args.max_tokens,
                    "temperature": 0, "stream": True}
            t0 = time.perf_counter()
            with http.stream("POST", base_s + "/v1/chat/completions", json=body) as answer:
                first = None
                for line in answer.iter_lines():
                    if first is None and line.startswith("data: {"):
                        delta = json.loads(line[6:])["choices"][0]["delta"]
                        if delta.get("content") or delta.get("reasoning_content"):
                            first = time.perf_counter() - t0
            ttft.append((first if first is not None else time.perf_counter() - t0) * 1000)
        health = health_under_load(base_s, prompts, 4 * args.max_tokens)
    finally:
        for proc in procs:
            stop(proc)
    http.close()

    print(f"tiny random Qwen3 on CPU ({os.cpu_count()} cores, {args.threads} torch thread(s) per server), "
          f"max_tokens={args.max_tokens}, greedy, best of {args.rounds} alternating rounds")
    print(f"{'server':32} {'clients':>7} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8}")
    for name, levels in results.items():
        for level, r in levels.items():
            print(f"{name:32} {level[2:]:>7} {r['rps']:7.2f} {r['p50']:8.1f} {r['p95']:8.1f}")
    *ours, baseline = list(results)
    for name in ours:
        for level in results[name]:
            ratio = results[name][level]["rps"] / results[baseline][level]["rps"]
            print(f"{name} / tutorial at {level[2:]} client(s): {ratio:.1f}x req/s")
    # the first *text* chunk: TextIteratorStreamer releases text at word boundaries, so on the tiny
    # model's random tokens this includes a few decode steps; the role chunk comes at once
    print(f"streaming time to first text chunk ({next(iter(results))}, 1 client, {len(ttft)} requests): "
          f"p50 {statistics.median(ttft):.1f} ms, max {max(ttft):.1f} ms")
    print(f"/health with 64 streamed requests in flight ({next(iter(results))}): " + (
        f"p50 {statistics.median(health):.1f} ms, max {max(health):.1f} ms ({len(health)} probes)" if health
        else "the requests finished before the first probe"))
    print(f"total benchmark time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
