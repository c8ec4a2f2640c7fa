"""The one schema of recipe metadata, shared by the host toolkit and the in-image runtime.

A recipe's metadata is three layers, later ones winning field by field:
- ``tasks/<task>/task.yaml``: what is the same for every recipe of a task kind (stack, port, title,
  smoke settings, CPU variant, env defaults);
- ``recipes/<model>/model.yaml``: what is true of the model family for every task (checkpoints on
  both hubs, VRAM per task kind, upstream contributors per task, architecture, chat template quirks,
  thinking switch, stop tokens, reasoning parser, LoRA targets);
- ``recipes/<model>/<task>/recipe.yaml``: its identity (model, task) and only what this recipe changes.

Only pydantic and PyYAML are imported here, so the host toolkit can validate without torch.
"""
from __future__ import annotations

import math
import os
import re
from enum import Enum
from functools import cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, RootModel, ValidationError, field_validator, model_validator

MODEL_FILE = "model.yaml"
RECIPE_FILE = "recipe.yaml"
TASK_FILE = "task.yaml"
# Credited where upstream has no tutorial for a recipe (utils.py gives it no points).
PROJECT_CREDIT = "self-llm-recipes"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def tasks_root() -> Path:
    """tasks/ beside runtime/: every task kind's folder (/opt/selfllm/tasks in images, which hold their own kind's)."""
    return Path(os.environ.get("SELFLLM_TASKS_ROOT", Path(__file__).resolve().parent.parent.parent / "tasks"))


TASK_NAME = r"^[a-z][a-z0-9_]*$"


class TaskKindInfo(Strict):
    """task.yaml `kind:`: what the runtime and the toolkit need to know of a task kind, so that a new kind costs
    one tasks/<kind>/ folder and one runtime module (plus its settings model and smoke check, found by name)."""

    module: str = Field(pattern=r"^\w+$", description="runtime/selfllm_runtime/tasks/<module>.py: its start(context)")
    settings: str = Field(pattern=r"^[A-Z]\w+Settings$", description="its settings model in settings.py, by name")
    heading: str = Field(description="its column in the READMEs' VRAM table, e.g. LoRA")
    label: str = Field(description="its name in the README's recipe table, e.g. LoRA 微调")
    health_path: str | None = Field(None, pattern=r"^/", description="HTTP path `selfllm health` probes; none: no server")
    quantization: bool = Field(False, description="reads QUANTIZATION (bitsandbytes 8bit/4bit)")
    weights: Literal["bf16", "fp32", "shipped"] = Field(
        "bf16", description="how it holds the weights it doesn't quantize: bf16; fp32 (training: QLoRA upcasts the "
        "rest); shipped (an engine that loads the checkpoint's own format, e.g. gpt-oss's MXFP4)")
    command: str | None = Field(None, description="help of a `selfllm <kind> ...` command its module's main(argv) "
                                "runs (train | infer | merge ...); none: no such command")
    media: list[Literal["image", "video"]] = Field(
        [], description="what it carries besides text to a family that takes it (model.yaml modalities): image, video")
    lock_platform: str = Field("x86_64-manylinux_2_28", pattern=r"^x86_64-manylinux_2_\d+$", description="the "
                               "platform its locks are resolved for (uv's --python-platform): manylinux_2_34 where "
                               "its engine ships wheels for glibc 2.34 only (SGLang); Ubuntu 22.04 has 2.35")
    every_family: bool = Field(True, description="every family has a recipe of this kind (`build_matrix.py new` "
                               "writes it); false: only the families whose model.yaml credits an upstream tutorial of it")
    parallel: bool = Field(False, description="serves across cards by the family's layout (model.yaml `parallel:`, "
                           "TENSOR_PARALLEL_SIZE × PIPELINE_PARALLEL_SIZE): the recipe needs that many GPUs")
    spreads: bool = Field(False, description="trains a family one card can't hold in one process, its layers spread "
                          "over the family's training cards (model.yaml parallel.training_gpus; GPU_LAYOUT=spread, "
                          "device_map=auto as upstream's LoRA tutorials): the recipe needs that many GPUs")


def task_kind_names(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / TASK_FILE).is_file() and re.match(TASK_NAME, p.name))


# The task kinds: the folders of tasks/ (an image's tasks/ holds its own kind's only).
TaskKind = Enum("TaskKind", [(name, name) for name in task_kind_names(tasks_root())], type=str, module=__name__)


@cache
def kind_info(task: str) -> TaskKindInfo:
    """task.yaml `kind:` of task kind `task` (under tasks_root())."""
    path = tasks_root() / getattr(task, "value", task) / TASK_FILE
    defaults: TaskDefaults = _validate(TaskDefaults, path)
    return defaults.kind


def reads_quantization(task: str) -> bool:
    """Task kinds that read QUANTIZATION (settings.py; vLLM has its own `--quantization`, through VLLM_ARGS)."""
    return kind_info(task).quantization


class ModelSource(str, Enum):
    modelscope = "modelscope"
    huggingface = "huggingface"


class CheckpointIds(Strict):
    """Default checkpoint of a recipe on each hub."""

    modelscope: str = Field(pattern=r"^[\w.-]+/[\w.-]+$")
    huggingface: str = Field(pattern=r"^[\w.-]+/[\w.-]+$")


class SpecialTokens(Strict):
    eos: str
    pad: str
    bos: str | None = None
    additional: list[str] = []


class Thinking(Strict):
    """A chat-template switch that turns step-by-step thinking on or off (Qwen3's enable_thinking)."""

    template_kwarg: str
    default: bool = True


class ReasoningEffort(Strict):
    """A string chat-template control of how much the model reasons (gpt-oss: reasoning_effort low/medium/high),
    where other families have an on/off switch (Thinking). OpenAI's API takes it as `reasoning_effort`."""

    template_kwarg: str = "reasoning_effort"
    choices: list[str] = Field(min_length=2)
    default: str

    @field_validator("default")
    @classmethod
    def _one_of_the_choices(cls, value: str, info: Any) -> str:
        choices = info.data.get("choices") or []
        if value not in choices:
            raise ValueError(f"{value!r} is not one of choices {choices}")
        return value


