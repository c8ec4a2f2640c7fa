"""The Docker engine: connect, detect the nvidia runtime, choose the CUDA base (official or local stand-in)."""
from __future__ import annotations

import hashlib
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

from .layout import CACHE_DIR, LABEL_PREFIX

log = logging.getLogger("selfllm")

DOCKER_HUB = "registry-1.docker.io"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
DEBIAN_MIRROR = os.environ.get("SELFLLM_DEBIAN_MIRROR", "http://deb.debian.org/debian")
UBUNTU_MIRROR = os.environ.get("SELFLLM_UBUNTU_MIRROR", "http://archive.ubuntu.com/ubuntu")
UBUNTU_COMPONENTS = "main,restricted,universe,multiverse"
# Ubuntu's archive keys (2012: 790B C727 7767 219C 42C8 6F93 3B4F E6AC C0B2 1F32, 2018: F6EC B376 2474 EDA9 D21B 7022
# 8719 20D1 991B C93C, which signs jammy and noble), as jammy's ubuntu-keyring package ships them; pinned by sha256.
UBUNTU_KEYRING_DEB = ("pool/main/u/ubuntu-keyring/ubuntu-keyring_2021.03.26_all.deb",
                      "0d0e7ed6b112f5d03eabf3c7eb01ebdacf9c57714b279e90495cfc58c8c4520f")


@dataclass(frozen=True)
class StandIn:
    """A rootfs (debootstrap) standing in for a CUDA base image: a release whose python3 is the base's, so the
    locks resolved for the official image install on it. Debian 12 (3.11) serves the CPU variants, whose locks are
    resolved for it; Ubuntu 22.04 / 24.04, the official images' own releases, serve the GPU builds of bases on 3.10
    and 3.12."""
    suite: str
    python: str
    ubuntu: bool = False

    @property
    def image(self) -> str:
        return f"selfllm/local-base:{self.suite}"


STAND_INS = {s.python: s for s in (StandIn("bookworm", "3.11"), StandIn("jammy", "3.10", ubuntu=True),
                                   StandIn("noble", "3.12", ubuntu=True))}
CPU_STAND_IN = STAND_INS["3.11"]


def stand_in_for(python: str | None) -> StandIn:
    """The stand-in of a base whose python3 is `python` (None: the CPU variants' Debian 12)."""
    if python is None:
        return CPU_STAND_IN
    if python not in STAND_INS:
        raise EngineError(f"no local stand-in has Python {python} (base.yaml `python`); they have "
                          f"{', '.join(sorted(STAND_INS))}")
    return STAND_INS[python]


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


def choose_base(client: docker.DockerClient, mode: str, official: str, python: str | None = None) -> BaseChoice:
    """What a CUDA base (base-images/<base>/base.yaml) builds on: its official image, or a local stand-in (that of
    `python`, the base's python3 for a GPU build; None for the CPU variants). mode: official | local | auto
    (official when present or pullable, else local)."""
    stand_in = stand_in_for(python)
    if mode == "official":
        return BaseChoice(official, "--base official")
    if mode == "local":
        return BaseChoice(ensure_local_base(client, stand_in), "--base local")
    if _image_present(client, official):
        return BaseChoice(official, "present in the engine")
    if not registry_reachable(client):
        return BaseChoice(ensure_local_base(client, stand_in), f"{official} not present and {DOCKER_HUB} unreachable")
    try:
        client.images.pull(official)
        return BaseChoice(official, "pulled from its registry")
    except DockerException as exc:
        first_line = str(exc).splitlines()[0][:160]
        return BaseChoice(ensure_local_base(client, stand_in), f"{official} can't be pulled ({first_line})")


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


def ubuntu_keyring() -> Path:
    """Ubuntu's archive keyring for debootstrap, from the pinned ubuntu-keyring package (cached)."""
    keyring = CACHE_DIR / "ubuntu-archive-keyring.gpg"
    if keyring.is_file():
        return keyring
    path, sha256 = UBUNTU_KEYRING_DEB
    with tempfile.TemporaryDirectory(prefix="selfllm-keyring-") as tmp:
        deb = Path(tmp) / "ubuntu-keyring.deb"
        subprocess.run(["curl", "-fsSL", "-o", str(deb), f"{UBUNTU_MIRROR}/{path}"], check=True)
        got = hashlib.sha256(deb.read_bytes()).hexdigest()
        if got != sha256:
            raise EngineError(f"{UBUNTU_MIRROR}/{path}: sha256 {got}, expected {sha256} (UBUNTU_KEYRING_DEB)")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True)
        keyring.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tmp) / "x/usr/share/keyrings/ubuntu-archive-keyring.gpg", keyring)
    return keyring


def debootstrap_command(stand_in: StandIn, rootfs: Path, keyring: Path | None) -> list[str]:
    """debootstrap of the stand-in's release; an Ubuntu one checks the archive's signature with `keyring`."""
    if not stand_in.ubuntu:
        return ["debootstrap", "--variant=minbase", stand_in.suite, str(rootfs), DEBIAN_MIRROR]
    # Ubuntu's releases since gutsy share one debootstrap script (a Debian 12 host's debootstrap predates noble).
    # The components the official CUDA images enable (noble's python3-venv is in universe).
    return ["debootstrap", "--variant=minbase", f"--keyring={keyring}", f"--components={UBUNTU_COMPONENTS}",
            stand_in.suite, str(rootfs), UBUNTU_MIRROR, "/usr/share/debootstrap/scripts/gutsy"]


def ensure_local_base(client: docker.DockerClient, stand_in: StandIn = CPU_STAND_IN,
                      ca_bundle: Path = HOST_CA_BUNDLE) -> str:
    """A rootfs of the stand-in's release (debootstrap) that trusts the host's CA bundle, imported as its image."""
    if _image_present(client, stand_in.image):
        return stand_in.image
    if shutil.which("debootstrap") is None:
        raise EngineError("debootstrap is not installed (apt-get install -y debootstrap) and no registry is reachable")
    if not ca_bundle.is_file():
        raise EngineError(f"host CA bundle {ca_bundle} not found: pip inside the stand-in would fail TLS")
    log.info("making the local CUDA-base stand-in %s (Python %s) with debootstrap (about 30-90 s)", stand_in.image,
             stand_in.python)
    with tempfile.TemporaryDirectory(prefix="selfllm-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        keyring = ubuntu_keyring() if stand_in.ubuntu else None
        subprocess.run(debootstrap_command(stand_in, rootfs, keyring), check=True, stdout=subprocess.DEVNULL)
        trust_host_bundle(rootfs, ca_bundle)
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (rootfs / cache).glob("*.deb"):
                item.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        distro = "ubuntu" if stand_in.ubuntu else "debian"
        subprocess.run(["docker", "import", "--change", f'LABEL {LABEL_PREFIX}.stand-in="{distro}-{stand_in.suite}"',
                        "--change", 'CMD ["/bin/bash"]', "-", stand_in.image], stdin=tar.stdout, check=True,
                       stdout=subprocess.DEVNULL)
        if tar.wait() != 0:
            raise EngineError("tar of the debootstrap rootfs failed")
    return stand_in.image
