"""Smoke check of task `vllm`: `/v1/models` lists the model under its folder's name, the default checkpoint's
ids and the names upstream's tutorials use, and the official `openai` client asks for a chat completion by upstream's name (as their
client code does). The detail names the build that really served, read from the container (its start log
and vLLM's /version): on an engine without GPU that is the recipe's CPU variant (vllm-cpu)."""
from __future__ import annotations

import base64
import io
import re
from collections.abc import Callable

import requests

from .checks import family_of, recipe_context, SMOKE_MODEL_DIR, SYSTEM, SmokeCheck, SmokeSession, expect, smoke_videos, start_on_smoke_model

SERVING_LINE = re.compile(r"selfllm: serving with (?P<package>vllm(?:-cpu)?) (?P<version>\S+) on (?P<device>CPU|GPU)")


def served_by(logs: str, api_version: str) -> str:
    """'vllm-cpu 0.32.0 on CPU', from the runtime's start line, checked against /version."""
    found = SERVING_LINE.search(logs)
    expect(found is not None, "the container never logged which vLLM build it serves with")
    package, version, device = found["package"], found["version"], found["device"]
    expect(not api_version or api_version == version,
           f"/version says {api_version!r} but the installed {package} is {version}")
    return f"{package} {version} on {device}"


def expected_names(recipe_key: str) -> list[str]:
    """The names the recipe serves the smoke model under (MODEL_PATH=SMOKE_MODEL_DIR, no MODEL_ID or
    SERVED_MODEL_NAME): the folder's name first, then the default checkpoint's ids and upstream's names."""
    from selfllm_runtime.model_source import served_names
    from selfllm_runtime.settings import ModelSettings, resolve

    context = recipe_context(recipe_key)
    settings = resolve(ModelSettings, context.recipe, context.family, env={"MODEL_PATH": SMOKE_MODEL_DIR})
    return served_names(context.recipe, context.family, settings)


def png_data_url(color: tuple[int, int, int], size: int = 96) -> str:
    """A generated PNG of one colour as a data: URL, as OpenAI's `image_url` takes one. (Random-noise images of two
    seeds look alike to a tiny vision tower, whose pooled patches average the noise out; two colours do not.)"""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# What a request asks for to see what the model made of its prompt: vLLM's prompt logprobs.
PROMPT_LOGPROBS = {"prompt_logprobs": 0}


def ask_with_image(session: SmokeSession, model: str, image: str | None, kind: str = "image",
                   logprobs: dict = PROMPT_LOGPROBS) -> dict:
    """One chat completion (1 token, greedy) with `logprobs` (the prompt's by default); the same text, with or without
    an image (or a video: kind "video")."""
    content: list[dict] = [{"type": "text", "text": "这张图片里有什么？"}]
    if image is not None:
        content.insert(0, {"type": f"{kind}_url", f"{kind}_url": {"url": image}})
    response = requests.post(session.base_url + "/v1/chat/completions", timeout=300, json={
        "model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 1, "temperature": 0,
        **logprobs})
    expect(response.status_code == 200, f"a request with a{'n image' if kind == 'image' else ' video'} got "
           f"{response.status_code}: {response.text[:300]}")
    return response.json()


def prompt_fingerprint(answer: dict) -> tuple[float, ...]:
    """The prompt tokens' logprobs (vLLM's prompt_logprobs), rounded: what the model made of the prompt."""
    entries = answer.get("prompt_logprobs") or []
    expect(len(entries) > 1, f"no prompt_logprobs came back: {str(answer)[:300]}")
    # Each entry: {token id: {"logprob", "rank", "decoded_token"}} of the prompt's own token (the first: None).
    return tuple(round(value["logprob"], 6) for entry in entries if entry
                 for _, value in sorted(entry.items()))


