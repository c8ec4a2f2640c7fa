"""Task `eval`: ModelScope's EvalScope against the recipe's model, served in this process by the fastapi task's
OpenAI-compatible server (tasks/fastapi_server.py) on 127.0.0.1 and a free port, as upstream's tutorials point
`evalscope eval --eval-type service` / `evalscope perf` at a served model.

  selfllm start                          = selfllm eval run with settings from the environment
  selfllm eval run [--datasets iquiz] [--adapter DIR] [--limit N]
        benchmarks: iquiz (upstream's IQ/EQ questions) when ModelScope answers, else (`--network none`) the shipped
        question set (EvalScope's general_mcq format); with an adapter the base and base + adapter side by side
  selfllm eval perf [--parallel 1,8,32] [--number 8,32,96] [--url URL --perf-model NAME]
        EvalScope's stress test of the served model (or any OpenAI URL): throughput, latency percentiles, time to
        first token per concurrency, and perf.png (throughput and latency against concurrency)
  selfllm eval sample-data OUT_DIR       write the shipped question set (general_mcq: <subset>_val.jsonl)

Reports go to $OUTPUT_DIR/<run|perf>-<time>/ (EvalScope's own outputs below it); each action ends with one line
`SELFLLM_RESULT {json}`. Settings (settings.EvalSettings) are checked before the model is fetched.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import shutil
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..context import RecipeContext, load_context
from ..evaluation.report import (SHIPPED_NAME, SHIPPED_SET, ReportError, SubsetScore, comparison, perf_markdown,
                                 perf_points, plot_perf, shipped_subsets, subset_scores)
from ..model_source import (DEFAULT_ENDPOINTS, ModelNotFound, model_request, one_line, resolve_model,
                            served_names)
from ..settings import EvalSettings, FastapiSettings, ModelSource, add_flags

log = logging.getLogger("selfllm.eval")
RESULT_PREFIX = "SELFLLM_RESULT "  # the one JSON line each action prints (smoke checks read it)
AUTO = "auto"
HUB_DATASET = "iquiz"  # upstream's benchmark (AI-ModelScope/IQuiz on ModelScope)
SHIPPED_BENCHMARK = "general_mcq"  # EvalScope's custom multiple-choice format, the shipped set's
STARTUP_TIMEOUT_S = 120


def emit_result(action: str, **fields: Any) -> dict[str, Any]:
    result = {"action": action, **fields}
    print(RESULT_PREFIX + json.dumps(result, ensure_ascii=False, default=str), flush=True)
    return result


def _fail(exc: Exception) -> SystemExit:
    print(f"selfllm eval: error: {exc}", file=sys.stderr, flush=True)
    return SystemExit(2)


# ----------------------------------------------------------------------------- the served model

@dataclass
class Served:
    """The model answering on base_url (…/v1) under `name`; `engine` is None for an outside PERF_URL."""

    base_url: str
    name: str
    engine: Any = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_settings(settings: EvalSettings) -> FastapiSettings:
    """The fastapi task's settings of the in-process server: the engine's and served name's from EVAL's, bound to
    127.0.0.1 (a free port; no API key: nothing outside the container reaches it)."""
    shared = {name: getattr(settings, name) for name in FastapiSettings.model_fields if name in EvalSettings.model_fields}
    return FastapiSettings.model_validate({**shared, "host": "127.0.0.1", "api_key": ""})


@contextmanager
def serve(context: RecipeContext, model_dir: Path, settings: EvalSettings) -> Iterator[Served]:
    """The fastapi task's OpenAI-compatible app on 127.0.0.1:<free port>, in a thread of this process, for as long
    as the block runs. The engine is shared: replacing engine.model (an adapter) changes what answers."""
    import uvicorn

    from ..chat_engine import ChatEngine
    from .fastapi_server import create_app

    served = server_settings(settings)
    engine = ChatEngine(context, model_dir, settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, served), host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="selfllm-eval-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the in-process server did not start on 127.0.0.1:{port}")
        time.sleep(0.05)
    name = served_names(context.recipe, context.family, served, served.served_model_name)[0]
    log.info("serving %s on http://127.0.0.1:%d/v1 for EvalScope", name, port)
    try:
        yield Served(f"http://127.0.0.1:{port}/v1", name, engine)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def add_adapter(engine: Any, adapter_dir: Path) -> None:
    """Base + LoRA adapter from here on (peft wraps the loaded model; the scheduler runs the wrapper)."""
    from peft import PeftModel

    engine.model = PeftModel.from_pretrained(engine.model, str(adapter_dir)).eval()
    log.info("adapter %s loaded on the served model", adapter_dir)


def check_adapter(settings: EvalSettings) -> None:
    adapter = settings.adapter_path
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise ValueError(f"ADAPTER_PATH {adapter}: no adapter_config.json there (a LoRA adapter folder, as the lora "
                         "recipe writes it)")


# ----------------------------------------------------------------------------- benchmarks

def hub_reachable(settings: EvalSettings, timeout: float = 5.0) -> bool:
    """Whether ModelScope (MODELSCOPE_ENDPOINT, else its default address) answers at all."""
    url = settings.modelscope_endpoint or DEFAULT_ENDPOINTS[ModelSource.modelscope]
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # it answered
    except (OSError, ValueError) as exc:
        log.warning("ModelScope (%s) unreachable (%s): using the shipped question set", url, one_line(exc, 120))
        return False


def benchmarks(settings: EvalSettings, hub: bool | None = None) -> tuple[list[str], dict[str, Any]]:
    """EvalScope's `datasets` and `dataset_args` for EVAL_DATASETS (auto: iquiz if the hub answers, else the
    shipped set) and EVAL_DATASET_ARGS (merged over the shipped set's arguments)."""
    names: list[str] = []
    for name in settings.datasets:
        if name == AUTO:
            name = HUB_DATASET if (hub_reachable(settings) if hub is None else hub) else SHIPPED_NAME
        name = SHIPPED_BENCHMARK if name == SHIPPED_NAME else name
        if name not in names:
            names.append(name)
    args: dict[str, Any] = {}
    if SHIPPED_BENCHMARK in names:
        args[SHIPPED_BENCHMARK] = {"local_path": str(SHIPPED_SET), "subset_list": shipped_subsets()}
    for name, extra in (json.loads(settings.dataset_args) if settings.dataset_args else {}).items():
        args[name] = {**args.get(name, {}), **extra}
    return names, args


def check_benchmarks(names: list[str]) -> None:
    """Every name must be one of EvalScope's benchmarks (before the model loads)."""
    from evalscope.api.registry import BENCHMARK_REGISTRY

    unknown = [n for n in names if n not in BENCHMARK_REGISTRY]
    if unknown:
        raise ValueError(f"EVAL_DATASETS: {', '.join(unknown)} is no EvalScope benchmark (e.g. iquiz, ceval, gsm8k, "
                         f"general_mcq; `selfllm` for the shipped set)")


def generation_config(context: RecipeContext, settings: EvalSettings, max_tokens: int) -> dict[str, Any]:
    config: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0.0, "retries": 1, "retry_interval": 1}
    if settings.enable_thinking is not None and context.family.thinking is not None:
        config["extra_body"] = {"chat_template_kwargs": {context.family.thinking.template_kwarg: settings.enable_thinking}}
    return config


