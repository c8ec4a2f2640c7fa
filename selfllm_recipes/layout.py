"""Where things live in the repository."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# SELFLLM_RECIPES_DIR points the builder at another recipes tree (tests use a temporary one).
RECIPES_DIR = Path(os.environ.get("SELFLLM_RECIPES_DIR") or REPO_ROOT / "recipes").resolve()
BASE_IMAGES_DIR = REPO_ROOT / "base-images"
DEFAULT_BASE = "cuda12.1"  # the CUDA base of every recipe's default build; a lane (task.yaml lanes:) names its own
CUDA_BASE_DIR = BASE_IMAGES_DIR / DEFAULT_BASE
BASE_FILE = "base.yaml"  # base-images/<base>/base.yaml: the official image it builds on and its Python (CudaBase)
STACKS_DIR = BASE_IMAGES_DIR / "stacks"
# The Dockerfile of every stack folder that has none of its own (the CUDA torch stacks: they differ only in their lock).
SHARED_STACK_DOCKERFILE = STACKS_DIR / "Dockerfile"
RUNTIME_DIR = REPO_ROOT / "runtime"
CACHE_DIR = REPO_ROOT / ".selfllm-cache"

LOCK_FILE = "requirements.lock"
LOCK_INPUT = "requirements.in"
IMAGE_PREFIX = "selfllm"
LABEL_PREFIX = "org.selfllm"
# tasks/<task>/: what every recipe of a task kind shares (task.yaml defaults, README template,
# requirements.in → requirements.lock); SELFLLM_TASKS_DIR points at another tree (tests).
TASKS_DIR = Path(os.environ.get("SELFLLM_TASKS_DIR") or REPO_ROOT / "tasks").resolve()
DOCKERFILE_TEMPLATE = "Dockerfile.j2"  # tasks/Dockerfile.j2: every recipe's Dockerfile
README_TEMPLATE = "README.md.j2"  # tasks/<task>/README.md.j2
# The last matrix result of each recipe (committed): the README's catalogue shows it.
RESULTS_FILE = REPO_ROOT / "recipes" / "last-matrix.json"


def image_name(key: str) -> str:
    """The image of recipe "qwen3/fastapi": selfllm/qwen3-fastapi."""
    return f"{IMAGE_PREFIX}/" + key.replace("/", "-")
