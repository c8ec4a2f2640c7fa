"""`selfllm` — the one entry point of every image and of a native (AutoDL) install.

  selfllm start [--recipe DIR]       acquire the model, then run the recipe's task
  selfllm health                     exit 0 when the task answers (the image's HEALTHCHECK)
  selfllm smoke-model OUT [--architecture CLASS]  a tiny random model of the recipe's class (or a variant's)
  selfllm fetch-model                download the model into the cache and print its folder
  selfllm settings                   every setting of the task: its value and where it came from
  selfllm link RECIPE_DIR            native install's last step (runtime/bin/selfllm-install)
  selfllm lora train|infer|merge     LoRA fine-tuning (selfllm lora -h): a task kind's own command (task.yaml
                                     `kind.command`), in that kind's images
  selfllm convert-gguf IN.gguf OUT   a GGUF file as a checkpoint folder (safetensors + tokenizer), for MODEL_PATH
"""
from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
import sysconfig
import urllib.request
from pathlib import Path

from .access import check_port_free
from .chat_template import choose_chat_template
from .context import RUNTIME_ROOT, RecipeContext, load_context
from .metadata import TASK_FILE, TASK_NAME, MetadataError, build_line, kind_info, tasks_root
from .model_source import ModelNotFound, model_request, request_from_env, resolve_model
from .remote_code import RemoteCodeMismatch, shipped_model_dir
from .settings import AccessSettings, SettingsError, TemplateSettings, explain, task_settings

def task_module_name(task: str) -> str:
    """selfllm_runtime.tasks.<module> of task kind `task` (its task.yaml `kind.module`)."""
    return f"selfllm_runtime.tasks.{kind_info(task).module}"


def task_module(context: RecipeContext):
    return importlib.import_module(task_module_name(context.recipe.task))


def cmd_start(args: argparse.Namespace) -> int:
    context = load_context(args.recipe)
    settings = context.settings()  # every task setting is checked before anything is downloaded
    logging.getLogger("selfllm").info("selfllm: %s, %s", context.recipe.model + "/" + context.recipe.task.value,
                                      build_line(context.recipe, context.recipe_dir))
    if isinstance(settings, AccessSettings):  # a server: its port must be free (PORT), before any download
        check_port_free(*settings.address(context.recipe))
    module = task_module(context)
    if hasattr(module, "before_download"):  # a task's own checks of what it reads besides the model (its data)
        module.before_download(context, settings)
    needs_model = getattr(module, "needs_model", None)  # a task that may work without a local model (eval + EVAL_URL)
    if needs_model is not None and not needs_model(settings):
        module.run(context, None, settings)
        return 0
    model_dir = shipped_model_dir(context.family, resolve_model(model_request(context.recipe, settings)))
    if isinstance(settings, TemplateSettings):  # CHAT_TEMPLATE=checkpoint on one without: refused before loading
        choose_chat_template(context, model_dir, settings.chat_template)
    module.run(context, model_dir, settings)
    return 0


# `selfllm health` (the image's HEALTHCHECK, --timeout=5s) gives the server this long to answer.
HEALTH_TIMEOUT_S = 4


def cmd_health(args: argparse.Namespace) -> int:
    context = load_context(args.recipe)
    path = kind_info(context.recipe.task).health_path  # none: no server, healthy while the process runs
    if path is None:
        return 0
    host, port = context.settings().address(context.recipe)  # HOST, PORT as `selfllm start` read them
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "[::]") else host
    host = f"[{host}]" if ":" in host else host
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=HEALTH_TIMEOUT_S) as answer:
        return 0 if answer.status == 200 else 1


