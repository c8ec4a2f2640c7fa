"""Build: one image node at a time through the Docker SDK (legacy builder, host network),
with OCI labels, the image's `pip freeze`, and reuse of an image whose inputs did not change."""
from __future__ import annotations

import datetime
import io
import logging
import os
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import docker
from docker.errors import ImageNotFound

from .images import ImageNode, NodeKind
from .layout import LABEL_PREFIX, REPO_ROOT

INPUT_HASH_LABEL = f"{LABEL_PREFIX}.input-hash"
RECIPE_LABEL = f"{LABEL_PREFIX}.recipe"
FREEZE_LABEL = f"{LABEL_PREFIX}.pip-freeze"
# Every container a run starts (pip freeze, smoke tests) carries its pid: Ctrl-C and the next run remove it.
SMOKE_LABEL = f"{LABEL_PREFIX}.smoke"
log = logging.getLogger("selfllm")


def owner_label() -> dict[str, str]:
    """Containers carry the pid of the run that owns them, so concurrent runs leave each other alone."""
    return {SMOKE_LABEL: str(os.getpid())}


class BuildError(RuntimeError):
    def __init__(self, node: ImageNode, message: str, log_file: Path):
        self.node, self.log_file = node, log_file
        super().__init__(f"{node.key}: {message} (full log: {log_file})")


@dataclass(frozen=True)
class BuildResult:
    node: ImageNode
    image_id: str
    reused: bool


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True).stdout
        return rev.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def oci_labels(node: ImageNode, source: str) -> dict[str, str]:
    labels = {
        "org.opencontainers.image.source": source,
        "org.opencontainers.image.revision": git_revision(),
        "org.opencontainers.image.created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "org.opencontainers.image.title": node.tag,
        INPUT_HASH_LABEL: node.input_hash,
    }
    if node.kind is NodeKind.recipe:
        labels[RECIPE_LABEL] = node.key
    return labels


def existing_image(client: docker.DockerClient, node: ImageNode):
    try:
        image = client.images.get(node.tag)
    except ImageNotFound:
        return None
    return image if (image.labels or {}).get(INPUT_HASH_LABEL) == node.input_hash else None


def _run_build(client: docker.DockerClient, node: ImageNode, log_file: Path, *, fileobj, tag: str,
               buildargs: dict[str, str] | None = None, labels: dict[str, str] | None = None) -> str:
    image_id = ""
    with log_file.open("a", encoding="utf-8", buffering=1) as log:  # line-buffered: follow it live
        stream = client.api.build(fileobj=fileobj, custom_context=True, tag=tag, buildargs=buildargs or {},
                                  labels=labels or {}, network_mode="host", rm=True, forcerm=True, decode=True,
                                  pull=False)
        last_lines: list[str] = []
        for chunk in stream:
            if "stream" in chunk:
                text = chunk["stream"]
                log.write(text)
                last_lines = (last_lines + [ln for ln in text.splitlines() if ln.strip()])[-15:]
            if "aux" in chunk and "ID" in chunk["aux"]:
                image_id = chunk["aux"]["ID"]
            if "error" in chunk:
                log.write(chunk["error"] + "\n")
                tail = "\n    ".join(last_lines[-8:])
                raise BuildError(node, f"{chunk['error'].strip()}\n    {tail}", log_file)
    return image_id or client.images.get(tag).id


def pip_freeze(client: docker.DockerClient, image: str) -> str:
    output = client.containers.run(image, ["python3", "-m", "pip", "freeze", "--all"], remove=True,
                                   entrypoint=[], network_disabled=True, labels=owner_label())
    return output.decode().strip()


def build_node(client: docker.DockerClient, node: ImageNode, log_dir: Path, source: str, force: bool = False) -> BuildResult:
    """Reuse the tagged image when its input-hash label matches; else build (and label) it."""
    if not force and (image := existing_image(client, node)) is not None:
        return BuildResult(node, image.id, reused=True)
    log.info("phase: build %s", node.key)
    log_dir.mkdir(parents=True, exist_ok=True)
    log_file = log_dir / (node.key.replace("/", "-") + ".log")
    log_file.write_text("")
    labels = oci_labels(node, source)
    if node.kind is not NodeKind.recipe:
        image_id = _run_build(client, node, log_file, fileobj=node.context_tar(), tag=node.tag,
                              buildargs=node.buildargs, labels=labels)
        return BuildResult(node, image_id, reused=False)
    # Recipes: build, read the image's own `pip freeze`, then stamp it (and the input hash) as labels.
    staged = _run_build(client, node, log_file, fileobj=node.context_tar(), tag=node.tag, buildargs=node.buildargs)
    labels[FREEZE_LABEL] = pip_freeze(client, staged)
    stamp = f"FROM {staged}\n".encode()
    image_id = _run_build(client, node, log_file, fileobj=_dockerfile_only(stamp), tag=node.tag, labels=labels)
    return BuildResult(node, image_id, reused=False)


def _dockerfile_only(content: bytes) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    buffer.seek(0)
    return buffer
