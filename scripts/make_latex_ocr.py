"""Make the LoRA task's default image-text data: a small LaTeX-OCR set in upstream's format (self-llm
models/Qwen2-VL "LaTexOCR" tutorial: {"id", "conversations": [{"role": "user", "value": IMAGE_PATH},
{"role": "assistant", "value": LATEX}]}), every formula rendered offline to a PNG with matplotlib's mathtext.

Deterministic: the formulas come from a seeded generator, the PNGs carry no metadata (same matplotlib → same
bytes). Writes OUT/latex_ocr.json and OUT/images/NNNN.png (paths relative to the JSON) and prints the set's
sha256 (finetune/vision_data.py data_digest), which the runtime checks before training on the shipped set.

    python scripts/make_latex_ocr.py [--count 120] [--seed 0] [--out runtime/selfllm_runtime/finetune/data/latex_ocr]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "runtime"))

LETTERS = list("abcxyzmnkt") + [r"\alpha", r"\beta", r"\theta", r"\lambda", r"\mu", r"\sigma", r"\omega"]
FUNCTIONS = [r"\sin", r"\cos", r"\log", r"\exp", r"\tan"]


def term(rng: random.Random) -> str:
    base = rng.choice(LETTERS)
    shape = rng.randrange(6)
    if shape == 0:
        return f"{base}^{{{rng.randint(2, 9)}}}"
    if shape == 1:
        return f"{base}_{{{rng.choice('ijn0123')}}}"
    if shape == 2:
        return f"{rng.choice(FUNCTIONS)}({base})"
    if shape == 3:
        return rf"\frac{{{base}}}{{{rng.randint(2, 9)}}}"
    if shape == 4:
        return rf"\sqrt{{{base}+{rng.randint(1, 9)}}}"
    return f"{rng.randint(2, 9)}{base}"


def formula(rng: random.Random) -> str:
    kind = rng.randrange(4)
    body = f" {rng.choice('+-')} ".join(term(rng) for _ in range(rng.randint(1, 3)))
    if kind == 0:
        return f"{rng.choice(LETTERS)} = {body}"
    if kind == 1:
        var = rng.choice("ikn")
        return rf"\sum_{{{var}=1}}^{{{rng.randint(3, 9)}}} {body}"
    if kind == 2:
        return rf"\int_{{0}}^{{{rng.randint(1, 9)}}} {body} \, dx"
    return rf"\lim_{{x \to {rng.randint(0, 9)}}} {body}"


def render(latex: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure = pyplot.figure(figsize=(0.01, 0.01))
    figure.text(0, 0, f"${latex}$", fontsize=14)
    figure.savefig(out, dpi=80, bbox_inches="tight", pad_inches=0.05, metadata={"Software": None})
    pyplot.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "runtime/selfllm_runtime/finetune/data/latex_ocr")
    args = parser.parse_args()
    from selfllm_runtime.finetune.vision_data import DEFAULT_IMAGE_DATA_NAME, data_digest

    rng = random.Random(args.seed)
    (args.out / "images").mkdir(parents=True, exist_ok=True)
    records, seen = [], set()
    while len(records) < args.count:
        latex = formula(rng)
        if latex in seen:
            continue
        seen.add(latex)
        name = f"images/{len(records):04d}.png"
        render(latex, args.out / name)
        records.append({"id": f"identity_{len(records) + 1}",
                        "conversations": [{"role": "user", "value": name}, {"role": "assistant", "value": latex}]})
    data = args.out / DEFAULT_IMAGE_DATA_NAME
    data.write_text(json.dumps(records, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(f"{len(records)} records → {data}; sha256 {data_digest(data)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
