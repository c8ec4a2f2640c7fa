"""Task `lora`: LoRA fine-tuning of the recipe's model (upstream's huanhuan.json, shipped, by default).

  selfllm start                          = selfllm lora train with settings from the environment
  selfllm lora train [--data F ...]      fine-tune; the adapter goes to $OUTPUT_DIR/<run-name>
  selfllm lora infer --prompt TEXT [--image PATH] [--adapter DIR] [--model DIR]
  selfllm lora merge --adapter DIR [--out DIR] [--model DIR]
  selfllm lora sample-data OUT.json      write a small synthetic data set (both formats)
  selfllm lora sample-data --latex-ocr OUT.json   copy the shipped LaTeX-OCR image set (images beside OUT)
  selfllm lora dashboard [RUN_DIR]       SwanLab's local dashboard of a run on HOST:PORT (default: the newest)

Every run draws its curves into <run>/curves.png and, with REPORT_TO=swanlab (the default, offline), logs
to <run>/swanlog.

The base model is --model, else MODEL_PATH, else MODEL_ID downloaded like `selfllm start`. Settings
(settings.LoraSettings): flag, else environment variable, else the recipe's `env:`, else model.yaml's
`lora:`, else the default; all are checked before the model is fetched. Each action ends with one line
`SELFLLM_RESULT {json}`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..context import RecipeContext, load_context
from ..finetune.data import DataError, write_sample_data
from ..finetune import commands, layout
from ..finetune.lora import train
from ..finetune.vision import check_data as check_image_data
from ..finetune.vision_data import copy_image_data
from ..model_source import ModelNotFound
from ..settings import LoraSettings


def before_download(context: RecipeContext, settings: LoraSettings) -> None:
    """`selfllm start`, before the model is fetched: a recipe that needs several cards must see enough of them."""
    try:
        layout.choose(context, settings)
    except ValueError as exc:
        print(f"selfllm lora: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def run(context: RecipeContext, model_dir: Path, settings: LoraSettings) -> None:
    """`selfllm start`: train with the settings from the environment (no flags); NPROC > 1 (and not yet inside
    torchrun): the same command under torchrun, one process per GPU (CPU: gloo)."""
    commands.relaunch_under_torchrun(settings, "selfllm lora")
    try:
        train(context, model_dir, settings)
    except (DataError, ValueError) as exc:  # DataSourceError, SettingsError: one line, status 2 as `selfllm lora`
        print(f"selfllm lora: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def build_parser() -> argparse.ArgumentParser:
    parser, sample = commands.training_parser("selfllm lora", __doc__, LoraSettings, "fine-tune a LoRA adapter",
                                              "write a small synthetic data set mixing both formats")
    sample.add_argument("--count", type=int, default=36)
    sample.add_argument("--latex-ocr", action="store_true", help="instead: a copy of the shipped LaTeX-OCR image-text "
                        "set (OUT and OUT's images/ folder)")
    return parser


def main(argv: list[str] | None = None, recipe: str | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.action == "sample-data":
        print(copy_image_data(Path(args.out)) if args.latex_ocr else write_sample_data(Path(args.out), args.count))
        return 0
    context = load_context(args.recipe or recipe)
    try:
        if args.action == "train":
            settings = context.settings(LoraSettings, cli=vars(args))  # checked before the model is fetched
            check_image_data(context, settings)  # every image of DATA_PATH decodes, before the model is fetched
            layout.choose(context, settings)  # enough cards for a recipe that needs several
            train(context, commands.model_dir(context, settings), settings)
            return 0
        commands.run_adapter_action(context, args)
    except (DataError, ValueError, ModelNotFound) as exc:
        print(f"selfllm lora: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0
