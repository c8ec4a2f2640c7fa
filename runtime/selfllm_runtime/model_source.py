"""Model acquisition at start: MODEL_PATH (a mounted folder) or MODEL_ID + MODEL_SOURCE download
(the settings of settings.ModelSettings).

Downloads land in MODEL_CACHE (/root/autodl-tmp, AutoDL's data disk) so a saved instance keeps them.
A folder counts as a model only when it is complete: config.json plus its weights — every shard
that model.safetensors.index.json (or pytorch_model.bin.index.json) names, else a *.safetensors or
pytorch_model.bin file. A cached folder that is not complete (an interrupted download) is never
used: the hub client's snapshot_download runs again and fetches only what is missing.

ModelScope's snapshot_download(cache_dir=MODEL_CACHE) of modelscope ≥1.38 (modelscope-hub) writes
`models/Qwen--Qwen2.5-7B-Instruct/snapshots/master`; older SDKs wrote `Qwen/Qwen2___5-7B-Instruct`
('.' escaped as '___'), a folder the new client still completes in place. The cached folder is found in
every one of these layouts, so a second start needs no network. The Hugging Face cache is read the
way huggingface_hub writes it: refs/main names the commit whose snapshots/<commit> folder is used;
without refs/main (a copied-in snapshot) the one snapshot there is used, and none when there are several.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .metadata import ModelFamily, ModelSource, Recipe
from .settings import ModelSettings, resolve

log = logging.getLogger("selfllm.model")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Where each hub client goes when its variable is unset (named in errors, so the user sees which host failed).
DEFAULT_ENDPOINTS = {ModelSource.huggingface: "https://huggingface.co", ModelSource.modelscope: "https://www.modelscope.cn"}
# The hub address each client reads (modelscope-hub ≥0.5 reads MODELSCOPE_ENDPOINT, older ones MODELSCOPE_DOMAIN).
ENDPOINT_VARIABLES = {ModelSource.huggingface: ("HF_ENDPOINT",),
                      ModelSource.modelscope: ("MODELSCOPE_ENDPOINT", "MODELSCOPE_DOMAIN")}


class ModelNotFound(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelRequest:
    path: Path | None
    model_id: str
    source: ModelSource
    cache: Path
    endpoint: str | None = None  # HF_ENDPOINT / MODELSCOPE_ENDPOINT; None: the client's default hub


def model_request(recipe: Recipe, settings: ModelSettings) -> ModelRequest:
    return ModelRequest(settings.model_path, settings.model_id_for(recipe), settings.model_source,
                        settings.model_cache, settings.endpoint())


def request_from_env(recipe: Recipe, env: dict[str, str] | None = None) -> ModelRequest:
    """The model settings alone (MODEL_PATH, MODEL_ID, …), resolved from env (default: the process's)."""
    return model_request(recipe, resolve(ModelSettings, recipe, env=env))


def modelscope_folder_names(model_id: str) -> list[str]:
    """Older ModelScope SDKs escape '.' in folder names as '___' (Qwen2.5 → Qwen2___5)."""
    return list(dict.fromkeys([model_id, model_id.replace(".", "___")]))


def modelscope_folders(cache: Path, model_id: str) -> list[Path]:
    """Where ModelScope's snapshot_download(model_id, cache_dir=cache) keeps the model: first the snapshot
    of the `master` branch that modelscope ≥1.38 writes (the name as it is), then the older SDKs' folders."""
    snapshot = cache / "models" / model_id.replace("/", "--") / "snapshots" / "master"
    roots = (cache, cache / "models", cache / "modelscope", cache / "modelscope" / "models")
    return [snapshot, *(root / name for root in roots for name in modelscope_folder_names(model_id))]


def checkpoint_name(model_dir: Path | str) -> str:
    """The checkpoint's name for a model folder, seen through the hub caches' layouts: Hugging Face's
    `models--Qwen--Qwen3-8B/snapshots/<commit>` and ModelScope's `models/Qwen--Qwen3-8B/snapshots/master`
    are `Qwen3-8B`; any other folder is its own name."""
    path = Path(model_dir)
    if path.parent.name == "snapshots" and path.parent.parent.name:
        return path.parent.parent.name.removeprefix("models--").split("--")[-1]
    return path.name


def file_sha256(path: Path | str) -> str:
    """sha256 of a file, read in 1 MiB blocks (a GGUF checkpoint, training data, a config)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def upstream_names(model_id: str, recipe: Recipe, family: ModelFamily) -> list[str]:
    """model_id first, then the other names of the same model: for the recipe's checkpoint, its id on the other
    hub, the last part of its ids (Qwen3-8B, as upstream's tutorials call it) and model.yaml's served_aliases;
    for another MODEL_ID, its last part."""
    checkpoints = recipe.default_model
    if model_id in (checkpoints.modelscope, checkpoints.huggingface):
        others = [checkpoints.modelscope, checkpoints.huggingface, checkpoints.modelscope.split("/")[-1],
                  checkpoints.huggingface.split("/")[-1], *family.served_aliases]
    else:
        others = [model_id.rstrip("/").split("/")[-1]]
    return list(dict.fromkeys([model_id, *(name for name in others if name)]))


def served_names(recipe: Recipe, family: ModelFamily, settings: ModelSettings,
                 served_model_name: str | None = None) -> list[str]:
    """The names an OpenAI-compatible server answers to (fastapi and vLLM alike), the one `/v1/models` lists and
    replies carry first. SERVED_MODEL_NAME alone, where set. Else the checkpoint's own name: MODEL_PATH's folder
    (checkpoint_name), else MODEL_ID (and its last part), else the recipe's default id on MODEL_SOURCE's hub;
    then, as aliases, the recipe's default id and the names upstream's tutorials use (`Qwen3-8B`), so their
    client code works unchanged whatever checkpoint is served."""
    if served_model_name and served_model_name.strip():
        return [served_model_name.strip()]
    own = [checkpoint_name(settings.model_path)] if settings.model_path is not None else []
    default_id = getattr(recipe.default_model, settings.model_source.value)
    return list(dict.fromkeys([*own, *upstream_names(settings.model_id_for(recipe), recipe, family),
                               *upstream_names(default_id, recipe, family)]))


def missing_model_files(path: Path) -> list[str]:
    """What `path` lacks to be a loadable model folder; [] when it is complete."""
    if not (path / "config.json").is_file():
        return ["config.json"]
    for index in WEIGHT_INDEXES:
        if (path / index).is_file():
            try:
                shards = set(json.loads((path / index).read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return [f"{index} (unreadable)"]
            return sorted(shard for shard in shards if not (path / shard).is_file())
    if any(p.is_file() for p in path.glob("*.safetensors")) or (path / "pytorch_model.bin").is_file():
        return []
    return ["model.safetensors"]


def _complete(folder: Path) -> Path | None:
    if not (folder / "config.json").is_file():
        return None
    missing = missing_model_files(folder)
    if missing:
        log.warning("cached %s is incomplete (missing %s): downloading the rest", folder, ", ".join(missing[:3]))
        return None
    return folder


def huggingface_snapshot(storage: Path) -> Path | None:
    """The snapshot folder refs/main points at; without refs/main, the only snapshot."""
    ref = storage / "refs" / "main"
    if ref.is_file():
        return storage / "snapshots" / ref.read_text(encoding="utf-8").strip()
    snapshots = [p for p in (storage / "snapshots").glob("*") if p.is_dir()]
    return snapshots[0] if len(snapshots) == 1 else None


def find_cached(request: ModelRequest) -> Path | None:
    """A complete model folder already in MODEL_CACHE, or None."""
    if request.source is ModelSource.modelscope:
        for folder in modelscope_folders(request.cache, request.model_id):
            if (found := _complete(folder)) is not None:
                return found
        return None
    storage = request.cache / "huggingface" / "hub" / ("models--" + request.model_id.replace("/", "--"))
    snapshot = huggingface_snapshot(storage)
    return _complete(snapshot) if snapshot is not None else None


def download(request: ModelRequest) -> Path:
    """The hub client's snapshot download: it skips files already complete and verifies sizes."""
    if request.source is ModelSource.modelscope:
        from modelscope import snapshot_download

        return Path(snapshot_download(request.model_id, cache_dir=str(request.cache), endpoint=request.endpoint))
    from huggingface_hub import snapshot_download as hf_snapshot_download

    return Path(hf_snapshot_download(request.model_id, cache_dir=str(request.cache / "huggingface" / "hub"),
                                     endpoint=request.endpoint))


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[:limit] + "…"


def download_failure(request: ModelRequest, exc: BaseException) -> ModelNotFound:
    variable = ENDPOINT_VARIABLES[request.source][0]
    hub = request.endpoint or DEFAULT_ENDPOINTS[request.source]
    other = ModelSource.huggingface if request.source is ModelSource.modelscope else ModelSource.modelscope
    return ModelNotFound(
        f"could not download {request.model_id} from {request.source.value} at {hub} ({one_line(exc)}); "
        f"set MODEL_PATH to a mounted model folder, or MODEL_SOURCE={other.value}, or {variable} to a reachable "
        f"mirror — files completed in {request.cache} are kept and a rerun fetches only the missing ones")


def resolve_model(request: ModelRequest) -> Path:
    """A complete local model folder: the mounted path, the cache, or a fresh download."""
    if request.path is not None:
        missing = missing_model_files(request.path)
        if missing == ["config.json"]:
            raise ModelNotFound(f"MODEL_PATH={request.path} has no config.json (mount a model folder there)")
        if missing:
            raise ModelNotFound(f"MODEL_PATH={request.path} lacks {', '.join(missing)} (a partial copy? mount the "
                                "complete model folder)")
        return request.path
    cached = find_cached(request)
    if cached is not None:
        log.info("model %s found in cache at %s", request.model_id, cached)
        return cached
    log.info("downloading %s from %s into %s", request.model_id, request.source.value, request.cache)
    try:
        path = download(request)
    except Exception as exc:  # noqa: BLE001 - hub clients raise many kinds
        raise download_failure(request, exc) from exc
    missing = missing_model_files(path)
    if missing:
        raise ModelNotFound(f"download of {request.model_id} from {request.source.value} gave {path} without "
                            f"{', '.join(missing)}")
    return path