class Reasoning(Strict):
    """How reasoning text is delimited in the output, and vLLM's and SGLang's parsers for it (`--reasoning-parser`;
    their names differ: SGLang's are in its parser/reasoning_parser.py). A marker may be made of special tokens
    (gpt-oss's harmony channels: `<|channel|>analysis<|message|>`): those stay in the decoded text."""

    start: str
    end: str
    vllm_parser: str | None = None
    vllm_in_content: bool = Field(False, description="the vLLM parser keeps the thinking, markers included, in "
                                  "`content` (MiniMax-M2's minimax_m2_append_think) instead of moving it to `reasoning`")
    sglang_parser: str | None = None
    sglang_in_content: bool = Field(False, description="the SGLang parser keeps the thinking, markers included, in "
                                    "`content` (MiniMax-M2's minimax-append-think)")
    answer_start: str | None = Field(None, description="the marker the model writes before its answer, after the "
                                     "reasoning (Hunyuan-A13B: `<answer>\n`): LoRA learns replies inside the markers, "
                                     "as the checkpoint answers")
    answer_end: str | None = Field(None, description="the marker after the answer (Hunyuan-A13B: `\n</answer>`)")

    @model_validator(mode="after")
    def _answer_markers_pair(self) -> "Reasoning":
        if (self.answer_start is None) != (self.answer_end is None):
            raise ValueError("answer_start and answer_end go together")
        return self

    def wrap_answer(self, text: str) -> str:
        """A reply as the model writes it: its answer inside the answer markers where the family has them (once).
        A reply that holds its reasoning keeps that before the markers, as the model writes it."""
        if self.answer_start is None or self.answer_end is None:
            return text
        cut = text.find(self.end)
        cut = 0 if cut < 0 else cut + len(self.end)
        answer = text[cut:].lstrip()
        head = text[:len(text) - len(answer)]
        if answer.startswith(self.answer_start):
            return text
        return head + self.answer_start + answer + self.answer_end


class ToolCalls(Strict):
    """How the model writes tool calls, how its chat template takes the tools, and vLLM's parser.

    format: hermes (Qwen: `<tool_call>{"name", "arguments"}</tool_call>`), llama3_json (Llama 3.1: a
    bare `{"name", "parameters"}` object, maybe after `<|python_tag|>`), glm4 (GLM-4: `name\n{args}`),
    minicpm5 (MiniCPM5: XML `<function name="…"><param name="…">value</param></function>`, values typed
    by the tool's JSON schema).
    start/end: the markers around one call, where the format has visible ones.
    tools_in: `argument` = apply_chat_template(tools=...); `system_message` = a `tools` key on the
    system message (glm-4-9b-chat's template reads item['tools']).
    vllm_parser: vLLM's --tool-call-parser; None where vLLM has none for this format.
    sglang_parser: SGLang's --tool-call-parser (its function_call_parser.py names); None where SGLang has none."""

    format: Literal["hermes", "llama3_json", "glm4", "minicpm5"]
    start: str | None = None
    end: str | None = None
    tools_in: Literal["argument", "system_message"] = "argument"
    vllm_parser: str | None = None
    sglang_parser: str | None = None


# How a family's chat template takes a system message (ModelFamily.system_role; applied by system_role.py):
# - native: as its own turn (the template renders system messages);
# - merge_into_first_user: the template has no system role (Gemma-2's raises "System role not supported"),
#   so each system message's text and a blank line go before the text of the first user turn after it,
#   as Gemma-3's own template does; a system message with no user turn after it becomes a user turn.
SystemRole = Literal["native", "merge_into_first_user"]


class LoraDefaults(Strict):
    target_modules: list[str] = Field(min_length=1)
    target_parameters: list[str] = Field(
        [], description="parameters (not modules) that get LoRA, by name suffix: a MoE's fused expert weights, which "
        "transformers 5 keeps as 3-D parameters (e.g. mlp.experts.gate_up_proj); peft's target_parameters")
    modules_under: str | None = Field(
        None, pattern=r"^\w+(\.\w+)*$", description="only modules under this module path get LoRA: a vision-language "
        "model's language model (model.language_model), whose vision tower has modules of the same names")
    r: int = Field(8, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)

    def peft_target_modules(self, names: list[str]) -> list[str] | str:
        """peft's target_modules for module names `names`: the list itself, or, with modules_under, a regex
        (peft full-matches a string against each module's full name)."""
        if self.modules_under is None:
            return names
        return rf"{re.escape(self.modules_under)}\..*\.(?:{'|'.join(map(re.escape, names))})"

    @field_validator("dropout")
    @classmethod
    def _parameters_need_no_dropout(cls, value: float, info: Any) -> float:
        if value and info.data.get("target_parameters"):
            raise ValueError("LoRA on target_parameters (peft's ParamWrapper) works only with dropout 0")
        return value


Modality = Literal["text", "image", "video", "audio"]


class ImageLimits(Strict):
    """What one request may carry of images (OpenAI `image_url` parts), and how large each may be."""

    max_per_request: int = Field(4, gt=0, description="images in one request, all messages together")
    max_pixels: int = Field(1280 * 28 * 28, gt=0, description="width × height above which an image is scaled down "
                            "(the processor's max_pixels where it has one)")
    max_bytes: int = Field(10 * 1024 * 1024, gt=0, description="encoded size of one image (data: URL or download)")


class VideoLimits(Strict):
    """What one request may carry of videos (vLLM's `video_url` parts), and how much of each is read."""

    max_per_request: int = Field(1, gt=0, description="videos in one request, all messages together")
    max_frames: int = Field(16, gt=0, description="frames sampled from one video (two a second, spread over it)")
    max_pixels: int = Field(768 * 28 * 28, gt=0, description="width × height above which a frame is scaled down "
                            "(qwen-vl-utils' VIDEO_MAX_PIXELS)")
    max_bytes: int = Field(50 * 1024 * 1024, gt=0, description="encoded size of one video (data: URL or download)")


