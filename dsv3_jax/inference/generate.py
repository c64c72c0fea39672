"""Batched generation: prefill, then jitted fixed-shape decode steps (plain or MTP-speculative).

Shapes are fixed per call: the prompt batch is right padded to a power-of-two bucket (>= 16) and
the cache capacity is that bucket + max_new_tokens + 1, rounded up to a multiple of 64 (whole
kernel blocks; of 128 above 256 rows, whole TPU lane tiles of the transposed rope cache), so one compiled prefill and one compiled step serve every step and every prompt
length in the bucket. The attention backend is the model's RuntimeConfig's; speculative
verification passes all its tokens to one `mla_decode` call, which reads the cache once.
Without a streaming callback the whole decode loop runs on device (`lax.while_loop`, one call);
with one, each step is one call of the same compiled step function.

Every generation runs on a device mesh (one device: a mesh of one): the weights in the shardings
the `ShardingRules` give their logical axes, the absorbed W_UK/W_UV split on heads, the latent
cache and the per-sequence state split on the batch ("batch" rule); prefill and steps are jitted
with those in/out shardings and traced under `jax.set_mesh(mesh)`.
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
from jax.sharding import Mesh, NamedSharding

from dsv3_jax.errors import UserError
from dsv3_jax.inference.cache import init_cache
from dsv3_jax.inference.decode import absorb_weights, mtp_prefill, prefill
from dsv3_jax.inference.sampling import SamplingParams, sample, token_logprob
from dsv3_jax.inference.speculative import draft_from, plain_step, speculative_step
from dsv3_jax.inference.state import GenState
from dsv3_jax.jit_cache import CompiledCache, sharding_key
from dsv3_jax.sharding import (ShardingRules, compile_options_for, global_batch, rules_for_mesh, use_rules, logical_to_spec, resolve_mesh, to_host,
                               tree_shardings)

__all__ = ["Generator", "GenerationOutput", "generate", "GenerationError"]


class GenerationError(ValueError, UserError):
  """A request the model cannot serve (empty prompt, too long for max_position_embeddings, no MTP
  layer for speculative decoding, ...); the message names the argument."""


@dataclasses.dataclass
class GenerationOutput:
  """tokens: generated ids per prompt (the EOS token included when one ended it); text: their
  decoded text (None without a tokenizer); acceptance_rate: accepted / drafted MTP tokens
  (None without speculative decoding); timings exclude compilation; logprobs: per generated
  token, log softmax(logits / temperature) of the logits that chose it (see `GenState.logp`)."""

  tokens: list[list[int]]
  text: list[str] | None
  acceptance_rate: float | None
  prefill_seconds: float
  decode_seconds: float
  compile_seconds: float
  steps: int
  logprobs: list[list[float]] | None = None

  @property
  def num_generated(self) -> int:
    return sum(len(t) for t in self.tokens)

  @property
  def tokens_per_second(self) -> float:
    """Generated tokens per second of prefill + decode."""
    return self.num_generated / max(self.prefill_seconds + self.decode_seconds, 1e-9)


def _bucket(n: int, minimum: int = 16) -> int:
  return max(minimum, 1 << (n - 1).bit_length())


def _prefill_fn(graphdef, state, absorbed, tokens, lengths, eos, key_data, *, capacity, params,
                max_new, speculative, cache_dtype, cache_sharding):
  model = nnx.merge(graphdef, state)
  B = tokens.shape[0]
  key = jax.random.wrap_key_data(key_data)
  cache = init_cache(model.config, B, capacity, cache_dtype, mtp_layers=1 if speculative else 0)
  cache = jax.lax.with_sharding_constraint(cache, cache_sharding)  # never a whole-batch buffer
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
  logp = jnp.zeros((B, max_new), jnp.float32).at[:, 0].set(token_logprob(logits, first, params))
  return GenState(cache, first, out, jnp.ones((B,), jnp.int32), finished, eos, key, zero, draft,
                  draft_probs, zero, zero, logp)


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


# Compiled prefill/step/loop functions shared by Generators (`generate()` builds one per call)
# whose key matches: kind, model structure (graphdef), mesh, rules, statics, argument
# shapes/dtypes, in/out shardings and compiler options. Bounded (least recently used evicted).
COMPILED = CompiledCache()


def _batch_sharding(shape, dim: int, rules: ShardingRules, mesh: Mesh) -> NamedSharding:
  """Dim `dim` of an array of `shape` split per the "batch" rule (replicated if not divisible)."""
  logical = tuple("batch" if d == dim else None for d in range(len(shape)))
  return NamedSharding(mesh, logical_to_spec(logical, rules, mesh, tuple(shape)))


def _cache_shardings(abstract_cache, rules: ShardingRules, mesh: Mesh):
  """Shardings of a LatentCache's leaves: every buffer [..., B, S, X] (per layer, or stacked with
  leading dims) on its batch dim (third from last), the lengths [B] on their only dim."""
  def leaf(x):
    dim = x.ndim - 3 if x.ndim >= 3 else 0 if x.ndim == 1 else None
    return (NamedSharding(mesh, logical_to_spec((), rules, mesh)) if dim is None
            else _batch_sharding(x.shape, dim, rules, mesh))
  return jax.tree.map(leaf, abstract_cache)


def _gen_state_shardings(cache_sh, batch: int, max_new: int, probs_width: int,
                         rules: ShardingRules, mesh: Mesh) -> GenState:
  """GenState of shardings: per-sequence fields on the batch, counters/eos/key replicated."""
  b = lambda *shape: _batch_sharding((batch,) + shape, 0, rules, mesh)  # noqa: E731
  rep = NamedSharding(mesh, logical_to_spec((), rules, mesh))
  return GenState(cache_sh, b(), b(max_new), b(), b(), rep, rep, rep, b(), b(probs_width), rep, rep,
                  b(max_new))


class Generator:
  """Holds a model split for jit, its absorbed MLA weights, and compiled prefill/step functions.

  model: a DeepseekV3 (speculative decoding needs num_nextn_predict_layers >= 1).
  cache_dtype: latent cache dtype (default: the model's compute dtype).
  compiler_options: XLA compiler options for the compiled prefill/step/loop (e.g. the tests turn
  CPU optimisations off, where compile time dominates interpret-mode kernels); None: defaults.
  mesh: a `jax.sharding.Mesh`, "fsdp=4,expert=2" or {name: size} (None: every device on `fsdp`;
  one device is a mesh of one); rules: the `ShardingRules` (None: `sharding.rules_for_mesh(mesh, serve=True)`). The weights are
  moved into their shardings (a no-op for `from_pretrained(..., mesh=mesh)`), the cache and the
  per-sequence state are split on the batch (replicated when B is not divisible by the batch
  axes). Multi-process: every process calls `run` with the same prompts and gets every result.
  """

  def __init__(self, model, *, cache_dtype=None, compiler_options: dict | None = None,
               mesh: Mesh | str | dict | None = None, rules: ShardingRules | None = None):
    self.mesh = resolve_mesh(mesh)
    self.rules = rules or rules_for_mesh(self.mesh, serve=True)
    self.compiler_options = compile_options_for(self.mesh, compiler_options)
    self.config = model.config
    self.graphdef, state = nnx.split(model)
    self.state_shardings = tree_shardings(state, self.rules, self.mesh)
    self.state = jax.device_put(state, self.state_shardings)  # a no-op where already placed
    self.model = nnx.merge(self.graphdef, self.state)
    graphdef = self.graphdef

    def absorb(st):
      return absorb_weights(nnx.merge(graphdef, st))

    # W_UK / W_UV [..., H, N|V, C]: split on heads like the attention weights they come from.
    self.absorbed_shardings = jax.tree.map(
        lambda x: NamedSharding(self.mesh, logical_to_spec(
            (None,) * (x.ndim - 3) + ("heads", None, None), self.rules, self.mesh, x.shape)),
        jax.eval_shape(absorb, self.state))
    with jax.set_mesh(self.mesh), use_rules(self.rules):
      self.absorbed = jax.jit(absorb, in_shardings=(self.state_shardings,),
                              out_shardings=self.absorbed_shardings)(self.state)
    self.cache_dtype = cache_dtype or model.runtime.dtype

  def _compile(self, kind, fn, statics, in_shardings, out_shardings, *args):
    """Ahead-of-time compiles fn(graphdef, *args, **statics) once per shapes/statics/mesh/
    shardings (see `CompiledCache`); returns (compiled, seconds spent compiling now). Step and
    loop donate the carry (args[2])."""
    key = (kind, self.graphdef, self.mesh, self.rules,
           tuple(sorted(((k, v) for k, v in statics.items() if k != "cache_sharding"),
                        key=lambda kv: kv[0])),
           sharding_key(statics.get("cache_sharding")),
           str(jax.tree.map(lambda a: (a.shape, a.dtype), args)),
           sharding_key(in_shardings), sharding_key(out_shardings),
           tuple(sorted(self.compiler_options.items())))
    compiled = COMPILED.get(key)
    if compiled is not None:
      return compiled, 0.0
    jitted = jax.jit(functools.partial(fn, self.graphdef, **statics),
                     in_shardings=in_shardings, out_shardings=out_shardings,
                     donate_argnums=() if kind == "prefill" else (2,))
    t = time.perf_counter()
    with jax.set_mesh(self.mesh), use_rules(self.rules):
      compiled = jitted.lower(*args).compile(compiler_options=self.compiler_options or None)
    COMPILED.put(key, compiled)
    return compiled, time.perf_counter() - t

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
      raise GenerationError("generate: every prompt needs at least one token")
    if max_new_tokens < 1:
      raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if speculative and self.config.num_nextn_predict_layers < 1:
      raise GenerationError("speculative decoding needs an MTP layer: the model has "
                       "num_nextn_predict_layers=0 (was the checkpoint saved without layer "
                       f"{self.config.num_hidden_layers}?)")
    eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
    eos_ids = [int(e) for e in (() if eos is None else (eos,) if isinstance(eos, int) else eos)]
    eos_arr = np.asarray((eos_ids + [-1] * 4)[:max(4, len(eos_ids))], np.int32)  # 4: one shape
    B = len(prompts)
    lens = np.array([len(p) for p in prompts], np.int32)
    T = _bucket(int(lens.max()))
    limit = self.config.max_position_embeddings
    rows = T + max_new_tokens + 1
    step = 64 if rows <= 256 else 128  # the TPU rope-cache write: see mla_decode.tpu_write
    capacity = -(-rows // step) * step
    if int(lens.max()) + max_new_tokens > limit:
      raise GenerationError(f"prompt ({int(lens.max())}) + max_new_tokens ({max_new_tokens}) exceeds "
                       f"max_position_embeddings={limit}")
    toks = np.zeros((B, T), np.int32)
    for b, p in enumerate(prompts):
      toks[b, :len(p)] = p
    # Every process passes the same prompts; each device takes its rows of the batch.
    rules, mesh = self.rules, self.mesh
    rep = NamedSharding(mesh, logical_to_spec((), rules, mesh))
    tok_sh, len_sh = _batch_sharding(toks.shape, 0, rules, mesh), _batch_sharding((B,), 0, rules, mesh)
    toks, lens = global_batch(toks, tok_sh, toks.shape), global_batch(lens, len_sh, (B,))
    eos_arr = global_batch(eos_arr, rep, eos_arr.shape)
    key_data = np.asarray(jax.random.key_data(jax.random.key(seed)))
    key_data = global_batch(key_data, rep, key_data.shape)
    mtp_layers = 1 if speculative else 0
    cache_sh = _cache_shardings(jax.eval_shape(lambda: init_cache(
        self.config, B, capacity, self.cache_dtype, mtp_layers=mtp_layers)), rules, mesh)
    gs_sh = _gen_state_shardings(cache_sh, B, max_new_tokens,
                                 self.config.vocab_size if speculative and not sampling.greedy
                                 else 0, rules, mesh)
    common = dict(params=sampling, speculative=speculative)
    pre, c0 = self._compile(
        "prefill", _prefill_fn, dict(capacity=capacity, max_new=max_new_tokens,
                                     cache_dtype=self.cache_dtype, cache_sharding=cache_sh,
                                     **common),
        (self.state_shardings, self.absorbed_shardings, tok_sh, len_sh, rep, rep), gs_sh,
        self.state, self.absorbed, toks, lens, eos_arr, key_data)
    carry_in = (self.state_shardings, self.absorbed_shardings, gs_sh)
    t0 = time.perf_counter()
    gs = pre(self.state, self.absorbed, toks, lens, eos_arr, key_data)
    jax.block_until_ready(gs)
    t_prefill = time.perf_counter() - t0
    if on_step is None:
      loop, c1 = self._compile("loop", _loop_fn, common, carry_in, gs_sh, self.state,
                               self.absorbed, gs)
      t0 = time.perf_counter()
      gs = jax.block_until_ready(loop(self.state, self.absorbed, gs))
    else:
      step, c1 = self._compile("step", _step_fn, common, carry_in, gs_sh, self.state,
                               self.absorbed, gs)
      t0 = time.perf_counter()
      seen = np.zeros(B, np.int64)
      seen = self._stream(gs, seen, on_step)
      while not bool(np.all(to_host(gs.finished))):
        gs = step(self.state, self.absorbed, gs)
        seen = self._stream(gs, seen, on_step)
    t_decode = time.perf_counter() - t0
    out, num, logp = to_host(gs.out), to_host(gs.num), to_host(gs.logp)
    drafted, accepted = int(gs.drafted), int(gs.accepted)
    return GenerationOutput(
        tokens=[out[b, :num[b]].tolist() for b in range(B)], text=None,
        acceptance_rate=(accepted / drafted if drafted else 0.0) if speculative else None,
        prefill_seconds=t_prefill, decode_seconds=t_decode, compile_seconds=c0 + c1,
        steps=int(gs.steps), logprobs=[logp[b, :num[b]].tolist() for b in range(B)])

  @staticmethod
  def _stream(gs, seen, on_step):
    num = to_host(gs.num)
    if np.any(num > seen):
      out = to_host(gs.out)
      on_step([out[b, seen[b]:num[b]].tolist() for b in range(len(num))])
    return num.astype(np.int64)


def generate(model, prompts, *, tokenizer=None, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_token_id=None,
             speculative: bool = False, chat: bool = False, on_step=None,
             generator: Generator | None = None, mesh=None, rules: ShardingRules | None = None,
             ) -> GenerationOutput:
  """Generates continuations of `prompts` (a list of strings with `tokenizer`, or of id lists).

  tokenizer: a `dsv3_jax.inference.Tokenizer` (needed for string prompts and for `text`);
  chat: wrap each string prompt in the tokenizer's chat template as a user turn.
  temperature 0 is greedy; top_k 0 / top_p 1 are off; eos_token_id defaults to the tokenizer's,
  else the config's. speculative: MTP self-speculative decoding. Greedy guarantee: each token is the argmax of
  the model's logits as the verification pass computes them; in float32 the output equals plain
  greedy decoding, in bfloat16 it can differ from the first near-tie (top-2 logits within bf16
  rounding) on, because the two-token verification call rounds differently from the one-token
  plain step (measured: tests/test_speculative_bf16.py). Sampling follows the standard
  rejection rule, so each token is distributed as plain sampling. generator: reuse compiled functions across calls (it brings its own mesh). mesh /
  rules: see `Generator` (None: every device on `fsdp`, the default rules). Returns a GenerationOutput with
  token ids per prompt and, with a tokenizer, their text.
  """
  if isinstance(prompts, (str, bytes)):
    raise TypeError("generate: prompts must be a list (of strings or of token-id lists)")
  ids = []
  for p in prompts:
    if isinstance(p, str):
      if tokenizer is None:
        raise GenerationError("generate: string prompts need a tokenizer")
      ids.append(tokenizer.encode_chat(p) if chat else tokenizer.encode(p))
    else:
      ids.append([int(t) for t in p])
  if eos_token_id is None and tokenizer is not None and tokenizer.eos_token_id is not None:
    eos_token_id = tokenizer.eos_token_id
  gen = generator or Generator(model, mesh=mesh, rules=rules)
  res = gen.run(ids, max_new_tokens=max_new_tokens,
                sampling=SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p),
                seed=seed, eos_token_id=eos_token_id, speculative=speculative, on_step=on_step)
  if tokenizer is not None:
    res.text = [tokenizer.decode(t) for t in res.tokens]
  return res
