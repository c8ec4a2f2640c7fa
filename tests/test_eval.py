"""Task `eval` on the host, without EvalScope: its reports read as data (per-subset scores of EvalScope's Report
dicts, the base-vs-adapter table, perf rounds from EvalScope's summary / percentile files), the plot, the shipped
question set, the settings and `selfllm start`'s exit 2 on bad input before the model is fetched. EvalScope itself
runs in the recipe image (selfllm_recipes/smoke/task_eval.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from fake_hub import closed_port_url
from selfllm_runtime.context import load_context
from selfllm_runtime.evaluation.report import (OVERALL, PLOT_SIZE, SHIPPED_SET, ReportError, SubsetScore, comparison,
                                               perf_markdown, perf_points, plot_perf, shipped_subsets, subset_scores)
from selfllm_runtime.settings import EvalSettings, SettingsError
from selfllm_runtime.tasks.evaluation import benchmarks, perf_prompts, read_rounds, server_settings

REPO = Path(__file__).resolve().parent.parent
QWEN3_EVAL = REPO / "recipes" / "qwen3" / "eval"
ACC = {"name": "acc", "aggregation": "mean", "dimensions": {}}


def subset(name: str, num: int, score: float, aggregate: bool = False) -> dict:
    return {"name": name, "score": score, "num": num, "metadata": None, "is_aggregate": aggregate}


def report(dataset: str, metrics: list[dict], primary: dict | None = ACC) -> dict:
    """EvalScope 1.14's Report.to_dict() shape (schema 2), with the fields this project reads."""
    return {"schema_version": 2, "name": f"m@{dataset}", "dataset_name": dataset, "model_name": "m",
            "metrics": metrics, "primary_metric_identity": primary}


def metric(identity: dict, *subsets: dict) -> dict:
    return {"identity": identity, "legacy_name": None, "num": sum(s["num"] for s in subsets), "score": 0.0,
            "categories": [{"name": ["default"], "subsets": list(subsets)}]}


# ----------------------------------------------------------------------------- scores

def test_subset_scores_read_the_primary_metric_and_skip_aggregates():
    tokens = {"name": "output_tokens", "aggregation": "mean", "dimensions": {}}
    data = report("iquiz", [metric(tokens, subset("IQ", 40, 120.0)),
                            metric(ACC, subset("IQ", 40, 0.25), subset("EQ", 80, 0.5), subset("ALL", 120, 0.4, True))])
    assert subset_scores(data) == [SubsetScore("iquiz", "IQ", "acc", 40, 0.25), SubsetScore("iquiz", "EQ", "acc", 80, 0.5)]


def test_subset_scores_without_a_primary_identity_take_the_first_metric():
    data = report("general_mcq", [metric(ACC, subset("zh", 10, 0.1))], primary=None)
    assert subset_scores(data)[0].subset == "zh"


@pytest.mark.parametrize("data, message", [
    (report("x", []), "has no metrics"),
    (report("x", [metric(ACC, subset("ALL", 5, 1.0, True))]), "has no subsets under metric 'acc'"),
])
def test_subset_scores_name_what_a_report_lacks(data, message):
    with pytest.raises(ReportError, match=message):
        subset_scores(data)


def test_comparison_puts_runs_side_by_side_with_a_micro_averaged_overall():
    base = [SubsetScore("iquiz", "IQ", "acc", 40, 0.25), SubsetScore("iquiz", "EQ", "acc", 80, 0.5)]
    adapter = [SubsetScore("iquiz", "IQ", "acc", 40, 0.5), SubsetScore("iquiz", "EQ", "acc", 80, 0.5)]
    table = comparison({"base": base, "adapter": adapter})
    assert [row[:3] for row in table.rows] == [("iquiz", "IQ", 40), ("iquiz", "EQ", 80), (OVERALL, "", 120)]
    overall_base, overall_adapter = table.rows[-1][3]
    assert overall_base == pytest.approx((40 * 0.25 + 80 * 0.5) / 120) and overall_adapter == pytest.approx(0.5)
    lines = table.markdown().splitlines()
    assert lines[0] == "| dataset | subset | questions | base | adapter | Δ |"
    assert lines[2] == "| iquiz | IQ | 40 | 0.2500 | 0.5000 | +0.2500 |"
    assert table.as_dict()["rows"][0] == {"dataset": "iquiz", "subset": "IQ", "questions": 40,
                                          "scores": {"base": 0.25, "adapter": 0.5}}


