"""Smoke check of task `sglang`: `/v1/models` lists the model under upstream's short name (SGLang serves one name), the
official `openai` client asks for a chat completion by that name, whole and streamed, a malformed request is a 400,
and for a reasoning family SGLang's parser moves the thinking out of `content`: an answer constrained (SGLang's
`regex`) to `<think>…</think>…` comes back split into `reasoning_content` and `content` (and whole with
`separate_reasoning: false`); a family whose parser keeps the thinking in `content` (model.yaml
`reasoning.sglang_in_content`: MiniMax-M2's minimax-append-think) gets it there, the template's pre-filled start
marker put back in front, whole and streamed, with no `reasoning_content`. A family that takes images gets an OpenAI
`image_url` (a generated PNG): 200, the prompt grows by the image's tokens, and the model sees it (two images, different
first-token logprobs). The detail names the build
that really served, read from the container's start log: on an engine without GPU that is the recipe's CPU
variant (SGLang's CPU engine)."""
from __future__ import annotations

import re

import requests

from .checks import SMOKE_MODEL_DIR, SYSTEM, SmokeCheck, SmokeSession, expect, family_of, recipe_context, start_on_smoke_model
from .task_vllm import image_tokens_per_image, verify_images

SERVING_LINE = re.compile(r"selfllm: serving with sglang (?P<version>\S+) on (?P<device>CPU|GPU)")
# What the constrained answer's thinking and answer are made of: short runs of ASCII letters, which any byte-level
# tokenizer spells.
THOUGHT, ANSWER = "[a-z]{3,8}", "[a-z]{3,8}"
MAX_TOKENS = 16


def served_by(logs: str) -> str:
    """'sglang 0.5.21 on CPU', from the runtime's start line."""
    found = SERVING_LINE.search(logs)
    expect(found is not None, "the container never logged which SGLang build it serves with")
    return f"sglang {found['version']} on {found['device']}"


def expected_name(recipe_key: str) -> str:
    """The name the recipe serves the smoke model under (MODEL_PATH=SMOKE_MODEL_DIR, no SERVED_MODEL_NAME):
    upstream's short name, the last of model_source.served_names."""
    from selfllm_runtime.model_source import served_names
    from selfllm_runtime.settings import ModelSettings, resolve

    context = recipe_context(recipe_key)
    settings = resolve(ModelSettings, context.recipe, context.family, env={"MODEL_PATH": SMOKE_MODEL_DIR})
    return served_names(context.recipe, context.family, settings)[-1]


def reasoning_markers(recipe_key: str) -> tuple[str, str, str | None] | None:
    """(start, end, the chat template's thinking switch or None) of the family's thinking where SGLang moves it out of
    `content` (model.yaml reasoning.sglang_parser, not sglang_in_content), else None."""
    family = family_of(recipe_key)
    if family.reasoning is None or not family.reasoning.sglang_parser or family.reasoning.sglang_in_content:
        return None
    return family.reasoning.start, family.reasoning.end, family.thinking.template_kwarg if family.thinking else None


def verify_reasoning(session: SmokeSession, model: str, markers: tuple[str, str, str | None]) -> str:
    """An answer held by SGLang's constrained decoding (`regex`) to `<start>thought<end>answer`, as a random model
    would rarely close its thinking: the reasoning parser gives `reasoning_content` = the thought and `content` =
    the answer, while the same request with `separate_reasoning: false` gets the whole text in `content`. SGLang
    holds a thinking model to a grammar only after its thinking ends, so the request turns the family's thinking
    switch off (Qwen3's enable_thinking): the output is then constrained from its first token."""
    start, end, switch = markers
    pattern = f"{re.escape(start)}\\n{THOUGHT}\\n{re.escape(end)}\\n\\n{ANSWER}"
    request = {"model": model, "messages": [{"role": "user", "content": "1+1=?"}], "max_tokens": 48, "temperature": 0,
               "regex": pattern, **({"chat_template_kwargs": {switch: False}} if switch else {})}
    messages = []
    for separate in (True, False):
        response = requests.post(session.base_url + "/v1/chat/completions", timeout=300,
                                 json={**request, "separate_reasoning": separate})
        expect(response.status_code == 200, f"a constrained request got {response.status_code}: {response.text[:300]}")
        messages.append(response.json()["choices"][0]["message"])
    split, whole = messages
    thought, answer = (split.get("reasoning_content") or "").strip(), (split.get("content") or "").strip()
    expect(re.fullmatch(THOUGHT, thought) is not None and re.fullmatch(ANSWER, answer) is not None,
           f"the reasoning parser did not split {start}…{end}: reasoning_content={thought!r}, content={answer!r}")
    raw = whole.get("content") or ""
    expect(re.fullmatch(pattern, raw) is not None and thought in raw and answer in raw,
           f"separate_reasoning false: content {raw!r} is not the constrained text")
    return f"; {raw!r} split into reasoning_content {thought!r} and content {answer!r}"


