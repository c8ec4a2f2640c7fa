"""What a smoke check is, and the helpers every task's check shares.

Each task kind has one module `task_<kind>.py` here defining `CHECK: SmokeCheck`."""
from __future__ import annotations

import json

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import requests

if TYPE_CHECKING:
    from ..discover import RecipeSpec

SMOKE_MODEL_DIR = "/root/autodl-tmp/smoke-model"


class SmokeFailure(AssertionError):
    pass


# The system message the chat checks send: families without a system role must merge it, not fail.
SYSTEM = {"role": "system", "content": "你是一个乐于助人的助手。"}

@dataclass(frozen=True)
class SmokeCheck:
    """How to start the task on the tiny model, and how to judge it."""

    command: str  # shell command run in the recipe image
    verify: Callable[["SmokeSession"], str]  # returns a one-line detail for the report
    serves_http: bool = True
    health_path: str = "/health"
    env: dict[str, str] = field(default_factory=dict)
    shm_size: str | None = None
    # CPU threads of the task's torch (OMP_NUM_THREADS, TORCH_THREADS): one is fastest for a tiny model, and it keeps two
    # containers side by side from fighting over the cores (20 LoRA steps: 1.7 s with 1, 11.7 s with 2 threads on a
    # busy 2-core box). None: the task's own choice (vLLM's CPU backend binds its threads itself).
    threads: int | None = 1
    # Docker's network mode of the container; "none": no network at all (`docker run --network none`), for a task
    # whose offline path is what the check is about (a run to completion: serves_http=False).
    network: str | None = None


@dataclass
class SmokeSession:
    base_url: str  # http://127.0.0.1:<published port>
    recipe_key: str
    logs: Callable[[], str]
    exit_code: Callable[[], int | None]
    artifacts_dir: "object | None" = None


def recipe_context(recipe_key: str):
    """The recipe's metadata as the runtime reads it (recipe.yaml + its family's model.yaml), on the host."""
    from selfllm_runtime.context import load_context

    from ..layout import RECIPES_DIR

    return load_context(RECIPES_DIR / recipe_key)


def family_of(recipe_key: str):
    """The recipe's family (model.yaml as the runtime reads it)."""
    return recipe_context(recipe_key).family


def always_thinks(recipe_key: str) -> bool:
    """Whether the recipe opens the reasoning block in the prompt when the request leaves thinking at
    the family's default: DeepSeek-R1-Distill's template always does, MiniCPM5's does with its default
    enable_thinking on; Qwen3's does not, nor does gpt-oss's (the model opens its analysis channel). A
    random tiny model then rarely closes it, so its whole output is reasoning and the answer part may be empty."""
    context = recipe_context(recipe_key)
    family = context.family
    if family.reasoning is None:
        return False
    return default_prompt(context).rstrip().endswith(family.reasoning.start.rstrip())


def default_prompt(context, messages: list[dict] | None = None) -> str:
    """The chat template's generation prompt for `messages` (default: one user turn) with the recipe's
    default template arguments, rendered on the host by a Jinja sandbox set up as transformers sets up
    its own (trim_blocks, lstrip_blocks, loop controls, `tojson`, `raise_exception`); bos/eos as empty
    text. Enough to see how a template ends the prompt, without transformers on the host."""
    import json

    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, ensure_ascii=False, indent=None, **_: json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)  # gpt-oss's template writes today's date
    return env.from_string(context.chat_template).render(
        messages=messages or [{"role": "user", "content": "你好"}], add_generation_prompt=True,
        bos_token="", eos_token="", **context.template_kwargs())


def start_on_smoke_model(start: str = "selfllm start") -> str:
    return f"selfllm smoke-model {SMOKE_MODEL_DIR} && exec {start}"


