"""The DeepSeek-V3 transformer: decoder blocks, final norm, untied head, MTP modules.

Einsum letters: B batch, T sequence, D hidden, V vocabulary.

Block: x += attn(norm(x)); x += ffn(norm(x)), the FFN dense for layers < first_k_dense_replace
(and layers off the moe_layer_freq grid), MoE otherwise.

Scanned layers: consecutive decoder layers of the same kind form one `LayerStack` whose
parameters carry a leading layer axis (logical axis "layers"); the forward pass runs each stack
under one `jax.lax.scan`, with the runtime's remat policy on the scanned block, so the program's
size and compile time do not grow with depth. DeepSeek-V3 has two stacks: 3 dense layers, then
58 MoE layers. The MTP blocks stay separate modules (parameters `mtp.{k}`), but `forward(mtp=True)`
runs each MTP decoder layer as an extra iteration of the last stack's scan when it is a layer
of that stack's kind (`_scan_with_mtp`), so its ops compile once. `layer_groups(cfg)` is the single
description of the stacking; checkpoint I/O works on the per-layer view (`layers.{L}.<param>`,
see `dsv3_jax.pretrained.unstack_path`), so the official per-layer tensor names map onto slots
of the stacks.

MTP depth k (1..num_nextn_predict_layers), checkpoint layer index num_hidden_layers + k - 1:
  h^k_i = Block_k(eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)]))   (embedding FIRST)
  logits^k_i = head(shared_head.norm(h^k_i)), predicting t_{i+k+1}.
h^0 is the main model's final hidden state AFTER model.norm, the choice vLLM makes when serving
the official checkpoint; training uses the same h^0 so that a model trained here serves the same
way. Embedding and head are shared with the main model (the checkpoint's copies are checked
equal on load).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dsv3_jax.attention import MLA
from dsv3_jax.config import ModelConfig, RuntimeConfig
from dsv3_jax.layers import INIT_STD, MLP, Linear, RMSNorm
from dsv3_jax.moe import MoE
from dsv3_jax.sharding.gather import few_token_logits, few_token_lookup, with_whole_weight

__all__ = ["DecoderLayer", "LayerStack", "MTPLayer", "DeepseekV3", "ModelOutput", "layer_groups",
           "REMAT_POLICIES"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelOutput:
  """logits [B, T, V] float32; mtp_logits [depth, B, T, V] float32 or None (position i of depth k
  predicts token i+k+1); hidden [B, T, D] the final normalised hidden state (MTP's h^0);
  router_stats: None without MoE layers, else one dict (keys as in `MoE`) whose arrays are stacked
  over the MoE layers that ran, in order (main layers, then MTP blocks): "load" [n_moe, E], ..."""

  logits: jax.Array
  mtp_logits: jax.Array | None
  hidden: jax.Array
  router_stats: dict[str, jax.Array] | None


REMAT_POLICIES = ("none", "full", "dots", "offload")


def layer_groups(cfg: ModelConfig) -> list[tuple[int, int]]:
  """The stacking of the main decoder layers: [(first layer, count), ...], one entry per run of
  consecutive layers of the same kind (dense or MoE). DeepSeek-V3: [(0, 3), (3, 58)]."""
  groups: list[tuple[int, int]] = []
  for layer in range(cfg.num_hidden_layers):
    if groups and cfg.is_moe_layer(layer) == cfg.is_moe_layer(groups[-1][0]):
      groups[-1] = (groups[-1][0], groups[-1][1] + 1)
    else:
      groups.append((layer, 1))
  return groups


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: ModelConfig, rt: RuntimeConfig, layer: int, *, rngs: nnx.Rngs):
    eps = cfg.rms_norm_eps
    self.input_layernorm = RMSNorm(cfg.hidden_size, eps=eps, param_dtype=rt.param_dtype)
    self.self_attn = MLA(cfg, rt, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=eps, param_dtype=rt.param_dtype)
    if cfg.is_moe_layer(layer):
      self.mlp = MoE(cfg, rt, rngs=rngs)
    else:
      self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, rngs=rngs, param_dtype=rt.param_dtype,
                     dtype=rt.dtype)
    self.is_moe = cfg.is_moe_layer(layer)

  def __call__(self, x, positions, segment_ids=None, *, return_latent: bool = False,
               expert_layer=None):
    """x [B, T, D] -> (x [B, T, D], router stats dict or None); with `return_latent` also the
    attention's latent (c [B, T, C], k_pe [B, T, R]), what the decode cache stores.
    expert_layer: the index into whole routed-expert layer stacks this layer holds (see
    `LayerStack(experts_at_layer=True)`); None for a layer's own experts."""
    x, stats, latent = self.with_attention(
        x, lambda h: self.self_attn(h, positions, segment_ids, return_latent=True),
        expert_layer=expert_layer)
    return (x, stats, latent) if return_latent else (x, stats)

  def with_attention(self, x, attend, expert_layer=None):
    """The block around an attention: (a, aux) = attend(input_layernorm(x)) with a [B, T, D];
    x += a; x += ffn(post_attention_layernorm(x)). Returns (x [B, T, D], router stats or None,
    aux). The training/prefill forward passes `self_attn`; cached decoding
    (`dsv3_jax.inference.decode`) passes the absorbed attention over the latent cache.
    expert_layer: as in `__call__`."""
    a, aux = attend(self.input_layernorm(x))
    x = x + a
    h = self.post_attention_layernorm(x)
    if self.is_moe:
      y, stats = self.mlp(h, layer=expert_layer)
    else:
      y, stats = self.mlp(h), None
    return x + y, stats, aux


def remat_block(fn, policy: str):
  """`fn` wrapped for the runtime's remat policy: "none" (save everything), "full" (save only
  the block input), "dots" (save matmul outputs without batch dims), "offload" (like "full",
  with the saved block inputs moved to pinned host memory; TPU/GPU only)."""
  if policy == "none":
    return fn
  if policy == "offload":
    p = jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["decoder_layer_input"],
        offload_src="device", offload_dst="pinned_host")

    def named(x, *a):
      return fn(checkpoint_name(x, "decoder_layer_input"), *a)
    return jax.checkpoint(named, policy=p)
  p = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if policy == "dots" else None
  return jax.checkpoint(fn, policy=p)


