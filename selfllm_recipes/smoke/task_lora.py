"""Smoke check of task `lora`: a run to completion, not a server. On the tiny model and a small
generated data set (both formats), the container trains 20 steps through `selfllm start`, answers
with the base model and with the adapter (the prompt's log-prob must move, and visible greedy replies
differ), merges it, and answers from the merged model (as with the adapter, same log-prob). Then QLoRA
(QUANTIZATION=4bit, bitsandbytes' CPU backend): trains 20 steps on the 4-bit base (loss falls), answers
with the 4-bit base alone and with its adapter (the quantization read back from the run; the log-prob
moves, the 4-bit weights take less memory), and merges it into the full-precision base. Each step
prints `SELFLLM_RESULT {json}`. The first run's tracking files are read inside the container (stdlib only:
run_files) and checked here: `curves.png` is a PNG drawn for the 20 steps with the logged losses (saved beside the
container log as <recipe>.curves.png), and the offline SwanLab log (`swanlog/`) holds the 20 loss points. A family with text-only sizes of another class (model.yaml `variants:`, Gemma-3
270m/1b) also trains 4 steps on a tiny model of that class, with no override.

A family whose model.yaml takes images trains on image-text data instead: the shipped LaTeX-OCR set (no DATA_PATH,
its images read by the family's processor, the vision tower frozen), every `infer` asks about an image of the set
(`--image`: the log-prob fingerprint is image-conditioned), and first a data file naming a missing image must be
refused by `selfllm lora train` with one line naming the file and the record, exit status 2."""
from __future__ import annotations

from selfllm_runtime.finetune.vision_data import LATEX_OCR_PROMPT

from .checks import (family_of, LOGPROB_MOVED, LOGPROB_SAME, SMOKE_MODEL_DIR, SmokeCheck, SmokeSession, expect,
                     recipe_context, results)
from .run_files import run_files, run_files_step, verify_run_files  # noqa: F401  (run_files: tests read a native run)

DATA = "/root/autodl-tmp/data/lora-sample.json"
ADAPTER = "/root/autodl-tmp/lora/smoke"
MERGED = ADAPTER + "-merged"
QLORA_ADAPTER = ADAPTER + "-4bit"
QLORA_MERGED = QLORA_ADAPTER + "-merged"
SYSTEM_PROMPT = "现在你要扮演皇帝身边的女人--甄嬛"
# the same greedy question to the base model, with the adapter, and to the merged model
ASK = f"--prompt '你是谁？' --system '{SYSTEM_PROMPT}' --enable-thinking false --temperature 0 --max-new-tokens 16"
# An image family: a copy of the shipped LaTeX-OCR set (for --image), a data file naming a missing image
IMAGE_DATA_DIR = "/root/autodl-tmp/data/latex-ocr"
BAD_IMAGE_DATA = f"{IMAGE_DATA_DIR}/missing-image.json"
IMAGE_RECORDS = 120  # scripts/make_latex_ocr.py --count
ASK_IMAGE = (f"--prompt '{LATEX_OCR_PROMPT}' --image {IMAGE_DATA_DIR}/images/0003.png --enable-thinking false "
             "--temperature 0 --max-new-tokens 16")
BAD_IMAGE_RECORD = '[{"conversations": [{"role": "user", "value": "missing.png"}, {"role": "assistant", "value": "x"}]}]'
REFUSAL_STEP = (f"(printf '%s' '{BAD_IMAGE_RECORD}' > {BAD_IMAGE_DATA}; selfllm lora train --data {BAD_IMAGE_DATA} "
                "2> /tmp/refused.err; code=$?; python3 -c \"import json, sys; print('SELFLLM_RESULT ' + json.dumps("
                "{'action': 'refused', 'code': int(sys.argv[1]), 'stderr': open('/tmp/refused.err').read()}))\" $code)")
IMAGE_PREFIX = [f"selfllm lora sample-data --latex-ocr {IMAGE_DATA_DIR}/latex_ocr.json", REFUSAL_STEP]


