"""Plan: the image graph (base → stacks → runtime → recipes), each node with its build context and
an input hash, so an unchanged node is reused instead of rebuilt."""
from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from selfllm_runtime.metadata import MODEL_FILE, load_family

from .discover import RecipeSpec
from .layout import CUDA_BASE_DIR, IMAGE_PREFIX, RECIPES_DIR, RUNTIME_DIR

IGNORED_PARTS = {"__pycache__", ".pytest_cache", ".ipynb_checkpoints"}


class NodeKind(str, Enum):
    base = "base"
    stack = "stack"
    runtime = "runtime"
    recipe = "recipe"


@dataclass
class ImageNode:
    key: str  # "base", "stack/torch2.6.0-cu12", "runtime", "qwen3/fastapi"
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


def runtime_files() -> dict[str, Path]:
    files = {"Dockerfile": RUNTIME_DIR / "Dockerfile"}
    files |= folder_files(RUNTIME_DIR / "bin", "bin/")
    files |= folder_files(RUNTIME_DIR / "selfllm_runtime", "selfllm_runtime/")
    for model_file in sorted(RECIPES_DIR.glob(f"*/{MODEL_FILE}")):
        model = model_file.parent
        files[f"recipes/{model.name}/{MODEL_FILE}"] = model_file
        try:
            template = load_family(model).chat_template
        except ValueError:
            continue  # a broken model.yaml is reported by discovery, for its recipes only
        files[f"recipes/{model.name}/{template}"] = model / template
    return files


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


def plan_images(recipes: list[RecipeSpec], base_image: str, base_image_id: str, extra_args: dict[str, str]) -> list[ImageNode]:
    """Nodes in build order (parents first); only what the selected recipes need."""
    base = ImageNode("base", NodeKind.base, f"{IMAGE_PREFIX}/base:cuda12.1", folder_files(CUDA_BASE_DIR),
                     buildargs={"BASE_IMAGE": base_image, **extra_args})
    base.input_hash = digest(base, [], base_image_id)
    runtime = ImageNode("runtime", NodeKind.runtime, f"{IMAGE_PREFIX}/runtime:latest", runtime_files())
    runtime.input_hash = digest(runtime, [])
    nodes: dict[str, ImageNode] = {"base": base}
    for spec in recipes:
        stack_key = f"stack/{spec.stack.name}"
        if stack_key not in nodes:
            stack = ImageNode(stack_key, NodeKind.stack, f"{IMAGE_PREFIX}/stack:{spec.stack.name}",
                              folder_files(spec.stack.dir), parents=["base"], buildargs={"BASE_IMAGE": base.tag})
            stack.input_hash = digest(stack, [base.input_hash])
            nodes[stack_key] = stack
    if recipes:
        nodes["runtime"] = runtime
    for spec in recipes:
        stack = nodes[f"stack/{spec.stack.name}"]
        node = ImageNode(spec.key, NodeKind.recipe, f"{spec.image}:latest", folder_files(spec.dir),
                         parents=[stack.key, "runtime"],
                         buildargs={"STACK_IMAGE": stack.tag, "RUNTIME_IMAGE": runtime.tag})
        node.input_hash = digest(node, [stack.input_hash, runtime.input_hash])
        nodes[spec.key] = node
    return list(nodes.values())