def test_comparison_of_one_run_has_no_delta_and_a_missing_subset_shows_a_dash():
    table = comparison({"base": [SubsetScore("a", "x", "acc", 3, 1.0)], "adapter": [SubsetScore("a", "y", "acc", 2, 0.0)]})
    assert [row[3] for row in table.rows[:2]] == [[1.0, None], [None, 0.0]]
    assert "| a | x | 3 | 1.0000 | — | — |" in table.markdown()
    assert "Δ" not in comparison({"base": [SubsetScore("a", "x", "acc", 3, 1.0)]}).markdown()


# ----------------------------------------------------------------------------- perf

def perf_round(concurrency: int, requests: int, latencies: tuple[float, float, float], ttft: tuple[float, float]) -> tuple:
    summary = {"Concurrency": concurrency, "Total Requests": requests, "Success Requests": requests,
               "Failed Requests": 0, "Req Throughput (req/s)": concurrency / 2, "Output Throughput (tok/s)": 8.0 * concurrency,
               "Avg Latency (s)": latencies[1], "Avg TTFT (ms)": ttft[0], "Avg Output Tokens": 16.0}
    labels = ["1%", "5%", "10%", "25%", "50%", "75%", "90%", "95%", "99%"]
    rows = [{"Percentiles": label, "Latency (s)": latencies[0] if label in ("1%", "5%", "10%", "25%", "50%") else
             latencies[1] if label in ("75%", "90%") else latencies[2],
             "TTFT (ms)": ttft[0] if label != "99%" else ttft[1]} for label in labels]
    return summary, rows


def test_perf_points_read_each_round_and_sort_by_concurrency():
    points = perf_points({"parallel_8_number_32": perf_round(8, 32, (1.0, 1.5, 2.0), (30.0, 90.0)),
                          "parallel_1_number_8": perf_round(1, 8, (0.5, 0.5, 0.6), (10.0, 12.0))})
    assert [p.concurrency for p in points] == [1, 8]
    top = points[1]
    assert (top.requests, top.succeeded, top.failed, top.output_throughput) == (32, 32, 0, 64.0)
    assert (top.p50_latency_s, top.p90_latency_s, top.p99_latency_s, top.p50_ttft_ms, top.p99_ttft_ms) == \
        (1.0, 1.5, 2.0, 30.0, 90.0)
    assert perf_markdown(points).splitlines()[3].startswith("| 8 | 32 (32/0) | 4.000 | 64.00 | 1.500 / 1.000 / 2.000 |")


def test_a_perf_round_without_a_figure_is_named():
    summary, rows = perf_round(2, 4, (1.0, 1.0, 1.0), (5.0, 5.0))
    del summary["Avg TTFT (ms)"]
    with pytest.raises(ReportError, match="parallel_2_number_4: no number 'Avg TTFT"):
        perf_points({"parallel_2_number_4": (summary, rows)})
    with pytest.raises(ReportError, match="no 99% percentile row"):
        perf_points({"r": (perf_round(2, 4, (1.0, 1.0, 1.0), (5.0, 5.0))[0], rows[:-1])})


def test_read_rounds_takes_evalscopes_files_and_names_a_missing_round(tmp_path):
    summary, rows = perf_round(4, 8, (1.0, 1.0, 1.0), (5.0, 6.0))
    (tmp_path / "parallel_4_number_8").mkdir()
    (tmp_path / "parallel_4_number_8" / "benchmark_summary.json").write_text(json.dumps(summary))
    (tmp_path / "parallel_4_number_8" / "benchmark_percentile.json").write_text(json.dumps(rows))
    assert perf_points(read_rounds(tmp_path, ["parallel_4_number_8"]))[0].concurrency == 4
    with pytest.raises(ReportError, match="parallel_1_number_2: EvalScope wrote no benchmark_summary.json"):
        read_rounds(tmp_path, ["parallel_1_number_2"])


def test_plot_perf_writes_a_png_of_the_plot_size(tmp_path):
    points = perf_points({f"r{c}": perf_round(c, 4 * c, (0.1 * c, 0.2 * c, 0.3 * c), (5.0 * c, 9.0 * c)) for c in (1, 8, 32)})
    size = plot_perf(points, tmp_path / "out" / "perf.png", title="tiny")
    with Image.open(tmp_path / "out" / "perf.png") as image:
        assert image.format == "PNG" and image.size == size == PLOT_SIZE
    with pytest.raises(ReportError, match="no perf rounds"):
        plot_perf([], tmp_path / "none.png")


# ----------------------------------------------------------------------------- data and settings