LORA_STEPS = [
    f"selfllm smoke-model {SMOKE_MODEL_DIR}",
    f"selfllm lora sample-data {DATA}",
    "selfllm start",  # train with the settings in ENV below
    run_files_step(ADAPTER, "train/loss"),  # curves.png, curves.json and the SwanLab log it wrote
    f"selfllm lora infer {ASK}",  # the base model (MODEL_PATH), no adapter
    f"selfllm lora infer --adapter {ADAPTER} {ASK}",
    f"selfllm lora merge --adapter {ADAPTER} --out {MERGED}",
    f"selfllm lora infer --model {MERGED} {ASK}",
]
# QLoRA: train on the 4-bit base; infer from the 4-bit base alone, then with the adapter (no flag:
# the run's quantization); merge into the full-precision base
QLORA_STEPS = [
    "QUANTIZATION=4bit RUN_NAME=smoke-4bit selfllm start",
    f"selfllm lora infer --quantization 4bit {ASK}",
    f"selfllm lora infer --adapter {QLORA_ADAPTER} {ASK}",
    f"selfllm lora merge --adapter {QLORA_ADAPTER} --out {QLORA_MERGED}",
]
COMMAND = " && ".join(LORA_STEPS + QLORA_STEPS)
LORA_ACTIONS = ["train", "run_files", "infer", "infer", "merge", "infer"]
ACTIONS = LORA_ACTIONS + ["train", "infer", "infer", "merge"]
ENV = {"DATA_PATH": DATA, "RUN_NAME": "smoke", "MAX_STEPS": "20",
       "LEARNING_RATE": "5e-3", "BATCH_SIZE": "4", "GRAD_ACCUM": "1", "LOGGING_STEPS": "1",
       "SYSTEM_PROMPT": SYSTEM_PROMPT}


def _visible(output: str) -> str:
    """The output's text without thinking markers and whitespace ('' when the tiny model's greedy tokens
    decode to whitespace only, as the tiny DeepSeek-R1-Distill's repeated newline: then the greedy
    replies say nothing and only the log-prob fingerprint compares the models)."""
    return output.replace("<think>", "").replace("</think>", "").strip()


def verify_training(trained: dict, label: str) -> tuple[float, float]:
    """(first, last) mean of three logged losses, after checking 20 steps ran, the loss fell and the
    adapter was saved."""
    losses = trained["losses"]
    expect(trained["steps"] == 20 and len(losses) >= 6,
           f"{label}: trained {trained['steps']} steps, logged {len(losses)} losses")
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    expect(last < first, f"{label}: loss did not go down: {losses}")
    expect({"adapter_config.json", "adapter_model.safetensors"} <= set(trained["adapter_files"]),
           f"{label}: adapter files: {trained['adapter_files']}")
    return first, last


def verify_layout(trained: dict, recipe_key: str) -> str:
    """GPU_LAYOUT as the recipe's card count asks (spread: a family one card can't hold) and where the weights went;
    '' for the usual one-card data layout, else a note for the result line."""
    gpus = recipe_context(recipe_key).recipe.gpu.count
    expected = "spread" if gpus > 1 else "data"
    expect(trained.get("gpu_layout") == expected and trained.get("devices"),
           f"GPU_LAYOUT should be {expected} for a recipe of {gpus} card(s), with the weights' devices: "
           f"{trained.get('gpu_layout')} on {trained.get('devices')}")
    return "" if gpus == 1 else f", GPU_LAYOUT=spread as on {gpus} cards: one process, weights on {trained['devices']}"


def verify_refusal(refused: dict) -> str:
    """`selfllm lora train` on a file naming a missing image: status 2, one line naming the file and the record."""
    lines = [line for line in refused["stderr"].splitlines() if line.strip() and "WARN" not in line]
    expect(refused["code"] == 2 and "Traceback" not in refused["stderr"] and len(lines) == 1
           and f"{BAD_IMAGE_DATA}: record 0: image" in lines[0] and "missing.png" in lines[0],
           f"a missing image must be refused in one line naming file and record, status 2: {refused}")
    return f"a missing image refused (status 2): {lines[0]!r}"


