"""Rollouts with the project's inference engine (`dsv3_jax.inference.Generator`).

`RolloutEngine` wraps one Generator built on the policy: before each rollout it points the
Generator at the policy's current weights (the same device buffers, no copy) and re-derives
the absorbed MLA weights, so policy and rollout share weights on the mesh. Sampling is batched
(all prompts x G completions in one call), at the GRPO temperature, plain or MTP-speculative;
the engine reports each sampled token's log-prob (`GenerationOutput.logprobs`), which becomes
the importance ratio's denominator.

Batch layout for training (`RolloutBatch`): row i = prompt ids then completion ids (the EOS
included when generated), right-padded to a fixed T = bucket(longest prompt) + max_new_tokens
(one compiled step for every rollout batch of a run); mask marks the completion tokens; old_logp
holds the engine's log-prob at each completion token's position.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from dsv3_jax.inference.decode import absorb_weights
from dsv3_jax.inference.generate import Generator
from dsv3_jax.inference.sampling import SamplingParams
from dsv3_jax.rl.rewards import Example
from dsv3_jax.sharding import use_rules

__all__ = ["RolloutBatch", "RolloutEngine", "bucket"]


def bucket(n: int, minimum: int = 16) -> int:
  """The Generator's prompt bucket: the next power of two >= max(n, minimum)."""
  return max(minimum, 1 << (n - 1).bit_length())


@dataclasses.dataclass
class RolloutBatch:
  """N = len(examples) * G rollouts (a group's rows adjacent).

  tokens int32 [N, T]; mask float32 [N, T] (1 on completion tokens); old_logp float32 [N, T];
  completions: decoded completion texts [N]; examples: the example of each row [N];
  lengths: completion tokens per row [N]; acceptance_rate: MTP acceptance (None: plain);
  gen_tokens_per_s: generated tokens per second of prefill + decode (compile excluded).
  """

  tokens: np.ndarray
  mask: np.ndarray
  old_logp: np.ndarray
  completions: list[str]
  examples: list[Example]
  lengths: np.ndarray
  acceptance_rate: float | None
  gen_tokens_per_s: float


class RolloutEngine:
  """Samples G completions per prompt from the policy of a `PolicyTrainer` (see module doc).

  tokenizer: a `dsv3_jax.inference.Tokenizer` with a chat template (prompts are user turns);
  max_new_tokens: completion budget; speculative: MTP self-speculative decoding.
  """

  def __init__(self, policy, tokenizer, *, max_new_tokens: int, speculative: bool = False,
               compiler_options: dict | None = None):
    self.policy, self.tok = policy, tokenizer
    self.max_new, self.speculative = max_new_tokens, speculative
    self.gen = Generator(policy.model, mesh=policy.mesh, rules=policy.rules,
                         compiler_options=compiler_options)
    graphdef = self.gen.graphdef
    with jax.set_mesh(policy.mesh), use_rules(policy.rules):
      self._absorb = jax.jit(lambda st: absorb_weights(nnx.merge(graphdef, st)),
                             in_shardings=(self.gen.state_shardings,),
                             out_shardings=self.gen.absorbed_shardings)

  def refresh(self) -> None:
    """Points the Generator at the policy's current weights (no copy where shardings agree)."""
    _, state = nnx.split(self.policy.model)
    self.gen.state = jax.device_put(state, self.gen.state_shardings)
    with jax.set_mesh(self.policy.mesh), use_rules(self.policy.rules):
      self.gen.absorbed = self._absorb(self.gen.state)

  def prompt_ids(self, example: Example) -> list[int]:
    return self.tok.encode_chat(example.prompt)

  def rollout(self, examples: Sequence[Example], group_size: int, temperature: float,
              seed: int) -> RolloutBatch:
    """group_size completions of each example, sampled at `temperature` with `seed`."""
    self.refresh()
    rows = [ex for ex in examples for _ in range(group_size)]
    prompts = [self.prompt_ids(ex) for ex in rows]
    out = self.gen.run(prompts, max_new_tokens=self.max_new,
                       sampling=SamplingParams(temperature=temperature), seed=seed,
                       eos_token_id=self.tok.eos_token_id, speculative=self.speculative)
    N, T = len(rows), bucket(max(len(p) for p in prompts)) + self.max_new
    tokens = np.zeros((N, T), np.int32)
    mask = np.zeros((N, T), np.float32)
    old = np.zeros((N, T), np.float32)
    for i, (p, c, lp) in enumerate(zip(prompts, out.tokens, out.logprobs)):
      tokens[i, :len(p)] = p
      tokens[i, len(p):len(p) + len(c)] = c
      mask[i, len(p):len(p) + len(c)] = 1.0
      old[i, len(p):len(p) + len(c)] = lp
    texts = [self.tok.decode(c) for c in out.tokens]
    return RolloutBatch(tokens, mask, old, texts, rows,
                        np.array([len(c) for c in out.tokens], np.int32), out.acceptance_rate,
                        out.tokens_per_second)
