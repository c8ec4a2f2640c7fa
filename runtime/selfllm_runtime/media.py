"""Images and videos of a request, read once for every task kind that serves a vision-language family: OpenAI's
`image_url` parts and vLLM's `video_url` parts (a data: URL, or an http(s) URL this server downloads), images
decoded with PIL, videos with PyAV, held to the limits the family's model.yaml `modalities.image` / `.video` sets
(MEDIA_* settings override them).

- data: URLs are always read (`data:image/png;base64,...`, `data:video/mp4;base64,...`);
- http(s) URLs are downloaded with a size limit (MEDIA_MAX_IMAGE_BYTES / MEDIA_MAX_VIDEO_BYTES) and a time limit
  (MEDIA_FETCH_TIMEOUT), redirects followed (at most MAX_REDIRECTS) and checked like the first address; a host
  that resolves to a loopback, private, link-local or otherwise non-public address is refused unless
  MEDIA_ALLOW_PRIVATE_URLS=1 (the server must not be a way into the network it sits in). The check resolves the
  name once and urllib resolves it again to connect: a DNS server that answers differently the second time
  (DNS rebinding) is not caught here; a server exposed to such clients keeps its network policy outside too;
- local paths, file: and every other scheme are never read;
- an image above MEDIA_MAX_IMAGE_PIXELS (width × height) is scaled down to fit, keeping its aspect ratio;
- a video is sampled at VIDEO_SAMPLE_FPS frames a second, at most MEDIA_MAX_VIDEO_FRAMES frames spread over it,
  each scaled down to MEDIA_MAX_VIDEO_PIXELS; the processor gets the frames and where they came from
  (transformers' VideoMetadata: Qwen3-VL and GLM-4.1V write each frame's time into the prompt).

Every refusal is a MediaError whose text says what was wrong in plain words; the caller names the message
and part it came from.
"""
from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import math
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from PIL.Image import Image

    from .metadata import ModelFamily
    from .settings import MediaSettings

MAX_REDIRECTS = 5
CHUNK = 64 * 1024
MediaKind = Literal["image", "video"]
VIDEO_SAMPLE_FPS = 2.0  # frames a second sampled from a video (Qwen2-VL's / Qwen3-VL's processors' default)
MAX_DECODED_FRAMES = 18_000  # a video of more frames (10 min at 30 fps) is refused, not decoded to its end
# Where the refusal of an image for a text-only family points (the runtime in an image knows its own family only).
VISION_RECIPES_HINT = "a vision-language recipe such as gemma3"


class MediaError(ValueError):
    """An image (or video) part this server will not use; the text says why."""


def check_media(family: ModelFamily, readable: bool, model_class: str, kind: MediaKind, role: str,
                number: int, limit: int) -> None:
    """MediaError unless the `number`-th image (or video, from 1) of a request may go to this model: the family
    takes the kind (model.yaml modalities), the loaded checkpoint reads it (`readable`: a vision tower, for video
    a video processor), the message is a user or assistant turn, and the request holds no more than `limit` of
    the kind (MEDIA_MAX_IMAGES / MEDIA_MAX_VIDEOS)."""
    if not family.modalities.takes(kind):  # type: ignore[arg-type]
        takes = " and ".join(family.modalities.input)
        hint = VISION_RECIPES_HINT if kind == "image" else "a recipe whose family takes video, such as qwen2-vl"
        raise MediaError(f"{family.display_name} takes {takes} only; {kind} input needs {hint}")
    if not readable:
        lacks = "vision tower: it takes text only" if kind == "image" else "video processor: it takes no video input"
        raise MediaError(f"the loaded checkpoint ({model_class}) has no {lacks}")
    if role not in ("user", "assistant"):
        raise MediaError(f"{kind}s go in user (or assistant) messages, not in a {role} message")
    if number > limit:
        setting = "MEDIA_MAX_IMAGES" if kind == "image" else "MEDIA_MAX_VIDEOS"
        raise MediaError(f"more than {limit} {kind}s in one request ({setting})")


