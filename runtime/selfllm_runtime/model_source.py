"""Model acquisition at start: MODEL_PATH (a mounted folder) or MODEL_ID + MODEL_SOURCE download.

Downloads land in MODEL_CACHE (/root/autodl-tmp, AutoDL's data disk) so a saved instance keeps them.
ModelScope stores `Qwen/Qwen2.5-7B-Instruct` as `Qwen/Qwen2___5-7B-Instruct`: the cached folder is
found under either spelling, so a second start needs no network.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .metadata import ModelSource, Recipe

log = logging.getLogger("selfllm.model")
DEFAULT_CACHE = Path("/root/autodl-tmp")


class ModelNotFound(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelRequest:
    path: Path | None
    model_id: str
    source: ModelSource
    cache: Path


def request_from_env(recipe: Recipe, env: dict[str, str] | None = None) -> ModelRequest:
    env = dict(os.environ if env is None else env)
    raw_source = env.get("MODEL_SOURCE", ModelSource.modelscope.value).strip().lower()
    try:
        source = ModelSource(raw_source)
    except ValueError:
        choices = ", ".join(s.value for s in ModelSource)
        raise ModelNotFound(f"MODEL_SOURCE={raw_source!r} is not one of: {choices}") from None
    default_id = getattr(recipe.default_model, source.value)
    path = env.get("MODEL_PATH")
    return ModelRequest(Path(path) if path else None, env.get("MODEL_ID") or default_id, source,
                        Path(env.get("MODEL_CACHE") or DEFAULT_CACHE))


def modelscope_folder_names(model_id: str) -> list[str]:
    """ModelScope escapes '.' in folder names as '___' (Qwen2.5 → Qwen2___5)."""
    return list(dict.fromkeys([model_id, model_id.replace(".", "___")]))


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def find_cached(request: ModelRequest) -> Path | None:
    if request.source is ModelSource.modelscope:
        for root in (request.cache, request.cache / "modelscope", request.cache / "modelscope" / "models"):
            for name in modelscope_folder_names(request.model_id):
                if is_model_dir(root / name):
                    return root / name
        return None
    snapshots = request.cache / "huggingface" / "hub" / ("models--" + request.model_id.replace("/", "--")) / "snapshots"
    found = sorted(p for p in snapshots.glob("*") if is_model_dir(p)) if snapshots.is_dir() else []
    return found[-1] if found else None


def download(request: ModelRequest) -> Path:
    if request.source is ModelSource.modelscope:
        from modelscope import snapshot_download

        return Path(snapshot_download(request.model_id, cache_dir=str(request.cache)))
    from huggingface_hub import snapshot_download as hf_snapshot_download

    return Path(hf_snapshot_download(request.model_id, cache_dir=str(request.cache / "huggingface" / "hub")))


def resolve_model(request: ModelRequest) -> Path:
    """A local folder with config.json: the mounted path, the cache, or a fresh download."""
    if request.path is not None:
        if not is_model_dir(request.path):
            raise ModelNotFound(f"MODEL_PATH={request.path} has no config.json (mount a model folder there)")
        return request.path
    cached = find_cached(request)
    if cached is not None:
        log.info("model %s found in cache at %s", request.model_id, cached)
        return cached
    log.info("downloading %s from %s into %s", request.model_id, request.source.value, request.cache)
    try:
        path = download(request)
    except Exception as exc:  # noqa: BLE001 - hub clients raise many kinds
        raise ModelNotFound(f"could not download {request.model_id} from {request.source.value}: {exc}") from exc
    if not is_model_dir(path):
        raise ModelNotFound(f"download of {request.model_id} gave {path} without config.json")
    return path
