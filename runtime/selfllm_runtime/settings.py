"""Every task setting, defined once: the one way a task reads its configuration.

A task kind's settings are one pydantic model (named by task.yaml `kind.settings`: task_settings()); each field
names its environment variable (and, where the command line has one, its flag). A field's value is the first of:

    command-line flag > environment variable > the recipe's `env:` (task.yaml, then recipe.yaml)
    > the model family (recipes/<model>/model.yaml) > the field's default

Text is parsed by pydantic, one strict parser per type: booleans take 1/0, true/false, yes/no, on/off
(any case) and nothing else; integers take whole numbers only; lists are comma-separated. An empty
environment variable counts as unset. A bad value raises SettingsError naming the variable and its
text; `selfllm` prints that one line and exits 2 — before any download, since `selfllm start`
resolves the settings first. The README's settings table of every recipe is rendered from these
models (settings_table), so the documentation can't drift from what is read.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, field_validator,
                      model_validator)

from .metadata import (TASK_FILE, ImageLimits, LoraDefaults, MetadataError, ModelFamily, ModelSource, Quantization,
                       Recipe, TaskKind, VideoLimits, kind_info, tasks_root)

DEFAULT_CACHE = Path("/root/autodl-tmp")  # AutoDL's data disk: a saved instance keeps what is there
SAMPLE_DOCS_DIR = Path(__file__).resolve().parent / "lc" / "sample_docs"
# The LoRA task's default data, upstream's huanhuan.json shipped with the runtime (finetune/data.py checks it).
DEFAULT_DATA = Path(__file__).resolve().parent / "finetune" / "data" / "huanhuan.json"
DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_LORA_OUTPUT = DEFAULT_CACHE / "lora"
DEFAULT_GRPO_OUTPUT = DEFAULT_CACHE / "grpo"
DEFAULT_EVAL_OUTPUT = DEFAULT_CACHE / "eval"
# GRPO's data when no DATA_PATH / DATA_URL and GSM8K can't be fetched: generated arithmetic word problems shipped
# with the runtime (scripts/make_arithmetic_data.py writes it; finetune/grpo_data.py checks its sha256).
DEFAULT_GRPO_DATA = Path(__file__).resolve().parent / "finetune" / "data" / "arithmetic.jsonl"
DEFAULT_DATA_DIR = DEFAULT_CACHE / "data"
DEFAULT_MAX_MODEL_LEN = 8192
LORA_DEFAULTS = LoraDefaults.model_fields  # model.yaml's `lora:` defaults, used when no family is given
QUANTIZATION_TEXT = ("`4bit`（NF4）或 `8bit` 加载权重，显存见「显存」表；需要 bitsandbytes（镜像已装）",
                     "load the weights in `4bit` (NF4) or `8bit`; VRAM in the VRAM table; needs bitsandbytes (in the image)")
MODEL_PATH_TEXT = ("已挂载的模型目录（含 `config.json` 与全部权重），设置后不下载",
                   "a mounted model folder (config.json and all its weights); set, nothing is downloaded")


class SettingsError(ValueError):
    """A task setting (environment variable, flag or recipe value) that can't be used; the message names it."""


