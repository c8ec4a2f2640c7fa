"""Task `webdemo`: the Streamlit page through AppTest (in-process, fast), then a real `streamlit run`
on 127.0.0.1 driven by the smoke check's headless browser (Debian's chromium)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import missing_prerequisite

from selfllm_runtime.chat_engine import ChatEngine, Completion
from selfllm_runtime.cli import HEALTH_TIMEOUT_S
from selfllm_runtime.context import load_context
from selfllm_runtime.smoke_model import make_smoke_model
from selfllm_runtime.tasks import webdemo

from streamlit.testing.v1 import AppTest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RECIPE_DIR = REPO / "recipes" / "qwen3" / "webdemo"


@pytest.fixture(scope="session")
def context():
    return load_context(RECIPE_DIR)


@pytest.fixture(scope="session")
def tiny_model(context, tmp_path_factory) -> Path:
    return make_smoke_model(context, tmp_path_factory.mktemp("webdemo-model"))


@pytest.fixture
def app(context, tiny_model, monkeypatch) -> AppTest:
    monkeypatch.setenv(webdemo.ENV_RECIPE_DIR, str(RECIPE_DIR))
    monkeypatch.setenv(webdemo.ENV_MODEL_DIR, str(tiny_model))
    at = AppTest.from_file(str(webdemo.APP_FILE), default_timeout=120).run()
    assert not at.exception, at.exception
    at.slider(key="max_length").set_value(16).run()
    return at


@pytest.fixture
def keyed_app(context, tiny_model, monkeypatch) -> AppTest:
    """The page of a server started with API_KEY=s3cret (not yet logged in)."""
    monkeypatch.setenv(webdemo.ENV_RECIPE_DIR, str(RECIPE_DIR))
    monkeypatch.setenv(webdemo.ENV_MODEL_DIR, str(tiny_model))
    monkeypatch.setenv("API_KEY", "s3cret")
    at = AppTest.from_file(str(webdemo.APP_FILE), default_timeout=120).run()
    assert not at.exception, at.exception
    return at


@pytest.fixture
def calls(monkeypatch) -> list:
    """Records the (messages, params) of every ChatEngine.stream call, then streams for real."""
    seen: list = []
    real = ChatEngine.stream

    def spy(self, messages, params):
        seen.append(([dict(m) for m in messages], params))
        return real(self, messages, params)

    monkeypatch.setattr(ChatEngine, "stream", spy)
    return seen


def test_command_and_env(context, tiny_model):
    command = webdemo.streamlit_command(context, context.settings(env={}))
    assert command[1:4] == ["-m", "streamlit", "run"] and command[4].endswith("webdemo_app.py")
    flags = dict(zip(command[5::2], command[6::2]))
    assert flags["--server.port"] == "6006" and flags["--server.address"] == "0.0.0.0"
    assert flags["--server.headless"] == "true" and flags["--browser.gatherUsageStats"] == "false"
    env = webdemo.streamlit_env(context, tiny_model, base={"PYTHONPATH": "/elsewhere"})
    assert env["RECIPE_DIR"] == str(RECIPE_DIR) and env["SELFLLM_MODEL_DIR"] == str(tiny_model.resolve())
    assert env["PYTHONPATH"].split(os.pathsep)[1:] == ["/elsewhere"]


def test_generation_params(context):
    params = webdemo.generation_params(context, 64, 0.3, 0.9, thinking=False)
    assert (params.max_new_tokens, params.temperature, params.top_p) == (64, 0.3, 0.9)
    assert params.template_kwargs == {"enable_thinking": False}
    assert webdemo.generation_params(context, 64, 0.3, 0.9, thinking=None).template_kwargs == {}


def test_page_controls(app, context):
    assert app.title[0].value == context.recipe.name
    assert [s.label for s in app.sidebar.slider] == ["max_length", "temperature", "top_p"]
    # the checkpoint's generation_config (the tiny model's gives none: 1.0 / 1.0, as /v1 uses)
    assert app.slider(key="temperature").value == pytest.approx(1.0)
    assert app.slider(key="top_p").value == pytest.approx(1.0)
    assert app.toggle(key="thinking").value is True  # Qwen3's enable_thinking defaults to on
    assert app.button(key="clear").label.startswith("清空对话")
    assert len(app.chat_input) == 1 and len(app.chat_message) == 0


def test_a_quantized_page_says_so_and_chats(tiny_model, monkeypatch, tmp_path):
    model = tmp_path / "model"  # another folder: its own cached engine, loaded with QUANTIZATION=4bit
    shutil.copytree(tiny_model, model)
    monkeypatch.setenv(webdemo.ENV_RECIPE_DIR, str(RECIPE_DIR))
    monkeypatch.setenv(webdemo.ENV_MODEL_DIR, str(model))
    monkeypatch.setenv("QUANTIZATION", "4bit")
    at = AppTest.from_file(str(webdemo.APP_FILE), default_timeout=120).run()
    assert not at.exception, at.exception
    assert at.caption[0].value.endswith(" · cpu · 4bit")
    at.slider(key="max_length").set_value(16).run()
    at.chat_input[0].set_value("你好").run()
    assert not at.exception, at.exception
    assert [m["role"] for m in at.session_state["messages"]] == ["user", "assistant"]


def test_no_login_without_api_key(app):
    assert len(app.text_input) == 0 and len(app.chat_input) == 1


def test_api_key_gate_shows_only_a_password_field(keyed_app):
    assert len(keyed_app.chat_input) == 0 and len(keyed_app.sidebar.slider) == 0
    assert len(keyed_app.caption) == 0 and len(keyed_app.chat_message) == 0  # not even the model's name
    from streamlit.proto.TextInput_pb2 import TextInput as TextInputProto

    field = keyed_app.text_input(key="login_key")
    assert field.proto.type == TextInputProto.PASSWORD and len(keyed_app.error) == 0


def test_api_key_gate_refuses_a_wrong_key(keyed_app):
    keyed_app.text_input(key="login_key").input("wrong").run()
    assert not keyed_app.exception, keyed_app.exception
    assert len(keyed_app.error) == 1 and len(keyed_app.chat_input) == 0 and len(keyed_app.sidebar.slider) == 0
    assert "authenticated" not in keyed_app.session_state


def test_api_key_gate_opens_the_chat_for_the_right_key(keyed_app, calls):
    keyed_app.text_input(key="login_key").input("s3cret").run()
    assert not keyed_app.exception, keyed_app.exception
    assert len(keyed_app.text_input) == 0 and len(keyed_app.error) == 0 and len(keyed_app.chat_input) == 1
    keyed_app.slider(key="max_length").set_value(16).run()
    keyed_app.chat_input[0].set_value("你好").run()  # the tab stays logged in across reruns
    assert not keyed_app.exception, keyed_app.exception
    assert [m["role"] for m in keyed_app.session_state["messages"]] == ["user", "assistant"]
    assert calls and calls[-1][0] == [{"role": "user", "content": "你好"}]


def test_chat_keeps_history_and_passes_sliders(app, calls):
    app.slider(key="temperature").set_value(0.0)
    app.slider(key="top_p").set_value(0.5)
    app.chat_input[0].set_value("你好，请介绍一下你自己").run()
    assert not app.exception, app.exception
    history = app.session_state["messages"]
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert history[0]["content"] == "你好，请介绍一下你自己"
    assert [m.name for m in app.chat_message] == ["user", "assistant"]
    messages, params = calls[-1]
    assert messages == [{"role": "user", "content": "你好，请介绍一下你自己"}]
    assert (params.max_new_tokens, params.temperature, params.top_p) == (16, 0.0, 0.5)
    assert params.template_kwargs == {"enable_thinking": True}

    app.chat_input[0].set_value("再说一遍").run()
    messages, _ = calls[-1]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]  # the earlier turns go back in
    assert messages[1]["content"] == history[1]["content"]
    assert len(app.session_state["messages"]) == 4 and len(app.chat_message) == 4


def test_thinking_toggle_reaches_the_template(app, calls):
    app.toggle(key="thinking").set_value(False)
    app.chat_input[0].set_value("hi").run()
    assert calls[-1][1].template_kwargs == {"enable_thinking": False}


def test_clear_history(app):
    app.chat_input[0].set_value("hi").run()
    assert len(app.session_state["messages"]) == 2
    app.button(key="clear").click().run()
    assert app.session_state["messages"] == [] and len(app.chat_message) == 0


def test_reasoning_goes_to_an_expander(app, monkeypatch):
    def fake_stream(self, messages, params):
        yield ("reasoning", "先想一想")
        yield ("content", "答案是")
        yield ("content", "四十二")
        yield Completion("答案是四十二", "先想一想", 3, 3, "stop")

    monkeypatch.setattr(ChatEngine, "stream", fake_stream)
    app.chat_input[0].set_value("问题").run()
    assert not app.exception, app.exception
    assert app.session_state["messages"][-1] == {"role": "assistant", "content": "答案是四十二", "reasoning": "先想一想"}
    reply = app.chat_message[1]
    assert [e.label for e in reply.expander] == ["思考过程 / Thinking"]
    assert reply.expander[0].markdown[0].value == "先想一想"
    assert "答案是四十二" in [m.value for m in reply.markdown]


def test_reasoning_only_reply_says_so(app, monkeypatch):
    def fake_stream(self, messages, params):
        yield ("reasoning", "想了很久")
        yield Completion("", "想了很久", 3, 16, "length")

    monkeypatch.setattr(ChatEngine, "stream", fake_stream)
    app.chat_input[0].set_value("问题").run()
    assert app.session_state["messages"][-1]["content"] == ""
    assert any("max_length" in c.value for c in app.chat_message[1].caption)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def streamlit_on_loopback(context, tiny_model, tmp_path: Path, app_file: Path = webdemo.APP_FILE,
                          env: dict[str, str] | None = None) -> Iterator[str]:
    """`streamlit run app_file` on a free 127.0.0.1 port, healthy; yields its base URL."""
    from selfllm_recipes.smoke.checks import SmokeSession, wait_until_healthy

    port = _free_port()
    command = webdemo.streamlit_command(context, context.settings(env={"HOST": "127.0.0.1"}), app_file)
    command[command.index("--server.port") + 1] = str(port)
    log = (tmp_path / "streamlit.log").open("wb")
    server = subprocess.Popen(command, env={**webdemo.streamlit_env(context, tiny_model), **(env or {})},
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(SmokeSession(url, "qwen3/webdemo", lambda: "", server.poll, tmp_path), "/_stcore/health", 90)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def need_chromium() -> None:
    if not shutil.which("chromium"):
        missing_prerequisite("Debian's chromium is not installed (scripts/setup_host.sh)")


def test_browser_against_streamlit_run(context, tiny_model, tmp_path):
    """The smoke check's own browser session against `streamlit run` on 127.0.0.1."""
    from selfllm_recipes.smoke.checks import SmokeSession
    from selfllm_recipes.smoke.task_webdemo import chat_in_browser

    need_chromium()
    with streamlit_on_loopback(context, tiny_model, tmp_path) as url:
        started = time.monotonic()
        detail = chat_in_browser(SmokeSession(url, "qwen3/webdemo", lambda: "", lambda: None, tmp_path), timeout_s=120)
        assert "2 replies" in detail and "history cleared" in detail, detail
        shot = tmp_path / "qwen3-webdemo.png"
        assert shot.name in detail and shot.stat().st_size > 10_000
        assert time.monotonic() - started < 120


