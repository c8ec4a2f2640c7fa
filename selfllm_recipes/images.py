"""Plan: the image graph (base → stacks, each recipe's runtime → recipes), each node with its build context and
an input hash, so an unchanged node is reused instead of rebuilt."""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from selfllm_runtime.metadata import MODEL_FILE, TASK_FILE, MetadataError

from .discover import RecipeSpec
from .layout import CUDA_BASE_DIR, DEFAULT_BASE, IMAGE_PREFIX, RUNTIME_DIR, TASKS_DIR
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


DEFAULT_LANE = "default"  # the default GPU build (tag latest; its CPU variant, tag cpu, on an engine without GPU)


def lane_key(recipe_key: str, lane: str) -> str:
    """A build's node key (and report row): the recipe's for the default build, `<recipe>:<lane>` for a lane's."""
    return recipe_key if lane == DEFAULT_LANE else f"{recipe_key}:{lane}"


def recipe_of(node_key: str) -> str:
    """The recipe key of a recipe node's key (lane_key's inverse)."""
    return node_key.split(":", 1)[0]


def _base_node(name: str, dockerfile: Path, image: str, image_id: str, args: dict[str, str]) -> ImageNode:
    # The default base keeps its key "base"; a lane's base is "base/<name>". Only the Dockerfile is the context.
    key = "base" if name == DEFAULT_BASE else f"base/{name}"
    node = ImageNode(key, NodeKind.base, f"{IMAGE_PREFIX}/base:{name}", {"Dockerfile": dockerfile},
                     buildargs={"BASE_IMAGE": image, **args})
    node.input_hash = digest(node, [], image_id)
    return node


def plan_images(recipes: list[RecipeSpec], base_image: str, base_image_id: str, extra_args: dict[str, str],
                cpu: bool = False, lanes: Sequence[str] = (DEFAULT_LANE,),
                lane_bases: Mapping[str, tuple[str, str]] | None = None) -> list[ImageNode]:
    """Nodes in build order (parents first); only what the selected recipes need. cpu: build a
    recipe's CPU variant (tag :cpu) instead of its GPU build where it declares one. lanes: the builds to make of
    each recipe: `default` (tag latest, or the CPU variant), and each lane of task.yaml `lanes:` named (or `all`)
    that the recipe has (tag :<lane>; always the GPU build, on the lane's own base and stack). lane_bases: base
    folder → (image, image id) a lane's base builds on; a base not there builds on base_image (the local stand-in
    serves every base alike). extra_args: PIP_BUILD_ARGS go to every build that runs pip (stacks, recipes), the
    others (HF_ENDPOINT) to the bases."""
    pip_args = {k: v for k, v in extra_args.items() if k in PIP_BUILD_ARGS}
    base_args = {k: v for k, v in extra_args.items() if k not in PIP_BUILD_ARGS}
    wanted = lambda lane: "all" in lanes or lane in lanes  # noqa: E731
    # (lane, recipe, base folder, base Dockerfile, stack, build args, tag) of every build asked for
    builds = []
    for spec in recipes:
        if wanted(DEFAULT_LANE):
            stack_spec, _lock, variant_args = spec.variant(cpu)
            tag = f"{spec.image}:{'latest' if stack_spec is spec.stack else 'cpu'}"
            builds.append((DEFAULT_LANE, spec, DEFAULT_BASE, CUDA_BASE_DIR / "Dockerfile", stack_spec, variant_args, tag))
        builds += [(name, spec, lane.base.name, lane.base.dockerfile, lane.stack, lane.build_args(), f"{spec.image}:{name}")
                   for name, lane in spec.lanes.items() if wanted(name)]
    nodes: dict[str, ImageNode] = {}
    for _lane, _spec, base_name, dockerfile, _stack, _args, _tag in builds:
        image, image_id = (lane_bases or {}).get(base_name, (base_image, base_image_id))
        base = _base_node(base_name, dockerfile, image, image_id, base_args)
        nodes.setdefault(base.key, base)
    for _lane, _spec, base_name, _dockerfile, stack_spec, _args, _tag in builds:
        stack_key = f"stack/{stack_spec.name}"
        if stack_key not in nodes:
            base = nodes["base" if base_name == DEFAULT_BASE else f"base/{base_name}"]
            wheels = local_wheels(stack_spec.pins)
            stack = ImageNode(stack_key, NodeKind.stack, f"{IMAGE_PREFIX}/stack:{stack_spec.name}",
                              folder_files(stack_spec.dir) | {"Dockerfile": stack_spec.dockerfile} | wheels
                              | local_sources(stack_spec.dir),
                              parents=[base.key],
                              buildargs={"BASE_IMAGE": base.tag, **pip_args,
                                         **({"FIND_LINKS": "/opt/selfllm/stack"} if wheels else {})})
            stack.input_hash = digest(stack, [base.input_hash])
            nodes[stack_key] = stack
    for _lane, spec, *_ in builds:
        if f"runtime/{spec.key}" not in nodes:
            runtime = ImageNode(f"runtime/{spec.key}", NodeKind.runtime, runtime_tag(spec), runtime_files(spec))
            runtime.input_hash = digest(runtime, [])
            nodes[runtime.key] = runtime
    for lane, spec, _base, _dockerfile, stack_spec, build_args, tag in builds:
        runtime = nodes[f"runtime/{spec.key}"]
        stack = nodes[f"stack/{stack_spec.name}"]
        # The README is documentation: editing it must not rebuild or re-test an image.
        files = {name: path for name, path in folder_files(spec.dir).items() if name != "README.md"}
        node = ImageNode(lane_key(spec.key, lane), NodeKind.recipe, tag, files,
                         parents=[stack.key, runtime.key],
                         buildargs={"STACK_IMAGE": stack.tag, "RUNTIME_IMAGE": runtime.tag, **pip_args, **build_args})
        node.input_hash = digest(node, [stack.input_hash, runtime.input_hash])
        nodes[node.key] = node
    return list(nodes.values())
