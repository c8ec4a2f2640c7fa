"""Image-text training data for LoRA on a vision-language family: records with images, read with the family's
processor (AutoProcessor), the prompt (images included) masked out of the loss as for text (data.ChatTokenizer).

Formats (a JSON list or JSON Lines, as data.py; image paths are relative to the data file):
- upstream's LaTeX-OCR tutorials (self-llm models/Qwen2-VL, Qwen3-VL): {"id": ..., "conversations": [{"role":
  "user", "value": IMAGE_PATH}, {"role": "assistant", "value": TEXT}]}; a user value that is an image path becomes
  that image plus upstream's instruction (LATEX_OCR_PROMPT), `<|vision_start|>PATH<|vision_end|>` is read too;
- a conversation whose content is a list of parts: {"conversation"|"messages": [{"role": "user", "content":
  [{"type": "image", "image": PATH}, {"type": "text", "text": "..."}]}, {"role": "assistant", "content": "..."}]};
- every text format of data.py (a record without images trains on text only).

The default data of an image family is a LaTeX-OCR set made offline (scripts/make_latex_ocr.py), shipped with the
runtime and checked against DEFAULT_IMAGE_DATA_SHA256 (the JSON and every image it names)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import IGNORE_INDEX, ChatTokenizer, DataError, default_data, read_records, record_to_messages

DEFAULT_IMAGE_DATA_NAME = "latex_ocr.json"
DEFAULT_IMAGE_DATA = Path(__file__).resolve().parent / "data" / "latex_ocr" / DEFAULT_IMAGE_DATA_NAME
DEFAULT_IMAGE_DATA_SHA256 = "b951cae4e9db7b56654d00e5298ad949868179fa0f05f0e39c7dc2fcd95e9e05"
# Upstream's instruction of the LaTeX-OCR tutorial (Qwen2-VL 06), sent with each image of its data format.
LATEX_OCR_PROMPT = "你是一个LaText OCR助手,目标是读取用户输入的照片，转换成LaTex公式。"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
VISION_MARKERS = ("<|vision_start|>", "<|vision_end|>")


@dataclass
class ImageRecord:
    """One record: chat messages (an image part holds the image's path) and the paths of its images."""

    messages: list[dict[str, Any]]
    images: list[Path]


def _image_path(value: str, base: Path) -> Path | None:
    text = value.strip()
    for marker in VISION_MARKERS:
        text = text.replace(marker, "")
    text = text.strip()
    if "\n" in text or not text.lower().endswith(IMAGE_SUFFIXES):
        return None
    return base / text


def _parts(content: Any, path: Path, index: int, base: Path, images: list[Path]) -> Any:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise DataError(path, index, f"a message's content must be a string or a list of parts, got "
                                     f"{type(content).__name__}")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image" and isinstance(part.get("image"), str):
            images.append(base / part["image"])
            parts.append({"type": "image", "image": str(images[-1])})
        else:
            raise DataError(path, index, f"a content part must be {{type: text, text}} or {{type: image, image: "
                                         f"PATH}}, got {str(part)[:80]}")
    return parts


def record_to_image_messages(record: Any, path: Path, index: int, system_prompt: str | None = None) -> ImageRecord:
    """A record of any accepted format as messages with image parts; DataError for a bad record."""
    base = path.parent
    images: list[Path] = []
    if isinstance(record, dict) and isinstance(record.get("conversations"), list):  # upstream's LaTeX-OCR format
        messages: list[dict[str, Any]] = [{"role": "system", "content": system_prompt}] if system_prompt else []
        for number, turn in enumerate(record["conversations"]):
            if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant", "system") \
                    or not isinstance(turn.get("value"), str):
                raise DataError(path, index, f"conversations turn {number} needs 'role' (user/assistant) and a "
                                             "string 'value'")
            image = _image_path(turn["value"], base) if turn["role"] == "user" else None
            if image is not None:
                images.append(image)
                content: Any = [{"type": "image", "image": str(image)}, {"type": "text", "text": LATEX_OCR_PROMPT}]
            else:
                content = turn["value"]
            messages.append({"role": turn["role"], "content": content})
        if not any(m["role"] == "assistant" for m in messages[1:]):
            raise DataError(path, index, "conversations has no assistant turn after a user turn")
        return ImageRecord(messages, images)
    turns = record.get("conversation", record.get("messages")) if isinstance(record, dict) else None
    if isinstance(turns, list) and any(isinstance(t, dict) and isinstance(t.get("content"), list) for t in turns):
        messages = []
        for number, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant", "system"):
                raise DataError(path, index, f"conversation turn {number} needs a role (system/user/assistant)")
            messages.append({"role": turn["role"], "content": _parts(turn.get("content"), path, index, base, images)})
        if system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        return ImageRecord(messages, images)
    return ImageRecord(record_to_messages(record, path, index, system_prompt), [])


def open_image(image: Path, path: Path, index: int):
    """The image as RGB; DataError naming the data file, the record and the image when it is missing or
    can't be decoded."""
    from PIL import Image, UnidentifiedImageError

    if not image.is_file():
        raise DataError(path, index, f"image {image} not found (image paths are relative to the data file)")
    try:
        with Image.open(image) as opened:
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(path, index, f"image {image} can't be decoded ({type(exc).__name__})") from None


def read_image_records(paths: list[Path], system_prompt: str | None = None, max_samples: int | None = None,
                       check_images: bool = True) -> list[tuple[Path, int, ImageRecord]]:
    """Every record of the files, each image opened once to check it decodes (before any model is loaded)."""
    found: list[tuple[Path, int, ImageRecord]] = []
    for path in map(Path, paths):
        for index, record in enumerate(read_records(path)):
            if max_samples is not None and len(found) >= max_samples:
                return found
            parsed = record_to_image_messages(record, path, index, system_prompt)
            if check_images:
                for image in parsed.images:
                    open_image(image, path, index)
            found.append((path, index, parsed))
    return found


def data_digest(path: Path) -> str:
    """sha256 of a data file and, in order, of every image its records name."""
    digest = hashlib.sha256(Path(path).read_bytes())
    for _, _, record in read_image_records([Path(path)], check_images=False):
        for image in record.images:
            digest.update(image.read_bytes())
    return digest.hexdigest()


def default_image_data(path: Path = DEFAULT_IMAGE_DATA, sha256: str = DEFAULT_IMAGE_DATA_SHA256) -> Path:
    """The shipped LaTeX-OCR set, after checking its digest (the JSON and every image it names)."""
    return default_data(path, sha256, data_digest)


def _token_keys(encoded: dict[str, Any], length: int) -> list[str]:
    """The processor's outputs with one value per token (input_ids, attention_mask, token_type_ids, ...)."""
    return [key for key, value in encoded.items() if getattr(value, "ndim", 0) == 2 and value.shape == (1, length)]


@dataclass
class VisionChatTokenizer:
    """data.ChatTokenizer's rendering (prompt masked, the reply up to its end-of-turn learned), the prompt read by
    the family's processor: it expands each image's placeholder to the image's tokens and makes the pixel values."""

    chat: ChatTokenizer
    processor: Any

    def encode(self, path: Path, index: int, record: ImageRecord) -> dict[str, Any] | None:
        """One example per record (its last assistant turn: the reply; what comes before: the prompt); None when
        max_length leaves no reply token."""
        import torch

        last = max(i for i, m in enumerate(record.messages) if m["role"] == "assistant")
        context, reply = record.messages[:last], record.messages[last]
        try:
            prompt, answer = self.chat.render(context, reply)
        except ValueError as exc:
            raise DataError(path, index, str(exc)) from None
        images = [open_image(image, path, index) for image in record.images]
        tokenizer = self.chat.tokenizer
        if images:
            encoded = dict(self.processor(text=prompt, images=images, add_special_tokens=False, return_tensors="pt"))
        else:
            encoded = {"input_ids": torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])}
        prompt_length = encoded["input_ids"].shape[1]
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"][: self.chat.max_length - prompt_length]
        if not answer_ids:
            return None
        example: dict[str, Any] = {}
        for key in _token_keys(encoded, prompt_length):
            fill = answer_ids if key == "input_ids" else [1 if key == "attention_mask" else 0] * len(answer_ids)
            example[key] = encoded[key][0].tolist() + fill
        example.setdefault("attention_mask", [1] * len(example["input_ids"]))
        example["labels"] = [IGNORE_INDEX] * prompt_length + answer_ids
        example |= {key: value for key, value in encoded.items() if key not in example}
        return example


