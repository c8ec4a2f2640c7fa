"""Decoding tokens/s per torch thread count on CPU: what TORCH_THREADS's default is chosen from.

A random model of a small real checkpoint's shape (default: SmolLM-135M's Llama shape, fp32; `--model DIR`
for a real folder instead) generates `--tokens` greedy tokens for one prompt, once per thread count
(torch.set_num_threads, the call TORCH_THREADS makes), best of `--rounds`. `--busy N` runs N processes
that spin a core each meanwhile: a box shared with another job, where oversubscribing threads hurts most.
Prints one line per thread count, and what TORCH_THREADS=auto picks on this machine.

    .venv/bin/python benchmarks/torch_threads.py [--threads 1 2 4] [--tokens 64] [--busy 1] [--model DIR]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "runtime"))

# SmolLM-135M (HuggingFaceTB/SmolLM-135M config.json): the "real 135M model" of issue 20.
SMOLLM_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                   num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)


def spin(stop) -> None:  # a busy neighbour: one core at 100 %
    while not stop.is_set():
        sum(range(10_000))


def load(model_dir: str | None):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if model_dir:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), model_dir
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SMOLLM_135M)).eval(), "random SmolLM-135M shape (fp32)"


def tokens_per_s(model, threads: int, tokens: int, rounds: int) -> float:
    import torch

    torch.set_num_threads(threads)
    prompt = torch.arange(1, 33).unsqueeze(0)
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        best = max(best, (out.shape[1] - prompt.shape[1]) / (time.perf_counter() - start))
    return best


def main() -> int:
    from selfllm_runtime.loading import torch_threads

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, 2, os.cpu_count() or 1}))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--busy", type=int, default=0, help="processes spinning a core each meanwhile")
    parser.add_argument("--model", help="a real model folder (default: a random model of SmolLM-135M's shape)")
    args = parser.parse_args()
    model, name = load(args.model)
    stop = multiprocessing.Event()
    neighbours = [multiprocessing.Process(target=spin, args=(stop,), daemon=True) for _ in range(args.busy)]
    for process in neighbours:
        process.start()
    try:
        tokens_per_s(model, 1, 4, 1)  # warm-up
        print(f"{name}; {os.cpu_count()} logical CPUs; {args.busy} busy neighbour process(es); "
              f"{args.tokens} greedy tokens, best of {args.rounds}")
        for threads in args.threads:
            print(f"threads {threads:>2}: {tokens_per_s(model, threads, args.tokens, args.rounds):6.1f} tokens/s",
                  flush=True)
    finally:
        stop.set()
        for process in neighbours:
            process.join(5)
    count, why = torch_threads("auto")
    print(f"TORCH_THREADS=auto here: {count} ({why})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
