"""`make publish` against a real distribution registry (Debian's docker-registry, started here on 127.0.0.1):
tags, storage growth of a second recipe, pull-back, refusals, nothing moving-tagged after a failure, and a
builder taking a published stack by its input hash. The images are small stand-ins with the real layering
(base → stack → recipe) and labels, so the test stays quick; the real qwen3 images are pushed by
`benchmarks/publish_local.py`."""
from __future__ import annotations

import datetime
import io
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from conftest import missing_prerequisite
from selfllm_recipes.build import INPUT_HASH_LABEL
from selfllm_recipes.discover import load_spec
from selfllm_recipes.layout import RECIPES_DIR
from selfllm_recipes.publish import PublishError, Registry, check_reachable, plan, pull_published, push

pytestmark = pytest.mark.docker

PREFIX = "selfllm-publish-test"
REGISTRY_BIN = "/usr/bin/docker-registry"
SPECS = ["qwen3/fastapi", "qwen3/lora"]
TODAY = datetime.date(2026, 11, 28)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real registry process on 127.0.0.1 with filesystem storage; yields (Registry, storage folder)."""
    if not Path(REGISTRY_BIN).is_file():
        missing_prerequisite(f"{REGISTRY_BIN} missing: run scripts/setup_host.sh (Debian package docker-registry)")
    work = tmp_path_factory.mktemp("registry")
    port = _free_port()
    (work / "config.yml").write_text(
        "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: " + str(work / "data")
        + "\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:" + str(port) + "\n")
    process = subprocess.Popen([REGISTRY_BIN, "serve", str(work / "config.yml")], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/v2/"
    for _ in range(100):
        try:
            if requests.get(url, timeout=1).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(0.1)
    else:
        process.kill()
        pytest.fail(f"registry did not start: {process.stderr.read().decode()[-500:]}")
    yield Registry(f"127.0.0.1:{port}", "selfllm"), work / "data"
    process.terminate()
    process.wait(timeout=10)


def _image(client, tag: str, parent: str, input_hash: str, megabytes: int) -> str:
    """A small image FROM parent with one layer of `megabytes` random bytes and the builder's input-hash label."""
    dockerfile = (f"FROM {parent}\nLABEL {INPUT_HASH_LABEL}={input_hash}\n"
                  f"RUN head -c {megabytes * 1024 * 1024} /dev/urandom > /layer-{input_hash}\n")
    image, _ = client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True, network_mode="host")
    return image.id


@pytest.fixture(scope="module")
def images(docker_client):
    """base (2 MB) → stack (24 MB, 'the torch layer') → two recipes (1 MB each), under PREFIX; removed after."""
    _image(docker_client, f"{PREFIX}/base:cuda12.1", "selfllm/local-base:bookworm", "b45e0000", 2)
    _image(docker_client, f"{PREFIX}/stack:torch2.6.0-cu12", f"{PREFIX}/base:cuda12.1", "57ac0000", 24)
    ids = {key: _image(docker_client, f"{PREFIX}/{key.replace('/', '-')}:latest", f"{PREFIX}/stack:torch2.6.0-cu12",
                       f"{key.split('/')[1][:4]}0000", 1) for key in SPECS}
    yield ids
    from docker.errors import ImageNotFound

    tags = {tag for image in docker_client.images.list() for tag in image.tags
            if tag.startswith(PREFIX + "/") or (tag.startswith("127.0.0.1:") and "/selfllm/" in tag)}
    for tag in sorted(tags):
        try:
            docker_client.images.remove(tag)
        except ImageNotFound:
            pass


def _results(ids: dict[str, str], **changes) -> dict[str, dict]:
    rows = {key: {"recipe": key, "status": "pass", "image": f"{PREFIX}/{key.replace('/', '-')}:latest",
                  "image_id": ids[key], "input_hash": f"{key.split('/')[1][:4]}0000"} for key in SPECS}
    for key, change in changes.items():
        rows[key.replace("__", "/")].update(change)
    return rows


