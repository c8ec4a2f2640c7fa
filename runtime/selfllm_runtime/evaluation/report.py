"""EvalScope's results as the project reports them: no EvalScope import here (its report dicts are read as data),
so the logic is tested on the host.

- `subset_scores(report)`: one row per subset of an EvalScope `Report.to_dict()` (its primary metric);
- `comparison(runs)`: the subsets of several runs (base, base + adapter) side by side, with an overall row;
- `perf_points(results)`: `evalscope perf`'s summary and percentiles of each concurrency as one PerfPoint;
- `plot_perf(points, path)`: throughput and latency against concurrency (PNG, matplotlib's Agg backend).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# The shipped offline set (EvalScope's general_mcq format: <subset>_val.jsonl with question, A-D, answer)
SHIPPED_SET = Path(__file__).resolve().parent / "data" / "selfllm_quiz"
SHIPPED_NAME = "selfllm"  # EVAL_DATASETS=selfllm: the shipped set only
OVERALL = "OVERALL"
PLOT_SIZE = (1200, 450)  # pixels of perf.png (figure inches × dpi)
PLOT_DPI = 100


class ReportError(ValueError):
    """An EvalScope result without the parts this module reads; the text names what is missing."""


@dataclass(frozen=True)
class SubsetScore:
    dataset: str
    subset: str
    metric: str
    num: int
    score: float


def shipped_subsets(folder: Path = SHIPPED_SET) -> list[str]:
    """The subsets of a general_mcq folder: its <subset>_val.jsonl files."""
    return sorted(p.name.removesuffix("_val.jsonl") for p in folder.glob("*_val.jsonl"))


def _primary_metric(report: Mapping[str, Any]) -> Mapping[str, Any]:
    metrics = report.get("metrics") or []
    if not metrics:
        raise ReportError(f"report {report.get('dataset_name', '?')!r} has no metrics")
    primary = report.get("primary_metric_identity")
    return next((m for m in metrics if primary is not None and m.get("identity") == primary), metrics[0])


def metric_name(metric: Mapping[str, Any]) -> str:
    identity = metric.get("identity") or {}
    return metric.get("legacy_name") or identity.get("name") or "score"


def subset_scores(report: Mapping[str, Any]) -> list[SubsetScore]:
    """Each subset's question count and score (0-1) under the report's primary metric, in report order
    (aggregate subsets, which re-count others, left out)."""
    metric = _primary_metric(report)
    dataset = report.get("dataset_name") or report.get("name") or "?"
    rows = [SubsetScore(dataset, str(subset["name"]), metric_name(metric), int(subset.get("num", 0)),
                        float(subset.get("score", 0.0)))
            for category in metric.get("categories") or [] for subset in category.get("subsets") or []
            if not subset.get("is_aggregate")]
    if not rows:
        raise ReportError(f"report {dataset!r} has no subsets under metric {metric_name(metric)!r}")
    return rows


def overall(rows: Sequence[SubsetScore]) -> tuple[int, float]:
    """All questions of the rows and their micro-averaged score (each question counts once)."""
    total = sum(r.num for r in rows)
    return total, (sum(r.score * r.num for r in rows) / total if total else 0.0)


@dataclass(frozen=True)
class Comparison:
    """Subsets (dataset, subset, questions) as rows, one score column per run (e.g. base, adapter)."""

    runs: list[str]
    rows: list[tuple[str, str, int, list[float | None]]]

    def markdown(self) -> str:
        head = ["dataset", "subset", "questions", *self.runs]
        if len(self.runs) == 2:
            head.append("Δ")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for dataset, subset, num, scores in self.rows:
            cells = [dataset, subset, str(num), *("—" if s is None else f"{s:.4f}" for s in scores)]
            if len(self.runs) == 2:
                a, b = scores
                cells.append("—" if a is None or b is None else f"{b - a:+.4f}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {"runs": self.runs, "rows": [{"dataset": d, "subset": s, "questions": n, "scores": dict(zip(self.runs, sc))}
                                            for d, s, n, sc in self.rows]}


def comparison(runs: Mapping[str, Sequence[SubsetScore]]) -> Comparison:
    """The runs' subsets side by side (first run's order, then subsets only later runs have), then one OVERALL
    row of each run (micro average over its subsets). A run without a subset shows None there."""
    names = list(runs)
    keys: list[tuple[str, str]] = []
    counts: dict[tuple[str, str], int] = {}
    for rows in runs.values():
        for row in rows:
            key = (row.dataset, row.subset)
            if key not in counts:
                keys.append(key)
            counts[key] = max(counts.get(key, 0), row.num)
    table = []
    for key in keys:
        scores = [next((r.score for r in runs[name] if (r.dataset, r.subset) == key), None) for name in names]
        table.append((*key, counts[key], scores))
    totals = [overall(runs[name]) for name in names]
    table.append((OVERALL, "", max(n for n, _ in totals), [score for _, score in totals]))
    return Comparison(names, table)


# ----------------------------------------------------------------------------- perf

@dataclass(frozen=True)
class PerfPoint:
    """One `evalscope perf` round: its concurrency and figures (latency in s, time to first token in ms)."""

    concurrency: int
    requests: int
    succeeded: int
    failed: int
    request_throughput: float  # req/s
    output_throughput: float   # generated tok/s, all clients together
    avg_latency_s: float
    p50_latency_s: float
    p90_latency_s: float
    p99_latency_s: float
    avg_ttft_ms: float
    p50_ttft_ms: float
    p99_ttft_ms: float
    avg_output_tokens: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number(mapping: Mapping[str, Any], key: str, where: str) -> float:
    value = mapping.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ReportError(f"{where}: no number {key!r} (found {value!r})")
    return float(value)


def _percentile(rows: Sequence[Mapping[str, Any]], label: str, key: str, where: str) -> float:
    row = next((r for r in rows if r.get("Percentiles") == label), None)
    if row is None:
        raise ReportError(f"{where}: no {label} percentile row")
    return _number(row, key, f"{where} {label}")


def perf_point(name: str, summary: Mapping[str, Any], percentiles: Sequence[Mapping[str, Any]]) -> PerfPoint:
    """One round from `benchmark_summary.json` (summary) and `benchmark_percentile.json` (rows) of EvalScope."""
    where = f"perf round {name}"
    return PerfPoint(
        concurrency=int(_number(summary, "Concurrency", where)),
        requests=int(_number(summary, "Total Requests", where)),
        succeeded=int(_number(summary, "Success Requests", where)),
        failed=int(_number(summary, "Failed Requests", where)),
        request_throughput=_number(summary, "Req Throughput (req/s)", where),
        output_throughput=_number(summary, "Output Throughput (tok/s)", where),
        avg_latency_s=_number(summary, "Avg Latency (s)", where),
        p50_latency_s=_percentile(percentiles, "50%", "Latency (s)", where),
        p90_latency_s=_percentile(percentiles, "90%", "Latency (s)", where),
        p99_latency_s=_percentile(percentiles, "99%", "Latency (s)", where),
        avg_ttft_ms=_number(summary, "Avg TTFT (ms)", where),
        p50_ttft_ms=_percentile(percentiles, "50%", "TTFT (ms)", where),
        p99_ttft_ms=_percentile(percentiles, "99%", "TTFT (ms)", where),
        avg_output_tokens=_number(summary, "Avg Output Tokens", where))


def perf_points(rounds: Mapping[str, tuple[Mapping[str, Any], Sequence[Mapping[str, Any]]]]) -> list[PerfPoint]:
    """Every round (name → (summary, percentile rows)), by concurrency."""
    return sorted((perf_point(name, *data) for name, data in rounds.items()), key=lambda p: p.concurrency)


def perf_markdown(points: Sequence[PerfPoint]) -> str:
    head = ["concurrency", "requests (ok/failed)", "req/s", "output tok/s", "latency avg / p50 / p99 (s)",
            "TTFT avg / p50 / p99 (ms)", "output tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        lines.append(f"| {p.concurrency} | {p.requests} ({p.succeeded}/{p.failed}) | {p.request_throughput:.3f} | "
                     f"{p.output_throughput:.2f} | {p.avg_latency_s:.3f} / {p.p50_latency_s:.3f} / "
                     f"{p.p99_latency_s:.3f} | {p.avg_ttft_ms:.1f} / {p.p50_ttft_ms:.1f} / {p.p99_ttft_ms:.1f} | "
                     f"{p.avg_output_tokens:.1f} |")
    return "\n".join(lines)


def plot_perf(points: Sequence[PerfPoint], path: Path, title: str = "") -> tuple[int, int]:
    """Throughput (output tok/s, req/s) and latency (avg, p50, p99; TTFT p50) against concurrency, two panels side
    by side, as a PLOT_SIZE PNG; returns its (width, height) in pixels."""
    if not points:
        raise ReportError("no perf rounds to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p.concurrency for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(PLOT_SIZE[0] / PLOT_DPI, PLOT_SIZE[1] / PLOT_DPI), dpi=PLOT_DPI)
    try:
        left.plot(xs, [p.output_throughput for p in points], "o-", label="output tok/s")
        left.set_xlabel("concurrency")
        left.set_ylabel("output tokens / s")
        twin = left.twinx()
        twin.plot(xs, [p.request_throughput for p in points], "s--", color="tab:orange", label="req/s")
        twin.set_ylabel("requests / s")
        left.set_title("throughput")
        left.legend(loc="upper left")
        twin.legend(loc="lower right")
        for label, values in (("avg", [p.avg_latency_s for p in points]), ("p50", [p.p50_latency_s for p in points]),
                              ("p99", [p.p99_latency_s for p in points]),
                              ("TTFT p50", [p.p50_ttft_ms / 1000 for p in points])):
            right.plot(xs, values, "o-", label=label)
        right.set_xlabel("concurrency")
        right.set_ylabel("seconds")
        right.set_title("latency")
        right.legend(loc="upper left")
        for axis in (left, right):
            axis.set_xscale("log", base=2)
            axis.set_xticks(xs, [str(x) for x in xs])
            axis.grid(True, alpha=0.3)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=PLOT_DPI)  # no bbox_inches="tight": the PNG keeps PLOT_SIZE
        width, height = fig.canvas.get_width_height()
    finally:
        plt.close(fig)
    return width, height
