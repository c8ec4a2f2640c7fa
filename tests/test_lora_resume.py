"""A stopped LoRA run resumes (RESUME=auto|never|<checkpoint>) on the tiny random Qwen3, as the image runs it
(`python -m selfllm_runtime start`): killed right after a checkpoint, the same command continues there and ends
with the adapter and the loss of an uninterrupted run. A changed setting refuses to resume, naming it; a
checkpoint cut off mid-write is skipped."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from selfllm_recipes.layout import RECIPES_DIR, REPO_ROOT
from selfllm_runtime.finetune import resume
from selfllm_runtime.finetune.data import write_sample_data
from selfllm_runtime.finetune.lora import RESULT_PREFIX

STEPS, SAVE_EVERY, KILLED_AT = 12, 4, 8

# `selfllm start`, SIGKILLed by itself right after the checkpoint of step $STOP_AT_STEP is complete (record
# written): the same moment a stopped AutoDL instance leaves, without any race on timing.
STOP_AFTER_CHECKPOINT = """
import os, signal, sys
from selfllm_runtime.finetune import resume
made = resume.record_callback
def record_then_die(identity):
    callback = made(identity)
    saved = callback.on_save
    def on_save(args, state, control, **kwargs):
        saved(args, state, control, **kwargs)
        if state.global_step == int(os.environ["STOP_AT_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)
    callback.on_save = on_save
    return callback
resume.record_callback = record_then_die
from selfllm_runtime.cli import main
sys.exit(main(["start"]))
"""


@pytest.fixture(scope="module")
def lora_env(tiny_recipe, tmp_path_factory) -> dict[str, str]:
    model = tiny_recipe("qwen3/lora")[1]
    work = tmp_path_factory.mktemp("resume")
    path = os.pathsep.join(filter(None, [str(REPO_ROOT / "runtime"), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "RECIPE_DIR": str(RECIPES_DIR / "qwen3" / "lora"),
            "MODEL_PATH": str(model), "DATA_PATH": str(write_sample_data(work / "sample.json", 24)),
            "OUTPUT_DIR": str(work / "out"), "MAX_STEPS": str(STEPS), "SAVE_STEPS": str(SAVE_EVERY),
            "LEARNING_RATE": "5e-3", "BATCH_SIZE": "2", "GRAD_ACCUM": "2", "LOGGING_STEPS": "1",
            "LORA_DROPOUT": "0.1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def start(env: dict[str, str], *, stop_at: int | None = None, **more: str) -> subprocess.CompletedProcess:
    argv = ([sys.executable, "-c", STOP_AFTER_CHECKPOINT] if stop_at else [sys.executable, "-m", "selfllm_runtime", "start"])
    extra = {"STOP_AT_STEP": str(stop_at)} if stop_at else {}
    return subprocess.run(argv, env={**env, **more, **extra}, capture_output=True, text=True, timeout=600)


def result_of(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    return json.loads(lines[-1].removeprefix(RESULT_PREFIX))


def adapter_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(lora_env) -> dict:
    return result_of(start(lora_env, RUN_NAME="a"))


@pytest.fixture(scope="module")
def killed_and_restarted(lora_env) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    killed = start(lora_env, stop_at=KILLED_AT, RUN_NAME="b")
    run_b = Path(lora_env["OUTPUT_DIR"]) / "b"
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert sorted(p.name for p in run_b.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-8"]
    assert not list(run_b.glob("adapter_*")), "the killed run left an adapter where the final one goes"
    again = start(lora_env, RUN_NAME="b")
    return killed, again


def test_a_killed_run_resumes_and_ends_with_the_uninterrupted_adapter(uninterrupted, killed_and_restarted, lora_env):
    import torch

    _, again = killed_and_restarted
    run_b = Path(lora_env["OUTPUT_DIR"]) / "b"
    assert f"RESUME=auto: resuming from checkpoint-{KILLED_AT} at step {KILLED_AT}" in again.stderr, again.stderr[-3000:]
    resumed = result_of(again)
    assert resumed["resumed_from_step"] == KILLED_AT and resumed["trained_steps"] == STEPS - KILLED_AT
    assert resumed["steps"] == uninterrupted["steps"] == STEPS
    assert len(resumed["losses"]) == STEPS - KILLED_AT  # only the remaining steps were trained
    assert resumed["loss_last"] == pytest.approx(uninterrupted["loss_last"], rel=1e-4, abs=1e-4)
    assert resumed["losses"] == pytest.approx(uninterrupted["losses"][KILLED_AT:], rel=1e-4, abs=1e-4)
    a, b = adapter_weights(Path(uninterrupted["adapter_dir"])), adapter_weights(run_b)
    assert a.keys() == b.keys() and a
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a), worst
    print(f"resumed at step {KILLED_AT} of {STEPS}: last loss {resumed['loss_last']} vs {uninterrupted['loss_last']} "
          f"uninterrupted; largest adapter difference {worst:.2e}")


def test_a_changed_setting_refuses_to_resume_and_names_it(killed_and_restarted, lora_env):
    done = start(lora_env, RUN_NAME="b", LORA_R="4")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("selfllm lora: error: RESUME=auto: ") and "LORA_R=8 then, 4 now" in last, last
    assert "another RUN_NAME" in last and "RESUME=never" in last
    data = Path(lora_env["DATA_PATH"])
    other = data.with_name("other.json")
    other.write_text(json.dumps(json.loads(data.read_text())[:-1]), encoding="utf-8")
    done = start(lora_env, RUN_NAME="b", DATA_PATH=str(other))
    assert done.returncode == 2 and "DATA=sample.json" in done.stderr.strip().splitlines()[-1]


def test_resume_never_starts_over(killed_and_restarted, lora_env):
    done = start(lora_env, RUN_NAME="b", RESUME="never", MAX_STEPS="2", SAVE_STEPS="100")
    result = result_of(done)
    assert "RESUME=never: training from step 0" in done.stderr
    assert result["resumed_from_step"] == 0 and result["steps"] == 2 and len(result["losses"]) == 2


def identity() -> dict[str, str]:
    return {"MODEL": "m", "DATA": "d (sha256 1)", "LORA_R": "8", "LEARNING_RATE": "0.0001"}


def checkpoint(run: Path, step: int, record: dict[str, str] | None) -> Path:
    """A checkpoint folder as the Trainer leaves it, with real safetensors and torch.save files."""
    import torch
    from safetensors.torch import save_file

    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"w": torch.ones(64, 64)}, str(folder / "adapter_model.safetensors"))
    torch.save({"state": torch.zeros(256)}, folder / "optimizer.pt")
    (folder / resume.TRAINER_STATE).write_text(json.dumps({"global_step": step}))
    if record is not None:
        resume.write_record(folder, record)
    return folder


def test_a_checkpoint_cut_off_mid_write_is_skipped(tmp_path):
    run = tmp_path / "run"
    checkpoint(run, 4, identity())
    cut = checkpoint(run, 8, identity())
    weights = cut / "adapter_model.safetensors"
    whole = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:1000])
    unfinished = checkpoint(run, 12, None)  # killed before the record
    chosen = resume.plan(run, identity(), "auto")
    assert chosen.checkpoint == run / "checkpoint-4" and chosen.step == 4
    assert chosen.skipped == (f"RESUME=auto: skipping {unfinished}: no {resume.RESUME_RECORD} (the run stopped "
                              "before the checkpoint was finished)",
                              f"RESUME=auto: skipping {cut}: adapter_model.safetensors is cut off (1000 of {whole} bytes)")
    optimizer = run / "checkpoint-4" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:-40])
    nothing = resume.plan(run, identity(), "auto")
    assert nothing.checkpoint is None and "optimizer.pt is cut off" in nothing.skipped[-1]
    assert nothing.line == f"RESUME=auto: no complete checkpoint in {run}: training from step 0"


def test_resume_names_a_checkpoint_folder(tmp_path):
    run = tmp_path / "run"
    folder = checkpoint(run, 4, identity())
    changed = {**identity(), "LEARNING_RATE": "0.0002"}
    chosen = resume.plan(run, changed, str(folder))  # a schedule change: said, not refused
    assert chosen.checkpoint == folder and "changed: LEARNING_RATE=0.0001 then, 0.0002 now" in chosen.line
    with pytest.raises(resume.ResumeRefused, match="LORA_R=8 then, 16 now; its weights don't fit"):
        resume.plan(run, {**identity(), "LORA_R": "16"}, str(folder))
    with pytest.raises(resume.ResumeRefused, match="no such checkpoint folder"):
        resume.plan(run, identity(), str(run / "checkpoint-99"))
    with pytest.raises(resume.ResumeRefused, match="auto: .*LEARNING_RATE=0.0001 then, 0.0002 now"):
        resume.plan(run, changed, "auto")


def test_publish_moves_the_final_files_into_place_last_marker_last(tmp_path):
    staged, target = tmp_path / "run" / ".partial", tmp_path / "run"
    staged.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "adapter_config.json", "selfllm_lora.json"):
        (staged / name).write_text(name)
    (target / "selfllm_lora.json").write_text("old")  # an earlier run's marker goes first
    resume.publish(staged, target, last="selfllm_lora.json")
    assert not staged.exists()
    assert {p.name for p in target.iterdir()} == {"adapter_model.safetensors", "adapter_config.json", "selfllm_lora.json"}
    assert (target / "selfllm_lora.json").read_text() == "selfllm_lora.json"
