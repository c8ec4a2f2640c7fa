"""Loading a checkpoint for generation or for training, in one place for every task kind: the device,
the dtype, and QUANTIZATION (bitsandbytes: `4bit` NF4 with double quantization, `8bit` LLM.int8).

bitsandbytes keeps the embeddings and lm_head in the model's dtype and quantizes every other linear
layer; its CPU backend runs both settings (slowly), which is how the smoke tests check them here.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .context import checkpoint_architecture
from .metadata import ParameterCount, Quantization

if TYPE_CHECKING:
    from .context import RecipeContext

log = logging.getLogger("selfllm.loading")


def pick_device() -> tuple[str, Any]:
    """('cuda', bf16 — fp16 on cards without bf16) when a GPU is visible, else ('cpu', fp32)."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return "cpu", torch.float32


def quantization_config(quantization: Quantization, compute_dtype: Any, keep: list[str] | None = None) -> Any:
    """transformers' BitsAndBytesConfig for QUANTIZATION (None for `none`; settings checked that bitsandbytes is there);
    keep: module paths left unquantized (a vision family's tower and projector, model.yaml modalities.vision_modules),
    besides lm_head, which transformers keeps by default."""
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    skip = {"llm_int8_skip_modules": [*keep, "lm_head"]} if keep else {}
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, **skip)
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_CAST_ONCE)
    return BitsAndBytesConfig(load_in_8bit=True, **skip)


# bitsandbytes' CPU 4-bit kernel packs a weight in blocks of 32 output rows and 64 input weights: a Linear of other
# shapes (Qwen1.5-MoE's shared-expert gate, hidden → 1) fails there ("N must be divisible by block_n"), not on a GPU.
CPU_4BIT_ROWS, CPU_4BIT_BLOCK = 32, 64


def cpu_4bit_unpackable(cls: Any, model_dir: Path, trust_remote_code: bool) -> list[str]:
    """Paths of the Linear layers of the checkpoint's class (built on the meta device, no weights) that bitsandbytes'
    CPU 4-bit kernel can't pack: QUANTIZATION=4bit on CPU leaves them unquantized."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        # an Auto class (from_config) builds remote code only when trusted; a transformers class: _from_config
        model = (cls.from_config(config, trust_remote_code=trust_remote_code) if hasattr(cls, "from_config")
                 else cls._from_config(config))
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
            and (module.out_features % CPU_4BIT_ROWS or module.in_features % CPU_4BIT_BLOCK)]


def shipped_quantization(model_dir: Path) -> str | None:
    """The quantization the checkpoint ships in (config.json quantization_config.quant_method, e.g. gpt-oss's
    mxfp4), or None."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    method = (config.get("quantization_config") or {}).get("quant_method")
    return str(method) if method else None


def prequantized_kwargs(shipped: str | None, quantization: Quantization, training: bool) -> dict[str, Any]:
    """from_pretrained arguments for a checkpoint that ships quantized weights: bitsandbytes can't quantize them
    again (ValueError naming QUANTIZATION); LoRA trains on them dequantized to bf16, as upstream's gpt-oss LoRA
    tutorial does (Mxfp4Config(dequantize=True)); generation leaves it to transformers, which keeps MXFP4 where
    its kernels run and dequantizes elsewhere."""
    if shipped is None:
        return {}
    if quantization != "none":
        raise ValueError(f"QUANTIZATION={quantization}: the checkpoint ships {shipped}-quantized weights, which "
                         "bitsandbytes can't quantize again (use QUANTIZATION=none)")
    if training and shipped == "mxfp4":
        from transformers import Mxfp4Config

        return {"quantization_config": Mxfp4Config(dequantize=True)}
    return {}