def cmd_smoke_model(args: argparse.Namespace) -> int:
    from .smoke_model import SmokeModelTooLarge, make_smoke_model, parameter_line

    try:
        out = make_smoke_model(load_context(args.recipe), Path(args.out), architecture=args.architecture)
    except (SmokeModelTooLarge, ValueError) as exc:
        print(f"selfllm smoke-model: error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(parameter_line(out), file=sys.stderr, flush=True)  # the smoke report reads the count from this line
    print(out)
    return 0


def cmd_fetch_model(args: argparse.Namespace) -> int:
    print(resolve_model(request_from_env(load_context(args.recipe).recipe)))
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    """The recipe's task settings as they would be used now (checked as `selfllm start` checks them)."""
    context = load_context(args.recipe)
    rows = explain(task_settings(context.recipe.task), context.recipe, context.family)
    width = max(len(name) for name, _, _ in rows)
    print(f"# {context.recipe.model}/{context.recipe.task.value} ({build_line(context.recipe, context.recipe_dir)}): "
          "value (from flag > environment > recipe env: > model.yaml > default)")
    for name, value, layer in rows:
        print(f"{name.ljust(width)}  {value or '—'}  ({layer})")
    return 0


def cmd_link(args: argparse.Namespace) -> int:
    """Native path, second half (runtime/bin/selfllm-install runs the lock's pip install first):
    make this runtime importable by the current Python and put a `selfllm` launcher beside it."""
    recipe_dir = Path(args.recipe_dir).resolve()
    load_context(recipe_dir)  # the recipe must validate
    site = Path(sysconfig.get_paths()["purelib"])
    (site / "selfllm_runtime.pth").write_text(str(RUNTIME_ROOT) + "\n")
    launcher = Path(sys.executable).with_name("selfllm")
    launcher.write_text(f"#!/bin/sh\nRECIPE_DIR=${{RECIPE_DIR:-{recipe_dir}}} exec {sys.executable} -m selfllm_runtime \"$@\"\n")
    launcher.chmod(0o755)
    print(f"installed {recipe_dir.parent.name}/{recipe_dir.name}; start it with: {launcher} start")
    return 0


def cmd_convert_gguf(args: argparse.Namespace) -> int:
    from .gguf_checkpoint import GGUFConversionError, convert_gguf

    try:
        converted = convert_gguf(Path(args.gguf), Path(args.out), args.dtype)
    except GGUFConversionError as exc:
        print(f"selfllm convert-gguf: error: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"{converted.architecture}, {converted.parameters} parameters ({args.dtype}), from sha256 "
          f"{converted.sha256}", file=sys.stderr, flush=True)
    print(converted.folder)
    return 0


def cmd_task(task: str, argv: list[str]) -> int:
    """`selfllm <kind> ...`: the command of a task kind (task.yaml `kind.command`), its module's main(argv)."""
    here = (tasks_root() / task / TASK_FILE).is_file() and kind_info(task).command is not None
    name = task_module_name(task) if here else ""
    try:  # by name, as task_module: an image carries only its own task's runtime (selfllm_recipes/runtime_closure.py)
        if not here:
            raise ModuleNotFoundError(name=name)
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        print(f"selfllm: error: `selfllm {task}` is not in this image: it carries the runtime of its own task "
              f"({image_task()}) only; use a {task} recipe image (e.g. selfllm/qwen3-{task})", file=sys.stderr)
        return 2
    return module.main(argv)


def image_task() -> str:
    try:
        return load_context().recipe.task.value
    except (MetadataError, OSError):
        return "another task"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="selfllm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func in (("start", cmd_start), ("health", cmd_health), ("fetch-model", cmd_fetch_model),
                       ("settings", cmd_settings)):
        p = sub.add_parser(name)
        p.add_argument("--recipe", help="recipe folder (default: $RECIPE_DIR or /opt/recipe)")
        p.set_defaults(func=func)
    p = sub.add_parser("smoke-model")
    p.add_argument("out")
    p.add_argument("--recipe")
    p.add_argument("--architecture", help="a class of the family's `variants:` (model.yaml) instead of its default")
    p.set_defaults(func=cmd_smoke_model)
    p = sub.add_parser("convert-gguf", help="a GGUF file as a checkpoint folder (safetensors + tokenizer)")
    p.add_argument("gguf", help="the .gguf file")
    p.add_argument("out", help="the checkpoint folder to write (must not exist, or be empty)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="the saved weights' type (default float32: the dequantized values exactly)")
    p.set_defaults(func=cmd_convert_gguf)
    p = sub.add_parser("link", help="native install's last step (see runtime/bin/selfllm-install)")
    p.add_argument("recipe_dir")
    p.set_defaults(func=cmd_link)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] not in sub.choices and re.match(TASK_NAME, argv[0]):
        try:  # a task kind's own command (`selfllm lora train`): it parses its own flags, so `-h` shows them
            return cmd_task(argv[0], argv[1:])
        except MetadataError as exc:
            print(f"selfllm: error: {exc}", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (MetadataError, ModelNotFound, RemoteCodeMismatch, SettingsError) as exc:
        print(f"selfllm: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if args.command == "health":
            print(f"selfllm: unhealthy: {exc}", file=sys.stderr)
            return 1
        raise
