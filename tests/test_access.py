"""access.py and its use by every serving task: HOST, API_KEY, the one exposure warning at start."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import pytest

from selfllm_recipes.layout import RECIPES_DIR, REPO_ROOT
from selfllm_runtime.access import bearer_token, exposure_warning, is_loopback, keys_match
from selfllm_runtime.settings import AccessSettings, resolve
from selfllm_runtime.context import load_context


@pytest.mark.parametrize("host,loopback", [
    ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("example.org", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_warning_only_for_a_non_loopback_address_without_a_key():
    line = exposure_warning("0.0.0.0", 6006, "")
    assert line is not None and "\n" not in line
    assert "0.0.0.0:6006" in line and "API_KEY" in line and "127.0.0.1:6006:6006" in line
    assert exposure_warning("0.0.0.0", 6006, "k") is None
    assert exposure_warning("127.0.0.1", 6006, "") is None


def test_host_defaults_to_all_interfaces_for_containers_and_autodl():
    assert resolve(AccessSettings, env={}).host == "0.0.0.0"
    assert resolve(AccessSettings, env={"HOST": " 127.0.0.1 "}).host == "127.0.0.1"


@pytest.mark.parametrize("header,token", [
    ("Bearer k1", b"k1"), ("bearer k1", b"k1"), ("BEARER  k1 ", b"k1"), (b"Bearer k1", b"k1"),
    ("Basic k1", None), ("k1", None), ("", None), (None, None),
])
def test_bearer_token_scheme_is_case_insensitive(header, token):
    assert bearer_token(header) == token


def test_keys_match_exactly():
    assert keys_match("s3cret", "s3cret") and keys_match(b"s3cret", "s3cret")
    assert not keys_match("s3cre", "s3cret") and not keys_match("", "s3cret") and not keys_match("S3CRET", "s3cret")


# ----------------------------------------------------------------------------- every server warns at start

def only_env(monkeypatch, env: dict[str, str], names: tuple[str, ...]) -> None:
    """Of `names`, exactly those in env are set."""
    for name in names:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("selfllm: WARNING: serving on")]


@pytest.mark.parametrize("env,warned", [({}, True), ({"API_KEY": "k"}, False), ({"HOST": "127.0.0.1"}, False)])
def test_fastapi_warns_once_when_open(engine, monkeypatch, capsys, env, warned):
    import uvicorn

    from selfllm_runtime.tasks import fastapi_server

    only_env(monkeypatch, env, ("HOST", "API_KEY"))
    served: dict[str, Any] = {}
    monkeypatch.setattr(fastapi_server, "ChatEngine", lambda context, model_dir, settings: engine)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: served.update(kwargs))
    fastapi_server.run(engine.context, Path("/unused"), engine.context.settings())
    assert served["host"] == env.get("HOST", "0.0.0.0")
    lines = _warnings(capsys.readouterr().err)
    assert lines == ([exposure_warning("0.0.0.0", 6006, "")] if warned else [])


class Exec(Exception):
    """Raised instead of replacing the process."""


@pytest.mark.parametrize("env,warned", [({}, True), ({"API_KEY": "k"}, False), ({"HOST": "::1"}, False)])
def test_webdemo_warns_once_when_open_and_binds_host(monkeypatch, capsys, env, warned):
    from selfllm_runtime.tasks import webdemo

    only_env(monkeypatch, env, ("HOST", "API_KEY"))
    seen: list[list[str]] = []

    def fake_execve(path: str, argv: list[str], environ: dict[str, str]) -> None:
        seen.append(argv)
        raise Exec

    monkeypatch.setattr(os, "execve", fake_execve)
    with pytest.raises(Exec):
        context = load_context(RECIPES_DIR / "qwen3" / "webdemo")
        webdemo.run(context, Path("/unused"), context.settings())
    argv = seen[0]
    assert argv[argv.index("--server.address") + 1] == env.get("HOST", "0.0.0.0")
    assert len(_warnings(capsys.readouterr().err)) == (1 if warned else 0)


@pytest.mark.parametrize("env,warned,secret", [
    ({}, True, None),
    ({"API_KEY": "sk-vllm-key-1"}, False, "sk-vllm-key-1"),
    ({"HOST": "127.0.0.1"}, False, None),
    ({"VLLM_ARGS": "--api-key key-from-args"}, False, "key-from-args"),
    ({"HOST": "127.0.0.1", "VLLM_ARGS": "--host 0.0.0.0"}, True, None),  # VLLM_ARGS come last and win
])
def test_vllm_warns_once_when_open_and_never_logs_the_key(monkeypatch, capsys, caplog, env, warned, secret):
    from selfllm_runtime.tasks import vllm_server

    only_env(monkeypatch, env, ("HOST", "API_KEY", "VLLM_ARGS"))
    seen: list[list[str]] = []

    def fake_execv(path: str, argv: list[str]) -> None:
        seen.append(argv)
        raise Exec

    monkeypatch.setattr(vllm_server, "installed_build",
                        lambda: vllm_server.VllmBuild(vllm_server.GPU_PACKAGE, "0.19.1"))
    monkeypatch.setattr(os, "execv", fake_execv)
    # "selfllm": vllm_server logs the build and address, engine_server the exec'd command line
    with caplog.at_level(logging.INFO, logger="selfllm"), pytest.raises(Exec):
        context = load_context(RECIPES_DIR / "qwen3" / "vllm")
        vllm_server.run(context, Path("/m"), context.settings())
    assert len(_warnings(capsys.readouterr().err)) == (1 if warned else 0)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "exec " in logged
    if secret is not None:
        argv = seen[0]
        assert argv[argv.index("--api-key") + 1] == secret
        assert secret not in logged and "<API_KEY>" in logged


# ----------------------------------------------------------------------------- the documented commands

def _docker_runs(text: str) -> list[str]:
    """Every `docker run` command in text, backslash continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [m.group(0) for m in re.finditer(r"docker run [^\n`]*", joined)]


def test_documented_docker_runs_publish_on_loopback_unless_a_key_is_set():
    readmes = [REPO_ROOT / "README.md", *sorted(RECIPES_DIR.glob("*/*/README.md"))]
    offenders, published = [], 0
    for readme in readmes:
        for command in _docker_runs(readme.read_text()):
            ports = re.findall(r"(?:^|\s)-p\s+(\S+)", command)
            published += len(ports)
            if any(not port.startswith("127.0.0.1:") for port in ports) and "API_KEY=" not in command:
                offenders.append(f"{readme.relative_to(REPO_ROOT)}: {command}")
    assert published > 40 and not offenders, offenders


@pytest.mark.parametrize("task", ["fastapi", "vllm", "webdemo"])
def test_every_serving_readme_says_how_to_expose_it_safely(task):
    readme = (RECIPES_DIR / "qwen3" / task / "README.md").read_text()
    assert "## 安全地开放服务" in readme and "**Exposing it safely.**" in readme
    assert "| `API_KEY` |" in readme and "| `HOST` |" in readme
    if task == "vllm":
        assert "--api-key" in readme
