"""The LoRA smoke check's judgement (selfllm_recipes/smoke/task_lora.py) on made-up container output:
an adapter that leaves the weights as they were fails, whatever the greedy replies look like; so does a
QLoRA run whose base was not quantized or whose adapter was merged into a quantized base; so does a run without
its curves picture or its SwanLab log."""
from __future__ import annotations

import base64
import functools
import json
import tempfile
from pathlib import Path

import pytest

from selfllm_recipes.smoke import task_lora
from selfllm_recipes.smoke.checks import RESULT_PREFIX, SmokeFailure


class FakeSession:
    def __init__(self, results: list[dict], code: int = 0, recipe_key: str = "qwen3/lora"):
        self.code, self.text = code, "\n".join(RESULT_PREFIX + json.dumps(r) for r in results)
        self.recipe_key = recipe_key
        self.artifacts_dir = None

    def exit_code(self) -> int:
        return self.code

    def logs(self) -> str:
        return self.text


def infer(adapter: str | None, output: str, lp: float, model: str = "/m", quantization: str = "none",
          weights_gb: float = 0.00085) -> dict:
    return {"action": "infer", "adapter": adapter, "model": model, "output": output, "completion_tokens": 16,
            "prompt_logprob": lp, "quantization": quantization, "weights_gb": weights_gb}


def trained(quantization: str = "none", losses: tuple[float, ...] = (6.3, 6.2, 6.1, 6.0, 5.9, 5.8),
            gpu_layout: str = "data") -> dict:
    return {"action": "train", "steps": 20, "losses": list(losses), "examples": 48, "quantization": quantization,
            "adapter_files": ["adapter_config.json", "adapter_model.safetensors"], "tokens_per_s": 1.0,
            "device": "cpu", "gpu_layout": gpu_layout, "devices": ["cpu"]}


def qlora(base_lp: float = -6.6, adapter_lp: float = -6.4, weights_gb: float = 0.00056, merged_dtype: str = "float32",
          quantization: str = "4bit", losses: tuple[float, ...] = (6.3, 6.2, 6.1, 6.0, 5.9, 5.8)) -> list[dict]:
    return [trained(quantization, losses),
            infer(None, "ab", base_lp, quantization="4bit", weights_gb=weights_gb),
            infer(task_lora.QLORA_ADAPTER, "cd", adapter_lp, quantization="4bit", weights_gb=weights_gb),
            {"action": "merge", "files": ["config.json", "model.safetensors"], "trained_on": quantization,
             "merged_dtype": merged_dtype}]


@functools.cache
def curves_png(steps: int, losses: tuple[float, ...]) -> str:
    """A picture the runtime's curves.plot draws for loss and learning rate over the steps, base64."""
    from selfllm_runtime.finetune.curves import MetricHistory, plot

    history = MetricHistory()
    for step in range(1, steps + 1):
        history.record(step, {"loss": losses[step - 1] if step <= len(losses) else 5.0, "learning_rate": 1e-4})
    with tempfile.TemporaryDirectory() as folder:
        return base64.b64encode(plot(history, Path(folder) / "curves.png", "t").read_bytes()).decode()


def run_files(steps: int = 20, losses: tuple[float, ...] = (6.3, 6.2, 6.1, 6.0, 5.9, 5.8), **changes) -> dict:
    points = [[step, losses[step - 1] if step <= len(losses) else 5.0] for step in range(1, steps + 1)]
    return {"action": "run_files", "run_dir": task_lora.ADAPTER, "png": curves_png(steps, losses),
            "curves": {"last_step": steps, "metrics": {"loss": points, "learning_rate": [[s, 1e-4] for s, _ in points]}},
            "swanlab_tag": "train/loss", "swanlab_points": points, **changes}


def run(base_lp: float, adapter_lp: float, merged_lp: float, base_out: str, adapter_out: str,
        qlora_results: list[dict] | None = None, recipe_key: str = "qwen3/lora", files: dict | None = None,
        gpu_layout: str = "data") -> str:
    merged = {"action": "merge", "files": ["config.json", "model.safetensors"], "trained_on": "none",
              "merged_dtype": "float32"}
    refusal = ([{"action": "refused", "code": 2, "stderr": f"selfllm lora: error: {task_lora.BAD_IMAGE_DATA}: record 0: "
                 "image /root/autodl-tmp/data/latex-ocr/missing.png not found\n"}]
               if task_lora.takes_images(recipe_key) else [])  # an image family's check starts with that refusal
    return task_lora.verify_lora(FakeSession([
        *refusal, trained(gpu_layout=gpu_layout), files or run_files(), infer(None, base_out, base_lp), infer(task_lora.ADAPTER, adapter_out, adapter_lp), merged,
        infer(None, adapter_out, merged_lp, model=task_lora.MERGED), *(qlora() if qlora_results is None else qlora_results)],
        recipe_key=recipe_key))


