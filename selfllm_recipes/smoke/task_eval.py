"""Smoke check of task `eval`: runs to completion in a container without any network (`--network none`), so
`EVAL_DATASETS=auto` must fall back to the shipped question set (EvalScope's general_mcq format) after one warning.

`selfllm start` (= `selfllm eval run`) serves the tiny random model in-process on 127.0.0.1 and runs EvalScope on it,
then on base + a LoRA adapter (a random one the check makes with peft on the family's LoRA targets: a tiny model
learns nothing in a few steps, and the lora kind's trainer is not in this image): both runs must score every shipped
question of each subset, side by side in one table. A random model answers ~nothing right, so the scores are only
checked to be in [0, 1]; the counts are what must be exact. `selfllm eval perf` then runs EvalScope's stress test
at three small concurrencies: every request succeeds, latencies and time to first token are non-negative and
ordered (p50 ≤ p99), throughput is positive. Both run in-process with EVAL_IN_PROCESS=1, which a family one card
can't hold needs (its recipes otherwise want EVAL_URL).

Then the EVAL_URL path, as a user points the eval container at the vllm / sglang recipe's server: the check starts
the in-process server of the tiny model in the background (the same OpenAI app, on a free port), and `selfllm eval
run --url` / `selfllm eval perf --url` evaluate it without loading a model themselves (the model name taken from its
/v1/models); an address where nothing answers must end in one line naming EVAL_URL, exit 2. perf.png of the last
perf (read back from the container) is a PNG of the plot's size."""
from __future__ import annotations

import base64
import io

from .checks import SMOKE_MODEL_DIR, SmokeCheck, expect, results

ADAPTER = "/root/autodl-tmp/eval/smoke-adapter"
SHIPPED_SUBSETS = {"general": 10, "zh": 10}  # runtime/selfllm_runtime/evaluation/data/selfllm_quiz/<subset>_val.jsonl
PARALLEL, NUMBER = [1, 2, 4], [2, 4, 8]
PLOT_SIZE = [1200, 450]  # evaluation/report.py PLOT_SIZE
# A random LoRA adapter on the family's targets (init_lora_weights=False: B is not zero, so it changes the model).
ADAPTER_CODE = "; ".join([
    "from pathlib import Path",
    "from peft import LoraConfig, get_peft_model",
    "from selfllm_runtime.context import load_context",
    "from selfllm_runtime.loading import model_class",
    "ctx = load_context()",
    f"d = Path('{SMOKE_MODEL_DIR}')",
    "lora = ctx.family.lora",
    "model = model_class(ctx, d).from_pretrained(d)",
    "config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, init_lora_weights=False, "
    "target_modules=lora.peft_target_modules(lora.target_modules))",
    f"get_peft_model(model, config).save_pretrained('{ADAPTER}')",
    f"print('adapter written to {ADAPTER}')",
])
PNG_STEP = ("python3 -c \"import base64, glob, json; path = sorted(glob.glob('/root/autodl-tmp/eval/perf-*/perf.png'))[-1]; "
            "print('SELFLLM_RESULT ' + json.dumps({'action': 'png', 'path': path, "
            "'png': base64.b64encode(open(path, 'rb').read()).decode()}))\"")
URL_FILE = "/tmp/selfllm-eval-url"
# The tiny model on the in-process server, left running in the background: the "deployment" EVAL_URL points at.
SERVE_CODE = "; ".join([
    "import time",
    "from pathlib import Path",
    "from selfllm_runtime.context import load_context",
    "from selfllm_runtime.settings import EvalSettings",
    "from selfllm_runtime.tasks.evaluation import serve",
    "ctx = load_context()",
    "settings = ctx.settings(EvalSettings)",
    # held in a name: a context manager left to the garbage collector closes its generator, which stops the server
    "running = serve(ctx, settings.model_path, settings)",
    "served = running.__enter__()",
    f"Path('{URL_FILE}').write_text(served.base_url)",
    "time.sleep(86400)",
])
URL_LIMIT, URL_PARALLEL, URL_NUMBER = 3, 2, 4
CLOSED_URL = "http://127.0.0.1:9/v1"  # nothing listens on the discard port
BAD_URL_STEP = (f"{{ selfllm eval run --url {CLOSED_URL} --datasets selfllm 2>/tmp/bad-url.err; echo $? >/tmp/bad-url.code; }}"
                " && python3 -c \"import json; print('SELFLLM_RESULT ' + json.dumps({'action': 'bad-url', "
                "'code': int(open('/tmp/bad-url.code').read()), 'stderr': open('/tmp/bad-url.err').read()}))\"")
