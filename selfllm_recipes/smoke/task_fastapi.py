"""Smoke check of task `fastapi`: upstream's legacy API and the OpenAI-compatible /v1 API over HTTP."""
from __future__ import annotations

import base64
from collections.abc import Callable

import requests

from .checks import family_of, SYSTEM, SmokeCheck, SmokeSession, expect, generated_png, smoke_videos, start_on_smoke_model




def verify_legacy(session: SmokeSession) -> str:
    body = {"prompt": "你好，请介绍一下你自己", "history": [], "max_length": 24, "top_p": 0.8, "temperature": 0.7}
    answer = requests.post(session.base_url + "/", json=body, timeout=120)
    expect(answer.status_code == 200, f"POST / answered HTTP {answer.status_code}: {answer.text[:200]}")
    data = answer.json()
    missing = {"response", "history", "status", "time"} - data.keys()
    expect(not missing, f"POST / response lacks {sorted(missing)}")
    expect(isinstance(data["response"], str) and data["response"].strip() != "", "POST / gave an empty response")
    if "think" in data:  # a reasoning family: the text is split into think + answer (a random model may never close it)
        expect((data["think"] + data["answer"]).strip() != "", "POST / gave an empty think and answer")
    expect(data["status"] == 200 and isinstance(data["history"], list) and len(data["history"]) == 1,
           f"POST / gave status={data['status']!r}, history={data['history']!r}")
    return f"POST / answered {len(data['response'])} chars"


def verify_openai(session: SmokeSession) -> str:
    """The official `openai` client, whole and streamed, then one malformed request and a good one."""
    import openai

    api = openai.OpenAI(base_url=session.base_url + "/v1", api_key="dummy", max_retries=0, timeout=120)
    models = [m.id for m in api.models.list().data]
    expect(len(models) == 1, f"GET /v1/models listed {models}")
    messages = [{"role": "user", "content": "你好，请介绍一下你自己"}]
    whole = api.chat.completions.create(model=models[0], messages=messages, max_tokens=16, seed=0,
                                        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    # A reasoning family's output goes to reasoning_content until the model closes the block (a random
    # model of R1's template, which opens it in the prompt, may never do so): both count as text.
    message = whole.choices[0].message
    content = (message.content or "") + (getattr(message, "reasoning_content", None) or "")
    expect(content.strip() != "", f"/v1/chat/completions gave {message!r}")
    expect(whole.usage is not None and 1 <= whole.usage.completion_tokens <= 16, f"usage {whole.usage!r}")
    chunks = list(api.chat.completions.create(model=models[0], messages=messages, max_tokens=16, stream=True,
                                              stream_options={"include_usage": True}))
    streamed = "".join((c.choices[0].delta.content or "")
                       + (getattr(c.choices[0].delta, "reasoning_content", None) or "")
                       for c in chunks if c.choices)
    expect(streamed.strip() != "", "the stream carried no text")
    expect(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1,
           "the stream's last chunk has no usage")
    bad = requests.post(session.base_url + "/v1/chat/completions", data="{not json",
                        headers={"Content-Type": "application/json"}, timeout=30)
    expect(400 <= bad.status_code < 500, f"malformed JSON answered HTTP {bad.status_code}")
    expect(set(bad.json().get("error", {})) >= {"message", "type", "param", "code"},
           f"malformed JSON got a non-OpenAI error body: {bad.text[:200]}")
    # with a system message: families without a system role (model.yaml system_role) must merge it, not fail
    again = api.chat.completions.create(model=models[0], messages=[SYSTEM, *messages], max_tokens=4)
    expect(again.choices[0].finish_reason in {"stop", "length"}, "a good request (with a system message) after a bad one failed")
    return (f"/v1 served {models[0]}: {len(content)} chars, {len(chunks)} stream chunks, bad JSON → {bad.status_code}, "
            "then system + user answered")


def png_data_url(width: int, height: int, pixel: Callable[[int, int], tuple[int, int, int]]) -> str:
    """A generated RGB PNG as a data: URL."""
    return "data:image/png;base64," + base64.b64encode(generated_png(width, height, pixel)).decode()


def expect_seeded_fingerprint(kind: str, one: dict, again: dict, other: dict, undecodable: requests.Response) -> None:
    """A seeded sampled reply fingerprints what the model saw: the same image (video) twice gives the same reply,
    another gives another; an undecodable one is a 400 in plain words. The reply counts with its reasoning: a family
    that thinks by default (Qwen3.5) spends its 16 tokens inside <think>."""
    replies = [(a["choices"][0]["message"].get("reasoning_content") or "") + (a["choices"][0]["message"]["content"] or "")
               for a in (one, again, other)]
    expect(replies[0] == replies[1], f"the same {kind} twice gave two replies: {replies[:2]}")
    expect(replies[0] != replies[2], f"two different {kind}s gave the same reply: {replies[0]!r}")
    expect(undecodable.status_code == 400 and f"not a{'n' if kind == 'image' else ''} {kind}" in
           undecodable.json()["error"]["message"],
           f"an undecodable {kind} answered HTTP {undecodable.status_code}: {undecodable.text[:200]}")


def verify_images(session: SmokeSession) -> str:
    """A family that takes images (model.yaml modalities): a generated PNG as a data: URL answers 200 and adds
    the image's tokens to the prompt count; a seeded sampled reply fingerprints the image (the same image twice:
    the same reply; another image: another). A text-only family: 400 in plain words."""
    family = family_of(session.recipe_key)
    url = session.base_url + "/v1/chat/completions"
    gradient = png_data_url(48, 32, lambda x, y: (x * 5, y * 7, 128))
    stripes = png_data_url(48, 32, lambda x, y: (255, 255, 255) if (x // 6) % 2 else (0, 0, 0))

    def ask(*images: str) -> requests.Response:
        content = [*({"type": "image_url", "image_url": {"url": image}} for image in images),
                   {"type": "text", "text": "What is in the picture?"}]
        return requests.post(url, json={"messages": [{"role": "user", "content": content}], "max_tokens": 16,
                                        "temperature": 1.0, "top_p": 1.0, "seed": 7}, timeout=120)

    sdk_status, sdk = sdk_image_request(session, gradient)
    if not family.modalities.takes("image"):
        refused = ask(gradient)
        message = refused.json().get("error", {}).get("message", "") if refused.status_code == 400 else refused.text
        expect(refused.status_code == 400 and "takes text only" in message,
               f"an image for text-only {family.display_name} answered HTTP {refused.status_code}: {message[:200]}")
        expect(sdk_status == 400 and "takes text only" in sdk, f"the openai client's image request: {sdk_status} {sdk}")
        return f"image → 400 ({message.split(': ', 1)[-1]}), the openai client's too"
    answers = [ask(), ask(gradient), ask(gradient), ask(stripes), ask(gradient, stripes)]
    for answer in answers:
        expect(answer.status_code == 200, f"an image request answered HTTP {answer.status_code}: {answer.text[:300]}")
    text, one, again, other, two = (a.json() for a in answers)
    tokens = [a["usage"]["prompt_tokens"] for a in (text, one, two)]
    per_image = tokens[1] - tokens[0]
    # The second image adds as many tokens as the first, give or take the template's separator text, which the
    # tokenizer merges with its neighbours (Gemma-4: "\n\n" after an image, "\n\n\n\n" between two: ±1 token).
    expect(per_image > 2 and abs(tokens[2] - tokens[1] - per_image) <= 2, f"prompt tokens text/1/2 images: {tokens}")
    expect_seeded_fingerprint("image", one, again, other, ask("data:image/png;base64,AAAA"))
    expect(sdk_status == 200 and sdk == str(tokens[1]),
           f"the openai client's image request: {sdk_status}, prompt tokens {sdk} (the same request by HTTP: {tokens[1]})")
    return (f"images: prompt tokens {tokens[0]} → {tokens[1]} (1 image) → {tokens[2]} (2), +{per_image} an image "
            f"(the openai client's request counts the same {sdk}); seeded replies: same image equal, other image "
            "different; undecodable → 400")


def sdk_image_request(session: SmokeSession, image: str) -> tuple[int, str]:
    """One image request through the official `openai` client: (200, its usage.prompt_tokens) or (status, message)."""
    import openai

    api = openai.OpenAI(base_url=session.base_url + "/v1", api_key="dummy", max_retries=0, timeout=120)
    model = api.models.list().data[0].id
    try:
        answer = api.chat.completions.create(model=model, max_tokens=4, seed=7, temperature=1.0, top_p=1.0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                         {"type": "text", "text": "What is in the picture?"}]}])
    except openai.APIStatusError as exc:
        return exc.status_code, exc.message  # "Error code: 400 - {'error': {'message': ...}}"
    return 200, str(answer.usage.prompt_tokens if answer.usage else None)