class Modalities(Strict):
    """What a family takes as input (model.yaml `modalities:`); text-only families leave it out."""

    input: list[Modality] = Field(["text"], min_length=1)
    processor: str | None = Field(
        None, pattern=r"^[A-Z]\w+$", description="transformers processor class of the checkpoints (e.g. "
        "Gemma3Processor): it turns images/video and text into the model's inputs")
    image: ImageLimits | None = None
    video: VideoLimits | None = None
    tokens: dict[str, str] = Field(
        {}, description="the processor's named tokens as the checkpoint's tokenizer declares them (its "
        "extra_special_tokens), e.g. image_token: <image_soft_token>; a smoke model gets them, and its config their ids "
        "(`<name>_id`, e.g. image_token_id)")
    smoke_processor: dict[str, Any] = Field(
        {}, description="arguments of the smoke model's processor that follow the tiny config (Gemma-3: "
        "image_seq_length = smoke.extra.mm_tokens_per_image)")
    smoke_image_processor: dict[str, Any] = Field(
        {}, description="arguments of the smoke model's image (and video) processor besides the patch, merge and "
        "pooling sizes it takes from the tiny vision config: bounds that keep an image to a few tokens on CPU "
        "(Qwen/GLM: size {shortest_edge, longest_edge} in pixels; Gemma-4: max_soft_tokens)")
    lora_vision: Literal["frozen", "projector"] = Field(
        "frozen", description="what LoRA training may touch besides the language model: frozen = nothing; "
        "projector = the vision-to-text projector/merger is trained too")
    projector: str | None = Field(
        None, pattern=r"^[A-Za-z_][\w.]*$", description="module path of the vision-to-text projector/merger in the "
        "checkpoint's class (Gemma-3: model.multi_modal_projector): what `lora_vision: projector` trains")
    mixed_image_video: bool = Field(
        True, description="its class reads images and a video in one prompt; false where it can't (transformers "
        "5.20.2's Glm4v counts video frames as image tokens): such a request is refused with a 400")
    vision_modules: list[str] = Field(
        [], description="module paths of the vision tower and projector in the checkpoint's class (Gemma-3: "
        "model.vision_tower, model.multi_modal_projector): QUANTIZATION (QLoRA) leaves them unquantized, as the "
        "frozen tower is small next to the language model and bitsandbytes' 4-bit CPU kernels refuse layers narrower "
        "than a quantization block")

    @field_validator("input")
    @classmethod
    def _text_first(cls, value: list[str]) -> list[str]:
        if "text" not in value:
            raise ValueError("every family takes text: list `text` among the inputs")
        if len(set(value)) != len(value):
            raise ValueError("an input is listed twice")
        return value

    @model_validator(mode="after")
    def _limits_for_inputs(self) -> "Modalities":
        for kind, limits in (("image", self.image), ("video", self.video)):
            if limits is not None and kind not in self.input:
                raise ValueError(f"`{kind}:` limits for a family that doesn't list `{kind}` among its inputs")
            if limits is None and kind in self.input:
                raise ValueError(f"a family that takes `{kind}` needs `{kind}:` limits (max_per_request, ...)")
        if self.vision and not self.processor:
            raise ValueError("a family that takes images or video names its transformers `processor` class")
        if self.lora_vision == "projector" and not self.projector:
            raise ValueError("`lora_vision: projector` needs the projector's module path (`projector:`)")
        return self

    def takes(self, kind: Modality) -> bool:
        return kind in self.input

    @property
    def vision(self) -> bool:
        return self.takes("image") or self.takes("video")


class Variant(Strict):
    """Checkpoints of the family in another class than its default (model.yaml `variants:`, keyed by class):
    Gemma-3 270m / 1b are text-only Gemma3ForCausalLM, 4b and up the vision-language class."""

    sizes: list[str] = Field(min_length=1, description="the checkpoints of this class, e.g. [270m, 1b]")
    lora_modules_under: str | None = Field(
        None, pattern=r"^\w+(\.\w+)*$", description="lora.modules_under for this class (None: the whole model)")
    smoke_extra: dict[str, Any] = Field({}, description="smoke.extra for a tiny model of this class")


class SmokeVision(Strict):
    """What vLLM needs of a vision-language family's tiny model beyond its processor's tokens (modalities.tokens):
    texts its real vocabulary has as one token, and the real checkpoints' weight names."""

    single_tokens: list[str] = Field(
        [], description="texts that are one token of the real vocabulary, which the engine looks up as such "
        "(vLLM's Gemma-3 wants '\\n' to '\\n\\n\\n\\n')")
    weight_prefixes: dict[str, str] = Field(
        {}, description="saved weight-name prefixes renamed to the real checkpoints' (which vLLM loads): Gemma-3's "
        "vision_tower. → vision_tower.vision_model.")


class SmokeModelShape(Strict):
    """Size of the tiny random model used by smoke tests (same architecture as the real one)."""

    hidden_size: int = Field(64, gt=0)
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int = Field(2, gt=0)
    head_dim: int = Field(16, gt=0)
    intermediate_size: int = Field(128, gt=0)
    vocab_size: int = Field(1024, ge=300)
    extra: dict[str, Any] = Field(
        {}, description="more config kwargs of the architecture, passed as they are: a MoE's num_experts, "
        "moe_intermediate_size...; a composite config's nested text_config / vision_config dicts")
    vision: SmokeVision | None = Field(None, description="a vision-language family's single-token texts and weight "
                                       "names, as vLLM reads them")


Quantization = Literal["none", "8bit", "4bit"]  # the QUANTIZATION setting (loading.py)
QUANTIZATIONS: tuple[Quantization, ...] = ("none", "8bit", "4bit")
# Bytes one quantized weight takes: LLM.int8 (+ per-row scales); NF4 with double-quantized block scales.
WEIGHT_BYTES: dict[Quantization, float] = {"8bit": 1.0, "4bit": 0.52}


class ParameterCount(Strict):
    """Parameters of the family's default checkpoint, in billions (from its config.json)."""

    total: float = Field(gt=0)
    unquantized: float = Field(ge=0, description="embeddings + lm_head: bitsandbytes leaves them unquantized")
    shipped_gb: float | None = Field(
        None, gt=0, description="GB of the weights as the checkpoint ships them, where that is less than bf16 and "
        "vLLM serves them so (gpt-oss: MXFP4 experts): the vllm VRAM figure is checked against it, not bf16")

    @property
    def quantizable(self) -> bool:
        """Whether QUANTIZATION (bitsandbytes) applies: not to weights shipped quantized (gpt-oss's MXFP4)."""
        return self.shipped_gb is None

    @field_validator("unquantized")
    @classmethod
    def _part_of_total(cls, value: float, info: Any) -> float:
        if value >= info.data.get("total", float("inf")):
            raise ValueError("must be less than total")
        return value

    def weights_gb(self, quantization: Quantization, full_bytes: float = 2.0) -> float:
        """GB the weights take when loaded with `quantization`; full_bytes: per weight left unquantized (bf16: 2;
        fp32: 4, on CPU and where QLoRA's prepare_model_for_kbit_training upcasts them)."""
        if quantization == "none":
            return self.total * full_bytes
        return (self.total - self.unquantized) * WEIGHT_BYTES[quantization] + self.unquantized * full_bytes


