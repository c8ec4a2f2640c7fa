"""The checkpoint's own Python code (trust_remote_code), shipped pinned in the family folder (model.yaml
`remote_code:`): the code at a recorded commit of a public repository, with the project's named patch where the
transformers of the image needs one, every file's sha256 in model.yaml.

It is the only code that runs: `shipped_model_dir` gives the folder to load as links to the checkpoint's files,
with the shipped files in place of the checkpoint's own *.py files, after checking every hash. The smoke model is
made from the same classes (`remote_smoke_tokenizer`, `remote_tiny_config`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .metadata import ModelFamily, RemoteCode, SmokeModelShape

log = logging.getLogger("selfllm.model")
OVERLAY_ROOT = Path(tempfile.gettempdir()) / "selfllm-remote-code"
TOKENIZER_AUTO = "AutoTokenizer"
TOKENIZER_CONFIG = "tokenizer_config.json"
SOURCE_FILE = ".selfllm-source"  # in a folder shipped_model_dir made: the model folder it stands for


class RemoteCodeMismatch(ValueError):
    """A shipped file differs from the hash model.yaml records (edited without updating model.yaml)."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checked_files(family: ModelFamily) -> dict[str, Path]:
    """name → path of every shipped code file, after checking each one (and the patch file) against model.yaml."""
    code: RemoteCode = family.remote_code  # type: ignore[assignment]
    folder = family.remote_code_dir
    expected = {name: shipped.sha256 for name, shipped in code.files.items()}
    if code.patch is not None:
        expected[code.patch.file] = code.patch.sha256
    for name, sha in expected.items():
        path = folder / name
        if not path.is_file():
            raise RemoteCodeMismatch(f"{path}: missing (model.yaml remote_code.files)")
        if _sha256(path) != sha:
            raise RemoteCodeMismatch(f"{path}: sha256 {_sha256(path)} is not model.yaml's remote_code {sha}")
    return {name: folder / name for name in code.files}


def copy_code(family: ModelFamily, out_dir: Path) -> None:
    for name, path in checked_files(family).items():
        shutil.copyfile(path, Path(out_dir) / name)


def shipped_model_dir(family: ModelFamily, model_dir: Path) -> Path:
    """The model folder to load: model_dir itself for a family without remote code; else a folder of links to
    model_dir's files with the shipped code instead of the checkpoint's own *.py files (so a hub download's code
    never runs), named like model_dir (served names come from it)."""
    if family.remote_code is None:
        return model_dir
    model_dir = Path(model_dir).resolve()
    overlay = OVERLAY_ROOT / hashlib.sha256(str(model_dir).encode()).hexdigest()[:16] / model_dir.name
    if model_dir.parent.name == "snapshots":  # the hub caches' layouts: keep the checkpoint's name
        from .model_source import checkpoint_name

        overlay = overlay.with_name(checkpoint_name(model_dir))
    files = checked_files(family)
    if overlay.exists():
        shutil.rmtree(overlay)
    overlay.mkdir(parents=True)
    replaced = []
    for entry in sorted(model_dir.iterdir()):
        if entry.suffix == ".py":
            replaced.append(entry.name)
            continue
        if entry.name == TOKENIZER_CONFIG and family.remote_code.tokenizer_config:
            write_tokenizer_settings(family, entry, overlay / entry.name)
            continue
        (overlay / entry.name).symlink_to(entry.resolve())
    copy_code(family, overlay)
    (overlay / SOURCE_FILE).write_text(str(model_dir), encoding="utf-8")
    code = family.remote_code
    log.info("remote code: %s from %s@%s%s (the checkpoint's own %s not used); model folder %s",
             ", ".join(files), code.repo, code.commit[:12], f" + {code.patch.file}" if code.patch else "",
             ", ".join(replaced) or "code: none", overlay)
    return overlay


def initialise(model: Any) -> None:
    """Random weights for a tiny model of shipped code that leaves them uninitialised (ChatGLM builds its layers with
    torch's skip_init): matrices N(0, 0.02), norm weights 1, biases 0."""
    import torch

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.02)
            elif name.endswith("bias"):
                parameter.zero_()
            else:
                parameter.fill_(1.0)


def write_tokenizer_settings(family: ModelFamily, source: Path, target: Path) -> None:
    """source's tokenizer_config.json with model.yaml's remote_code.tokenizer_config over it, written to target."""
    settings = json.loads(Path(source).read_text(encoding="utf-8"))
    Path(target).write_text(json.dumps({**settings, **family.remote_code.tokenizer_config}, ensure_ascii=False,
                                       indent=2), encoding="utf-8")


