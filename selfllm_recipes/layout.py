"""Where things live in the repository."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
# SELFLLM_RECIPES_DIR points the builder at another recipes tree (tests use a temporary one).
RECIPES_DIR = Path(os.environ.get("SELFLLM_RECIPES_DIR") or REPO_ROOT / "recipes").resolve()
BASE_IMAGES_DIR = REPO_ROOT / "base-images"
CUDA_BASE_DIR = BASE_IMAGES_DIR / "cuda12.1"
STACKS_DIR = BASE_IMAGES_DIR / "stacks"
RUNTIME_DIR = REPO_ROOT / "runtime"
CACHE_DIR = REPO_ROOT / ".selfllm-cache"

LOCK_FILE = "requirements.lock"
LOCK_INPUT = "requirements.in"
IMAGE_PREFIX = "selfllm"
LABEL_PREFIX = "org.selfllm"
