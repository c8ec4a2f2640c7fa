"""Model acquisition against a local stand-in for the hubs (tests/fake_hub.py on 127.0.0.1):
complete-folder checks, refs/main, an interrupted download that the rerun completes, and
unreachable hubs reported as one line with exit status 2."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fake_hub import FakeHuggingFaceHub, closed_port_url, serve
from selfllm_runtime.model_source import ModelNotFound, find_cached, request_from_env, resolve_model

REPO_ID = "org/tiny-qwen3"


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
    import torch
    from transformers import AutoModelForCausalLM

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

    loaded = AutoModelForCausalLM.from_pretrained(folder)
    original = AutoModelForCausalLM.from_pretrained(sharded_model)
    for (name, value), (_, expected) in zip(loaded.state_dict().items(), original.state_dict().items()):
        assert torch.equal(value, expected), name


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
    """Only the unreachable path: faking ModelScope's API for a full download is not attempted."""
    pytest.importorskip("modelscope")
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
