"""The native path (AutoDL: no Docker inside the instance): in a plain container standing in for the
instance (Debian + Python + torch, like AutoDL's PyTorch images), install a recipe with the same
script users run, start it, and call its API on 127.0.0.1."""
from __future__ import annotations

import subprocess
import sys

import pytest
import requests

from selfllm_recipes.discover import load_spec
from selfllm_recipes.layout import RECIPES_DIR, REPO_ROOT
from selfllm_recipes.smoke.checks import SmokeFailure, wait_until_healthy
from selfllm_recipes.smoke.runner import owner_label, session_of

pytestmark = pytest.mark.docker
CHECKOUT = "/root/self-llm-recipes"


@pytest.fixture(scope="module")
def instance_image(docker_client) -> str:
    """The torch stack image: an OS with Python and torch, but no recipe and no runtime in it."""
    spec = load_spec(RECIPES_DIR / "qwen3" / "fastapi")
    built = subprocess.run([sys.executable, "scripts/build_matrix.py", "--only", "qwen3/fastapi", "--no-smoke"],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=3000)
    assert built.returncode == 0, built.stdout + built.stderr
    return f"selfllm/stack:{spec.stack.name}"


def test_native_install_then_start_serves_the_api(docker_client, instance_image):
    from testcontainers.core.container import DockerContainer

    script = (f"python3 {CHECKOUT}/runtime/bin/selfllm-install {CHECKOUT}/recipes/qwen3/fastapi"
              " && selfllm smoke-model /root/autodl-tmp/tiny"
              " && MODEL_PATH=/root/autodl-tmp/tiny exec selfllm start")
    container = (DockerContainer(instance_image)
                 .with_volume_mapping(str(REPO_ROOT), CHECKOUT, "ro")
                 .with_env("PYTHONDONTWRITEBYTECODE", "1")
                 .with_env("HOST", "127.0.0.1")
                 .with_kwargs(entrypoint=["/bin/sh", "-c"], labels=owner_label(), network_mode="host")
                 .with_command([script]))
    # host networking: pip reaches the package index as on an AutoDL instance; the API is then on
    # the host's loopback at the recipe's port.
    try:
        container.start()
        session = session_of(container, "http://127.0.0.1:6006", "qwen3/fastapi (native)")
        try:
            wait_until_healthy(session, "/health", 900)
        except SmokeFailure as exc:
            pytest.fail(f"native install did not come up: {exc}\n{session.logs()[-3000:]}")
        answer = requests.post("http://127.0.0.1:6006/", json={"prompt": "你好", "history": [], "max_length": 16}, timeout=60)
        assert answer.status_code == 200 and answer.json()["response"].strip()
        assert "installed qwen3/fastapi" in session.logs()
    finally:
        container.stop()