class VramNeeds(RootModel[dict[str, float]]):
    """GPU memory a recipe needs in bf16, in GB: `default` for every task, and per-task overrides by kind name."""

    model_config = ConfigDict(frozen=True)

    @field_validator("root")
    @classmethod
    def _default_and_kinds(cls, value: dict[str, float]) -> dict[str, float]:
        if "default" not in value:
            raise ValueError("needs `default` (GB for every task kind without its own figure)")
        for name, gb in value.items():
            if not re.match(TASK_NAME, name):
                raise ValueError(f"{name!r} is not a task kind's name")
            if gb <= 0:
                raise ValueError(f"{name}: must be greater than 0")
        return value

    @property
    def default(self) -> float:
        return self.root["default"]

    def kinds(self) -> set[str]:
        return set(self.root) - {"default"}

    def for_task(self, task: "TaskKind") -> float:
        return self.root.get(getattr(task, "value", task)) or self.default


def _ceil_half(value: float) -> float:
    return math.ceil(value * 2 - 1e-9) / 2


class Parallelism(Strict):
    """model.yaml `parallel:`: how a family too large for one card is served (the defaults of TENSOR_PARALLEL_SIZE,
    PIPELINE_PARALLEL_SIZE, ENABLE_EXPERT_PARALLEL), after upstream's tutorials. The recipes of a task kind that
    reads them (task.yaml kind.parallel) need tensor × pipeline GPUs; vram_gb is then their sum."""

    tensor_parallel_size: int = Field(1, ge=1, description="cards each layer is split over (vLLM --tensor-parallel-size, "
                                      "SGLang --tp-size)")
    pipeline_parallel_size: int = Field(1, ge=1, description="stages the layers are cut into (--pipeline-parallel-size, "
                                        "SGLang --pp-size)")
    expert_parallel: bool = Field(False, description="the MoE experts are spread over the cards instead of split "
                                  "(vLLM --enable-expert-parallel, SGLang --ep-size = the tensor-parallel size)")

    training_gpus: int | None = Field(
        None, ge=2, description="cards a training recipe (task.yaml kind.spreads) spreads the layers over in one "
        "process (device_map=auto, as upstream's LoRA tutorials of the big MoE models); vram_gb.<kind> is their sum. "
        "Required where the family has such a recipe")

    @property
    def gpus(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


class Notes(Strict):
    """A family's remark shown in every README of it (中文 first, then English)."""

    zh: str
    en: str


SHA256 = r"^[0-9a-f]{64}$"


class ShippedFile(Strict):
    """One file of the checkpoint's own code as the recipe ships it: its hash at the pinned commit and as shipped
    (the two differ only where the family's patch changes the file)."""

    upstream_sha256: str = Field(pattern=SHA256)
    sha256: str = Field(pattern=SHA256)


class CodePatch(Strict):
    """The project's named patch over the pinned code (shipped pre-applied; the .patch file is its record)."""

    file: str = Field(description="the unified diff, in the remote-code folder")
    sha256: str = Field(pattern=SHA256)
    why: str


class RemoteCode(Strict):
    """The checkpoint's own Python code (trust_remote_code), shipped pinned in the family folder: loaded from this
    copy, never from the hub. The runtime checks every hash before it loads it."""

    folder: str = Field(description="folder beside model.yaml holding the files")
    repo: str = Field(pattern=r"^[\w.-]+/[\w.-]+$", description="the public GitHub repository of the pinned copy")
    commit: str = Field(pattern=r"^[0-9a-f]{40}$")
    path: str = Field(description="the files' folder in that repository")
    license: str
    files: dict[str, ShippedFile] = Field(min_length=1)
    patch: CodePatch | None = None
    auto_map: dict[str, str] = Field(description="config.json / tokenizer_config.json auto_map: class → module.Class")
    model_type: str
    config_names: dict[str, str] = Field(
        {}, description="the smoke shape's field → this config's own name for it (ChatGLM: num_layers)")
    tokenizer_config: dict[str, Any] = Field(
        {}, description="tokenizer_config.json entries the recipes set over the checkpoint's (ChatGLM3: "
        "encode_special_tokens, so that its chat template's role tokens are read as tokens)")


class ModelFamily(Strict):
    """recipes/<model>/model.yaml"""

    display_name: str
    checkpoints: CheckpointIds = Field(description="default checkpoint ids on ModelScope and Hugging Face")
    served_aliases: list[str] = Field(
        [], description="names upstream's vLLM tutorials serve the model under (--served-model-name) besides the "
        "last part of each checkpoint id, which is always served too (e.g. glm-4-9b-chat for glm-4-9b-chat-hf)")
    vram_gb: VramNeeds
    parameters_b: ParameterCount = Field(description="of the default checkpoint: the quantized VRAM estimates use it")
    contributors: dict[str, list[str]] = Field(
        {}, description="authors of upstream's tutorial per task; a task missing here is credited to the project")
    notes: Notes | None = None
    architecture: str = Field(pattern=r"^[A-Z]\w+(For\w+|Model)$",
                              description="the class config.json names, e.g. Qwen3ForCausalLM (ChatGLM3: ChatGLMModel)")
    trust_remote_code: bool = False
    remote_code: RemoteCode | None = Field(None, description="the shipped, pinned copy of the checkpoint's own code")
    _folder: Path | None = PrivateAttr(None)  # recipes/<model>/ it was read from (load_family): the shipped code's

    @property
    def remote_code_dir(self) -> Path:
        """The folder of the shipped remote code (model.yaml `remote_code.folder` beside it)."""
        if self.remote_code is None or self._folder is None:
            raise ValueError(f"{self.display_name} ships no remote code")
        return self._folder / self.remote_code.folder
    chat_template: str = Field(description="file beside model.yaml holding the family's Jinja chat template")
    special_tokens: SpecialTokens
    stop_tokens: list[str] = []
    chat_template_kwargs: dict[str, Any] = {}
    thinking: Thinking | None = None
    reasoning_effort: ReasoningEffort | None = None
    reasoning: Reasoning | None = None
    tool_calls: ToolCalls | None = Field(None, description="None: the chat template renders no tools")
    vllm_tool_parser: str | None = Field(
        None, description="vLLM's --tool-call-parser for tools the template renders in a format the runtime's own "
        "servers don't parse (tool_calls: None there): only the vllm recipes call tools")
    sglang_tool_parser: str | None = Field(
        None, description="SGLang's --tool-call-parser for such a format (as vllm_tool_parser): the sglang recipes call "
        "tools too")
    system_role: SystemRole = Field(
        "native", description="native: the template renders system messages; merge_into_first_user: it has no "
        "system role, so the runtime puts a system message's text before the first user turn after it")
    lora: LoraDefaults
    # Templates that leave the assistant turn open (GLM-4: the next role tag ends it) get eos
    # appended to each training reply, so the fine-tuned model learns to stop.
    template_closes_reply: bool = True
    smoke: SmokeModelShape = SmokeModelShape()
    sizes: list[str] = Field([], description="the checkpoints of the default class (architecture), e.g. [4b, 12b, 27b]")
    variants: dict[str, Variant] = Field(
        {}, description="other classes the family's checkpoints come in; the runtime picks by the checkpoint's config")
    modalities: Modalities = Field(Modalities(), description="what the family takes besides text (images, video) "
                                   "and the limits of one request")
    parallel: Parallelism | None = Field(
        None, description="the multi-GPU layout of a family one card can't hold (None: one card)")

    @model_validator(mode="after")
    def _remote_code_trusted(self) -> "ModelFamily":
        if self.remote_code is not None and not self.trust_remote_code:
            raise ValueError("remote_code: the shipped code runs only with trust_remote_code: true")
        return self

    @field_validator("variants")
    @classmethod
    def _variant_classes(cls, value: dict[str, Variant], info: Any) -> dict[str, Variant]:
        for name in value:
            if not re.fullmatch(r"[A-Z]\w+For\w+", name) or name == info.data.get("architecture"):
                raise ValueError(f"variant {name!r}: a transformers class other than the default architecture")
        return value

    def for_architecture(self, architecture: str) -> ModelFamily | None:
        """The family as it applies to a checkpoint of class `architecture` (None: a class it doesn't know)."""
        if architecture == self.architecture:
            return self
        variant = self.variants.get(architecture)
        if variant is None:
            return None
        return self.model_copy(update={
            "architecture": architecture, "sizes": variant.sizes, "variants": {},
            "lora": self.lora.model_copy(update={"modules_under": variant.lora_modules_under}),
            "smoke": self.smoke.model_copy(update={"extra": variant.smoke_extra})})

    def known_classes(self) -> str:
        """'Gemma3ForConditionalGeneration (4b, 12b, 27b; LoRA under model.language_model) or Gemma3ForCausalLM (...)'."""
        def one(name: str, sizes: list[str], under: str | None) -> str:
            where = f"LoRA under {under}" if under else "LoRA on the whole model"
            return f"{name} ({', '.join(sizes) + '; ' if sizes else ''}{where})"

        return " or ".join([one(self.architecture, self.sizes, self.lora.modules_under)]
                           + [one(n, v.sizes, v.lora_modules_under) for n, v in self.variants.items()])

    def effort_kwargs(self, level: str | None) -> dict[str, str]:
        """Chat-template arguments for a requested reasoning effort level (None: none, the default applies);
        ValueError naming the family's levels for a level it does not know or a family without levels."""
        if level is None:
            return {}
        effort = self.reasoning_effort
        if effort is None:
            raise ValueError(f"{self.display_name} has no reasoning effort levels")
        if level not in effort.choices:
            raise ValueError(f"reasoning effort {level!r} is not one of {effort.choices}")
        return {effort.template_kwarg: level}

    @field_validator("reasoning_effort")
    @classmethod
    def _one_reasoning_control(cls, value: ReasoningEffort | None, info: Any) -> ReasoningEffort | None:
        if value is not None and info.data.get("thinking") is not None:
            raise ValueError("a family has an on/off thinking switch or a reasoning_effort, not both")
        return value

    @field_validator("vllm_tool_parser", "sglang_tool_parser")
    @classmethod
    def _one_tool_parser(cls, value: str | None, info: Any) -> str | None:
        if value is not None and info.data.get("tool_calls") is not None:
            engine = info.field_name.split("_")[0]
            raise ValueError(f"the family has tool_calls: name the engine's parser there (tool_calls.{engine}_parser)")
        return value

    @property
    def vllm_tool_call_parser(self) -> str | None:
        """vLLM's --tool-call-parser of the family (tool_calls.vllm_parser, or vllm_tool_parser), None: no tools."""
        return self.tool_calls.vllm_parser if self.tool_calls is not None else self.vllm_tool_parser

    @property
    def sglang_tool_call_parser(self) -> str | None:
        """SGLang's --tool-call-parser of the family (tool_calls.sglang_parser, or sglang_tool_parser)."""
        return self.tool_calls.sglang_parser if self.tool_calls is not None else self.sglang_tool_parser

    @field_validator("system_role")
    @classmethod
    def _tools_need_a_system_turn(cls, value: str, info: Any) -> str:
        tools = info.data.get("tool_calls")
        if value != "native" and tools is not None and tools.tools_in == "system_message":
            raise ValueError(f"{value} folds system messages into user turns, but tool_calls.tools_in is "
                             "system_message (the tools ride on a system message): the family needs native")
        return value

    @property
    def short_name(self) -> str:
        """The checkpoint's own name, e.g. Qwen3-8B (last part of its Hugging Face id)."""
        return self.checkpoints.huggingface.split("/")[-1]

    def credits(self, task: "TaskKind") -> list[str]:
        return [n.strip() for n in self.contributors.get(getattr(task, "value", task), []) if n.strip()] or [PROJECT_CREDIT]

    def task_names(self) -> set[str]:
        """The task kinds this file names (vram_gb, contributors): the host toolkit holds them to tasks/."""
        return self.vram_gb.kinds() | set(self.contributors)

    def packaged_as(self, task: "TaskKind") -> bool:
        """Whether the family has a recipe of kind `task`: the kinds every family has (task.yaml kind.every_family) and
        those model.yaml credits an upstream tutorial of; a family one card can't hold (`parallel:`) only the kinds
        every family has that serve across cards (kind.parallel), and the credited ones."""
        info, credited = kind_info(task), getattr(task, "value", task) in self.contributors
        return (info.every_family and (self.parallel is None or info.parallel)) or credited

    def gpus_for(self, task: "TaskKind") -> int:
        """Cards a recipe of `task` needs: the family's parallel layout for a kind that serves by it, its training
        cards for a kind that spreads the layers, else 1."""
        if self.parallel is None:
            return 1
        info = kind_info(task)
        if info.parallel:
            return self.parallel.gpus
        return (self.parallel.training_gpus or 1) if info.spreads else 1

    def vram_estimate(self, task: "TaskKind", quantization: Quantization) -> float | None:
        """GB of VRAM `task` needs with QUANTIZATION (None: the task has no such setting). bf16 is
        vram_gb's figure; a quantized load takes the quantized weights plus the same room beside the
        weights (KV cache, activations, optimizer state) as bf16, rounded up to 0.5 GB. QLoRA keeps the
        unquantized weights in fp32."""
        bf16 = self.vram_gb.for_task(task)
        if quantization == "none":
            return bf16
        info = kind_info(task)
        if not info.quantization or not self.parameters_b.quantizable:
            return None  # no such setting, or weights shipped quantized (gpt-oss: bitsandbytes is refused)
        room = bf16 - self.parameters_b.weights_gb("none")
        full_bytes = 4.0 if info.weights == "fp32" else 2.0
        return _ceil_half(self.parameters_b.weights_gb(quantization, full_bytes) + room)


# The oldest Linux driver of each CUDA major release's minor-version compatibility (NVIDIA's CUDA Compatibility
# guide): a wheel built with any 12.x runs on >= 525, any 13.x on >= 580.
MIN_DRIVER_OF_CUDA = {12: 525, 13: 580}


class CudaNeeds(Strict):
    """The CUDA release of a stack's torch wheels (they bring their own CUDA libraries) and the NVIDIA
    driver they need; a test holds `cuda` to the stack lock's nvidia-cuda-runtime pin."""

    cuda: str = Field(pattern=r"^1[23]\.\d+$", description="CUDA release of the wheels, e.g. 12.8 or 13.0")
    min_driver: str = Field(pattern=r"^\d+\.\d+(\.\d+)?$",
                            description="the oldest Linux driver that runs them (minor-version compatibility of "
                            "their CUDA major release: 12.x from 525, 13.x from 580)")
    release_driver: str = Field(pattern=r"^\d+\.\d+(\.\d+)?$",
                                description="the driver of that CUDA release itself (every feature, PTX JIT included)")

    @property
    def major(self) -> int:
        return int(self.cuda.split(".")[0])

    @model_validator(mode="after")
    def _driver_of_its_major(self) -> "CudaNeeds":
        floor = MIN_DRIVER_OF_CUDA[self.major]
        if int(self.min_driver.split(".")[0]) < floor:
            raise ValueError(f"min_driver {self.min_driver} is older than CUDA {self.major}.x runs on (driver >= {floor})")
        return self


class GpuNeeds(Strict):
    required: bool = True
    min_vram_gb: float = Field(gt=0, description="in bf16, all cards together")
    count: int = Field(1, ge=1, description="cards the default layout uses (model.yaml parallel: tensor × pipeline, "
                       "or training_gpus for a kind that spreads the layers)")
    quantized_vram_gb: dict[Quantization, float] = Field(
        {}, description="estimates with QUANTIZATION=8bit / 4bit (ModelFamily.vram_estimate); empty: no such setting")
    cuda: CudaNeeds | None = None

    @property
    def vram_per_gpu_gb(self) -> float:
        """What each of the `count` cards needs (the total spread evenly, rounded up to 0.5 GB)."""
        return vram_text(self.min_vram_gb, self.count)[1]

    @property
    def vram_shown(self) -> str:
        """'16 GB' on one card, '4 × 72 GB' across several."""
        return vram_text(self.min_vram_gb, self.count)[0]


def vram_text(total_gb: float, gpus: int = 1) -> tuple[str, float]:
    """How a VRAM figure reads in the READMEs ('16 GB'; across cards '4 × 72 GB': each card's share of the total,
    rounded up to 0.5 GB), and that share."""
    each = _ceil_half(total_gb / gpus)
    return (f"{total_gb:g} GB" if gpus == 1 else f"{gpus} × {each:g} GB"), each


class SmokeSettings(Strict):
    timeout_s: int = Field(600, gt=0)
    env: dict[str, str] = Field(
        {}, description="settings the smoke test's container gets besides its task's, e.g. TENSOR_PARALLEL_SIZE=2 "
        "(the parallel path of a multi-GPU recipe, on two CPU workers)")
    needs_gpu: str | None = Field(
        None, min_length=10, description="why the smoke test can't run without a GPU here: on an engine without one "
        "the matrix builds the recipe and reports this reason (SKIP), never a result")


class CpuVariant(Strict):
    """A CPU build of the same recipe (its own stack and lock), built and smoke-tested instead of the
    GPU build when the Docker engine has no nvidia runtime. Reports name it, never the GPU build."""

    stack: str = Field(description="folder under base-images/stacks/ of the CPU build")
    lock: str = Field("requirements-cpu.lock", pattern=r"^[\w.-]+\.lock$",
                      description="its lock beside recipe.yaml; the hand-edited input has the same name with .in")
    build_args: dict[str, str] = {}
    python: str = Field("3.11", pattern=r"^3\.\d+$", description="Python the lock is resolved for (the base image's)")
    lock_exclude: list[str] = Field([], description="packages the resolver pulls in that must not be installed")


class Bilingual(Strict):
    """A short text for the READMEs and the catalogue, in Chinese (first) and English."""

    zh: str = Field(min_length=1)
    en: str = Field(min_length=1)


LANE_NAME = r"^[a-z][a-z0-9]*$"
# Tags a lane can't take: the default GPU build's and the CPU variant's.
RESERVED_TAGS = ("latest", "cpu")


class GpuLane(Strict):
    """task.yaml `lanes.<name>`: another GPU build of every recipe of the kind beside its default one, with its own
    base, stack and lock, tagged `:<name>` (selfllm/qwen3-vllm:cu13) where the default build is `latest`: a newer
    engine for the newer drivers that run it, so a user picks the tag by driver. recipe.yaml `lanes:` names the
    lanes a recipe is built in (all of its task's by default)."""

    base: str = Field(pattern=r"^[\w.-]+$", description="folder under base-images/ of its CUDA base")
    stack: str = Field(pattern=r"^[\w.-]+$", description="folder under base-images/stacks/ of its torch stack")
    lock: str = Field(pattern=r"^requirements-[\w.-]+\.lock$",
                      description="its lock beside recipe.yaml; the hand-edited input has the same name with .in")
    lock_platform: str | None = Field(None, pattern=r"^x86_64-manylinux_2_\d+$",
                                      description="uv's --python-platform of its locks; none: the kind's")
    cuda: CudaNeeds = Field(description="what its stack's CUDA wheels need: the driver a user must have for this tag")
    engine: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$",
                        description="the package (a key of the lock) whose pinned version names what the lane serves")
    adds: Bilingual = Field(description="what this tag brings over the default one, for the READMEs and catalogue")


