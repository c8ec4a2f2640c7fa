"""Task `grpo`: GRPO reinforcement learning (TRL's GRPOTrainer) of a LoRA adapter on math problems (GSM8K from
the model hubs, offline the shipped arithmetic word problems).

  selfllm start                          = selfllm grpo train with settings from the environment
  selfllm grpo train [--data F ...]      train; the adapter goes to $OUTPUT_DIR/<run-name>
  selfllm grpo infer --prompt TEXT [--adapter DIR] [--model DIR]
  selfllm grpo merge --adapter DIR [--out DIR] [--model DIR]
  selfllm grpo dashboard [RUN_DIR]       SwanLab's local dashboard of a run on HOST:PORT (default: the newest)
  selfllm grpo sample-data OUT.jsonl     write the shipped arithmetic word problems (question, answer)

Rewards: the built-in format + correctness rewards, or REWARD_MODULE=/path/to/rewards.py (REWARDS = [...]).
Settings (settings.GrpoSettings): flag, else environment variable, else the recipe's `env:`, else model.yaml's
`lora:`, else the default; they, the reward functions and the data are checked before the model is fetched.
Each action ends with one line `SELFLLM_RESULT {json}`.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from ..context import RecipeContext, load_context
from ..finetune import commands
from ..finetune.data import DataError
from ..finetune.grpo import GrpoInputs, prepare, train
from ..finetune.grpo_data import DEFAULT_GRPO_DATA_SHA256
from ..finetune.data import default_data
from ..model_source import ModelNotFound
from ..settings import DEFAULT_GRPO_DATA, GrpoSettings

_prepared: dict[int, GrpoInputs] = {}  # before_download's work, for run() of the same settings


def _fail(exc: Exception) -> SystemExit:
    print(f"selfllm grpo: error: {exc}", file=sys.stderr, flush=True)
    return SystemExit(2)


def before_download(context: RecipeContext, settings: GrpoSettings) -> None:
    """`selfllm start`, before the model is fetched: the reward functions and the data must be usable."""
    try:
        _prepared[id(settings)] = prepare(settings)
    except (DataError, ValueError) as exc:  # RewardError, DataSourceError: one line, status 2
        raise _fail(exc) from None


def run(context: RecipeContext, model_dir: Path, settings: GrpoSettings) -> None:
    """`selfllm start`: train with the settings from the environment; NPROC > 1: under torchrun."""
    commands.relaunch_under_torchrun(settings, "selfllm grpo")
    try:
        inputs = _prepared.pop(id(settings), None) or prepare(settings)
        train(context, model_dir, settings, inputs)
    except (DataError, ValueError) as exc:
        raise _fail(exc) from None


def build_parser() -> argparse.ArgumentParser:
    return commands.training_parser("selfllm grpo", __doc__, GrpoSettings, "train a LoRA adapter with GRPO",
                                    "write the shipped arithmetic word problems (question, answer)")[0]


def main(argv: list[str] | None = None, recipe: str | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.action == "sample-data":
            shutil.copyfile(default_data(DEFAULT_GRPO_DATA, DEFAULT_GRPO_DATA_SHA256), args.out)
            print(args.out)
            return 0
        context = load_context(args.recipe or recipe)
        if args.action == "train":
            settings = context.settings(GrpoSettings, cli=vars(args))
            inputs = prepare(settings)  # rewards and data checked before the model is fetched
            train(context, commands.model_dir(context, settings), settings, inputs)
            return 0
        commands.run_adapter_action(context, args)
    except (DataError, ValueError, ModelNotFound) as exc:
        print(f"selfllm grpo: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0
