"""GRPO's reward functions: the built-in format and math-correctness rewards, and loading a user's own
(REWARD_MODULE=/path/to/rewards.py). This file is also the example of such a module: it defines

    REWARDS = [format_reward, correctness_reward]

each a function `(completions: list[str], answer: list[str], **kwargs) -> list[float | None]`: one score per
completion (None: no score for it). kwargs carry `markers` (Markers: the tags the system prompt asks for),
`question` (the problems), `prompts` (the rendered prompts), `completion_ids` and TRL's own (trainer_state...)."""
from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RewardFunction = Callable[..., list[Any]]


@dataclass(frozen=True)
class Markers:
    """The tags a completion is asked to use: reasoning (the family's, model.yaml `reasoning:`, else
    <reasoning>...</reasoning> as upstream's Phi-4 tutorial) then the final answer in <answer>...</answer>."""

    reasoning_start: str = "<reasoning>"
    reasoning_end: str = "</reasoning>"
    answer_start: str = "<answer>"
    answer_end: str = "</answer>"

    def instruction(self) -> str:
        return (f"Think about the problem step by step between {self.reasoning_start} and {self.reasoning_end}, "
                f"then write only the final number between {self.answer_start} and {self.answer_end}.")


def answer_text(completion: str, markers: Markers) -> str | None:
    """The text of the last answer tag in `completion` (None: no closed answer tag)."""
    found = re.findall(re.escape(markers.answer_start) + r"(.*?)" + re.escape(markers.answer_end), completion, re.S)
    return found[-1].strip() if found else None


def number(text: str | None) -> float | None:
    """The number a final answer states (`1,234`, `$12.50`, `12 apples`: the first number in it), or None."""
    if text is None:
        return None
    match = re.search(r"-?\d[\d,]*(?:\.\d+)?", text.replace("$", ""))
    if match is None:
        return None
    try:
        return float(match.group(0).replace(",", ""))
    except ValueError:
        return None


def format_reward(completions: list[str], markers: Markers = Markers(), **kwargs: Any) -> list[float]:
    """Up to 1.0 for the asked shape: 0.25 each for the reasoning end marker, an opening and a closing answer tag,
    and the answer coming after the reasoning (a template that pre-fills the reasoning start, as DeepSeek-R1's,
    leaves only its end in the completion)."""
    scores = []
    for text in completions:
        end = text.find(markers.reasoning_end)
        start = text.find(markers.answer_start)
        score = 0.25 * (end >= 0) + 0.25 * (start >= 0) + 0.25 * (markers.answer_end in text)
        score += 0.25 * (0 <= end < start)
        scores.append(score)
    return scores


def correctness_reward(completions: list[str], answer: list[str], markers: Markers = Markers(),
                       **kwargs: Any) -> list[float]:
    """2.0 when the number in the last answer tag equals the reference answer's, else 0."""
    scores = []
    for text, reference in zip(completions, answer):
        got, want = number(answer_text(text, markers)), number(reference)
        scores.append(2.0 if got is not None and want is not None and math.isclose(got, want) else 0.0)
    return scores


REWARDS: list[RewardFunction] = [format_reward, correctness_reward]


class RewardError(ValueError):
    """A reward module that can't be used; the message names REWARD_MODULE and what is wrong."""


def load_rewards(path: Path | None) -> list[RewardFunction]:
    """REWARDS of the module at `path` (None: the built-in ones), each checked on a sample call."""
    if path is None:
        return list(REWARDS)
    where = f"REWARD_MODULE={path}"
    if not Path(path).is_file():
        raise RewardError(f"{where}: no such file")
    spec = importlib.util.spec_from_file_location(f"selfllm_user_rewards_{Path(path).stem}", path)
    if spec is None or spec.loader is None:
        raise RewardError(f"{where}: not a Python module (name it .py)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any error of the user's code is one line
        line = getattr(exc, "lineno", None) or _user_line(exc, Path(path))  # a SyntaxError has its own
        raise RewardError(f"{where}: does not import ({type(exc).__name__}: {exc}"
                          + (f", line {line}" if line else "") + ")") from None
    funcs = getattr(module, "REWARDS", None)
    if not isinstance(funcs, (list, tuple)) or not funcs or not all(callable(f) for f in funcs):
        raise RewardError(f"{where}: must define REWARDS, a non-empty list of functions "
                          "(completions, answer, **kwargs) -> list[float]")
    for func in funcs:
        check_reward(func, where)
    return list(funcs)


def _user_line(exc: BaseException, path: Path) -> int | None:
    tb, line = exc.__traceback__, None
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename) == path:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


SAMPLE = {"completions": ["<reasoning>2 + 2 = 4</reasoning><answer>4</answer>", "no idea"],
          "answer": ["2 + 2 = 4\n#### 4", "2 + 2 = 4\n#### 4"], "question": ["What is 2 + 2?"] * 2,
          "prompts": ["What is 2 + 2?"] * 2, "completion_ids": [[0], [0]]}


def check_reward(func: RewardFunction, where: str) -> None:
    """A sample call of two completions must give two numbers (or None)."""
    name = getattr(func, "__name__", repr(func))
    try:
        scores = func(**SAMPLE, markers=Markers())
    except Exception as exc:  # noqa: BLE001
        raise RewardError(f"{where}: {name}(completions, answer, **kwargs) failed on a sample call "
                          f"({type(exc).__name__}: {exc})") from None
    if (not isinstance(scores, (list, tuple)) or len(scores) != 2
            or not all(s is None or (isinstance(s, (int, float)) and not isinstance(s, bool)) for s in scores)):
        raise RewardError(f"{where}: {name} must return one number (or None) per completion, a list of 2 for 2 "
                          f"completions; it returned {scores!r:.120}")


def for_trainer(funcs: list[RewardFunction], markers: Markers) -> list[RewardFunction]:
    """The functions as TRL's GRPOTrainer calls them (completions as text, `markers` added), under their names
    (its logs: rewards/<name>/mean)."""
    def wrap(func: RewardFunction) -> RewardFunction:
        def reward(completions: list[Any], **kwargs: Any) -> list[Any]:
            texts = [c if isinstance(c, str) else (c[-1].get("content") or "") for c in completions]
            return list(func(completions=texts, markers=markers, **kwargs))

        reward.__name__ = getattr(func, "__name__", "reward")
        return reward

    return [wrap(f) for f in funcs]

