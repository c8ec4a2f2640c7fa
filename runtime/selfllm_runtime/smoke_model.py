"""A tiny random model of the recipe's real architecture, for smoke tests without a model hub.

Made inside the recipe's own image (so its pinned transformers writes it): a BPE tokenizer trained
on the spot with the family's special tokens and real chat template, and a randomly initialised
`<architecture>` of a few layers. The runtime then loads it with `from_pretrained(folder)`, the
same code path as real weights.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from .context import RecipeContext
from .metadata import ModelFamily, SmokeModelShape

# A smoke model is tiny: well under a million parameters for a plain decoder. The bound catches a config that
# silently ignored the smoke shape (a composite config's flat fields: a "tiny" Gemma-3 came out at 2.7B).
MAX_SMOKE_PARAMETERS = 20_000_000
PARAMETERS_LINE = "selfllm: smoke model {architecture}: {parameters} parameters (random weights)"
PARAMETERS_PATTERN = re.compile(r"selfllm: smoke model (?P<architecture>\w+): (?P<parameters>\d+) parameters")


class SmokeModelTooLarge(ValueError):
    pass


class ProcessorUnavailable(ValueError):
    """transformers can't import the family's processor here (Qwen-VL, GLM-4.1V, Gemma-4 need torchvision)."""


def parameter_line(out_dir: Path) -> str:
    """The line `selfllm smoke-model` logs: the smoke test's report reads the count from it."""
    data = json.loads((Path(out_dir) / "SMOKE_MODEL.json").read_text(encoding="utf-8"))
    parameters = data.get("parameters")
    if parameters is None:  # made before the count was recorded: count the saved tensors
        from safetensors import safe_open

        parameters = 0
        for path in Path(out_dir).glob("*.safetensors"):
            with safe_open(str(path), framework="pt") as weights:
                parameters += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    line = PARAMETERS_LINE.format(architecture=data["architecture"], parameters=parameters)
    if data.get("vision_parameters"):
        line += (f"; vision tower: {data['vision_parameters']} parameters, {data.get('image_tokens')} tokens "
                 "an image of 48 × 32")
    return line


CORPUS = [
    "Hello! How can I help you today? I am a helpful assistant.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "你好，我是甄嬛，家父是大理寺少卿甄远道。",
    "Please answer the question based on the context below.",
    "system user assistant tool think The answer is yes. Thank you.",
    "小主，皇上今日翻了您的牌子。嬛嬛，朕的心意你可明白？",
    "def add(a, b): return a + b  # Python code { } [ ] ( ) : ; , . ! ?",
]


def smoke_corpus(context: RecipeContext) -> list[str]:
    """What the tiny tokenizer is trained on: CORPUS and the template's text without its Jinja comments (the license
    line is no prompt text)."""
    return CORPUS * 4 + [re.sub(r"\{#.*?#\}", "", context.chat_template, flags=re.DOTALL)]


def _train_tokenizer(context: RecipeContext, vocab_size: int):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    family = context.family
    tokens = family.special_tokens
    special = list(dict.fromkeys([tokens.pad, tokens.eos, *([tokens.bos] if tokens.bos else []),
                                  *family.stop_tokens, *tokens.additional]))
    # Reasoning markers that are one token (Qwen's <think>) stay visible in decoded text, as in the real
    # checkpoints; a marker made of special tokens (gpt-oss's <|channel|>analysis<|message|>) is not a token.
    markers = {family.reasoning.start, family.reasoning.end} if family.reasoning else set()
    visible = {m for m in markers if not any(t != m and t in m for t in special)}
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[t for t in special if t not in visible],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(smoke_corpus(context), trainer=trainer)
    # Tool-call markers (Qwen's <tool_call>) are in the vocabulary like special tokens but not skipped
    # by decode, as in the real checkpoints; they keep their ids (the random model's outputs with them).
    markers = [m for m in (family.tool_calls.start, family.tool_calls.end) if m] if family.tool_calls else []
    core.add_tokens([AddedToken(m, special=False, normalized=False) for m in markers if m in special])
    # A vision family's processor finds its image tokens by name on the tokenizer (Gemma-3: boi_token...).
    named = family.modalities.tokens if family.modalities.vision else {}
    media = [t for t in named.values() if t not in special]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=tokens.eos, pad_token=tokens.pad, bos_token=tokens.bos,
        additional_special_tokens=[t for t in special if t not in visible and t not in markers
                                   and t not in (tokens.eos, tokens.pad, tokens.bos)] + media,
        **({"extra_special_tokens": dict(named)} if named else {}),
    )
    if visible:
        tokenizer.add_tokens(sorted(visible))
    vision = smoke_shape(context).vision
    if vision and vision.single_tokens:
        # Texts the real vocabulary has as one token (Gemma's '\n\n'), which vLLM looks up: added tokens, matched
        # longest first.
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in vision.single_tokens])
    tokenizer.chat_template = context.chat_template
    return tokenizer


