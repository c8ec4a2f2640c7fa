#!/usr/bin/env python3
"""Memory per QUANTIZATION (none / 8bit / 4bit), measured, beside the estimates the READMEs' VRAM tables show.

On a GPU: for each setting, the peak CUDA memory of loading the model and generating (the engine every chat
task shares), and of a few LoRA / QLoRA training steps. Real weights: MODEL_PATH=/root/autodl-tmp/Qwen/Qwen3-8B;
without them `--shape qwen3-8b` builds a random model of the checkpoint's exact dimensions (memory does not
depend on the weights' values; the smoke tokenizer's sequences are longer than the real one's).
On CPU (no GPU): the tiny model's weights per setting (transformers' get_memory_footprint) beside
metadata's weights formula for the same parameter counts, which checks the formula the estimates use.

  .venv/bin/python benchmarks/vram.py [--recipe recipes/qwen3/lora] [--shape qwen3-8b] [--steps 5]
Prints one line per setting and task.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "runtime"), str(REPO / "benchmarks")]

from lora_tokens_per_s import SHAPES, random_model_of_shape  # noqa: E402

from selfllm_runtime.chat_engine import ChatEngine  # noqa: E402
from selfllm_runtime.context import load_context  # noqa: E402
from selfllm_runtime.finetune.data import write_sample_data  # noqa: E402
from selfllm_runtime.finetune.lora import train  # noqa: E402
from selfllm_runtime.loading import parameter_count  # noqa: E402
from selfllm_runtime.metadata import QUANTIZATIONS, ParameterCount, TaskKind  # noqa: E402
from selfllm_runtime.settings import EngineSettings, LoraSettings  # noqa: E402
from selfllm_runtime.smoke_model import make_smoke_model  # noqa: E402


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "qwen3" / "lora"))
    parser.add_argument("--shape", choices=sorted(SHAPES), help="a random model of this checkpoint's dimensions")
    parser.add_argument("--steps", type=int, default=5, help="training steps per setting (GPU)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args()
    context = load_context(args.recipe)
    gpu = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="vram-"))
    model_dir = Path(os.environ["MODEL_PATH"]) if os.environ.get("MODEL_PATH") else make_smoke_model(context, work / "tiny")
    if args.shape:
        model_dir = random_model_of_shape(model_dir, args.shape, work / args.shape)
    data = write_sample_data(work / "sample.json", 64)
    print(f"model {model_dir} on {torch.cuda.get_device_name(0) if gpu else 'cpu'}", flush=True)
    family = context.family
    count: ParameterCount | None = None  # from the unquantized load, which comes first
    for quantization in QUANTIZATIONS:
        if gpu:
            torch.cuda.reset_peak_memory_stats()
        engine = ChatEngine(context, model_dir, context.settings(EngineSettings, env={"QUANTIZATION": quantization}))
        engine.generate([{"role": "user", "content": "你好，请介绍一下你自己"}],
                        engine.params(max_new_tokens=args.max_new_tokens, temperature=0))
        if count is None:
            count = parameter_count(engine.model)
        weights = engine.loaded.weights_gb
        formula = count.weights_gb(quantization, full_bytes=torch.finfo(engine.loaded.dtype).bits / 8)
        del engine
        if not gpu:
            print(f"vram {quantization} weights {weights * 1e3:.3f} MB, formula {formula * 1e3:.3f} MB "
                  f"({100 * (formula / weights - 1):+.1f}%)", flush=True)
            continue
        peak = torch.cuda.max_memory_reserved() / 2**30
        print(f"vram {quantization} chat: peak {peak:.2f} GiB (weights {weights:.2f} GB); README estimate "
              f"{family.vram_estimate(TaskKind.fastapi, quantization):g} GB", flush=True)
        torch.cuda.empty_cache()
        env = {"DATA_PATH": str(data), "OUTPUT_DIR": str(work / "out"), "RUN_NAME": f"vram-{quantization}",
               "MAX_STEPS": str(args.steps), "LOGGING_STEPS": "1", "QUANTIZATION": quantization}
        result = train(context, model_dir, context.settings(LoraSettings, env=env))
        print(f"vram {quantization} lora: peak {result['peak_gpu_memory_gb']:.2f} GiB; README estimate "
              f"{family.vram_estimate(TaskKind.lora, quantization):g} GB", flush=True)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
