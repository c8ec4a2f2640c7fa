"""The Streamlit page of task `webdemo`, run by `streamlit run` (see tasks/webdemo.py).

Streamlit reruns this file top to bottom on every interaction: the ChatEngine is loaded once per
process (st.cache_resource), the conversation lives in st.session_state per browser tab.
With API_KEY set, a tab sees only a password field until it gives that key (st.session_state flag).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import streamlit as st

from selfllm_runtime.access import keys_match
from selfllm_runtime.chat_engine import ChatEngine, Completion, Message
from selfllm_runtime.context import RecipeContext, load_context
from selfllm_runtime.media import MediaError, check_media, check_mix, decode_image, decode_video, mebibytes
from selfllm_runtime.settings import MediaSettings, WebdemoSettings
from selfllm_runtime.tasks.webdemo import MAX_LENGTH, TEMPERATURE, TOP_P, Slider, generation_params, page_inputs

THINKING_LABEL = "思考过程 / Thinking"
NO_ANSWER = "（没有回答内容 / no answer）"
NO_ANSWER_WHILE_THINKING = "（思考未结束就达到了 max_length / max_length reached while thinking）"
LOGIN_LABEL = "API_KEY"
LOGIN_KEY = "login_key"  # the password field's widget key
AUTHENTICATED = "authenticated"  # session_state flag, per browser tab
WRONG_KEY = "API_KEY 不正确 / Wrong API_KEY"


@st.cache_resource(show_spinner=False)
def load_recipe_context(recipe_dir: str) -> RecipeContext:
    """The recipe, read once per process (not on every rerun)."""
    return load_context(recipe_dir or None)


@st.cache_resource(show_spinner="正在加载模型… / Loading the model…")
def load_engine(recipe_dir: str, model_dir: str) -> ChatEngine:
    selfllm_log = logging.getLogger("selfllm")  # the engine's start line (model, threads, chat template), as
    if not selfllm_log.handlers:               # `selfllm start` logs it for the other tasks
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        selfllm_log.addHandler(handler)
        selfllm_log.setLevel(logging.INFO)
    context = load_recipe_context(recipe_dir)
    return ChatEngine(context, Path(model_dir), context.settings(WebdemoSettings))


def slider(spec: Slider, key: str, value: float | None = None):
    """value: the starting position (default: the spec's)."""
    start = spec.value if value is None else min(max(value, spec.min_value), spec.max_value)
    as_int = all(float(v).is_integer() for v in (spec.min_value, spec.max_value, start, spec.step))
    cast = int if as_int else float
    return st.slider(spec.label, cast(spec.min_value), cast(spec.max_value), cast(start), cast(spec.step), key=key)


def login_gate(expected: str) -> None:
    """With a key set: until this tab has given it, draw only the password field and stop the page."""
    if not expected or st.session_state.get(AUTHENTICATED):
        return
    st.title("🔒")
    given = st.text_input(LOGIN_LABEL, type="password", key=LOGIN_KEY,
                          help="启动时设置的 API_KEY / the API_KEY the server was started with")
    if given and keys_match(given.strip(), expected):
        st.session_state[AUTHENTICATED] = True
        st.rerun()
    if given:
        st.error(WRONG_KEY)
    st.stop()


IMAGE_TYPES = ["png", "jpg", "jpeg", "webp", "gif", "bmp"]
VIDEO_TYPES = ["mp4", "webm", "mkv", "mov", "avi"]


def upload_kind(name: str) -> str:
    return "video" if name.rsplit(".", 1)[-1].lower() in VIDEO_TYPES else "image"


def read_uploads(files: list, role: str, earlier: dict[str, int]) -> tuple[list, list]:
    """The chat input's uploaded images and videos, checked as the API checks them (media.py: the family's limits,
    MEDIA_*); MediaError in plain words. Videos come back as {"data": the file, "video": its sampled frames}."""
    media = context.settings(MediaSettings)
    found: dict[str, list] = {"image": [], "video": []}
    limits = {"image": (media.media_max_images, media.media_max_image_bytes, "MEDIA_MAX_IMAGE_BYTES"),
              "video": (media.media_max_videos, media.media_max_video_bytes, "MEDIA_MAX_VIDEO_BYTES")}
    for upload in files:
        kind = upload_kind(upload.name)
        count, max_bytes, setting = limits[kind]
        check_media(context.family, engine.reads(kind), type(engine.model).__name__, kind, role,
                    earlier[kind] + len(found[kind]) + 1, count)
        data = upload.getvalue()
        if len(data) > max_bytes:
            raise MediaError(f"{upload.name} is {mebibytes(len(data))}, above the limit of {mebibytes(max_bytes)} "
                             f"({setting})")
        try:
            found[kind].append(decode_image(data, media.media_max_image_pixels) if kind == "image" else
                               {"data": data, "video": decode_video(data, media.media_max_video_frames,
                                                                    media.media_max_video_pixels)})
        except MediaError as exc:
            raise MediaError(f"{upload.name}: {exc}") from None
    return found["image"], found["video"]


def engine_message(message: dict) -> Message:
    """A page message as the engine takes it: with images or videos, a list content of them, then the text."""
    if not message.get("images") and not message.get("videos"):
        return {"role": message["role"], "content": message["content"]}
    return {"role": message["role"], "content": [*({"type": "image", "image": image} for image in message["images"]),
                                                 *({"type": "video", "video": clip["video"]}
                                                   for clip in message.get("videos") or []),
                                                 {"type": "text", "text": message["content"]}]}


def show_message(message: dict) -> None:
    with st.chat_message(message["role"]):
        for image in message.get("images") or []:
            st.image(image, width=240)
        for clip in message.get("videos") or []:
            st.video(clip["data"], width=320)
        if message.get("reasoning"):
            with st.expander(THINKING_LABEL):
                st.markdown(message["reasoning"])
        if message["content"]:
            st.markdown(message["content"])
        elif message["role"] == "assistant":
            st.caption(NO_ANSWER_WHILE_THINKING if message.get("reasoning") else NO_ANSWER)


recipe_dir, model_dir = page_inputs()
page_context = load_recipe_context(recipe_dir)
st.set_page_config(page_title=page_context.recipe.name, page_icon="💬")
login_gate(page_context.settings(WebdemoSettings).api_key)
engine = load_engine(recipe_dir, model_dir)
context = engine.context
st.title(context.recipe.name)
st.caption(" · ".join([context.family.display_name, engine.model_name, engine.device]
                      + ([engine.quantization] if engine.quantization != "none" else [])))
if "messages" not in st.session_state:
    st.session_state.messages = []

with st.sidebar:
    st.header("参数 / Settings")
    max_length = slider(MAX_LENGTH, "max_length")
    default_temperature, default_top_p = engine.sampling_defaults()  # the checkpoint's generation_config
    temperature = slider(TEMPERATURE, "temperature", default_temperature)
    top_p = slider(TOP_P, "top_p", default_top_p)
    thinking: bool | str | None = None
    if context.family.thinking is not None:
        thinking = st.toggle("深度思考 / Thinking", value=context.family.thinking.default, key="thinking",
                             help=f"chat template: {context.family.thinking.template_kwarg}")
    elif context.family.reasoning_effort is not None:  # gpt-oss: low / medium / high
        effort = context.family.reasoning_effort
        thinking = st.selectbox("思考强度 / Reasoning effort", effort.choices, key="reasoning_effort",
                                index=effort.choices.index(effort.default),
                                help=f"chat template: {effort.template_kwarg}")
    if st.button("清空对话 / Clear history", key="clear"):
        st.session_state.messages = []

for past in st.session_state.messages:
    show_message(past)

# A model that reads images (model.yaml modalities; a checkpoint with a vision tower): the chat input takes them too,
# and videos where it reads video.
accepted = (IMAGE_TYPES if engine.takes_images else []) + (VIDEO_TYPES if engine.takes_videos else [])
submitted = st.chat_input(("输入消息，可附图片或视频… / Type a message, attach images or videos…" if engine.takes_videos else
                           "输入消息，可附图片… / Type a message, attach images…") if accepted else
                          "输入消息… / Type a message…", accept_file="multiple" if accepted else False,
                          file_type=accepted or None)
prompt, uploads = (submitted, []) if isinstance(submitted, str) or submitted is None else (submitted.text, submitted.files)
pictures: list = []
clips: list = []
if uploads:
    earlier = {"image": sum(len(m.get("images") or []) for m in st.session_state.messages),
               "video": sum(len(m.get("videos") or []) for m in st.session_state.messages)}
    try:
        pictures, clips = read_uploads(list(uploads), "user", earlier)
        check_mix(context.family, earlier["image"] + len(pictures), earlier["video"] + len(clips))
    except MediaError as exc:
        st.error(f"未发送 / Not sent: {exc}")
        prompt = None
if prompt or pictures or clips:
    turn = {"role": "user", "content": prompt or "", "images": pictures, "videos": clips}
    history: list[Message] = [engine_message(m) for m in [*st.session_state.messages, turn]]
    st.session_state.messages.append(turn)
    show_message(st.session_state.messages[-1])
    params = generation_params(context, max_length, temperature, top_p, thinking)
    with st.chat_message("assistant"):
        thinking_slot = st.empty()
        reasoning: list[str] = []

        def content_deltas() -> Iterator[str]:
            for piece in engine.stream(history, params):
                if isinstance(piece, Completion):
                    continue  # token counts: not shown
                if piece[0] == "content":
                    yield piece[1]
                    continue
                reasoning.append(piece[1])
                with thinking_slot.container(), st.expander(THINKING_LABEL, expanded=True):
                    st.markdown("".join(reasoning))

        streamed = st.write_stream(content_deltas())
        # history keeps what the page showed, so a rerun draws the same conversation
        answer = (streamed if isinstance(streamed, str) else "".join(map(str, streamed))).strip()
        if not answer:
            st.caption(NO_ANSWER_WHILE_THINKING if reasoning else NO_ANSWER)
    st.session_state.messages.append(
        {"role": "assistant", "content": answer, "reasoning": "".join(reasoning).strip() or None})
