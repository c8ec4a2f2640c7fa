"""Video input (media.py with PyAV; openai_api's `video_url` parts; the OpenAPI document of a video family) on the
host: MP4s made here, decoded and sampled as a server does. The engine's processor step (Qwen2-VL's video
processor needs torchvision, which the host has not) runs in the recipes' images: the matrix smoke checks of the
fastapi and vllm recipes of qwen2-vl, qwen3-vl, qwen3.5 and glm4.1v send an MP4."""
from __future__ import annotations

import base64
import io
from typing import Any

import pytest

av = pytest.importorskip("av")

from selfllm_recipes.smoke.checks import generated_mp4, smoke_videos, video_data_url  # noqa: E402
from selfllm_runtime import media  # noqa: E402
from selfllm_runtime.media import MediaError, check_media, decode_video, sample_times  # noqa: E402


def mp4(frames: int = 20, fps: int = 10, width: int = 64, height: int = 48) -> bytes:
    """Frame t is filled with red t * 12: a frame's colour tells which one was sampled."""
    return generated_mp4(width, height, frames, fps, lambda t, x, y: (t * 12 % 256, 0, 0))


def red_of(frame: Any) -> int:
    return int(frame[frame.shape[0] // 2, frame.shape[1] // 2, 0])


def test_two_frames_a_second_spread_over_the_video_with_their_source_indices():
    video = decode_video(mp4(frames=20, fps=10), max_frames=32, max_pixels=10**6)
    assert video.frames.shape == (4, 48, 64, 3) and video.fps == 10.0 and video.total_frames == 20
    assert video.indices == [2, 7, 12, 17]  # the middle of four 0.5 s spans
    assert [round(red_of(f) / 12) for f in video.frames] == video.indices  # the frames really are those
    meta = video.metadata()
    assert (meta.total_num_frames, meta.fps, meta.frames_indices, meta.duration) == (20, 10.0, [2, 7, 12, 17], 2.0)


def test_at_most_max_frames_and_each_frame_scaled_down():
    video = decode_video(mp4(frames=90, fps=30, width=320, height=240), max_frames=5, max_pixels=20_000)
    assert video.frames.shape[0] == 5 and len(set(video.indices)) == 5
    height, width = video.frames.shape[1:3]
    assert width * height <= 20_000 and abs(width / height - 4 / 3) < 0.05


def test_sample_times_never_zero_and_never_above_the_limit():
    assert sample_times(0.1, 16) == [0.05]
    assert len(sample_times(600, 16)) == 16 and len(sample_times(3, 16)) == 6


def test_an_animated_gif_is_a_video_too():
    from PIL import Image

    out = io.BytesIO()
    frames = [Image.new("RGB", (32, 24), (i * 40, 0, 0)) for i in range(6)]
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=250)
    video = decode_video(out.getvalue(), max_frames=32, max_pixels=10**6)
    assert video.total_frames == 6 and video.frames.shape[1:] == (24, 32, 3) and len(video.indices) == 3


@pytest.mark.parametrize(("data", "says"), [
    (b"not a video at all", "not a video this server can decode"),
    (b"", "not a video this server can decode"),
])
def test_undecodable_data_is_refused_in_plain_words(data, says):
    with pytest.raises(MediaError, match=says):
        decode_video(data, 8, 10**6)


def test_a_cut_off_mp4_is_refused_not_a_crash():
    whole = mp4(frames=30)
    with pytest.raises(MediaError, match="not a video|could not|no frames"):
        decode_video(whole[: len(whole) // 2], 8, 10**6)


def test_a_video_of_too_many_frames_is_refused_before_decoding(monkeypatch):
    monkeypatch.setattr(media, "MAX_DECODED_FRAMES", 10)
    with pytest.raises(MediaError, match="20 frames, more than the 10"):
        decode_video(mp4(frames=20), 8, 10**6)


def test_data_urls_of_videos_and_their_byte_limit():
    data = mp4()
    assert media.data_url_bytes(video_data_url(data), 10**6, "video") == data
    with pytest.raises(MediaError, match="holds text/plain, not a video"):
        media.data_url_bytes("data:text/plain;base64,QUJD", 10**6, "video")
    with pytest.raises(MediaError, match="above the limit of .* \\(MEDIA_MAX_VIDEO_BYTES\\)"):
        media.data_url_bytes(video_data_url(data), 100, "video")
    with pytest.raises(MediaError, match="holds video/mp4, not an image"):
        media.data_url_bytes(video_data_url(data), 10**6, "image")


def test_check_media_for_video(tiny_recipe):
    family = {name: tiny_recipe(f"{name}/fastapi")[0].family for name in ("qwen2-vl", "gemma3", "qwen3")}
    check_media(family["qwen2-vl"], True, "Qwen2VLForConditionalGeneration", "video", "user", 1, 1)
    with pytest.raises(MediaError, match="more than 1 videos in one request \\(MEDIA_MAX_VIDEOS\\)"):
        check_media(family["qwen2-vl"], True, "Qwen2VLForConditionalGeneration", "video", "user", 2, 1)
    with pytest.raises(MediaError, match="has no video processor: it takes no video input"):
        check_media(family["qwen2-vl"], False, "Qwen2VLForConditionalGeneration", "video", "user", 1, 1)
    with pytest.raises(MediaError, match="Gemma-3 takes text and image only; video input needs a recipe whose "
                                         "family takes video, such as qwen2-vl"):
        check_media(family["gemma3"], True, "Gemma3ForConditionalGeneration", "video", "user", 1, 1)
    with pytest.raises(MediaError, match="Qwen3 takes text only; image input needs"):
        check_media(family["qwen3"], False, "Qwen3ForCausalLM", "image", "user", 1, 4)
    with pytest.raises(MediaError, match="videos go in user \\(or assistant\\) messages, not in a system message"):
        check_media(family["qwen2-vl"], True, "Qwen2VLForConditionalGeneration", "video", "system", 1, 1)


def test_the_openapi_document_shows_video_parts_only_where_the_model_reads_video(tiny_recipe, engine):
    from fastapi import FastAPI
    from selfllm_runtime.tasks.fastapi_server import create_app
    from selfllm_runtime.tasks.openai_api import family_openapi

    document = FastAPI.openapi(create_app(engine))  # the full document, before the family's view
    family = tiny_recipe("qwen2-vl/fastapi")[0].family
    shown = family_openapi(document, family, takes_images=True, takes_videos=True)["components"]["schemas"]
    assert {"ImagePart", "VideoPart", "VideoUrl"} <= set(shown)
    content = shown["ChatMessage"]["properties"]["content"]["anyOf"]
    listed = [ref["$ref"].rsplit("/", 1)[-1] for branch in content if "items" in branch
              for ref in branch["items"].get("oneOf", [branch["items"]])]
    assert sorted(listed) == ["ImagePart", "TextPart", "VideoPart"]


def test_a_video_to_a_family_that_takes_images_only_is_a_400_naming_the_part(tiny_recipe):
    from conftest import fastapi_client
    from selfllm_runtime.chat_engine import ChatEngine

    gemma = ChatEngine(*tiny_recipe("gemma3/fastapi"))
    moving, _ = smoke_videos()
    content = [{"type": "text", "text": "What happens?"}, {"type": "video_url", "video_url": {"url": moving}}]
    with fastapi_client(gemma) as client:
        answer = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}],
                                                           "max_tokens": 4})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "messages.0.content.1" and error["code"] == "invalid_media"
    assert "Gemma-3 takes text and image only; video input needs" in error["message"]


def test_smoke_videos_differ_and_decode():
    moving, stripes = smoke_videos()
    assert moving != stripes
    for url in (moving, stripes):
        video = decode_video(base64.b64decode(url.split(",", 1)[1]), 32, 10**6)
        assert video.frames.shape == (4, 48, 64, 3)


def test_a_family_whose_model_cant_mix_images_and_a_video_refuses_both_in_one_conversation(tiny_recipe):
    from selfllm_runtime.media import check_mix

    glm, qwen = (tiny_recipe(f"{name}/fastapi")[0].family for name in ("glm4.1v", "qwen2-vl"))
    check_mix(qwen, 2, 1)
    check_mix(glm, 2, 0)
    check_mix(glm, 0, 1)
    with pytest.raises(MediaError, match="GLM-4.1V-Thinking reads images or a video in one conversation, not both"):
        check_mix(glm, 1, 1)
