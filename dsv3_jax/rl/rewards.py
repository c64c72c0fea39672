"""Rule-based, verifiable rewards (DeepSeek-R1): plain Python functions of (completion text,
example) -> float, which a user can replace (`dsv3 grpo --reward module:function`).

R1 format: the completion is `<think>REASONING</think>ANSWER`: it starts with `<think>` (leading
whitespace allowed), has exactly one `<think>` and one `</think>`, in that order, and a non-empty
ANSWER after `</think>`. As in DeepSeek-R1 ("the final answer in a specified format, enabling
reliable rule-based verification"), correctness reads the answer only from that place: a
completion that is not in the format has no verifiable answer and scores 0. Exact verification:
the ANSWER (stripped) and the reference both parse as decimal numbers (an optional sign, digits,
an optional fraction part; nothing else, no exponent) and are equal as exact rationals ("7",
"+7" and "7.0" equal "7"); anything that does not parse scores 0.
"""
from __future__ import annotations

import dataclasses
import importlib
import re
from fractions import Fraction
from typing import Callable, Sequence

from dsv3_jax.errors import UserError

__all__ = ["Example", "RewardFn", "parse_number", "extract_answer", "split_think", "format_reward",
           "correctness_reward", "combined_reward", "load_reward", "DEFAULT_WEIGHTS"]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")


@dataclasses.dataclass(frozen=True)
class Example:
  """One task item: `prompt` (the user's question, before any chat template) and `answer` (the
  reference answer a verifier checks)."""

  prompt: str
  answer: str


RewardFn = Callable[[str, Example], float]


def parse_number(text: str) -> Fraction | None:
  """'12', '-3', '+7', '2.50', '.5' -> their exact value; None for anything else ('', '1.2.3',
  '12abc', '1e3', '--3', ' 1 2')."""
  text = text.strip()
  if not _NUMBER.fullmatch(text):
    return None
  return Fraction(text)


def split_think(completion: str) -> tuple[str, str] | None:
  """(reasoning, answer) of a well-formed `<think>...</think>ANSWER` completion, else None."""
  s = completion.lstrip()
  if not s.startswith(THINK_OPEN) or s.count(THINK_OPEN) != 1 or s.count(THINK_CLOSE) != 1:
    return None
  thought, _, answer = s[len(THINK_OPEN):].partition(THINK_CLOSE)
  if not answer.strip():
    return None
  return thought, answer.strip()


def extract_answer(completion: str) -> str:
  """The text after the last `</think>` (all of it without one), stripped."""
  return completion.rpartition(THINK_CLOSE)[2].strip()


def format_reward(completion: str, example: Example) -> float:
  """1.0 for `<think>...</think>ANSWER` (see the module docstring), else 0.0."""
  return 1.0 if split_think(completion) is not None else 0.0


def correctness_reward(completion: str, example: Example) -> float:
  """1.0 when the completion is in the R1 format and its ANSWER equals the reference exactly as
  a number, else 0.0."""
  parts = split_think(completion)
  if parts is None:
    return 0.0
  got, want = parse_number(parts[1]), parse_number(example.answer)
  return 1.0 if got is not None and want is not None and got == want else 0.0


DEFAULT_WEIGHTS = {"correct": 1.0, "format": 0.5}


def combined_reward(completion: str, example: Example,
                    weights: dict[str, float] | None = None) -> float:
  """weights["correct"] * correctness + weights["format"] * format (DEFAULT_WEIGHTS)."""
  w = DEFAULT_WEIGHTS if weights is None else weights
  return (w.get("correct", 0.0) * correctness_reward(completion, example)
          + w.get("format", 0.0) * format_reward(completion, example))


def load_reward(spec: str) -> RewardFn:
  """'package.module:function' -> that function (a user's reward); UserError naming the spec."""
  mod, _, name = spec.partition(":")
  if not mod or not name:
    raise UserError(f"--reward {spec!r}: expected MODULE:FUNCTION, e.g. mypkg.rewards:score")
  try:
    fn = getattr(importlib.import_module(mod), name)
  except (ImportError, AttributeError) as e:
    raise UserError(f"--reward {spec!r}: {e}") from None
  if not callable(fn):
    raise UserError(f"--reward {spec!r} is not callable")
  return fn


def score(completions: Sequence[str], examples: Sequence[Example], fn: RewardFn) -> list[float]:
  """fn over aligned completions/examples, each result checked to be a finite float."""
  out = []
  for c, e in zip(completions, examples, strict=True):
    r = float(fn(c, e))
    if r != r or r in (float("inf"), float("-inf")):
      raise ValueError(f"reward function returned {r} for completion {c[:60]!r}")
    out.append(r)
  return out
