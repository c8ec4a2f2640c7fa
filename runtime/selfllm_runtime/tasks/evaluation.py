"""Task `eval`: ModelScope's EvalScope against the recipe's model, served in this process by the fastapi task's
OpenAI-compatible server (tasks/fastapi_server.py) on 127.0.0.1 and a free port, or against a deployment already
running elsewhere (EVAL_URL: the family's vllm / sglang recipe), as upstream's tutorials point
`evalscope eval --eval-type service` / `evalscope perf` at a served model. This task module builds on another's code
(the fastapi task's app and engine): the eval image carries both, as the runtime's import closure finds them.

  selfllm start                          = selfllm eval run with settings from the environment
  selfllm eval run [--datasets iquiz] [--adapter DIR] [--limit N] [--url URL [--served-model NAME]]
        benchmarks: iquiz (upstream's IQ/EQ questions) when ModelScope answers, else (`--network none`) the shipped
        question set (EvalScope's general_mcq format); with an adapter the base and base + adapter side by side
  selfllm eval perf [--parallel 1,8,32] [--number 8,32,96] [--url URL [--served-model NAME]]
        EvalScope's stress test of the served model (or any OpenAI URL): throughput, latency percentiles, time to
        first token per concurrency, and perf.png (throughput and latency against concurrency)
  selfllm eval sample-data OUT_DIR       write the shipped question set (general_mcq: <subset>_val.jsonl)

With EVAL_URL no model is fetched or loaded here: the model name is EVAL_MODEL, else the one the server's /v1/models
lists. A family one card can't hold (model.yaml `parallel:`) is evaluated on its deployment: without EVAL_URL it is
refused in one line unless EVAL_IN_PROCESS=1 asks for a transformers load in this container.

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
from contextlib import contextmanager, nullcontext
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
    """The model answering on base_url (…/v1) under `name`; `engine` is None for an outside EVAL_URL."""

    base_url: str
    name: str
    engine: Any = None
    api_key: str = "EMPTY"


def api_base(url: str) -> str:
    """EVAL_URL as an OpenAI base address (…/v1): a chat endpoint, a trailing slash or a bare host:port are taken too."""
    base = url.strip().rstrip("/").removesuffix("/chat/completions").rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def listed_models(base: str, api_key: str, timeout: float = 10.0) -> list[str]:
    """The model names GET <base>/models lists; one line naming EVAL_URL (or EVAL_API_KEY) where nothing usable answers."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(base + "/models", headers=headers), timeout=timeout) as answer:
            data = json.loads(answer.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise ValueError(f"EVAL_URL {base}: the server wants an API key (GET /models: HTTP {exc.code}): set "
                             "EVAL_API_KEY") from None
        raise ValueError(f"EVAL_URL {base}: GET /models answered HTTP {exc.code}: not the /v1 address of an "
                         "OpenAI-compatible server") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"EVAL_URL {base}: no OpenAI-compatible server answers ({one_line(exc, 120)}): start the "
                         "family's vllm or sglang recipe first and give its address, e.g. http://127.0.0.1:8000/v1") from None
    models = data.get("data") if isinstance(data, dict) else None
    if not isinstance(models, list):
        raise ValueError(f"EVAL_URL {base}: GET /models is no OpenAI model list")
    return [str(m["id"]) for m in models if isinstance(m, dict) and m.get("id")]


def outside_model(context: RecipeContext, settings: EvalSettings) -> Served:
    """The model at EVAL_URL: EVAL_MODEL (which the server must list), else the one it lists (of several: the first
    that is one of this recipe's names)."""
    base = api_base(settings.eval_url or "")
    listed = listed_models(base, settings.eval_api_key)
    key = settings.eval_api_key or "EMPTY"
    if settings.eval_model:
        if settings.eval_model not in listed:
            raise ValueError(f"EVAL_MODEL={settings.eval_model!r}: {base} serves {', '.join(listed) or 'no model'}")
        return Served(base, settings.eval_model, api_key=key)
    ours = served_names(context.recipe, context.family, settings, settings.served_model_name)
    named = [name for name in listed if name in ours]
    if len(listed) == 1 or named:
        return Served(base, (named or listed)[0], api_key=key)
    raise ValueError(f"EVAL_MODEL: {base} serves {', '.join(listed) or 'no model'}: name the one to evaluate "
                     "(EVAL_MODEL / --served-model)")