@jax.custom_vjp
def _grads_before_input_grad(params, h):
  """Identity on (params, h [B, T, D]). In the backward, the gradients of `params` and of `h`
  leave together through an optimization barrier, so the parameters' gradients are finished
  (reduced into their shards) before the gradient of `h` reaches the layers below. Used on the
  MTP blocks: XLA:TPU otherwise deferred the MTP experts' weight-gradient reduction past the
  whole main-stack backward, holding three unreduced bfloat16 [E/S, 7168, 2048] gradients
  (1.3 GiB per device) through it. Also on the LM head (`DeepseekV3.head`)."""
  return params, h


def _grads_before_fwd(params, h):
  return (params, h), None


def _grads_before_bwd(_, cts):
  return jax.lax.optimization_barrier(cts)


_grads_before_input_grad.defvjp(_grads_before_fwd, _grads_before_bwd)


class LayerStack(nnx.Module):
  """`count` consecutive decoder layers of one kind from layer `start`: one `DecoderLayer`
  (`block`) whose every variable has a leading layer axis [count, ...] (logical axis "layers").
  Calling it scans the block over that axis."""

  def __init__(self, cfg: ModelConfig, rt: RuntimeConfig, start: int, count: int, *,
               rngs: nnx.Rngs):
    self.start, self.count, self.is_moe = start, count, cfg.is_moe_layer(start)
    graphdef = nnx.split(nnx.eval_shape(lambda: DecoderLayer(cfg, rt, start, rngs=nnx.Rngs(0))))[0]
    keys = jax.random.split(rngs.params(), count)
    state = jax.vmap(lambda k: nnx.split(DecoderLayer(cfg, rt, start, rngs=nnx.Rngs(k)))[1])(keys)
    self.block = nnx.merge(graphdef, state)
    for _, v in nnx.to_flat_state(nnx.state(self.block)):
      axes = v.get_metadata().get("axes")
      if axes is not None:
        v.set_metadata(axes=("layers",) + tuple(axes))

  def layer(self, i: int) -> DecoderLayer:
    """Layer start + i as a stand-alone `DecoderLayer` (a view: its arrays are slices)."""
    graphdef, state = nnx.split(self.block)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))

  def split_experts(self):
    """(graphdef, routed-expert stacks, the rest): the block's state with the routed experts'
    weight stacks [count, E, ...] apart (`nnx.merge(graphdef, experts, rest_of_one_layer)`
    gives a layer that holds the whole stacks; call it with `expert_layer=`). Dense stacks:
    experts is an empty state."""
    return nnx.split(self.block, nnx.PathContains("experts"), ...)

  def __call__(self, x, positions, segment_ids=None, *, remat: str = "none",
               return_latent: bool = False, experts_at_layer: bool = False):
    """x [B, T, D] -> (x, stats with a leading [count] axis or None[, latents [count, ...]]).

    experts_at_layer (inference): the routed-expert stacks stay outside the scan and each layer
    reads its slice in place (`grouped_matmul(layer=...)`) instead of the scan slicing them,
    which XLA materialises before a kernel call (a copy of every layer's experts per step).
    Not differentiable in the expert weights.
    """
    if experts_at_layer and self.is_moe:
      graphdef, experts, state = self.split_experts()
      xs = (state, jnp.arange(self.count, dtype=jnp.int32))
    else:
      graphdef, state = nnx.split(self.block)
      experts, xs = None, (state, None)

    def body(x, layer):
      layer_state, index = layer
      states = (layer_state,) if experts is None else (experts, layer_state)
      out = nnx.merge(graphdef, *states)(x, positions, segment_ids, return_latent=return_latent,
                                         expert_layer=index)
      return out[0], out[1:]

    x, ys = jax.lax.scan(remat_block(body, remat), x, xs)
    return (x, *ys)


