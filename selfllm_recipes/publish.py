"""Publish: push smoke-tested recipe images, and the base and stack images under them, to a registry.

    select → check each recipe's last result (reports/latest) against the local image → plan tags → push
    the never-moving tags of every image → only then the moving ones

Tags (docker-stacks' habits): never-moving `in-<input hash>` (the content hash the builder computes and
labels), `git-<sha12>` and `<cu121|cpu>-YYYYMMDD`; moving `latest` (`cpu` for a CPU variant) and the stack
variant (e.g. `cu121-torch2.6.0`). Base and stack go to `<registry>/base` and `<registry>/stack`, by input
hash and by name, so a builder can take them instead of rebuilding (`pull_published`). A failure stops the
run before any moving tag is written, and the local tags it made are removed: `latest` never points at a
half-published set.
"""
from __future__ import annotations

import datetime
import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import docker
import requests
from docker.errors import APIError, ImageNotFound

from .build import INPUT_HASH_LABEL
from .discover import RecipeSpec
from .layout import IMAGE_PREFIX, REPO_ROOT

_REGISTRY = re.compile(r"^(?P<host>[a-z0-9.-]+(:\d+)?)/(?P<namespace>[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9._-]+)*)$")


class PublishError(RuntimeError):
    """One line naming what can't be published and why."""


@dataclass(frozen=True)
class Registry:
    host: str  # "127.0.0.1:5000", "docker.io"
    namespace: str  # "selfllm"

    @classmethod
    def parse(cls, text: str) -> "Registry":
        found = _REGISTRY.match(text.strip().rstrip("/"))
        if found is None:
            raise PublishError(f"REGISTRY={text!r}: expected <host[:port]>/<namespace>, e.g. 127.0.0.1:5000/selfllm "
                               "or docker.io/selfllm")
        return cls(found["host"], found["namespace"])

    def repo(self, name: str) -> str:
        return f"{self.host}/{self.namespace}/{name}"

    @property
    def api(self) -> str:
        """The distribution API root (plain HTTP on loopback, as Docker allows)."""
        host = "registry-1.docker.io" if self.host == "docker.io" else self.host
        scheme = "http" if host.split(":")[0] in ("127.0.0.1", "localhost") else "https"
        return f"{scheme}://{host}/v2/"


@dataclass
class Publication:
    """One local image and the tags it gets in the registry: never-moving first, moving last."""

    source: str  # local tag, e.g. selfllm/qwen3-fastapi:latest
    repo: str  # registry repository
    fixed: list[str]
    moving: list[str]
    input_hash: str
    pushed: list[str] = field(default_factory=list)


def check_reachable(registry: Registry, timeout: float = 10) -> None:
    try:
        answer = requests.get(registry.api, timeout=timeout)
    except requests.RequestException as exc:
        raise PublishError(f"registry {registry.host} is unreachable ({type(exc).__name__}): nothing was pushed") from None
    if answer.status_code not in (200, 401):  # 401: a registry that wants `docker login`, which push then uses
        raise PublishError(f"registry {registry.host} answered {answer.status_code} at {registry.api}: nothing was pushed")


def git_sha12() -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    return done.stdout.strip()[:12] if done.returncode == 0 else "unknown"


def _labelled_hash(client: docker.DockerClient, tag: str, what: str) -> str:
    try:
        image = client.images.get(tag)
    except ImageNotFound:
        raise PublishError(f"{what}: image {tag} is not here; run `make matrix` first") from None
    found = (image.labels or {}).get(INPUT_HASH_LABEL, "")
    if not found:
        raise PublishError(f"{what}: image {tag} has no {INPUT_HASH_LABEL} label (not built by the matrix builder)")
    return found


def plan_stacks(client: docker.DockerClient, registry: Registry, specs: list[RecipeSpec], cpu: bool = False,
                prefix: str = IMAGE_PREFIX) -> list[Publication]:
    """Only the base and the stacks of `specs` (their GPU builds unless cpu), by input hash and name: what CI's
    first job pushes so that every recipe job pulls the torch layer instead of building (and uploading) its own."""
    items: dict[str, Publication] = {}
    for spec in specs:
        stack, _, _ = spec.variant(cpu)
        tag = f"{prefix}/stack:{stack.name}"
        if tag not in items:
            found = _labelled_hash(client, tag, spec.key)
            items[tag] = Publication(tag, registry.repo("stack"), fixed=[f"in-{found}"], moving=[stack.name],
                                     input_hash=found)
    base_tag = f"{prefix}/base:cuda12.1"
    found = _labelled_hash(client, base_tag, "base")
    return [Publication(base_tag, registry.repo("base"), fixed=[f"in-{found}"], moving=["cuda12.1"], input_hash=found),
            *items.values()]


