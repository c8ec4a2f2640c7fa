"""Images through task `fastapi` (media.py, openai_api.engine_messages, the engine's processor, image rows in a
batch) on the tiny Gemma-3 (Gemma3ForConditionalGeneration with a tiny SigLIP tower) and the tiny Qwen3, on CPU."""
from __future__ import annotations

import base64
import http.server
import io
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import fastapi_client

from fastapi.testclient import TestClient

URL = "/v1/chat/completions"
PROMPT = "Describe the picture."


def png(color: tuple[int, int, int], size: tuple[int, int] = (64, 48)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


RED, BLUE = data_url(png((255, 0, 0))), data_url(png((0, 0, 255)))


@pytest.fixture(scope="module")
def gemma(tiny_recipe) -> Any:
    from selfllm_runtime.chat_engine import ChatEngine

    return ChatEngine(*tiny_recipe("gemma3/fastapi"))


@pytest.fixture(scope="module")
def client(gemma) -> Iterator[TestClient]:
    with fastapi_client(gemma) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def text_client(engine) -> Iterator[TestClient]:
    with fastapi_client(engine) as test_client:
        yield test_client


def ask(client: TestClient, content: Any, **body: Any) -> Any:
    return client.post(URL, json={"messages": [{"role": "user", "content": content}], "max_tokens": 16,
                                  "temperature": 1.0, "top_p": 1.0, "seed": 7, **body})


def refused(answer: Any) -> str:
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"], error
    return error["message"]


# ----------------------------------------------------------------------------- the engine and the API

def test_the_smoke_model_has_a_tiny_vision_tower_that_carries_the_image(gemma):
    vision = sum(p.numel() for name, p in gemma.model.named_parameters() if "vision_tower" in name)
    total = sum(p.numel() for p in gemma.model.parameters())
    assert type(gemma.model).__name__ == "Gemma3ForConditionalGeneration" and gemma.takes_images
    assert 0 < vision < total < 1_000_000, (vision, total)
    assert gemma.model.config.vision_config.image_size == 64 and gemma.processor.image_seq_length == 4
    assert gemma.model.model.multi_modal_projector.mm_input_projection_weight.detach().abs().sum() > 0


def test_an_image_adds_its_tokens_to_the_prompt_count(client, gemma):
    text = ask(client, PROMPT).json()["usage"]["prompt_tokens"]
    one = ask(client, [image_part(RED), {"type": "text", "text": PROMPT}])
    two = ask(client, [image_part(RED), image_part(BLUE), {"type": "text", "text": PROMPT}])
    assert one.status_code == two.status_code == 200, (one.text, two.text)
    # each image: its placeholder, expanded by the processor ("\n\n<start_of_image>" + 4 soft tokens + ...)
    # The "\n\n" around it can merge with the template's own newlines into one token ("\n\n\n" is a single token
    # of Gemma's vocabulary, and of the tiny model's): up to two tokens fewer than the sequence alone.
    per_image = len(gemma.tokenizer(gemma.processor.full_image_sequence, add_special_tokens=False)["input_ids"])
    first = one.json()["usage"]["prompt_tokens"] - text
    second = two.json()["usage"]["prompt_tokens"] - text - first
    assert per_image - 2 <= first <= per_image and per_image - 2 <= second <= per_image, (text, first, second, per_image)


def test_the_answer_depends_on_the_image(client):
    """A seeded sampled reply is the image's fingerprint: the same image twice gives the same reply, two
    images two replies (the tiny model's image projection is not left at transformers' zeros)."""
    def reply(url: str) -> str:
        answer = ask(client, [image_part(url), {"type": "text", "text": PROMPT}])
        assert answer.status_code == 200, answer.text
        return answer.json()["choices"][0]["message"]["content"]

    assert reply(RED) == reply(RED)
    assert reply(RED) != reply(BLUE)


def test_images_in_assistant_history_and_streamed(client):
    messages = [{"role": "user", "content": [image_part(RED), {"type": "text", "text": PROMPT}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Red."}, image_part(BLUE)]},
                {"role": "user", "content": "And now?"}]
    answer = client.post(URL, json={"messages": messages, "max_tokens": 4, "stream": True,
                                    "stream_options": {"include_usage": True}})
    assert answer.status_code == 200 and answer.text.rstrip().endswith("data: [DONE]"), answer.text


@pytest.mark.parametrize(("content", "words"), [
    ([image_part("data:image/png;base64,AAAA")], "content[0]: the data is not an image"),
    ([image_part("data:text/plain;base64,aGk=")], "holds text/plain, not an image"),
    ([image_part("file:///etc/passwd")], "the scheme file: is not read"),
    ([image_part("/etc/passwd")], "a local path is not read"),
    ([image_part("http://127.0.0.1:9/x.png")], "127.0.0.1 is a loopback, private or link-local address"),
    ([image_part("http://169.254.169.254/latest")], "link-local address"),
    ([{"type": "text", "text": "x"}] + [image_part(RED)] * 5, "content[5]: more than 4 images in one request"),
    ([{"type": "video_url", "video_url": {"url": "https://example.com/a.mp4"}}],
     "Gemma-3 takes text and image only; video input needs"),
])
def test_bad_media_is_a_plain_400(client, content, words):
    assert words in refused(ask(client, content))


def test_an_image_too_large_is_refused_and_a_large_one_scaled_down(client, gemma):
    from selfllm_runtime.media import decode_image

    huge = "data:image/png;base64," + "A" * (11 * 2**20 // 3 * 4)
    assert "above the limit of 10.0 MiB (MEDIA_MAX_IMAGE_BYTES)" in refused(ask(client, [image_part(huge)]))
    assert ask(client, [image_part(data_url(png((9, 9, 9), (2000, 1000))))]).status_code == 200
    scaled = decode_image(png((9, 9, 9), (2000, 1000)), 802816)
    assert scaled.width * scaled.height <= 802816 and abs(scaled.width / scaled.height - 2) < 0.01


def test_an_image_in_a_system_message_is_refused(client):
    messages = [{"role": "system", "content": [image_part(RED)]}, {"role": "user", "content": "hi"}]
    message = refused(client.post(URL, json={"messages": messages}))
    assert message.startswith("messages[0].content[0]: images go in user (or assistant) messages")


def test_a_text_family_refuses_an_image_in_plain_words(text_client):
    answer = text_client.post(URL, json={"messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}, image_part(RED)]}]})
    assert refused(answer) == ("messages[0].content[1]: Qwen3 takes text only; image input needs a "
                               "vision-language recipe such as gemma3")
    assert answer.json()["error"]["param"] == "messages.0.content.1"


def test_image_rows_batch_as_they_answer_alone(gemma):
    """Two image requests of different lengths in one generate call give each the tokens it gets alone."""
    from selfllm_runtime.batching import Job

    def job(messages: list[dict[str, Any]]) -> Job:
        prompt = gemma.encode(messages)
        return Job(prompt.ids, 6, 0.0, 1.0, streaming=False, inputs=prompt.inputs)

    from selfllm_runtime.media import decode_image

    red, blue = decode_image(png((255, 0, 0)), 10**6), decode_image(png((0, 0, 255), (30, 80)), 10**6)
    first = [{"role": "user", "content": [{"type": "image", "image": red}, {"type": "text", "text": PROMPT}]}]
    second = [{"role": "user", "content": [{"type": "image", "image": blue}, {"type": "image", "image": red},
                                           {"type": "text", "text": "Hi"}]}]
    alone = []
    for messages in (first, second):
        single = job(messages)
        gemma.scheduler._run([single])
        alone.append(single.tokens)
    together = [job(first), job(second)]
    assert together[0].group == together[1].group  # one generate call
    gemma.scheduler._run(together)
    assert [j.tokens for j in together] == alone


def test_continuous_batching_refuses_images_before_it_starts():
    from selfllm_runtime.batching import Job
    from selfllm_runtime.continuous import ContinuousScheduler, ImagesUnsupported

    scheduler = ContinuousScheduler(object(), [0], 0)
    with pytest.raises(ImagesUnsupported, match="image and video input need BATCHING=static"):
        scheduler.submit(Job([1, 2], 4, 0.0, 1.0, inputs={"pixel_values": object()}))
    assert scheduler.manager is None


# ----------------------------------------------------------------------------- media.py on its own

def settings_for(**given: Any) -> Any:
    from selfllm_runtime.settings import FastapiSettings

    return FastapiSettings(**given)


@pytest.mark.parametrize(("address", "public"), [
    ("8.8.8.8", True), ("2606:4700::1111", True), ("127.0.0.1", False), ("10.1.2.3", False), ("192.168.0.1", False),
    ("169.254.169.254", False), ("::1", False), ("fe80::1", False), ("::ffff:127.0.0.1", False), ("100.64.0.1", False),
    ("0.0.0.0", False), ("224.0.0.1", False),
])
def test_which_addresses_are_public(address, public):
    from selfllm_runtime.media import is_public

    assert is_public(address) is public


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    """A local HTTP server: /red.png, /big.png (3 MiB of PNG header + padding), /redirect → /red.png."""
    red, big = png((255, 0, 0)), png((1, 2, 3)) + b"\0" * (3 * 2**20)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "/red.png")
                self.end_headers()
                return
            body = {"/red.png": red, "/big.png": big}.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_downloads_with_private_urls_allowed(image_server):
    from selfllm_runtime.media import MediaError, load_image

    allowed = settings_for(media_allow_private_urls=True, media_max_image_bytes=2**20)
    assert load_image(image_server + "/red.png", allowed).getpixel((0, 0)) == (255, 0, 0)
    assert load_image(image_server + "/redirect", allowed).size == (64, 48)
    with pytest.raises(MediaError, match="above the limit of 1.0 MiB"):
        load_image(image_server + "/big.png", allowed)
    with pytest.raises(MediaError, match="answered HTTP 404"):
        load_image(image_server + "/missing.png", allowed)
    with pytest.raises(MediaError, match="loopback, private or link-local"):
        load_image(image_server + "/red.png", settings_for())


def test_the_settings_follow_model_yaml(tiny_recipe):
    from selfllm_runtime.settings import FastapiSettings, explain

    gemma_context = tiny_recipe("gemma3/fastapi")[0]
    rows = {row[0]: row for row in explain(FastapiSettings, gemma_context.recipe, gemma_context.family, env={})}
    assert rows["MEDIA_MAX_IMAGES"][1:] == ("4", "model.yaml")
    assert rows["MEDIA_MAX_IMAGE_PIXELS"][1:] == ("802816", "model.yaml")
    overridden = gemma_context.settings(FastapiSettings, env={"MEDIA_MAX_IMAGES": "2"})
    assert overridden.media_max_images == 2
    qwen = tiny_recipe("qwen3/fastapi")[0]
    assert not any(row[0].startswith("MEDIA_") for row in explain(FastapiSettings, qwen.recipe, qwen.family, env={}))


def test_the_schema_advertises_reasoning_effort_levels_only_where_a_family_has_them():
    from fastapi import FastAPI

    from selfllm_recipes.layout import RECIPES_DIR
    from selfllm_runtime.context import load_context
    from selfllm_runtime.tasks.openai_api import family_openapi
    from selfllm_runtime.tasks.openai_schema import ChatCompletionRequest

    def chat(body):  # type: ignore[no-untyped-def]
        pass

    chat.__annotations__ = {"body": ChatCompletionRequest}  # this module's annotations are strings
    app = FastAPI()
    app.post("/v1/chat/completions")(chat)

    for recipe, levels in (("gpt-oss/fastapi", ["low", "medium", "high"]), ("qwen3/fastapi", None)):
        family = load_context(RECIPES_DIR / recipe).family
        app.openapi_schema = None
        request = family_openapi(app.openapi(), family, False)["components"]["schemas"]["ChatCompletionRequest"]
        effort = request["properties"].get("reasoning_effort")
        assert (effort["anyOf"][0]["enum"] if effort else None) == levels


# ----------------------------------------------------------------------------- LangChain (ChatSelfLLM)

def test_langchain_human_message_images(gemma, engine):
    """Multimodal HumanMessage content through ChatSelfLLM: OpenAI's image_url block and LangChain's standard
    base64 image block reach the model (the reply follows the image); a text family refuses in plain words."""
    pytest.importorskip("langchain_core")
    from langchain_core.messages import HumanMessage

    from selfllm_runtime.lc.chat_model import ChatSelfLLM

    llm = ChatSelfLLM(engine=gemma, max_new_tokens=16, temperature=1.0, top_p=1.0, seed=7)

    def reply(block: dict[str, Any]) -> Any:
        return llm.invoke([HumanMessage(content=[block, {"type": "text", "text": PROMPT}])])

    red = reply(image_part(RED))
    standard = reply({"type": "image", "base64": RED.split(",", 1)[1], "mime_type": "image/png"})
    blue = reply(image_part(BLUE))
    text = llm.invoke([HumanMessage(content=PROMPT)])
    assert red.content == standard.content != blue.content
    assert red.usage_metadata["input_tokens"] > text.usage_metadata["input_tokens"]
    with pytest.raises(ValueError, match=r"^image 1 \(user message\): the data is not an image"):
        reply(image_part("data:image/png;base64,AAAA"))
    with pytest.raises(ValueError, match="Qwen3 takes text only; image input needs a vision-language recipe"):
        ChatSelfLLM(engine=engine, max_new_tokens=4).invoke([HumanMessage(content=[image_part(RED)])])


def test_langchain_selftest_carries_an_image(gemma, engine):
    """LANGCHAIN_SELFTEST's image part (what the langchain smoke check reads): Gemma-3 counts the image's tokens and
    its seeded reply follows the image, the same through both block shapes; Qwen3 refuses in plain words."""
    pytest.importorskip("langchain_core")
    from selfllm_runtime.lc.chat_model import ChatSelfLLM
    from selfllm_runtime.tasks.langchain_app import image_selftest

    seen = image_selftest(ChatSelfLLM(engine=gemma))
    assert seen["ok"] and seen["takes_images"] and seen["input_tokens"][1] > seen["input_tokens"][0]
    assert seen["same_image_same_reply"] and seen["other_image_other_reply"], seen["replies"]
    refused = image_selftest(ChatSelfLLM(engine=engine))
    assert refused["ok"] and not refused["takes_images"] and "Qwen3 takes text only" in refused["refused"]


# ----------------------------------------------------------------------------- the vision families' language models

def test_continuous_batching_refuses_qwen35_hybrid_layers_before_the_weights_load(tmp_path):
    """Qwen3.5's Gated-DeltaNet layers have no paged cache in transformers' continuous batching: BATCHING=continuous
    stops at the start in one line naming the setting (it used to fail at the first request: "Invalid layer type");
    Qwen2-VL's full-attention language model passes the same check."""
    from selfllm_recipes.layout import RECIPES_DIR
    from selfllm_runtime.chat_engine import ChatEngine
    from selfllm_runtime.context import load_context
    from selfllm_runtime.continuous import check_continuous, unpaged_layer_types
    from selfllm_runtime.settings import EngineSettings, SettingsError
    from selfllm_runtime.smoke_model import tiny_config

    def config_of(recipe: str) -> Any:
        family = load_context(RECIPES_DIR / recipe).family
        return tiny_config(family.architecture, family.smoke, family.smoke.vocab_size, pad_token_id=0,
                           bos_token_id=None, eos_token_id=0)[1]

    qwen35 = config_of("qwen3.5/fastapi")
    assert unpaged_layer_types(qwen35) == ["linear_attention"]
    assert unpaged_layer_types(config_of("qwen2-vl/fastapi")) == []
    check_continuous(config_of("qwen2-vl/fastapi"))
    qwen35.save_pretrained(tmp_path)  # a config alone: the check runs before any weight is read
    with pytest.raises(SettingsError, match=r"BATCHING=continuous: .*linear_attention layers: use BATCHING=static"):
        ChatEngine(load_context(RECIPES_DIR / "qwen3.5/fastapi"), tmp_path, EngineSettings(batching="continuous"))


@pytest.mark.parametrize(("recipe", "patch", "tokens"), [("qwen2-vl/fastapi", 14, 6), ("qwen3.5/fastapi", 16, 6),
                                                         ("glm4.1v/fastapi", 14, 6)])
def test_the_tiny_image_processor_follows_the_vision_config_and_model_yaml(recipe, patch, tokens):
    """The smoke model's image processor takes its patch and merge sizes from the tiny vision config and its pixel
    bounds from model.yaml (modalities.smoke_image_processor): the smoke checks' 48 × 32 PNG is a few tokens."""
    import transformers
    from PIL import Image
    from selfllm_recipes.layout import RECIPES_DIR
    from selfllm_runtime.context import load_context
    from selfllm_runtime.smoke_model import auto_class, matched_to_vision, tiny_config
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    family = load_context(RECIPES_DIR / recipe).family
    config = tiny_config(family.architecture, family.smoke, family.smoke.vocab_size, pad_token_id=0,
                         bos_token_id=None, eos_token_id=0)[1]
    processor_class = auto_class(IMAGE_PROCESSOR_MAPPING_NAMES, config.model_type)
    processor = matched_to_vision(processor_class, config.vision_config, family.modalities.smoke_image_processor)
    assert isinstance(processor, transformers.ImageProcessingMixin)
    assert (processor.patch_size, processor.merge_size) == (patch, config.vision_config.spatial_merge_size) == (patch, 2)
    assert dict(processor.size) == family.modalities.smoke_image_processor["size"]
    grid = processor(images=[Image.new("RGB", (48, 32))], return_tensors="pt")["image_grid_thw"]
    assert int(grid.prod()) // processor.merge_size ** 2 == tokens
