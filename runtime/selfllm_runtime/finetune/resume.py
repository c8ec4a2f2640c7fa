"""Resuming a stopped training run: which checkpoint of the run folder, and only when it belongs to this
configuration. Shared by every training task kind (the Trainer's `checkpoint-<step>` folders).

Each checkpoint gets a record of the settings that shaped it (RESUME_RECORD), written after the Trainer
finished the folder: a checkpoint without it, or with a file cut off, was stopped mid-write and is skipped.
`RESUME=auto` continues from the newest complete checkpoint whose record matches this run; a record that
differs stops the run with one line naming the setting (never a silent resume); `never` starts over; a
folder resumes from that checkpoint (a differing schedule is said in one line; a differing model, data or
adapter shape is refused, since its weights would not fit)."""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESUME_RECORD = "selfllm_resume.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
# Settings a checkpoint can't be used without: the weights or the data would not be the ones it learnt on.
STRUCTURAL = ("MODEL", "DATA", "QUANTIZATION", "LORA_R", "LORA_TARGET_MODULES", "LORA_TARGET_PARAMETERS", "FSDP",
              "NPROC")


class ResumeRefused(ValueError):
    """The run folder holds checkpoints of another configuration (or RESUME names an unusable one)."""


@dataclass(frozen=True)
class ResumePlan:
    checkpoint: Path | None  # None: train from step 0
    step: int
    line: str  # what the log says about it
    skipped: tuple[str, ...] = ()  # one line for each checkpoint passed over as cut off

    @property
    def resume_from(self) -> str | None:
        return str(self.checkpoint) if self.checkpoint else None