def wait_until_healthy(session: SmokeSession, path: str, timeout_s: float) -> float:
    """Poll until GET path answers 200; fail early when the container exits."""
    started = time.monotonic()
    last = "no answer yet"
    while time.monotonic() - started < timeout_s:
        code = session.exit_code()
        if code is not None:
            raise SmokeFailure(f"container exited with code {code} before it was ready")
        try:
            answer = requests.get(session.base_url + path, timeout=5)
            if answer.status_code == 200:
                return time.monotonic() - started
            last = f"HTTP {answer.status_code}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(1)
    raise SmokeFailure(f"not ready after {timeout_s:.0f} s ({last})")


def wait_until_exited(session: SmokeSession, timeout_s: float) -> int:
    """For a task that runs to completion (serves_http=False): its exit code, once it has exited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        code = session.exit_code()
        if code is not None:
            return code
        time.sleep(1)
    raise SmokeFailure(f"still running after {timeout_s:.0f} s")


RESULT_PREFIX = "SELFLLM_RESULT "  # the one JSON line each action of a run-to-completion task prints


def results(logs: str) -> list[dict]:
    """The SELFLLM_RESULT lines of a run-to-completion task (lora, grpo), in order."""
    found = []
    for line in logs.splitlines():
        if line.startswith(RESULT_PREFIX):
            try:
                found.append(json.loads(line[len(RESULT_PREFIX):]))
            except json.JSONDecodeError as exc:
                raise SmokeFailure(f"unreadable result line {line[:120]!r}: {exc}") from None
    return found


# |adapter - base| of the prompt's mean log-prob that counts as moved (20 LoRA steps move it by ~0.1), and
# |merged - adapter| that counts as the same (fp32 rounding of the merged weights: ~1e-6)
LOGPROB_MOVED = 1e-4
LOGPROB_SAME = 1e-3


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


def check_for(spec: RecipeSpec) -> SmokeCheck:
    """The task's smoke check (task_<task>.py: CHECK, or recipe_check(spec) where it depends on the recipe)."""
    import importlib

    task = spec.recipe.task
    try:
        module = importlib.import_module(f"selfllm_recipes.smoke.task_{task.value}")
    except ModuleNotFoundError as exc:
        raise SmokeFailure(f"no smoke check for task {task.value!r} (selfllm_recipes/smoke/task_{task.value}.py)") from exc
    recipe_check = getattr(module, "recipe_check", None)
    return recipe_check(spec) if recipe_check is not None else module.CHECK


def generated_mp4(width: int, height: int, frames: int, fps: int,
                  pixel: Callable[[int, int, int], tuple[int, int, int]]) -> bytes:
    """An H.264 MP4 made with PyAV (its wheel carries FFmpeg): pixel(frame, x, y) → (r, g, b)."""
    import io

    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t in range(frames):
            frame = av.VideoFrame(width, height, "rgb24")
            plane = frame.planes[0]
            plane.update(b"".join(bytes(c for x in range(width) for c in pixel(t, x, y)).ljust(plane.line_size, b"\0")
                                  for y in range(height)))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def video_data_url(video: bytes) -> str:
    import base64

    return "data:video/mp4;base64," + base64.b64encode(video).decode()


def smoke_videos() -> tuple[str, str]:
    """Two generated MP4s as data: URLs (2 s at 4 frames a second, 64 × 48): a red square crossing a gradient,
    and moving stripes."""
    moving = generated_mp4(64, 48, 8, 4, lambda t, x, y: (255, 0, 0) if abs(x - 8 * t) < 6 and y < 16 else (x * 4, y * 5, 90))
    stripes = generated_mp4(64, 48, 8, 4, lambda t, x, y: (255, 255, 255) if ((x + 4 * t) // 8) % 2 else (0, 0, 0))
    return video_data_url(moving), video_data_url(stripes)


def generated_png(width: int, height: int, pixel: Callable[[int, int], tuple[int, int, int]]) -> bytes:
    """An RGB PNG made with the standard library (the host needs no imaging library): pixel(x, y) → (r, g, b)."""
    import struct
    import zlib

    rows = b"".join(b"\0" + bytes(c for x in range(width) for c in pixel(x, y)) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))