def _mtp_fits_stack(stack: LayerStack, mtp) -> bool:
  """Whether every MTP block is a decoder layer of `stack`'s structure (the same variable paths,
  types, per-layer shapes and dtypes), so it can run as an extra iteration of the stack's scan."""
  def sig(block, lead):
    return [(path, type(v), tuple(v.get_value().shape[lead:]), v.get_value().dtype)
            for path, v in nnx.to_flat_state(nnx.state(block))]
  want = sig(stack.block, 1)
  return all(sig(m.block, 0) == want for m in mtp)


def _scan_with_mtp(stack: LayerStack, mtp, norm: RMSNorm, x, emb_next, positions,
                   segment_ids=None, remat: str = "none"):
  """`stack`'s layers, then the MTP depths 1..depth, as count + depth iterations of ONE scan.

  x: the stack's input [B, T, D]; emb_next: Emb(t_{i+k}) for k = 1..depth side by side
  [B, depth*T, D]; norm: the main model's final norm (h^0 = norm(main output)).
  Returns (the stack's output [B, T, D], [h^k [B, T, D] for k = 1..depth] (block outputs, before
  shared_head_norm), router stats with a leading [count + depth] axis or None).

  Iteration i < count is layer start + i (weights: the stacks' slice i). Iteration count + k - 1
  is MTP depth k: its input is eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1})]) of the carry
  (the `lax.switch` below; h^0 = norm(carry)), its weights the MTP block's, selected per leaf
  (`lax.select` on the iteration index) from the block and the stacks' slice, which stay where
  they are: nothing stack-sized is copied, and the backward accumulates the stacks' gradient
  slice by slice. The block's ops are the stack's own ops, so XLA compiles them once (a
  separate MTP block was ~19% of the 671B train step's generated code); a scan of length 1
  would not do (XLA inlines it). The whole iteration (input switch, weight select, layer) is
  under the runtime's remat policy, saving the carry as the stack alone does.
  """
  count, depth = stack.count, len(mtp)
  T = x.shape[1]
  graphdef, state = nnx.split(stack.block)
  leaves, treedef = jax.tree.flatten(state)
  blocks = [jax.tree.leaves(nnx.state(m.block)) for m in mtp]
  # Per leaf: the MTP block's value (depth 1) or the blocks' values stacked [depth, ...].
  extra = [b[0] if depth == 1 else jnp.stack(b) for b in zip(*blocks)]
  parts = ("enorm", "hnorm", "eh_proj")
  in_split = [[nnx.split(getattr(m, name)) for name in parts] for m in mtp]
  in_defs = [[d for d, _ in k] for k in in_split]
  in_states = [[st for _, st in k] for k in in_split]
  norm_def, norm_state = nnx.split(norm)

  def step(x, i, leaves, extra, in_states, norm_state, emb_next, positions, segment_ids):
    def mtp_input(k):
      def f(x):
        enorm, hnorm, eh_proj = map(nnx.merge, in_defs[k - 1], in_states[k - 1])
        h_prev = nnx.merge(norm_def, norm_state)(x) if k == 1 else x
        e = emb_next[:, (k - 1) * T:k * T]
        return eh_proj(jnp.concatenate([enorm(e), hnorm(h_prev)], axis=-1)).astype(x.dtype)
      return f
    x = jax.lax.switch(jnp.clip(i - count + 1, 0, depth),
                       [lambda x: x] + [mtp_input(k) for k in range(1, depth + 1)], x)
    j, k = jnp.minimum(i, count - 1), jnp.clip(i - count, 0, depth - 1)
    layer = [jax.lax.select(i < count, jax.lax.dynamic_index_in_dim(s, j, keepdims=False),
                            e if depth == 1 else jax.lax.dynamic_index_in_dim(e, k, keepdims=False))
             for s, e in zip(leaves, extra)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, layer))(x, positions, segment_ids)

  run = remat_block(step, remat)

  def body(carry, i):
    x, outs = carry
    x, stats = run(x, i, leaves, extra, in_states, norm_state, emb_next, positions, segment_ids)
    # Slot 0 ends as the stack's output, slot k as h^k.
    outs = jax.lax.dynamic_update_index_in_dim(outs, x, jnp.clip(i - count + 1, 0, depth), 0)
    return (x, outs), stats

  # Every slot is written before it is read; built from x so that it takes x's sharding.
  outs = jnp.stack([jax.lax.stop_gradient(x)] * (depth + 1))
  (_, outs), stats = jax.lax.scan(body, (x, outs), jnp.arange(count + depth, dtype=jnp.int32))
  return outs[0], [outs[k] for k in range(1, depth + 1)], stats


