"""`selfllm eval` end to end for one family (default qwen3), in the recipe images, on CPU with the tiny random model.

1. the eval image makes the tiny model (`selfllm smoke-model`) and scores it on the shipped question set
   (`selfllm eval run`, `--network none`): a random model answers nothing right;
2. the lora image trains an adapter (`selfllm start`) on those very questions — the prompts EvalScope sent, read
   back from its reviews, each answered "答案：<the right letter>" — so the adapter has something to show: this
   checks that base vs adapter sees what training changed; trained on the test questions it is no benchmark;
3. the eval image scores base and base + adapter side by side (`selfllm eval run --adapter`);
4. the fastapi image serves the tiny model and the eval image stress-tests it (`selfllm eval perf --url`) at
   concurrency 1/8/32: req/s, output tok/s, latency percentiles, TTFT, and perf.png (copied to --out).

Prints both tables and the figures; needs the three images built (`make matrix RECIPES="qwen3/eval qwen3/lora
qwen3/fastapi"`). Every container publishes on / reaches 127.0.0.1 only.

    .venv/bin/python benchmarks/eval_lora_vs_base.py [--family qwen3] [--steps 150] [--out reports/eval-demo]
"""
from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

WORK = "/root/autodl-tmp"
MODEL = f"{WORK}/models/tiny"
TRAIN_DATA = f"{WORK}/data/quiz-answers.json"
RUN_NAME = "quiz"


def docker(*args: str, capture: bool = True) -> str:
    done = subprocess.run(["docker", *args], text=True, capture_output=capture)
    if done.returncode != 0:
        sys.exit(f"docker {' '.join(args[:6])} … failed ({done.returncode}):\n{(done.stdout or '')[-3000:]}"
                 f"{(done.stderr or '')[-3000:]}")
    return done.stdout or ""


def run_in(image: str, work: Path, command: str, env: dict[str, str], network: str = "none") -> str:
    flags = [f"--network={network}", "-v", f"{work}:{WORK}"]
    for key, value in env.items():
        flags += ["-e", f"{key}={value}"]
    return docker("run", "--rm", *flags, image, "bash", "-c", command)


def result(output: str, action: str) -> dict:
    """The runtime's last `SELFLLM_RESULT {...}` line of this action."""
    for line in reversed(output.splitlines()):
        if line.startswith("SELFLLM_RESULT "):
            found = json.loads(line.removeprefix("SELFLLM_RESULT "))
            if found.get("action") == action:
                return found
    sys.exit(f"no SELFLLM_RESULT of {action!r} in:\n{output[-3000:]}")


