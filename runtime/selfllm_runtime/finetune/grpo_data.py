"""GRPO's problems: records {question, answer} from DATA_PATH / DATA_URL, else GSM8K from the model hubs
(ModelScope first, as the models: MODEL_SOURCE's order), else the arithmetic word problems shipped with the
runtime (scripts/make_arithmetic_data.py, sha256-checked) — an unreachable hub is one warning line, never a stop."""
from __future__ import annotations

import json
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..metadata import ModelSource
from ..model_source import ENDPOINT_VARIABLES, one_line
from ..settings import DEFAULT_GRPO_DATA, GrpoSettings
from .data import DataError, default_data, read_records
from .lora import fetch_data
from .rewards import number

log = logging.getLogger("selfllm.grpo")
# scripts/make_arithmetic_data.py's output, shipped: the data of a run without DATA_PATH / DATA_URL and no hub
DEFAULT_GRPO_DATA_SHA256 = "12f3121755e02d0936fdec41e22dae6d91535ff99a9c939929e750da494b0db9"
# GSM8K's training split (openai/gsm8k, MIT) as one parquet file on each hub; {endpoint} is the hub's address
GSM8K_FILE = "main/train-00000-of-00001.parquet"
GSM8K = {
    ModelSource.modelscope: ("https://www.modelscope.cn",
                             "{endpoint}/api/v1/datasets/modelscope/gsm8k/repo?Revision=master&FilePath=" + GSM8K_FILE),
    ModelSource.huggingface: ("https://huggingface.co", "{endpoint}/datasets/openai/gsm8k/resolve/main/" + GSM8K_FILE),
}
HUB_TIMEOUT_S = 20


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str  # the reference as given (GSM8K: worked steps, then `#### 72`)

    @property
    def final(self) -> str:
        return self.answer.rsplit("####", 1)[-1].strip()


def _endpoint(source: ModelSource, default: str) -> str:
    for variable in ENDPOINT_VARIABLES[source]:
        if os.environ.get(variable):
            return os.environ[variable].rstrip("/")
    return default


def gsm8k(folder: Path, first: ModelSource) -> Path | None:
    """GSM8K's training split as JSON Lines in `folder` (fetched once), from the hub `first`, then the other;
    None (and one warning line each) when neither answers."""
    target = folder / "gsm8k-train.jsonl"
    if target.is_file() and target.stat().st_size > 0:
        return target
    for source in sorted(GSM8K, key=lambda s: s != first):
        if source is ModelSource.huggingface and os.environ.get("HF_HUB_OFFLINE") == "1":
            continue
        default, pattern = GSM8K[source]
        url = pattern.format(endpoint=_endpoint(source, default))
        try:
            with urllib.request.urlopen(url, timeout=HUB_TIMEOUT_S) as answer:
                payload = answer.read()
            import io

            import pyarrow.parquet as pq

            rows = pq.read_table(io.BytesIO(payload)).to_pylist()
            if not rows or not {"question", "answer"} <= set(rows[0]):
                raise ValueError(f"not GSM8K's columns: {sorted(rows[0]) if rows else 'no rows'}")
        except Exception as exc:  # noqa: BLE001 - any failure of a hub: the next one, then the shipped set
            log.warning("GSM8K from %s unreachable (%s)", source.value, one_line(exc, 160))
            continue
        folder.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(f".{os.getpid()}.part")
        partial.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}, ensure_ascii=False)
                                   + "\n" for r in rows), encoding="utf-8")
        partial.replace(target)
        log.info("GSM8K: %d problems from %s → %s", len(rows), source.value, target)
        return target
    return None


def problem_files(settings: GrpoSettings) -> list[Path]:
    """DATA_PATH, else DATA_URL, else GSM8K (DATA_HUB), else the shipped arithmetic set."""
    if settings.data:
        return list(settings.data)
    if settings.data_url:
        return [fetch_data(settings.data_url, settings.data_dir)]
    found = gsm8k(settings.data_dir, settings.model_source) if settings.data_hub else None
    if found is None:
        log.warning("using the shipped arithmetic word problems %s (DATA_PATH for your own)", DEFAULT_GRPO_DATA.name)
        return [default_data(DEFAULT_GRPO_DATA, DEFAULT_GRPO_DATA_SHA256)]
    return [found]


def read_problems(paths: list[Path], max_samples: int | None = None) -> list[Problem]:
    """Every record of `paths` as a Problem; a record without a `question` / an `answer` whose final part is a
    number raises DataError naming the file and the record."""
    problems: list[Problem] = []
    for path in paths:
        for index, record in enumerate(read_records(path)):
            if not isinstance(record, dict):
                raise DataError(path, index, f"expected an object with `question` and `answer`, got "
                                f"{type(record).__name__}")
            fields: dict[str, Any] = {}
            for field in ("question", "answer"):
                value = record.get(field)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and field == "answer":
                    value = str(value)
                if not isinstance(value, str) or not value.strip():
                    raise DataError(path, index, f"needs a text `{field}` (GRPO's records: `question`, `answer`; "
                                    f"this one has {sorted(record)})")
                fields[field] = value
            problem = Problem(**fields)
            if number(problem.final) is None:
                raise DataError(path, index, f"`answer` must end in a number (GSM8K: `#### 72`), not "
                                f"{problem.final[-40:]!r}")
            problems.append(problem)
            if max_samples and len(problems) >= max_samples:
                return problems
    return problems
