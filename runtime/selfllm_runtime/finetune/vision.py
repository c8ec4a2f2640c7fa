"""LoRA on a vision-language checkpoint: whether a run reads images, its data (vision_data.py) and collator, what
LoRA may touch besides the language model (model.yaml `modalities.lora_vision`, `modalities.projector`), and the
image-conditioned prompt of `selfllm lora infer --image`."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..context import RecipeContext
from ..settings import LoraSettings
from .data import ChatTokenizer, DataError
from .vision_data import DEFAULT_IMAGE_DATA, VisionChatTokenizer, VisionCollator, VisionData, default_image_data, encode_image_files, \
    open_image, read_image_records

log = logging.getLogger("selfllm.lora")


def reads_images(context: RecipeContext, model_dir: Path) -> bool:
    """The family takes images (model.yaml modalities) and the checkpoint has a vision tower (its config.json has
    a vision_config: not Gemma-3 1b's text-only class)."""
    if not context.family.modalities.takes("image"):
        return False
    config = Path(model_dir) / "config.json"
    return config.is_file() and "vision_config" in json.loads(config.read_text(encoding="utf-8"))


def check_data(context: RecipeContext, settings: LoraSettings) -> None:
    """An image family's DATA_PATH files, every image opened, before the model is downloaded: a DataError names
    the file, the record and the image."""
    if context.family.modalities.takes("image") and settings.data:
        read_image_records(list(settings.data), settings.system_prompt, settings.max_samples)


def prepare(context: RecipeContext, model_dir: Path, chat: ChatTokenizer, paths: list[Path],
            settings: LoraSettings) -> tuple[list[Path], VisionData, VisionCollator]:
    """The image-text examples (the shipped LaTeX-OCR set when no data is given) and their collator."""
    from transformers import AutoProcessor

    system_prompt = settings.system_prompt
    if not paths:  # the recipe's SYSTEM_PROMPT belongs to huanhuan.json, not to the LaTeX-OCR set
        paths, system_prompt = [default_image_data()], None
        if settings.system_prompt:
            log.info("the shipped LaTeX-OCR set: SYSTEM_PROMPT (%s) not applied", settings.system_prompt)
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=context.family.trust_remote_code)
    encoder = VisionChatTokenizer(chat, processor)
    data = encode_image_files(paths, encoder, system_prompt, settings.max_samples)
    log.info("image-text data through %s: %d images; vision tower frozen%s", type(processor).__name__, data.images,
             ", projector trained" if context.family.modalities.lora_vision == "projector" else "")
    return paths, data, VisionCollator(chat.tokenizer.pad_token_id)


def lora_options(context: RecipeContext, images: bool) -> dict[str, Any]:
    """LoraConfig arguments besides the targets: with `lora_vision: projector`, the projector module is trained in
    full and saved with the adapter (peft's modules_to_save)."""
    modalities = context.family.modalities
    if images and modalities.lora_vision == "projector":
        return {"modules_to_save": [modalities.projector]}
    return {}


def trainable_outside_language_model(model: Any, context: RecipeContext) -> dict[str, int]:
    """Trainable parameters of the vision tower and of the projector (counted by the projector's module path)."""
    projector = context.family.modalities.projector or "\0"
    counts = {"vision": 0, "projector": 0}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if projector in name:
            counts["projector"] += parameter.numel()
        elif "vision" in name or ".visual." in name:
            counts["vision"] += parameter.numel()
    return counts


def image_prompt(prompt: str, image: Path) -> list[dict[str, Any]]:
    """A user turn's content: the image (opened, checked), then the text."""
    try:
        opened = open_image(Path(image), Path(image), None)
    except DataError as exc:
        raise ValueError(f"--image: {exc.problem}") from None
    return [{"type": "image", "image": opened}, {"type": "text", "text": prompt}]