def verify_images(session: SmokeSession, model: str, image_tokens: int,
                  fingerprint: Callable[[dict], tuple] = prompt_fingerprint, logprobs: dict = PROMPT_LOGPROBS,
                  what: str = "prompt logprobs") -> str:
    """A family that takes images: an OpenAI image_url (a generated PNG as a data: URL) gets 200, the prompt grows by
    the image's tokens, and the model sees the image: two images give different `what` (the engine's `fingerprint` of
    an answer asked with `logprobs`), one image twice the same."""
    def ask(image: str | None) -> dict:
        return ask_with_image(session, model, image, logprobs=logprobs)

    text_only = ask(None)
    first, second = png_data_url((220, 40, 30)), png_data_url((20, 60, 230))
    with_first, again, with_second = ask(first), ask(first), ask(second)
    grown = with_first["usage"]["prompt_tokens"] - text_only["usage"]["prompt_tokens"]
    expect(grown >= image_tokens, f"the image added {grown} prompt tokens, fewer than its {image_tokens} image tokens")
    expect(fingerprint(with_first) == fingerprint(again), f"the same image twice gave different {what}")
    expect(fingerprint(with_first) != fingerprint(with_second),
           f"two different images gave the same {what}: the model does not see the image")
    return (f"; an image_url (PNG data: URL): 200, prompt {text_only['usage']['prompt_tokens']} → "
            f"{with_first['usage']['prompt_tokens']} tokens (+{grown} for the image, at least {image_tokens} "
            f"expected), two images give different {what}, one image twice the same")


def verify_videos(session: SmokeSession, model: str) -> str:
    """A family that takes video: a generated MP4 as a `video_url` data: URL gets 200, the prompt grows, and the
    model sees the video: two videos give different prompt logprobs, one video twice the same."""
    moving, stripes = smoke_videos()
    text_only = ask_with_image(session, model, None)
    with_first = ask_with_image(session, model, moving, "video")
    again = ask_with_image(session, model, moving, "video")
    with_second = ask_with_image(session, model, stripes, "video")
    grown = with_first["usage"]["prompt_tokens"] - text_only["usage"]["prompt_tokens"]
    expect(grown > 2, f"the video added {grown} prompt tokens")
    expect(prompt_fingerprint(with_first) == prompt_fingerprint(again), "the same video twice gave different prompt logprobs")
    expect(prompt_fingerprint(with_first) != prompt_fingerprint(with_second),
           "two different videos gave the same prompt logprobs: the model does not see the video")
    return (f"; a video_url (MP4 data: URL): 200, prompt {text_only['usage']['prompt_tokens']} → "
            f"{with_first['usage']['prompt_tokens']} tokens, two videos give different prompt logprobs, one video "
            "twice the same")


def takes_video(recipe_key: str) -> bool:
    return family_of(recipe_key).modalities.takes("video")


def image_tokens_per_image(recipe_key: str) -> int | None:
    """Image tokens one image becomes in the smoke model at least (model.yaml modalities.smoke_processor's
    image_seq_length, else 1); None where the family takes no images."""
    family = family_of(recipe_key)
    if not family.modalities.takes("image"):
        return None
    return int(family.modalities.smoke_processor.get("image_seq_length", 1))