class VisionExamples:
    """The examples, encoded when read (pixel values are not all held in memory)."""

    def __init__(self, encoder: VisionChatTokenizer, records: list[tuple[Path, int, ImageRecord]]):
        self.encoder, self.records = encoder, records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, position: int) -> dict[str, Any]:
        example = self.encoder.encode(*self.records[position])
        assert example is not None  # encode_image_files kept only records that leave a reply token
        return example


@dataclass
class VisionData:
    examples: VisionExamples
    records: int
    skipped: int
    tokens: int
    images: int
    system_prompt: str | None = None  # the one the examples were rendered with (infer reuses it)


def encode_image_files(paths: list[Path], encoder: VisionChatTokenizer, system_prompt: str | None = None,
                       max_samples: int | None = None) -> VisionData:
    """Every record encoded once (to count tokens and drop those max_length leaves no reply token)."""
    kept, tokens, skipped = [], 0, 0
    for path, index, record in read_image_records(paths, system_prompt, max_samples):
        example = encoder.encode(path, index, record)
        if example is None:
            skipped += 1
            continue
        kept.append((path, index, record))
        tokens += len(example["input_ids"])
    if not kept:
        raise DataError(paths[0], None, "no trainable example")
    return VisionData(VisionExamples(encoder, kept), len(kept) + skipped, skipped, tokens,
                      sum(len(record.images) for _, _, record in kept), system_prompt)


@dataclass
class VisionCollator:
    """Pads the per-token lists (input_ids with the pad id, labels with IGNORE_INDEX, the rest with 0) and
    concatenates the processor's image tensors (pixel_values, image_grid_thw, ...) along their first axis."""

    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        longest = max(len(e["input_ids"]) for e in examples)
        batch: dict[str, Any] = {}
        token_keys = [k for k, v in examples[0].items() if isinstance(v, list)]
        for key in token_keys:
            fill = self.pad_token_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
            batch[key] = torch.tensor([e[key] + [fill] * (longest - len(e[key])) for e in examples])
        for key in {k for e in examples for k, v in e.items() if not isinstance(v, list)}:
            batch[key] = torch.cat([e[key] for e in examples if key in e])
        return batch



def copy_image_data(out: Path, source: Path = DEFAULT_IMAGE_DATA) -> Path:
    """The shipped LaTeX-OCR set (checked) copied to `out`, its images beside it as the records name them."""
    import shutil

    source = default_image_data(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    for _, _, record in read_image_records([source], check_images=False):
        for image in record.images:
            target = out.parent / image.relative_to(source.parent)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(image, target)
    shutil.copyfile(source, out)
    return out
