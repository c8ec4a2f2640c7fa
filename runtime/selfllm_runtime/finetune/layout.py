"""GPU_LAYOUT: where an adapter-training run puts the base model. `data`: a whole copy in each process (NPROC, one
per card; FSDP shards it); `spread`: one process whose layers spread over every visible card (device_map=auto), as
upstream's LoRA tutorials of the MoE models one card can't hold (Hunyuan-A13B, GLM-4.5-Air). A recipe that needs
several cards (recipe gpu.count > 1) is refused at start, before the download, when the visible cards can't hold
its estimate (model.yaml vram_gb)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Literal

from ..context import RecipeContext
from ..settings import LoraSettings

log = logging.getLogger("selfllm.lora")
Layout = Literal["data", "spread"]


@dataclass(frozen=True)
class Card:
    """One visible CUDA device."""

    index: int
    name: str
    total_bytes: int

    @property
    def gb(self) -> float:
        return self.total_bytes / 1e9

    def describe(self) -> str:
        return f"cuda:{self.index} {self.name} {self.gb:.0f} GB"


def visible_cards() -> list[Card]:
    """The CUDA devices this process sees (CUDA_VISIBLE_DEVICES respected); none on CPU."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [Card(i, torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory)
            for i in range(torch.cuda.device_count())]


def memory_shortfall(what: str, need_gb: float, layout: Layout, fsdp: bool, cards: list[Card]) -> str | None:
    """The one line that refuses a layout whose cards can't hold `need_gb` (None: they can). spread and FSDP put
    one model on all the cards together; plain data parallelism a whole copy on each."""
    if not cards:
        return None
    together = layout == "spread" or fsdp
    have = sum(card.gb for card in cards) if together else min(card.gb for card in cards)
    if have >= need_gb:
        return None
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = ", ".join(card.describe() for card in cards) + (f"; CUDA_VISIBLE_DEVICES={shown}" if shown is not None else "")
    if together:
        how = (f"GPU_LAYOUT={layout}" + (" with FSDP" if layout == "data" else "")
               + f" puts the model on all the cards together, which hold {have:.0f} GB ({seen})")
        fix = "give the container more cards (docker run --gpus all)"
    else:
        how = f"GPU_LAYOUT=data puts a whole copy on each card, and the smallest holds {have:.0f} GB ({seen})"
        fix = "set GPU_LAYOUT=spread (one process, the layers over all the cards), or FSDP=full_shard"
    return f"{what} needs about {need_gb:g} GB of GPU memory, but {how}: {fix}"


def need_gb(context: RecipeContext, settings: LoraSettings) -> float | None:
    """The recipe's estimate for the settings' QUANTIZATION (None: none given)."""
    gpu = context.recipe.gpu
    return gpu.min_vram_gb if settings.quantization == "none" else gpu.quantized_vram_gb.get(settings.quantization)


def choose(context: RecipeContext, settings: LoraSettings, cards: list[Card] | None = None) -> Layout:
    """GPU_LAYOUT for this recipe; a recipe that needs several cards is checked against the visible ones
    (ValueError: the one line that refuses it)."""
    layout = settings.layout(context.recipe.gpu.count)
    gb = need_gb(context, settings)
    if context.recipe.gpu.count > 1 and gb is not None:
        what = f"{context.family.display_name} {context.recipe.task.value}" + (
            f" with QUANTIZATION={settings.quantization}" if settings.quantization != "none" else "")
        problem = memory_shortfall(what, gb, layout, settings.fsdp != "off",
                                   visible_cards() if cards is None else cards)
        if problem:
            raise ValueError(problem)
    return layout