def _safetensors_problem(path: Path) -> str | None:
    size = path.stat().st_size
    with path.open("rb") as stream:
        head = stream.read(8)
        if len(head) < 8:
            return f"{path.name} is cut off ({size} bytes)"
        (length,) = struct.unpack("<Q", head)
        try:
            header = json.loads(stream.read(length))
        except ValueError:
            return f"{path.name} is cut off (its header does not parse)"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size < 8 + length + end:
        return f"{path.name} is cut off ({size} of {8 + length + end} bytes)"
    return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` can't be resumed from (cut off mid-write, not a Trainer checkpoint); None when complete."""
    if not (folder / RESUME_RECORD).is_file():
        return f"no {RESUME_RECORD} (the run stopped before the checkpoint was finished)"
    for name in (RESUME_RECORD, TRAINER_STATE):
        try:
            json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return f"{name} is missing or cut off"
    for path in sorted(folder.iterdir()):
        if path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
        elif path.suffix in (".pt", ".pth", ".bin"):
            try:
                with zipfile.ZipFile(path):  # torch.save's format: a zip whose directory is written last
                    problem = None
            except (OSError, zipfile.BadZipFile):
                problem = f"{path.name} is cut off"
        else:
            continue
        if problem:
            return problem
    return None


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """The run folder's `checkpoint-<step>` folders, newest first."""
    found = [(int(m.group(1)), p) for p in Path(run_dir).glob("checkpoint-*") if p.is_dir() and (m := CHECKPOINT.match(p.name))]
    return sorted(found, reverse=True)


def differences(recorded: dict[str, str], now: dict[str, str]) -> list[str]:
    return [key for key in now if recorded.get(key) != now[key]]


def _said(keys: list[str], recorded: dict[str, str], now: dict[str, str]) -> str:
    return ", ".join(f"{key}={recorded.get(key, '<not recorded>')} then, {now[key]} now" for key in keys)


def plan(run_dir: Path, identity: dict[str, str], resume: str) -> ResumePlan:
    """What this run starts from, by RESUME (`auto`, `never` or a checkpoint folder); ResumeRefused names
    the setting that differs, or the unusable folder."""
    run_dir = Path(run_dir)
    if resume == "never":
        found = checkpoints(run_dir)
        extra = f" ({len(found)} checkpoint(s) there are left as they are until the Trainer rotates them)" if found else ""
        return ResumePlan(None, 0, f"RESUME=never: training from step 0 in {run_dir}{extra}")
    if resume != "auto":
        folder = Path(resume)
        if not folder.is_dir():
            raise ResumeRefused(f"RESUME={resume}: no such checkpoint folder")
        problem = checkpoint_problem(folder)
        if problem:
            raise ResumeRefused(f"RESUME={resume}: can't resume from it: {problem}")
        recorded = json.loads((folder / RESUME_RECORD).read_text(encoding="utf-8"))
        changed = differences(recorded, identity)
        structural = [key for key in changed if key in STRUCTURAL]
        if structural:
            raise ResumeRefused(f"RESUME={resume}: it was trained with {_said(structural, recorded, identity)}; its "
                                "weights don't fit this run")
        step = _step(folder)
        note = f" (changed: {_said(changed, recorded, identity)})" if changed else ""
        return ResumePlan(folder, step, f"RESUME={resume}: resuming at step {step}{note}")
    skipped: list[str] = []
    for step, folder in checkpoints(run_dir):
        problem = checkpoint_problem(folder)
        if problem:
            skipped.append(f"RESUME=auto: skipping {folder}: {problem}")
            continue
        recorded = json.loads((folder / RESUME_RECORD).read_text(encoding="utf-8"))
        changed = differences(recorded, identity)
        if changed:
            raise ResumeRefused(
                f"RESUME=auto: {folder} was trained with {_said(changed, recorded, identity)}: not resumed; set "
                f"another RUN_NAME to keep that run, or RESUME=never to start over in {run_dir}")
        return ResumePlan(folder, step, f"RESUME=auto: resuming from {folder.name} at step {step}", tuple(skipped))
    return ResumePlan(None, 0, f"RESUME=auto: no complete checkpoint in {run_dir}: training from step 0", tuple(skipped))


def _step(folder: Path) -> int:
    state = json.loads((folder / TRAINER_STATE).read_text(encoding="utf-8"))
    return int(state.get("global_step", 0))


def write_record(checkpoint: Path, identity: dict[str, str]) -> None:
    """The record that marks a checkpoint finished: written last, through a rename."""
    partial = checkpoint / f".{RESUME_RECORD}.{os.getpid()}.part"
    partial.write_text(json.dumps(identity, ensure_ascii=False, indent=2), encoding="utf-8")
    partial.replace(checkpoint / RESUME_RECORD)


def record_callback(identity: dict[str, str]) -> Any:
    """A TrainerCallback that records the identity in every checkpoint once the Trainer has written it."""
    from transformers import TrainerCallback

    class RecordCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_local_process_zero and folder.is_dir():  # save_on_each_node: each node has its copy
                write_record(folder, identity)

    return RecordCheckpoint()


def shared_plan(decided: ResumePlan) -> ResumePlan:
    """Under torchrun: rank 0's plan for every rank (all ranks load the checkpoint rank 0 chose)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return decided
    box = [decided if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def publish(staged: Path, target: Path, last: str) -> None:
    """Move the files of `staged` into `target`, `last` at the end (its presence says the set is whole), then
    drop `staged`: a stop in between never leaves a half-written file where the final ones go."""
    target.mkdir(parents=True, exist_ok=True)
    (target / last).unlink(missing_ok=True)
    names = sorted(p.name for p in staged.iterdir() if p.name != last) + ([last] if (staged / last).exists() else [])
    for name in names:
        destination = target / name
        if destination.is_dir() and not destination.is_symlink():
            shutil.rmtree(destination)
        os.replace(staged / name, destination)
    shutil.rmtree(staged, ignore_errors=True)


def train_from(trainer: Any, decided: ResumePlan, log: Any) -> tuple[Any, ResumePlan, float]:
    """trainer.train() from the checkpoint `decided` names (under torchrun rank 0's decision: shared_plan), after
    logging what was skipped and where it starts: (its output, the plan followed, seconds)."""
    start = shared_plan(decided)  # under torchrun rank 0 decides, every rank loads that checkpoint
    for line in start.skipped:
        log.warning("%s", line)
    log.info("%s", start.line)
    started = time.monotonic()
    output = trainer.train(resume_from_checkpoint=start.resume_from)
    return output, start, time.monotonic() - started
