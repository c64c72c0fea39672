"""Supervised fine-tuning on chat data: render with the checkpoint's chat template, pack with
segment ids, loss on assistant tokens only.

Data: JSONL, one conversation per line: {"messages": [{"role": ..., "content": ...}, ...]}, or
{"prompt": ..., "completion": ...} (what `dsv3 generate --out` writes: one user turn and the
assistant's reply; distillation).

Masking (`render_chat`): the conversation is rendered incrementally with the template, so each
piece of text is known to come from an assistant reply or not. For assistant message i the text
between render(messages[:i], add_generation_prompt=True) and render(messages[:i+1]) is the reply
as the template writes it (its end-of-turn token included): those tokens get loss mask 1; all
other text (system/user turns, the template's role markers and BOS) gets 0. Each piece is
tokenised on its own, so no token straddles a mask boundary. A template whose renders are not
prefixes of each other (e.g. one that rewrites earlier turns) is refused with a TemplateError.

Packing (`pack`): conversations go into rows of seq_len in order, a row taking conversations
while they fit (segment ids 1, 2, ... per row, 0 for padding; positions restart per
conversation); a conversation longer than seq_len is cut to seq_len. The objective attends within
segments and counts a target only where the target token's mask is 1 and it lies in the same
segment (`dsv3_jax.train.loss.shifted_targets`); MTP depths use the same rule.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from dsv3_jax.errors import UserError
from dsv3_jax.train.loss import cross_entropy, shifted_targets

__all__ = ["TemplateError", "read_chat_jsonl", "render_chat", "pack", "Packed", "SFTObjective",
           "SFTData"]


class TemplateError(ValueError, UserError):
  """The chat template cannot be split into turns (see `render_chat`)."""


def read_chat_jsonl(path: str) -> list[list[dict]]:
  """The conversations of a chat JSONL file (module docstring); UserError naming file:line."""
  convs = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f"--data {path}:{i}: malformed JSON ({e.msg})") from None
      if isinstance(row, dict) and "messages" in row:
        msgs = row["messages"]
      elif isinstance(row, dict) and "prompt" in row and "completion" in row:
        msgs = [{"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["completion"]}]
      else:
        raise UserError(f"--data {path}:{i}: expected {{\"messages\": [...]}} or "
                        f"{{\"prompt\": ..., \"completion\": ...}}")
      if (not isinstance(msgs, list) or not msgs
          or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                     and isinstance(m.get("content"), str) for m in msgs)):
        raise UserError(f"--data {path}:{i}: messages must be a non-empty list of "
                        f"{{\"role\": str, \"content\": str}}")
      if not any(m["role"] == "assistant" for m in msgs):
        raise UserError(f"--data {path}:{i}: no assistant message (nothing to train on)")
      convs.append(msgs)
  if not convs:
    raise UserError(f"--data {path}: no conversations (the file is empty)")
  return convs


def render_chat(tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
  """(token ids, loss mask 0/1 per token) of one conversation (module docstring)."""
  pieces, prev = [], ""
  for i, m in enumerate(messages):
    if m["role"] == "assistant":
      head = tokenizer.apply_chat_template(list(messages[:i]), add_generation_prompt=True)
      full = tokenizer.apply_chat_template(list(messages[:i + 1]), add_generation_prompt=False)
      parts = [(prev, head, 0), (head, full, 1)]
    else:
      full = tokenizer.apply_chat_template(list(messages[:i + 1]), add_generation_prompt=False)
      parts = [(prev, full, 0)]
    for a, b, flag in parts:
      if not b.startswith(a):
        raise TemplateError(f"{tokenizer.source}: the chat template's render of the first {i + 1} "
                            f"message(s) does not extend the render of the ones before; cannot "
                            f"find the assistant tokens")
      pieces.append((b[len(a):], flag))
    prev = full
  ids, mask = [], []
  for text, flag in pieces:
    if text:
      t = tokenizer.encode(text, add_bos=False)
      ids += t
      mask += [flag] * len(t)
  return ids, mask


@dataclasses.dataclass
class Packed:
  """Rows [R, T] int32: tokens, segment_ids (0 = padding), positions, loss_mask; truncated: how
  many conversations were cut to seq_len."""

  tokens: np.ndarray
  segment_ids: np.ndarray
  positions: np.ndarray
  loss_mask: np.ndarray
  truncated: int


def pack(examples: Sequence[tuple[list[int], list[int]]], seq_len: int) -> Packed:
  """Packs (ids, mask) pairs into rows of seq_len (module docstring)."""
  rows: list[list[tuple[list[int], list[int]]]] = [[]]
  used, cut = 0, 0
  for ids, mask in examples:
    if len(ids) > seq_len:
      ids, mask, cut = ids[:seq_len], mask[:seq_len], cut + 1
    if used + len(ids) > seq_len:
      rows.append([])
      used = 0
    rows[-1].append((ids, mask))
    used += len(ids)
  R = len(rows)
  out = {k: np.zeros((R, seq_len), np.int32) for k in ("tokens", "segment_ids", "positions",
                                                        "loss_mask")}
  for r, row in enumerate(rows):
    at = 0
    for s, (ids, mask) in enumerate(row, 1):
      n = len(ids)
      out["tokens"][r, at:at + n] = ids
      out["segment_ids"][r, at:at + n] = s
      out["positions"][r, at:at + n] = np.arange(n)
      out["loss_mask"][r, at:at + n] = mask
      at += n
  return Packed(**out, truncated=cut)


@dataclasses.dataclass(frozen=True)
class SFTObjective:
  """Masked next-token CE (+ mtp_lambda * mean MTP CE) on a packed batch {"tokens",
  "segment_ids", "positions", "loss_mask"} int [B, T]; attention stays within segments."""

  mtp_lambda: float = 0.1

  def __call__(self, model, batch):
    tokens, seg = batch["tokens"], batch["segment_ids"]
    out = model.forward(tokens, positions=batch["positions"], segment_ids=seg,
                        mtp=self.mtp_lambda > 0)

    def ce(logits, shift):
      targets, valid = shifted_targets(tokens, seg, shift)
      want = jnp.pad(batch["loss_mask"][:, shift:], ((0, 0), (0, shift))) > 0
      nll, n = cross_entropy(logits, targets, valid & want)
      return nll / jnp.maximum(n, 1.0), n

    main, n = ce(out.logits, 1)
    mtp = jnp.zeros((), jnp.float32)
    if self.mtp_lambda > 0 and out.mtp_logits is not None:
      depth = out.mtp_logits.shape[0]
      mtp = sum(ce(out.mtp_logits[k], k + 2)[0] for k in range(depth)) / depth
    return main + self.mtp_lambda * mtp, {"ce": main, "mtp_ce": mtp, "tokens": n}


class SFTData:
  """Deterministic batches of packed rows: batch s holds rows perm_e[g % R] for g in
  [s*B, (s+1)*B), e = g // R, perm_e a permutation drawn from (seed, e): every row once per
  epoch, any number of rows R >= 1, resumable from the step alone."""

  def __init__(self, packed: Packed, batch_size: int, seed: int = 0):
    self.packed, self.batch_size, self.seed = packed, batch_size, seed
    self.rows = packed.tokens.shape[0]

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    g = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
    idx = np.array([np.random.default_rng([self.seed, int(e)]).permutation(self.rows)[i]
                    for e, i in zip(g // self.rows, g % self.rows)])
    p = self.packed
    return {"tokens": p.tokens[idx], "segment_ids": p.segment_ids[idx],
            "positions": p.positions[idx], "loss_mask": p.loss_mask[idx]}