CAPTION_ONLY_PAGE = """
import streamlit as st
with st.sidebar:
    st.slider("max_length", 16, 8192, 2048, 16, key="max_length")
if prompt := st.chat_input("输入消息… / Type a message…"):
    with st.chat_message("user"):
        st.markdown(prompt)
    with st.chat_message("assistant"):
        st.caption("（没有回答内容 / no answer）")
"""


def test_browser_check_fails_a_reply_without_model_text(context, tiny_model, tmp_path):
    """A page whose reply is only the 'no answer' caption must fail the smoke check."""
    from selfllm_recipes.smoke.checks import SmokeFailure, SmokeSession
    from selfllm_recipes.smoke.task_webdemo import chat_in_browser

    need_chromium()
    page = tmp_path / "caption_only.py"
    page.write_text(CAPTION_ONLY_PAGE, encoding="utf-8")
    with streamlit_on_loopback(context, tiny_model, tmp_path, page) as url:
        with pytest.raises(SmokeFailure, match="no model text"):
            chat_in_browser(SmokeSession(url, "qwen3/webdemo", lambda: "", lambda: None, tmp_path), timeout_s=60)


class StreamlitTab:
    """One browser tab speaking Streamlit's websocket protocol (what the page's JavaScript sends)."""

    def __init__(self, port: int):
        self.url = f"ws://127.0.0.1:{port}/_stcore/stream"
        self.ws = None
        self.chat_input_id = ""
        self.page_hash = ""

    async def _until(self, found) -> None:
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        while True:
            msg = ForwardMsg()
            msg.ParseFromString(await self.ws.recv())
            if msg.WhichOneof("type") == "new_session":
                self.page_hash = msg.new_session.page_script_hash
            element = msg.delta.new_element if msg.WhichOneof("type") == "delta" else None
            if element is not None and element.WhichOneof("type") == "chat_input":
                self.chat_input_id = element.chat_input.id
            if found(msg):
                return

    async def _rerun(self, **widget_values) -> None:
        from streamlit.proto.BackMsg_pb2 import BackMsg

        back = BackMsg()
        back.rerun_script.query_string = ""
        back.rerun_script.page_script_hash = self.page_hash
        for widget_id, text in widget_values.items():
            state = back.rerun_script.widget_states.widgets.add()
            state.id = widget_id
            state.chat_input_value.data = text
        await self.ws.send(back.SerializeToString())

    async def send_chat(self, text: str) -> None:
        """Open the page, type a message, and return once the assistant's reply has begun (the page's
        script is then inside engine.stream: its request is running or queued)."""
        import websockets

        self.ws = await websockets.connect(self.url, subprotocols=["streamlit"], max_size=None)
        await self._rerun()
        await self._until(lambda msg: msg.WhichOneof("type") == "script_finished")
        assert self.chat_input_id, "the page drew no chat input"
        await self._rerun(**{self.chat_input_id: text})
        await self._until(lambda msg: msg.WhichOneof("type") == "delta"
                          and msg.delta.add_block.chat_message.name == "assistant")