def finish_folder(family: ModelFamily, out_dir: Path) -> None:
    """After save_pretrained: exactly the shipped code files, remote_code.tokenizer_config in tokenizer_config.json,
    and config.json naming the class the real checkpoint's does (save_pretrained writes the class it saved: ChatGLM3's ChatGLMForConditionalGeneration for ChatGLMModel)."""
    copy_code(family, out_dir)
    tokenizer_config = Path(out_dir) / TOKENIZER_CONFIG  # save_pretrained keeps only what the class passed on
    write_tokenizer_settings(family, tokenizer_config, tokenizer_config)
    path = Path(out_dir) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["architectures"] = [family.architecture]
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def source_model_dir(model_dir: Path) -> Path:
    """The model folder a folder of shipped_model_dir stands for (what results name); any other folder itself."""
    marker = Path(model_dir) / SOURCE_FILE
    return Path(marker.read_text(encoding="utf-8")) if marker.is_file() else Path(model_dir)


def _auto_map(code: RemoteCode, tokenizer: bool) -> dict[str, Any]:
    if tokenizer:
        return {TOKENIZER_AUTO: [code.auto_map[TOKENIZER_AUTO], None]}
    return {name: target for name, target in code.auto_map.items() if name != TOKENIZER_AUTO}


def remote_smoke_tokenizer(family: ModelFamily, corpus: list[str], vocab_size: int, chat_template: str,
                           out_dir: Path) -> Any:
    """The family's own tokenizer class over a SentencePiece model trained on the spot (byte fallback, <unk> <s>
    </s> at 0 1 2), with the family's special tokens the class doesn't define itself added as special tokens."""
    import os

    os.environ.setdefault("GLOG_minloglevel", "2")  # sentencepiece's trainer logs every step
    import sentencepiece
    from transformers import AutoTokenizer

    code: RemoteCode = family.remote_code  # type: ignore[assignment]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    copy_code(family, out_dir)
    text = out_dir / "smoke_corpus.txt"
    text.write_text("\n".join(corpus), encoding="utf-8")
    # like the real models' SentencePiece files: no text normalisation (newlines and spaces kept), byte fallback
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(out_dir / "tokenizer"), model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    text.unlink()
    (out_dir / "tokenizer.vocab").unlink(missing_ok=True)
    tokens = family.special_tokens
    # bos/eos/unk as the class defines them (ChatGLM's are properties over the SentencePiece ids)
    (out_dir / TOKENIZER_CONFIG).write_text(json.dumps({
        "auto_map": _auto_map(code, tokenizer=True), "tokenizer_class": code.auto_map[TOKENIZER_AUTO].split(".")[-1],
        **code.tokenizer_config}))
    tokenizer = AutoTokenizer.from_pretrained(out_dir, trust_remote_code=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokens.pad
    def unknown(token: str) -> bool:  # get_vocab() may leave out tokens the class knows (ChatGLM's </s>)
        found = tokenizer.convert_tokens_to_ids(token)
        return found is None or (found == tokenizer.unk_token_id and token != tokenizer.unk_token)

    missing = [t for t in dict.fromkeys([*family.stop_tokens, *tokens.additional]) if unknown(t)]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    tokenizer.chat_template = chat_template
    return tokenizer


def remote_tiny_config(family: ModelFamily, shape: SmokeModelShape, vocab_size: int, out_dir: Path,
                       **token_ids: int | None) -> tuple[Any, Any]:
    """(model class, config) of a tiny model of the shipped code's classes: the smoke shape under the config's own
    field names (remote_code.config_names), written to out_dir/config.json and read back through AutoConfig."""
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    code: RemoteCode = family.remote_code  # type: ignore[assignment]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    copy_code(family, out_dir)
    fields = {**shape.model_dump(exclude={"extra", "vision", "vocab_size"}), "vocab_size": vocab_size}
    named = {code.config_names.get(name, name): value for name, value in fields.items()}
    ids = {name: value for name, value in token_ids.items() if value is not None}
    (out_dir / "config.json").write_text(json.dumps({
        "architectures": [family.architecture], "model_type": code.model_type, "auto_map": _auto_map(code, False),
        "max_position_embeddings": 4096, **named, **ids, **shape.extra}))
    config = AutoConfig.from_pretrained(out_dir, trust_remote_code=True)
    ignored = {name: value for name, value in named.items() if getattr(config, name, None) != value}
    if ignored:
        raise ValueError(f"{type(config).__name__} ignored the smoke shape fields {ignored} (model.yaml `smoke:`; "
                         "remote_code.config_names maps a field to the config's own name)")
    target = code.auto_map.get("AutoModelForCausalLM") or code.auto_map["AutoModel"]
    return get_class_from_dynamic_module(target, str(out_dir)), config