def _lane_names(lanes: dict[str, Any]) -> dict[str, Any]:
    for name in lanes:
        if not re.match(LANE_NAME, name) or name in RESERVED_TAGS:
            raise ValueError(f"lane {name!r}: a lane is named as its image tag, lowercase letters and digits "
                             f"(e.g. cu13), and not {' or '.join(RESERVED_TAGS)}")
    return lanes


class TaskDefaults(Strict):
    """tasks/<task>/task.yaml: the defaults of every recipe of one task kind."""

    kind: TaskKindInfo = Field(description="what the runtime and the toolkit need to know of this task kind")
    title: str = Field(description="recipe name after the checkpoint's, e.g. 'FastAPI 部署调用'")
    stack: str
    cuda: CudaNeeds = Field(description="what the stack's CUDA wheels need (recipe metadata gpu.cuda)")
    port: int = Field(6006, ge=1, le=65535)
    chat_template_kwargs: dict[str, Any] = {}
    smoke: SmokeSettings = SmokeSettings()
    smoke_model: SmokeModelShape | None = None
    cpu_variant: CpuVariant | None = None
    lanes: dict[str, GpuLane] = Field({}, description="GPU builds besides the default one, by tag (GpuLane)")
    env: dict[str, str] = {}

    _lanes_are_tags = field_validator("lanes")(_lane_names)


