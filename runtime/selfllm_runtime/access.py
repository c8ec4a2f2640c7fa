"""Who may reach a serving task: the checks every server makes with its access settings
(settings.AccessSettings):

- `HOST` (default 0.0.0.0): the address a server binds. A container needs 0.0.0.0 for its published
  port, and AutoDL's custom-service port mapping needs the server reachable on the instance, so the
  default stays; 127.0.0.1 keeps a native install private to its machine (reach it by SSH tunnel).
- `API_KEY`: one key for every task: fastapi's `Authorization: Bearer` check, vLLM's `--api-key`,
  the webdemo's login gate.

- `PORT` (default: the recipe's): the port; `selfllm start` refuses one it can't listen on (already
  taken) in one line, exit 2, before the model is fetched or loaded.

A server started on a non-loopback address without an API key prints one warning line at start.
"""
from __future__ import annotations

import hmac
import ipaddress
import socket
import sys
from typing import TextIO

from .settings import SettingsError

ENV_HOST = "HOST"
ENV_PORT = "PORT"
ENV_API_KEY = "API_KEY"


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def exposure_warning(host: str, port: int | str, key: str) -> str | None:
    """The one warning line for a server on a non-loopback address without a key; None when safe."""
    if key or is_loopback(host):
        return None
    return (f"selfllm: WARNING: serving on {host}:{port} without {ENV_API_KEY}: anyone who reaches this "
            f"port can use the model. Set {ENV_API_KEY}=<secret>, or bind {ENV_HOST}=127.0.0.1 and use an "
            f"SSH tunnel; with Docker publish on loopback only (-p 127.0.0.1:{port}:{port}).")


def warn_if_exposed(host: str, port: int | str, key: str, out: TextIO | None = None) -> str | None:
    """Print exposure_warning (if any) on stderr; return it."""
    line = exposure_warning(host, port, key)
    if line is not None:
        print(line, file=out or sys.stderr, flush=True)
    return line


def check_port_free(host: str, port: int) -> None:
    """SettingsError (one line naming PORT) unless a server could listen on host:port now: `selfllm start` checks
    it before it fetches or loads the model. Bound as uvicorn and vLLM bind (SO_REUSEADDR: a port that only
    has connections closing is free), then released."""
    try:
        family, kind, proto, _, where = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(where)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise SettingsError(f"{ENV_PORT}={port}: can't listen on {host}:{port} ({reason}); another server may "
                            f"have it: give {ENV_PORT} a free port (or check {ENV_HOST})") from None


def keys_match(given: str | bytes, expected: str) -> bool:
    """Constant-time comparison of a presented key with the expected one."""
    given_bytes = given.encode() if isinstance(given, str) else given
    return hmac.compare_digest(given_bytes, expected.encode())


def bearer_token(authorization: str | bytes | None) -> bytes | None:
    """The credentials of an `Authorization: Bearer <token>` header; the scheme is case-insensitive
    (RFC 7235). None for a missing header or another scheme."""
    if not authorization:
        return None
    raw = authorization.encode("latin-1") if isinstance(authorization, str) else authorization
    scheme, _, token = raw.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    return token.strip()
