#!/usr/bin/env python3
"""LoRA training throughput (tokens/s, padding excluded) of the shared `lora` task.

Default: the tiny random Qwen3 on CPU with a small generated data set (both formats).
On real hardware: MODEL_PATH=/root/autodl-tmp/Qwen/Qwen3-8B python benchmarks/lora_tokens_per_s.py
(uses ../shared/data/huanhuan.json when it exists, else DATA_PATH, else generated data).
Without the real weights, `--shape qwen3-8b` times a random model of Qwen3-8B's exact shape (bf16,
needs a GPU with ~24 GB): throughput does not depend on the weights' values.

  python benchmarks/lora_tokens_per_s.py [--steps 20] [--batch-size 4] [--max-length 1024]
Prints one line `lora_tokens_per_s <figure>` plus the run's SELFLLM_RESULT line.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "runtime"))

from selfllm_runtime.context import load_context  # noqa: E402
from selfllm_runtime.finetune.data import write_sample_data  # noqa: E402
from selfllm_runtime.finetune.lora import train  # noqa: E402
from selfllm_runtime.settings import LoraSettings  # noqa: E402

SHARED_HUANHUAN = REPO.parent / "shared" / "data" / "huanhuan.json"
# Qwen/Qwen3-8B config.json (the dimensions that decide the cost of a training step)
SHAPES = {"qwen3-8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                           num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                           rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)}


def random_model_of_shape(tiny: Path, shape: str, out: Path) -> Path:
    """The tiny model's tokenizer with a random model of a real checkpoint's dimensions."""
    import shutil

    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(tiny)
    for key, value in SHAPES[shape].items():
        setattr(config, key, value)
    config.layer_types = ["full_attention"] * config.num_hidden_layers
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = getattr(transformers, config.architectures[0])(config).to(torch.bfloat16)
    model.save_pretrained(out)
    del model
    for f in tiny.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "qwen3" / "lora"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3, help="steps run first and not measured")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--shape", choices=sorted(SHAPES), help="time a random model of this real shape")
    args = parser.parse_args()
    context = load_context(args.recipe)
    work = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    model = os.environ.get("MODEL_PATH")
    if model is None:
        from selfllm_runtime.smoke_model import make_smoke_model

        model = str(make_smoke_model(context, work / "smoke-model"))
        if args.shape:
            model = str(random_model_of_shape(Path(model), args.shape, work / f"{args.shape}-random"))
    data = os.environ.get("DATA_PATH") or (str(SHARED_HUANHUAN) if SHARED_HUANHUAN.is_file() and (
        "MODEL_PATH" in os.environ or args.shape) else str(write_sample_data(work / "sample.json", 96)))
    env = {"DATA_PATH": data, "OUTPUT_DIR": str(work / "out"), "GRAD_ACCUM": "1", "LOGGING_STEPS": "1",
           "BATCH_SIZE": str(args.batch_size), "MAX_LENGTH": str(args.max_length), "SAVE_STEPS": "100000"}
    if args.warmup:
        train(context, Path(model), context.settings(LoraSettings, env={**env, "MAX_STEPS": str(args.warmup),
                                                                           "RUN_NAME": "warmup"}))
    result = train(context, Path(model), context.settings(LoraSettings, env={**env, "MAX_STEPS": str(args.steps),
                                                                                "RUN_NAME": "bench"}))
    print(f"lora_tokens_per_s {result['tokens_per_s']} (model {Path(model).name}, device {result['device']}, "
          f"{result['train_tokens']} tokens in {result['seconds']} s, batch {args.batch_size}, {args.steps} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
