"""Pieces shared by `dsv3 sft` and `dsv3 grpo`: the run record, the tokenizer of a checkpoint,
metrics logging, the SFT step loop."""
from __future__ import annotations

import json
import os
import time

from dsv3_jax.errors import UserError

__all__ = ["load_tokenizer", "check_record", "sft_loop", "append_metrics"]


def load_tokenizer(init: str, flag: str = "--init"):
  """The Tokenizer of a checkpoint (its config directory for a run/step); UserError when it has
  no tokenizer.json or no chat template."""
  from dsv3_jax.inference.tokenizer import Tokenizer
  from dsv3_jax.param_tree import locate
  located = locate(init)
  d = located.config_dir if located is not None else init
  if not os.path.isfile(os.path.join(d, "tokenizer.json")):
    raise UserError(f"{flag} {init}: no tokenizer.json in {d} (chat data and prompts are "
                    f"rendered with the checkpoint's tokenizer and chat template)")
  tok = Tokenizer.from_dir(d)
  if not tok.chat_template:
    raise UserError(f"{flag} {init}: {d}/tokenizer_config.json has no chat_template")
  if tok.eos_token_id is None:
    raise UserError(f"{flag} {init}: {d}/tokenizer_config.json names no eos_token")
  return tok


def check_record(out: str, record: dict, what: str) -> bool:
  """Writes out/run.json on a fresh run; on resume UserError naming the first setting that
  differs from the run's. Returns True when resuming."""
  path = os.path.join(out, "run.json")
  if os.path.isfile(path):
    with open(path) as f:
      old = json.load(f)
    for k in sorted(set(old) | set(record)):
      if old.get(k) != record.get(k):
        raise UserError(f"{what}: --{k.replace('_', '-')} {record.get(k)!r} differs from the run "
                        f"in {out} ({old.get(k)!r}); use another --out or the run's settings")
    return True
  os.makedirs(out, exist_ok=True)
  with open(path, "w") as f:
    json.dump(record, f, indent=1)
  return False


def append_metrics(log, row: dict) -> None:
  log.write(json.dumps(row) + "\n")
  log.flush()  # a killed run keeps every step it logged


def sft_loop(policy, data, objective, steps: int, *, log_path: str | None, save_every: int,
             say=print, every: int = 10) -> list[dict]:
  """Optimizer steps policy.step_count..steps-1 on data.batch_at(step); logs each step to
  log_path (metrics.jsonl, rows after the restored step dropped first), saves every save_every
  steps and at the end (when the policy has a checkpointer)."""
  from dsv3_jax.train.cli import trim_metrics
  hist = []
  if log_path:
    trim_metrics(log_path, policy.step_count)
  log = open(log_path, "a") if log_path else None
  try:
    while policy.step_count < steps:
      t0 = time.perf_counter()
      m = policy.step(objective, data.batch_at(policy.step_count))
      m.update(step=policy.step_count, step_time=time.perf_counter() - t0)
      hist.append(m)
      if log:
        append_metrics(log, m)
      if m["step"] == 1 or m["step"] % every == 0 or m["step"] == steps:
        say(f"  sft step {m['step']:4d}  loss {m['loss']:.3f}  (CE {m['ce']:.3f}, MTP CE "
            f"{m['mtp_ce']:.3f})  {m['step_time']:.2f} s")
      if policy.checkpointer is not None and (m["step"] % save_every == 0 or m["step"] == steps):
        policy.save({}, force=True)
  finally:
    if log:
      log.close()
  return hist
