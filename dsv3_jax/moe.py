"""DeepSeekMoE: group-limited router with the aux-loss-free selection bias, dropless experts.

Einsum letters: N tokens (batch*seq flattened), D hidden, E routed experts, K experts per token,
F expert FFN width, G expert groups.

The expert computation is a chain of small pure functions (route -> permute -> grouped FFN ->
unpermute/combine) so expert parallelism (dsv3_jax.sharding.expert_parallel) wraps the same
pieces in shard_map: `permute` and `unpermute` are its `sort_by_destination` and `combine` (which
live there because sharding imports nothing from the model), and `grouped_ffn` is passed to it.
Nothing is dropped: each token reaches all of its K experts. Design: README "Design notes"
(MoE) and the module docstring of `dsv3_jax.sharding.expert_parallel`.

Kernels: `RuntimeConfig.moe_backend` picks the grouped-matmul implementation ("reference" is
jax.lax.ragged_dot; "auto" / "pallas" / "interpret" go to `dsv3_jax.kernels_pallas`, with
`RuntimeConfig.kernel_platform` naming the kernel to interpret or lower for and
`RuntimeConfig.gpu_kernels` the GPU flavour). The same backend serves FP8 weights:
`Experts.to_fp8` keeps a projection as e4m3 [E, out, in] + block scales and it runs through
`grouped_matmul_fp8` (inference only).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig, RuntimeConfig
from dsv3_jax.layers import (INIT_STD, MLP, Fp8Scale, Fp8Value, check_fp8_weight, compute_cast,
                             fp8_inference_only)
from dsv3_jax.sharding import expert_parallel, kernel_map

__all__ = ["RouterBias", "Router", "Experts", "MoE", "Routing", "route", "permute",
           "grouped_ffn", "grouped_ffn_vjp", "unpermute", "grouped_matmul", "Fp8Experts", "top_k"]


class RouterBias(nnx.Variable):
  """The aux-loss-free selection bias: state updated by the balancing rule, never by gradients.

  Its own Variable type so `nnx.Param` filters (optimizer, grad) skip it.
  """


@dataclasses.dataclass(frozen=True)
class Routing:
  """Router output for N tokens: weights [N, K] f32, experts [N, K] int32, scores [N, E] f32."""

  weights: jax.Array
  experts: jax.Array
  scores: jax.Array


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`jax.lax.top_k(x, k)` for small k by k rounds of a max over the last axis: the same values
  and int32 indices (descending; among equal values the lower index first, -inf included), for
  NaN-free x. XLA:TPU compiles `lax.top_k` as a sort of every row; the router's three top-ks
  (top-2 of 32 per group, top-4 of 8 groups, top-8 of 256 experts) were among the largest ops
  it generated code for in the 671B train step, where these are a few fused reductions."""
  n = x.shape[-1]
  iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  taken = jnp.zeros(x.shape, bool)
  values, indices = [], []
  for _ in range(k):
    rest = jnp.where(taken, -jnp.inf, x)
    best = rest.max(-1, keepdims=True)
    i = jnp.where((rest == best) & ~taken, iota, n).min(-1)
    taken = taken | (iota == i[..., None])
    values.append(best[..., 0])
    indices.append(i)
  return jnp.stack(values, -1), jnp.stack(indices, -1)


