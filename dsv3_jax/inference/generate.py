"""Batched generation: prefill, then jitted fixed-shape decode steps (plain or MTP-speculative).

Shapes are fixed per call: the prompt batch is right padded to a power-of-two bucket (>= 16) and
the cache capacity is that bucket + max_new_tokens + 1, rounded up to a multiple of 64 (whole
kernel blocks), so one compiled prefill and one compiled step serve every step and every prompt
length in the bucket. The attention backend is the model's RuntimeConfig's; speculative
verification passes all its tokens to one `mla_decode` call, which reads the cache once.
Without a streaming callback the whole decode loop runs on device (`lax.while_loop`, one call);
with one, each step is one call of the same compiled step function.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.inference.cache import init_cache
from dsv3_jax.inference.decode import absorb_weights, mtp_prefill, prefill
from dsv3_jax.inference.sampling import SamplingParams, sample
from dsv3_jax.inference.speculative import draft_from, plain_step, speculative_step
from dsv3_jax.inference.state import GenState

__all__ = ["Generator", "GenerationOutput", "generate"]


@dataclasses.dataclass
class GenerationOutput:
  """tokens: generated ids per prompt (the EOS token included when one ended it); text: their
  decoded text (None without a tokenizer); acceptance_rate: accepted / drafted MTP tokens
  (None without speculative decoding); timings exclude compilation."""

  tokens: list[list[int]]
  text: list[str] | None
  acceptance_rate: float | None
  prefill_seconds: float
  decode_seconds: float
  compile_seconds: float
  steps: int

  @property
  def num_generated(self) -> int:
    return sum(len(t) for t in self.tokens)

  @property
  def tokens_per_second(self) -> float:
    """Generated tokens per second of prefill + decode."""
    return self.num_generated / max(self.prefill_seconds + self.decode_seconds, 1e-9)


def _bucket(n: int, minimum: int = 16) -> int:
  return max(minimum, 1 << (n - 1).bit_length())


def _prefill_fn(graphdef, state, absorbed, tokens, lengths, eos, key, *, capacity, params,
                max_new, speculative, cache_dtype):
  model = nnx.merge(graphdef, state)
  B = tokens.shape[0]
  cache = init_cache(model.config, B, capacity, cache_dtype, mtp_layers=1 if speculative else 0)
  logits, hidden, cache = prefill(model, cache, tokens, lengths)
  key, k_first, k_draft = jax.random.split(key, 3)
  first = sample(k_first, logits, params)
  out = jnp.zeros((B, max_new), jnp.int32).at[:, 0].set(first)
  finished = jnp.any(first[:, None] == eos, -1) | (max_new <= 1)
  draft = jnp.zeros((B,), jnp.int32)
  draft_probs = jnp.zeros((B, 0), jnp.float32)
  if speculative:
    mtp_logits, cache = mtp_prefill(model, cache, tokens, lengths, hidden, first)
    draft, draft_probs = draft_from(k_draft, mtp_logits, params)
  zero = jnp.zeros((), jnp.int32)
  return GenState(cache, first, out, jnp.ones((B,), jnp.int32), finished, eos, key, zero, draft,
                  draft_probs, zero, zero)


def _step_fn(graphdef, state, absorbed, gs, *, params, speculative):
  model = nnx.merge(graphdef, state)
  step = speculative_step if speculative else plain_step
  return step(model, absorbed, gs, params)


def _loop_fn(graphdef, state, absorbed, gs, *, params, speculative):
  max_steps = gs.out.shape[1]

  def cond(g):
    return (~jnp.all(g.finished)) & (g.steps < max_steps)

  def body(g):
    return _step_fn(graphdef, state, absorbed, g, params=params, speculative=speculative)

  return jax.lax.while_loop(cond, body, gs)


# Compiled functions, shared by Generators of models with the same structure (graphdef).
_COMPILED: dict = {}


class Generator:
  """Holds a model split for jit, its absorbed MLA weights, and compiled prefill/step functions.

  model: a DeepseekV3 (speculative decoding needs num_nextn_predict_layers >= 1).
  cache_dtype: latent cache dtype (default: the model's compute dtype).
  compiler_options: XLA compiler options for the compiled prefill/step/loop (e.g. the tests turn
  CPU optimisations off, where compile time dominates interpret-mode kernels); None: defaults.
  """

  def __init__(self, model, *, cache_dtype=None, compiler_options: dict | None = None):
    self.model = model
    self.compiler_options = dict(compiler_options or {})
    self.config = model.config
    self.graphdef, self.state = nnx.split(model)
    self.absorbed = absorb_weights(model)
    self.cache_dtype = cache_dtype or model.runtime.dtype


  def _compile(self, kind, fn, statics, *args):
    """Ahead-of-time compiles fn(graphdef, *args, **statics) once per shapes/statics; returns
    (compiled, seconds spent compiling now). Step and loop donate the carry (args[2])."""
    key = (kind, self.graphdef, tuple(sorted(statics.items(), key=lambda kv: kv[0])),
           str(jax.tree.map(lambda a: (a.shape, a.dtype), args)),
           tuple(sorted(self.compiler_options.items())))
    if key not in _COMPILED:
      jitted = jax.jit(functools.partial(fn, self.graphdef, **statics),
                       donate_argnums=() if kind == "prefill" else (2,))
      t = time.perf_counter()
      _COMPILED[key] = jitted.lower(*args).compile(compiler_options=self.compiler_options or None)
      return _COMPILED[key], time.perf_counter() - t
    return _COMPILED[key], 0.0

  def run(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
          sampling: SamplingParams = SamplingParams(), seed: int = 0,
          eos_token_id: int | Sequence[int] | None = None, speculative: bool = False,
          on_step: Callable[[list[list[int]]], None] | None = None) -> GenerationOutput:
    """Generates for a batch of token-id prompts (each non-empty).

    eos_token_id: id(s) that end a sequence (default: the config's eos_token_id; pass () for
    none). on_step: called after prefill and after each decode step with the new ids of each
    sequence (streaming); without it the decode loop runs on device in one call.
    Returns a GenerationOutput (text None; see `generate` for text).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
      raise ValueError("generate: every prompt needs at least one token")
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if speculative and self.config.num_nextn_predict_layers < 1:
      raise ValueError("speculative decoding needs an MTP layer: the model has "
                       "num_nextn_predict_layers=0 (was the checkpoint saved without layer "
                       f"{self.config.num_hidden_layers}?)")
    eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
    eos_ids = [int(e) for e in (() if eos is None else (eos,) if isinstance(eos, int) else eos)]
    eos_arr = jnp.asarray((eos_ids + [-1] * 4)[:max(4, len(eos_ids))], jnp.int32)  # 4: one shape
    B = len(prompts)
    lens = np.array([len(p) for p in prompts], np.int32)
    T = _bucket(int(lens.max()))
    limit = self.config.max_position_embeddings
    capacity = -(-(T + max_new_tokens + 1) // 64) * 64
    if int(lens.max()) + max_new_tokens > limit:
      raise ValueError(f"prompt ({int(lens.max())}) + max_new_tokens ({max_new_tokens}) exceeds "
                       f"max_position_embeddings={limit}")
    toks = np.zeros((B, T), np.int32)
    for b, p in enumerate(prompts):
      toks[b, :len(p)] = p
    toks, lens = jnp.asarray(toks), jnp.asarray(lens)
    key = jax.random.key(seed)
    common = dict(params=sampling, speculative=speculative)
    pre, c0 = self._compile("prefill", _prefill_fn, dict(capacity=capacity, max_new=max_new_tokens,
                                                        cache_dtype=self.cache_dtype, **common),
                            self.state, self.absorbed, toks, lens, eos_arr, key)
    t0 = time.perf_counter()
    gs = pre(self.state, self.absorbed, toks, lens, eos_arr, key)
    jax.block_until_ready(gs)
    t_prefill = time.perf_counter() - t0
    if on_step is None:
      loop, c1 = self._compile("loop", _loop_fn, common, self.state, self.absorbed, gs)
      t0 = time.perf_counter()
      gs = jax.block_until_ready(loop(self.state, self.absorbed, gs))
    else:
      step, c1 = self._compile("step", _step_fn, common, self.state, self.absorbed, gs)
      t0 = time.perf_counter()
      seen = np.zeros(B, np.int64)
      seen = self._stream(gs, seen, on_step)
      while not bool(np.all(np.asarray(gs.finished))):
        gs = step(self.state, self.absorbed, gs)
        seen = self._stream(gs, seen, on_step)
    t_decode = time.perf_counter() - t0
    out, num = np.asarray(gs.out), np.asarray(gs.num)
    drafted, accepted = int(gs.drafted), int(gs.accepted)
    return GenerationOutput(
        tokens=[out[b, :num[b]].tolist() for b in range(B)], text=None,
        acceptance_rate=(accepted / drafted if drafted else 0.0) if speculative else None,
        prefill_seconds=t_prefill, decode_seconds=t_decode, compile_seconds=c0 + c1,
        steps=int(gs.steps))

  @staticmethod
  def _stream(gs, seen, on_step):
    num = np.asarray(gs.num)
    if np.any(num > seen):
      out = np.asarray(gs.out)
      on_step([out[b, seen[b]:num[b]].tolist() for b in range(len(num))])
    return num.astype(np.int64)


def generate(model, prompts, *, tokenizer=None, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_token_id=None,
             speculative: bool = False, chat: bool = False, on_step=None,
             generator: Generator | None = None) -> GenerationOutput:
  """Generates continuations of `prompts` (a list of strings with `tokenizer`, or of id lists).

  tokenizer: a `dsv3_jax.inference.Tokenizer` (needed for string prompts and for `text`);
  chat: wrap each string prompt in the tokenizer's chat template as a user turn.
  temperature 0 is greedy; top_k 0 / top_p 1 are off; eos_token_id defaults to the tokenizer's,
  else the config's. speculative: MTP self-speculative decoding (greedy output identical to
  plain). generator: reuse compiled functions across calls. Returns a GenerationOutput with
  token ids per prompt and, with a tokenizer, their text.
  """
  if isinstance(prompts, (str, bytes)):
    raise TypeError("generate: prompts must be a list (of strings or of token-id lists)")
  ids = []
  for p in prompts:
    if isinstance(p, str):
      if tokenizer is None:
        raise ValueError("generate: string prompts need a tokenizer")
      ids.append(tokenizer.encode_chat(p) if chat else tokenizer.encode(p))
    else:
      ids.append([int(t) for t in p])
  if eos_token_id is None and tokenizer is not None and tokenizer.eos_token_id is not None:
    eos_token_id = tokenizer.eos_token_id
  gen = generator or Generator(model)
  res = gen.run(ids, max_new_tokens=max_new_tokens,
                sampling=SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p),
                seed=seed, eos_token_id=eos_token_id, speculative=speculative, on_step=on_step)
  if tokenizer is not None:
    res.text = [tokenizer.decode(t) for t in res.tokens]
  return res