def verify_lora(session: SmokeSession) -> str:
    code = session.exit_code()
    found = results(session.logs())
    actions = [r["action"] for r in found]
    expect(code == 0, f"the container exited with code {code} after {actions or 'no result'}")
    images = takes_images(session.recipe_key)
    image_line = ""
    if images:
        expect(bool(found) and found[0]["action"] == "refused", f"expected the missing image's refusal first: {actions}")
        image_line = "; " + verify_refusal(found.pop(0))
        actions = actions[1:]
    qlora, other = quantizable(session.recipe_key), variant(session.recipe_key)
    expect(actions == (ACTIONS if qlora else LORA_ACTIONS) + (["train"] if other else []),
           "expected train, run_files (curves and SwanLab log), infer (base), infer (adapter), merge, infer (merged)"
           + (", then QLoRA's train, infer (4-bit base), infer (adapter), merge" if qlora else "")
           + (f", then train on a {other}" if other else "") + f"; got {actions}")
    variant_line = ""
    if other:
        trained_variant = found.pop()
        expect(trained_variant["architecture"] == other and trained_variant["steps"] == 4
               and "adapter_model.safetensors" in trained_variant["adapter_files"],
               f"training on the {other} variant: {trained_variant}")
        variant_line = f"; 4 steps on a tiny {other} (its own LoRA modules)"
    trained, files, infer_base, infer_adapter, merged, infer_merged = found[:len(LORA_ACTIONS)]
    first, last = verify_training(trained, "LoRA")
    layout = verify_layout(trained, session.recipe_key)
    tracked = verify_run_files(files, trained["steps"], trained["losses"], "loss", session)
    expect(infer_adapter["adapter"] == ADAPTER and infer_adapter["completion_tokens"] > 0,
           f"inference with the adapter: {infer_adapter}")
    # `output` is the whole generated text, thinking included (R1-style templates open the thinking block,
    # so a random model's 16 tokens are all thinking and `reply` is empty)
    expect(infer_base["adapter"] is None, f"the base model's inference used an adapter: {infer_base}")
    # The weights' fingerprint (mean log-prob of the prompt): an untrained adapter leaves it where the base
    # model has it; the merged model must have the adapter's.
    base_lp, adapter_lp, merged_lp = (r["prompt_logprob"] for r in (infer_base, infer_adapter, infer_merged))
    expect(abs(adapter_lp - base_lp) > LOGPROB_MOVED,
           f"the adapter leaves the model as it was: prompt log-prob {base_lp} (base) vs {adapter_lp} (adapter)")
    expect(abs(merged_lp - adapter_lp) < LOGPROB_SAME,
           f"the merged model is not base + adapter: prompt log-prob {merged_lp} (merged) vs {adapter_lp} (adapter)")
    visible = any(_visible(r["output"]) for r in (infer_base, infer_adapter))
    expect(not visible or infer_adapter["output"] != infer_base["output"],
           f"the adapter does not change the greedy output: {infer_adapter['output']!r} (base: {infer_base['output']!r})")
    expect("config.json" in merged["files"] and any(f.endswith(".safetensors") for f in merged["files"]),
           f"merged folder holds {merged['files']}")
    expect(infer_merged["adapter"] is None and infer_merged["model"] == MERGED
           and infer_merged["output"] == infer_adapter["output"],
           f"the merged model answers {infer_merged['output']!r}, the adapter {infer_adapter['output']!r}")
    return (f"trained {trained['steps']} steps on {trained['examples']} examples, loss {first:.2f} → {last:.2f}, "
            f"{trained['tokens_per_s']} tokens/s ({trained['device']}{layout}); "
            + ("on the LaTeX-OCR set's images, " if images else "")
            + f"the adapter moves the {'image-conditioned ' if images else ''}prompt log-prob {base_lp:.4f} → "
              f"{adapter_lp:.4f}"
            + (" and changes the greedy reply, " if visible else " (greedy replies are whitespace), ")
            + tracked + "; "
            + "the merged model answers as base + adapter; "
            + (verify_qlora(found[len(LORA_ACTIONS):], infer_base) if qlora
               else "no QLoRA (the checkpoint ships quantized weights: QUANTIZATION is refused)") + variant_line
            + image_line)


