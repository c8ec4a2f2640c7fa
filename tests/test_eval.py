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
