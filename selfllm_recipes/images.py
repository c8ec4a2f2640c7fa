"""Plan: the image graph (base → stacks, each recipe's runtime → recipes), each node with its build context and
an input hash, so an unchanged node is reused instead of rebuilt."""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from selfllm_runtime.metadata import MODEL_FILE, TASK_FILE, MetadataError

from .discover import RecipeSpec
from .layout import CUDA_BASE_DIR, IMAGE_PREFIX, RUNTIME_DIR, TASKS_DIR
from .runtime_closure import task_context_files

IGNORED_PARTS = {"__pycache__", ".pytest_cache", ".ipynb_checkpoints"}


class NodeKind(str, Enum):
    base = "base"
    stack = "stack"
    runtime = "runtime"
    recipe = "recipe"


@dataclass
class ImageNode:
    key: str  # "base", "stack/torch2.6.0-cu12", "runtime/qwen3/fastapi", "qwen3/fastapi"
    kind: NodeKind
    tag: str
    files: dict[str, Path]  # name in the build context → file on disk
    parents: list[str] = field(default_factory=list)
    buildargs: dict[str, str] = field(default_factory=dict)
    input_hash: str = ""

    def context_tar(self) -> io.BytesIO:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name, path in sorted(self.files.items()):
                info = tar.gettarinfo(str(path), arcname=name)
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                with path.open("rb") as handle:
                    tar.addfile(info, handle)
        buffer.seek(0)
        return buffer


def folder_files(folder: Path, prefix: str = "") -> dict[str, Path]:
    return {prefix + str(p.relative_to(folder)): p for p in sorted(folder.rglob("*"))
            if p.is_file() and not IGNORED_PARTS & set(p.parts) and p.suffix != ".pyc"}


# Folders searched for pinned wheels that no index the builds reach serves (torch 2.13.0+cpu lies
# only on PyTorch's own index): a matching wheel (same sha256 as in the lock) joins the stack's
# build context under wheels/, and the stack's Dockerfile installs from there.
WHEELHOUSE_DIRS = [Path(p) for p in os.environ.get("SELFLLM_WHEELHOUSE", "/opt/wheels").split(os.pathsep) if p]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def local_wheels(pins, dirs: list[Path] | None = None) -> dict[str, Path]:
    """wheels/<file> → path, for pins with a local version label (+cpu) found in the wheelhouse."""
    found: dict[str, Path] = {}
    for pin in pins:
        if "+" not in pin.version:
            continue
        stem = f"{pin.name.replace('-', '_')}-{pin.version}-"
        for folder in WHEELHOUSE_DIRS if dirs is None else dirs:
            for wheel in sorted(folder.glob("*.whl")) if folder.is_dir() else []:
                if wheel.name.startswith(stem) and f"sha256:{_sha256(wheel)}" in pin.hashes:
                    found[f"wheels/{wheel.name}"] = wheel
    return found


SOURCES_FILE = "sources.sha256"  # a stack's source archives (sha256sum format), built in its own Dockerfile


def local_sources(stack_dir: Path, dirs: list[Path] | None = None) -> dict[str, Path]:
    """sources/<file> → path, for each archive a stack's sources.sha256 names (`<sha256>  <file>`), found with
    that sha256 in the wheelhouse: source that no index serves (SGLang's CPU kernels, from a GitHub fork)."""
    listing = stack_dir / SOURCES_FILE
    found: dict[str, Path] = {}
    if not listing.is_file():
        return found
    for line in listing.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        sha, name = line.split()
        folders = WHEELHOUSE_DIRS if dirs is None else dirs
        match = next((folder / name for folder in folders
                      if (folder / name).is_file() and _sha256(folder / name) == sha), None)
        if match is None:
            raise MetadataError(listing, name, f"not in the wheelhouse ({os.pathsep.join(map(str, folders))}) with "
                                f"sha256 {sha}: make it as the stack's Dockerfile says")
        found[f"sources/{name}"] = match
    return found


