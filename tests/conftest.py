"""Shared fixtures. Docker-backed tests skip on a dev box without an engine but FAIL under CI=true."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")


def _engine_or_fail():
    import docker

    try:
        client = docker.from_env()
        client.ping()
        return client
    except Exception as exc:  # noqa: BLE001 - any engine failure means "no engine"
        message = f"Docker engine not reachable ({exc}); run scripts/setup_host.sh"
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(message + " — under CI=true a missing engine is a failure", pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="session")
def docker_client():
    """A docker SDK client for a running engine."""
    client = _engine_or_fail()
    yield client
    client.close()