def quantizable(recipe_key: str) -> bool:
    """Whether QUANTIZATION applies to the recipe's family (not to weights shipped quantized: gpt-oss's MXFP4)."""
    return family_of(recipe_key).parameters_b.quantizable


def variant(recipe_key: str) -> str | None:
    """The first class of the family's model.yaml `variants:` (Gemma-3's text-only sizes), trained on last."""
    return next(iter(family_of(recipe_key).variants), None)


def variant_steps(architecture: str) -> list[str]:
    """A tiny model of the variant's class, and 4 training steps on it with no override (LoRA's modules picked
    from its config)."""
    folder = f"/tmp/tiny-{architecture}"
    return [f"selfllm smoke-model {folder} --architecture {architecture}",
            f"MODEL_PATH={folder} RUN_NAME=smoke-variant MAX_STEPS=4 selfllm start"]


def takes_images(recipe_key: str) -> bool:
    """Whether the family's model.yaml takes images: LoRA then trains on image-text data."""
    return family_of(recipe_key).modalities.takes("image")


def image_steps(steps: list[str]) -> list[str]:
    """The steps of an image family: the LaTeX-OCR copy and the refusal first, the shipped set trained on (no
    sample data), every question asked about an image."""
    return IMAGE_PREFIX + [step.replace(ASK, ASK_IMAGE) for step in steps if not step.startswith("selfllm lora sample-data")]


def recipe_check(spec) -> SmokeCheck:
    """LoRA, then QLoRA where the family can be quantized, then a text-only variant where the family has one; an
    image family's on image-text data."""
    steps = LORA_STEPS + (QLORA_STEPS if quantizable(spec.key) else [])
    env = ENV
    if takes_images(spec.key):
        steps = [steps[0]] + image_steps(steps[1:])
        env = {key: value for key, value in ENV.items() if key not in ("DATA_PATH", "SYSTEM_PROMPT")}
    if (architecture := variant(spec.key)) is not None:
        steps = steps + variant_steps(architecture)
    return SmokeCheck(command=" && ".join(steps), verify=verify_lora, serves_http=False, env=env)


def verify_qlora(found: list[dict], full_base: dict) -> str:
    """QLoRA's train, infer (4-bit base), infer (adapter), merge; full_base: the full-precision base's infer."""
    trained, infer_base, infer_adapter, merged = found
    expect(trained["quantization"] == "4bit", f"QLoRA trained with quantization {trained['quantization']!r}")
    first, last = verify_training(trained, "QLoRA")
    expect(infer_base["adapter"] is None and infer_base["quantization"] == "4bit",
           f"the 4-bit base's inference: {infer_base}")
    expect(infer_base["weights_gb"] < full_base["weights_gb"],
           f"the 4-bit base takes {infer_base['weights_gb']} GB, the full-precision one {full_base['weights_gb']} GB")
    expect(infer_adapter["adapter"] == QLORA_ADAPTER and infer_adapter["quantization"] == "4bit"
           and infer_adapter["completion_tokens"] > 0,
           f"inference with the QLoRA adapter (on the 4-bit base it was trained on): {infer_adapter}")
    base_lp, adapter_lp = infer_base["prompt_logprob"], infer_adapter["prompt_logprob"]
    expect(abs(adapter_lp - base_lp) > LOGPROB_MOVED,
           f"the QLoRA adapter leaves the 4-bit model as it was: prompt log-prob {base_lp} vs {adapter_lp}")
    expect(merged["trained_on"] == "4bit" and merged["merged_dtype"] in ("float32", "bfloat16", "float16")
           and "config.json" in merged["files"],
           f"the QLoRA adapter must merge into the full-precision base: {merged}")
    return (f"QLoRA (4bit): loss {first:.2f} → {last:.2f}, weights {infer_base['weights_gb'] * 1e3:.3f} MB "
            f"(full precision {full_base['weights_gb'] * 1e3:.3f} MB), the adapter moves the 4-bit model's "
            f"log-prob {base_lp:.4f} → {adapter_lp:.4f}, merged into the {merged['merged_dtype']} base")


CHECK = SmokeCheck(command=COMMAND, verify=verify_lora, serves_http=False, env=ENV)
