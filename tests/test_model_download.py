"""Model acquisition against local stand-ins for the hubs (tests/fake_hub.py on 127.0.0.1), driven
by the installed hub clients (modelscope.snapshot_download, huggingface_hub.snapshot_download):
complete-folder checks, the cache layouts each client writes, refs/main, interrupted downloads that
the rerun completes, and unreachable hubs reported as one line with exit status 2."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fake_hub import FakeHuggingFaceHub, FakeModelScopeHub, closed_port_url, serve
from selfllm_runtime.model_source import ModelNotFound, find_cached, request_from_env, resolve_model

REPO_ID = "org/tiny-qwen3"
DOTTED_ID = "org/tiny-qwen3.5"  # older ModelScope SDKs keep it as org/tiny-qwen3___5


@pytest.fixture(scope="module")
def sharded_model(tiny_recipe, tmp_path_factory) -> Path:
    """The tiny Qwen3 saved in three shards with model.safetensors.index.json."""
    from transformers import AutoModelForCausalLM

    tiny = tiny_recipe("qwen3/fastapi")[1]
    out = tmp_path_factory.mktemp("sharded") / "model"
    AutoModelForCausalLM.from_pretrained(tiny).save_pretrained(out, max_shard_size="200KB")
    for path in tiny.iterdir():
        if path.suffix != ".safetensors" and not (out / path.name).exists():
            shutil.copy(path, out / path.name)
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) > 1
    return out


def shards(folder: Path) -> list[str]:
    return sorted(set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()))


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_same_weights(folder: Path, original: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    expected = AutoModelForCausalLM.from_pretrained(original).state_dict()
    assert loaded.keys() == expected.keys()
    for name, value in loaded.items():
        assert torch.equal(value, expected[name]), name


def test_model_path_lacking_a_shard_is_refused(context, sharded_model, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(sharded_model, partial)
    missing = shards(partial)[1]
    (partial / missing).unlink()
    with pytest.raises(ModelNotFound, match=rf"MODEL_PATH={partial} lacks {missing}"):
        resolve_model(request_from_env(context.recipe, {"MODEL_PATH": str(partial)}))
    (partial / "model.safetensors.index.json").unlink()
    for shard in shards(sharded_model):
        (partial / shard).unlink(missing_ok=True)
    with pytest.raises(ModelNotFound, match="lacks model.safetensors"):
        resolve_model(request_from_env(context.recipe, {"MODEL_PATH": str(partial)}))


def test_incomplete_modelscope_cache_is_not_used(context, sharded_model, tmp_path):
    folder = tmp_path / "Qwen" / "Qwen3-8B"
    shutil.copytree(sharded_model, folder)
    request = request_from_env(context.recipe, {"MODEL_CACHE": str(tmp_path)})
    assert find_cached(request) == folder
    (folder / shards(folder)[-1]).unlink()  # an interrupted download: config.json is there, one shard is not
    assert find_cached(request) is None


def test_huggingface_cache_follows_refs_main(context, sharded_model, tmp_path):
    storage = tmp_path / "huggingface/hub/models--Qwen--Qwen3-8B"
    old, new = "a" * 40, "f" * 40
    for commit in (old, new):
        shutil.copytree(sharded_model, storage / "snapshots" / commit)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(old)  # main points at the lexicographically smaller commit
    request = request_from_env(context.recipe, {"MODEL_SOURCE": "huggingface", "MODEL_CACHE": str(tmp_path)})
    assert find_cached(request) == storage / "snapshots" / old
    (storage / "snapshots" / old / shards(sharded_model)[0]).unlink()  # main's snapshot incomplete: download
    assert find_cached(request) is None
    (storage / "refs" / "main").unlink()  # no ref and two snapshots: ambiguous, so none is guessed
    assert find_cached(request) is None


def test_interrupted_download_is_completed_by_the_rerun(context, sharded_model, tmp_path, monkeypatch):
    """First start: one shard's transfer is cut and the hub refuses the resume → one clear error, the
    snapshot folder has config.json but not that shard. Second start: the folder is not taken as it
    is; snapshot_download fetches only the missing shard, whose cut transfer resumes with a Range request."""
    import huggingface_hub.constants

    chunk = 4096  # the client writes whole chunks: the cut comes after 12 of them
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", chunk)
    cut_shard = shards(sharded_model)[1]
    hub = FakeHuggingFaceHub.from_folder(REPO_ID, sharded_model)
    with serve(hub) as url:
        env = {"MODEL_SOURCE": "huggingface", "MODEL_ID": REPO_ID, "MODEL_CACHE": str(tmp_path), "HF_ENDPOINT": url}
        request = request_from_env(context.recipe, env)
        hub.cuts[cut_shard], hub.refuse_ranges = 12 * chunk, True
        with pytest.raises(ModelNotFound) as failed:
            resolve_model(request)
        message = str(failed.value)
        assert "\n" not in message and f"from huggingface at {url}" in message
        assert all(name in message for name in ("MODEL_PATH", "MODEL_SOURCE=modelscope", "HF_ENDPOINT"))
        snapshot = tmp_path / "huggingface/hub/models--org--tiny-qwen3/snapshots" / hub.sha
        assert (snapshot / "config.json").is_file() and not (snapshot / cut_shard).exists()

        hub.log.clear()
        hub.cuts[cut_shard], hub.refuse_ranges = 12 * chunk, False
        folder = resolve_model(request)
        assert folder == snapshot
        assert [r.range for r in hub.requests("GET", cut_shard)] == [None, f"bytes={12 * chunk}-"]
        assert not hub.requests("GET", "config.json")  # kept from the first start
        for name, data in hub.files.items():
            assert (folder / name).read_bytes() == data
        assert find_cached(request) == folder  # a third start needs no hub
    assert_same_weights(folder, sharded_model)


MODELSCOPE_API = ("/api/v1/repos/internalAccelerationInfo", "/api/v1/models/{repo}/repo/files?",
                  "/api/v1/models/{repo}/repo?")


def test_modelscope_download_is_complete_and_the_next_start_needs_no_hub(context, sharded_model, tmp_path):
    """The default source, MODEL_SOURCE unset: modelscope.snapshot_download against the fake hub writes
    MODEL_CACHE/models/org--tiny-qwen3.5/snapshots/master (modelscope ≥1.38 keeps the '.' in this
    layout) holding exactly the hub's files, each fetched once. The next start, with the hub address
    now refusing connections, takes that folder from the cache without a download."""
    hub = FakeModelScopeHub.from_folder(DOTTED_ID, sharded_model)
    with serve(hub) as url:
        request = request_from_env(context.recipe, {"MODEL_ID": DOTTED_ID, "MODEL_CACHE": str(tmp_path),
                                                    "MODELSCOPE_ENDPOINT": url})
        assert request.source.value == "modelscope" and request.endpoint == url
        folder = resolve_model(request)
    assert folder == tmp_path / "models/org--tiny-qwen3.5/snapshots/master"
    assert folder_files(folder) == hub.files  # no .incomplete or other leftovers
    assert all(len(hub.requests("GET", name)) == 1 for name in hub.files)
    known = tuple(prefix.format(repo=DOTTED_ID) for prefix in MODELSCOPE_API)
    assert [r.path for r in hub.log if not r.path.startswith(known)] == []  # the fake answered every request
    assert find_cached(request) == folder

    offline = request_from_env(context.recipe, {"MODEL_ID": DOTTED_ID, "MODEL_CACHE": str(tmp_path),
                                                "MODELSCOPE_ENDPOINT": closed_port_url()})
    logged = len(hub.log)
    assert resolve_model(offline) == folder  # a download from the closed port would raise ModelNotFound
    assert len(hub.log) == logged
    assert_same_weights(folder, sharded_model)


def test_interrupted_modelscope_download_is_resumed_by_the_rerun(context, sharded_model, tmp_path, monkeypatch):
    """modelscope 1.40.2 (modelscope-hub 0.5.1) resumes partial files: the received bytes stay in
    `<file>.incomplete`, across runs too, and the next GET asks for the rest with `Range: bytes=<size>-`.
    First start: one shard's transfer is cut and the hub refuses the resume (one retry allowed here,
    instead of the client's 5 with growing back-off) → one clear error; the snapshot folder has
    config.json and the other shards but not that one, so it is not taken as the model. Second start:
    only the rest of that shard is fetched."""
    import modelscope_hub._download

    monkeypatch.setattr(modelscope_hub._download, "DOWNLOAD_RETRY_TIMES", 1)  # the first retry has no back-off
    cut_shard, cut = shards(sharded_model)[1], 50_001
    hub = FakeModelScopeHub.from_folder(REPO_ID, sharded_model)
    assert len(hub.files[cut_shard]) > cut
    with serve(hub) as url:
        request = request_from_env(context.recipe, {"MODEL_ID": REPO_ID, "MODEL_CACHE": str(tmp_path),
                                                    "MODELSCOPE_ENDPOINT": url})
        hub.cuts[cut_shard], hub.refuse_ranges = cut, True
        with pytest.raises(ModelNotFound) as failed:
            resolve_model(request)
        message = str(failed.value)
        assert "\n" not in message and f"could not download {REPO_ID} from modelscope at {url}" in message
        assert all(name in message for name in ("MODEL_PATH", "MODEL_SOURCE=huggingface", "MODELSCOPE_ENDPOINT"))
        assert [r.range for r in hub.requests("GET", cut_shard)] == [None, f"bytes={cut}-"]  # the refused resume
        snapshot = tmp_path / "models/org--tiny-qwen3/snapshots/master"
        assert (snapshot / f"{cut_shard}.incomplete").stat().st_size == cut
        assert set(folder_files(snapshot)) == set(hub.files) - {cut_shard} | {f"{cut_shard}.incomplete"}
        assert find_cached(request) is None

        hub.log.clear()
        hub.cuts[cut_shard], hub.refuse_ranges = cut, False  # a full GET would be cut again
        folder = resolve_model(request)
        assert folder == snapshot
        assert [r.range for r in hub.requests("GET", cut_shard)] == [f"bytes={cut}-"]
        assert [name for name in hub.files if hub.requests("GET", name) and name != cut_shard] == []
    assert folder_files(folder) == hub.files
    assert find_cached(request) == folder


def test_older_modelscope_names_endpoint_variable_and_escaped_cache_folder(context, sharded_model, tmp_path):
    """MODELSCOPE_DOMAIN, the older name of MODELSCOPE_ENDPOINT, still sets the hub (MODELSCOPE_ENDPOINT
    wins when both are set). A cache an older SDK left at MODEL_CACHE/org/tiny-qwen3___5 ('.' escaped),
    lacking one shard, is not taken as complete; modelscope 1.40.2 completes that folder in place,
    fetching only the missing shard, and the next start finds it."""
    legacy = tmp_path / "org" / "tiny-qwen3___5"
    shutil.copytree(sharded_model, legacy)
    missing = shards(sharded_model)[0]
    (legacy / missing).unlink()
    hub = FakeModelScopeHub.from_folder(DOTTED_ID, sharded_model)
    with serve(hub) as url:
        env = {"MODEL_ID": DOTTED_ID, "MODEL_CACHE": str(tmp_path), "MODELSCOPE_DOMAIN": url}
        request = request_from_env(context.recipe, env)
        assert request.endpoint == url
        assert request_from_env(context.recipe, {**env, "MODELSCOPE_ENDPOINT": "http://x.invalid"}).endpoint \
            == "http://x.invalid"
        assert find_cached(request) is None
        assert resolve_model(request) == legacy
        assert [name for name in hub.files if hub.requests("GET", name)] == [missing]
    assert folder_files(legacy) == hub.files
    assert not (tmp_path / "models").exists()  # nothing went to the new layout
    assert find_cached(request) == legacy


def test_unreachable_huggingface_hub_is_one_line_and_exit_2(context, tmp_path, monkeypatch, capsys):
    from selfllm_runtime.cli import main

    url = closed_port_url()
    for name, value in {"MODEL_SOURCE": "huggingface", "MODEL_CACHE": str(tmp_path), "HF_ENDPOINT": url,
                        "RECIPE_DIR": str(context.recipe_dir)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MODEL_PATH", raising=False)
    assert main(["fetch-model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("selfllm: error: could not download Qwen/Qwen3-8B")
    assert url in err and "MODEL_PATH" in err and "HF_ENDPOINT" in err and "Traceback" not in err


def test_unreachable_modelscope_is_one_line_and_exit_2(context, tmp_path, monkeypatch, capsys):
    """The CLI's report when the ModelScope hub refuses connections (downloads against a reachable fake
    hub are tested above)."""
    from selfllm_runtime.cli import main

    url = closed_port_url()
    for name, value in {"MODEL_CACHE": str(tmp_path), "MODELSCOPE_ENDPOINT": url,
                        "RECIPE_DIR": str(context.recipe_dir)}.items():
        monkeypatch.setenv(name, value)
    for name in ("MODEL_PATH", "MODEL_SOURCE", "MODELSCOPE_DOMAIN"):
        monkeypatch.delenv(name, raising=False)
    assert main(["fetch-model"]) == 2
    err = capsys.readouterr().err  # modelscope's own log lines come first
    ours = [line for line in err.splitlines() if line.startswith("selfllm:")]
    assert ours == [err.splitlines()[-1]] and "Traceback" not in err
    assert ours[0].startswith(f"selfllm: error: could not download Qwen/Qwen3-8B from modelscope at {url}")
    assert "MODEL_PATH" in ours[0] and "MODELSCOPE_ENDPOINT" in ours[0]