COMMAND = " && ".join([
    f"selfllm smoke-model {SMOKE_MODEL_DIR}",
    f"python3 -c \"{ADAPTER_CODE}\"",
    f"EVAL_IN_PROCESS=1 ADAPTER_PATH={ADAPTER} selfllm start",
    "selfllm eval perf --in-process --parallel " + ",".join(map(str, PARALLEL)) + " --number " + ",".join(map(str, NUMBER)),
    f"{{ python3 -c \"{SERVE_CODE}\" >/tmp/eval-server.log 2>&1 & }}",
    f"for i in $(seq 300); do test -s {URL_FILE} && break; sleep 1; done",
    f"selfllm eval run --url \"$(cat {URL_FILE})\" --datasets selfllm --limit {URL_LIMIT}",
    f"selfllm eval perf --url \"$(cat {URL_FILE})\" --parallel {URL_PARALLEL} --number {URL_NUMBER}",
    BAD_URL_STEP,
    PNG_STEP,
])
ENV = {"EVAL_MAX_TOKENS": "16", "EVAL_BATCH_SIZE": "4", "PERF_MAX_TOKENS": "16"}


def verify_scores(run: dict) -> str:
    expect(run["datasets"] == ["general_mcq"] and run["offline_set"],
           f"without a network EVAL_DATASETS=auto must use the shipped set; got {run['datasets']}")
    expect(run["adapter"] == ADAPTER, f"the run did not take the adapter: {run['adapter']}")
    for name in ("base", "adapter"):
        rows = run["subsets"].get(name)
        expect(rows is not None, f"no {name} run in {sorted(run['subsets'])}")
        counts = {r["subset"]: r["num"] for r in rows}
        expect(counts == SHIPPED_SUBSETS, f"{name}: questions per subset {counts}, shipped {SHIPPED_SUBSETS}")
        expect(all(0.0 <= r["score"] <= 1.0 and r["metric"] for r in rows), f"{name}: scores out of [0, 1]: {rows}")
    table = run["scores"]
    expect(table["runs"] == ["base", "adapter"], f"the table's columns: {table['runs']}")
    subsets = [(r["subset"], r["questions"]) for r in table["rows"]]
    expect(subsets == [*SHIPPED_SUBSETS.items(), ("", sum(SHIPPED_SUBSETS.values()))],
           f"the table's rows (subsets, then OVERALL): {subsets}")
    overall = table["rows"][-1]["scores"]
    return (f"eval {sum(SHIPPED_SUBSETS.values())} shipped questions ({', '.join(SHIPPED_SUBSETS)}) offline in "
            f"{run['seconds']:.0f} s, base {overall['base']:.2f} vs adapter {overall['adapter']:.2f} (random model: "
            f"the counts are checked, not the score)")


def verify_rounds(perf: dict, parallel: list[int], number: list[int]) -> list[dict]:
    """Every round asked for ran, every request of it succeeded, and its figures are ordered."""
    points = perf["points"]
    expect([p["concurrency"] for p in points] == parallel and [p["requests"] for p in points] == number,
           f"perf rounds {[(p['concurrency'], p['requests']) for p in points]}, asked {list(zip(parallel, number))}")
    for p in points:
        where = f"concurrency {p['concurrency']}"
        expect(p["succeeded"] == p["requests"] and p["failed"] == 0, f"{where}: {p['failed']} requests failed")
        expect(p["output_throughput"] > 0 and p["request_throughput"] > 0, f"{where}: no throughput {p}")
        expect(min(p["avg_latency_s"], p["p50_latency_s"], p["avg_ttft_ms"], p["p50_ttft_ms"]) >= 0, f"{where}: {p}")
        expect(p["p50_latency_s"] <= p["p90_latency_s"] <= p["p99_latency_s"] and p["p50_ttft_ms"] <= p["p99_ttft_ms"],
               f"{where}: percentiles out of order {p}")
    return points


