"""The LoRA smoke check's judgement (selfllm_recipes/smoke/task_lora.py) on made-up container output:
an adapter that leaves the weights as they were fails, whatever the greedy replies look like."""
from __future__ import annotations

import json

import pytest

from selfllm_recipes.smoke import task_lora
from selfllm_recipes.smoke.checks import SmokeFailure


class FakeSession:
    def __init__(self, results: list[dict], code: int = 0):
        self.code, self.text = code, "\n".join(task_lora.RESULT_PREFIX + json.dumps(r) for r in results)

    def exit_code(self) -> int:
        return self.code

    def logs(self) -> str:
        return self.text


def run(base_lp: float, adapter_lp: float, merged_lp: float, base_out: str, adapter_out: str) -> str:
    def infer(adapter: str | None, output: str, lp: float, model: str = "/m") -> dict:
        return {"action": "infer", "adapter": adapter, "model": model, "output": output, "completion_tokens": 16,
                "prompt_logprob": lp}

    trained = {"action": "train", "steps": 20, "losses": [6.3, 6.2, 6.1, 6.0, 5.9, 5.8], "examples": 48,
               "adapter_files": ["adapter_config.json", "adapter_model.safetensors"], "tokens_per_s": 1.0,
               "device": "cpu"}
    merged = {"action": "merge", "files": ["config.json", "model.safetensors"]}
    return task_lora.verify_lora(FakeSession([
        trained, infer(None, base_out, base_lp), infer(task_lora.ADAPTER, adapter_out, adapter_lp), merged,
        infer(None, adapter_out, merged_lp, model=task_lora.MERGED)]))


def test_a_trained_adapter_passes():
    assert "changes the greedy reply" in run(-6.5, -6.3, -6.300001, "<think>\n\n</think>\n\nab", "cd")


def test_whitespace_replies_are_judged_by_the_fingerprint():
    report = run(-6.5, -6.3, -6.3, "\n" * 16, "\n" * 16)
    assert "greedy replies are whitespace" in report


@pytest.mark.parametrize("outputs", [("\n" * 16, "\n" * 16), ("ab", "cd")])
def test_an_adapter_that_changes_nothing_fails(outputs):
    with pytest.raises(SmokeFailure, match="the adapter leaves the model as it was"):
        run(-6.5, -6.5, -6.5, *outputs)


def test_a_merged_model_that_is_not_base_plus_adapter_fails():
    with pytest.raises(SmokeFailure, match="the merged model is not base \\+ adapter"):
        run(-6.5, -6.3, -6.5, "ab", "cd")
