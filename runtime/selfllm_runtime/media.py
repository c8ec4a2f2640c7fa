"""Images of a request, read once for every task kind that serves a vision-language family: OpenAI's
`image_url` parts (a data: URL, or an http(s) URL this server downloads), decoded with PIL, held to the limits
the family's model.yaml `modalities.image` sets (MEDIA_* settings override them).

- data: URLs are always read (`data:image/png;base64,...`);
- http(s) URLs are downloaded with a size limit (MEDIA_MAX_IMAGE_BYTES) and a time limit (MEDIA_FETCH_TIMEOUT),
  redirects followed (at most MAX_REDIRECTS) and checked like the first address; a host that resolves to a
  loopback, private, link-local or otherwise non-public address is refused unless MEDIA_ALLOW_PRIVATE_URLS=1
  (the server must not be a way into the network it sits in);
- local paths, file: and every other scheme are never read;
- an image above MEDIA_MAX_IMAGE_PIXELS (width × height) is scaled down to fit, keeping its aspect ratio.

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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL.Image import Image

    from .metadata import ModelFamily
    from .settings import MediaSettings

MAX_REDIRECTS = 5
CHUNK = 64 * 1024
# Where the refusal of an image for a text-only family points (the runtime in an image knows its own family only).
VISION_RECIPES_HINT = "a vision-language recipe such as gemma3"


class MediaError(ValueError):
    """An image (or video) part this server will not use; the text says why."""


def check_media(family: ModelFamily, model_reads_images: bool, model_class: str, kind: str, role: str,
                number: int, max_images: int) -> None:
    """MediaError unless the `number`-th image (from 1) of a request may go to this model: the family takes the
    kind (model.yaml modalities), the loaded checkpoint has a vision tower, the message is a user or assistant
    turn, and the request holds no more than max_images (MEDIA_MAX_IMAGES). Video is never read here."""
    if not family.modalities.takes(kind):  # type: ignore[arg-type]
        takes = " and ".join(family.modalities.input)
        hint = VISION_RECIPES_HINT if kind == "image" else "a recipe whose family takes video"
        raise MediaError(f"{family.display_name} takes {takes} only; {kind} input needs {hint}")
    if kind != "image":
        raise MediaError(f"this server reads images only; {family.display_name}'s {kind} input is served by its "
                         "vllm recipe")
    if not model_reads_images:
        raise MediaError(f"the loaded checkpoint ({model_class}) has no vision tower: it takes text only")
    if role not in ("user", "assistant"):
        raise MediaError(f"images go in user (or assistant) messages, not in a {role} message")
    if number > max_images:
        raise MediaError(f"more than {max_images} images in one request (MEDIA_MAX_IMAGES)")


def mebibytes(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size} bytes"


def image_bytes(url: str, settings: MediaSettings) -> bytes:
    """The encoded image an `image_url` url points at: a data: URL's payload, or an http(s) download."""
    scheme = urllib.parse.urlsplit(url.strip()).scheme.lower()
    if scheme == "data":
        return data_url_bytes(url.strip(), settings.media_max_image_bytes)
    if scheme in ("http", "https"):
        return download(url.strip(), settings)
    shown = f"the scheme {scheme}:" if scheme else "a local path"
    raise MediaError(f"{shown} is not read: give the image as a data: URL (data:image/png;base64,...) or an "
                     "http(s) URL")


def data_url_bytes(url: str, max_bytes: int) -> bytes:
    """The payload of `data:[<type>][;base64],<data>`; refused above max_bytes before it is decoded."""
    head, comma, payload = url[len("data:"):].partition(",")
    if not comma:
        raise MediaError("a data: URL needs a comma before its data (data:image/png;base64,...)")
    media_type = head.split(";")[0].strip().lower()
    if media_type and not media_type.startswith("image/"):
        raise MediaError(f"the data: URL holds {media_type}, not an image")
    if ";base64" not in head.lower():
        data = urllib.parse.unquote_to_bytes(payload)
    else:
        payload = "".join(payload.split())
        if len(payload) // 4 * 3 > max_bytes + 3:
            raise MediaError(f"the image is about {mebibytes(len(payload) // 4 * 3)}, above the limit of "
                             f"{mebibytes(max_bytes)} (MEDIA_MAX_IMAGE_BYTES)")
        try:
            data = base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise MediaError("the data: URL's base64 text is not valid base64") from None
    if len(data) > max_bytes:
        raise MediaError(f"the image is {mebibytes(len(data))}, above the limit of {mebibytes(max_bytes)} "
                         "(MEDIA_MAX_IMAGE_BYTES)")
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


def download(url: str, settings: MediaSettings) -> bytes:
    """The body at an http(s) URL: at most MEDIA_MAX_IMAGE_BYTES, within MEDIA_FETCH_TIMEOUT seconds in all."""
    check_host(url, settings.media_allow_private_urls)
    limit, timeout = settings.media_max_image_bytes, settings.media_fetch_timeout
    opener = urllib.request.build_opener(CheckedRedirects(settings.media_allow_private_urls))
    request = urllib.request.Request(url, headers={"User-Agent": "selfllm", "Accept": "image/*"})
    deadline = time.monotonic() + timeout
    try:
        with opener.open(request, timeout=timeout) as answer:
            declared = answer.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > limit:
                raise MediaError(f"the image at the URL is {mebibytes(int(declared))}, above the limit of "
                                 f"{mebibytes(limit)} (MEDIA_MAX_IMAGE_BYTES)")
            body = bytearray()
            while chunk := answer.read(CHUNK):
                body += chunk
                if len(body) > limit:
                    raise MediaError(f"the image at the URL is larger than the limit of {mebibytes(limit)} "
                                     "(MEDIA_MAX_IMAGE_BYTES)")
                if time.monotonic() > deadline:
                    raise MediaError(f"the image URL took longer than {timeout:g} s (MEDIA_FETCH_TIMEOUT)")
    except MediaError:
        raise
    except urllib.error.HTTPError as exc:
        raise MediaError(f"the image URL answered HTTP {exc.code}") from None
    except (TimeoutError, socket.timeout):
        raise MediaError(f"the image URL took longer than {timeout:g} s (MEDIA_FETCH_TIMEOUT)") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise MediaError(f"the image URL could not be fetched ({reason})") from None
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
    return decode_image(image_bytes(url, settings), settings.media_max_image_pixels)
