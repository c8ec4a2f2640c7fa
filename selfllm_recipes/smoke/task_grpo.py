"""Smoke check of task `grpo`: a run to completion, not a server. A tiny random model can't learn math, so the RL
loop is shown on a reward it can learn in a few dozen steps: the share of even token ids in its completions
(REWARD_MODULE, a file the check writes; sampling at a low temperature, where the adapter can move the tiny model's
flat logits). `selfllm start` trains 30 GRPO steps on it and the mean reward must rise (first → last in the report
line). Then one step with the built-in format + math-correctness rewards on the default data (no hub here: the
shipped arithmetic problems, after one warning line), and `selfllm grpo infer` / `merge` on the adapter (the lora
task's code): the adapter moves the prompt's log-prob and the merged model answers as base + adapter. The first
run's curves.png and offline SwanLab log (smoke/run_files.py) must hold the rewards it reported."""
from __future__ import annotations

from .checks import LOGPROB_MOVED, LOGPROB_SAME, SMOKE_MODEL_DIR, SmokeCheck, expect, results
from .run_files import run_files_step, verify_run_files

ADAPTER = "/root/autodl-tmp/grpo/smoke"
MERGED = ADAPTER + "-merged"
REWARDS = "/tmp/learnable_rewards.py"
# The learnable reward (REWARDS = [...], each (completions, answer, **kwargs) -> one score per completion).
REWARD_CODE = ["def even_tokens(completions, answer, completion_ids=None, **kwargs):",
               "    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]",
               "REWARDS = [even_tokens]"]
STEPS = 30
ASK = "--prompt 'What is 2 + 3?' --temperature 0 --max-new-tokens 8"
COMMAND = " && ".join([
    f"selfllm smoke-model {SMOKE_MODEL_DIR}",
    "printf '%s\\n' " + " ".join(f"'{line}'" for line in REWARD_CODE) + f" > {REWARDS}",
    f"REWARD_MODULE={REWARDS} MAX_STEPS={STEPS} TEMPERATURE=0.1 selfllm start",
    run_files_step(ADAPTER, "train/reward"),  # curves.png, curves.json and the SwanLab log of that run
    "RUN_NAME=smoke-math MAX_STEPS=1 BATCH_SIZE=4 NUM_GENERATIONS=4 MAX_COMPLETION_LENGTH=16 selfllm start",
    f"selfllm grpo infer {ASK}",
    f"selfllm grpo infer --adapter {ADAPTER} {ASK}",
    f"selfllm grpo merge --adapter {ADAPTER} --out {MERGED}",
    f"selfllm grpo infer --model {MERGED} {ASK}",
])
ENV = {"RUN_NAME": "smoke", "BATCH_SIZE": "8", "NUM_GENERATIONS": "8", "MAX_COMPLETION_LENGTH": "12",
       "LEARNING_RATE": "2e-2", "LOGGING_STEPS": "1", "SAVE_STEPS": "1000"}
ACTIONS = ["train", "run_files", "train", "infer", "infer", "merge", "infer"]
RISE = 0.05  # the learnable reward's mean must rise at least this much (first five steps → last five)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def verify_grpo(session) -> str:
    code = session.exit_code()
    found = results(session.logs())
    actions = [r["action"] for r in found]
    expect(code == 0, f"the container exited with code {code} after {actions or 'no result'}")
    expect(actions == ACTIONS, f"expected {ACTIONS}; got {actions}")
    learned, files, math, base, adapted, merged, from_merged = found
    rewards = learned["rewards"]
    expect(learned["steps"] == STEPS and len(rewards) == STEPS, f"learnable reward: {learned['steps']} steps, "
           f"{len(rewards)} rewards logged")
    first, last = mean(rewards[:5]), mean(rewards[-5:])
    expect(last >= first + RISE, f"the mean reward did not rise by {RISE}: {rewards}")
    expect({"adapter_config.json", "adapter_model.safetensors"} <= set(learned["adapter_files"]),
           f"adapter files: {learned['adapter_files']}")
    expect(math["steps"] == 1 and set(math["reward_functions"]) == {"format_reward", "correctness_reward"}
           and math["data"][0].endswith("arithmetic.jsonl") and math["prompts"] > 100,
           f"one step with the built-in rewards on the shipped problems: {math}")
    tracked = verify_run_files(files, STEPS, rewards, "reward", session)
    base_lp, adapter_lp, merged_lp = (r["prompt_logprob"] for r in (base, adapted, from_merged))
    expect(base["adapter"] is None and adapted["adapter"] == ADAPTER and adapted["completion_tokens"] > 0,
           f"inference with the adapter: {adapted}")
    expect(abs(adapter_lp - base_lp) > LOGPROB_MOVED,
           f"the adapter leaves the model as it was: prompt log-prob {base_lp} (base) vs {adapter_lp} (adapter)")
    expect(abs(merged_lp - adapter_lp) < LOGPROB_SAME and "config.json" in merged["files"],
           f"the merged model is not base + adapter: {merged_lp} vs {adapter_lp}; files {merged['files']}")
    return (f"GRPO {STEPS} steps × {learned['num_generations']} completions ({learned['device']}, "
            f"{learned['seconds']:.0f} s): learnable reward {first:.3f} → {last:.3f}; 1 step with "
            f"format + correctness rewards on {math['prompts']} shipped problems (reward {math['reward_last']}); the "
            f"adapter moves the prompt log-prob {base_lp:.4f} → {adapter_lp:.4f}, merged model = base + adapter; {tracked}")


CHECK = SmokeCheck(command=COMMAND, verify=verify_grpo, serves_http=False, env=ENV)