def tiny_config(architecture: str, shape: SmokeModelShape, vocab_size: int, **token_ids: int | None):
    """The config of a tiny `architecture` (a transformers class) of the given shape."""
    import transformers

    model_class = getattr(transformers, architecture, None)
    if model_class is None:
        raise ValueError(f"transformers {transformers.__version__} has no class {architecture!r}")
    text = {"vocab_size": vocab_size, **shape.model_dump(exclude={"extra", "vocab_size", "vision"}),
            "max_position_embeddings": 4096, "tie_word_embeddings": True, **token_ids}
    extra = dict(shape.extra)
    if "text_config" in getattr(model_class.config_class, "sub_configs", {}):
        # A composite config (vision-language: Gemma-3) ignores flat text fields: they go into its text_config,
        # under what model.yaml's smoke.extra.text_config says.
        config = model_class.config_class(text_config={**text, **extra.pop("text_config", {})},
                                          tie_word_embeddings=True, **extra)
    else:
        config = model_class.config_class(**{**text, **extra})  # extra may set a field itself (vocab_size)
    config.architectures = [architecture]
    text_config = config.get_text_config()
    ignored = {name: value for name, value in shape.model_dump(exclude={"extra", "vision"}).items()
               if getattr(text_config, name, None) != value and name != "vocab_size"}
    if ignored:
        raise ValueError(f"{type(config).__name__} ignored the smoke shape fields {ignored} (model.yaml `smoke:`): "
                         "put them where this config reads them (smoke.extra)")
    return model_class, config


# Image processor arguments named otherwise on the vision config (Qwen/GLM: merge_size = spatial_merge_size).
VISION_CONFIG_NAMES = {"merge_size": "spatial_merge_size"}


def auto_class(mapping: dict[str, Any], model_type: str, backend: str = "pil") -> Any:
    """The transformers class an auto mapping names for the model type (its PIL backend where it has one), or None
    where there is none or it can't be imported here (a video processor needs torchvision)."""
    import transformers

    names = mapping.get(model_type)
    name = (names.get(backend) or next((n for n in names.values() if n), None)) if isinstance(names, dict) else names
    try:
        return getattr(transformers, name) if name else None
    except (ImportError, ModuleNotFoundError, AttributeError):
        return None


def matched_to_vision(component_class: Any, vision_config: Any, overrides: dict[str, Any]) -> Any:
    """An image/video processor whose patch, merge and pooling arguments follow the tiny vision config, with
    model.yaml's `modalities.smoke_image_processor` over them (the pixel bounds of a fast CPU smoke test)."""
    defaults = component_class().to_dict()
    kwargs = {name: getattr(vision_config, VISION_CONFIG_NAMES.get(name, name)) for name in defaults
              if name not in ("size",) and hasattr(vision_config, VISION_CONFIG_NAMES.get(name, name))}
    if "size" not in overrides and hasattr(vision_config, "image_size") and "height" in (defaults.get("size") or {}):
        kwargs["size"] = {"height": vision_config.image_size, "width": vision_config.image_size}  # fixed (Gemma-3)
    kwargs.update({name: value for name, value in overrides.items() if name in defaults})
    return component_class(**kwargs)


def tiny_processor(family: ModelFamily, config: Any, tokenizer: Any) -> Any:
    """The family's processor class (model.yaml modalities.processor) over the tiny tokenizer, with the components
    of the config's model type: the image processor (its PIL backend) and the video processor (where transformers
    has one: it needs torchvision) matched to the tiny vision tower, and the feature extractor (Gemma-4's audio)
    with its defaults; what the processor class doesn't take is left out."""
    import inspect

    import transformers
    from transformers.models.auto.feature_extraction_auto import FEATURE_EXTRACTOR_MAPPING_NAMES
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
    from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING_NAMES

    modalities = family.modalities
    image_processor_class = auto_class(IMAGE_PROCESSOR_MAPPING_NAMES, config.model_type)
    try:
        processor_class = getattr(transformers, str(modalities.processor))
    except (ImportError, ModuleNotFoundError, AttributeError) as exc:
        raise ProcessorUnavailable(f"transformers {transformers.__version__} can't load {modalities.processor!r} "
                                   f"(model.yaml modalities.processor): {str(exc).splitlines()[0]}") from None
    if image_processor_class is None:
        raise ValueError(f"transformers {transformers.__version__} has no image processor for {config.model_type!r}")
    vision = config.vision_config
    components = {"image_processor": matched_to_vision(image_processor_class, vision, modalities.smoke_image_processor)}
    video_processor_class = auto_class(VIDEO_PROCESSOR_MAPPING_NAMES, config.model_type, "torchvision")
    if video_processor_class is not None:  # Gemma-4's processor wants one though the recipes take no video
        components["video_processor"] = matched_to_vision(video_processor_class, vision, modalities.smoke_image_processor)
    feature_extractor_class = auto_class(FEATURE_EXTRACTOR_MAPPING_NAMES, config.model_type)
    if feature_extractor_class is not None:
        components["feature_extractor"] = feature_extractor_class()
    accepted = inspect.signature(processor_class.__init__).parameters
    if "video_processor" in accepted and "video_processor" not in components:
        raise ProcessorUnavailable(f"{modalities.processor} takes a video processor, and transformers' video "
                                   "processors need torchvision, which is not installed here")
    components = {name: value for name, value in components.items() if name in accepted}
    return processor_class(tokenizer=tokenizer, chat_template=tokenizer.chat_template, **components,
                           **modalities.smoke_processor)


