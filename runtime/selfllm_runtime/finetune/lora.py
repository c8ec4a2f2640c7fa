"""LoRA training (transformers Trainer + PEFT), inference with an adapter, and merging."""
from __future__ import annotations

import json
import logging
import http.client
import os
import shutil
import sys
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..chat_engine import end_of_turn
from ..chat_template import use_chat_template
from ..context import RecipeContext
from .data import ChatTokenizer, DataSourceError, EncodedData, default_data, encode_files
from . import layout, resume, vision
from .tracking import swanlog_dir, tracking_for
from ..loading import apply_torch_threads, load_causal_lm
from ..remote_code import source_model_dir
from ..metadata import Quantization
from ..settings import EngineSettings, LoraSettings

log = logging.getLogger("selfllm.lora")
RESULT_PREFIX = "SELFLLM_RESULT "  # one JSON line per action, parsed by smoke checks and scripts
RUN_INFO = "selfllm_lora.json"  # beside the adapter: how it was trained (infer/merge reuse it)
MAX_DATA_URL_BYTES = 256 * 2**20  # a DATA_URL larger than this is refused (mount bigger data: DATA_PATH)
DATA_URL_SCHEMES = ("http", "https")
# A checkpoint's processor files besides the tokenizer's, which merge copies from the base into the merged folder.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")


def emit_result(action: str, **fields: Any) -> dict[str, Any]:
    result = {"action": action, **fields}
    print(RESULT_PREFIX + json.dumps(result, ensure_ascii=False, default=str), flush=True)
    return result


def thinking_kwargs(context: RecipeContext, enable_thinking: bool) -> dict[str, Any]:
    family = context.family
    overrides = {family.thinking.template_kwarg: enable_thinking} if family.thinking else {}
    return context.template_kwargs(**overrides)


def fetch_data(url: str, folder: Path, max_bytes: int = MAX_DATA_URL_BYTES) -> Path:
    """Download DATA_URL (http/https only, at most max_bytes) into folder once; atomic rename, so parallel
    ranks never read half a file. Any failure is a DataSourceError naming the URL and DATA_PATH."""
    instead = "set DATA_PATH to a mounted file instead"
    parts = urlsplit(url)
    if parts.scheme.lower() not in DATA_URL_SCHEMES or not parts.netloc:
        raise DataSourceError(f"DATA_URL={url!r}: only http:// and https:// URLs are fetched; {instead}")
    target = folder / (Path(parts.path).name or "data.json")
    if target.is_file() and target.stat().st_size > 0:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + f".{os.getpid()}.part")
    too_large = f"DATA_URL={url} is larger than {max_bytes} bytes (MAX_DATA_URL_BYTES); {instead}"
    log.info("downloading training data %s → %s", url, target)
    try:
        with urllib.request.urlopen(url, timeout=60) as answer, partial.open("wb") as out:
            if int(answer.headers.get("Content-Length") or 0) > max_bytes:
                raise DataSourceError(too_large)
            size = 0
            while block := answer.read(1 << 20):
                size += len(block)
                if size > max_bytes:
                    raise DataSourceError(too_large)
                out.write(block)
        partial.replace(target)
    except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError, HTTPError, timeouts are OSErrors
        partial.unlink(missing_ok=True)
        if isinstance(exc, DataSourceError):
            raise
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise DataSourceError(f"could not fetch DATA_URL={url} ({reason}); {instead}") from None
    return target


