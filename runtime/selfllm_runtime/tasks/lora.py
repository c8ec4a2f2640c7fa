"""Task `lora`: LoRA fine-tuning of the recipe's model (upstream's huanhuan.json, shipped, by default).

  selfllm start                          = selfllm lora train with settings from the environment
  selfllm lora train [--data F ...]      fine-tune; the adapter goes to $OUTPUT_DIR/<run-name>
  selfllm lora infer --prompt TEXT [--image PATH] [--adapter DIR] [--model DIR]
  selfllm lora merge --adapter DIR [--out DIR] [--model DIR]
  selfllm lora sample-data OUT.json      write a small synthetic data set (both formats)
  selfllm lora sample-data --latex-ocr OUT.json   copy the shipped LaTeX-OCR image set (images beside OUT)
  selfllm lora dashboard [RUN_DIR]       SwanLab's local dashboard of a run on HOST:PORT (default: the newest)

Every run draws its curves into <run>/curves.png and, with REPORT_TO=swanlab (the default, offline), logs
to <run>/swanlog.

The base model is --model, else MODEL_PATH, else MODEL_ID downloaded like `selfllm start`. Settings
(settings.LoraSettings): flag, else environment variable, else the recipe's `env:`, else model.yaml's
`lora:`, else the default; all are checked before the model is fetched. Each action ends with one line
`SELFLLM_RESULT {json}`.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..context import RecipeContext, load_context
from ..finetune.data import DataError, write_sample_data
from ..finetune.lora import infer, merge, train
from ..finetune.vision import check_data as check_image_data
from ..finetune.vision_data import copy_image_data
from ..model_source import ModelNotFound, model_request, resolve_model
from ..settings import AccessSettings, AdapterSettings, LoraSettings, ModelSettings, add_flags, parse_bool


def torchrun_argv(processes: int, python: str = sys.executable) -> list[str]:
    """`selfllm start` again, in `processes` processes on this machine, through torch's own launcher (torchrun)."""
    return [python, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc-per-node", str(processes),
            "-m", "selfllm_runtime", "start"]


def run(context: RecipeContext, model_dir: Path, settings: LoraSettings) -> None:
    """`selfllm start`: train with the settings from the environment (no flags); NPROC > 1 (and not yet inside
    torchrun): the same command under torchrun, one process per GPU (CPU: gloo)."""
    processes = settings.processes()
    if processes > 1 and "LOCAL_RANK" not in os.environ:
        argv = torchrun_argv(processes)
        print(f"selfllm lora: NPROC={settings.nproc}: {processes} processes through torchrun: {' '.join(argv[1:])}",
              file=sys.stderr, flush=True)
        os.execv(argv[0], argv)
    try:
        train(context, model_dir, settings)
    except (DataError, ValueError) as exc:  # DataSourceError, SettingsError: one line, status 2 as `selfllm lora`
        print(f"selfllm lora: error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def _model_dir(context: RecipeContext, settings: ModelSettings) -> Path:
    return resolve_model(model_request(context.recipe, settings))


def _flag_bool(text: str) -> bool:
    try:
        return parse_bool(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfllm lora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", help="recipe folder (default: $RECIPE_DIR or /opt/recipe)")
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("train", help="fine-tune a LoRA adapter")
    add_flags(p, LoraSettings, skip=("adapter_path",))
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
    p = sub.add_parser("sample-data", help="write a small synthetic data set mixing both formats")
    p.add_argument("out")
    p.add_argument("--count", type=int, default=36)
    p.add_argument("--latex-ocr", action="store_true", help="instead: a copy of the shipped LaTeX-OCR image-text set "
                   "(OUT and OUT's images/ folder)")
    p = sub.add_parser("dashboard", help="serve SwanLab's local dashboard of a run (swanlab watch) on HOST:PORT")
    p.add_argument("run_dir", nargs="?", type=Path, help="a run folder (default: the newest under OUTPUT_DIR)")
    p.add_argument("--host", default=None, help="the address it binds (env HOST)")
    p.add_argument("--port", default=None, help="its port (env PORT; default: the recipe's)")
    p.add_argument("--output-dir", dest="output_root", default=None, help="where the runs are (env OUTPUT_DIR)")
    return parser


def main(argv: list[str] | None = None, recipe: str | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.action == "sample-data":
        print(copy_image_data(Path(args.out)) if args.latex_ocr else write_sample_data(Path(args.out), args.count))
        return 0
    context = load_context(args.recipe or recipe)
    try:
        if args.action == "dashboard":
            from ..finetune import dashboard

            access = context.settings(AccessSettings, cli={"host": args.host, "port": args.port})
            runs = context.settings(LoraSettings, cli={"output_root": args.output_root})
            dashboard.serve(args.run_dir, runs.output_root, access.host, access.port_for(context.recipe))
            return 0
        if args.action == "train":
            settings = context.settings(LoraSettings, cli=vars(args))  # checked before the model is fetched
            check_image_data(context, settings)  # every image of DATA_PATH decodes, before the model is fetched
            train(context, _model_dir(context, settings), settings)
            return 0
        tool = context.settings(AdapterSettings, cli={"model_path": args.model_path, "adapter_path": args.adapter_path,
                                                      "quantization": args.quantization})
        if args.action == "infer":
            infer(context, _model_dir(context, tool), tool.adapter_path, args.prompt, args.system,
                  args.enable_thinking, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                  tool.quantization, args.image)
        else:
            if tool.adapter_path is None:
                raise ValueError("merge needs the adapter: --adapter DIR or ADAPTER_PATH")
            adapter = tool.adapter_path
            out = Path(args.out) if args.out else adapter.with_name(adapter.name + "-merged")
            merge(context, _model_dir(context, tool), adapter, out)
    except (DataError, ValueError, ModelNotFound) as exc:
        print(f"selfllm lora: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0