def image_tokens(processor: Any, family: ModelFamily, size: tuple[int, int] = (48, 32)) -> int:
    """How many image tokens the processor puts in the prompt for one image of `size` (the smoke checks' PNGs)."""
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = processor(text=[text], images=[Image.new("RGB", size, (200, 30, 30))], return_tensors="pt")["input_ids"]
    image_token = processor.tokenizer.convert_tokens_to_ids(family.modalities.tokens["image_token"])
    return int((ids == image_token).sum())


def vision_record(model: Any, family: ModelFamily, processor: Any) -> dict[str, Any]:
    """A vision family's smoke model: its vision tower's parameters and the tokens an image of the smoke checks'
    size takes (SMOKE_MODEL.json)."""
    inner = getattr(model, "model", model)
    tower = getattr(inner, "vision_tower", None) or getattr(inner, "visual", None)
    if not family.modalities.vision or tower is None or processor is None:
        return {}
    return {"vision_parameters": sum(p.numel() for p in tower.parameters()),
            "image_tokens": image_tokens(processor, family)}


def carry_images(model: Any) -> list[str]:
    """Give random values to the weight matrices transformers initialises at zero (Gemma-3's image projection
    `mm_input_projection_weight`): at zero every image reaches the language model as the same zero vectors, so a
    tiny random model would answer alike whatever the image. Returns their names."""
    import torch

    zeroed = [name for name, p in model.named_parameters() if p.dim() >= 2 and not p.detach().any()]
    with torch.no_grad():
        for name in zeroed:
            model.get_parameter(name).normal_(0.0, 0.02)
    return zeroed


def rename_weights(out_dir: Path, prefixes: dict[str, str]) -> None:
    """Rename saved weights whose name starts with a key of `prefixes` (and not already with its value): the real
    checkpoints' names, which vLLM loads (transformers loads both)."""
    if not prefixes:
        return
    from safetensors.torch import load_file, save_file

    for path in sorted(Path(out_dir).glob("*.safetensors")):
        renamed = {}
        for name, tensor in load_file(str(path)).items():
            for old, new in prefixes.items():
                if name.startswith(old) and not name.startswith(new):
                    name = new + name[len(old):]
                    break
            renamed[name] = tensor
        save_file(renamed, str(path), metadata={"format": "pt"})


def family_tiny_config(family: ModelFamily, shape: SmokeModelShape, vocab_size: int, folder: Path,
                       **token_ids: int | None):
    """(model class, config) of a tiny model of the family's class: transformers' own, or the family's shipped remote
    code's (model.yaml `remote_code:`; its config is written to `folder`)."""
    if family.remote_code is not None:
        from .remote_code import remote_tiny_config

        return remote_tiny_config(family, shape, vocab_size, folder, **token_ids)
    return tiny_config(family.architecture, shape, vocab_size, **token_ids)


def _meta_model(family: ModelFamily):
    """A tiny model of the family's class built without weights."""
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as folder:
        # Token ids inside the small vocabulary (some configs default to the real checkpoint's, e.g. GLM's pad 151329).
        model_class, config = family_tiny_config(family, family.smoke, family.smoke.vocab_size, Path(folder),
                                                 pad_token_id=0, bos_token_id=None, eos_token_id=0)
        with torch.device("meta"):
            return model_class(config)


def module_names(family: ModelFamily) -> set[str]:
    """Last-component names of every module of a tiny model of the family's architecture (built
    without weights), e.g. {"q_proj", "gate_up_proj", ...}: what LoRA target_modules may name; only
    modules under lora.modules_under where the family sets it."""
    model = _meta_model(family)
    under = family.lora.modules_under
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()
            if name and (under is None or name.startswith(under + "."))}


