"""R1-Zero on CPU, step 1: a fresh tiny model briefly pre-trained on the bundled arithmetic task.

`pretrain_arith(out_dir)` builds the tiny preset with the byte chat tokenizer's vocabulary
(`dsv3_jax.rl.tasks`), writes tokenizer + config.json to out_dir and runs `pretrain_steps` SFT
steps on `pretrain_texts` (half the replies in the R1 format, half a bare answer), saving a
checkpoint there: a run directory that `dsv3 grpo --init`, `dsv3 generate` and `dsv3 sft` read.
Short on purpose: the model it leaves is often wrong and follows the format only sometimes, so
that GRPO has something to improve (`dsv3 grpo --task arith` without --init calls this first).
"""
from __future__ import annotations

import os

__all__ = ["pretrain_arith", "demo_config"]


def demo_config():
  from dsv3_jax.config import TINY
  from dsv3_jax.rl.tasks import BYTE_VOCAB
  return TINY.replace(vocab_size=BYTE_VOCAB, eos_token_id=256)


def pretrain_arith(out_dir: str, *, steps: int = 150, batch: int = 16, seq: int = 128,
                   lr: float = 3e-3, seed: int = 0, mesh=None, say=print) -> str:
  """Pre-trains (or resumes pre-training) the demo model into out_dir; returns out_dir."""
  import jax.numpy as jnp
  from flax import nnx

  from dsv3_jax.inference.tokenizer import Tokenizer
  from dsv3_jax.model import DeepseekV3
  from dsv3_jax.rl.common import sft_loop
  from dsv3_jax.rl.policy import PolicyTrainer
  from dsv3_jax.rl.sft import SFTData, SFTObjective, pack, render_chat
  from dsv3_jax.rl.tasks import TASKS, pretrain_texts, write_byte_tokenizer
  from dsv3_jax.train.optim import OptimConfig, training_runtime
  from dsv3_jax.train.trainer import write_run_config

  cfg = demo_config()
  write_byte_tokenizer(out_dir)
  write_run_config(out_dir, cfg)
  tok = Tokenizer.from_dir(out_dir)
  packed = pack([render_chat(tok, c) for c in pretrain_texts(TASKS["arith"], 4000, seed=seed)], seq)
  model = DeepseekV3(cfg, training_runtime(jnp.float32), rngs=nnx.Rngs(seed))
  policy = PolicyTrainer(model, OptimConfig(lr=lr, warmup_steps=max(steps // 20, 1),
                                            total_steps=steps),
                         mesh=mesh, out_dir=out_dir)
  if policy.restore() is not None and policy.step_count >= steps:
    say(f"pre-trained model found in {out_dir} (step {policy.step_count})")
    policy.close()
    return out_dir
  say(f"pre-training a fresh tiny model on the arithmetic task for {steps} steps "
      f"({packed.tokens.shape[0]} packed rows of {seq} byte tokens, batch {batch}) -> {out_dir}")
  sft_loop(policy, SFTData(packed, batch, seed), SFTObjective(0.1), steps,
           log_path=os.path.join(out_dir, "metrics.jsonl"), save_every=steps, say=say,
           every=max(steps // 5, 1))
  policy.close()
  return out_dir
