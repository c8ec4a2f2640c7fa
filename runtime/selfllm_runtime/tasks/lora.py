"""Task `lora`: LoRA fine-tuning of the recipe's model (upstream's huanhuan.json, shipped, by default).

  selfllm start                          = selfllm lora train with settings from the environment
  selfllm lora train [--data F ...]      fine-tune; the adapter goes to $OUTPUT_DIR/<run-name>
  selfllm lora infer --prompt TEXT [--adapter DIR] [--model DIR]
  selfllm lora merge --adapter DIR [--out DIR] [--model DIR]
  selfllm lora sample-data OUT.json      write a small synthetic data set (both formats)

The base model is --model, else MODEL_PATH, else MODEL_ID downloaded like `selfllm start`.
Each action ends with one line `SELFLLM_RESULT {json}`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..context import RecipeContext, load_context
from ..finetune.data import DataError, write_sample_data
from ..finetune.lora import infer, merge, train
from ..finetune.settings import add_train_flags, resolve_settings
from ..model_source import ModelNotFound, request_from_env, resolve_model


def run(context: RecipeContext, model_dir: Path) -> None:
    """`selfllm start`: train with the settings from the environment (no flags)."""
    try:
        settings = resolve_settings(context)
        train(context, model_dir, settings)
    except (DataError, ValueError) as exc:  # DataSourceError, SettingsError: one line, status 2 as `selfllm lora`
        print(f"selfllm lora: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _model_dir(context: RecipeContext, given: str | None) -> Path:
    return Path(given) if given else resolve_model(request_from_env(context.recipe))


def _optional_bool(text: str) -> bool:
    return text.strip().lower() in {"1", "true", "yes", "on"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfllm lora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", help="recipe folder (default: $RECIPE_DIR or /opt/recipe)")
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("train", help="fine-tune a LoRA adapter")
    p.add_argument("--model", help="base model folder (default: MODEL_PATH / MODEL_ID)")
    add_train_flags(p)
    p = sub.add_parser("infer", help="generate one reply with base model + adapter (or a merged model)")
    p.add_argument("--model", help="base or merged model folder (default: MODEL_PATH / MODEL_ID)")
    p.add_argument("--adapter", default=os.environ.get("ADAPTER_PATH"), help="adapter folder (env ADAPTER_PATH)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", default=None, help="system prompt (default: the one used in training)")
    p.add_argument("--enable-thinking", type=_optional_bool, nargs="?", const=True, default=None)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=None, help="default: the checkpoint's generation_config")
    p.add_argument("--top-p", type=float, default=None, help="default: the checkpoint's generation_config")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("merge", help="merge the adapter into a full model folder")
    p.add_argument("--model", help="base model folder (default: MODEL_PATH / MODEL_ID)")
    p.add_argument("--adapter", default=os.environ.get("ADAPTER_PATH"), required="ADAPTER_PATH" not in os.environ)
    p.add_argument("--out", help="merged model folder (default: <adapter>-merged)")
    p = sub.add_parser("sample-data", help="write a small synthetic data set mixing both formats")
    p.add_argument("out")
    p.add_argument("--count", type=int, default=36)
    return parser


def main(argv: list[str] | None = None, recipe: str | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.action == "sample-data":
        print(write_sample_data(Path(args.out), args.count))
        return 0
    context = load_context(args.recipe or recipe)
    try:
        if args.action == "train":
            cli = {k: v for k, v in vars(args).items() if k not in {"recipe", "action", "model"}}
            train(context, _model_dir(context, args.model), resolve_settings(context, cli))
        elif args.action == "infer":
            adapter = Path(args.adapter) if args.adapter else None
            infer(context, _model_dir(context, args.model), adapter, args.prompt, args.system, args.enable_thinking,
                  args.max_new_tokens, args.temperature, args.top_p, args.seed)
        else:
            adapter = Path(args.adapter)
            out = Path(args.out) if args.out else adapter.with_name(adapter.name + "-merged")
            merge(context, _model_dir(context, args.model), adapter, out)
    except (DataError, ValueError, ModelNotFound) as exc:
        print(f"selfllm lora: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0