def plan(client: docker.DockerClient, registry: Registry, specs: list[RecipeSpec], results: dict[str, dict],
         today: datetime.date, sha12: str, prefix: str = IMAGE_PREFIX) -> list[Publication]:
    """What to push: each recipe whose last result is a PASS of the image that is here now, then the stacks and
    the base under them. Refuses (PublishError naming the recipe) anything else, before pushing anything."""
    recipes: list[Publication] = []
    stacks: dict[str, Publication] = {}
    for spec in specs:
        row = results.get(spec.key)
        if row is None:
            raise PublishError(f"{spec.key}: never smoke-tested here (not in reports/latest/report.json); run "
                               f"`make matrix RECIPES={spec.key}` first")
        if row.get("status") != "pass":
            raise PublishError(f"{spec.key}: its last smoke test did not pass ({row.get('status')}): not published")
        source = row["image"]
        current = _labelled_hash(client, source, spec.key)
        if row.get("input_hash") != current or row.get("image_id") != client.images.get(source).id:
            raise PublishError(f"{spec.key}: image {source} changed since its last smoke test; run `make matrix "
                               f"RECIPES={spec.key}` again")
        cpu = source.endswith(":cpu")
        stack, _, _ = spec.variant(cpu)
        variant = f"{'cpu' if cpu else 'cu121'}-torch{_torch_version(stack.name)}"
        recipes.append(Publication(
            source, registry.repo(spec.key.replace("/", "-")),
            fixed=[f"in-{current}", f"git-{sha12}", f"{'cpu' if cpu else 'cu121'}-{today:%Y%m%d}"],
            moving=["cpu" if cpu else "latest", variant], input_hash=current))
        stack_tag = f"{prefix}/stack:{stack.name}"
        if stack_tag not in stacks:
            stack_hash = _labelled_hash(client, stack_tag, spec.key)
            stacks[stack_tag] = Publication(stack_tag, registry.repo("stack"), fixed=[f"in-{stack_hash}"],
                                            moving=[stack.name], input_hash=stack_hash)
    base_tag = f"{prefix}/base:cuda12.1"
    base_hash = _labelled_hash(client, base_tag, "base")
    base = Publication(base_tag, registry.repo("base"), fixed=[f"in-{base_hash}"], moving=["cuda12.1"],
                       input_hash=base_hash)
    return [base, *stacks.values(), *recipes]  # under first: a recipe's push then finds their layers there


def _torch_version(stack_name: str) -> str:
    found = re.match(r"torch(?P<version>[\d.]+)", stack_name)
    return found["version"] if found else stack_name


def _push_one(client: docker.DockerClient, item: Publication, tag: str) -> None:
    client.images.get(item.source).tag(item.repo, tag)
    try:
        for line in client.api.push(item.repo, tag, stream=True, decode=True):
            if "error" in line:
                raise PublishError(f"{item.source} → {item.repo}:{tag}: {line['error'].strip()}")
    except APIError as exc:
        raise PublishError(f"{item.source} → {item.repo}:{tag}: {exc.explanation or exc}") from None
    finally:
        try:
            client.images.remove(f"{item.repo}:{tag}")  # the registry keeps it; the local engine needs no copy
        except APIError:
            pass
    item.pushed.append(tag)


def push(client: docker.DockerClient, items: list[Publication], say=print) -> None:
    """Every image's never-moving tags, then (only when all of those are in) the moving ones."""
    for item in items:
        for tag in item.fixed:
            _push_one(client, item, tag)
            say(f"pushed {item.repo}:{tag}")
    for item in items:
        for tag in item.moving:
            _push_one(client, item, tag)
            say(f"pushed {item.repo}:{tag}")


def pull_published(client: docker.DockerClient, registry: Registry, tag: str, input_hash: str) -> bool:
    """Take a published base or stack (`tag`, e.g. selfllm/stack:torch2.6.0-cu12) by its input hash instead of
    building it: pull `<registry>/stack:in-<hash>` and tag it locally; the builder then reuses it because its
    input-hash label matches. False when the registry does not have it."""
    name = tag.split("/", 1)[1].split(":", 1)[0]  # base | stack
    remote = f"{registry.repo(name)}:in-{input_hash}"
    try:
        image = client.images.pull(remote)
    except (APIError, ImageNotFound):
        return False
    if (image.labels or {}).get(INPUT_HASH_LABEL) != input_hash:
        return False
    image.tag(tag)
    return True


def read_results(report_dir: Path) -> dict[str, dict]:
    path = Path(report_dir) / "report.json"
    if not path.is_file():
        raise PublishError(f"{path}: no matrix report; run `make matrix` first")
    return {row["recipe"]: row for row in json.loads(path.read_text(encoding="utf-8"))}