def test_streamlit_health_answers_with_64_chats_queued(context, tiny_model, tmp_path):
    """65 tabs chat at once (MAX_BATCH=1: one generates, 64 wait in the engine's queue); Streamlit's
    health endpoint, which Docker's health check calls, still answers within `selfllm health`'s timeout."""
    import asyncio

    import requests

    async def chat_and_probe(port: int) -> None:
        health = f"http://127.0.0.1:{port}/_stcore/health"
        requests.get(health, timeout=5)  # warm
        tabs = [StreamlitTab(port) for _ in range(65)]
        try:
            await asyncio.wait_for(asyncio.gather(*(tab.send_chat(f"第 {i} 个问题") for i, tab in enumerate(tabs))), 180)
            await asyncio.sleep(1.0)  # every page script is past its chat message into engine.stream
            for _ in range(3):  # a new connection each, as Docker's check makes (`selfllm health`'s timeout)
                answer = await asyncio.to_thread(requests.get, health, timeout=HEALTH_TIMEOUT_S)
                assert answer.status_code == 200
        finally:
            await asyncio.gather(*(tab.ws.close() for tab in tabs if tab.ws is not None), return_exceptions=True)

    with streamlit_on_loopback(context, tiny_model, tmp_path, env={"MAX_BATCH": "1"}) as url:
        asyncio.run(chat_and_probe(int(url.rsplit(":", 1)[1])))
    start = (tmp_path / "streamlit.log").read_text(encoding="utf-8", errors="replace")  # the engine's start line
    assert "torch threads (TORCH_THREADS=" in start and "chat template: checkpoint (" in start, start[-2000:]


def test_browser_attaches_an_image_for_a_family_that_takes_images(tiny_recipe, tmp_path):
    """Gemma-3's page: the chat input takes files; the smoke check's browser attaches a generated PNG, which
    the user's turn shows and the tiny vision model answers."""
    from selfllm_recipes.smoke.checks import SmokeSession
    from selfllm_recipes.smoke.task_webdemo import chat_in_browser

    need_chromium()
    gemma_context, gemma_model = tiny_recipe("gemma3/webdemo")
    with streamlit_on_loopback(gemma_context, gemma_model, tmp_path) as url:
        detail = chat_in_browser(SmokeSession(url, "gemma3/webdemo", lambda: "", lambda: None, tmp_path), timeout_s=120)
    assert "an attached PNG shown and answered" in detail, detail
