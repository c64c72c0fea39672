"""The GRPO iteration, the SFT step loop, greedy evaluation and the metrics plot.

One GRPO iteration (`grpo_iteration`) at outer step s:
  1. prompts: `task.sample(np.random.default_rng([seed, s]), n_prompts)`;
  2. rollouts: G completions each from the inference engine (seed derived from (seed, s)), with
     the engine's log-probs as the sampling policy's;
  3. rewards (a plain function, `dsv3_jax.rl.rewards`), group advantages;
  4. the frozen reference's log-probs (one forward);
  5. cfg.inner_steps optimizer steps of the GRPO objective on that batch.
Everything is a function of (weights, seed, s), so a run restored at step s continues exactly
as the uninterrupted run (same prompts, samples, metrics).
"""
from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from dsv3_jax.rl.grpo import GRPOConfig
from dsv3_jax.rl.policy import GRPOObjective
from dsv3_jax.rl.rewards import (Example, RewardFn, correctness_reward, format_reward, score)

__all__ = ["grpo_iteration", "evaluate", "write_grpo_plot", "numpy_advantages", "DETERMINISTIC"]

# The metrics that depend only on (weights, seed, step): what a resumed run reproduces exactly.
DETERMINISTIC = ("step", "reward", "accuracy", "format", "response_len", "kl", "loss", "pg",
                 "clip_frac", "grad_norm")


def numpy_advantages(rewards: np.ndarray, group_size: int, eps: float) -> np.ndarray:
  """(r - group mean) / (group population std + eps), rows of a group adjacent."""
  r = np.asarray(rewards, np.float64).reshape(-1, group_size)
  return ((r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + eps)).reshape(-1)


def grpo_iteration(policy, engine, ref, task, cfg: GRPOConfig, *, step: int, n_prompts: int,
                   seed: int, reward_fn: RewardFn) -> dict:
  """One GRPO iteration (module docstring) as outer step `step` (0-based); returns its metrics
  (`DETERMINISTIC` ones plus throughput and a sample completion)."""
  examples = task.sample(np.random.default_rng([seed, step]), n_prompts)
  t0 = time.perf_counter()
  rb = engine.rollout(examples, cfg.group_size, cfg.temperature,
                      seed=int(np.random.default_rng([seed, step, 1]).integers(2**31)))
  t_roll = time.perf_counter() - t0
  rewards = np.array(score(rb.completions, rb.examples, reward_fn))
  correct = np.array(score(rb.completions, rb.examples, correctness_reward))
  fmt = np.array(score(rb.completions, rb.examples, format_reward))
  adv = numpy_advantages(rewards, cfg.group_size, cfg.eps).astype(np.float32)
  ref_logp = policy.logprobs(rb.tokens, cfg.temperature, *ref)
  batch = {"tokens": rb.tokens, "mask": rb.mask, "old_logp": rb.old_logp,
           "ref_logp": ref_logp.astype(np.float32), "adv": adv}
  t1 = time.perf_counter()
  inner = [policy.step(GRPOObjective(cfg), batch) for _ in range(cfg.inner_steps)]
  t_train = time.perf_counter() - t1
  n_tok = int(rb.tokens.size) * cfg.inner_steps
  m = {"step": step + 1, "reward": float(rewards.mean()), "accuracy": float(correct.mean()),
       "format": float(fmt.mean()), "response_len": float(rb.lengths.mean()),
       "kl": inner[0]["kl"], "loss": float(np.mean([x["loss"] for x in inner])),
       "pg": float(np.mean([x["pg"] for x in inner])),
       "clip_frac": float(np.mean([x["clip_frac"] for x in inner])),
       "grad_norm": float(np.mean([x["grad_norm"] for x in inner])),
       "lr": inner[-1]["lr"], "rollout_tok_s": float(rb.lengths.sum()) / max(t_roll, 1e-9),
       "train_tok_s": n_tok / max(t_train, 1e-9), "step_time": time.perf_counter() - t0,
       "sample": f"{examples[0].prompt} -> {rb.completions[0]!r}"}
  if rb.acceptance_rate is not None:
    m["mtp_acceptance"] = rb.acceptance_rate
  return m


def evaluate(engine, examples: Sequence[Example]) -> dict:
  """Greedy accuracy and format rate of the current policy on `examples`."""
  rb = engine.rollout(examples, 1, 0.0, seed=0)
  return {"accuracy": float(np.mean(score(rb.completions, rb.examples, correctness_reward))),
          "format": float(np.mean(score(rb.completions, rb.examples, format_reward))),
          "response_len": float(rb.lengths.mean()), "n": len(examples)}


def write_grpo_plot(history: list[dict], path: str) -> bool:
  """Mean reward / accuracy / format rate, response length and KL per step to a PNG; False
  (nothing written) when matplotlib cannot be imported."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  s = [h["step"] for h in history]
  fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.8))
  for k in ("reward", "accuracy", "format"):
    a.plot(s, [h[k] for h in history], label=k)
  a.set_xlabel("GRPO step"), a.set_ylim(-0.02, 1.6), a.legend(), a.set_title("sampled rollouts")
  b.plot(s, [h["response_len"] for h in history])
  b.set_xlabel("GRPO step"), b.set_title("mean response length (tokens)")
  c.plot(s, [h["kl"] for h in history])
  c.set_xlabel("GRPO step"), c.set_title("KL to reference (k3)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True
