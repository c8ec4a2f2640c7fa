"""What every adapter-training task's command shares (`selfllm lora ...`, `selfllm grpo ...`): NPROC's torchrun
launch, the `infer` / `merge` actions on the adapter a run wrote (finetune/lora.py's infer and merge), and
`dashboard` (SwanLab's local dashboard of a run, finetune/dashboard.py)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..context import RecipeContext
from ..model_source import model_request, resolve_model
from ..remote_code import shipped_model_dir
from ..settings import AccessSettings, AdapterSettings, LoraSettings, ModelSettings, add_flags, parse_bool
from .lora import infer, merge


def torchrun_argv(processes: int, python: str = sys.executable) -> list[str]:
    """`selfllm start` again, in `processes` processes on this machine, through torch's own launcher (torchrun)."""
    return [python, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", str(processes),
            "-m", "selfllm_runtime", "start"]


def relaunch_under_torchrun(settings: LoraSettings, command: str) -> None:
    """NPROC > 1 (and not yet inside torchrun): replace this process by the same `selfllm start` under torchrun,
    one process per GPU (CPU: gloo); else return."""
    processes = settings.processes()
    if processes > 1 and "LOCAL_RANK" not in os.environ:
        argv = torchrun_argv(processes)
        print(f"{command}: NPROC={settings.nproc}: {processes} processes through torchrun: {' '.join(argv[1:])}",
              file=sys.stderr, flush=True)
        os.execv(argv[0], argv)


def model_dir(context: RecipeContext, settings: ModelSettings) -> Path:
    return shipped_model_dir(context.family, resolve_model(model_request(context.recipe, settings)))


def _flag_bool(text: str) -> bool:
    try:
        return parse_bool(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def training_parser(command: str, description: str | None, settings_model: type[LoraSettings],
                    train_help: str, sample_help: str) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """`selfllm lora` / `selfllm grpo`: --recipe, `train` (the settings model's flags), the adapter actions
    (infer, merge) and `sample-data OUT`; returns the parser and the sample-data subparser for its own flags."""
    parser = argparse.ArgumentParser(prog=command, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", help="recipe folder (default: $RECIPE_DIR or /opt/recipe)")
    sub = parser.add_subparsers(dest="action", required=True)
    add_flags(sub.add_parser("train", help=train_help), settings_model, skip=("adapter_path",))
    add_adapter_actions(sub)
    sample = sub.add_parser("sample-data", help=sample_help)
    sample.add_argument("out")
    return parser, sample


def add_adapter_actions(sub: argparse._SubParsersAction) -> None:
    """The `infer`, `merge` and `dashboard` subcommands."""
    p = sub.add_parser("infer", help="generate one reply with base model + adapter (or a merged model)")
    add_flags(p, AdapterSettings)  # --model (MODEL_PATH), --adapter (ADAPTER_PATH)
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", type=Path, default=None, help="an image the prompt is about (vision-language families)")
    p.add_argument("--system", default=None, help="system prompt (default: the one used in training)")
    p.add_argument("--enable-thinking", type=_flag_bool, nargs="?", const=True, default=None)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=None, help="default: the checkpoint's generation_config")
    p.add_argument("--top-p", type=float, default=None, help="default: the checkpoint's generation_config")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("merge", help="merge the adapter into a full model folder (needs --adapter / ADAPTER_PATH)")
    add_flags(p, AdapterSettings)
    p.add_argument("--out", help="merged model folder (default: <adapter>-merged)")
    p = sub.add_parser("dashboard", help="serve SwanLab's local dashboard of a run (swanlab watch) on HOST:PORT")
    p.add_argument("run_dir", nargs="?", type=Path, help="a run folder (default: the newest under OUTPUT_DIR)")
    p.add_argument("--host", default=None, help="the address it binds (env HOST)")
    p.add_argument("--port", default=None, help="its port (env PORT; default: the recipe's)")
    p.add_argument("--output-dir", dest="output_root", default=None, help="where the runs are (env OUTPUT_DIR)")


def run_adapter_action(context: RecipeContext, args: argparse.Namespace) -> None:
    """`infer`, `merge` or `dashboard` (args from add_adapter_actions' parsers)."""
    if args.action == "dashboard":
        from . import dashboard

        access = context.settings(AccessSettings, cli={"host": args.host, "port": args.port})
        runs = context.settings(LoraSettings, cli={"output_root": args.output_root})
        dashboard.serve(args.run_dir, runs.output_root, access.host, access.port_for(context.recipe))
        return
    tool = context.settings(AdapterSettings, cli={"model_path": args.model_path, "adapter_path": args.adapter_path,
                                                  "quantization": args.quantization})
    if args.action == "infer":
        infer(context, model_dir(context, tool), tool.adapter_path, args.prompt, args.system,
              args.enable_thinking, args.max_new_tokens, args.temperature, args.top_p, args.seed,
              tool.quantization, args.image)
        return
    if tool.adapter_path is None:
        raise ValueError("merge needs the adapter: --adapter DIR or ADAPTER_PATH")
    adapter = tool.adapter_path
    out = Path(args.out) if args.out else adapter.with_name(adapter.name + "-merged")
    merge(context, model_dir(context, tool), adapter, out)
