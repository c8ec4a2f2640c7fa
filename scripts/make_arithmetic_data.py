"""Write GRPO's offline default data: arithmetic word problems with worked answers in GSM8K's format
(`question`, `answer` ending `#### <number>`), deterministic (seeded), so that the shipped file and its sha256
(finetune/grpo_data.py) are reproducible:

    python scripts/make_arithmetic_data.py [OUT]   # default: runtime/selfllm_runtime/finetune/data/arithmetic.jsonl
"""
from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "runtime" / "selfllm_runtime" / "finetune" / "data" / "arithmetic.jsonl"
SEED = 20240601
COUNT = 400
NAMES = ["Tom", "Lily", "Amir", "Mei", "Carlos", "Sara", "Ken", "Olga", "Ravi", "Nina"]
ITEMS = ["apples", "pencils", "stickers", "books", "marbles", "cookies", "stamps", "shells"]
Problem = tuple[str, str, int]


def buy_and_give(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    have, bought = rng.randint(5, 60), rng.randint(2, 40)
    given = rng.randint(1, have + bought - 1)
    total = have + bought
    left = total - given
    return (f"{name} has {have} {item}. {name} buys {bought} more and then gives {given} to a friend. "
            f"How many {item} does {name} have now?",
            f"After buying, {name} has {have} + {bought} = {total} {item}.\n"
            f"After giving some away, {name} has {total} - {given} = {left} {item}.", left)


def boxes(rng: random.Random) -> Problem:
    item = rng.choice(ITEMS)
    count, each, extra = rng.randint(2, 12), rng.randint(3, 25), rng.randint(0, 9)
    total = count * each + extra
    return (f"A shop packs {item} in boxes of {each}. It has {count} full boxes and {extra} loose {item}. "
            f"How many {item} does the shop have in all?",
            f"The full boxes hold {count} * {each} = {count * each} {item}.\n"
            f"With the loose ones: {count * each} + {extra} = {total}.", total)


def share(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    friends, each = rng.randint(2, 9), rng.randint(2, 15)
    kept = rng.randint(1, 20)
    total = friends * each + kept
    return (f"{name} had some {item}. After giving {each} {item} to each of {friends} friends, {name} has {kept} "
            f"{item} left. How many {item} did {name} have at first?",
            f"{name} gave away {friends} * {each} = {friends * each} {item}.\n"
            f"At first {name} had {friends * each} + {kept} = {total} {item}.", total)


def price(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    count, cost, paid_extra = rng.randint(2, 15), rng.randint(2, 20), rng.randint(1, 50)
    spent = count * cost
    paid = spent + paid_extra
    return (f"{name} buys {count} {item} at {cost} dollars each and pays with {paid} dollars. "
            f"How much change does {name} get, in dollars?",
            f"The {item} cost {count} * {cost} = {spent} dollars.\n"
            f"The change is {paid} - {spent} = {paid_extra} dollars.", paid_extra)


def weeks(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    per_day, days, weeks_ = rng.randint(2, 30), rng.randint(2, 7), rng.randint(2, 8)
    week_total = per_day * days
    total = week_total * weeks_
    return (f"{name} reads {per_day} pages a day, {days} days a week. How many pages does {name} read in "
            f"{weeks_} weeks?",
            f"In one week {name} reads {per_day} * {days} = {week_total} pages.\n"
            f"In {weeks_} weeks: {week_total} * {weeks_} = {total} pages.", total)


KINDS: list[Callable[[random.Random], Problem]] = [buy_and_give, boxes, share, price, weeks]


def records(count: int = COUNT, seed: int = SEED) -> list[dict[str, str]]:
    rng = random.Random(seed)
    found = []
    for index in range(count):
        question, steps, answer = KINDS[index % len(KINDS)](rng)
        found.append({"question": question, "answer": f"{steps}\n#### {answer}"})
    return found


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records()), encoding="utf-8")
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