def test_a_family_shipped_quantized_runs_no_qlora():
    """gpt-oss ships MXFP4 weights (QUANTIZATION refused): its check runs LoRA only, and QLoRA results would be
    unexpected; every other family's check runs QLoRA too."""
    from selfllm_recipes.discover import load_spec
    from selfllm_recipes.layout import RECIPES_DIR
    from selfllm_recipes.smoke.checks import check_for

    assert "QUANTIZATION=4bit" not in check_for(load_spec(RECIPES_DIR / "gpt-oss" / "lora")).command
    assert "QUANTIZATION=4bit" in check_for(load_spec(RECIPES_DIR / "qwen3" / "lora")).command
    assert "no QLoRA" in run(-6.5, -6.3, -6.300001, "ab", "cd", qlora_results=[], recipe_key="gpt-oss/lora")
    with pytest.raises(SmokeFailure, match="expected train, run_files .curves and SwanLab log., infer"):
        run(-6.5, -6.3, -6.300001, "ab", "cd", recipe_key="gpt-oss/lora")
    with pytest.raises(SmokeFailure, match="then QLoRA's train"):
        run(-6.5, -6.3, -6.300001, "ab", "cd", qlora_results=[])


def test_a_multi_card_recipe_must_train_in_the_spread_layout():
    """hunyuan-a13b/lora needs 4 cards: its run must report GPU_LAYOUT=spread (one process), a one-card recipe data."""
    report = run(-6.5, -6.3, -6.300001, "ab", "cd", recipe_key="hunyuan-a13b/lora", gpu_layout="spread")
    assert "GPU_LAYOUT=spread as on 4 cards: one process, weights on ['cpu']" in report
    with pytest.raises(SmokeFailure, match="GPU_LAYOUT should be spread for a recipe of 4 card"):
        run(-6.5, -6.3, -6.300001, "ab", "cd", recipe_key="hunyuan-a13b/lora", gpu_layout="data")
    with pytest.raises(SmokeFailure, match="GPU_LAYOUT should be data for a recipe of 1 card"):
        run(-6.5, -6.3, -6.300001, "ab", "cd", gpu_layout="spread")


def test_a_trained_adapter_passes():
    report = run(-6.5, -6.3, -6.300001, "<think>\n\n</think>\n\nab", "cd")
    assert "changes the greedy reply" in report
    assert "curves.png 1200×320 px" in report and "2 curves over 20 steps" in report and "20 loss points" in report


@pytest.mark.parametrize("files, message", [
    (run_files(swanlab_points=None), "no SwanLab log"),
    (run_files(steps=19), "drawn for step 19 .trained 20."),
    (run_files(png=base64.b64encode(b"GIF89a").decode()), "cannot identify image file"),
    (run_files(losses=(6.0, 6.2, 6.1, 6.0, 5.9, 5.8)), "curves.png's loss"),
])
def test_a_run_without_its_curves_or_swanlab_log_fails(files, message):
    from PIL import UnidentifiedImageError

    with pytest.raises((SmokeFailure, UnidentifiedImageError), match=message):
        run(-6.5, -6.3, -6.300001, "ab", "cd", files=files)


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


def test_a_qlora_run_passes():
    assert "QLoRA (4bit): loss" in run(-6.5, -6.3, -6.3, "ab", "cd")


@pytest.mark.parametrize("results, message", [
    (qlora(quantization="none"), "QLoRA trained with quantization 'none'"),
    (qlora(losses=(5.8, 5.9, 6.0, 6.1, 6.2, 6.3)), "QLoRA: loss did not go down"),
    (qlora(weights_gb=0.00085), "the 4-bit base takes"),
    (qlora(adapter_lp=-6.6), "the QLoRA adapter leaves the 4-bit model as it was"),
    (qlora(merged_dtype="uint8"), "must merge into the full-precision base"),
])
def test_a_qlora_run_that_did_not_do_its_part_fails(results, message):
    with pytest.raises(SmokeFailure, match=message):
        run(-6.5, -6.3, -6.3, "ab", "cd", results)


def test_a_run_without_the_qlora_phase_fails():
    with pytest.raises(SmokeFailure, match="then QLoRA's train"):
        run(-6.5, -6.3, -6.3, "ab", "cd", [])


def test_a_family_with_a_text_only_variant_also_trains_it():
    """Gemma-3's check ends with 4 steps on a tiny Gemma3ForCausalLM (model.yaml `variants:`); a missing or wrong
    variant run fails it, and families without variants run none."""
    from selfllm_recipes.discover import load_spec
    from selfllm_recipes.layout import RECIPES_DIR
    from selfllm_recipes.smoke.checks import check_for

    command = check_for(load_spec(RECIPES_DIR / "gemma3" / "lora")).command
    assert command.endswith("selfllm smoke-model /tmp/tiny-Gemma3ForCausalLM --architecture Gemma3ForCausalLM && "
                            "MODEL_PATH=/tmp/tiny-Gemma3ForCausalLM RUN_NAME=smoke-variant MAX_STEPS=4 selfllm start")
    assert "--architecture" not in check_for(load_spec(RECIPES_DIR / "qwen3" / "lora")).command
    variant = {**trained(), "steps": 4, "architecture": "Gemma3ForCausalLM"}
    report = run(-6.5, -6.3, -6.300001, "ab", "cd", qlora_results=[*qlora(), variant], recipe_key="gemma3/lora")
    assert "; 4 steps on a tiny Gemma3ForCausalLM (its own LoRA modules)" in report and "a missing image refused" in report
    with pytest.raises(SmokeFailure, match="then train on a Gemma3ForCausalLM"):
        run(-6.5, -6.3, -6.300001, "ab", "cd", recipe_key="gemma3/lora")
    with pytest.raises(SmokeFailure, match="training on the Gemma3ForCausalLM variant"):
        run(-6.5, -6.3, -6.300001, "ab", "cd", qlora_results=[*qlora(), {**variant, "architecture": "X"}],
            recipe_key="gemma3/lora")
