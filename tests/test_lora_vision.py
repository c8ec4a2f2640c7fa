"""LoRA on images (finetune/vision_data.py, finetune/vision.py): upstream's LaTeX-OCR data format, the shipped set,
refusals naming file and record before any model download, and training a tiny Gemma-3 on image-text data with
the vision tower frozen (the adapter moves the image-conditioned fingerprint)."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from selfllm_runtime.finetune.data import IGNORE_INDEX, DataError, DataSourceError
from selfllm_runtime.finetune.lora import infer, train
from selfllm_runtime.finetune.vision_data import (DEFAULT_IMAGE_DATA, DEFAULT_IMAGE_DATA_SHA256, LATEX_OCR_PROMPT,
                                                  VisionCollator, copy_image_data, data_digest, default_image_data,
                                                  read_image_records)
from selfllm_runtime.settings import LoraSettings
from selfllm_runtime.tasks import lora as lora_cli

ROOT = Path(__file__).resolve().parents[1]


def _png(path: Path, colour: int = 0) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 16), (colour, colour, colour)).save(path)
    return path


def test_upstream_format_reads_images_relative_to_the_data_file(tmp_path):
    _png(tmp_path / "set" / "pics" / "a.png")
    _png(tmp_path / "set" / "pics" / "b.png")
    data = tmp_path / "set" / "train.json"
    data.write_text(json.dumps([
        {"id": "identity_1", "conversations": [{"role": "user", "value": "pics/a.png"},
                                               {"role": "assistant", "value": r"x^{2}"}]},
        {"conversations": [{"role": "user", "value": "<|vision_start|>pics/b.png<|vision_end|>"},
                           {"role": "assistant", "value": r"\alpha"}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "pics/a.png"},
                                                   {"type": "text", "text": "what?"}]},
                      {"role": "assistant", "content": "a"}]},
        {"instruction": "text only", "output": "fine"},
    ]), encoding="utf-8")
    records = [record for _, _, record in read_image_records([data], system_prompt="S")]
    assert [r.images for r in records] == [[data.parent / "pics/a.png"], [data.parent / "pics/b.png"],
                                           [data.parent / "pics/a.png"], []]
    first = records[0].messages
    assert first[0] == {"role": "system", "content": "S"}
    assert first[1]["content"][1] == {"type": "text", "text": LATEX_OCR_PROMPT}
    assert first[2] == {"role": "assistant", "content": r"x^{2}"}
    assert records[2].messages[1]["content"][1]["text"] == "what?"


@pytest.mark.parametrize("broken", ["missing", "undecodable"])
def test_a_bad_image_is_one_line_naming_file_and_record_before_any_download(tmp_path, capsys, broken):
    _png(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not a picture")
    image = "nowhere.png" if broken == "missing" else "bad.png"
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"conversations": [{"role": "user", "value": name},
                                                          {"role": "assistant", "value": "x"}]}) + "\n"
                            for name in ("ok.png", image)), encoding="utf-8")
    with pytest.raises(DataError) as raised:
        read_image_records([data])
    assert raised.value.index == 1 and image in raised.value.problem
    # the CLI: status 2 and one line, before the model is resolved (MODEL_ID names a hub that is not reachable)
    code = lora_cli.main(["train", "--data", str(data)], recipe=str(ROOT / "recipes/gemma3/lora"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"{data}: record 1: image {tmp_path / image}" in err[0], err
    assert ("not found" if broken == "missing" else "can't be decoded") in err[0]


def test_the_shipped_latex_ocr_set_is_checked_and_copied(tmp_path):
    assert default_image_data() == DEFAULT_IMAGE_DATA
    records = read_image_records([DEFAULT_IMAGE_DATA])
    assert len(records) == 120 and all(len(r.images) == 1 for _, _, r in records)
    copy = copy_image_data(tmp_path / "copy" / "latex.json")
    assert data_digest(copy) == DEFAULT_IMAGE_DATA_SHA256
    (tmp_path / "copy" / "images" / "0007.png").write_bytes(b"changed")
    with pytest.raises(DataSourceError, match="has sha256"):
        default_image_data(copy)


def test_the_script_makes_the_shipped_set_again(tmp_path):
    """scripts/make_latex_ocr.py is deterministic: its default run gives the shipped set, byte for byte."""
    subprocess.run([sys.executable, str(ROOT / "scripts/make_latex_ocr.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    assert data_digest(tmp_path / "latex_ocr.json") == DEFAULT_IMAGE_DATA_SHA256


def test_the_collator_pads_tokens_and_concatenates_pixels():
    import torch

    examples = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [IGNORE_INDEX, 6, 7],
                 "token_type_ids": [1, 0, 0], "pixel_values": torch.ones(1, 3, 4, 4)},
                {"input_ids": [8], "attention_mask": [1], "labels": [8], "token_type_ids": [0],
                 "pixel_values": torch.zeros(1, 3, 4, 4)}]
    batch = VisionCollator(pad_token_id=0)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[1, 0, 0], [0, 0, 0]]
    assert batch["pixel_values"].shape == (2, 3, 4, 4) and batch["pixel_values"][0].sum() > 0


@pytest.fixture(scope="module")
def gemma3(tiny_recipe):
    return tiny_recipe("gemma3/lora")


@pytest.fixture(scope="module")
def trained_on_images(gemma3, tmp_path_factory):
    context, model = gemma3
    out = tmp_path_factory.mktemp("vision-lora")
    env = {"OUTPUT_DIR": str(out), "RUN_NAME": "t", "MAX_STEPS": "12", "LEARNING_RATE": "5e-3", "BATCH_SIZE": "4",
           "GRAD_ACCUM": "1", "LOGGING_STEPS": "1", "MAX_SAMPLES": "24", "REPORT_TO": "none"}
    return train(context, model, context.settings(LoraSettings, env=env))


def test_gemma3_learns_latex_from_images_with_the_vision_tower_frozen(trained_on_images):
    done = trained_on_images
    assert done["examples"] == 24 and done["images"] == 24
    losses = done["losses"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    from safetensors import safe_open

    with safe_open(str(Path(done["adapter_dir"]) / "adapter_model.safetensors"), framework="pt") as weights:
        names = list(weights.keys())
    assert names and all(".language_model." in name for name in names), names
    info = json.loads((Path(done["adapter_dir"]) / "selfllm_lora.json").read_text())
    assert info["system_prompt"] is None  # the recipe's huanhuan SYSTEM_PROMPT does not go with LaTeX-OCR


def test_the_adapter_moves_the_image_conditioned_fingerprint(gemma3, trained_on_images, capsys):
    context, model = gemma3
    images = DEFAULT_IMAGE_DATA.parent / "images"
    ask = {"prompt": LATEX_OCR_PROMPT, "max_new_tokens": 4, "temperature": 0.0}
    base = infer(context, model, None, image=images / "0003.png", **ask)
    adapted = infer(context, model, Path(trained_on_images["adapter_dir"]), image=images / "0003.png", **ask)
    other = infer(context, model, Path(trained_on_images["adapter_dir"]), image=images / "0004.png", **ask)
    assert abs(adapted["prompt_logprob"] - base["prompt_logprob"]) > 1e-4
    assert adapted["prompt_logprob"] != other["prompt_logprob"]  # the figure reads the image
    assert base["image"].endswith("0003.png")
    with pytest.raises(ValueError, match="--image: image .*nowhere.png not found"):
        infer(context, model, None, image=images / "nowhere.png", **ask)


def test_projector_mode_trains_and_saves_the_projector(gemma3, tmp_path):
    """`lora_vision: projector`: the projector (modalities.projector) is trained in full and saved with the adapter;
    the vision tower still is not."""
    context, model = gemma3
    modalities = context.family.modalities.model_copy(update={"lora_vision": "projector"})
    family = context.family.model_copy(update={"modalities": modalities})
    projected = dataclasses.replace(context, family=family)
    env = {"OUTPUT_DIR": str(tmp_path), "RUN_NAME": "p", "MAX_STEPS": "2", "BATCH_SIZE": "4", "MAX_SAMPLES": "8",
           "REPORT_TO": "none"}
    done = train(projected, model, projected.settings(LoraSettings, env=env))
    from safetensors import safe_open

    with safe_open(str(Path(done["adapter_dir"]) / "adapter_model.safetensors"), framework="pt") as weights:
        names = list(weights.keys())
    assert any("multi_modal_projector" in name and "lora_" not in name for name in names), names
    assert not any("vision_tower" in name for name in names)