def test_the_shipped_set_is_general_mcq_with_one_exact_answer_per_question():
    assert shipped_subsets() == ["general", "zh"]
    for name in shipped_subsets():
        records = [json.loads(line) for line in (SHIPPED_SET / f"{name}_val.jsonl").read_text(encoding="utf-8").splitlines()]
        assert len(records) == 10 and len({r["id"] for r in records}) == 10
        for r in records:
            assert set(r) == {"id", "question", "A", "B", "C", "D", "answer"} and r["answer"] in "ABCD"
            assert len({r[c] for c in "ABCD"}) == 4, r  # four different options
    zh = (SHIPPED_SET / "zh_val.jsonl").read_text(encoding="utf-8")
    assert "北京" in zh and "粽子" in zh


def test_perf_prompts_are_the_shipped_questions(tmp_path):
    lines = perf_prompts(tmp_path / "p.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 20 and "What is 7 × 8?" in lines


def eval_settings(**env: str) -> EvalSettings:
    return load_context(QWEN3_EVAL).settings(EvalSettings, env=env)


def test_benchmarks_auto_follows_the_hub_and_merges_dataset_args():
    assert benchmarks(eval_settings(), hub=True) == (["iquiz"], {})
    names, args = benchmarks(eval_settings(), hub=False)
    assert names == ["general_mcq"] and args["general_mcq"] == {"local_path": str(SHIPPED_SET),
                                                                "subset_list": ["general", "zh"]}
    names, args = benchmarks(eval_settings(EVAL_DATASETS="selfllm,ceval",
                                           EVAL_DATASET_ARGS='{"general_mcq": {"subset_list": ["zh"]}, "ceval": {"x": 1}}'))
    assert names == ["general_mcq", "ceval"]
    assert args == {"general_mcq": {"local_path": str(SHIPPED_SET), "subset_list": ["zh"]}, "ceval": {"x": 1}}


def test_perf_rounds_and_their_mistakes():
    assert eval_settings().rounds() == [(1, 8), (8, 32), (32, 96)]
    assert eval_settings(PERF_PARALLEL="1,2,4", PERF_NUMBER="3").rounds() == [(1, 3), (2, 3), (4, 3)]
    with pytest.raises(SettingsError, match="PERF_NUMBER has 2 entries for 3 PERF_PARALLEL"):
        eval_settings(PERF_NUMBER="1,2")
    with pytest.raises(SettingsError, match="PERF_PARALLEL"):
        eval_settings(PERF_PARALLEL="1,zero")
    with pytest.raises(SettingsError, match="EVAL_DATASET_ARGS.*not JSON"):
        eval_settings(EVAL_DATASET_ARGS="{bad")
    with pytest.raises(SettingsError, match="EVAL_DATASET_ARGS.*JSON object"):
        eval_settings(EVAL_DATASET_ARGS="[1]")


def test_the_in_process_server_takes_the_engine_settings_on_loopback_without_a_key():
    served = server_settings(eval_settings(MAX_BATCH="3", SERVED_MODEL_NAME="mine", API_KEY="secret"))
    assert (served.host, served.api_key, served.max_batch, served.served_model_name) == ("127.0.0.1", "", 3, "mine")


def test_selfllm_start_refuses_a_bad_adapter_before_any_download(tmp_path):
    closed = closed_port_url()
    done = subprocess.run([sys.executable, "-m", "selfllm_runtime", "start"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "RECIPE_DIR": str(QWEN3_EVAL), "ADAPTER_PATH": str(tmp_path),
                                            "MODEL_CACHE": str(tmp_path / "cache"), "HF_ENDPOINT": closed,
                                            "MODELSCOPE_ENDPOINT": closed})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("selfllm eval: error: ADAPTER_PATH") and "adapter_config.json" in last


# ----------------------------------------------------------------------------- an outside deployment (EVAL_URL)

class ModelList:
    """A local HTTP server answering GET /v1/models with `names` (401 without `key` where one is asked for)."""

    def __init__(self, names: list[str], key: str = "") -> None:
        import http.server
        import threading

        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                outer.paths.append(self.path)
                if key and self.headers.get("Authorization") != f"Bearer {key}":
                    self.send_response(401)
                    self.end_headers()
                    return
                body = json.dumps({"object": "list", "data": [{"id": n, "object": "model"} for n in names]}).encode()
                self.send_response(200 if self.path == "/v1/models" else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.paths: list[str] = []
        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)  # bound (and listening) here
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def model_list():
    servers: list[ModelList] = []

    def make(names: list[str], key: str = "") -> ModelList:
        servers.append(ModelList(names, key))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def recipe_settings(family: str, **env: str) -> tuple:
    context = load_context(REPO / "recipes" / family / "eval")
    return context, context.settings(EvalSettings, env=env)


@pytest.mark.parametrize("given", ["http://h:8000/v1", "http://h:8000/v1/", "http://h:8000",
                                   "http://h:8000/v1/chat/completions"])
def test_eval_url_is_taken_as_the_openai_base(given):
    from selfllm_runtime.tasks.evaluation import api_base

    assert api_base(given) == "http://h:8000/v1"


def test_eval_url_must_be_http_and_the_old_perf_names_still_read():
    with pytest.raises(SettingsError, match="EVAL_URL='h:8000'.*http"):
        eval_settings(EVAL_URL="h:8000")
    settings = eval_settings(PERF_URL="http://h:8000/v1", PERF_MODEL="m", PERF_API_KEY="k")
    assert (settings.eval_url, settings.eval_model, settings.eval_api_key) == ("http://h:8000/v1", "m", "k")


def test_the_model_at_eval_url_is_the_one_it_lists_or_one_of_ours(model_list):
    from selfllm_runtime.tasks.evaluation import outside_model

    one = model_list(["anything"])
    context, settings = recipe_settings("qwen3", EVAL_URL=one.url)
    served = outside_model(context, settings)
    assert (served.base_url, served.name, served.engine, served.api_key) == (one.url + "/v1", "anything", None, "EMPTY")
    assert one.paths == ["/v1/models"]
    several = model_list(["other", "Qwen3-8B"])  # the vllm recipe's names: ours is picked
    context, settings = recipe_settings("qwen3", EVAL_URL=several.url + "/v1/chat/completions")
    assert outside_model(context, settings).name == "Qwen3-8B"
    context, settings = recipe_settings("qwen3", EVAL_URL=several.url, EVAL_MODEL="other")
    assert outside_model(context, settings).name == "other"


@pytest.mark.parametrize(("names", "key", "env", "message"), [
    (["a", "b"], "", {}, "EVAL_MODEL: http://127.0.0.1:\\d+/v1 serves a, b: name the one"),
    (["a"], "", {"EVAL_MODEL": "b"}, "EVAL_MODEL='b': http://127.0.0.1:\\d+/v1 serves a$"),
    (["a"], "sk-1", {}, "EVAL_URL http://127.0.0.1:\\d+/v1: the server wants an API key .*EVAL_API_KEY"),
    (["a"], "sk-1", {"EVAL_API_KEY": "sk-2"}, "EVAL_API_KEY"),
])
def test_what_is_wrong_at_eval_url_is_one_line_naming_the_setting(model_list, names, key, env, message):
    from selfllm_runtime.tasks.evaluation import outside_model

    server = model_list(names, key)
    context, settings = recipe_settings("qwen3", EVAL_URL=server.url, **env)
    with pytest.raises(ValueError, match=message) as caught:
        outside_model(context, settings)
    assert "\n" not in str(caught.value)
    if key:
        context, settings = recipe_settings("qwen3", EVAL_URL=server.url, EVAL_API_KEY=key)
        assert outside_model(context, settings).api_key == key


def test_a_closed_eval_url_is_refused_in_one_line_by_selfllm_eval_run(tmp_path):
    closed = closed_port_url()
    done = subprocess.run([sys.executable, "-m", "selfllm_runtime", "eval", "run", "--url", closed, "--datasets",
                           "selfllm"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RECIPE_DIR": str(REPO / "recipes" / "minimax-m2" / "eval"),
                               "OUTPUT_DIR": str(tmp_path / "out"), "MODEL_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"selfllm eval: error: EVAL_URL {closed}/v1: no OpenAI-compatible server answers")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("family", ["hunyuan-a13b", "glm4.5-air", "minimax-m2"])
def test_a_family_one_card_cant_hold_wants_eval_url_unless_forced_in_process(family):
    from selfllm_runtime.tasks.evaluation import needs_model, where_refused

    context, settings = recipe_settings(family)
    problem = where_refused(context, settings)
    assert problem.startswith("EVAL_URL is not set: ") and "EVAL_IN_PROCESS=1" in problem and "\n" not in problem
    assert "TENSOR_PARALLEL_SIZE=4" in problem and "4 GPUs" in problem
    assert where_refused(*recipe_settings(family, EVAL_IN_PROCESS="1")) is None
    assert where_refused(*recipe_settings(family, EVAL_URL="http://h:8000/v1")) is None
    assert needs_model(settings) and not needs_model(recipe_settings(family, EVAL_URL="http://h:8000/v1")[1])
    assert context.recipe.gpu.count == 4  # the deployment's cards (or a forced in-process load spread over them)
    assert where_refused(*recipe_settings("qwen3")) is None  # one card: in-process by default
    assert "EVAL_IN_PROCESS=0" in where_refused(*recipe_settings("qwen3", EVAL_IN_PROCESS="0"))


def test_selfllm_start_of_minimax_eval_without_eval_url_exits_2_before_any_download(tmp_path):
    closed = closed_port_url()
    done = subprocess.run([sys.executable, "-m", "selfllm_runtime", "start"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "RECIPE_DIR": str(REPO / "recipes" / "minimax-m2" / "eval"),
                                            "MODEL_CACHE": str(tmp_path / "cache"), "HF_ENDPOINT": closed,
                                            "MODELSCOPE_ENDPOINT": closed})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("selfllm eval: error: EVAL_URL is not set: MiniMax-M2 is served across 4 GPUs")
    assert "457 GB" in last and not (tmp_path / "cache").exists()


def test_an_adapter_needs_the_model_here_not_at_eval_url(tmp_path):
    from selfllm_runtime.tasks.evaluation import check_where

    (tmp_path / "adapter_config.json").write_text("{}")
    context, settings = recipe_settings("qwen3", EVAL_URL="http://h:8000/v1", ADAPTER_PATH=str(tmp_path))
    with pytest.raises(ValueError, match="^ADAPTER_PATH needs the model loaded in this container: unset EVAL_URL"):
        check_where(context, settings)


def test_selfllm_start_with_eval_url_runs_without_fetching_a_model(monkeypatch, model_list):
    """cmd_start asks the task (needs_model) and hands run() no model folder: nothing is downloaded."""
    import selfllm_runtime.cli as cli
    from selfllm_runtime.tasks import evaluation

    server = model_list(["MiniMax-M2"])
    ran: list = []

    def no_download(request):
        raise AssertionError("a model was fetched for an outside EVAL_URL")

    monkeypatch.setattr(cli, "resolve_model", no_download)
    monkeypatch.setattr(evaluation, "check_benchmarks", lambda names: None)  # EvalScope is in the recipe image only
    monkeypatch.setattr(evaluation, "run", lambda context, model_dir, settings: ran.append((model_dir, settings.eval_url)))
    monkeypatch.setenv("EVAL_URL", server.url)
    assert cli.main(["start", "--recipe", str(REPO / "recipes" / "minimax-m2" / "eval")]) == 0
    assert ran == [(None, server.url)] and server.paths == ["/v1/models"]  # the server checked before run


def test_the_smoke_check_holds_the_url_path_to_the_outside_server():
    """task_eval.verify_url_path: the --url run and perf hit the background server alone (no device, no model folder),
    with the limit's counts; a closed EVAL_URL is exit 2 and one line, never a traceback."""
    from selfllm_recipes.smoke.checks import SmokeFailure
    from selfllm_recipes.smoke.task_eval import CLOSED_URL, URL_LIMIT, URL_NUMBER, URL_PARALLEL, verify_url_path

    url = "http://127.0.0.1:40000/v1"
    run = {"url": url, "device": None, "model_dir": None, "model": "smoke-model", "limit": URL_LIMIT,
           "subsets": {"base": [{"subset": s, "num": URL_LIMIT} for s in ("general", "zh")]}}
    point = {"concurrency": URL_PARALLEL, "requests": URL_NUMBER, "succeeded": URL_NUMBER, "failed": 0,
             "output_throughput": 3.0, "request_throughput": 1.0, "avg_latency_s": 0.5, "p50_latency_s": 0.5,
             "p90_latency_s": 0.6, "p99_latency_s": 0.7, "avg_ttft_ms": 10, "p50_ttft_ms": 10, "p99_ttft_ms": 20}
    perf = {"url": url + "/chat/completions", "device": None, "model": "smoke-model", "points": [point]}
    line = f"selfllm eval: error: EVAL_URL {CLOSED_URL}: no OpenAI-compatible server answers (refused): start …"
    assert "a closed EVAL_URL → exit 2" in verify_url_path(run, perf, {"code": 2, "stderr": "warning\n" + line + "\n"})
    for bad in ({"code": 1, "stderr": line}, {"code": 2, "stderr": "Traceback (most recent call last):\n" + line}):
        with pytest.raises(SmokeFailure, match="closed EVAL_URL"):
            verify_url_path(run, perf, bad)
    with pytest.raises(SmokeFailure, match="outside server alone"):
        verify_url_path({**run, "device": "cpu"}, perf, {"code": 2, "stderr": line})