def verify_vllm(session: SmokeSession) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=session.base_url + "/v1", api_key="EMPTY", timeout=300, max_retries=0)
    models = [m.id for m in client.models.list().data]
    names = expected_names(session.recipe_key)
    expect(models == names, f"/v1/models lists {models}, not {names} (the folder's name, the hub ids and upstream's names)")
    upstream = names[-1]
    answer = client.chat.completions.create(
        model=upstream, messages=[SYSTEM, {"role": "user", "content": "你好，请介绍一下你自己"}],
        max_tokens=16, temperature=0.7)
    message = answer.choices[0].message
    # The qwen3 parser moves thinking out of `content`: to `reasoning` (vLLM >= 0.10) or
    # `reasoning_content` (older). A random tiny model may never close </think>.
    reasoning = getattr(message, "reasoning", None) or getattr(message, "reasoning_content", None) or ""
    text = (message.content or "") + reasoning
    tokens = answer.usage.completion_tokens if answer.usage else 0
    answered = (f"{len(message.content or '')} chars of content + {len(reasoning)} of reasoning ({tokens} tokens)")
    answered += thinking_in_content(session.recipe_key, message.content or "", reasoning)
    if not text.strip():
        # gpt-oss: vLLM renders the prompt and parses the output with harmony's own o200k encoding, so the tiny
        # model spans those 201,088 ids while its tokenizer has ~1,000: a random model's tokens are neither
        # harmony messages nor text. A random model may also stop at once on one of the family's stop tokens. What
        # can be checked is that the engine generated tokens, in chat and in plain completions.
        expect(tokens > 0, f"chat completion came back empty: {answer!r}"[:300])
        raw = client.completions.create(model=upstream, prompt="你好，请介绍一下你自己", max_tokens=16, temperature=0.7)
        generated = raw.usage.completion_tokens if raw.usage else 0
        expect(generated > 0, f"chat completion and completion came back empty: {raw!r}"[:300])
        answered = (f"{tokens} tokens, no text (finish_reason {answer.choices[0].finish_reason}: a random model's "
                    f"tokens made no text, a stop token first or, gpt-oss, no harmony message); /v1/completions: "
                    f"{generated} tokens")
    version = requests.get(session.base_url + "/version", timeout=10)
    api_version = version.json().get("version", "") if version.status_code == 200 else ""
    image_tokens = image_tokens_per_image(session.recipe_key)
    images = verify_images(session, upstream, image_tokens) if image_tokens is not None else ""
    if takes_video(session.recipe_key):
        images += verify_videos(session, upstream)
    return (f"served by {served_by(session.logs(), api_version)}{parallel_workers(session, answer.system_fingerprint)} "
            f"as {', '.join(names)}: chat completion to {upstream!r} (system + user) answered {answered}{images}")


def thinking_in_content(recipe_key: str, content: str, reasoning: str) -> str:
    """Where the family's vLLM parser keeps the thinking in `content` (model.yaml reasoning.vllm_in_content,
    MiniMax-M2's append_think): the reply's content starts with the start marker the template pre-filled, and nothing
    went to `reasoning`."""
    from selfllm_runtime.metadata import load_family, load_recipe

    from ..layout import RECIPES_DIR

    marks = load_family(RECIPES_DIR / load_recipe(RECIPES_DIR / recipe_key).model).reasoning
    if marks is None or not marks.vllm_in_content:
        return ""
    expect(content.startswith(marks.start) and not reasoning,
           f"the parser should keep the thinking in content from {marks.start!r}: content {content[:80]!r}, "
           f"reasoning {reasoning[:80]!r}")
    return f", content starting with {marks.start!r} (the thinking stays in content)"


def parallel_workers(session: SmokeSession, fingerprint: str | None) -> str:
    """', tensor parallel 2 (system_fingerprint vllm-0.32.0-tp2-...)' where the recipe's smoke runs a layout across
    workers (recipe.yaml smoke.env TENSOR_PARALLEL_SIZE): vLLM's fingerprint names the size it really ran."""
    from selfllm_runtime.metadata import load_recipe

    from ..layout import RECIPES_DIR

    wanted = load_recipe(RECIPES_DIR / session.recipe_key).smoke.env.get("TENSOR_PARALLEL_SIZE")
    if wanted is None:
        return ""
    found = re.search(r"-tp(\d+)-", fingerprint or "")
    expect(found is not None and found[1] == wanted,
           f"the smoke asked for TENSOR_PARALLEL_SIZE={wanted}, but vLLM's system_fingerprint is {fingerprint!r}")
    return f", tensor parallel {wanted} (system_fingerprint {fingerprint})"


CHECK = SmokeCheck(
    command=start_on_smoke_model(),
    verify=verify_vllm,
    # The tiny model's context is 4096; vllm-cpu's KV cache is kept small (GiB) for a shared box.
    env={"MAX_MODEL_LEN": "1024",
         "VLLM_CPU_KVCACHE_SPACE": "1"},
    shm_size="1g",  # vLLM wants ~160 MiB of /dev/shm; Docker gives 64 MiB by default
    threads=None,  # vllm-cpu binds its OpenMP threads to cores itself
)
