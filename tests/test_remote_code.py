"""The checkpoint's own code shipped pinned (model.yaml `remote_code:`, runtime remote_code.py): the recorded hashes
are the files', the shipped files are the pinned commit's with exactly the named patch applied, a model folder is
loaded with the shipped code in place of its own, and an edited file is refused before anything loads."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from selfllm_recipes.layout import RECIPES_DIR
from selfllm_runtime.metadata import load_family

REMOTE_FAMILIES = sorted(p.parent.name for p in RECIPES_DIR.glob("*/model.yaml")
                         if load_family(p.parent).remote_code is not None)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_internlm3_and_chatglm3_ship_their_code():
    assert {"internlm3", "chatglm3"} <= set(REMOTE_FAMILIES)


@pytest.mark.parametrize("model", REMOTE_FAMILIES)
def test_the_patch_turns_the_pinned_files_into_the_shipped_ones(model: str, tmp_path: Path):
    """Reverse-applying the .patch to the shipped files gives files with the pinned commit's hashes (upstream_sha256);
    the files the patch leaves alone are the same both ways."""
    family = load_family(RECIPES_DIR / model)
    code = family.remote_code
    folder = family.remote_code_dir
    for name, shipped in code.files.items():
        assert _sha256(folder / name) == shipped.sha256, name
        shutil.copy(folder / name, tmp_path / name)
    assert code.patch is not None and _sha256(folder / code.patch.file) == code.patch.sha256
    subprocess.run(["patch", "-R", "-p1", "-s", "-i", str(folder / code.patch.file)], cwd=tmp_path, check=True)
    for name, shipped in code.files.items():
        assert _sha256(tmp_path / name) == shipped.upstream_sha256, name
    patched = {name for name, shipped in code.files.items() if shipped.sha256 != shipped.upstream_sha256}
    assert patched and all(f"+++ b/{name}" in (folder / code.patch.file).read_text() for name in patched)


@pytest.mark.parametrize("model", REMOTE_FAMILIES)
def test_a_model_folder_is_loaded_with_the_shipped_code(model: str, tmp_path: Path, monkeypatch):
    """The checkpoint's own .py files are left out, the shipped ones take their place, the other files are links to
    the checkpoint's, tokenizer_config.json gets remote_code.tokenizer_config, and the folder keeps the checkpoint's
    name (vLLM's served names)."""
    from selfllm_runtime import remote_code

    monkeypatch.setattr(remote_code, "OVERLAY_ROOT", tmp_path / "overlay")
    family = load_family(RECIPES_DIR / model)
    checkpoint = tmp_path / "hub" / "models--org--Some-Model" / "snapshots" / "abc123"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.json").write_text("{}")
    (checkpoint / "tokenizer_config.json").write_text(json.dumps({"padding_side": "left"}))
    for name in family.remote_code.files:
        (checkpoint / name).write_text("raise SystemExit('the download brought this code')\n")
    (checkpoint / "extra_code.py").write_text("raise SystemExit\n")
    loaded = remote_code.shipped_model_dir(family, checkpoint)
    assert loaded.name == "Some-Model" and loaded != checkpoint
    assert (loaded / "config.json").is_symlink() and not (loaded / "extra_code.py").exists()
    for name, shipped in family.remote_code.files.items():
        assert not (loaded / name).is_symlink() and _sha256(loaded / name) == shipped.sha256
    settings = json.loads((loaded / "tokenizer_config.json").read_text())
    assert settings == {"padding_side": "left", **family.remote_code.tokenizer_config}
    assert remote_code.source_model_dir(loaded) == checkpoint.resolve()  # what results name
    assert remote_code.source_model_dir(checkpoint) == checkpoint


def test_an_edited_shipped_file_is_refused_naming_it(tmp_path: Path, monkeypatch):
    from selfllm_runtime import remote_code

    family = load_family(RECIPES_DIR / "internlm3")
    copy = tmp_path / "internlm3"
    shutil.copytree(RECIPES_DIR / "internlm3", copy, ignore=shutil.ignore_patterns("fastapi", "vllm", "lora",
                                                                                    "webdemo", "langchain"))
    edited = copy / family.remote_code.folder / "modeling_internlm3.py"
    edited.write_text(edited.read_text() + "\n# edited\n")
    with pytest.raises(remote_code.RemoteCodeMismatch, match=r"modeling_internlm3\.py: sha256 [0-9a-f]{64} is not "
                       r"model\.yaml's remote_code"):
        remote_code.shipped_model_dir(load_family(copy), tmp_path)


def test_a_family_without_remote_code_loads_its_folder_as_it_is(tmp_path: Path):
    from selfllm_runtime.remote_code import shipped_model_dir

    assert shipped_model_dir(load_family(RECIPES_DIR / "qwen3"), tmp_path) == tmp_path


def test_remote_code_without_trust_remote_code_is_refused(tmp_path: Path):
    from selfllm_runtime.metadata import MetadataError

    copy = tmp_path / "internlm3"
    shutil.copytree(RECIPES_DIR / "internlm3", copy)
    text = (copy / "model.yaml").read_text().replace("trust_remote_code: true\n", "")
    (copy / "model.yaml").write_text(text)
    with pytest.raises(MetadataError, match="the shipped code runs only with trust_remote_code: true"):
        load_family(copy)


@pytest.mark.parametrize("model", REMOTE_FAMILIES)
def test_the_tiny_model_is_made_from_the_shipped_classes(model: str, tiny_recipe):
    """Its folder holds exactly the shipped code, its config names the checkpoint's class with the shipped auto_map,
    and it reloads with every buffer computed, generates with its cache the tokens it generates without, and gives a finite loss."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    context, folder = tiny_recipe(f"{model}/fastapi")
    family = context.family
    for name, shipped in family.remote_code.files.items():
        assert _sha256(folder / name) == shipped.sha256, name
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [family.architecture]
    assert config["auto_map"]["AutoModelForCausalLM"] == family.remote_code.auto_map["AutoModelForCausalLM"]
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model_ = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    # buffers the checkpoint doesn't hold (InternLM3's RoPE inv_freq) are computed, not left as the empty memory of
    # transformers 5's meta-device build: the same as in a model built from the config
    fresh = dict(AutoModelForCausalLM.from_config(model_.config, trust_remote_code=True).named_buffers())
    for name, buffer in model_.named_buffers():
        assert torch.equal(buffer, fresh[name]), name
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    assert int(ids.max()) < model_.get_input_embeddings().weight.shape[0]
    cached = model_.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    uncached = model_.generate(input_ids=ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()
    assert torch.isfinite(model_(input_ids=ids, labels=ids).loss)