class MTPLayer(nnx.Module):
  """One multi-token-prediction depth (names as in the checkpoint's layer num_hidden_layers+k-1)."""

  def __init__(self, cfg: ModelConfig, rt: RuntimeConfig, depth: int, *, rngs: nnx.Rngs):
    eps, D = cfg.rms_norm_eps, cfg.hidden_size
    self.enorm = RMSNorm(D, eps=eps, param_dtype=rt.param_dtype)
    self.hnorm = RMSNorm(D, eps=eps, param_dtype=rt.param_dtype)
    self.eh_proj = Linear(2 * D, D, axes=(None, "embed"), rngs=rngs, param_dtype=rt.param_dtype,
                          dtype=rt.dtype)
    self.block = DecoderLayer(cfg, rt, cfg.num_hidden_layers + depth - 1, rngs=rngs)
    self.shared_head_norm = RMSNorm(D, eps=eps, param_dtype=rt.param_dtype)

  def __call__(self, emb_next, h_prev, positions, segment_ids=None):
    """emb_next: Emb(t_{i+k}) [B, T, D]; h_prev: h^{k-1} [B, T, D] -> (h^k, normed h^k, stats)."""
    x = self.eh_proj(jnp.concatenate([self.enorm(emb_next), self.hnorm(h_prev)], axis=-1))
    h, stats = self.block(x, positions, segment_ids)
    return h, self.shared_head_norm(h), stats


