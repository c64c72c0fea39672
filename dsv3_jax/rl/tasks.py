"""Bundled tasks and the byte-level chat tokenizer of the R1-Zero demo (no downloads).

Byte tokenizer: ids 0..255 are the UTF-8 bytes, then the special tokens <|eos|> (256), <|user|>
(257) and <|assistant|> (258); `write_byte_tokenizer(dir)` writes it as tokenizer.json +
tokenizer_config.json (with a chat template), so `dsv3_jax.inference.Tokenizer`, `dsv3 generate
--chat`, `dsv3 sft` and `dsv3 grpo` treat a demo checkpoint like any other. Chat rendering:
  <|user|>{question}<|assistant|>{reply}<|eos|>

Arithmetic task (`ArithTask`): questions "a+b" / "a-b" with operands in [0, max_operand), the
reference answer the exact result. The R1 completion format is `<think>a+b</think>RESULT`.
`pretrain_texts` renders a corpus for briefly pre-training a fresh model: chat-rendered
examples, a fraction `think_fraction` in the R1 format and the rest as a bare answer, so the
starting model follows the format only part of the time and is often wrong.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from dsv3_jax.errors import UserError
from dsv3_jax.rl.rewards import Example

__all__ = ["BYTE_VOCAB", "write_byte_tokenizer", "ArithTask", "TASKS", "get_task", "pretrain_texts"]

SPECIALS = ("<|eos|>", "<|user|>", "<|assistant|>")
BYTE_VOCAB = 256 + len(SPECIALS)
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}"
                 "{{ eos_token }}{% else %}<|user|>{{ m['content'] }}<|assistant|>{% endif %}"
                 "{% endfor %}")


def _bytes_to_unicode() -> dict[int, str]:
  """The byte -> printable character table of byte-level BPE (GPT-2's)."""
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
  table, n = {b: chr(b) for b in keep}, 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + n)
      n += 1
  return table


def write_byte_tokenizer(directory: str) -> None:
  """Writes tokenizer.json (byte b -> id b, then SPECIALS) and tokenizer_config.json (eos
  <|eos|>, the chat template) to `directory`."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  table = _bytes_to_unicode()
  tok = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens(list(SPECIALS))
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": "<|eos|>", "add_bos_token": False, "chat_template": CHAT_TEMPLATE}, f,
              indent=1)


@dataclasses.dataclass(frozen=True)
class ArithTask:
  """Addition/subtraction questions with operands in [0, max_operand)."""

  max_operand: int = 10
  ops: str = "+-"

  def sample(self, rng: np.random.Generator, n: int) -> list[Example]:
    """n examples drawn from rng."""
    a = rng.integers(0, self.max_operand, n)
    b = rng.integers(0, self.max_operand, n)
    op = rng.integers(0, len(self.ops), n)
    out = []
    for x, y, o in zip(a.tolist(), b.tolist(), op.tolist()):
      sym = self.ops[o]
      out.append(Example(f"{x}{sym}{y}", str(x + y if sym == "+" else x - y)))
    return out

  @staticmethod
  def r1_completion(ex: Example) -> str:
    return f"<think>{ex.prompt}</think>{ex.answer}"


TASKS = {"arith": ArithTask()}


def get_task(name: str):
  if name not in TASKS:
    raise UserError(f"--task {name!r} is not one of {', '.join(sorted(TASKS))}")
  return TASKS[name]


def pretrain_texts(task: ArithTask, n: int, *, think_fraction: float = 0.5,
                   seed: int = 0) -> list[list[dict]]:
  """n chat conversations [{"role": "user", ...}, {"role": "assistant", ...}] for pre-training
  (see the module docstring)."""
  rng = np.random.default_rng(seed)
  convs = []
  for ex in task.sample(rng, n):
    reply = task.r1_completion(ex) if rng.random() < think_fraction else ex.answer
    convs.append([{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": reply}])
  return convs
