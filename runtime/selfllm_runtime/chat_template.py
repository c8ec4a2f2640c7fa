"""Which chat template turns messages into prompts: CHAT_TEMPLATE (settings.TemplateSettings), decided here
for every task kind — the transformers engine (fastapi, webdemo, langchain, lora infer), LoRA training
data and vLLM's `--chat-template`:

- `auto` (default): the checkpoint's own template (chat_template.jinja, else tokenizer_config.json's
  `chat_template`, as transformers loads it), the family's copy (recipes/<family>/chat_template.jinja)
  where the checkpoint ships none;
- `checkpoint`: the checkpoint's own only; a checkpoint without one is refused at start (SettingsError:
  one line, exit 2);
- `family`: the family's copy;
- a file path: that Jinja template.

The family's system-role policy (system_role.py) is applied on top of whichever is chosen. The start log
and the fastapi server's `/health` name the one in use (ChatTemplate.describe()).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from jinja2 import TemplateError

from .context import RecipeContext
from .settings import SettingsError

CHECKPOINT_FILES = ("chat_template.jinja", "tokenizer_config.json")


@dataclass(frozen=True)
class ChatTemplate:
    text: str
    source: Literal["checkpoint", "family", "file"]
    file: str  # where the text was read ("the tokenizer" for a template only the loaded tokenizer has)

    def describe(self) -> str:
        return f"{self.source} ({self.file})"

    def as_dict(self) -> dict[str, str]:
        return {"source": self.source, "file": self.file}


def checkpoint_template_file(model_dir: Path | str) -> tuple[str, Path] | None:
    """(template, file) the checkpoint ships, as transformers (and so vLLM) loads it: chat_template.jinja, else
    tokenizer_config.json's `chat_template` (a string, or the one named "default" of a list); None if none."""
    folder = Path(model_dir)
    jinja, config = (folder / name for name in CHECKPOINT_FILES)
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), jinja
    if not config.is_file():
        return None
    template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return (template, config) if isinstance(template, str) else None


def checkpoint_chat_template(model_dir: Path | str) -> str | None:
    """The checkpoint's own template text (checkpoint_template_file), or None."""
    found = checkpoint_template_file(model_dir)
    return found[0] if found else None


def choose_chat_template(context: RecipeContext, model_dir: Path | str, setting: str,
                         tokenizer: Any = None) -> ChatTemplate:
    """The template CHAT_TEMPLATE (`setting`, validated by settings.TemplateSettings) picks for this checkpoint.
    tokenizer: the loaded tokenizer, whose own template counts as the checkpoint's where no file holds one
    (e.g. one read from a GGUF file). SettingsError for `checkpoint` on a checkpoint without a template."""
    if setting not in ("auto", "checkpoint", "family"):
        path = Path(setting)
        return ChatTemplate(path.read_text(encoding="utf-8"), "file", str(path))
    family_file = context.family_dir / context.family.chat_template
    family = ChatTemplate(context.chat_template, "family", str(family_file))
    if setting == "family":
        return family
    found = checkpoint_template_file(model_dir)
    own = getattr(tokenizer, "chat_template", None)
    if found is not None:
        return ChatTemplate(found[0], "checkpoint", str(found[1]))
    if isinstance(own, str) and own:
        return ChatTemplate(own, "checkpoint", "the tokenizer")
    if setting == "checkpoint":
        raise SettingsError(f"CHAT_TEMPLATE=checkpoint: {model_dir} ships no chat template (no chat_template.jinja, "
                            f"no chat_template in tokenizer_config.json); CHAT_TEMPLATE=auto or family serves the "
                            f"family's ({family_file})")
    return family


def use_chat_template(tokenizer: Any, context: RecipeContext, model_dir: Path | str, setting: str) -> ChatTemplate:
    """choose_chat_template, then make it the tokenizer's (a checkpoint's own template is left as transformers
    loaded it: a list of named templates keeps its tool_use one)."""
    chosen = choose_chat_template(context, model_dir, setting, tokenizer)
    if chosen.source != "checkpoint":
        tokenizer.chat_template = chosen.text
    return chosen


def refused_by_template(exc: TemplateError) -> bool:
    """The template's own `raise_exception` (transformers raises a bare TemplateError): it refuses these messages
    (Gemma's "roles must alternate"), the client's error, a 400; a subclass (a syntax error, an undefined name) is
    a broken template, the server's error, a 500."""
    return type(exc) is TemplateError


def template_failure(template: ChatTemplate, exc: TemplateError) -> tuple[int, str]:
    """The HTTP status and message for a chat template that failed on a request's messages."""
    if refused_by_template(exc):
        return 400, f"the chat template ({template.source}) refuses these messages: {exc}"
    return 500, f"this server's chat template ({template.source}) could not render the messages: {exc}"