def evaluate(context: RecipeContext, settings: EvalSettings, served: Served, names: list[str],
             dataset_args: dict[str, Any], work_dir: Path) -> list[SubsetScore]:
    """One EvalScope run of the benchmarks against the served model; its subsets' scores."""
    from evalscope import TaskConfig, run_task

    config = TaskConfig(model=served.name, api_url=served.base_url, api_key="EMPTY", eval_type="openai_api",
                        datasets=names, dataset_args=dataset_args, eval_batch_size=settings.eval_batch_size,
                        limit=settings.limit, generation_config=generation_config(context, settings, settings.max_tokens),
                        work_dir=str(work_dir), no_timestamp=True, seed=42)
    reports = run_task(config)
    rows: list[SubsetScore] = []
    for name in names:
        report = reports.get(name)
        if report is None:
            raise ReportError(f"EvalScope returned no report of {name} (see {work_dir}/logs)")
        rows += subset_scores(report.to_dict())
    return rows


def run_dir(settings: EvalSettings, kind: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = settings.output_root / f"{kind}-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    return out


def run(context: RecipeContext, model_dir: Path, settings: EvalSettings) -> None:
    """`selfllm start` / `selfllm eval run`: the benchmarks on the base, then on base + adapter (ADAPTER_PATH)."""
    try:
        names, dataset_args = benchmarks(settings)
        check_benchmarks(names)
        check_adapter(settings)
        out = run_dir(settings, "run")
        started = time.monotonic()
        runs: dict[str, list[SubsetScore]] = {}
        with serve(context, model_dir, settings) as served:
            runs["base"] = evaluate(context, settings, served, names, dataset_args, out / "base")
            if settings.adapter_path is not None:
                add_adapter(served.engine, settings.adapter_path)
                runs["adapter"] = evaluate(context, settings, served, names, dataset_args, out / "adapter")
    except (ReportError, ValueError) as exc:
        raise _fail(exc) from None
    table = comparison(runs)
    (out / "scores.md").write_text(table.markdown() + "\n", encoding="utf-8")
    (out / "scores.json").write_text(json.dumps(table.as_dict(), ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"\nEvalScope {', '.join(names)} — {served.name}" + (f" + {settings.adapter_path}" if
                                                                settings.adapter_path else "") + f"\n{table.markdown()}\n",
          flush=True)
    emit_result("run", model=served.name, model_dir=str(model_dir), device=served.engine.device,
                adapter=str(settings.adapter_path) if settings.adapter_path else None, datasets=names,
                offline_set=SHIPPED_BENCHMARK in names, limit=settings.limit, seconds=round(time.monotonic() - started, 1),
                output_dir=str(out), scores=table.as_dict(),
                subsets={run: [{"dataset": r.dataset, "subset": r.subset, "metric": r.metric, "num": r.num,
                                "score": r.score} for r in rows] for run, rows in runs.items()})


# ----------------------------------------------------------------------------- perf

def perf_prompts(path: Path) -> Path:
    """The shipped questions as `evalscope perf`'s line_by_line prompts (no hub: its default dataset downloads)."""
    lines = [json.loads(line)["question"] for file in sorted(SHIPPED_SET.glob("*_val.jsonl"))
             for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_rounds(folder: Path, keys: list[str]) -> dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Each round's benchmark_summary.json and benchmark_percentile.json, as EvalScope wrote them."""
    rounds = {}
    for key in keys:
        summary, percentiles = folder / key / "benchmark_summary.json", folder / key / "benchmark_percentile.json"
        if not summary.is_file() or not percentiles.is_file():
            raise ReportError(f"perf round {key}: EvalScope wrote no {summary.name} / {percentiles.name} in {folder / key}"
                              " (every request failed? see benchmark.log)")
        rounds[key] = (json.loads(summary.read_text(encoding="utf-8")), json.loads(percentiles.read_text(encoding="utf-8")))
    return rounds


def stress(settings: EvalSettings, served: Served, out: Path, tokenizer: Path | None) -> dict[str, Any]:
    from evalscope.perf.main import run_perf_benchmark

    rounds = settings.rounds()
    args = {"model": served.name, "url": served.base_url + "/chat/completions", "api": "openai", "stream": True,
            "parallel": [p for p, _ in rounds], "number": [n for _, n in rounds], "max_tokens": settings.perf_max_tokens,
            "dataset": "line_by_line", "dataset_path": str(perf_prompts(out / "prompts.txt")),
            "outputs_dir": str(out), "name": "evalscope", "no_timestamp": True, "sleep_interval": 1, "seed": 42,
            "temperature": 0.0}
    if settings.perf_api_key:
        args["api_key"] = settings.perf_api_key
    if tokenizer is not None:
        args["tokenizer_path"] = str(tokenizer)
    results = run_perf_benchmark(args)
    points = perf_points(read_rounds(out / "evalscope", list(results)))
    width, height = plot_perf(points, out / "perf.png", title=f"{served.name}: EvalScope perf")
    (out / "perf.md").write_text(perf_markdown(points) + "\n", encoding="utf-8")
    (out / "perf.json").write_text(json.dumps([p.as_dict() for p in points], indent=1), encoding="utf-8")
    print(f"\nEvalScope perf — {served.name} ({served.base_url})\n{perf_markdown(points)}\nplot: {out / 'perf.png'}\n",
          flush=True)
    return {"url": served.base_url + "/chat/completions", "points": [p.as_dict() for p in points],
            "plot": str(out / "perf.png"), "plot_size": [width, height], "output_dir": str(out)}


def perf(context: RecipeContext, settings: EvalSettings) -> None:
    """`selfllm eval perf`: PERF_URL's model, else this recipe's (base, or base + ADAPTER_PATH) served here."""
    try:
        check_adapter(settings)
        if settings.perf_url:
            url = settings.perf_url.rstrip("/").removesuffix("/chat/completions")
            out = run_dir(settings, "perf")
            result = stress(settings, Served(url, settings.perf_model or served_names(
                context.recipe, context.family, settings, settings.served_model_name)[0]), out, None)
            emit_result("perf", model=settings.perf_model, device=None, adapter=None, **result)
            return
        model_dir = resolve_model(model_request(context.recipe, settings))
        out = run_dir(settings, "perf")
        with serve(context, model_dir, settings) as served:
            if settings.adapter_path is not None:
                add_adapter(served.engine, settings.adapter_path)
            result = stress(settings, served, out, model_dir)
        emit_result("perf", model=served.name, device=served.engine.device,
                    adapter=str(settings.adapter_path) if settings.adapter_path else None, **result)
    except (ReportError, ValueError) as exc:
        raise _fail(exc) from None


# ----------------------------------------------------------------------------- command

def before_download(context: RecipeContext, settings: EvalSettings) -> None:
    """`selfllm start`, before the model is fetched: the benchmark names and the adapter must be usable."""
    try:
        check_adapter(settings)
        check_benchmarks(benchmarks(settings, hub=True)[0])
    except ValueError as exc:
        raise _fail(exc) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfllm eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", help="recipe folder (default: $RECIPE_DIR or /opt/recipe)")
    sub = parser.add_subparsers(dest="action", required=True)
    for action, text in (("run", "EvalScope benchmarks on the served model (base, and base + adapter)"),
                         ("perf", "EvalScope's stress test at a few concurrencies, with perf.png")):
        add_flags(sub.add_parser(action, help=text), EvalSettings)
    p = sub.add_parser("sample-data", help="write the shipped question set (EvalScope general_mcq format)")
    p.add_argument("out", type=Path)
    return parser


def main(argv: list[str] | None = None, recipe: str | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.action == "sample-data":
            shutil.copytree(SHIPPED_SET, args.out, dirs_exist_ok=True)
            print(args.out)
            return 0
        context = load_context(args.recipe or recipe)
        settings = context.settings(EvalSettings, cli=vars(args))
        if args.action == "perf":
            perf(context, settings)
            return 0
        before_download(context, settings)
        run(context, resolve_model(model_request(context.recipe, settings)), settings)
    except (ValueError, ModelNotFound) as exc:
        print(f"selfllm eval: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0