def verify_perf(perf: dict) -> str:
    points = verify_rounds(perf, PARALLEL, NUMBER)
    expect(perf["device"] is not None, "the in-process perf names no device")
    top = points[-1]
    return (f"perf at concurrency {'/'.join(map(str, PARALLEL))}: {points[0]['output_throughput']:.1f} → "
            f"{top['output_throughput']:.1f} output tok/s, p99 latency {top['p99_latency_s']:.2f} s, TTFT p50 "
            f"{top['p50_ttft_ms']:.0f} ms at {top['concurrency']}")


def verify_png(perf: dict, png: dict) -> str:
    from PIL import Image

    expect(perf["plot_size"] == PLOT_SIZE and png["path"] == perf["plot"], f"perf.png: {perf['plot_size']} {png['path']}")
    with Image.open(io.BytesIO(base64.b64decode(png["png"]))) as image:
        expect(image.format == "PNG" and list(image.size) == PLOT_SIZE, f"perf.png is {image.format} {image.size}")
        image.verify()
    return f"perf.png {PLOT_SIZE[0]}×{PLOT_SIZE[1]}"


def verify_url_path(run: dict, perf: dict, bad: dict) -> str:
    """`--url`: the run and the perf evaluated the background server (nothing loaded: no device), under the name its
    /v1/models lists; a closed address is one line naming EVAL_URL, exit 2."""
    url = run.get("url") or ""
    expect(url.startswith("http://127.0.0.1:") and url.endswith("/v1") and run["device"] is None and run["model_dir"] is None,
           f"the --url run did not evaluate the outside server alone: url={url!r} device={run['device']!r}")
    counts = {r["subset"]: r["num"] for r in run["subsets"]["base"]}
    expect(counts == {name: URL_LIMIT for name in SHIPPED_SUBSETS} and run["limit"] == URL_LIMIT,
           f"the --url run scored {counts}, asked {URL_LIMIT} per subset")
    expect(perf["url"] == url + "/chat/completions" and perf["device"] is None and perf["model"] == run["model"],
           f"the --url perf hit {perf['url']} as {perf['model']}, the run {url} as {run['model']}")
    points = verify_rounds(perf, [URL_PARALLEL], [URL_NUMBER])
    lines = [line for line in bad["stderr"].splitlines() if line.strip()]
    expect(bad["code"] == 2 and "Traceback" not in bad["stderr"] and lines and lines[-1].startswith(
        f"selfllm eval: error: EVAL_URL {CLOSED_URL}: no OpenAI-compatible server answers"),
           f"a closed EVAL_URL: exit {bad['code']}, stderr {bad['stderr'][-300:]!r}")
    return (f"--url {url} as {run['model']}: {sum(counts.values())} questions, perf {URL_NUMBER} requests at "
            f"{URL_PARALLEL} ({points[0]['output_throughput']:.1f} output tok/s), a closed EVAL_URL → exit 2 in one line")


def verify_eval(session) -> str:
    code = session.exit_code()
    found = results(session.logs())
    actions = [r["action"] for r in found]
    expect(code == 0, f"the container exited with code {code} after {actions or 'no result'}")
    expect(actions == ["run", "perf", "run", "perf", "bad-url", "png"],
           f"expected run, perf, then run, perf by --url, bad-url, png; got {actions}")
    run, perf, url_run, url_perf, bad, png = found
    return (f"{verify_scores(run)}; {verify_perf(perf)}; {verify_url_path(url_run, url_perf, bad)}; "
            f"{verify_png(url_perf, png)}")


CHECK = SmokeCheck(command=COMMAND, verify=verify_eval, serves_http=False, env=ENV, network="none")