def training_records(run_dir: Path) -> list[dict[str, str]]:
    """The prompts EvalScope sent (its reviews), each answered in the format its template asks for."""
    records = []
    for path in sorted((run_dir / "base" / "reviews").glob("*/*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            review = json.loads(line)
            prompt = next(m["content"] for m in review["messages"] if m["role"] == "user")
            target = review["target"]
            letters = target if isinstance(target, list) else [target]
            records.append({"instruction": prompt, "input": "", "output": f"答案：{''.join(letters)}"})
    if not records:
        sys.exit(f"no EvalScope reviews under {run_dir}/base/reviews")
    return records


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, container: str, timeout: float = 300) -> str:
    """The served model's name once /v1/models answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as response:
                return json.load(response)["data"][0]["id"]
        except OSError:
            time.sleep(2)
    logs = subprocess.run(["docker", "logs", "--tail", "40", container], text=True, capture_output=True)
    sys.exit(f"{container} did not answer on 127.0.0.1:{port} in {timeout:.0f} s:\n{logs.stdout}{logs.stderr}")


def scores_table(run: dict) -> str:
    runs = run["scores"]["runs"]
    lines = ["| subset | questions | " + " | ".join(runs) + " |", "|---|---|" + "---|" * len(runs)]
    for row in run["scores"]["rows"]:
        name = row["subset"] or row["dataset"]
        lines.append(f"| {name} | {row['questions']} | " + " | ".join(f"{row['scores'][r]:.2f}" for r in runs) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="qwen3")
    parser.add_argument("--steps", type=int, default=150, help="LoRA training steps on the question set")
    parser.add_argument("--learning-rate", default="3e-2")
    parser.add_argument("--parallel", default="1,8,32")
    parser.add_argument("--number", default="8,32,96", help="requests per perf round")
    parser.add_argument("--out", type=Path, default=Path("reports/eval-demo"), help="where perf.png and the tables go")
    args = parser.parse_args()
    images = {task: f"selfllm/{args.family}-{task}" for task in ("eval", "lora", "fastapi")}
    work = Path(tempfile.mkdtemp(prefix="selfllm-eval-demo-"))
    eval_env = {"MODEL_PATH": MODEL, "EVAL_MAX_TOKENS": "8", "ENABLE_THINKING": "0", "EVAL_BATCH_SIZE": "4"}
    started = time.monotonic()
    try:
        print(run_in(images["eval"], work, f"selfllm smoke-model {MODEL}", {}).strip().splitlines()[0])
        base = result(run_in(images["eval"], work, "selfllm eval run", eval_env), "run")
        records = training_records(work / Path(base["output_dir"]).relative_to(WORK))
        (work / "data").mkdir(exist_ok=True)
        (work / "data" / "quiz-answers.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        print(f"base: {base['scores']['rows'][-1]['scores']['base']:.2f} on {len(records)} questions in "
              f"{base['seconds']} s; training an adapter on them ({args.steps} steps)")
        train = result(run_in(images["lora"], work, "selfllm start", {
            "MODEL_PATH": MODEL, "DATA_PATH": TRAIN_DATA, "RUN_NAME": RUN_NAME, "SYSTEM_PROMPT": "",
            "MAX_STEPS": str(args.steps), "LEARNING_RATE": args.learning_rate, "BATCH_SIZE": "4", "GRAD_ACCUM": "1",
            "LOGGING_STEPS": "10", "SAVE_STEPS": str(args.steps), "REPORT_TO": "none"}), "train")
        print(f"trained: {json.dumps({k: train[k] for k in train if 'loss' in k or k == 'steps'})}")
        both = result(run_in(images["eval"], work, f"selfllm eval run --adapter {WORK}/lora/{RUN_NAME}", eval_env), "run")
        table = scores_table(both)
        print(f"\nselfllm eval run --adapter ({both['seconds']} s):\n{table}\n")

        port, name = free_port(), f"selfllm-eval-demo-{int(time.time())}"
        docker("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:6006", "-v", f"{work}:{WORK}",
               "-e", f"MODEL_PATH={MODEL}", images["fastapi"])
        try:
            served = wait_ready(port, name)
            perf = result(run_in(images["eval"], work, (
                f"selfllm eval perf --url http://127.0.0.1:{port}/v1/chat/completions --perf-model {served} "
                f"--parallel {args.parallel} --number {args.number}"), {"PERF_MAX_TOKENS": "32"}, network="host"),
                "perf")
        finally:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        args.out.mkdir(parents=True, exist_ok=True)
        perf_dir = work / Path(perf["output_dir"]).relative_to(WORK)
        shutil.copy(perf_dir / "perf.png", args.out / "perf.png")
        shutil.copy(perf_dir / "perf.md", args.out / "perf.md")
        (args.out / "scores.md").write_text(table + "\n", encoding="utf-8")
        print(f"selfllm eval perf against {images['fastapi']} (127.0.0.1:{port}, model {served}):\n"
              f"{(perf_dir / 'perf.md').read_text(encoding='utf-8')}\nplot: {args.out / 'perf.png'}")
        print(f"all in {time.monotonic() - started:.0f} s")
    finally:
        subprocess.run(["docker", "run", "--rm", "-v", f"{work}:/w", images["eval"], "rm", "-rf", "/w/eval", "/w/lora",
                        "/w/models", "/w/data"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