def runtime_files(spec: RecipeSpec) -> dict[str, Path]:
    """What one recipe's runtime image holds: the runtime files its task kind runs (runtime_closure), the launcher,
    its family's model.yaml and chat template, and its task's task.yaml; so a change elsewhere leaves its input
    hash (and its last smoke result) as it was."""
    files = {"Dockerfile": RUNTIME_DIR / "Dockerfile"} | folder_files(RUNTIME_DIR / "bin", "bin/")
    files |= task_context_files(spec.recipe.task)
    model = spec.model_dir
    files[f"recipes/{model.name}/{MODEL_FILE}"] = model / MODEL_FILE
    files[f"recipes/{model.name}/{spec.family.chat_template}"] = model / spec.family.chat_template
    if spec.family.remote_code is not None:  # the checkpoint's own code, shipped pinned (model.yaml remote_code)
        files |= folder_files(model / spec.family.remote_code.folder, f"recipes/{model.name}/{spec.family.remote_code.folder}/")
    task = spec.recipe.task.value
    files[f"tasks/{task}/{TASK_FILE}"] = TASKS_DIR / task / TASK_FILE
    return files


def runtime_tag(spec: RecipeSpec) -> str:
    """selfllm/runtime:<model>-<task>: the files-only image one recipe copies its runtime from."""
    return f"{IMAGE_PREFIX}/runtime:{spec.key.replace('/', '-')}"


def digest(node: ImageNode, parent_hashes: list[str], external: str = "") -> str:
    h = hashlib.sha256()
    for name, path in sorted(node.files.items()):
        h.update(name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
        h.update(str(path.stat().st_mode & 0o111).encode())
    for key, value in sorted(node.buildargs.items()):
        h.update(f"{key}={value}\0".encode())
    for parent in parent_hashes + [external]:
        h.update(parent.encode())
    return h.hexdigest()[:16]


# Build args of the pip steps (the stacks' and, through their ONBUILD, the recipes'): declared as ARG
# there and never as ENV, so that they stay out of every image's config.
PIP_BUILD_ARGS = frozenset({"PIP_INDEX_URL"})


def plan_images(recipes: list[RecipeSpec], base_image: str, base_image_id: str, extra_args: dict[str, str],
                cpu: bool = False) -> list[ImageNode]:
    """Nodes in build order (parents first); only what the selected recipes need. cpu: build a
    recipe's CPU variant (tag :cpu) instead of its GPU build where it declares one. extra_args:
    PIP_BUILD_ARGS go to every build that runs pip (stacks, recipes), the others (HF_ENDPOINT) to the base."""
    pip_args = {k: v for k, v in extra_args.items() if k in PIP_BUILD_ARGS}
    base_args = {k: v for k, v in extra_args.items() if k not in PIP_BUILD_ARGS}
    base = ImageNode("base", NodeKind.base, f"{IMAGE_PREFIX}/base:cuda12.1", folder_files(CUDA_BASE_DIR),
                     buildargs={"BASE_IMAGE": base_image, **base_args})
    base.input_hash = digest(base, [], base_image_id)
    nodes: dict[str, ImageNode] = {"base": base}
    for spec in recipes:
        stack_spec = spec.variant(cpu)[0]
        stack_key = f"stack/{stack_spec.name}"
        if stack_key not in nodes:
            wheels = local_wheels(stack_spec.pins)
            stack = ImageNode(stack_key, NodeKind.stack, f"{IMAGE_PREFIX}/stack:{stack_spec.name}",
                              folder_files(stack_spec.dir) | {"Dockerfile": stack_spec.dockerfile} | wheels
                              | local_sources(stack_spec.dir),
                              parents=["base"],
                              buildargs={"BASE_IMAGE": base.tag, **pip_args,
                                         **({"FIND_LINKS": "/opt/selfllm/stack"} if wheels else {})})
            stack.input_hash = digest(stack, [base.input_hash])
            nodes[stack_key] = stack
    for spec in recipes:
        runtime = ImageNode(f"runtime/{spec.key}", NodeKind.runtime, runtime_tag(spec), runtime_files(spec))
        runtime.input_hash = digest(runtime, [])
        nodes[runtime.key] = runtime
    for spec in recipes:
        runtime = nodes[f"runtime/{spec.key}"]
        stack_spec, _lock, variant_args = spec.variant(cpu)
        stack = nodes[f"stack/{stack_spec.name}"]
        tag = f"{spec.image}:{'latest' if stack_spec is spec.stack else 'cpu'}"
        # The README is documentation: editing it must not rebuild or re-test an image.
        files = {name: path for name, path in folder_files(spec.dir).items() if name != "README.md"}
        node = ImageNode(spec.key, NodeKind.recipe, tag, files,
                         parents=[stack.key, runtime.key],
                         buildargs={"STACK_IMAGE": stack.tag, "RUNTIME_IMAGE": runtime.tag, **pip_args, **variant_args})
        node.input_hash = digest(node, [stack.input_hash, runtime.input_hash])
        nodes[spec.key] = node
    return list(nodes.values())