class DeepseekV3(nnx.Module):
  """DeepSeek-V3 causal LM. `m(tokens)` -> logits float32 [B, T, V] for int32 tokens [B, T]."""

  def __init__(self, cfg: ModelConfig, rt: RuntimeConfig | None = None, *, rngs: nnx.Rngs):
    rt = rt or RuntimeConfig()
    self.config, self.runtime = cfg, rt
    emb = INIT_STD * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), jnp.float32)
    self.embed_tokens = nnx.Param(emb.astype(rt.param_dtype), axes=("vocab", "embed"))
    self.stacks = nnx.List([LayerStack(cfg, rt, start, count, rngs=rngs)
                            for start, count in layer_groups(cfg)])
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=rt.param_dtype)
    self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), rngs=rngs,
                          param_dtype=rt.param_dtype, dtype=rt.dtype)
    self.mtp = nnx.List([MTPLayer(cfg, rt, k + 1, rngs=rngs)
                         for k in range(cfg.num_nextn_predict_layers)])

  @property
  def cfg(self) -> ModelConfig:
    return self.config

  def _vocab_op(self, fn, few, x, var: nnx.Variable, parts: int = 1, value=None) -> jax.Array:
    """fn(x, table) for the vocab-sized `var` (embedding or head). When x [B, ...] holds at least
    as many tokens as the vocabulary (training, long prefills), the table is gathered whole in the
    compute dtype inside a shard_map over the batch (`sharding.with_whole_weight`: its gradient is
    a reduce-scatter into its shards, where GSPMD would all-reduce full-size partial gradients);
    otherwise `few(x, table, axes, dtype)` moves the activations instead of the table
    (`sharding.few_token_lookup` / `few_token_logits`: the token ids or hidden states are gathered
    over the batch axes inside a shard_map and meet the table's local vocab shard; no table-sized
    collective, the logits come out vocab-sharded). parts: x holds that many equal calls'
    tokens side by side (the path is chosen by one call's count, as if made separately).
    value: the table to use in place of `var`'s own value (the same array passed through an
    identity, e.g. `_grads_before_input_grad`); `var` still gives its logical axes."""
    value = var.get_value() if value is None else value
    axes = var.get_metadata().get("axes") or (None,) * value.ndim
    n_tokens = x.size if jnp.issubdtype(x.dtype, jnp.integer) else x.size // x.shape[-1]
    n_tokens //= parts
    if n_tokens < self.config.vocab_size:
      return few(x, value, axes, self.runtime.dtype)
    return with_whole_weight(fn, x, value, axes, self.runtime.dtype)

  def embed(self, tokens: jax.Array, parts: int = 1) -> jax.Array:
    """tokens [B, T] int -> [B, T, D] in the compute dtype. parts: see `_vocab_op`."""
    rows = self._vocab_op(lambda t, table: jnp.take(table, t, axis=0), few_token_lookup, tokens,
                          self.embed_tokens, parts)
    return rows.astype(self.runtime.dtype)

  def head(self, h: jax.Array, parts: int = 1) -> jax.Array:
    """h [B, T, D] -> float32 logits [B, T, vocab]. parts: see `_vocab_op`."""
    if self.lm_head.is_fp8:
      return self.lm_head(h).astype(jnp.float32)
    dt = self.runtime.dtype
    # Backward: the head's weight gradient (h^T @ dlogits, reduce-scattered into its shards) is
    # finished before the gradient of h goes down the layers, so the logit gradient
    # [tokens, vocab] dies here. XLA:TPU otherwise deferred that matmul past the whole layer
    # backward, holding the bf16 logit gradient of the main and MTP heads (1.97 GiB per device
    # at 671B, batch 1 x 4096) through it.
    kernel, h = _grads_before_input_grad(self.lm_head.kernel.get_value(), h)

    def whole(x, k):
      # The barrier keeps the float32 cast out of the matmul's fusion: libtpu 0.0.50.1 (jax
      # 0.12.0.1) aborts emitting the head's matmul fused with that cast when the main and MTP
      # hidden states come as one [B, 2T, D] input (`fusion_util.cc` "TransformWindow: split of
      # a padded window dim is not supported"); the cast then fuses into the loss's reductions.
      return jax.lax.optimization_barrier(jnp.einsum("...i,io->...o", x.astype(dt), k.astype(dt)))

    logits = self._vocab_op(whole, few_token_logits, h, self.lm_head.kernel, value=kernel)
    return logits.astype(jnp.float32)

  def forward(self, tokens, *, positions=None, segment_ids=None, mtp: bool = False) -> ModelOutput:
    """Full forward.

    tokens: int32 [B, T]; positions: int [B, T] (default 0..T-1); segment_ids: int [B, T] for packed
    sequences (attention stays within a segment; positions should restart per segment);
    mtp: also run the MTP modules (training / speculative drafting).
    """
    B, T = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    remat = self.runtime.remat
    depth = len(self.mtp) if mtp else 0
    # With MTP, one embedding lookup and one head call serve the main model and every depth
    # (inputs side by side along T): the vocab tables are gathered and their gradients
    # reduce-scattered once, and the compiled step holds one copy of those ops, not 1 + depth.
    # Emb(t_{i+k}) for depth k; the last k positions have no such token and are masked by the loss.
    ids = [tokens] + [jnp.pad(tokens[:, k:], ((0, 0), (0, k))) for k in range(1, depth + 1)]
    emb = self.embed(jnp.concatenate(ids, axis=1), parts=depth + 1) if depth else self.embed(tokens)
    x = emb[:, :T]
    stats = []
    # The MTP blocks run as extra iterations of the last stack's scan when they are layers of its
    # kind (DeepSeek-V3: a 59th iteration of the MoE scan): XLA then compiles their ops once with
    # the stack's instead of as a separate copy (see `_scan_with_mtp`).
    fused = bool(depth) and _mtp_fits_stack(self.stacks[-1], self.mtp)
    for n, stack in enumerate(self.stacks):
      with jax.named_scope(f"layers_{stack.start}_{stack.start + stack.count - 1}"):
        if fused and n == len(self.stacks) - 1:
          x, mtp_h, s = _scan_with_mtp(stack, self.mtp, self.norm, x, emb[:, T:], positions,
                                       segment_ids, remat)
        else:
          x, s = stack(x, positions, segment_ids, remat=remat)
      if s is not None:
        stats.append(s)
    hidden = self.norm(x)
    if not depth:
      logits, mtp_logits = self.head(hidden), None
    else:
      normed, h = [hidden], hidden
      for k, layer in enumerate(self.mtp, start=1):
        if fused:
          normed.append(layer.shared_head_norm(mtp_h[k - 1]))
          continue
        graphdef, params, others = nnx.split(layer, nnx.Param, ...)
        params, h = _grads_before_input_grad(params, h)
        run = remat_block(lambda e, hp, st, o, *a: nnx.merge(graphdef, st, o)(e, hp, *a), remat)
        h, n_k, s = run(emb[:, k * T:(k + 1) * T], h, params, others, positions, segment_ids)
        if s is not None:
          stats.append(jax.tree.map(lambda a: a[None], s))
        normed.append(n_k)
      out = self.head(jnp.concatenate(normed, axis=1), parts=depth + 1).reshape(B, depth + 1, T, -1)
      logits, mtp_logits = out[:, 0], jnp.moveaxis(out[:, 1:], 1, 0)
    router_stats = (jax.tree.map(lambda *a: jnp.concatenate(a), *stats) if stats else None)
    return ModelOutput(logits, mtp_logits, hidden, router_stats)

  @property
  def num_layers(self) -> int:
    return self.config.num_hidden_layers

  def layer(self, i: int) -> DecoderLayer:
    """Main decoder layer i as a stand-alone `DecoderLayer` view (for inspection and tests)."""
    for stack in self.stacks:
      if stack.start <= i < stack.start + stack.count:
        return stack.layer(i - stack.start)
    raise IndexError(f"layer {i} out of range (num_hidden_layers={self.config.num_hidden_layers})")

  def __call__(self, tokens, *, positions=None, segment_ids=None) -> jax.Array:
    return self.forward(tokens, positions=positions, segment_ids=segment_ids).logits
