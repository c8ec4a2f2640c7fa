"""Look for credentials in what an image ships besides its files: the config's Env and Labels and
each layer's `CreatedBy` (which records ENV lines and the build args a RUN used, `|1 NAME=value`).

Anyone who pulls an image reads these with `docker image inspect` / `docker history`, so none may
hold a secret. Flagged:
- a URL with credentials (`scheme://user:password@host`),
- a variable, label or build arg whose name says secret (KEY, TOKEN, SECRET, PASSWORD, ...)
  with a non-empty value,
- known token shapes anywhere (Hugging Face `hf_…`, OpenAI-style `sk-…`, GitHub, AWS, private keys).
A finding names where it is and why, never the whole value.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

SECRET_NAME_PARTS = frozenset({"KEY", "APIKEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "PASS", "CREDENTIAL",
                               "CREDENTIALS", "AUTH"})
# Names that hold public values although their name says otherwise.
PUBLIC_NAMES = frozenset({"GPG_KEY"})  # official python images: the release signer's key fingerprint
URL_WITH_CREDENTIALS = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@")
TOKEN_SHAPES = {
    "a Hugging Face token (hf_…)": re.compile(r"\bhf_[A-Za-z0-9]{30,}"),
    "an OpenAI-style key (sk-…)": re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"),
    "a GitHub token": re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})"),
    "an AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "a private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
}
BUILD_ARGS_PREFIX = re.compile(r"^(?:RUN\s+)?\|(\d+)\s+")  # `|2 A=x B=y /bin/sh -c ...`


@dataclass(frozen=True)
class Finding:
    where: str  # "Config.Env", "Config.Labels", "history[3]"
    name: str  # the variable, label or build arg; "" for free text
    reason: str

    def __str__(self) -> str:
        return f"{self.where}{f' {self.name}' if self.name else ''}: {self.reason}"


def has_secret_name(name: str) -> bool:
    """API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY, DB_PASSWORD, OPENAI_APIKEY… (one of the parts the name's
    `_`, `-`, `.` or `/` separate is a secret word)."""
    if name.upper() in PUBLIC_NAMES:
        return False
    return bool(SECRET_NAME_PARTS & set(re.split(r"[_.\-/]", name.upper())))


def url_has_credentials(text: str) -> bool:
    return URL_WITH_CREDENTIALS.search(text) is not None


def value_reasons(text: str) -> list[str]:
    """Why a value (or any text) looks like it holds a credential."""
    reasons = ["a URL with credentials (user:password@)"] if url_has_credentials(text) else []
    reasons += [f"looks like {label}" for label, shape in TOKEN_SHAPES.items() if shape.search(text)]
    return reasons


def _pair_findings(where: str, name: str, value: str) -> list[Finding]:
    found = [Finding(where, name, reason) for reason in value_reasons(value)]
    if not found and value.strip() and has_secret_name(name):
        found.append(Finding(where, name, "a secret-named setting with a value"))
    return found


def history_build_args(created_by: str) -> list[tuple[str, str]]:
    """The build args a RUN step recorded: `|2 A=x B=y /bin/sh -c ...` → [(A, x), (B, y)]."""
    match = BUILD_ARGS_PREFIX.match(created_by)
    if match is None:
        return []
    words = created_by[match.end():].split(" ")
    pairs = [word.split("=", 1) for word in words[: int(match.group(1))]]
    return [(pair[0], pair[1]) for pair in pairs if len(pair) == 2]


def scan_config(config: Mapping[str, Any], history: Iterable[Mapping[str, Any]] = ()) -> list[Finding]:
    """Findings in an image's `Config` (as `docker image inspect` gives it) and its history entries."""
    found: list[Finding] = []
    for entry in config.get("Env") or []:
        name, _, value = entry.partition("=")
        found += _pair_findings("Config.Env", name, value)
    for name, value in (config.get("Labels") or {}).items():
        found += _pair_findings("Config.Labels", name, value or "")
    for index, step in enumerate(history):
        created_by = step.get("CreatedBy") or ""
        where = f"history[{index}]"
        found += [Finding(where, "", reason) for reason in value_reasons(created_by)]
        found += [Finding(where, name, "a secret-named build arg with a value")
                  for name, value in history_build_args(created_by)
                  if value.strip() and has_secret_name(name) and not value_reasons(value)]
    return found


def scan_image(client: Any, reference: str) -> list[Finding]:
    """Findings in one local image (docker SDK client): its config and `docker history`."""
    image = client.images.get(reference)
    return scan_config(image.attrs.get("Config") or {}, image.history())