class RecipeOverrides(Strict):
    """recipes/<model>/<task>/recipe.yaml: identity, then only what this recipe changes."""

    model: str = Field(description="the folder name under recipes/, e.g. qwen3")
    task: TaskKind
    name: str | None = None
    stack: str | None = None
    default_model: CheckpointIds | None = None
    port: int | None = Field(None, ge=1, le=65535)
    gpu: GpuNeeds | None = None
    contributors: list[str] | None = Field(None, min_length=1)
    chat_template_kwargs: dict[str, Any] | None = None
    smoke: SmokeSettings | None = None
    smoke_model: SmokeModelShape | None = Field(
        None, description="what this recipe's smoke shape adds to or changes in its task's (`extra` key by key)")
    cpu_variant: CpuVariant | None = None
    lanes: list[str] | None = Field(None, description="the task's lanes this recipe is built in (default: all of "
                                    "them); [] leaves it in the default build only")
    env: dict[str, str] | None = None


class Recipe(Strict):
    """One recipe's effective metadata: task defaults, then model family, then recipe.yaml."""

    name: str
    model: str = Field(description="the folder name under recipes/, e.g. qwen3")
    task: TaskKind
    stack: str = Field(description="folder under base-images/stacks/ whose image this recipe builds on")
    default_model: CheckpointIds
    port: int = Field(6006, ge=1, le=65535)
    gpu: GpuNeeds
    contributors: list[str] = Field(min_length=1)
    chat_template_kwargs: dict[str, Any] = {}
    smoke: SmokeSettings = SmokeSettings()
    smoke_model: SmokeModelShape | None = Field(
        None, description="the smoke shape of this task (the task's, with what recipe.yaml adds or changes): replaces "
        "the family's sizes, its `extra` goes over the family's")
    cpu_variant: CpuVariant | None = None
    lanes: dict[str, GpuLane] = Field({}, description="its GPU builds besides the default one, by tag")
    env: dict[str, str] = {}

    @field_validator("contributors")
    @classmethod
    def _names_are_trimmed(cls, names: list[str]) -> list[str]:
        return [n.strip() for n in names if n.strip()]