def _comma_list(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _lines(value: Any) -> Any:
    if isinstance(value, str):
        return [line.strip() for line in value.splitlines() if line.strip()]
    return value


def parse_bool(text: str) -> bool:
    """A boolean the way every setting reads one (1/0, true/false, yes/no, on/off, any case); ValueError else.
    For flags that are not settings, e.g. `selfllm lora infer --enable-thinking`."""
    try:
        return TypeAdapter(bool).validate_python(text.strip())
    except ValidationError:
        raise ValueError(f"not a boolean: {text!r} (1/0, true/false, yes/no, on/off)") from None


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _resume(value: Any) -> Any:
    """RESUME: `auto` or `never` in any case, else a checkpoint folder as written."""
    if isinstance(value, str):
        value = value.strip()
        return value.lower() if value.lower() in ("auto", "never") else value
    return value


def bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def _loadable(value: Any) -> Any:
    if value not in (None, "none") and not bitsandbytes_installed():
        raise ValueError("needs the bitsandbytes package (the recipe images have it; natively: pip install bitsandbytes)")
    return value


CommaList = Annotated[list[str], BeforeValidator(_comma_list)]
QuantizationSetting = Annotated[Quantization, BeforeValidator(_lower), AfterValidator(_loadable)]
PathList = Annotated[list[Path], BeforeValidator(_comma_list)]
Lines = Annotated[list[str], BeforeValidator(_lines)]


def setting(default: Any, env: str, zh: str, en: str, *, flag: str | None = None, family: str | None = None,
            shown: tuple[str, str] | None = None, aliases: tuple[str, ...] = (), when: str | None = None,
            clearable: bool = False, **constraints: Any) -> Any:
    """A settings field. family: dotted path of its default in ModelFamily (e.g. 'lora.r'); shown: how the
    README shows a default computed at run time (zh, en); aliases: older variable names also read; when: a
    ModelFamily attribute that must be set for the setting to exist (e.g. 'thinking'); clearable: an empty
    value means None (instead of 'unset')."""
    extra = {"env": env, "zh": zh, "en": en, "flag": flag, "family": family, "shown": shown,
             "aliases": aliases, "when": when, "clearable": clearable}
    return Field(default, description=en, json_schema_extra=extra, **constraints)


@dataclass(frozen=True)
class SettingInfo:
    field: str
    env: str
    zh: str
    en: str
    flag: str | None
    family: str | None
    shown: tuple[str, str] | None
    aliases: tuple[str, ...]
    when: str | None
    clearable: bool
    default: Any


class TaskSettings(BaseModel):
    """Base of every task's settings: resolved once, read-only; no NaN or infinity."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    @classmethod
    def infos(cls) -> list[SettingInfo]:
        out = []
        for name, field in cls.model_fields.items():
            extra = field.json_schema_extra
            if not isinstance(extra, dict):
                continue
            default = field.get_default(call_default_factory=True)
            out.append(SettingInfo(name, default=default, **extra))  # type: ignore[arg-type]
        return out


# ----------------------------------------------------------------------------- groups shared by tasks

class ModelSettings(TaskSettings):
    """Where the model comes from (model_source.py acquires it)."""

    model_path: Path | None = setting(None, "MODEL_PATH", *MODEL_PATH_TEXT)
    model_id: str | None = setting(
        None, "MODEL_ID", "要下载的模型", "the model to download",
        shown=("`{modelscope}`（`MODEL_SOURCE=huggingface` 时为 `{huggingface}`）",
               "`{modelscope}` (`{huggingface}` with `MODEL_SOURCE=huggingface`)"))
    model_source: Annotated[ModelSource, BeforeValidator(_lower)] = setting(
        ModelSource.modelscope, "MODEL_SOURCE", "`modelscope` 或 `huggingface`", "`modelscope` or `huggingface`")
    model_cache: Path = setting(
        DEFAULT_CACHE, "MODEL_CACHE", "下载缓存；下载不完整的目录不会被使用，再次启动时只补齐缺少的文件",
        "download cache; an incomplete folder is never used, a rerun fetches only the missing files")
    hf_endpoint: str | None = setting(
        None, "HF_ENDPOINT", "Hugging Face 镜像，例如 `https://hf-mirror.com`",
        "a Hugging Face mirror, e.g. `https://hf-mirror.com`")
    modelscope_endpoint: str | None = setting(
        None, "MODELSCOPE_ENDPOINT", "ModelScope 地址（也读旧名 `MODELSCOPE_DOMAIN`）",
        "the ModelScope hub address (the older name `MODELSCOPE_DOMAIN` is read too)",
        aliases=("MODELSCOPE_DOMAIN",))

    def model_id_for(self, recipe: Recipe) -> str:
        """MODEL_ID, else the recipe's checkpoint id on MODEL_SOURCE's hub."""
        return (self.model_id or "").strip() or getattr(recipe.default_model, self.model_source.value)

    def endpoint(self) -> str | None:
        return self.hf_endpoint if self.model_source is ModelSource.huggingface else self.modelscope_endpoint


class AccessSettings(TaskSettings):
    """Who may reach a server (access.py)."""

    host: str = setting(
        "0.0.0.0", "HOST", "监听地址；`127.0.0.1` 只允许本机（配合 SSH 隧道）",
        "the address the server binds; `127.0.0.1` keeps it to this machine (use an SSH tunnel)", min_length=1)
    port: int | None = setting(
        None, "PORT", "监听端口（1–65535）；原生运行两个配方时各给一个；已被占用时启动前一行报错、退出码 2",
        "the port the server listens on (1-65535); give each of two recipes run natively its own; one already "
        "taken is one error line before the model loads, exit 2", ge=1, le=65535, shown=("`{port}`", "`{port}`"))
    api_key: str = setting(
        "", "API_KEY", "设置后需要这个 key 才能使用（见「安全地开放服务」）",
        "with it set, the server wants this key (see 'Exposing it safely')")

    @field_validator("host", "api_key", mode="before")
    @classmethod
    def _strip(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value

    def port_for(self, recipe: Recipe) -> int:
        """PORT, else the recipe's port (task.yaml / recipe.yaml)."""
        return self.port or recipe.port

    def address(self, recipe: Recipe) -> tuple[str, int]:
        """(host, port) the server will bind."""
        return self.host, self.port_for(recipe)


class ServedNameSettings(TaskSettings):
    """The names an OpenAI-compatible server answers to (model_source.served_names)."""

    served_model_name: str | None = setting(
        None, "SERVED_MODEL_NAME",
        "`/v1/models` 列出、回复里带的模型名；设置后只有这一个（FastAPI 另接受模型目录名）。未设置时为 checkpoint 自己的名字"
        "（`MODEL_PATH` 的目录名或 `MODEL_ID`），并接受配方默认模型的 id 和上游教程用的短名（如 `Qwen3-8B`）",
        "the model name `/v1/models` lists and replies carry; when set, the only one (fastapi also takes the model "
        "folder's name). Unset: the checkpoint's own name (`MODEL_PATH`'s folder, or `MODEL_ID`), and the recipe's "
        "default id and upstream's short names (e.g. `Qwen3-8B`) are accepted too",
        shown=("`MODEL_PATH` 的目录名、`MODEL_ID`，都未设置时为 `{modelscope}`",
               "`MODEL_PATH`'s folder name, `MODEL_ID`, else `{modelscope}`"))

    @field_validator("served_model_name")
    @classmethod
    def _strip_name(cls, value: str | None) -> str | None:
        return (value or "").strip() or None


CHAT_TEMPLATE_POLICIES = ("auto", "checkpoint", "family")


class TemplateSettings(TaskSettings):
    """Which chat template renders the prompts (chat_template.py)."""

    chat_template: str = setting(
        "auto", "CHAT_TEMPLATE",
        "`auto`：checkpoint 自带的模板，没有时用模型族的（`recipes/<模型族>/chat_template.jinja`）；`checkpoint`：只用自带的"
        "（没有时启动即一行报错、退出码 2）；`family`：模型族的；或一个 Jinja 模板文件的路径。启动日志（FastAPI 还有 `/health`）写明用的是哪个",
        "`auto`: the checkpoint's own template, the family's (`recipes/<family>/chat_template.jinja`) where it has "
        "none; `checkpoint`: its own only (none: one error line at start, exit 2); `family`: the family's; or the "
        "path of a Jinja template file. The start log (fastapi: also `/health`) says which one is used", min_length=1)

    @field_validator("chat_template")
    @classmethod
    def _policy_or_file(cls, value: str) -> str:
        value = value.strip()
        if value.lower() in CHAT_TEMPLATE_POLICIES:
            return value.lower()
        if not Path(value).expanduser().is_file():
            raise ValueError(f"no such file (give {', '.join(CHAT_TEMPLATE_POLICIES)} or a Jinja template file)")
        return str(Path(value).expanduser().resolve())


class TorchSettings(TaskSettings):
    """How many threads torch computes with on CPU (loading.apply_torch_threads)."""

    torch_threads: Annotated[str, BeforeValidator(_lower)] = setting(
        "auto", "TORCH_THREADS",
        "CPU 上 torch 的计算线程数；`auto`：本进程可用的物理核数（不算超线程，受 CPU 亲和性与容器 CPU 配额限制）减去启动时"
        "别的任务占用的核数（1 分钟平均负载的整数部分），至少 1——线程比空闲的核多时解码会慢几倍（见 `benchmarks/torch_threads.py`）。"
        "启动日志写明用了几个",
        "torch's compute threads on CPU; `auto`: the physical cores this process may use (hyperthreads don't count; "
        "capped by CPU affinity and a container's CPU quota) less those other work keeps busy at start (the whole "
        "part of the 1-minute load average), at least 1: more threads than idle cores made decoding several times "
        "slower (`benchmarks/torch_threads.py`). The start log says the number", pattern=r"^(auto|[1-9][0-9]*)$")


class EngineSettings(TorchSettings, TemplateSettings):
    """How the ChatEngine loads the model (loading.py) and batches requests (batching.py, continuous.py)."""

    quantization: QuantizationSetting = setting("none", "QUANTIZATION", *QUANTIZATION_TEXT)
    gpus: str = setting(
        "all", "GPUS",
        "`all`：模型按层分到所有可见 GPU（`device_map=auto`，启动日志写明每张卡）；`0` 只用 0 号卡；`0,1` 只用这几张",
        "`all`: the model's layers spread over every visible GPU (`device_map=auto`; the start log names each card); "
        "`0` pins card 0; `0,1` uses those only", pattern=r"^(all|[0-9]+(,[0-9]+)*)$")

    def gpu_indices(self) -> list[int] | None:
        """The cards GPUS names (None: all visible ones)."""
        return None if self.gpus == "all" else [int(i) for i in self.gpus.split(",")]

    max_batch: int = setting(16, "MAX_BATCH", "一次 `generate` 合并的请求数上限（显存紧张时调小）",
                             "rows generated together at most (lower it when VRAM is short)", ge=1)
    max_queue: int = setting(128, "MAX_QUEUE", "排队请求数上限，超过时返回 503",
                             "waiting requests at most; past it a new one gets 503", ge=1)
    batching: Annotated[Literal["auto", "static", "continuous"], BeforeValidator(_lower)] = setting(
        "auto", "BATCHING",
        "`static`：每批一次 `generate`（左填充）；`continuous`：transformers 的连续批处理（分页 KV 缓存；不支持 `seed`）；"
        "`auto` 目前在 CPU 与 GPU 上都选 `static`",
        "`static`: one padded `generate` per batch; `continuous`: transformers' continuous batching (paged KV "
        "cache; no `seed`); `auto` is `static` on CPU and GPU for now")

    @property
    def batching_kind(self) -> Literal["static", "continuous"]:
        return "static" if self.batching == "auto" else self.batching


IMAGE_LIMITS = ImageLimits.model_fields
VIDEO_LIMITS = VideoLimits.model_fields


class MediaSettings(TaskSettings):
    """What a request may carry of images and videos (media.py); they exist for families that take images
    (model.yaml `modalities.image`) or video (`modalities.video`), whose values are the defaults."""

    media_max_images: int = setting(
        IMAGE_LIMITS["max_per_request"].default, "MEDIA_MAX_IMAGES", "一个请求（所有消息合计）最多几张图片",
        "images in one request at most, all messages together", family="modalities.image.max_per_request",
        when="modalities.image", ge=1)
    media_max_image_pixels: int = setting(
        IMAGE_LIMITS["max_pixels"].default, "MEDIA_MAX_IMAGE_PIXELS", "图片像素（宽×高）超过它时按比例缩小",
        "an image of more pixels (width × height) is scaled down to it, keeping its aspect ratio",
        family="modalities.image.max_pixels", when="modalities.image", ge=1)
    media_max_image_bytes: int = setting(
        IMAGE_LIMITS["max_bytes"].default, "MEDIA_MAX_IMAGE_BYTES", "一张图片编码后的大小上限（data: URL 或下载），字节",
        "the encoded size of one image at most (data: URL or download), bytes", family="modalities.image.max_bytes",
        when="modalities.image", ge=1)
    media_max_videos: int = setting(
        VIDEO_LIMITS["max_per_request"].default, "MEDIA_MAX_VIDEOS", "一个请求（所有消息合计）最多几段视频",
        "videos in one request at most, all messages together", family="modalities.video.max_per_request",
        when="modalities.video", ge=1)
    media_max_video_frames: int = setting(
        VIDEO_LIMITS["max_frames"].default, "MEDIA_MAX_VIDEO_FRAMES", "一段视频最多取几帧（每秒 2 帧，均匀分布）",
        "frames sampled from one video at most (two a second, spread evenly)", family="modalities.video.max_frames",
        when="modalities.video", ge=1)
    media_max_video_pixels: int = setting(
        VIDEO_LIMITS["max_pixels"].default, "MEDIA_MAX_VIDEO_PIXELS", "视频每帧像素（宽×高）超过它时按比例缩小",
        "a frame of more pixels (width × height) is scaled down to it, keeping its aspect ratio",
        family="modalities.video.max_pixels", when="modalities.video", ge=1)
    media_max_video_bytes: int = setting(
        VIDEO_LIMITS["max_bytes"].default, "MEDIA_MAX_VIDEO_BYTES", "一段视频编码后的大小上限（data: URL 或下载），字节",
        "the encoded size of one video at most (data: URL or download), bytes", family="modalities.video.max_bytes",
        when="modalities.video", ge=1)
    media_fetch_timeout: float = setting(
        10.0, "MEDIA_FETCH_TIMEOUT", "下载一张 http(s) 图片（或一段视频）最多用几秒",
        "seconds one http(s) image (or video) download may take",
        when="modalities.image", gt=0)
    media_allow_private_urls: bool = setting(
        False, "MEDIA_ALLOW_PRIVATE_URLS",
        "`1`：也下载指向本机、内网、链路本地地址的图片 URL（默认拒绝，免得服务成为进入内网的跳板）；本地路径与 file: 始终不读",
        "`1`: image URLs on loopback, private and link-local addresses are fetched too (refused by default, so the "
        "server is no way into its network); local paths and file: are never read", when="modalities.image")


# ----------------------------------------------------------------------------- one model per task kind

class FastapiSettings(MediaSettings, ServedNameSettings, EngineSettings, AccessSettings, ModelSettings):
    pass


class WebdemoSettings(MediaSettings, EngineSettings, AccessSettings, ModelSettings):
    pass


def _shell_words(value: str) -> str:
    shlex.split(value)  # unbalanced quotes: ValueError → SettingsError naming the variable
    return value


ShellWords = Annotated[str, AfterValidator(_shell_words)]


class EngineServerSettings(ServedNameSettings, TemplateSettings, AccessSettings, ModelSettings):
    """An inference engine's own OpenAI-compatible server (vLLM, SGLang; engine_server.py): its context length,
    tensor parallelism, and extra arguments of its own (extra_argv, appended last so that they win)."""

    max_model_len: int = setting(
        DEFAULT_MAX_MODEL_LEN, "MAX_MODEL_LEN", "最大上下文长度（越大 KV cache 越占显存）",
        "the longest context (more takes more VRAM for the KV cache)", ge=1)
    tensor_parallel_size: int = setting(
        1, "TENSOR_PARALLEL_SIZE", "张量并行：每层切到几张卡（`--tensor-parallel-size`，通常等于本机卡数）；"
        "与 `PIPELINE_PARALLEL_SIZE` 的乘积多于可见 GPU 时启动即拒绝（调小即可，自行确认放得下）",
        "tensor parallelism: the cards each layer is split over (`--tensor-parallel-size`, usually this machine's "
        "cards); times `PIPELINE_PARALLEL_SIZE` more than the visible GPUs is refused at start (set it lower, "
        "knowing the weights must still fit)", family="parallel.tensor_parallel_size", ge=1)
    pipeline_parallel_size: int = setting(
        1, "PIPELINE_PARALLEL_SIZE", "流水线并行：层分成几段（vLLM `--pipeline-parallel-size`，SGLang `--pp-size`；"
        "vLLM 多机时每台机器一段，见 README）", "pipeline parallelism: the stages the layers are cut into (vLLM "
        "`--pipeline-parallel-size`, SGLang `--pp-size`; with vLLM one per machine across machines, see the README)",
        family="parallel.pipeline_parallel_size", ge=1)
    expert_parallel: bool = setting(
        False, "ENABLE_EXPERT_PARALLEL", "MoE 专家分到各卡而不是每个专家切开（vLLM `--enable-expert-parallel`，"
        "SGLang `--ep-size` 等于张量并行数）", "MoE experts spread over the cards instead of each split (vLLM "
        "`--enable-expert-parallel`, SGLang `--ep-size` of the tensor-parallel size)", family="parallel.expert_parallel")

    @property
    def extra_argv(self) -> list[str]:
        """The engine's own arguments the user added (VLLM_ARGS, SGLANG_ARGS)."""
        raise NotImplementedError

    def address(self, recipe: Recipe) -> tuple[str, int]:
        """HOST and PORT, unless the extra arguments give the engine's own --host / --port (they come last, so they
        win)."""
        from .engine_server import option_values  # builds on this module

        host, port = super().address(recipe)
        hosts, ports = option_values(self.extra_argv, "--host"), option_values(self.extra_argv, "--port")
        return (hosts[-1] if hosts else host), (int(ports[-1]) if ports and ports[-1].isdigit() else port)


class VllmSettings(EngineServerSettings):
    vllm_args: ShellWords = setting(
        "", "VLLM_ARGS", "追加给 vLLM 的参数（shell 引号规则），如 `--gpu-memory-utilization 0.85`，放在最后因而优先",
        "extra vLLM arguments (shell quoting), e.g. `--gpu-memory-utilization 0.85`; appended last, so they win")

    @property
    def vllm_argv(self) -> list[str]:
        return shlex.split(self.vllm_args)

    @property
    def extra_argv(self) -> list[str]:
        return self.vllm_argv


class SglangSettings(EngineServerSettings):
    served_model_name: str | None = setting(
        None, "SERVED_MODEL_NAME",
        "`/v1/models` 列出、请求里 `model` 用的模型名（SGLang 只认一个名字）；未设置时为上游教程用的短名（如 `Qwen3-8B`）",
        "the model name `/v1/models` lists and requests give as `model` (SGLang answers to one name); unset: the short "
        "name upstream's tutorials use (e.g. `Qwen3-8B`)",
        shown=("上游教程用的短名", "upstream's short name"))
    mem_fraction_static: float | None = setting(
        None, "MEM_FRACTION_STATIC", "权重 + KV cache 占显存的比例（`--mem-fraction-static`，如 0.85；显存不足时调低）",
        "the share of the card for the weights + KV cache (`--mem-fraction-static`, e.g. 0.85; lower it on "
        "out-of-memory)", shown=("SGLang 按显存大小自选", "SGLang's own, by the card's memory"), gt=0, lt=1)
    sglang_args: ShellWords = setting(
        "", "SGLANG_ARGS", "追加给 SGLang 的参数（shell 引号规则），如 `--chunked-prefill-size 4096`，放在最后因而优先",
        "extra SGLang arguments (shell quoting), e.g. `--chunked-prefill-size 4096`; appended last, so they win")

    @property
    def extra_argv(self) -> list[str]:
        return shlex.split(self.sglang_args)


class LangchainSettings(MediaSettings, EngineSettings, ModelSettings):
    docs_dir: Path = setting(SAMPLE_DOCS_DIR, "DOCS_DIR", "要检索的 `.txt` / `.md` 所在目录（递归）",
                             "folder of the `.txt` / `.md` files to search (recursive)",
                             shown=("自带的三篇示例文档", "three bundled sample documents"))
    questions: Lines = setting([], "QUESTION", "要回答的问题，多个问题每行一个；未设置时交互式问答（`-it`）或回答一个示例问题",
                               "the question(s) to answer, one per line; unset: ask interactively (`-it`) "
                               "or answer one sample question")
    embedding_model: str = setting(
        DEFAULT_EMBEDDING_MODEL, "EMBEDDING_MODEL",
        "向量模型：Hub 名称或本地目录（中文文档建议换成中文向量模型，如 `BAAI/bge-small-zh-v1.5`）",
        "the embedding model: a hub id or a local folder (for Chinese documents e.g. `BAAI/bge-small-zh-v1.5`)",
        min_length=1)
    chroma_dir: Path | None = setting(None, "CHROMA_DIR", "Chroma 向量库目录", "the Chroma store's folder",
                                      shown=("`$MODEL_CACHE/langchain-chroma`", "`$MODEL_CACHE/langchain-chroma`"))
    collection: str = setting("selfllm_rag", "COLLECTION", "集合名；换向量模型时请换一个集合名或清空 `CHROMA_DIR`",
                              "the collection; change it (or empty `CHROMA_DIR`) when changing the embedding model",
                              min_length=1)
    top_k: int = setting(3, "TOP_K", "检索块数", "chunks retrieved per question", ge=1)
    chunk_size: int = setting(500, "CHUNK_SIZE", "切块长度（字符）", "chunk length (characters)", ge=1)
    chunk_overlap: int = setting(50, "CHUNK_OVERLAP", "相邻块重叠（字符）", "overlap of neighbouring chunks (characters)",
                                 ge=0)
    max_new_tokens: int = setting(512, "MAX_NEW_TOKENS", "每个回答最多生成的 token 数", "tokens generated per answer at most",
                                  ge=1)
    temperature: float | None = setting(
        None, "TEMPERATURE", "采样温度（0 为贪心）", "sampling temperature (0: greedy)", ge=0, le=2,
        shown=("checkpoint 的 `generation_config.json`", "the checkpoint's `generation_config.json`"))
    top_p: float | None = setting(
        None, "TOP_P", "nucleus 采样", "nucleus sampling", gt=0, le=1,
        shown=("checkpoint 的 `generation_config.json`", "the checkpoint's `generation_config.json`"))
    seed: int | None = setting(None, "SEED", "采样随机种子", "sampling seed")
    enable_thinking: bool | None = setting(
        None, "ENABLE_THINKING", "`0` 关闭思考，回答更快", "`0` turns thinking off: faster answers",
        when="thinking", shown=("模型的默认", "the model's default"))
    reasoning_effort: str | None = setting(
        None, "REASONING_EFFORT", "思考强度（模型给出的档位之一，如 `low` / `medium` / `high`）",
        "reasoning effort (one of the model's levels, e.g. `low` / `medium` / `high`)",
        when="reasoning_effort", shown=("模型的默认", "the model's default"), min_length=1)
    selftest: bool = setting(False, "LANGCHAIN_SELFTEST", "`1` 时额外自检聊天模型的 invoke/stream/batch（冒烟测试用）",
                             "`1` also exercises the chat model's invoke/stream/batch (smoke tests)")

    @property
    def store_dir(self) -> Path:
        return self.chroma_dir or self.model_cache / "langchain-chroma"

    @property
    def embedding_cache(self) -> Path:
        return self.model_cache / "huggingface" / "hub"


class AdapterSettings(TorchSettings, TemplateSettings, ModelSettings):
    """What `selfllm lora infer` / `merge` read besides their own flags."""

    model_path: Path | None = setting(None, "MODEL_PATH", *MODEL_PATH_TEXT, flag="--model")  # + its flag

    adapter_path: Path | None = setting(None, "ADAPTER_PATH", "`infer` / `merge` 用的适配器目录",
                                        "the adapter folder `infer` / `merge` use", flag="--adapter")
    quantization: QuantizationSetting | None = setting(
        None, "QUANTIZATION", "`infer` 加载基座的方式：`none`、`4bit` 或 `8bit`（`merge` 总是合并进 bf16 基座）",
        "how `infer` loads the base: `none`, `4bit` or `8bit` (`merge` always merges into the bf16 base)",
        flag="--quantization", shown=("训练时的设置", "as in training"))


class TrackingSettings(TaskSettings):
    """How a Trainer-based run is tracked (finetune/tracking.py): SwanLab (offline by default), TensorBoard or
    nothing; every run also draws `<run>/curves.png`."""

    report_to: Annotated[Literal["none", "tensorboard", "swanlab"], BeforeValidator(_lower)] = setting(
        "swanlab", "REPORT_TO",
        "`swanlab`（已安装，日志在 `<运行目录>/swanlog`，看板：`selfllm lora dashboard`）、`tensorboard`（日志在 "
        "`<运行目录>/runs`）或 `none`；三者都会画 `<运行目录>/curves.png`",
        "`swanlab` (installed; logs in `<run>/swanlog`, dashboard: `selfllm lora dashboard`), `tensorboard` (logs in "
        "`<run>/runs`) or `none`; each also draws `<run>/curves.png`", flag="--report-to")
    swanlab_api_key: str = setting(
        "", "SWANLAB_API_KEY", "`SWANLAB_MODE=cloud` 上传用的 SwanLab API key（不写入运行目录）",
        "the SwanLab API key `SWANLAB_MODE=cloud` uploads with (never written into the run folder)", exclude=True)
    swanlab_mode: Annotated[Literal["local", "cloud", "offline"], BeforeValidator(_lower)] = setting(
        "local", "SWANLAB_MODE",
        "`local`：只写本地日志，不登录、不联网；`cloud`：上传到 swanlab.cn（需要 `SWANLAB_API_KEY`）；`offline`：本地保存，之后 "
        "`swanlab sync` 上传",
        "`local`: local logs only, no login, no network; `cloud`: upload to swanlab.cn (needs `SWANLAB_API_KEY`); "
        "`offline`: saved locally for a later `swanlab sync`", flag="--swanlab-mode")

    @field_validator("swanlab_mode")
    @classmethod
    def _cloud_needs_a_key(cls, value: str, info: Any) -> str:
        if value == "cloud" and info.data.get("report_to") == "swanlab" and not info.data.get("swanlab_api_key"):
            raise ValueError("uploading to SwanLab needs SWANLAB_API_KEY (your key from swanlab.cn); or keep the logs "
                             "on this machine with SWANLAB_MODE=local")
        return value


class LoraSettings(TrackingSettings, AdapterSettings):
    quantization: QuantizationSetting = setting(
        "none", "QUANTIZATION",
        "`4bit`：QLoRA（4-bit NF4 基座 + `prepare_model_for_kbit_training`，适配器权重不量化）；`8bit`：8-bit 基座上的 LoRA；"
        "显存见「显存」表",
        "`4bit`: QLoRA (a 4-bit NF4 base, `prepare_model_for_kbit_training`, adapters not quantized); `8bit`: LoRA on "
        "an 8-bit base; VRAM in the VRAM table", flag="--quantization")
    data: PathList = setting(
        [], "DATA_PATH", "训练文件（逗号分隔可多个）；未设置则用 `DATA_URL`，再没有则用运行时自带的上游 `huanhuan.json`（校验 sha256，不联网）",
        "training files (comma-separated); unset: `DATA_URL`, else upstream's `huanhuan.json` shipped with the "
        "runtime (sha256-checked, offline)", flag="--data")
    data_url: str | None = setting(
        None, "DATA_URL", "仅 http(s)，最大 256 MiB，下载到 `DATA_DIR`；下载失败时一行报错、退出码 2",
        "http(s) only, 256 MiB at most, fetched into `DATA_DIR`; a failed fetch is one error line, exit 2",
        flag="--data-url")
    data_dir: Path = setting(DEFAULT_DATA_DIR, "DATA_DIR", "`DATA_URL` 下载到这里", "where `DATA_URL` is fetched to",
                             flag="--data-dir")
    output_root: Path = setting(DEFAULT_LORA_OUTPUT, "OUTPUT_DIR", "适配器保存在 `<OUTPUT_DIR>/<RUN_NAME>`",
                                "the adapter goes to `<OUTPUT_DIR>/<RUN_NAME>`", flag="--output-dir")
    run_name: str | None = setting(None, "RUN_NAME", "运行名", "the run's name", flag="--run-name",
                                   shown=("`<模型目录名>-<数据文件名>`", "`<model folder>-<data file stem>`"))
    epochs: float = setting(3, "NUM_EPOCHS", "训练轮数", "epochs", flag="--epochs", gt=0)
    max_steps: int = setting(-1, "MAX_STEPS", "`>0` 时优先于轮数", "`>0`: wins over the epochs", flag="--max-steps")
    learning_rate: float = setting(1e-4, "LEARNING_RATE", "学习率", "learning rate", flag="--learning-rate", gt=0)
    batch_size: int = setting(4, "BATCH_SIZE", "每卡 batch", "batch per device", flag="--batch-size", gt=0)
    grad_accum: int = setting(4, "GRAD_ACCUM", "梯度累积步数", "gradient accumulation steps", flag="--grad-accum", gt=0)
    max_length: int = setting(1024, "MAX_LENGTH", "每条样本最多 token 数（超出截断）", "tokens per sample at most (cut beyond)",
                              flag="--max-length", gt=8)
    logging_steps: int = setting(10, "LOGGING_STEPS", "每多少步记录一次损失", "steps between loss logs",
                                 flag="--logging-steps", gt=0)
    save_steps: int = setting(100, "SAVE_STEPS", "每多少步保存 checkpoint（在运行目录下）",
                              "steps between checkpoints (in the run folder)", flag="--save-steps", gt=0)
    r: int = setting(LORA_DEFAULTS["r"].default, "LORA_R", "LoRA 秩", "LoRA rank", flag="--lora-r", family="lora.r", gt=0)
    alpha: int = setting(LORA_DEFAULTS["alpha"].default, "LORA_ALPHA", "LoRA alpha", "LoRA alpha", flag="--lora-alpha", family="lora.alpha", gt=0)
    dropout: float = setting(LORA_DEFAULTS["dropout"].default, "LORA_DROPOUT", "LoRA dropout", "LoRA dropout", flag="--lora-dropout",
                             family="lora.dropout", ge=0, lt=1)
    target_modules: CommaList = setting(
        [], "LORA_TARGET_MODULES", "加 LoRA 的模块（逗号分隔）", "modules that get LoRA (comma-separated)",
        flag="--target-modules", family="lora.target_modules", min_length=1)
    target_parameters: CommaList = setting(
        [], "LORA_TARGET_PARAMETERS", "加 LoRA 的参数（名字后缀，逗号分隔）：MoE 的专家权重是三维参数，不是模块",
        "parameters that get LoRA (name suffixes, comma-separated): a MoE's expert weights are 3-D parameters, not modules",
        flag="--target-parameters", family="lora.target_parameters")

    @field_validator("target_parameters")
    @classmethod
    def _parameters_need_no_dropout(cls, value: list[str], info: Any) -> list[str]:
        dropout = info.data.get("dropout")
        if value and dropout:
            raise ValueError(f"LoRA on parameters (peft's ParamWrapper) works only with LORA_DROPOUT=0, not {dropout:g}")
        return value
    system_prompt: str | None = setting(
        None, "SYSTEM_PROMPT", "给没有 system 的记录加上；配方的默认值只用于默认数据（设置 `DATA_PATH` / `DATA_URL` 时不加）",
        "added to records without a system turn; the recipe's default applies to the default data only "
        "(not with `DATA_PATH` / `DATA_URL`)", flag="--system", clearable=True)
    enable_thinking: bool = setting(False, "ENABLE_THINKING", "训练目标是否用思考模式的模板",
                                    "train on the thinking-mode template", flag="--enable-thinking", when="thinking")
    seed: int = setting(42, "SEED", "随机种子", "random seed", flag="--seed")
    resume: Annotated[str, BeforeValidator(_resume)] = setting(
        "auto", "RESUME",
        "`auto`：运行目录里有完整的 checkpoint 且数据、基座、LoRA 配置、量化、种子、batch/学习率计划都与它一致时，从最新的一个继续"
        "（优化器、调度器、随机数状态和数据位置一并恢复），不一致时一行说明哪一项不同并退出；`never`：从第 0 步重新训练；"
        "或一个 checkpoint 目录",
        "`auto`: continue from the run folder's newest complete checkpoint when data, base model, LoRA config, "
        "quantization, seed and batch/LR schedule match it (optimizer, scheduler, RNG and data position too); a "
        "mismatch stops with one line naming the setting; `never`: train from step 0; or a checkpoint folder",
        flag="--resume", min_length=1)
    gradient_checkpointing: bool = setting(
        True, "GRADIENT_CHECKPOINTING", "同时调用 `enable_input_require_grads()`（上游 #119 的报错）",
        "also calls `enable_input_require_grads()` (upstream #119)", flag="--gradient-checkpointing")
    max_samples: int | None = setting(None, "MAX_SAMPLES", "只用前 N 条", "use the first N records only",
                                      flag="--max-samples", gt=0, shown=("全部", "all"))
    nproc: str = setting(
        "1", "NPROC",
        "训练进程数（每张卡一个）：`auto` 为可见 GPU 数；大于 1 时 `selfllm start` 经 `torchrun` 启动数据并行（DDP），只有 0 号进程写适配器与日志",
        "training processes (one per GPU): `auto` = the visible GPUs; above 1, `selfllm start` launches data-parallel "
        "training (DDP) through `torchrun`, and only rank 0 writes the adapter and the logs",
        pattern=r"^(auto|[1-9][0-9]*)$")
    fsdp: Annotated[Literal["off", "full_shard"], BeforeValidator(_lower)] = setting(
        "off", "FSDP",
        "`full_shard`：FSDP 把基座权重分到各卡（单卡放不下的模型；需 `NPROC` > 1 且在 GPU 上）",
        "`full_shard`: FSDP shards the base weights across the cards (a model one card can't hold; needs `NPROC` > 1, on GPUs)")

    gpu_layout: Annotated[Literal["auto", "data", "spread"], BeforeValidator(_lower)] = setting(
        "auto", "GPU_LAYOUT",
        "`data`：每个进程（`NPROC`，每卡一个）各放一份完整模型，数据并行；`spread`：一个进程，模型各层分到所有可见的卡上"
        "（`device_map=auto`，上游大 MoE 模型 LoRA 教程的做法），单卡放不下的模型用它；启动时可见卡的显存总和不够配方的估计就拒绝",
        "`data`: each process (`NPROC`, one per card) holds a whole copy, data-parallel; `spread`: one process, the "
        "layers spread over every visible card (`device_map=auto`, as upstream's LoRA tutorials of the big MoE "
        "models), for a model one card can't hold; refused at start when the visible cards hold less than the "
        "recipe's estimate", flag="--gpu-layout",
        shown=("配方需要多张卡（`gpu.count` > 1）时为 `spread`，否则 `data`", "`spread` where the recipe needs several "
               "cards (`gpu.count` > 1), else `data`"))

    @model_validator(mode="after")
    def _spread_is_one_process(self) -> "LoraSettings":
        if self.gpu_layout == "spread" and (self.nproc != "1" or self.fsdp != "off"):
            given = f"NPROC={self.nproc}" if self.nproc != "1" else f"FSDP={self.fsdp}"
            raise ValueError(f"GPU_LAYOUT=spread trains in one process whose layers spread over the cards: {given} "
                             "is for GPU_LAYOUT=data (a copy, or with FSDP a shard, per process)")
        return self

    def layout(self, recipe_gpus: int) -> Literal["data", "spread"]:
        """GPU_LAYOUT as it applies to a recipe needing `recipe_gpus` cards: `auto` spreads a model that needs
        several (unless NPROC or FSDP asks for data parallelism), else one copy per process."""
        if self.gpu_layout != "auto":
            return self.gpu_layout
        return "spread" if recipe_gpus > 1 and self.nproc == "1" and self.fsdp == "off" else "data"

    def processes(self) -> int:
        """NPROC as a number: `auto` is the visible CUDA devices (1 without any)."""
        if self.nproc != "auto":
            return int(self.nproc)
        import torch

        return max(torch.cuda.device_count(), 1)

    def run_dir(self, model_dir: Path, default_data: Path = DEFAULT_DATA) -> Path:
        """OUTPUT_DIR/RUN_NAME, by default <checkpoint>-<data file's stem>; default_data: the data of a run
        without DATA_PATH/DATA_URL (an image checkpoint's: the LaTeX-OCR set)."""
        source = (self.data[0].stem if self.data else Path(self.data_url).stem if self.data_url
                  else default_data.stem)
        from .model_source import checkpoint_name  # model_source builds on this module

        name = self.run_name or re.sub(r"[^\w.-]+", "-", f"{checkpoint_name(model_dir)}-{source}").strip("-")
        return self.output_root / name

    @property
    def user_data(self) -> bool:
        return bool(self.data or self.data_url)


class GrpoSettings(LoraSettings):
    """GRPO (TRL's GRPOTrainer) on a LoRA adapter: LoRA's settings (adapter, quantization, batch, learning rate,
    run folder, RESUME, NPROC) with GRPO's own defaults, and the group sampling and rewards."""

    data: PathList = setting(
        [], "DATA_PATH", "题目文件（JSON / JSONL，逗号分隔可多个），每条含 `question` 与 `answer`（GSM8K 格式：答案末尾 `#### 72`，"
        "或只有最终答案）；未设置则用 `DATA_URL`，再没有则从模型源下载 GSM8K，下载不了时用运行时自带的算术应用题（校验 sha256）",
        "problem files (JSON / JSONL, comma-separated), each record with `question` and `answer` (GSM8K style: the "
        "answer ends `#### 72`, or is the final answer alone); unset: `DATA_URL`, else GSM8K from the model hubs, "
        "else the arithmetic word problems shipped with the runtime (sha256-checked)", flag="--data")
    data_hub: bool = setting(True, "DATA_HUB", "没有 `DATA_PATH` / `DATA_URL` 时先从模型源（按 `MODEL_SOURCE` 的顺序）取 GSM8K；"
                             "`false`：直接用自带的算术题", "no `DATA_PATH` / `DATA_URL`: try GSM8K on the model hubs "
                             "first (in `MODEL_SOURCE`'s order); `false`: the shipped arithmetic set straight away",
                             flag="--data-hub")
    output_root: Path = setting(DEFAULT_GRPO_OUTPUT, "OUTPUT_DIR", "适配器保存在 `<OUTPUT_DIR>/<RUN_NAME>`",
                                "the adapter goes to `<OUTPUT_DIR>/<RUN_NAME>`", flag="--output-dir")
    epochs: float = setting(1, "NUM_EPOCHS", "训练轮数", "epochs", flag="--epochs", gt=0)
    max_steps: int = setting(250, "MAX_STEPS", "`>0` 时优先于轮数（上游教程：250 步）", "`>0`: wins over the epochs "
                             "(upstream's tutorials: 250 steps)", flag="--max-steps")
    learning_rate: float = setting(5e-6, "LEARNING_RATE", "学习率（上游教程的 GRPO 取值）", "learning rate (upstream's "
                                   "GRPO value)", flag="--learning-rate", gt=0)
    batch_size: int = setting(8, "BATCH_SIZE", "每卡每步的回答数（= 题目数 × `NUM_GENERATIONS`）",
                              "completions per device and step (= prompts × `NUM_GENERATIONS`)", flag="--batch-size", gt=0)
    grad_accum: int = setting(1, "GRAD_ACCUM", "梯度累积步数", "gradient accumulation steps", flag="--grad-accum", gt=0)
    logging_steps: int = setting(1, "LOGGING_STEPS", "每多少步记录一次奖励与损失", "steps between reward and loss logs",
                                 flag="--logging-steps", gt=0)
    max_length: int = setting(512, "MAX_LENGTH", "题目（提示）最多 token 数，超出的题目跳过", "prompt tokens at most "
                              "(longer problems are skipped)", flag="--max-length", gt=8)
    num_generations: int = setting(4, "NUM_GENERATIONS", "每道题采样的回答数（组）；显存随它 × `MAX_COMPLETION_LENGTH` 增长",
                                   "completions sampled per problem (the group); VRAM grows with it × "
                                   "`MAX_COMPLETION_LENGTH`", flag="--num-generations", ge=2)
    max_completion_length: int = setting(256, "MAX_COMPLETION_LENGTH", "每个回答最多生成的 token 数",
                                         "tokens generated per completion at most", flag="--max-completion-length", gt=0)
    temperature: float = setting(1.0, "TEMPERATURE", "采样温度（组内回答要有差异）", "sampling temperature (a group's "
                                 "completions must differ)", flag="--temperature", gt=0)
    beta: float = setting(0.0, "BETA", "KL 惩罚系数；`0` 不加载参考模型（省显存，TRL 的默认）", "KL penalty coefficient; `0` "
                          "loads no reference model (less memory; TRL's default)", flag="--beta", ge=0)
    reward_module: Path | None = setting(
        None, "REWARD_MODULE", "自己的奖励函数文件（`.py`，定义 `REWARDS = [函数, ...]`，每个函数 `(completions, answer, "
        "**kwargs) -> list[float]`）；未设置则用内置的格式奖励 + 数学正确性奖励",
        "your own reward functions (a `.py` defining `REWARDS = [function, ...]`, each `(completions, answer, **kwargs) "
        "-> list[float]`); unset: the built-in format reward + math correctness reward", flag="--reward-module",
        clearable=True)
    system_prompt: str | None = setting(
        None, "SYSTEM_PROMPT", "要求回答格式的 system 提示；空：不加", "the system prompt that asks for the answer format; "
        "empty: none", flag="--system", clearable=True, shown=("按模型族的推理标记生成", "made from the family's reasoning markers"))
    enable_thinking: bool = setting(True, "ENABLE_THINKING", "用思考模式的模板生成回答", "generate with the thinking-mode "
                                    "template", flag="--enable-thinking", when="thinking")

    @model_validator(mode="after")
    def _whole_groups(self) -> "GrpoSettings":
        if (self.batch_size * self.grad_accum) % self.num_generations:
            raise ValueError(f"BATCH_SIZE × GRAD_ACCUM ({self.batch_size} × {self.grad_accum}) must be a multiple of "
                             f"NUM_GENERATIONS ({self.num_generations}): each step takes whole groups")
        return self

    def run_dir(self, model_dir: Path, default_data: Path = Path("gsm8k")) -> Path:
        return super().run_dir(model_dir, default_data)


def _whole_numbers(value: Any) -> Any:
    """A comma list of whole numbers (PERF_PARALLEL=1,8,32)."""
    return [int(item) if re.fullmatch(r"\d+", item) else item for item in _comma_list(value)] \
        if isinstance(value, str) else value


IntList = Annotated[list[Annotated[int, Field(ge=1)]], BeforeValidator(_whole_numbers), Field(min_length=1)]


class EvalSettings(ServedNameSettings, EngineSettings, ModelSettings):
    """EvalScope against the model served in-process (the fastapi task's OpenAI-compatible server on 127.0.0.1), or
    against an outside deployment (EVAL_URL: the vllm / sglang recipe's): `selfllm eval run` (benchmarks, base vs
    adapter) and `selfllm eval perf` (stress test at a few concurrencies)."""

    model_path: Path | None = setting(None, "MODEL_PATH", *MODEL_PATH_TEXT, flag="--model")
    adapter_path: Path | None = setting(
        None, "ADAPTER_PATH", "LoRA 适配器目录（lora / grpo 配方训练的）：`run` 先评测基座，再评测基座 + 适配器，并排成一张表；"
        "`perf` 压测基座 + 适配器", "a LoRA adapter folder (from the lora / grpo recipes): `run` evaluates the base, then "
        "base + adapter, side by side in one table; `perf` stress-tests base + adapter", flag="--adapter", clearable=True)
    datasets: CommaList = setting(
        ["auto"], "EVAL_DATASETS",
        "EvalScope 的评测集（逗号分隔，如 `iquiz,ceval`）；`auto`：能连上 ModelScope 时用上游教程的 `iquiz`（智商情商题），"
        "连不上时（`--network none`）用运行时自带的小题集；`selfllm`：只用自带的题集",
        "EvalScope benchmarks (comma-separated, e.g. `iquiz,ceval`); `auto`: upstream's `iquiz` (IQ and EQ questions) "
        "when ModelScope answers, else (`--network none`) the small question set shipped with the runtime; `selfllm`: "
        "the shipped set only", flag="--datasets", min_length=1)
    dataset_args: str = setting(
        "", "EVAL_DATASET_ARGS", "传给 EvalScope 的 `dataset_args`（JSON），如 `{\"general_mcq\": {\"local_path\": \"/data/my\"}}`",
        "EvalScope's `dataset_args` (JSON), e.g. `{\"general_mcq\": {\"local_path\": \"/data/my\"}}`",
        flag="--dataset-args")
    limit: int | None = setting(None, "EVAL_LIMIT", "每个子集最多评测几道题（先试跑时用）",
                                "questions per subset at most (for a trial run)", flag="--limit", ge=1, clearable=True)
    eval_batch_size: int = setting(8, "EVAL_BATCH_SIZE", "同时发给模型的请求数（服务端合批，见 `MAX_BATCH`）",
                                   "requests sent to the model at once (batched by the server, see `MAX_BATCH`)",
                                   flag="--eval-batch-size", ge=1)
    max_tokens: int = setting(2048, "EVAL_MAX_TOKENS", "每个回答最多生成的 token 数（思考模型要留足）",
                              "tokens generated per answer at most (leave room for a thinking model)",
                              flag="--max-tokens", ge=1)
    enable_thinking: bool | None = setting(
        None, "ENABLE_THINKING", "`0` 关闭思考（答得快，分数通常低一些）", "`0` turns thinking off (faster answers, "
        "usually a lower score)", flag="--enable-thinking", when="thinking", shown=("模型的默认", "the model's default"))
    output_root: Path = setting(DEFAULT_EVAL_OUTPUT, "OUTPUT_DIR", "报告写到 `<OUTPUT_DIR>/<run|perf>-<时间>/`",
                                "reports go to `<OUTPUT_DIR>/<run|perf>-<time>/`", flag="--output-dir")
    eval_url: str | None = setting(
        None, "EVAL_URL", "已在运行的 OpenAI 兼容服务（如本模型族的 vllm / sglang 配方：`http://127.0.0.1:8000/v1`）："
        "`run` 与 `perf` 都评测它，容器里不加载模型；未设置：在容器内加载本配方的模型（放不进一张卡的模型族要求设置它，"
        "见 `EVAL_IN_PROCESS`）", "an OpenAI-compatible server already running (e.g. this family's vllm / sglang "
        "recipe: `http://127.0.0.1:8000/v1`): `run` and `perf` evaluate it and no model loads in the container; unset: "
        "this recipe's model is loaded in the container (a family one card can't hold asks for it, see "
        "`EVAL_IN_PROCESS`)", flag="--url", aliases=("PERF_URL",), clearable=True)
    eval_model: str | None = setting(
        None, "EVAL_MODEL", "`EVAL_URL` 上的模型名（请求里的 `model`）", "the model name at `EVAL_URL` (requests' `model`)",
        flag="--served-model", aliases=("PERF_MODEL",), clearable=True,
        shown=("`/v1/models` 列出的那一个（有多个时取本配方的名字之一）",
               "the one `/v1/models` lists (of several: one of this recipe's names)"))
    eval_api_key: str = setting("", "EVAL_API_KEY", "`EVAL_URL` 的 API key（vllm / sglang 配方的 `API_KEY`）",
                                "`EVAL_URL`'s API key (the vllm / sglang recipe's `API_KEY`)", flag="--api-key",
                                aliases=("PERF_API_KEY",))
    in_process: bool | None = setting(
        None, "EVAL_IN_PROCESS", "没有 `EVAL_URL` 时是否在容器内用 transformers 加载模型：`1` 强制加载（放不进一张卡的模型族"
        "也加载，权重分到所有可见的卡上）", "without `EVAL_URL`, whether the container loads the model with transformers: "
        "`1` forces it (also for a family one card can't hold: the weights spread over every visible card)",
        flag="--in-process", shown=("只有放得进一张卡的模型族", "only for a family one card holds"))

    @field_validator("eval_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value.strip()):
            raise ValueError("not an http(s) address, e.g. http://127.0.0.1:8000/v1")
        return value.strip() if value is not None else None

    parallel: IntList = setting([1, 8, 32], "PERF_PARALLEL", "`perf` 的并发数，逗号分隔，每个跑一轮",
                                "`perf`'s concurrencies, comma-separated, one round each", flag="--parallel")
    number: IntList = setting([8, 32, 96], "PERF_NUMBER", "每轮的请求数（与 `PERF_PARALLEL` 一一对应，或一个数用于每轮）",
                              "requests per round (one per `PERF_PARALLEL` entry, or one number for every round)",
                              flag="--number")
    perf_max_tokens: int = setting(256, "PERF_MAX_TOKENS", "`perf` 每个请求最多生成的 token 数",
                                   "tokens each `perf` request generates at most", flag="--perf-max-tokens", ge=1)

    @field_validator("dataset_args")
    @classmethod
    def _json_object(cls, value: str) -> str:
        import json

        if value.strip():
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not JSON: {exc.msg} at character {exc.pos}") from None
            if not isinstance(parsed, dict):
                raise ValueError("must be a JSON object {benchmark: {argument: value}}")
        return value.strip()

    @model_validator(mode="after")
    def _rounds(self) -> "EvalSettings":
        if len(self.number) not in (1, len(self.parallel)):
            raise ValueError(f"PERF_NUMBER has {len(self.number)} entries for {len(self.parallel)} PERF_PARALLEL "
                             "rounds: give one per round, or one for all")
        return self

    def rounds(self) -> list[tuple[int, int]]:
        """(concurrency, requests) of each perf round."""
        numbers = self.number * len(self.parallel) if len(self.number) == 1 else self.number
        return list(zip(self.parallel, numbers))


def task_settings(task: TaskKind) -> type[TaskSettings]:
    """The settings model of task kind `task`: the class of this module its task.yaml names (`kind.settings`)."""
    info = kind_info(task)
    model = globals().get(info.settings)
    if not (isinstance(model, type) and issubclass(model, TaskSettings)):
        raise MetadataError(tasks_root() / getattr(task, "value", task) / TASK_FILE, "kind.settings",
                            f"{info.settings!r} is no settings model of selfllm_runtime/settings.py")
    return model


# The recipe's SYSTEM_PROMPT belongs to its default data (upstream's huanhuan.json): it applies only when
# the user gives no data of their own.
DATA_BOUND = {"system_prompt"}
DATA_FIELDS = ("data", "data_url")

S = TypeVar("S", bound=TaskSettings)


# ----------------------------------------------------------------------------- resolution

def family_value(family: ModelFamily | None, path: str | None) -> Any:
    """ModelFamily attribute at a dotted path; None when absent."""
    value: Any = family
    for part in (path or "").split(".") if path else []:
        value = getattr(value, part, None)
    return value if path else None


def _exists(info: SettingInfo, family: ModelFamily | None) -> bool:
    return info.when is None or family is None or family_value(family, info.when) is not None


def _given(text: str | None, info: SettingInfo) -> bool:
    return text is not None and (text.strip() != "" or info.clearable)


@dataclass(frozen=True)
class Given:
    """Where a setting's value came from: `name` as the user wrote it (flag, variable, recipe env: or
    model.yaml path), its text, and the layer ('flag', 'environment', 'recipe env:', 'model.yaml')."""

    name: str
    value: Any
    layer: str


def gather(model: type[TaskSettings], recipe: Recipe | None = None, family: ModelFamily | None = None,
           cli: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> dict[str, Given]:
    """Each field's value from the first layer that gives it (fields no layer gives keep their default)."""
    cli = {k: v for k, v in (cli or {}).items() if v is not None}
    env = os.environ if env is None else env
    recipe_env = recipe.env if recipe is not None else {}
    infos = [i for i in model.infos() if _exists(i, family)]

    def user_given(info: SettingInfo) -> Given | None:
        if info.field in cli:
            return Given(info.flag or info.env, cli[info.field], "flag")
        for name in (info.env, *info.aliases):
            if _given(env.get(name), info):
                return Given(name, env[name], "environment")
        return None

    user_data = any(user_given(i) is not None for i in infos if i.field in DATA_FIELDS)
    found: dict[str, Given] = {}
    for info in infos:
        given = user_given(info)
        if given is None and _given(recipe_env.get(info.env), info) and not (info.field in DATA_BOUND and user_data):
            given = Given(f"{info.env} (recipe env:)", recipe_env[info.env], "recipe env:")
        if given is None and info.family and family_value(family, info.family) is not None:
            given = Given(f"{info.env} (model.yaml {info.family})", family_value(family, info.family), "model.yaml")
        if given is not None:
            found[info.field] = given
    return found


def resolve(model: type[S], recipe: Recipe | None = None, family: ModelFamily | None = None,
            cli: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> S:
    """The settings of `model` by the precedence in this module's docstring; SettingsError names a bad one."""
    return validated(model, gather(model, recipe, family, cli, env))


def validated(model: type[S], found: Mapping[str, Given]) -> S:
    """The gathered values parsed into `model`; SettingsError names the first bad one."""
    infos = {i.field: i for i in model.infos()}
    values = {field: None if infos[field].clearable and isinstance(g.value, str) and not g.value.strip() else g.value
              for field, g in found.items()}
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise settings_error(exc, found) from None


SECRETS = {"api_key", "swanlab_api_key"}  # shown as set / unset, never as their value


def explain(model: type[S], recipe: Recipe | None = None, family: ModelFamily | None = None,
            cli: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> list[tuple[str, str, str]]:
    """(variable, effective value, layer it came from) for every setting of `model`, validated first."""
    found = gather(model, recipe, family, cli, env)
    settings = validated(model, found)
    rows = []
    for info in model.infos():
        if not _exists(info, family):
            continue
        value = getattr(settings, info.field)
        shown = ("<set>" if value else "<unset>") if info.field in SECRETS else _shown(value).strip("`")
        rows.append((info.env, shown, found[info.field].layer if info.field in found else "default"))
    return rows


def settings_error(exc: ValidationError, found: Mapping[str, Given]) -> SettingsError:
    error = exc.errors()[0]
    field = str(error["loc"][0]) if error["loc"] else ""
    message = error["msg"].removeprefix("Value error, ")
    if field in found:
        return SettingsError(f"{found[field].name}={found[field].value!r}: {message}")
    return SettingsError(f"{field or 'settings'}: {message}")


def add_flags(parser: Any, model: type[TaskSettings], skip: tuple[str, ...] = ()) -> None:
    """argparse flags for the fields that have one (but those in skip); values stay text, parsed by
    resolve() like the environment's (a bare boolean flag means true)."""
    for info in model.infos():
        if info.flag is None or info.field in skip:
            continue
        kwargs: dict[str, Any] = {"dest": info.field, "default": None, "metavar": info.env,
                                  "help": f"{info.en} (env {info.env})".replace("%", "%%")}
        if isinstance(info.default, bool) or model.model_fields[info.field].annotation in (bool, bool | None):
            kwargs.update(nargs="?", const="true")
        parser.add_argument(info.flag, **kwargs)


# ----------------------------------------------------------------------------- README tables

def _shown(value: Any) -> str:
    if value is None or value == [] or value == "":
        return "—"
    if isinstance(value, bool):
        return "`1`" if value else "`0`"
    if isinstance(value, ModelSource):
        value = value.value
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    if isinstance(value, float):
        value = f"{value:g}"
    return f"`{value}`"


def default_text(info: SettingInfo, recipe: Recipe, family: ModelFamily, lang: str) -> str:
    """The default a user of this recipe meets, as the README shows it."""
    if info.env in recipe.env:
        text = _shown(recipe.env[info.env])
        if info.field in DATA_BOUND:
            text += "（仅默认数据）" if lang == "zh" else " (default data only)"
        return text
    if info.family:
        value = family_value(family, info.family)
        if value is not None:
            return _shown(value)
    if info.shown:
        ids = recipe.default_model
        text = info.shown[0 if lang == "zh" else 1]
        if ids.huggingface == ids.modelscope:
            text = text.replace("（`MODEL_SOURCE=huggingface` 时为 `{huggingface}`）", "").replace(
                " (`{huggingface}` with `MODEL_SOURCE=huggingface`)", "")
        return text.format(modelscope=ids.modelscope, huggingface=ids.huggingface, port=recipe.port)
    return _shown(info.default)


def settings_table(recipe: Recipe, family: ModelFamily, lang: str) -> str:
    """The markdown table of every setting of the recipe's task, from its one definition."""
    model = task_settings(recipe.task)
    flags = any(i.flag for i in model.infos())
    if lang == "zh":
        head = ("| 命令行 | 环境变量 | 默认 | 说明 |" if flags else "| 环境变量 | 默认 | 说明 |")
    else:
        head = ("| flag | variable | default | meaning |" if flags else "| variable | default | meaning |")
    rows = [head, "|---" * head.count(" | ") + "|---|"]
    for info in model.infos():
        if not _exists(info, family):
            continue
        cells = [f"`{info.flag}`" if info.flag else ""] if flags else []
        cells += [f"`{info.env}`", default_text(info, recipe, family, lang), info.zh if lang == "zh" else info.en]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