def parameter_names(family: ModelFamily) -> set[str]:
    """Full names of every parameter of a tiny model of the family's architecture (built without weights)."""
    return {name for name, _ in _meta_model(family).named_parameters()}


def missing_lora_targets(family: ModelFamily) -> list[str]:
    """LoRA target modules (a module's last name) and target parameters (a name suffix, as peft matches them)
    that the family's architecture does not have."""
    names = module_names(family)
    missing = [target for target in family.lora.target_modules if target not in names]
    if family.lora.target_parameters:
        params = parameter_names(family)
        missing += [t for t in family.lora.target_parameters if not any(p == t or p.endswith("." + t) for p in params)]
    return missing


def smoke_shape(context: RecipeContext) -> SmokeModelShape:
    """The family's smoke shape, or the task's (vLLM CPU: head_dim 64) with the family's extra config kwargs
    under the task's own (a MoE stays a MoE with few experts)."""
    family, own = context.family.smoke, context.recipe.smoke_model
    if own is None:
        return family
    return own.model_copy(update={"extra": {**family.extra, **own.extra}, "vision": own.vision or family.vision})


def make_smoke_model(context: RecipeContext, out_dir: Path, seed: int = 0, architecture: str | None = None) -> Path:
    """A tiny random model of the family's class, or of one of its variants' (`architecture`, model.yaml `variants:`)."""
    import torch
    import transformers

    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    torch.manual_seed(seed)
    family = context.family if architecture is None else context.family.for_architecture(architecture)
    if family is None:
        raise ValueError(f"{context.family.display_name} has no class {architecture}: it has "
                         f"{context.family.known_classes()}")
    context = replace(context, family=family)
    shape = smoke_shape(context)
    if family.remote_code is not None:  # the checkpoint's own tokenizer class, over a SentencePiece model
        from .remote_code import remote_smoke_tokenizer

        tokenizer = remote_smoke_tokenizer(family, smoke_corpus(context), shape.vocab_size, context.chat_template,
                                           out_dir)
    else:
        tokenizer = _train_tokenizer(context, shape.vocab_size)
    # ChatGLM's tokenizer counts its role tokens in vocab_size but not in len()
    vocab_size = len(tokenizer) if family.remote_code is None else max(len(tokenizer), tokenizer.vocab_size)
    model_class, config = family_tiny_config(
        family, shape, vocab_size, out_dir,
        eos_token_id=tokenizer.convert_tokens_to_ids(family.special_tokens.eos),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    for name, token in (family.modalities.tokens if family.modalities.vision else {}).items():
        if hasattr(config, f"{name}_id"):  # the model finds the image positions by these ids
            setattr(config, f"{name}_id", tokenizer.convert_tokens_to_ids(token))
    model = model_class(config)
    if family.remote_code is not None:
        from .remote_code import initialise

        initialise(model)
    if family.modalities.vision:
        carry_images(model)
    parameters = sum(p.numel() for p in model.parameters())
    if parameters > MAX_SMOKE_PARAMETERS:
        raise SmokeModelTooLarge(
            f"the smoke model of {family.architecture} has {parameters:,} parameters, above the bound of "
            f"{MAX_SMOKE_PARAMETERS:,}: its config ignored the smoke shape (model.yaml `smoke:`)")
    # Like the real checkpoints' generation_config.json: generation stops at any of the family's
    # stop tokens (GLM-4: <|endoftext|>, <|user|>, <|observation|>), which vLLM reads too.
    stops = [tokenizer.convert_tokens_to_ids(t) for t in [family.special_tokens.eos, *family.stop_tokens]]
    model.generation_config = transformers.GenerationConfig(
        eos_token_id=list(dict.fromkeys(stops)), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if family.remote_code is not None:  # the shipped code files and the class name, as in the real checkpoint
        from .remote_code import finish_folder

        finish_folder(family, out_dir)
    processor, no_processor = None, None
    # not for a text-only variant (Gemma-3 1b: no vision_config)
    if family.modalities.vision and family.modalities.processor and getattr(config, "vision_config", None) is not None:
        try:
            processor = tiny_processor(family, config, tokenizer)
            processor.save_pretrained(out_dir)
        except ProcessorUnavailable as exc:  # a text task's environment (LoRA on the host): the model reads text
            no_processor = f"no processor, the model takes text only here: {exc}"
            print(f"selfllm: WARNING: smoke model {family.architecture}: {no_processor}", flush=True)
    if shape.vision:
        rename_weights(out_dir, shape.vision.weight_prefixes)
    (out_dir / "SMOKE_MODEL.json").write_text(json.dumps(
        {"architecture": family.architecture, "random": True, "parameters": parameters,
         **vision_record(model, family, processor), **({"processor": no_processor} if no_processor else {}), "note": "tiny random model for smoke tests"}))
    return out_dir