def route(logits: jax.Array, bias: jax.Array | None, cfg: ModelConfig) -> Routing:
  """Group-limited top-k routing on float32 router logits [N, E].

  s = sigmoid(logits) (softmax for V2-style configs); selection uses s + bias; a group's score is
  the sum of its top-2 (noaux_tc) or its max (group_limited_greedy); the best `topk_group` groups
  stay eligible; the top-k eligible experts are chosen; their weights are the unbiased s,
  normalised to sum 1 if norm_topk_prob, then times routed_scaling_factor.
  """
  E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
  logits = logits.astype(jnp.float32)
  scores = jax.nn.sigmoid(logits) if cfg.scoring_func == "sigmoid" else jax.nn.softmax(logits, -1)
  # Selection only picks indices: no gradient flows through it.
  choice = jax.lax.stop_gradient(scores if bias is None else scores + bias.astype(jnp.float32))
  if cfg.topk_method != "greedy" and cfg.n_group > 1:
    G = cfg.n_group
    grouped = choice.reshape(-1, G, E // G)
    if cfg.topk_method == "noaux_tc":
      group_score = top_k(grouped, 2)[0].sum(-1)  # [N, G]
    else:
      group_score = grouped.max(-1)
    _, keep = top_k(group_score, cfg.topk_group)  # [N, topk_group]
    # The kept groups as a mask by comparison, not a scatter: sharded over tokens, XLA's SPMD
    # partitioner turned `zeros.at[rows, keep].set(True)` into a scatter of every token's indices
    # on every device, which XLA:TPU sorts (4M keys per MoE layer at DeepSeek-V3's 671B training
    # mesh; that one sort was ~18% of the tpu7x train step's code generation).
    group_mask = (keep[..., None] == jnp.arange(G, dtype=keep.dtype)).any(-2)  # [N, G]
    expert_mask = jnp.repeat(group_mask, E // G, axis=-1)
    choice = jnp.where(expert_mask, choice, -jnp.inf)
  _, experts = top_k(choice, K)
  # The chosen scores by a one-hot select, not `take_along_axis`: its gradient is a scatter,
  # which XLA:TPU sorts; this one's is an elementwise select.
  hot = experts[..., None] == jnp.arange(E, dtype=experts.dtype)  # [N, K, E]
  weights = jnp.where(hot, scores[..., None, :], 0.0).sum(-1)
  if cfg.norm_topk_prob:
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
  return Routing(weights * cfg.routed_scaling_factor, experts, scores)


@dataclasses.dataclass(frozen=True)
class Fp8Experts:
  """One FP8 expert projection as `grouped_matmul` takes it: value [E, O, I] float8_e4m3fn (the
  checkpoint's per-expert [out, in] weights stacked), scale_inv [E, ceil(O/128), ceil(I/128)]."""

  value: jax.Array
  scale_inv: jax.Array


def grouped_matmul(lhs: jax.Array, rhs: jax.Array | Fp8Experts, group_sizes: jax.Array,
                   backend: str = "reference", platform: str | None = None,
                   gpu_impl: str | None = None, *, layer=None,
                   rows: int | None = None) -> jax.Array:
  """lhs [M, I] rows sorted by group, rhs [E, I, O] (or `Fp8Experts`), group_sizes [E] -> [M, O].

  backend "reference": jax.lax.ragged_dot; otherwise the `dsv3_jax.kernels_pallas` grouped
  matmul (differentiable, custom VJP) with `platform` ("tpu"/"gpu": the kernel "interpret" runs)
  and `gpu_impl` (the GPU flavour, see `kernels_pallas.backend.gpu_flavor`).
  FP8 rhs: `grouped_matmul_fp8` with float32 accumulation, output in lhs.dtype, any backend
  (inference only: its gradient raises `Fp8TrainingError`).
  layer: None, or an int (may be traced): rhs is a layer stack [L, E, I, O] (FP8: stacked
  value and scales) and rhs[layer] is used; the TPU kernels read it in place (inference only).
  Weight stacks in another dtype are cast per tile, never whole.
  rows: live rows the TPU kernels' cost estimates assume (default M; figures only).
  """
  if isinstance(rhs, Fp8Experts):
    from dsv3_jax.kernels_pallas import grouped_matmul_fp8
    lhs = fp8_inference_only(lhs, "a routed-expert (MoE) layer")
    return grouped_matmul_fp8(lhs, rhs.value, rhs.scale_inv, group_sizes, out_dtype=lhs.dtype,
                              backend=backend, platform=platform, layer=layer, rows=rows)
  if backend != "reference":
    from dsv3_jax.kernels_pallas import grouped_matmul as kernel
    if layer is not None:
      return kernel(lhs, rhs, group_sizes, out_dtype=lhs.dtype, backend=backend,
                    platform=platform, gpu_impl=gpu_impl, layer=layer, rows=rows)
    return kernel(lhs, rhs, group_sizes, backend=backend, platform=platform, gpu_impl=gpu_impl,
                  rows=rows)
  if layer is not None:
    from dsv3_jax.kernels_pallas.grouped_matmul.reference import at_layer
    rhs = at_layer(rhs, layer).astype(lhs.dtype)
  return jax.lax.ragged_dot(lhs, rhs, group_sizes)


def permute(x: jax.Array, experts: jax.Array, num_experts: int):
  """Sorts the N*K (token, expert) pairs by expert (expert parallelism's `sort_by_destination`,
  the one implementation, without its destination ids).

  x [N, D], experts [N, K] -> (xs [N*K, D] rows grouped by expert, order [N*K] (position of each
  sorted row in the flattened [N*K] pair list), group_sizes [E] int32).
  """
  xs, _, order, group_sizes = expert_parallel.sort_by_destination(x, experts, num_experts)
  return xs, order, group_sizes


def grouped_ffn(xs, group_sizes, w_gate, w_up, w_down, backend: str = "reference",
                platform: str | None = None, gpu_impl: str | None = None, *, layer=None,
                rows: int | None = None):
  """Per-expert SwiGLU on expert-sorted rows: xs [M, D] -> [M, D].

  Weights [E, D, F] / [E, F, D], or `Fp8Experts`; with `layer` the layer stacks [L, E, ...]
  of them, read at that layer (inference). backend / platform / gpu_impl / rows as in
  `grouped_matmul`.
  """
  kw = dict(backend=backend, platform=platform, gpu_impl=gpu_impl, layer=layer, rows=rows)
  g = grouped_matmul(xs, w_gate, group_sizes, **kw)
  u = grouped_matmul(xs, w_up, group_sizes, **kw)
  return grouped_matmul(jax.nn.silu(g) * u, w_down, group_sizes, **kw)


def grouped_ffn_vjp(xs, dys, group_sizes, w_gate, w_up, w_down, acc=None, *,
                    backend: str = "auto", platform: str | None = None,
                    gpu_impl: str | None = None, rows: int | None = None):
  """The backward of `grouped_ffn` (kernel backends, dense weights) with weight gradients
  accumulated in place: the expert-parallel backward's per-round FFN VJP.

  xs, dys [M, D] (the FFN's input rows and output cotangent, grouped), group_sizes [E],
  w_gate/w_up [E, D, F], w_down [E, F, D]; acc None or (dw_gate, dw_up, dw_down) of earlier
  rounds -> (dxs [M, D] in xs.dtype, (dw_gate, dw_up, dw_down) in the weights' dtypes, plus acc).
  Recomputes gate/up (the same grouped-matmul calls as the forward, so XLA may share them with a
  rematerialised forward). The weight gradients go into acc in place (the TPU kernels alias it),
  and all three are taken before the input gradient, which is one buffer: the gate and up
  products are summed into it in place (float32 sum, rounded once). Optimization barriers order
  them: dy's rows are dead before the gate/up weight gradients, x's before the input gradient.
  """
  from dsv3_jax.kernels_pallas import grouped_matmul_dlhs, transposed_grouped_matmul
  for w in (w_gate, w_up, w_down):
    if isinstance(w, Fp8Experts):
      raise TypeError("grouped_ffn_vjp: FP8 experts are inference only (no gradient)")
  kw = dict(backend=backend, platform=platform, gpu_impl=gpu_impl, rows=rows)
  g = grouped_matmul(xs, w_gate, group_sizes, **kw)
  u = grouped_matmul(xs, w_up, group_sizes, **kw)
  h, act_vjp = jax.vjp(lambda g, u: jax.nn.silu(g) * u, g, u)
  acc_g, acc_u, acc_d = (None,) * 3 if acc is None else acc
  dys = dys.astype(h.dtype)
  dh = grouped_matmul_dlhs(dys, w_down, group_sizes, out_dtype=h.dtype, **kw)
  dw_down = transposed_grouped_matmul(h, dys, group_sizes, out_dtype=w_down.dtype, acc=acc_d, **kw)
  dw_down, dh = jax.lax.optimization_barrier((dw_down, dh))  # dys dead before the gate/up grads
  dg, du = act_vjp(dh)
  dg, du = dg.astype(xs.dtype), du.astype(xs.dtype)
  dw_gate = transposed_grouped_matmul(xs, dg, group_sizes, out_dtype=w_gate.dtype, acc=acc_g,
                                      **kw)
  dw_up = transposed_grouped_matmul(xs, du, group_sizes, out_dtype=w_up.dtype, acc=acc_u, **kw)
  dws, dg, du = jax.lax.optimization_barrier(((dw_gate, dw_up, dw_down), dg, du))
  dxs = grouped_matmul_dlhs(dg, w_gate, group_sizes, out_dtype=xs.dtype, **kw)
  dxs = grouped_matmul_dlhs(du, w_up, group_sizes, acc=dxs, **kw)
  return dxs, dws


def unpermute(ys: jax.Array, order: jax.Array, weights: jax.Array) -> jax.Array:
  """Inverse of `permute` plus the weighted combine (expert parallelism's `combine`, the one
  implementation).

  ys [N*K, D] expert-sorted outputs, order [N*K], weights [N, K] -> [N, D] = sum_k w_k * y_k,
  accumulated in float32.
  """
  return expert_parallel.combine(ys, order, weights)


class Router(nnx.Module):
  """Router weights (`mlp.gate.weight`, stored transposed [D, E]) and the selection bias."""

  def __init__(self, cfg: ModelConfig, rt: RuntimeConfig, *, rngs: nnx.Rngs):
    E, D = cfg.n_routed_experts, cfg.hidden_size
    w = INIT_STD * jax.random.normal(rngs.params(), (D, E), jnp.float32)
    self.kernel = nnx.Param(w.astype(rt.param_dtype), axes=("embed", None))
    self.e_score_correction_bias = (RouterBias(jnp.zeros((E,), jnp.float32), axes=(None,))
                                    if cfg.uses_router_bias else None)
    self.cfg = cfg

  def __call__(self, x: jax.Array) -> Routing:
    """x [N, D] -> Routing. Logits are computed in float32."""
    logits = jnp.einsum("nd,de->ne", x.astype(jnp.float32), self.kernel.get_value().astype(jnp.float32))
    bias = None if self.e_score_correction_bias is None else self.e_score_correction_bias.get_value()
    return route(logits, bias, self.cfg)


class Experts(nnx.Module):
  """Routed experts stacked on a leading expert axis: gate/up [E, D, F], down [E, F, D].

  `to_fp8(name, value, scale_inv)` replaces one projection by FP8 weights (inference only):
  `{name}_weight` [E, out, in] float8_e4m3fn and `{name}_weight_scale_inv` float32 block scales.
  """

  PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

  def __init__(self, cfg: ModelConfig, rt: RuntimeConfig, *, rngs: nnx.Rngs):
    E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size

    def init(shape):
      return (INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(rt.param_dtype)

    self.gate_proj = nnx.Param(init((E, D, F)), axes=("expert", "moe_embed", "moe_mlp"))
    self.up_proj = nnx.Param(init((E, D, F)), axes=("expert", "moe_embed", "moe_mlp"))
    self.down_proj = nnx.Param(init((E, F, D)), axes=("expert", "moe_mlp", "moe_embed"))
    self.rt = rt
    self.fp8 = ()  # names of the projections held as FP8 (see to_fp8)

  def to_fp8(self, name: str, value, scale_inv) -> tuple[str, str]:
    """Replaces projection `name` ("gate_proj", "up_proj", "down_proj") by FP8 weights, in place.

    value: [E, out, in] float8_e4m3fn (array or jax.ShapeDtypeStruct); scale_inv:
    [E, ceil(out/128), ceil(in/128)] float32. Stored as `{name}_weight` (logical axes: the
    dense ones with the last two swapped) and `{name}_weight_scale_inv` ("expert", None, None).
    Returns the two new attribute names.
    """
    if name not in self.PROJECTIONS or name in self.fp8:
      raise ValueError(f"Experts.to_fp8: {name!r} is not a dense projection of {self.PROJECTIONS}")
    dense = getattr(self, name)
    *lead, n_in, n_out = dense.get_value().shape  # lead: [E] or [layers, E] (stacked)
    check_fp8_weight(value, scale_inv, (*lead, n_out, n_in), f"experts.{name}")
    axes = dense.get_metadata().get("axes")
    delattr(self, name)
    v_name, s_name = f"{name}_weight", f"{name}_weight_scale_inv"
    setattr(self, v_name, Fp8Value(value, axes=None if axes is None else
                                   tuple(axes)[:-2] + (axes[-1], axes[-2])))
    setattr(self, s_name, Fp8Scale(scale_inv, axes=None if axes is None else
                                   tuple(axes)[:-2] + (None, None)))
    self.fp8 = tuple(self.fp8) + (name,)
    return v_name, s_name

  def weights(self, cast: bool = True) -> list[jax.Array | Fp8Experts]:
    """[gate, up, down]: dense [E, I, O] arrays in the compute dtype (as stored when not `cast`),
    or `Fp8Experts`."""
    out = []
    for name in self.PROJECTIONS:
      if name in self.fp8:
        out.append(Fp8Experts(getattr(self, f"{name}_weight").get_value(),
                              getattr(self, f"{name}_weight_scale_inv").get_value()))
      else:
        w = getattr(self, name).get_value()
        out.append(compute_cast(w, self.rt.dtype) if cast else w)
    return out

  def __call__(self, x: jax.Array, routing: Routing,
               layer=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [N, D] -> (sum_k w_k Expert_k(x) [N, D] float32, tokens per expert [E] int32,
    expert-parallel overflow: (token, expert) rows beyond `rt.ep_capacity_factor` x the average
    load of their expert shard, sent in further exchange rounds; int32 scalar, 0 without expert
    parallelism).

    layer: None, or an int (may be traced) when this module holds the whole layer stacks
    [L, E, ...] (`LayerStack(..., experts_at_layer=True)`, inference): the grouped matmuls read
    layer `layer` of them in place (see `grouped_matmul`).
    """
    dt = self.rt.dtype
    w = self.weights(cast=layer is None)  # a stack is cast per tile by the kernel, never whole
    E = (w[0].value if isinstance(w[0], Fp8Experts) else w[0]).shape[0 if layer is None else 1]
    kw = dict(backend=self.rt.moe_backend, platform=self.rt.kernel_platform,
              gpu_impl=self.rt.gpu_kernels, layer=layer)
    load = jnp.bincount(routing.experts.reshape(-1), length=E).astype(jnp.int32)
    layout = expert_parallel.ep_layout()  # the ambient mesh (jax.set_mesh) has an expert axis > 1
    if layout is not None:
      # FP8 projections cross the shard_map as (value, scale_inv) pairs, both split over E.
      packed = [(p.value, p.scale_inv) if isinstance(p, Fp8Experts) else p for p in w]

      # Rows per receive buffer on average: the (token, expert) pairs of one token shard.
      kw["rows"] = -(-x.shape[0] // layout.token_shards) * routing.experts.shape[1]

      def ffn(xs, sizes, *ws, layer=None):
        ws = [Fp8Experts(*p) if isinstance(p, tuple) else p for p in ws]
        return grouped_ffn(xs, sizes, *ws, **{**kw, "layer": layer})

      # Kernel backends, dense weights: the FFN's own backward (weight gradients in place).
      dense = kw["backend"] != "reference" and not any(isinstance(p, Fp8Experts) for p in w)
      vjp = None if not dense else functools.partial(
          grouped_ffn_vjp, backend=kw["backend"], platform=kw["platform"],
          gpu_impl=kw["gpu_impl"], rows=kw["rows"])
      y, overflow = expert_parallel.expert_parallel_ffn(
          x.astype(dt), routing.experts, routing.weights, *packed, ffn=ffn, layout=layout,
          capacity_factor=self.rt.ep_capacity_factor, return_overflow=True, layer=layer,
          ffn_vjp=vjp)
      return y, load, overflow
    return _local_experts(x.astype(dt), routing, w, E, kw), load, jnp.zeros((), jnp.int32)


def _local_experts(x, routing: Routing, w, num_experts: int, kw) -> jax.Array:
  """permute -> grouped FFN -> unpermute for the tokens at hand (no expert parallelism).

  With a kernel backend on a mesh (e.g. fsdp or data axes, no `expert` axis), the chain runs per
  shard of the token dim inside `kernel_map`: GSPMD cannot partition a Mosaic/Triton custom call,
  and each token's experts are all local once the expert weights are gathered (FSDP's all-gather,
  inserted by GSPMD before the shard_map; their gradients are reduced by the shard_map's
  transpose). The reference backend (jax.lax.ragged_dot) is left to GSPMD.
  """
  flat = [q for p in w for q in ((p.value, p.scale_inv) if isinstance(p, Fp8Experts) else (p,))]
  fp8 = [isinstance(p, Fp8Experts) for p in w]

  layer = kw["layer"]
  if layer is not None:  # a (possibly traced) index crosses the shard_map as an operand
    layer = jnp.asarray(layer, jnp.int32)

  def chain(x, experts, weights, layer, *flat):
    it = iter(flat)
    ws = [Fp8Experts(next(it), next(it)) if f else next(it) for f in fp8]
    xs, order, sizes = permute(x, experts, num_experts)
    return unpermute(grouped_ffn(xs, sizes, *ws, **{**kw, "layer": layer}), order, weights)

  args = (x, routing.experts, routing.weights, layer, *flat)
  if kw["backend"] == "reference":
    return chain(*args)
  tok = ("batch", None)
  return kernel_map(chain, (tok, tok, tok, None) + (None,) * len(flat), tok,
                    name="routed_experts")(*args)


class MoE(nnx.Module):
  """Routed experts + shared experts. Returns the output and the router statistics."""

  def __init__(self, cfg: ModelConfig, rt: RuntimeConfig, *, rngs: nnx.Rngs):
    self.gate = Router(cfg, rt, rngs=rngs)
    self.experts = Experts(cfg, rt, rngs=rngs)
    self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts,
                               rngs=rngs, param_dtype=rt.param_dtype, dtype=rt.dtype)
                           if cfg.n_shared_experts else None)
    self.cfg = cfg

  def __call__(self, x: jax.Array, layer=None) -> tuple[jax.Array, dict[str, Any]]:
    """x [B, T, D] -> (y [B, T, D] in x.dtype, stats). layer: see `Experts.__call__` (the
    routed experts held as whole layer stacks, read at that layer; inference).

    stats: "load" [E] int32 tokens routed to each expert; "seq_load" [B, E] float32 the same per
    sequence; "seq_prob" [B, E] float32 mean over the sequence of s_i / sum_j s_j (the P_i of the
    sequence-wise balance loss); "ep_overflow" int32 scalar: under expert parallelism the
    (token, expert) rows beyond `RuntimeConfig.ep_capacity_factor` x the average load of their
    expert shard, which went in further exchange rounds (never dropped); 0 otherwise.
    """
    B, T, D = x.shape
    with jax.named_scope("moe"):
      flat = x.reshape(B * T, D)
      routing = self.gate(flat)
      y, load, overflow = self.experts(flat, routing, layer)
      y = y.reshape(B, T, D)
      if self.shared_experts is not None:
        y = y + self.shared_experts(x).astype(jnp.float32)
      E = self.cfg.n_routed_experts
      seq_of_pair = (jnp.arange(B * T) // T)[:, None] * E + routing.experts  # [N, K]
      seq_load = jnp.bincount(seq_of_pair.reshape(-1), length=B * E).reshape(B, E)
      s = routing.scores
      stats = {"load": load,
               "seq_load": seq_load.astype(jnp.float32),
               "seq_prob": (s / s.sum(-1, keepdims=True)).reshape(B, T, E).mean(1),
               "ep_overflow": overflow}
      return y.astype(x.dtype), stats