def load_tokenizer(context: RecipeContext, model_dir: Path, chat_template: str | None = None):
    """The checkpoint's tokenizer; chat_template: CHAT_TEMPLATE, whose choice it then renders with (the saved
    adapter's tokenizer keeps it, so `infer` and `merge` render as training did)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=context.family.trust_remote_code)
    if chat_template is not None:
        chosen = use_chat_template(tokenizer, context, model_dir, chat_template)
        log.info("chat template: %s", chosen.describe())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = context.family.special_tokens.pad
    return tokenizer


def prepare_data(context: RecipeContext, tokenizer, settings: LoraSettings,
                 images_from: Path | None = None) -> tuple[list[Path], EncodedData | Any, Any]:
    """(data files, examples, collator); images_from: a vision checkpoint whose processor reads image-text data
    (finetune/vision.py; the shipped LaTeX-OCR set by default)."""
    paths = list(settings.data)
    if not paths and settings.data_url:
        paths = [fetch_data(settings.data_url, settings.data_dir)]
    family = context.family
    chat = ChatTokenizer(tokenizer, thinking_kwargs(context, settings.enable_thinking), end_of_turn(tokenizer, family),
                         settings.max_length, closes_reply=family.template_closes_reply, reasoning=family.reasoning,
                         system_role=family.system_role)
    if images_from is not None:
        return vision.prepare(context, images_from, chat, paths, settings)
    from transformers import DataCollatorForSeq2Seq

    paths = paths or [default_data()]
    return (paths, encode_files(paths, chat, settings.system_prompt, settings.max_samples),
            DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))


# The settings a checkpoint is tied to (RESUME=auto continues only when all of them match), by variable name.
RESUME_FIELDS = ("quantization", "r", "alpha", "dropout", "target_modules", "target_parameters", "seed", "batch_size",
                 "grad_accum", "learning_rate", "epochs", "max_steps", "max_length", "max_samples", "system_prompt",
                 "enable_thinking", "fsdp")


def training_identity(settings: LoraSettings, model_dir: Path, data: list[Path], processes: int,
                      fields: tuple[str, ...] = RESUME_FIELDS) -> dict[str, str]:
    """What shaped this run's checkpoints: the base (its name and config.json), the data (by content), the
    process count and the RESUME_FIELDS settings, each under the variable that sets it."""
    from ..model_source import checkpoint_name, file_sha256

    config = Path(model_dir) / "config.json"
    model = checkpoint_name(model_dir) + (f" (config.json sha256 {file_sha256(config)[:12]})"
                                          if config.is_file() else "")
    identity = {"MODEL": model, "DATA": ", ".join(f"{p.name} (sha256 {file_sha256(p)[:12]})" for p in data),
                "NPROC": str(processes)}
    envs = {info.field: info.env for info in type(settings).infos()}
    for field in fields:
        identity[envs[field]] = json.dumps(getattr(settings, field), ensure_ascii=False, default=str)
    return identity


def adapter_digest(model) -> str:
    """sha256 (16 hex) of the LoRA weights a PeftModel holds, in name order."""
    import hashlib

    from peft import get_peft_model_state_dict

    digest = hashlib.sha256()
    for name, tensor in sorted(get_peft_model_state_dict(model).items()):
        digest.update(name.encode() + tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def adapter_model(context: RecipeContext, model_dir: Path, settings: LoraSettings) -> tuple[Any, Any]:
    """The base model (QUANTIZATION: QLoRA's k-bit preparation) with a fresh LoRA adapter of the settings'
    r/alpha/dropout/targets, ready to train: (the LoadedModel, the PeftModel)."""
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    images = vision.reads_images(context, model_dir)  # a vision checkpoint: LoRA's options for its projector
    spread = layout.choose(context, settings) == "spread"
    log.info("GPU_LAYOUT=%s: %s", "spread" if spread else "data",
             "one process, the layers spread over the visible cards" if spread
             else "a whole model in each process (NPROC)" + (", sharded by FSDP" if settings.fsdp != "off" else ""))
    loaded = load_causal_lm(context, model_dir, settings.quantization, training=True, spread=spread)
    model = loaded.model
    model.config.use_cache = False
    if settings.quantization != "none":  # QLoRA: freezes the base, upcasts the unquantized layers to fp32
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # else frozen embeddings give checkpointed blocks no grad (upstream #119)
    # A MoE's fused experts are parameters, not modules: peft wraps them by name (target_parameters).
    by_parameter = {"target_parameters": settings.target_parameters} if settings.target_parameters else {}
    # A vision-language model: only the language model's modules (model.yaml lora.modules_under).
    targets = context.family.lora.peft_target_modules(settings.target_modules)
    lora_config = LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=targets, r=settings.r,
                             lora_alpha=settings.alpha, lora_dropout=settings.dropout, inference_mode=False, **by_parameter,
                             **vision.lora_options(context, images))
    try:
        model = get_peft_model(model, lora_config)
    except ValueError as exc:
        if "not found in the base model" not in str(exc):
            raise
        family = context.family
        raise ValueError(
            f"LoRA found none of {','.join(settings.target_modules)}"
            + (f" under {family.lora.modules_under}" if family.lora.modules_under else "")
            + f" in {model_dir} ({type(model).__name__}); {family.display_name} expects {family.known_classes()}: "
            f"set LORA_TARGET_MODULES to modules this checkpoint has, or add its class under `variants:` in "
            f"{context.family_dir / 'model.yaml'}") from None
    trainable, total = model.get_nb_trainable_parameters()
    under = f" under {context.family.lora.modules_under}" if context.family.lora.modules_under else ""
    log.info("%s r=%d alpha=%d on %s%s: %d trainable of %d parameters (%.3f%%)",
             "LoRA" if settings.quantization == "none" else f"LoRA on a {settings.quantization} base", settings.r,
             settings.alpha, ",".join(settings.target_modules + settings.target_parameters), under, trainable, total,
             100 * trainable / total)
    return loaded, model


def trainer_arguments(settings: LoraSettings, run_dir: Path, loaded: Any, tracked: Any, world: int) -> dict[str, Any]:
    """The TrainingArguments every adapter-training task sets the same way from its settings (a Trainer
    subclass's config, TRL's GRPOConfig, takes them too): run folder, batch and schedule, checkpoints, precision
    of the loaded model's device, tracking, and data parallelism (NPROC: gloo on CPU; FSDP)."""
    import torch

    device, dtype = loaded.device, loaded.dtype
    distributed: dict[str, Any] = {}
    if world > 1 and device == "cpu":
        distributed["ddp_backend"] = "gloo"
    if settings.fsdp != "off":
        if world < 2 or device != "cuda":
            raise ValueError(f"FSDP={settings.fsdp} shards the model across GPUs: it needs NPROC > 1 on CUDA "
                             f"(here {world} process(es) on {device})")
        distributed |= {"fsdp": f"{settings.fsdp} auto_wrap", "fsdp_config": {"use_orig_params": True}}
    return dict(
        **distributed,
        output_dir=str(run_dir),
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        learning_rate=settings.learning_rate,
        logging_steps=settings.logging_steps,
        save_steps=settings.save_steps,
        save_total_limit=3,
        save_on_each_node=True,
        gradient_checkpointing=False,  # enabled on the base model by adapter_model, before PEFT wraps it
        bf16=device == "cuda" and dtype == torch.bfloat16,
        fp16=device == "cuda" and dtype == torch.float16,
        use_cpu=device == "cpu",
        report_to=tracked.report_to,
        run_name=run_dir.name,
        seed=settings.seed,
    )


def stage_adapter(trainer: Any, run_dir: Path) -> Path:
    """Save the trained adapter aside (run_dir/.final-adapter.partial; every rank calls it): publish_adapter
    moves it into the run folder, so a stop never leaves a half-written adapter where the finished one goes."""
    staged = run_dir / ".final-adapter.partial"
    if trainer.is_world_process_zero() and staged.exists():
        shutil.rmtree(staged)
    trainer.save_model(str(staged))  # the adapter only: adapter_config.json + adapter_model.safetensors
    return staged


def publish_adapter(staged: Path, tokenizer: Any, run_dir: Path, info: dict[str, Any]) -> None:
    """Rank 0: the tokenizer and RUN_INFO (how it was trained: infer/merge read it) beside the staged adapter,
    then all of it into run_dir (RUN_INFO last)."""
    tokenizer.save_pretrained(str(staged))
    (staged / RUN_INFO).write_text(json.dumps(info, ensure_ascii=False, indent=2), encoding="utf-8")
    resume.publish(staged, run_dir, last=RUN_INFO)
    print(f"LoRA adapter saved to {run_dir}", flush=True)


def train(context: RecipeContext, model_dir: Path, settings: LoraSettings) -> dict[str, Any]:
    """Fine-tune a LoRA adapter; returns (and prints as SELFLLM_RESULT) a summary with the losses."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from .curves import CURVES_PNG

    model_dir = Path(model_dir)
    context = context.for_checkpoint(model_dir)  # a text-only size of a vision-language family: its own LoRA modules
    images = vision.reads_images(context, model_dir)  # image-text data through the family's processor
    run_dir = settings.run_dir(model_dir, *([vision.DEFAULT_IMAGE_DATA] if images else []))
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if rank != 0:  # torchrun's other processes: only rank 0 logs, writes the adapter and the result line
        log.setLevel(logging.WARNING)
    torch.manual_seed(settings.seed)
    log.info("%s", apply_torch_threads(settings.torch_threads))
    tokenizer = load_tokenizer(context, model_dir, settings.chat_template)
    paths, data, collator = prepare_data(context, tokenizer, settings, model_dir if images else None)
    log.info("%d examples from %d records in %s (%d tokens, %d skipped as too long)", len(data.examples),
             data.records, ", ".join(map(str, paths)), data.tokens, data.skipped)
    identity = training_identity(settings, model_dir, paths, world)
    start = resume.plan(run_dir, identity, settings.resume)  # refuses before the model is loaded
    loaded, model = adapter_model(context, model_dir, settings)
    device, dtype = loaded.device, loaded.dtype
    if images:
        log.info("trainable outside the language model: %s", vision.trainable_outside_language_model(model, context))

    losses: list[float] = []

    class LossRecorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    effective = settings.batch_size * settings.grad_accum * world
    log.info("%d process(es): batch %d per device × %d accumulation steps × %d = %d examples per optimizer step; "
             "learning rate %g, not scaled with the process count (scale LEARNING_RATE yourself for a larger "
             "effective batch)%s", world, settings.batch_size, settings.grad_accum, world, effective,
             settings.learning_rate, ", FSDP full_shard" if settings.fsdp != "off" else "")
    tracked = tracking_for(settings, run_dir, project="selfllm-lora")
    args = TrainingArguments(
        **trainer_arguments(settings, run_dir, loaded, tracked, world),
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data.examples, processing_class=tokenizer,
                      data_collator=collator,
                      callbacks=[LossRecorder(), resume.record_callback(identity), *tracked.callbacks])
    output, start, seconds = resume.train_from(trainer, start, log)
    # The final adapter is written aside, then moved into the run folder (RUN_INFO last): a stop never leaves a
    # half-written adapter where the finished one goes.
    staged = stage_adapter(trainer, run_dir)
    if world > 1:  # every rank says what it trained: the ranks of one data-parallel run hold the same adapter
        print(f"selfllm: rank {rank}/{world} adapter sha256 {adapter_digest(model)} last loss "
              f"{losses[-1] if losses else float('nan'):.4f}", file=sys.stderr, flush=True)
    if not trainer.is_world_process_zero():
        return {}
    peak_gb = round(torch.cuda.max_memory_reserved() / 2**30, 2) if device == "cuda" else None
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    info = {"base_model": str(model_dir), "family": context.recipe.model, "data": [str(p) for p in paths],
            "system_prompt": getattr(data, "system_prompt", settings.system_prompt), "enable_thinking": settings.enable_thinking,
            "settings": json.loads(settings.model_dump_json())}
    publish_adapter(staged, tokenizer, run_dir, info)
    return emit_result(
        "train", adapter_dir=str(run_dir), architecture=context.family.architecture, device=device,
        quantization=settings.quantization,
        base_weights_gb=loaded.weights_gb, steps=int(output.global_step), resumed_from_step=start.step,
        trained_steps=int(output.global_step) - start.step, examples=len(data.examples),
        records=data.records, images=getattr(data, "images", 0), loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None,
        loss_min=min(losses) if losses else None, losses=[round(x, 4) for x in losses[:200]],
        train_tokens=tokens, peak_gpu_memory_gb=peak_gb, seconds=round(seconds, 3), tokens_per_s=round(tokens / seconds, 1) if seconds else None,
        adapter_files=sorted(p.name for p in run_dir.glob("adapter_*")), report_to=settings.report_to,
        gpu_layout=settings.layout(context.recipe.gpu.count), devices=placed_on(model),
        curves=str(run_dir / CURVES_PNG), swanlog=str(swanlog_dir(run_dir)) if settings.report_to == "swanlab" else None)


def placed_on(model: Any) -> list[str]:
    """The devices a model's parameters are on (GPU_LAYOUT=spread: every card the layers went to)."""
    return sorted({str(p.device) for p in model.parameters()})


def read_run_info(adapter_dir: Path | None) -> dict[str, Any]:
    path = Path(adapter_dir) / RUN_INFO if adapter_dir else None
    return json.loads(path.read_text(encoding="utf-8")) if path and path.is_file() else {}


def infer(context: RecipeContext, model_dir: Path, adapter_dir: Path | None, prompt: str,
          system_prompt: str | None = None, enable_thinking: bool | None = None, max_new_tokens: int = 256,
          temperature: float | None = None, top_p: float | None = None, seed: int | None = 0,
          quantization: Quantization | None = None, image: Path | None = None) -> dict[str, Any]:
    """One reply from the base model plus adapter (or from a merged model when adapter_dir is None).
    The system prompt, thinking switch and the base's quantization default to what the adapter was
    trained with (a merged model: none); temperature and top_p to the checkpoint's generation_config."""
    from ..chat_engine import ChatEngine

    info = read_run_info(adapter_dir) or read_run_info(Path(model_dir))  # a merged folder keeps it too
    system_prompt = system_prompt if system_prompt is not None else info.get("system_prompt")
    thinking = enable_thinking if enable_thinking is not None else info.get("enable_thinking", False)
    trained = info.get("settings", {}).get("quantization", "none") if adapter_dir is not None else "none"
    quantization = quantization or trained
    content = vision.image_prompt(prompt, image) if image is not None else prompt  # --image: checked before loading
    engine = ChatEngine(context, Path(model_dir), context.settings(EngineSettings, cli={"quantization": quantization}))
    if adapter_dir is not None:
        from peft import PeftModel

        engine.model = PeftModel.from_pretrained(engine.model, str(adapter_dir)).eval()
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": content}]
    kwargs = {context.family.thinking.template_kwarg: thinking} if context.family.thinking else {}
    params = engine.params(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                           template_kwargs=kwargs)
    completion = engine.generate(messages, params)
    print(completion.text, flush=True)
    return emit_result("infer", model=str(source_model_dir(model_dir)), adapter=str(adapter_dir) if adapter_dir else None,
                       quantization=engine.quantization, weights_gb=engine.loaded.weights_gb,
                       prompt=prompt, reply=completion.text, output=completion.raw,
                       completion_tokens=completion.completion_tokens, finish_reason=completion.finish_reason,
                       image=str(image) if image is not None else None,
                       prompt_logprob=prompt_logprob(engine, engine.encode(messages, kwargs)))


def prompt_logprob(engine: Any, prompt: Any) -> float:
    """Mean log-probability the model gives each token of `prompt` (chat_engine.EncodedPrompt: with its images'
    pixel values, an image-conditioned figure) (teacher forcing): a fingerprint of the
    weights that an untrained adapter leaves as it is (LoRA's B starts at zero) and training moves, even
    where a tiny random model's greedy reply is the same token over and over. Call it when no generation
    runs (the engine's scheduler is idle)."""
    import torch

    model = engine.model
    device = next(model.parameters()).device
    ids = torch.tensor([prompt.ids], device=device)
    inputs = {key: value.to(device) for key, value in prompt.inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(engine.loaded.dtype)
    with torch.no_grad():
        logits = model(input_ids=ids, **inputs).logits[0, :-1].float()
    return round(float(torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).mean()), 6)


def merge(context: RecipeContext, model_dir: Path, adapter_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Fold the adapter into the base weights: a full model folder for from_pretrained, vLLM, etc.
    Always into the base in its own dtype (bf16), never a quantized one: an adapter trained on a 4-bit
    or 8-bit base (QLoRA) learnt to correct that base's rounded weights, so the merged model answers
    close to, not exactly as, the quantized base + adapter (QUANTIZATION=4bit on the merged folder
    quantizes it again)."""
    from peft import PeftModel

    from ..loading import model_class

    trained = read_run_info(Path(adapter_dir)).get("settings", {}).get("quantization", "none")
    if trained != "none":
        log.info("the adapter was trained on a %s base: merging it into the base in full precision", trained)
    trust = context.family.trust_remote_code
    # the class training loaded (a vision family's own: AutoModelForCausalLM has no GLM-4.1V or Qwen-VL mapping)
    base = model_class(context, model_dir).from_pretrained(model_dir, dtype="auto", trust_remote_code=trust)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir))
    load_tokenizer(context, Path(adapter_dir) if (Path(adapter_dir) / "tokenizer_config.json").is_file()
                   else model_dir).save_pretrained(str(out_dir))
    for name in PROCESSOR_FILES:  # an image family's processor (the engine loads it from the model folder)
        if (Path(model_dir) / name).is_file():
            shutil.copyfile(Path(model_dir) / name, out_dir / name)
    if (Path(adapter_dir) / RUN_INFO).is_file():
        (out_dir / RUN_INFO).write_bytes((Path(adapter_dir) / RUN_INFO).read_bytes())
    print(f"merged model saved to {out_dir}", flush=True)
    return emit_result("merge", model=str(source_model_dir(model_dir)), adapter=str(adapter_dir), merged_dir=str(out_dir),
                       trained_on=trained, merged_dtype=str(merged.dtype).removeprefix("torch."),
                       files=sorted(p.name for p in out_dir.iterdir()))