def where_refused(context: RecipeContext, settings: EvalSettings) -> str | None:
    """The one line that refuses to evaluate without EVAL_URL where the model should not load here: a family one card
    can't hold (model.yaml `parallel:`) unless EVAL_IN_PROCESS=1, or EVAL_IN_PROCESS=0; None: go ahead."""
    if settings.eval_url:
        return None
    if settings.in_process is False:
        return "EVAL_IN_PROCESS=0 without EVAL_URL leaves nothing to evaluate: set EVAL_URL to a running server"
    layout, family = context.family.parallel, context.family
    if settings.in_process or layout is None:
        return None
    return (f"EVAL_URL is not set: {family.display_name} is served across {layout.gpus} GPUs by its vllm or sglang "
            f"recipe (TENSOR_PARALLEL_SIZE={layout.tensor_parallel_size}): start one and set EVAL_URL to its address "
            f"(e.g. http://127.0.0.1:8000/v1), or EVAL_IN_PROCESS=1 to load its "
            f"{family.parameters_b.weights_gb('none'):.0f} GB of bf16 weights in this container")


def check_where(context: RecipeContext, settings: EvalSettings) -> None:
    problem = where_refused(context, settings)
    if problem is not None:
        raise ValueError(problem)
    if settings.eval_url and settings.adapter_path is not None:
        raise ValueError("ADAPTER_PATH needs the model loaded in this container: unset EVAL_URL, or serve the adapter "
                         "at EVAL_URL (vLLM: --enable-lora --lora-modules NAME=DIR) and name it in EVAL_MODEL")


def needs_model(settings: EvalSettings) -> bool:
    """`selfllm start` fetches the model only when it is served here (no EVAL_URL)."""
    return not settings.eval_url


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

    config = TaskConfig(model=served.name, api_url=served.base_url, api_key=served.api_key, eval_type="openai_api",
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


def run(context: RecipeContext, model_dir: Path | None, settings: EvalSettings) -> None:
    """`selfllm start` / `selfllm eval run`: the benchmarks on the base, then on base + adapter (ADAPTER_PATH); on
    EVAL_URL's model instead where it is set (model_dir None: nothing fetched)."""
    try:
        names, dataset_args = benchmarks(settings)
        check_benchmarks(names)
        check_adapter(settings)
        check_where(context, settings)
        outside = outside_model(context, settings) if settings.eval_url else None
        if outside is None and model_dir is None:
            raise ValueError("no model folder to serve: set MODEL_PATH or EVAL_URL")
        out = run_dir(settings, "run")
        started = time.monotonic()
        runs: dict[str, list[SubsetScore]] = {}
        with nullcontext(outside) if outside is not None else serve(context, model_dir, settings) as served:
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
    emit_result("run", model=served.name, model_dir=str(model_dir) if model_dir else None,
                url=served.base_url if outside is not None else None,
                device=served.engine.device if served.engine is not None else None,
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
    if served.api_key != "EMPTY":
        args["api_key"] = served.api_key
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
    """`selfllm eval perf`: EVAL_URL's model, else this recipe's (base, or base + ADAPTER_PATH) served here."""
    try:
        check_adapter(settings)
        check_where(context, settings)
        if settings.eval_url:
            served = outside_model(context, settings)
            result = stress(settings, served, run_dir(settings, "perf"), None)
            emit_result("perf", model=served.name, device=None, adapter=None, **result)
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
    """`selfllm start`, before the model is fetched: the benchmark names and the adapter must be usable, and the
    model must be one to load here, or a server must answer at EVAL_URL."""
    try:
        check_adapter(settings)
        check_where(context, settings)
        if settings.eval_url:
            outside_model(context, settings)
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
        run(context, resolve_model(model_request(context.recipe, settings)) if needs_model(settings) else None, settings)
    except (ValueError, ModelNotFound) as exc:
        print(f"selfllm eval: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0