def _tags(registry: Registry, name: str) -> set[str]:
    answer = requests.get(f"{registry.api}{registry.namespace}/{name}/tags/list", timeout=10)
    return set(answer.json().get("tags") or []) if answer.status_code == 200 else set()


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_publish_tags_storage_and_pull_back(docker_client, registry, images):
    reg, storage = registry
    specs = [load_spec(RECIPES_DIR / key) for key in SPECS]
    results = _results(images)
    push(docker_client, plan(docker_client, reg, specs[:1], results, TODAY, "0123456789ab", prefix=PREFIX), say=lambda _: None)
    assert _tags(reg, "qwen3-fastapi") == {"in-fast0000", "git-0123456789ab", "cu121-20261128", "latest",
                                           "cu121-torch2.6.0"}
    assert _tags(reg, "stack") == {"in-57ac0000", "torch2.6.0-cu12"} and _tags(reg, "base") == {"in-b45e0000", "cuda12.1"}
    before = _size(storage)
    push(docker_client, plan(docker_client, reg, specs[1:], results, TODAY, "0123456789ab", prefix=PREFIX), say=lambda _: None)
    grown = _size(storage) - before
    # the second recipe adds its own 1 MB layer (+ manifests), never the 24 MB stack again
    assert 1024 * 1024 <= grown < 3 * 1024 * 1024, grown
    assert "in-lora0000" in _tags(reg, "qwen3-lora")
    # the local copy goes, the registry's comes back with its labels
    docker_client.images.remove(f"{PREFIX}/qwen3-lora:latest")
    pulled = docker_client.images.pull(reg.repo("qwen3-lora"), tag="in-lora0000")
    assert pulled.id == images["qwen3/lora"] and pulled.labels[INPUT_HASH_LABEL] == "lora0000"
    pulled.tag(f"{PREFIX}/qwen3-lora", "latest")


def test_publish_refuses_what_was_not_a_pass_of_this_image(docker_client, registry, images):
    reg, _ = registry
    specs = [load_spec(RECIPES_DIR / key) for key in SPECS]
    with pytest.raises(PublishError, match="qwen3/lora: its last smoke test did not pass"):
        plan(docker_client, reg, specs, _results(images, qwen3__lora={"status": "fail"}), TODAY, "x", prefix=PREFIX)
    with pytest.raises(PublishError, match="qwen3/fastapi: image .* changed since its last smoke test"):
        plan(docker_client, reg, specs, _results(images, qwen3__fastapi={"input_hash": "0ld"}), TODAY, "x", prefix=PREFIX)
    with pytest.raises(PublishError, match="qwen3/lora: never smoke-tested here"):
        plan(docker_client, reg, specs, {"qwen3/fastapi": _results(images)["qwen3/fastapi"]}, TODAY, "x", prefix=PREFIX)
    with pytest.raises(PublishError, match="expected <host"):
        Registry.parse("selfllm")  # no namespace
    with pytest.raises(PublishError, match="unreachable"):
        check_reachable(Registry(f"127.0.0.1:{_free_port()}", "selfllm"), timeout=2)


def test_a_failed_push_leaves_no_moving_tag(docker_client, registry, images, monkeypatch, tmp_path):
    """A push that fails half-way stops before any moving tag (latest, the stack variant) is written."""
    from selfllm_recipes import publish

    reg = Registry(registry[0].host, "halfway")
    specs = [load_spec(RECIPES_DIR / key) for key in SPECS]
    items = plan(docker_client, reg, specs, _results(images), TODAY, "0123456789ab", prefix=PREFIX)
    real = publish._push_one

    def failing(client, item, tag):
        if item.repo.endswith("qwen3-lora"):
            raise PublishError(f"{item.source} → {item.repo}:{tag}: unauthorized")
        real(client, item, tag)

    monkeypatch.setattr(publish, "_push_one", failing)
    with pytest.raises(PublishError, match="unauthorized"):
        push(docker_client, items, say=lambda _: None)
    for name in ("base", "stack", "qwen3-fastapi", "qwen3-lora"):
        tags = _tags(reg, name)
        assert not tags & {"latest", "cu121-torch2.6.0", "torch2.6.0-cu12", "cuda12.1"}, (name, tags)
    assert "in-fast0000" in _tags(reg, "qwen3-fastapi")  # complete images by content hash only
    assert not [t for i in docker_client.images.list(name=f"{reg.host}/halfway/*") for t in i.tags]  # no local leftovers


def test_the_builder_takes_a_published_stack_by_its_input_hash(docker_client, registry, images):
    reg, _ = registry
    push(docker_client, plan(docker_client, reg, [load_spec(RECIPES_DIR / "qwen3/fastapi")], _results(images), TODAY,
                             "0123456789ab", prefix=PREFIX), say=lambda _: None)
    stack_id = docker_client.images.get(f"{PREFIX}/stack:torch2.6.0-cu12").id
    docker_client.images.remove(f"{PREFIX}/stack:torch2.6.0-cu12")
    assert pull_published(docker_client, reg, f"{PREFIX}/stack:torch2.6.0-cu12", "57ac0000")
    taken = docker_client.images.get(f"{PREFIX}/stack:torch2.6.0-cu12")
    assert taken.id == stack_id and taken.labels[INPUT_HASH_LABEL] == "57ac0000"
    assert not pull_published(docker_client, reg, f"{PREFIX}/stack:torch2.6.0-cu12", "0ther000")  # not published