class MetadataError(ValueError):
    """A metadata file that can't be used; the message names the file and the field."""

    def __init__(self, path: Path, field: str, problem: str):
        self.path, self.field, self.problem = Path(path), field, problem
        super().__init__(f"{path}: {field}: {problem}")


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise MetadataError(path, "(file)", "missing")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        # The construct that is broken starts at context_mark (e.g. an unclosed "[" on line 2);
        # problem_mark is where the parser gave up (often the end of the file).
        mark = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "(yaml)"
        detail = getattr(exc, "problem", None) or str(exc)
        if getattr(exc, "context", None):
            detail += f" ({exc.context})"
        raise MetadataError(path, where, f"invalid YAML: {detail}") from None
    if not isinstance(data, dict):
        raise MetadataError(path, "(top level)", "expected a mapping of fields")
    return data


def _validate(schema: type[Strict], path: Path) -> Any:
    data = read_yaml(path)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(top level)"
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise MetadataError(path, field, first["msg"] + more) from None


def load_family(model_dir: Path) -> ModelFamily:
    path = Path(model_dir) / MODEL_FILE
    family: ModelFamily = _validate(ModelFamily, path)
    if not (Path(model_dir) / family.chat_template).is_file():
        raise MetadataError(path, "chat_template", f"file {family.chat_template!r} not found beside it")
    family._folder = Path(model_dir).resolve()
    if family.remote_code is not None:
        code = family.remote_code
        for name in [*code.files, *([code.patch.file] if code.patch else [])]:
            if not (Path(model_dir) / code.folder / name).is_file():
                raise MetadataError(path, "remote_code", f"file {code.folder}/{name} not found beside it")
    weights = family.parameters_b.weights_gb("none")
    shipped = family.parameters_b.shipped_gb
    for field, gb in family.vram_gb.root.items():
        if field != "default" and not (tasks_root() / field / TASK_FILE).is_file():
            continue  # another kind than an image's own (the host toolkit holds the names to tasks/)
        if field != "default" and kind_info(field).weights == "shipped" and shipped is not None:
            if gb < shipped:
                raise MetadataError(path, f"vram_gb.{field}", f"{gb:g} GB is less than the shipped weights "
                                    f"({shipped:g} GB from parameters_b.shipped_gb)")
            continue
        if gb < weights:  # the quantized estimates start from the room beside the weights
            raise MetadataError(path, f"vram_gb.{field}",
                                f"{gb:g} GB is less than the bf16 weights ({weights:.1f} GB from parameters_b.total)")
    return family


