"""GRPO task on the host, before any model: reward functions (built-in, a user's REWARD_MODULE and its mistakes),
problem data (GSM8K's format, the hubs, the shipped arithmetic set), settings, and `selfllm start`'s exit 2 on bad
input before the model is fetched. Training itself runs in the recipe image (selfllm_recipes/smoke/task_grpo.py)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fake_hub import StaticFiles, closed_port_url, serve
from selfllm_runtime.finetune.data import DataError
from selfllm_runtime.finetune.grpo_data import (DEFAULT_GRPO_DATA_SHA256, GSM8K_FILE, gsm8k, problem_files,
                                                read_problems)
from selfllm_runtime.finetune.rewards import (Markers, RewardError, correctness_reward, for_trainer, format_reward,
                                              load_rewards)
from selfllm_runtime.metadata import ModelSource
from selfllm_runtime.model_source import file_sha256
from selfllm_runtime.settings import DEFAULT_GRPO_DATA, GrpoSettings, SettingsError, resolve

REPO = Path(__file__).resolve().parent.parent
THINK = Markers("<think>", "</think>")


def test_format_reward_grades_the_asked_shape():
    scores = format_reward(["<think>3 + 5 = 8</think>\n<answer>8</answer>",  # all of it
                            "3 + 5 = 8</think><answer>8</answer>",  # R1's template pre-fills <think>
                            "<answer>8</answer> <think>x</think>",  # answer before the reasoning's end
                            "8"], THINK)
    assert scores == [1.0, 1.0, 0.75, 0.0]


def test_correctness_reward_compares_the_last_answer_tag_as_a_number():
    completions = ["<answer>1,234</answer>", "<answer>7</answer> then <answer>12</answer>", "12", "<answer>$12.00</answer>"]
    assert correctness_reward(completions, ["1234", "12", "12", "12"], Markers()) == [2.0, 2.0, 0.0, 2.0]


def test_for_trainer_gives_text_and_markers_under_the_functions_names():
    wrapped = for_trainer([format_reward], THINK)
    assert wrapped[0].__name__ == "format_reward"
    conversational = [[{"role": "assistant", "content": "</think><answer>1</answer>"}]]
    assert wrapped[0](completions=conversational, answer=["1"]) == [1.0]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_a_user_reward_module_replaces_the_built_in_ones(tmp_path):
    module = write(tmp_path / "mine.py", "def short(completions, answer, **kwargs):\n"
                   "    return [1.0 / (1 + len(c)) for c in completions]\nREWARDS = [short]\n")
    assert [f.__name__ for f in load_rewards(module)] == ["short"]
    assert [f.__name__ for f in load_rewards(None)] == ["format_reward", "correctness_reward"]


@pytest.mark.parametrize("code, message", [
    ("import not_a_module_anywhere\n", "does not import (ModuleNotFoundError: No module named 'not_a_module_anywhere', line 1)"),
    ("def f(:\n", "does not import (SyntaxError"),
    ("def f(completions, answer, **kw):\n    return [1.0]\n", "must define REWARDS"),
    ("def f(completions, answer, **kw):\n    return [1.0]\nREWARDS = [f]\n",
     "f must return one number (or None) per completion, a list of 2 for 2 completions; it returned [1.0]"),
    ("def f(completions, answer, **kw):\n    return 1.0\nREWARDS = [f]\n", "f must return one number"),
    ("def f(completions, answer, **kw):\n    return ['good', 'bad']\nREWARDS = [f]\n", "f must return one number"),
    ("def f(completions, **kw):\n    return [1 / 0, 1]\nREWARDS = [f]\n",
     "f(completions, answer, **kwargs) failed on a sample call (ZeroDivisionError: division by zero)"),
])
def test_a_bad_reward_module_is_one_line_naming_it(tmp_path, code, message):
    module = write(tmp_path / "rewards.py", code)
    with pytest.raises(RewardError) as caught:
        load_rewards(module)
    assert str(caught.value).startswith(f"REWARD_MODULE={module}: ")
    assert message in str(caught.value)
    with pytest.raises(RewardError, match="no such file"):
        load_rewards(tmp_path / "missing.py")


def test_problems_in_gsm8k_format_and_bad_records(tmp_path):
    good = write(tmp_path / "p.jsonl", json.dumps({"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"}) + "\n"
                 + json.dumps({"question": "2 + 2?", "answer": 4}) + "\n")
    assert [(p.question, p.final) for p in read_problems([good])] == [("1 + 1?", "2"), ("2 + 2?", "4")]
    assert len(read_problems([good], max_samples=1)) == 1
    no_answer = write(tmp_path / "q.json", json.dumps([{"question": "1 + 1?", "solution": "2"}]))
    with pytest.raises(DataError, match=r"q.json: record 0: needs a text `answer` .*has \['question', 'solution'\]"):
        read_problems([no_answer])
    words = write(tmp_path / "w.jsonl", json.dumps({"question": "?", "answer": "#### many"}) + "\n")
    with pytest.raises(DataError, match="w.jsonl: record 0: `answer` must end in a number"):
        read_problems([words])


def test_the_shipped_problems_are_the_generators_output_and_checked(tmp_path):
    made = tmp_path / "arithmetic.jsonl"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_arithmetic_data.py"), str(made)], check=True,
                   capture_output=True)
    assert made.read_bytes() == DEFAULT_GRPO_DATA.read_bytes()
    assert file_sha256(DEFAULT_GRPO_DATA) == DEFAULT_GRPO_DATA_SHA256
    problems = read_problems([DEFAULT_GRPO_DATA])
    assert len(problems) == 400 and len({p.question for p in problems}) > 350


def _parquet(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def test_gsm8k_comes_from_the_first_hub_that_answers_else_the_shipped_set(tmp_path, monkeypatch, caplog):
    rows = [{"question": "Ann has 2 pens and buys 3. How many?", "answer": "2 + 3 = 5\n#### 5"}]
    site = StaticFiles({"/datasets/openai/gsm8k/resolve/main/" + GSM8K_FILE: _parquet(rows)})
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", closed_port_url())  # ModelScope first: refused, then Hugging Face
    with serve(site) as url:
        monkeypatch.setenv("HF_ENDPOINT", url)
        found = gsm8k(tmp_path / "data", ModelSource.modelscope)
    assert found is not None and [p.final for p in read_problems([found])] == ["5"]
    assert "GSM8K from modelscope unreachable" in caplog.text
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    settings = GrpoSettings(target_modules=["q_proj"], data_dir=tmp_path / "other")
    assert problem_files(settings) == [DEFAULT_GRPO_DATA]  # neither hub: the shipped set, no error
    assert "using the shipped arithmetic word problems" in caplog.text


def test_groups_must_fill_the_batch():
    with pytest.raises(SettingsError, match=r"BATCH_SIZE × GRAD_ACCUM \(6 × 1\) must be a multiple of NUM_GENERATIONS \(4\)"):
        resolve(GrpoSettings, env={"BATCH_SIZE": "6", "LORA_TARGET_MODULES": "q_proj"})


@pytest.mark.parametrize("env, message", [
    ({"REWARD_MODULE": "/nonexistent/rewards.py"}, "REWARD_MODULE=/nonexistent/rewards.py: no such file"),
    ({"DATA_PATH": "BAD"}, "record 0: needs a text `question`"),
])
def test_selfllm_start_refuses_bad_input_before_any_download(tmp_path, env, message):
    """MODEL_ID names a model on a hub that refuses every connection: the error must come first, as one line."""
    if env.get("DATA_PATH") == "BAD":
        env = {"DATA_PATH": str(write(tmp_path / "bad.jsonl", json.dumps({"prompt": "1 + 1?", "answer": "2"}) + "\n"))}
    closed = closed_port_url()
    done = subprocess.run([sys.executable, "-m", "selfllm_runtime", "start"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "RECIPE_DIR": str(REPO / "recipes/qwen3/grpo"),
                                            "MODEL_CACHE": str(tmp_path / "cache"), "HF_ENDPOINT": closed,
                                            "MODELSCOPE_ENDPOINT": closed, **env})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("selfllm grpo: error: ") and message in last, done.stderr[-2000:]


# ----------------------------------------------------------------------------- the smoke check's judgement

def _grpo_results(rewards: list[float], curves_rewards: list[float] | None = None, swanlab: bool = True) -> list[dict]:
    """Made-up container output of the grpo smoke check: 30 steps of a learnable reward, its run files, one math
    step, infer (base, adapter), merge, infer (merged)."""
    import base64
    import tempfile

    from selfllm_recipes.smoke import task_grpo
    from selfllm_runtime.finetune.curves import MetricHistory, plot

    steps = task_grpo.STEPS
    plotted = curves_rewards or rewards
    history = MetricHistory()
    for step in range(1, steps + 1):
        history.record(step, {"reward": plotted[step - 1], "learning_rate": 1e-2, "kl": 0.0})
    with tempfile.TemporaryDirectory() as folder:
        png = base64.b64encode(plot(history, Path(folder) / "curves.png", "t").read_bytes()).decode()
    points = [[s, v] for s, v in zip(range(1, steps + 1), plotted)]
    infer = {"action": "infer", "adapter": None, "model": "/m", "completion_tokens": 8, "prompt_logprob": -6.5}
    return [
        {"action": "train", "steps": steps, "rewards": rewards, "num_generations": 8, "device": "cpu", "seconds": 9.0,
         "adapter_files": ["adapter_config.json", "adapter_model.safetensors"]},
        {"action": "run_files", "run_dir": task_grpo.ADAPTER, "png": png,
         "curves": {"last_step": steps, "metrics": {k: [list(p) for p in v] for k, v in history.points.items()}},
         "swanlab_tag": "train/reward", "swanlab_points": points if swanlab else None},
        {"action": "train", "steps": 1, "reward_functions": {"format_reward": [0.0], "correctness_reward": [0.0]},
         "data": ["/opt/selfllm/runtime/selfllm_runtime/finetune/data/arithmetic.jsonl"], "prompts": 400,
         "reward_last": 0.0},
        infer, {**infer, "adapter": task_grpo.ADAPTER, "prompt_logprob": -6.3},
        {"action": "merge", "files": ["config.json", "model.safetensors"]},
        {**infer, "model": task_grpo.MERGED, "prompt_logprob": -6.3000001},
    ]


class _Session:
    def __init__(self, found: list[dict]):
        from selfllm_recipes.smoke.checks import RESULT_PREFIX

        self.text = "\n".join(RESULT_PREFIX + json.dumps(r) for r in found)
        self.recipe_key, self.artifacts_dir = "qwen3/grpo", None

    def exit_code(self) -> int:
        return 0

    def logs(self) -> str:
        return self.text


RISING = [round(0.5 + 0.015 * step, 4) for step in range(30)]


def test_the_grpo_smoke_check_passes_a_run_that_learns_and_drew_its_reward():
    from selfllm_recipes.smoke.task_grpo import verify_grpo

    line = verify_grpo(_Session(_grpo_results(RISING)))
    assert "learnable reward 0.530 → 0.905" in line and "30 reward points" in line and "curves over 30 steps" in line


@pytest.mark.parametrize("found, message", [
    (_grpo_results([0.5] * 30), "did not rise"),
    (_grpo_results(RISING, swanlab=False), "no SwanLab log"),
    (_grpo_results(RISING, curves_rewards=[0.5] * 30), "curves.png's reward"),
])
def test_the_grpo_smoke_check_fails_a_flat_reward_or_missing_curves(found, message):
    from selfllm_recipes.smoke.checks import SmokeFailure
    from selfllm_recipes.smoke.task_grpo import verify_grpo

    with pytest.raises(SmokeFailure, match=message):
        verify_grpo(_Session(found))