def check_mix(family: ModelFamily, images: int, videos: int) -> None:
    """MediaError where a conversation holds images and a video but the family's class reads one kind at a time
    (model.yaml modalities.mixed_image_video: false)."""
    if images and videos and not family.modalities.mixed_image_video:
        raise MediaError(f"{family.display_name} reads images or a video in one conversation, not both (its model "
                         "counts video frames as image tokens): send the video in a conversation of its own")


def mebibytes(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size} bytes"


def media_bytes(url: str, settings: MediaSettings, kind: MediaKind = "image") -> bytes:
    """The encoded image (or video) an `image_url` (`video_url`) url points at: a data: URL's payload, or an
    http(s) download."""
    scheme = urllib.parse.urlsplit(url.strip()).scheme.lower()
    if scheme == "data":
        return data_url_bytes(url.strip(), byte_limit(settings, kind), kind)
    if scheme in ("http", "https"):
        return download(url.strip(), settings, kind)
    shown = f"the scheme {scheme}:" if scheme else "a local path"
    example = "data:image/png;base64,..." if kind == "image" else "data:video/mp4;base64,..."
    raise MediaError(f"{shown} is not read: give the {kind} as a data: URL ({example}) or an http(s) URL")


def byte_limit(settings: MediaSettings, kind: MediaKind) -> int:
    return settings.media_max_image_bytes if kind == "image" else settings.media_max_video_bytes


def limit_name(kind: MediaKind) -> str:
    return "MEDIA_MAX_IMAGE_BYTES" if kind == "image" else "MEDIA_MAX_VIDEO_BYTES"


def data_url_bytes(url: str, max_bytes: int, kind: MediaKind = "image") -> bytes:
    """The payload of `data:[<type>][;base64],<data>`; refused above max_bytes before it is decoded."""
    head, comma, payload = url[len("data:"):].partition(",")
    if not comma:
        raise MediaError(f"a data: URL needs a comma before its data (data:{kind}/...;base64,...)")
    media_type = head.split(";")[0].strip().lower()
    # a GIF or WebP animation is a video too; application/octet-stream is what some clients send for any file
    accepted = ("image/",) if kind == "image" else ("video/", "image/gif", "image/webp", "application/octet-stream")
    if media_type and not media_type.startswith(accepted):
        raise MediaError(f"the data: URL holds {media_type}, not {'an image' if kind == 'image' else 'a video'}")
    if ";base64" not in head.lower():
        data = urllib.parse.unquote_to_bytes(payload)
    else:
        payload = "".join(payload.split())
        if len(payload) // 4 * 3 > max_bytes + 3:
            raise MediaError(f"the {kind} is about {mebibytes(len(payload) // 4 * 3)}, above the limit of "
                             f"{mebibytes(max_bytes)} ({limit_name(kind)})")
        try:
            data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise MediaError("the data: URL's base64 text is not valid base64") from None
    if len(data) > max_bytes:
        raise MediaError(f"the {kind} is {mebibytes(len(data))}, above the limit of {mebibytes(max_bytes)} "
                         f"({limit_name(kind)})")
    if not data:
        raise MediaError("the data: URL is empty")
    return data


def is_public(address: str) -> bool:
    """Whether an IP address is on the public internet (not loopback, private, link-local, multicast, reserved,
    unspecified, carrier-grade NAT; an IPv4-mapped IPv6 address is judged by its IPv4 address)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check_host(url: str, allow_private: bool) -> None:
    """MediaError unless url is http(s) with a host whose every address is public (or allow_private)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        raise MediaError(f"the image URL redirects to the scheme {parts.scheme}:, which is not read")
    host = parts.hostname
    if not host:
        raise MediaError("the image URL has no host")
    if allow_private:
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, parts.port or None, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError):
        raise MediaError(f"the image URL's host {host} could not be resolved") from None
    if not addresses or not all(is_public(str(a)) for a in addresses):
        raise MediaError(f"the image URL's host {host} is a loopback, private or link-local address, which this "
                         "server does not fetch (MEDIA_ALLOW_PRIVATE_URLS=1 allows it)")


class CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are checked like the first URL, and only MAX_REDIRECTS of them followed."""

    max_redirections = MAX_REDIRECTS

    def __init__(self, allow_private: bool):
        self.allow_private = allow_private

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        check_host(newurl, self.allow_private)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def download(url: str, settings: MediaSettings, kind: MediaKind = "image") -> bytes:
    """The body at an http(s) URL: at most MEDIA_MAX_IMAGE_BYTES (MEDIA_MAX_VIDEO_BYTES), within
    MEDIA_FETCH_TIMEOUT seconds in all."""
    check_host(url, settings.media_allow_private_urls)
    limit, timeout, setting = byte_limit(settings, kind), settings.media_fetch_timeout, limit_name(kind)
    opener = urllib.request.build_opener(CheckedRedirects(settings.media_allow_private_urls))
    request = urllib.request.Request(url, headers={"User-Agent": "selfllm", "Accept": f"{kind}/*"})
    deadline = time.monotonic() + timeout
    try:
        with opener.open(request, timeout=timeout) as answer:
            declared = answer.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise MediaError(f"the {kind} at the URL is {mebibytes(int(declared))}, above the limit of "
                                 f"{mebibytes(limit)} ({setting})")
            body = bytearray()
            while chunk := answer.read(CHUNK):
                body += chunk
                if len(body) > limit:
                    raise MediaError(f"the {kind} at the URL is larger than the limit of {mebibytes(limit)} ({setting})")
                if time.monotonic() > deadline:
                    raise MediaError(f"the {kind} URL took longer than {timeout:g} s (MEDIA_FETCH_TIMEOUT)")
    except MediaError:
        raise
    except urllib.error.HTTPError as exc:
        raise MediaError(f"the {kind} URL answered HTTP {exc.code}") from None
    except (TimeoutError, socket.timeout):
        raise MediaError(f"the {kind} URL took longer than {timeout:g} s (MEDIA_FETCH_TIMEOUT)") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise MediaError(f"the {kind} URL could not be fetched ({reason})") from None
    return bytes(body)


def decode_image(data: bytes, max_pixels: int) -> Image:
    """An RGB PIL image from encoded bytes, scaled down (aspect kept) to at most max_pixels."""
    from PIL import Image as PILImage

    # PIL's own decompression-bomb guard at a bound far above any image a model reads (and what it would
    # allocate): a tiny file that declares a huge canvas is refused before it is decoded.
    bound = max(max_pixels * 16, 64_000_000)
    try:
        with PILImage.open(io.BytesIO(data)) as opened:
            if opened.width * opened.height > bound:
                raise MediaError(f"the image is {opened.width}×{opened.height} pixels, far above what is read "
                                 f"({max_pixels} pixels, MEDIA_MAX_IMAGE_PIXELS)")
            image = opened.convert("RGB")  # loads (decodes) the first frame
    except MediaError:
        raise
    except PILImage.DecompressionBombError:
        raise MediaError("the image declares more pixels than this server decodes") from None
    except Exception:  # noqa: BLE001 - PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError...)
        raise MediaError("the data is not an image this server can decode (PNG, JPEG, WebP, GIF, BMP...)") from None
    if image.width * image.height > max_pixels:
        scale = math.sqrt(max_pixels / (image.width * image.height))
        size = (max(1, math.floor(image.width * scale)), max(1, math.floor(image.height * scale)))
        image = image.resize(size, PILImage.Resampling.BICUBIC)
    return image


def load_image(url: str, settings: MediaSettings) -> Image:
    """The image an `image_url` part points at, checked and decoded; MediaError says what is wrong."""
    return decode_image(media_bytes(url, settings, "image"), settings.media_max_image_pixels)


@dataclass(frozen=True)
class Video:
    """Frames sampled from a video (a T × H × W × 3 uint8 array) and where they came from."""

    frames: Any
    fps: float  # of the source video
    total_frames: int
    indices: list[int]  # of the sampled frames in the source

    def metadata(self) -> Any:
        """transformers' VideoMetadata of the sampled frames (Qwen3-VL and GLM-4.1V write their times in the prompt)."""
        from transformers.video_utils import VideoMetadata

        return VideoMetadata(total_num_frames=self.total_frames, fps=self.fps, frames_indices=list(self.indices),
                             duration=self.total_frames / self.fps, height=int(self.frames.shape[1]),
                             width=int(self.frames.shape[2]), video_backend="pyav")

    def thumbnail(self) -> Any:
        """The middle sampled frame as a PIL image (what a chat history shows)."""
        from PIL import Image as PILImage

        return PILImage.fromarray(self.frames[len(self.frames) // 2])


def scaled_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) scaled down, aspect kept, to at most max_pixels; even sizes (what video codecs give)."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(2, math.floor(width * scale) // 2 * 2), max(2, math.floor(height * scale) // 2 * 2)


def sample_times(duration: float, max_frames: int, fps: float = VIDEO_SAMPLE_FPS) -> list[float]:
    """Where frames are taken from a video of `duration` seconds: `fps` a second, at most max_frames, spread
    evenly (the middle of equal spans)."""
    count = max(1, min(max_frames, round(duration * fps)))
    return [(i + 0.5) * duration / count for i in range(count)]


def open_video(data: bytes) -> Any:
    import av

    try:
        return av.open(io.BytesIO(data), mode="r")
    except Exception:  # noqa: BLE001 - FFmpeg raises per format (InvalidDataError, ValueError...)
        raise MediaError("the data is not a video this server can decode (MP4, WebM, MKV, MOV, AVI, GIF...)") from None


def decode_video(data: bytes, max_frames: int, max_pixels: int) -> Video:
    """Frames sampled from an encoded video (MP4, WebM, MKV, MOV, AVI, an animated GIF...) with PyAV: two a
    second, at most max_frames, each scaled to at most max_pixels. The frames' times come from the packets (no
    decoding); then only the sampled frames are converted, so memory holds max_frames frames, not the video."""
    try:
        import av  # noqa: F401
    except ImportError:
        raise MediaError("this server can't decode video: PyAV (av) is not installed") from None
    import numpy as np

    with open_video(data) as container:
        if not container.streams.video:
            raise MediaError("the file holds no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > max(max_pixels * 16, 64_000_000):
            raise MediaError(f"the video is {width}×{height} pixels a frame, far above what is read ({max_pixels} "
                             "pixels a frame, MEDIA_MAX_VIDEO_PIXELS)")
        rate = float(stream.average_rate or stream.guessed_rate or 0) or 24.0
        time_base = stream.time_base
        try:
            stamps = [packet.pts for packet in container.demux(stream) if packet.size]
        except Exception:  # noqa: BLE001
            raise MediaError("the video could not be read (a damaged or cut-off file)") from None
    if not stamps:
        raise MediaError("the video holds no frames")
    if len(stamps) > MAX_DECODED_FRAMES:
        raise MediaError(f"the video has {len(stamps)} frames, more than the {MAX_DECODED_FRAMES} this server decodes; "
                         "send a shorter clip")
    if time_base is None or any(stamp is None for stamp in stamps):  # no timing: evenly spaced frames
        times = [i / rate for i in range(len(stamps))]
    else:
        ordered = sorted(float(stamp * time_base) for stamp in stamps)  # packets come in decoding order
        times = [t - ordered[0] for t in ordered]
    duration = times[-1] + 1 / rate
    wanted = sorted({min(range(len(times)), key=lambda i: abs(times[i] - t)) for t in sample_times(duration, max_frames)})
    size = scaled_size(width, height, max_pixels) if width and height else None
    frames: dict[int, Any] = {}
    with open_video(data) as container:
        try:
            for index, frame in enumerate(container.decode(container.streams.video[0])):
                if index in wanted:
                    frames[index] = (frame.to_ndarray(format="rgb24", width=size[0], height=size[1]) if size else
                                     frame.to_ndarray(format="rgb24"))
                if index >= wanted[-1]:
                    break
        except Exception:  # noqa: BLE001
            if not frames:
                raise MediaError("the video could not be decoded (a damaged or cut-off file)") from None
    if not frames:
        raise MediaError("the video holds no frames that decode")
    indices = sorted(frames)
    return Video(np.stack([frames[i] for i in indices]), fps=rate, total_frames=len(stamps), indices=indices)


def load_video(url: str, settings: MediaSettings) -> Video:
    """The video a `video_url` part points at, checked, decoded and sampled; MediaError says what is wrong."""
    return decode_video(media_bytes(url, settings, "video"), settings.media_max_video_frames,
                        settings.media_max_video_pixels)