def load_task_defaults(tasks_dir: Path, task: TaskKind, referenced_by: Path) -> TaskDefaults:
    path = Path(tasks_dir) / task.value / TASK_FILE
    if not path.is_file():
        raise MetadataError(referenced_by, "task", f"no task kind {task.value!r} (expected {path})")
    return _validate(TaskDefaults, path)


def load_overrides(recipe_dir: Path) -> RecipeOverrides:
    return _validate(RecipeOverrides, Path(recipe_dir) / RECIPE_FILE)


def merge_recipe(path: Path, task: TaskDefaults, family: ModelFamily, own: RecipeOverrides) -> Recipe:
    """The effective recipe: task defaults, then what the family says, then recipe.yaml (path)."""
    fields: dict[str, Any] = task.model_dump(exclude={"kind", "title", "cuda"}, exclude_none=True)
    fields |= {
        "name": f"{family.short_name} {task.title}",
        "default_model": family.checkpoints.model_dump(),
        "gpu": {"required": True, "min_vram_gb": family.vram_gb.for_task(own.task), "count": family.gpus_for(own.task),
                "quantized_vram_gb": {q: gb for q in QUANTIZATIONS[1:]
                                      if (gb := family.vram_estimate(own.task, q)) is not None},
                "cuda": task.cuda.model_dump()},
        "contributors": family.credits(own.task),
    }
    if family.parallel is not None and task.kind.spreads and family.parallel.training_gpus is None:
        raise MetadataError(path, "parallel.training_gpus", f"{family.display_name} needs several cards "
                            f"(model.yaml parallel:): its {own.task.value} recipe spreads the layers over "
                            "parallel.training_gpus cards, which model.yaml doesn't give")
    given = own.model_dump(exclude_none=True, exclude_unset=True)
    if "lanes" in given:  # recipe.yaml names which of its task's lanes it is built in
        unknown = [name for name in given["lanes"] if name not in task.lanes]
        if unknown:
            raise MetadataError(path, "lanes", f"{unknown[0]!r}: task kind {own.task.value!r} has no such lane "
                                f"(its lanes: {', '.join(task.lanes) or 'none'})")
        fields["lanes"] = {name: fields["lanes"][name] for name in given.pop("lanes")}
    if "smoke" in given:  # a recipe's smoke settings add to its task's (timeout_s stays unless given)
        given["smoke"] = {**fields.get("smoke", {}), **given["smoke"]}
    if "smoke_model" in given and "smoke_model" in fields:  # so does its smoke shape, `extra` key by key
        task_shape, shape = fields["smoke_model"], given["smoke_model"]
        given["smoke_model"] = {**task_shape, **shape, "extra": {**task_shape["extra"], **shape.get("extra", {})}}
    fields |= given
    try:
        return Recipe.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise MetadataError(path, ".".join(str(p) for p in first["loc"]) or "(top level)", first["msg"]) from None


def load_recipe(recipe_dir: Path, recipes_dir: Path | None = None, tasks_dir: Path | None = None) -> Recipe:
    """recipe.yaml merged over its family's model.yaml (recipes_dir/<model>/, default: the folder
    above recipe_dir) and its task's defaults (tasks_dir/<task>/task.yaml, default: tasks/ beside
    the recipes folder)."""
    recipe_dir = Path(recipe_dir)
    own = load_overrides(recipe_dir)
    recipes_dir = Path(recipes_dir) if recipes_dir is not None else recipe_dir.parent.parent
    tasks_dir = Path(tasks_dir) if tasks_dir is not None else recipes_dir.parent / "tasks"
    path = recipe_dir / RECIPE_FILE
    task = load_task_defaults(tasks_dir, own.task, path)
    return merge_recipe(path, task, load_family(recipes_dir / own.model), own)


def locked_version(lock: Path, package: str) -> str | None:
    """The version a lock pins `package` at (its first `name==version` line), None where it doesn't or is missing."""
    if not lock.is_file():
        return None
    found = re.search(rf"^{re.escape(package)}==([^\s;\\]+)", lock.read_text(encoding="utf-8"), re.MULTILINE | re.IGNORECASE)
    return found.group(1) if found else None


def installed_lane(recipe: Recipe, recipe_dir: Path) -> str | None:
    """The lane (task.yaml `lanes:`) whose build this Python environment holds: the one whose lock beside recipe.yaml
    pins its engine at the installed version; None for the default build (tag latest) or the CPU variant."""
    from importlib.metadata import PackageNotFoundError, version

    for name, lane in recipe.lanes.items():
        try:
            installed = version(lane.engine)
        except PackageNotFoundError:
            continue
        if installed == locked_version(Path(recipe_dir) / lane.lock, lane.engine):
            return name
    return None


def build_line(recipe: Recipe, recipe_dir: Path) -> str:
    """What `selfllm start` says of the build it runs in: its image tag and the NVIDIA driver that tag needs."""
    lane = installed_lane(recipe, recipe_dir)
    if lane is None:
        cuda = recipe.gpu.cuda
        needs = f": CUDA {cuda.cuda} wheels, NVIDIA driver >= {cuda.min_driver} on GPU" if cuda else ""
        others = f" (other tags: {', '.join(recipe.lanes)})" if recipe.lanes else ""
        return f"default build (tag latest, or the cpu variant){needs}{others}"
    chosen = recipe.lanes[lane]
    return (f"lane {lane} (tag :{lane}): {chosen.engine} {locked_version(Path(recipe_dir) / chosen.lock, chosen.engine)}, "
            f"CUDA {chosen.cuda.cuda} wheels, NVIDIA driver >= {chosen.cuda.min_driver}")


def chat_template_text(model_dir: Path, family: ModelFamily) -> str:
    return (Path(model_dir) / family.chat_template).read_text(encoding="utf-8")
