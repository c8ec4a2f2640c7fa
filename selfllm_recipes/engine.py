"""The Docker engine: connect, detect the nvidia runtime, choose the CUDA base (official or local stand-in)."""
from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import docker
from docker.errors import DockerException, ImageNotFound

from .layout import LABEL_PREFIX

log = logging.getLogger("selfllm")

DOCKER_HUB = "registry-1.docker.io"
LOCAL_BASE = "selfllm/local-base:bookworm"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEBIAN_MIRROR = os.environ.get("SELFLLM_DEBIAN_MIRROR", "http://deb.debian.org/debian")


class EngineError(RuntimeError):
    pass


def connect() -> docker.DockerClient:
    try:
        client = docker.from_env(timeout=600)
        client.ping()
        return client
    except DockerException as exc:
        raise EngineError(f"no Docker engine answers ({exc}); run scripts/setup_host.sh as root") from None


def has_nvidia_runtime(client: docker.DockerClient) -> bool:
    return "nvidia" in (client.info().get("Runtimes") or {})


@dataclass(frozen=True)
class BaseChoice:
    image: str
    reason: str


def _image_present(client: docker.DockerClient, name: str) -> bool:
    try:
        client.images.get(name)
        return True
    except ImageNotFound:
        return False


def registry_reachable(client: docker.DockerClient, timeout_s: float = 5.0) -> bool:
    """A quick probe, so an offline machine doesn't wait on the engine's pull retries.
    An engine with registry mirrors (common in China) is trusted to try its mirrors."""
    if (client.info().get("RegistryConfig") or {}).get("Mirrors"):
        return True
    try:
        with socket.create_connection((DOCKER_HUB, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def choose_base(client: docker.DockerClient, mode: str, official: str) -> BaseChoice:
    """What a CUDA base (base-images/<base>/base.yaml) builds on: its official image, or the local stand-in, which
    serves every base alike. mode: official | local | auto (official when present or pullable, else local)."""
    if mode == "official":
        return BaseChoice(official, "--base official")
    if mode == "local":
        return BaseChoice(ensure_local_base(client), "--base local")
    if _image_present(client, official):
        return BaseChoice(official, "present in the engine")
    if not registry_reachable(client):
        return BaseChoice(ensure_local_base(client), f"{official} not present and {DOCKER_HUB} unreachable")
    try:
        client.images.pull(official)
        return BaseChoice(official, "pulled from its registry")
    except DockerException as exc:
        first_line = str(exc).splitlines()[0][:160]
        return BaseChoice(ensure_local_base(client), f"{official} can't be pulled ({first_line})")


def trust_host_bundle(rootfs: Path, ca_bundle: Path) -> None:
    """Trust the host's CAs (a TLS-intercepting proxy's among them) in the rootfs, now and after
    any later `update-ca-certificates` (installing python3 pulls ca-certificates, which rebuilds
    the bundle from /usr/local/share/ca-certificates: one file per certificate there)."""
    certs = rootfs / "etc/ssl/certs"
    certs.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ca_bundle, certs / "ca-certificates.crt")
    local = rootfs / "usr/local/share/ca-certificates/host"
    local.mkdir(parents=True, exist_ok=True)
    end = "-----END CERTIFICATE-----"
    blocks = [b.strip() + "\n" + end + "\n" for b in ca_bundle.read_text().split(end) if "BEGIN CERTIFICATE" in b]
    for number, block in enumerate(blocks):
        (local / f"host-{number:03d}.crt").write_text(block[block.index("-----BEGIN"):])


def ensure_local_base(client: docker.DockerClient, ca_bundle: Path = HOST_CA_BUNDLE) -> str:
    """A Debian 12 rootfs (debootstrap) that trusts the host's CA bundle, imported as LOCAL_BASE."""
    if _image_present(client, LOCAL_BASE):
        return LOCAL_BASE
    if shutil.which("debootstrap") is None:
        raise EngineError("debootstrap is not installed (apt-get install -y debootstrap) and no registry is reachable")
    if not ca_bundle.is_file():
        raise EngineError(f"host CA bundle {ca_bundle} not found: pip inside the stand-in would fail TLS")
    log.info("making the local CUDA-base stand-in %s with debootstrap (about 30-60 s)", LOCAL_BASE)
    with tempfile.TemporaryDirectory(prefix="selfllm-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), DEBIAN_MIRROR],
                       check=True, stdout=subprocess.DEVNULL)
        trust_host_bundle(rootfs, ca_bundle)
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (rootfs / cache).glob("*.deb"):
                item.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "--change", f'LABEL {LABEL_PREFIX}.stand-in="debian-bookworm"',
                        "--change", 'CMD ["/bin/bash"]', "-", LOCAL_BASE], stdin=tar.stdout, check=True,
                       stdout=subprocess.DEVNULL)
        if tar.wait() != 0:
            raise EngineError("tar of the debootstrap rootfs failed")
    return LOCAL_BASE
