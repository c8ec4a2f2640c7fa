"""Which recipe this process serves, and the model family data that goes with it."""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .metadata import ModelFamily, Recipe, chat_template_text, load_family, load_recipe, tasks_root
from .settings import TaskSettings, resolve, task_settings

RUNTIME_ROOT = Path(__file__).resolve().parent.parent  # runtime/ in the repo, /opt/selfllm/runtime in images
DEFAULT_RECIPE_DIR = Path("/opt/recipe")


def recipes_root() -> Path:
    """recipes/ beside runtime/ (the repo checkout natively, /opt/selfllm/recipes in images)."""
    return Path(os.environ.get("SELFLLM_RECIPES_ROOT", RUNTIME_ROOT.parent / "recipes"))


def checkpoint_architecture(model_dir: Path) -> str | None:
    """The class a checkpoint's config.json names (its first `architectures` entry), or None."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return (config.get("architectures") or [None])[0]


@dataclass(frozen=True)
class RecipeContext:
    recipe_dir: Path
    recipe: Recipe
    family_dir: Path
    family: ModelFamily

    @property
    def chat_template(self) -> str:
        return chat_template_text(self.family_dir, self.family)

    def settings(self, model: type[TaskSettings] | None = None, cli: Mapping[str, Any] | None = None,
                 env: Mapping[str, str] | None = None) -> Any:
        """This recipe's task settings (or another settings model's), resolved by settings.resolve."""
        return resolve(model or task_settings(self.recipe.task), self.recipe, self.family, cli, env)

    def for_checkpoint(self, model_dir: Path) -> "RecipeContext":
        """This context with the family as it applies to the checkpoint in model_dir, picked by the class its
        config.json names (model.yaml `variants:`); a class the family doesn't know: one warning line saying what
        it expects, and the family's defaults."""
        architecture = checkpoint_architecture(model_dir)
        if architecture is None:
            return self
        family = self.family.for_architecture(architecture)
        if family is None:
            logging.getLogger("selfllm").warning(
                "%s is a %s checkpoint; %s expects %s. The defaults of %s apply; if they don't fit (LoRA's "
                "modules), add the class under `variants:` in %s", model_dir, architecture,
                self.family.display_name, self.family.known_classes(), self.family.architecture,
                self.family_dir / "model.yaml")
            return self
        return self if family is self.family else replace(self, family=family)

    def template_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """Family defaults, then the recipe's, then the request's (None means 'not given')."""
        merged = {**self.family.chat_template_kwargs, **self.recipe.chat_template_kwargs}
        if self.family.thinking is not None:
            merged.setdefault(self.family.thinking.template_kwarg, self.family.thinking.default)
        if self.family.reasoning_effort is not None:
            merged.setdefault(self.family.reasoning_effort.template_kwarg, self.family.reasoning_effort.default)
        merged.update({k: v for k, v in overrides.items() if v is not None})
        return merged


def load_context(recipe_dir: Path | str | None = None) -> RecipeContext:
    folder = Path(recipe_dir or os.environ.get("RECIPE_DIR") or DEFAULT_RECIPE_DIR)
    recipe = load_recipe(folder, recipes_root(), tasks_root())
    family_dir = recipes_root() / recipe.model
    return RecipeContext(folder, recipe, family_dir, load_family(family_dir))