# SGLang returns no prompt logprobs in chat completions: the first output token's top logprobs tell images apart.
TOP_LOGPROBS = {"logprobs": True, "top_logprobs": 5}


def output_fingerprint(answer: dict) -> tuple[tuple[str, float], ...]:
    """The first output token's top logprobs, rounded: what the model made of the prompt (SGLang returns no
    prompt logprobs in chat completions)."""
    content = (answer["choices"][0].get("logprobs") or {}).get("content") or []
    expect(bool(content) and bool(content[0].get("top_logprobs")), f"no top_logprobs came back: {str(answer)[:300]}")
    return tuple((entry["token"], round(entry["logprob"], 4)) for entry in content[0]["top_logprobs"])


def thinking_in_content(recipe_key: str, content: str, reasoning: str, streamed: str) -> str:
    """Where the family's SGLang parser keeps the thinking in `content` (sglang_in_content): the reply and the stream
    begin with the start marker the template pre-filled (the parser puts it back), and nothing is in
    reasoning_content. '' for the other families."""
    family = family_of(recipe_key)
    if family.reasoning is None or not family.reasoning.sglang_in_content:
        return ""
    start = family.reasoning.start
    expect(content.startswith(start) and streamed.startswith(start) and not reasoning,
           f"{family.reasoning.sglang_parser} should keep the thinking in content after {start!r}: content "
           f"{content[:40]!r}, stream {streamed[:40]!r}, reasoning_content {reasoning[:40]!r}")
    return f"; thinking kept in content after {start!r} ({family.reasoning.sglang_parser}), whole and streamed"


def verify_sglang(session: SmokeSession) -> str:
    from openai import OpenAI

    client = OpenAI(base_url=session.base_url + "/v1", api_key="EMPTY", timeout=300, max_retries=0)
    name = expected_name(session.recipe_key)
    models = [m.id for m in client.models.list().data]
    expect(models == [name], f"/v1/models lists {models}, not [{name!r}] (upstream's short name)")
    messages = [SYSTEM, {"role": "user", "content": "你好，请介绍一下你自己"}]
    # ignore_eos (SGLang's sampling extra): a random tiny model may draw a stop token first (measured: qwen3-moe
    # answered 0 chars); so every answer is MAX_TOKENS tokens and has text to check
    sampling = {"max_tokens": MAX_TOKENS, "temperature": 0.7, "extra_body": {"ignore_eos": True}}
    answer = client.chat.completions.create(model=name, messages=messages, **sampling)
    message = answer.choices[0].message
    reasoning = getattr(message, "reasoning_content", None) or ""
    tokens = answer.usage.completion_tokens if answer.usage else 0
    expect(tokens == MAX_TOKENS and ((message.content or "") + reasoning).strip() != "",
           f"chat completion: {tokens} tokens (asked {MAX_TOKENS}, ignore_eos), finish_reason "
           f"{answer.choices[0].finish_reason}, content {message.content!r}, reasoning_content {reasoning!r}")
    chunks = list(client.chat.completions.create(model=name, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **sampling))
    streamed = "".join((c.choices[0].delta.content or "") + (getattr(c.choices[0].delta, "reasoning_content", None) or "")
                       for c in chunks if c.choices)
    expect(streamed.strip() != "", "the stream carried no text")
    expect(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0, "the stream's last chunk has no usage")
    bad = requests.post(session.base_url + "/v1/chat/completions", json={"model": name}, timeout=60)
    expect(bad.status_code == 400, f"a request without messages answered HTTP {bad.status_code}: {bad.text[:200]}")
    markers = reasoning_markers(session.recipe_key)
    split = verify_reasoning(session, name, markers) if markers is not None else ""
    image_tokens = image_tokens_per_image(session.recipe_key)
    split += verify_images(session, name, image_tokens, output_fingerprint, TOP_LOGPROBS,
                           "first-token logprobs") if image_tokens is not None else ""
    split += thinking_in_content(session.recipe_key, message.content or "", reasoning, streamed)
    return (f"served by {served_by(session.logs())} as {name}: chat completion (system + user) answered "
            f"{len(message.content or '')} chars of content + {len(reasoning)} of reasoning ({tokens} tokens), "
            f"{len(chunks)} stream chunks, no messages → {bad.status_code}{split}")


CHECK = SmokeCheck(
    command=start_on_smoke_model(),
    verify=verify_sglang,
    # The tiny model's context is 4096; SGLang's CPU engine sizes its KV cache from MAX_MODEL_LEN's requests.
    env={"MAX_MODEL_LEN": "1024"},
    shm_size="1g",  # SGLang's scheduler and tokenizer processes share tensors through /dev/shm
    threads=None,  # SGLang's CPU engine binds its OpenMP threads to cores itself
)
