"""Smoke check of task `webdemo`: a real headless browser chats with the Streamlit page.

Playwright drives Debian's chromium (`apt-get install chromium fonts-noto-cjk`; no `playwright
install`): open the page, send a Chinese message, wait for a non-empty streamed reply, switch
thinking off (when the family has the switch) and send a second one; for a family that takes images, attach a
generated PNG to a third message (it shows in the user's turn and gets a reply), for one that takes video a
generated MP4 to the first message of a new chat; save a screenshot into the report folder, then clear the history.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from .checks import (SmokeCheck, family_of, SmokeFailure, SmokeSession, expect, generated_mp4, generated_png,
                     start_on_smoke_model)

CHROMIUM = os.environ.get("SELFLLM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update", "--disable-gpu"]
FIRST_PROMPT = "你好，请介绍一下你自己"
SECOND_PROMPT = "用一句话讲讲甄嬛传"
CHAT_INPUT = '[data-testid="stChatInput"] textarea'
MESSAGES = '[data-testid="stChatMessage"]'
ASSISTANT = MESSAGES + ':has([data-testid="stChatMessageAvatarAssistant"])'
CONTENT = '[data-testid="stChatMessageContent"]'
MARKDOWN = '[data-testid="stMarkdownContainer"]'  # st.markdown / write_stream; st.caption is stCaptionContainer
APP_STATE = '[data-testid="stApp"][data-test-script-state="{}"]'
IMAGE_PROMPT = "图里有什么？"
VIDEO_PROMPT = "视频里发生了什么？"
FILE_INPUT = '[data-testid="stChatInput"] input[type="file"]'


def screenshot_path(session: SmokeSession) -> Path:
    folder = Path(session.artifacts_dir) if session.artifacts_dir is not None else Path.cwd()
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{session.recipe_key.replace('/', '-')}.png"  # qwen3-webdemo.png, beside its container log


def _wait_idle(page, timeout_s: float) -> None:
    """Until the script run that the last action started has ended (stApp's script state)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:  # the rerun may start late, or be over already
        page.locator(APP_STATE.format("running")).wait_for(state="attached", timeout=2_000)
    except PlaywrightTimeout:
        pass
    page.locator(APP_STATE.format("notRunning")).wait_for(state="attached", timeout=timeout_s * 1000)


def _model_text(message) -> tuple[str, str]:
    """(answer, reasoning) drawn in one assistant message; the page's 'no answer' caption is neither."""
    answer = message.locator(f'{CONTENT} {MARKDOWN}:not([data-testid="stExpander"] *)').all_inner_texts()
    reasoning = message.locator(f'[data-testid="stExpanderDetails"] {MARKDOWN}').all_inner_texts()
    return "".join(answer).strip(), "".join(reasoning).strip()


def _send(page, prompt: str, replies_before: int, timeout_s: float) -> str:
    """Send a prompt; the reply's answer text once the run has ended. The model must have written
    something: an answer, or (a family whose template opens the thinking block, cut at max_length)
    thinking text; a reply that is only the page's 'no answer' caption fails."""
    box = page.locator(CHAT_INPUT)
    box.fill(prompt)
    box.press("Enter")
    assistant = page.locator(ASSISTANT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if assistant.count() > replies_before:
            message = assistant.nth(replies_before)
            if message.locator(CONTENT).inner_text().strip():
                _wait_idle(page, max(1.0, deadline - time.monotonic()))
                answer, reasoning = _model_text(message)
                expect(bool(answer or reasoning),
                       f"the reply to {prompt!r} has no model text, only: {message.inner_text().strip()!r}")
                return answer or reasoning
        page.wait_for_timeout(250)
    raise SmokeFailure(f"no assistant reply to {prompt!r} within {timeout_s:.0f} s")


def _shortest_replies(page) -> None:
    """max_length slider to its minimum with the keyboard (the tiny model runs on CPU)."""
    thumb = page.locator('[data-testid="stSidebar"] [data-testid="stSlider"]').first.get_by_role("slider")
    thumb.focus()
    thumb.press("Home")
    _wait_idle(page, 30)
    value = thumb.input_value()
    expect(value == "16", f"max_length slider at {value!r} after Home, expected '16'")


def chat_in_browser(session: SmokeSession, timeout_s: float = 300) -> str:
    """Drive the page at session.base_url; returns the report's one-line detail."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    shot = screenshot_path(session)
    started = time.monotonic()
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860}, locale="zh-CN")
            try:
                page.goto(session.base_url, wait_until="domcontentloaded", timeout=60_000)
                # the first visit loads the model (spinner) before the chat box appears
                page.locator(CHAT_INPUT).wait_for(state="visible", timeout=timeout_s * 1000)
                _shortest_replies(page)
                first = _send(page, FIRST_PROMPT, 0, timeout_s)
                toggled = ""
                switch = page.locator('[data-testid="stSidebar"] [data-testid="stCheckbox"]')
                if switch.count():  # the family's thinking switch (Qwen3: enable_thinking, on by default)
                    box = switch.first.locator("input")
                    was_on = box.is_checked()
                    switch.first.click()
                    _wait_idle(page, 30)
                    expect(box.is_checked() != was_on, "clicking the thinking switch did not flip it")
                    toggled = f", thinking switched {'off' if was_on else 'on'}"
                _send(page, SECOND_PROMPT, 1, timeout_s)
                expect(page.locator(MESSAGES).count() == 4, f"expected 4 chat messages, found {page.locator(MESSAGES).count()}")
                if takes(session, "image"):
                    picture = generated_png(48, 32, lambda x, y: (x * 5, y * 7, 128))
                    _attach_and_send(page, ("gradient.png", "image/png", picture), IMAGE_PROMPT, 2,
                                     '[data-testid="stImage"] img', timeout_s)
                    toggled += ", an attached PNG shown and answered"
                if takes(session, "video"):
                    # A new conversation: GLM-4.1V's transformers class can't read images and videos in one prompt
                    # (its video frames are image tokens), so the video goes into a chat of its own.
                    _clear_history(page)
                    clip = generated_mp4(64, 48, 8, 4, lambda t, x, y: (255, 0, 0) if abs(x - 8 * t) < 6 else (0, 0, 90))
                    _attach_and_send(page, ("moving.mp4", "video/mp4", clip), VIDEO_PROMPT, 0,
                                     '[data-testid="stVideo"]', timeout_s)
                    toggled += ", an attached MP4 shown and answered (a new chat)"
                page.screenshot(path=str(shot), full_page=True)
                _clear_history(page)
            except (PlaywrightError, SmokeFailure) as exc:
                try:
                    page.screenshot(path=str(shot), full_page=True)
                except PlaywrightError:
                    pass
                raise SmokeFailure(f"browser: {str(exc).splitlines()[0]} (screenshot {shot.name})") from None
        finally:
            browser.close()
    return (f"browser chat: 2 replies (first {len(first)} chars){toggled}, history cleared, "
            f"{time.monotonic() - started:.0f} s; screenshot {shot.name}")


def _attach_and_send(page, upload: tuple[str, str, bytes], prompt: str, replies_before: int, shown_as: str,
                     timeout_s: float) -> None:
    """Attach a file (name, MIME type, bytes) to the chat input, send the prompt with it; the user's turn must show it."""
    name, mime, data = upload
    page.locator(FILE_INPUT).set_input_files(files=[{"name": name, "mimeType": mime, "buffer": data}])
    page.wait_for_timeout(500)
    _send(page, prompt, replies_before, timeout_s)
    shown = page.locator(MESSAGES).nth(2 * replies_before).locator(shown_as).count()
    expect(shown == 1, f"the user's turn shows {shown} of {name} after it was attached")


def _clear_history(page) -> None:
    page.get_by_role("button", name="清空对话 / Clear history").click()
    page.locator(MESSAGES).first.wait_for(state="detached", timeout=30_000)


def takes(session: SmokeSession, kind: str) -> bool:
    return family_of(session.recipe_key).modalities.takes(kind)  # type: ignore[arg-type]


def verify_webdemo(session: SmokeSession) -> str:
    return chat_in_browser(session)


CHECK = SmokeCheck(command=start_on_smoke_model(), verify=verify_webdemo, health_path="/_stcore/health")
