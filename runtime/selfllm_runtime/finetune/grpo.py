"""GRPO (TRL's GRPOTrainer) on a LoRA adapter of the recipe's model: groups of sampled completions per math
problem, scored by reward functions (finetune/rewards.py, or REWARD_MODULE), the adapter pushed toward the
better ones. The adapter is the lora task's kind: `infer` and `merge` are finetune/lora.py's."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..context import RecipeContext
from ..loading import apply_torch_threads
from ..settings import GrpoSettings
from ..system_role import render_chat
from . import resume
from .grpo_data import Problem, problem_files, read_problems
from .lora import (RESUME_FIELDS, adapter_model, emit_result, load_tokenizer, publish_adapter, stage_adapter,
                   thinking_kwargs, trainer_arguments, training_identity)
from .rewards import Markers, RewardFunction, for_trainer, load_rewards
from .tracking import tracking_for

log = logging.getLogger("selfllm.grpo")
# The settings a GRPO checkpoint is tied to besides LoRA's (RESUME=auto continues only when all match).
GRPO_RESUME_FIELDS = RESUME_FIELDS + ("num_generations", "max_completion_length", "temperature", "beta",
                                      "reward_module", "data_hub")


@dataclass(frozen=True)
class GrpoInputs:
    """What a run needs besides the model, read and checked before the model is fetched."""

    paths: list[Path]
    problems: list[Problem]
    rewards: list[RewardFunction]


def prepare(settings: GrpoSettings) -> GrpoInputs:
    """The reward functions (REWARD_MODULE or the built-in ones) and the problems; RewardError / DataError /
    DataSourceError name what is wrong."""
    rewards = load_rewards(settings.reward_module)
    paths = problem_files(settings)
    problems = read_problems(paths, settings.max_samples)
    if not problems:
        raise ValueError(f"no problems in {', '.join(map(str, paths))}")
    log.info("%d problems from %s; rewards: %s", len(problems), ", ".join(map(str, paths)),
             ", ".join(f.__name__ for f in rewards))
    return GrpoInputs(paths, problems, rewards)


def markers(context: RecipeContext) -> Markers:
    """The family's reasoning markers (model.yaml `reasoning:`) where it has them, and the answer tags."""
    reasoning = context.family.reasoning
    return Markers(reasoning.start, reasoning.end) if reasoning else Markers()


def system_prompt(context: RecipeContext, settings: GrpoSettings) -> str | None:
    """SYSTEM_PROMPT when given (empty: none), else the format instruction made from the markers."""
    if "system_prompt" in settings.model_fields_set:  # given (flag, environment, env:), maybe empty
        return settings.system_prompt
    return markers(context).instruction()


def prompts(context: RecipeContext, tokenizer: Any, settings: GrpoSettings, inputs: GrpoInputs,
            system: str | None) -> tuple[list[dict[str, str]], int]:
    """The problems as GRPOTrainer's rows (prompt text rendered by the family's template, the question and the
    reference answer), and how many were skipped as longer than MAX_LENGTH tokens."""
    template = thinking_kwargs(context, settings.enable_thinking)
    rows, skipped = [], 0
    for problem in inputs.problems:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": problem.question}]
        text = render_chat(tokenizer, messages, context.family.system_role, add_generation_prompt=True, **template)
        if len(tokenizer(text, add_special_tokens=False).input_ids) > settings.max_length:
            skipped += 1
            continue
        rows.append({"prompt": text, "question": problem.question, "answer": problem.final})
    return rows, skipped


def train(context: RecipeContext, model_dir: Path, settings: GrpoSettings, inputs: GrpoInputs) -> dict[str, Any]:
    """Train a LoRA adapter with GRPO; returns (and prints as SELFLLM_RESULT) a summary with the rewards."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model_dir = Path(model_dir)
    context = context.for_checkpoint(model_dir)
    run_dir = settings.run_dir(model_dir)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if int(os.environ.get("RANK", "0")) != 0:
        log.setLevel(logging.WARNING)
    torch.manual_seed(settings.seed)
    log.info("%s", apply_torch_threads(settings.torch_threads))
    tokenizer = load_tokenizer(context, model_dir, settings.chat_template)
    tokenizer.padding_side = "left"  # generation pads prompts on the left
    system = system_prompt(context, settings)
    rows, skipped = prompts(context, tokenizer, settings, inputs, system)
    if not rows:
        raise ValueError(f"every problem is longer than MAX_LENGTH={settings.max_length} tokens")
    log.info("%d prompts (%d skipped as longer than MAX_LENGTH=%d); system prompt: %r", len(rows), skipped,
             settings.max_length, system)
    identity = training_identity(settings, model_dir, inputs.paths, world, GRPO_RESUME_FIELDS)
    start = resume.plan(run_dir, identity, settings.resume)  # refuses before the model is loaded
    loaded, model = adapter_model(context, model_dir, settings)
    device = loaded.device

    logged: list[dict[str, float]] = []

    class RewardRecorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                logged.append({k: float(v) for k, v in logs.items() if isinstance(v, (int, float))})

    tracked = tracking_for(settings, run_dir, project="selfllm-grpo")
    stop_ids = [i for i in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(context.family.special_tokens.eos)}
                if isinstance(i, int) and i >= 0]
    args = GRPOConfig(
        **trainer_arguments(settings, run_dir, loaded, tracked, world),
        disable_tqdm=True,
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length,
        temperature=settings.temperature,
        beta=settings.beta,
        generation_kwargs={"eos_token_id": stop_ids} if stop_ids else None,
        log_completions=False,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=for_trainer(inputs.rewards, markers(context)), args=args,
                          train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          callbacks=[RewardRecorder(), resume.record_callback(identity), *tracked.callbacks])
    output, start, seconds = resume.train_from(trainer, start, log)
    staged = stage_adapter(trainer, run_dir)
    if not trainer.is_world_process_zero():
        return {}
    info = {"base_model": str(model_dir), "family": context.recipe.model, "data": [str(p) for p in inputs.paths],
            "system_prompt": system, "enable_thinking": settings.enable_thinking,
            "rewards": [f.__name__ for f in inputs.rewards], "settings": json.loads(settings.model_dump_json())}
    publish_adapter(staged, tokenizer, run_dir, info)
    rewards = [round(x["reward"], 4) for x in logged]
    per_function = {f.__name__: [round(x.get(f"rewards/{f.__name__}/mean", float("nan")), 4) for x in logged]
                    for f in inputs.rewards}
    return emit_result(
        "train", adapter_dir=str(run_dir), architecture=context.family.architecture, device=device,
        quantization=settings.quantization, base_weights_gb=loaded.weights_gb, steps=int(output.global_step),
        resumed_from_step=start.step, trained_steps=int(output.global_step) - start.step, prompts=len(rows),
        data=[str(p) for p in inputs.paths],
        num_generations=settings.num_generations, reward_first=rewards[0] if rewards else None,
        reward_last=rewards[-1] if rewards else None, rewards=rewards[:500], reward_functions=per_function,
        peak_gpu_memory_gb=round(torch.cuda.max_memory_reserved() / 2**30, 2) if device == "cuda" else None,
        seconds=round(seconds, 3), adapter_files=sorted(p.name for p in run_dir.glob("adapter_*")))