def verify_videos(session: SmokeSession) -> str:
    """A family that takes video (model.yaml modalities): a generated MP4 as a `video_url` data: URL answers 200 and
    adds its frames' tokens to the prompt count; a seeded sampled reply fingerprints the video (the same video
    twice: the same reply; another: another); an undecodable one is a 400. A family that takes images but not
    video: 400 in plain words. Text-only families: nothing here (their image refusal says it)."""
    family = family_of(session.recipe_key)
    if not family.modalities.takes("image"):
        return ""
    url = session.base_url + "/v1/chat/completions"
    moving, stripes = smoke_videos()

    def ask(video: str | None) -> requests.Response:
        content = [*([{"type": "video_url", "video_url": {"url": video}}] if video else []),
                   {"type": "text", "text": "What happens in the video?"}]
        return requests.post(url, json={"messages": [{"role": "user", "content": content}], "max_tokens": 16,
                                        "temperature": 1.0, "top_p": 1.0, "seed": 7}, timeout=120)

    if not family.modalities.takes("video"):
        refused = ask(moving)
        message = refused.json().get("error", {}).get("message", "") if refused.status_code == 400 else refused.text
        expect(refused.status_code == 400 and "video input needs" in message,
               f"a video for {family.display_name} (no video) answered HTTP {refused.status_code}: {message[:200]}")
        return f"; video → 400 ({message.split(': ', 1)[-1]})"
    answers = [ask(None), ask(moving), ask(moving), ask(stripes)]
    for answer in answers:
        expect(answer.status_code == 200, f"a video request answered HTTP {answer.status_code}: {answer.text[:300]}")
    text, one, again, other = (a.json() for a in answers)
    added = one["usage"]["prompt_tokens"] - text["usage"]["prompt_tokens"]
    expect(added > 2, f"the video added {added} prompt tokens")
    expect_seeded_fingerprint("video", one, again, other, ask("data:video/mp4;base64,AAAAIGZ0eXBpc29t"))
    return (f"; video (MP4, 8 frames → sampled): prompt tokens {text['usage']['prompt_tokens']} → "
            f"{one['usage']['prompt_tokens']} (+{added}); seeded replies: same video equal, other video different; "
            "undecodable → 400")


def verify_fastapi(session: SmokeSession) -> str:
    return f"{verify_legacy(session)}; {verify_openai(session)}; {verify_images(session)}{verify_videos(session)}"


CHECK = SmokeCheck(command=start_on_smoke_model(), verify=verify_fastapi)