def physical_cores(cpuinfo: str | None = None) -> int:
    """This machine's physical cores: distinct (physical id, core id) pairs of /proc/cpuinfo (hyperthreads are
    one core); os.cpu_count() where that can't be read."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8") if cpuinfo is None else cpuinfo
    except OSError:
        text = ""
    cores: set[tuple[str, str]] = set()
    socket = core = ""
    for line in text.splitlines() + [""]:
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "physical id":
            socket = value
        elif key == "core id":
            core = value
        elif not key and core:  # end of one processor's block
            cores.add((socket, core))
            socket = core = ""
    return len(cores) or os.cpu_count() or 1


def usable_cpus(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota (a container's --cpus)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text(encoding="utf-8").split()[:2]
        if quota != "max":
            count = min(count, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def torch_threads(setting: str, load: float | None = None) -> tuple[int, str]:
    """(threads, why) for TORCH_THREADS: a number as it is; `auto`: the physical cores this process may use
    (hyperthreads and CPUs outside its affinity mask or cgroup quota don't count), less the ones other work
    keeps busy (the whole part of the 1-minute load average, `load`), at least 1. Measured on a 2-core box
    another job kept busy, decoding with 2 threads was 4x slower than with 1 (benchmarks/torch_threads.py):
    threads that wait for a busy core stall every matmul."""
    if setting != "auto":
        return int(setting), f"TORCH_THREADS={setting}"
    cores, cpus = physical_cores(), usable_cpus()
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = max(1, min(cores, cpus) - int(load))
    return threads, f"TORCH_THREADS=auto: {cores} physical cores, {cpus} usable CPUs, load {load:.1f}"


def apply_torch_threads(setting: str) -> str:
    """torch.set_num_threads per TORCH_THREADS (intra-op threads of CPU work); returns the start line's words."""
    import torch

    threads, why = torch_threads(setting)
    torch.set_num_threads(threads)
    return f"{threads} torch threads ({why})"


class _FirstOnly(logging.Filter):
    """LLM.int8 casts fp32/bf16 activations to fp16 and logs it on every matmul: only the first is kept."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.prefix):
            return True
        first, self.seen = not self.seen, True
        return first


_CAST_ONCE = _FirstOnly("MatMul8bitLt: inputs will be cast")


@dataclass
class LoadedModel:
    model: Any
    device: str
    dtype: Any
    quantization: Quantization

    @property
    def weights_gb(self) -> float:
        """The weights' memory (transformers' get_memory_footprint), GB."""
        return round(self.model.get_memory_footprint() / 1e9, 6)


def card_placement(gpus: list[int] | None) -> tuple[dict[str, Any], str]:
    """from_pretrained's device_map (and max_memory) for one process's model on CUDA (generation; training with
    GPU_LAYOUT=spread), and a line saying where it goes: every visible card (None) or the listed ones; one card is
    a plain pin, several share the layers."""
    import torch

    visible = list(range(torch.cuda.device_count()))
    chosen = visible if gpus is None else gpus
    if missing := [i for i in chosen if i not in visible]:
        raise ValueError(f"GPUS={','.join(map(str, gpus or []))}: no card {missing[0]} (visible: {visible})")
    names = ", ".join(f"cuda:{i} {torch.cuda.get_device_name(i)} "
                      f"{torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB" for i in chosen)
    if len(chosen) == 1:
        return {"device_map": {"": chosen[0]}}, f"on one card: {names}"
    memory = {i: torch.cuda.get_device_properties(i).total_memory for i in chosen}
    return ({"device_map": "auto", "max_memory": memory},
            f"layers spread over {len(chosen)} cards (device_map=auto): {names}")


def model_class(context: RecipeContext, model_dir: Path) -> Any:
    """The class to load the checkpoint in model_dir with: the transformers class its config.json names where the
    family knows that class (model.yaml architecture or variants), else AutoModelForCausalLM. AutoModelForCausalLM
    has no mapping for vision-language configs such as Qwen2-VL's, Qwen3-VL's or GLM-4.1V's, and maps Qwen3.5's to
    the text-only Qwen3_5ForCausalLM (no vision tower), so a vision family is loaded by its own class."""
    import transformers

    named = checkpoint_architecture(model_dir)
    known = named is not None and context.family.for_architecture(named) is not None
    if known and not context.family.trust_remote_code and hasattr(transformers, named):
        return getattr(transformers, named)
    return transformers.AutoModelForCausalLM


def load_causal_lm(context: RecipeContext, model_dir: Path, quantization: Quantization = "none",
                   training: bool = False, gpus: list[int] | None = None, spread: bool = False) -> LoadedModel:
    """The checkpoint in model_dir, on the GPU when there is one. Generation spreads it over the visible
    GPUs (device_map=auto), or the cards `gpus` lists (GPUS); so does training with `spread` (GPU_LAYOUT=spread:
    one process, the Trainer sees the layers' device map and leaves them where they are). Other training leaves
    placement to the Trainer (one process per card under torchrun), except that a quantized model can't be moved
    after loading: it is loaded onto this process's GPU."""
    device, dtype = pick_device()
    shipped = shipped_quantization(model_dir)
    kwargs: dict[str, Any] = prequantized_kwargs(shipped, quantization, training)
    if shipped:
        log.info("the checkpoint ships %s weights%s", shipped,
                 ": dequantized to bf16 for training" if kwargs else " (transformers dequantizes where it has no kernels)")
    keep = list(context.family.modalities.vision_modules)
    if device == "cpu" and quantization == "4bit":
        unpackable = cpu_4bit_unpackable(model_class(context, model_dir), model_dir, context.family.trust_remote_code)
        if unpackable:
            log.info("4bit on CPU: %d layers bitsandbytes' CPU kernel can't pack stay unquantized (%s)", len(unpackable),
                     ", ".join(unpackable[:3]) + (", ..." if len(unpackable) > 3 else ""))
        keep += unpackable
    config = quantization_config(quantization, dtype, keep)
    if config is not None:
        kwargs["quantization_config"] = config
    if device == "cuda" and (spread or not training):
        placement, where = card_placement(gpus)
        kwargs |= placement
        log.info("GPUs: %s", where)
    elif device == "cuda" and config is not None:
        from accelerate import PartialState

        kwargs["device_map"] = {"": PartialState().local_process_index}
    log.info("loading %s on %s (%s%s)", model_dir, device, str(dtype).removeprefix("torch."),
             "" if config is None else f", {quantization}")
    model = model_class(context, model_dir).from_pretrained(model_dir, dtype=dtype,
                                                 trust_remote_code=context.family.trust_remote_code, **kwargs)
    loaded = LoadedModel(model, device, dtype, quantization)
    log.info("weights: %.3f GB", loaded.weights_gb)
    return loaded


def parameter_count(model: Any) -> ParameterCount:
    """An unquantized model's parameters in billions, and of those the ones bitsandbytes leaves unquantized
    (input embeddings and lm_head, counted once when tied): what model.yaml's parameters_b records."""
    total = sum(p.numel() for p in model.parameters())
    embeddings = {id(m.weight): m.weight.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings())
                  if m is not None}
    return ParameterCount(total=total / 1e9, unquantized=sum(embeddings.values()) / 1e9)
