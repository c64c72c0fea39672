"""Expert parallelism for the routed experts, written with shard_map.

Einsum letters: N tokens, n tokens on one shard, K experts per token, D hidden, F expert width,
E routed experts, El = E / S experts per shard, S expert-axis size, C per-destination capacity.

Layout inside the shard_map (mesh axes by their conventional names, see `sharding.mesh`):
  tokens  x [N, D], experts/weights [N, K]  split over every mesh axis except `tensor`
  experts w_gate/w_up [E, D, F], w_down [E, F, D]  split E over `expert`, F over `tensor`
Per shard, as small pure functions:
  1. sort_by_destination: the n*K (token, expert) pairs sorted by expert id, hence by the shard
     owning the expert (shard s owns experts [s*El, (s+1)*El)); send counts per shard [S].
  2. dispatch: all-to-all over `expert`. RAGGED (jax.lax.ragged_all_to_all; TPU and GPU) sends
     exactly the n*K rows; PADDED (plain all_to_all; any backend, XLA:CPU has no
     ragged-all-to-all in jax 0.10) sends S fixed slots of C = n * min(K, El) rows. C is the
     dropless worst case: a token reaches at most min(K, El) experts of one shard, so one shard
     receives at most S*n*min(K, El) = n*K*min(S, E/K) rows (the min(EP, E/k) bound), which is
     also the receive buffer of the ragged path. No token is ever dropped.
  3. local_experts: received rows re-sorted by local expert, `ffn` (the model's grouped FFN, a
     ragged matmul; padding rows go to a sentinel group past the last expert).
  4. return: the inverse all-to-all, back into the sender's sorted order.
  5. combine: un-sort and sum_k w_k y_k in float32; psum over `tensor` (F was split).
The router runs outside (replicated weights, tokens data-parallel); shared experts stay outside
under ordinary GSPMD sharding. No [tokens, experts, hidden] one-hot tensor is built anywhere.
This module imports nothing from the model: the grouped FFN is passed in.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import re
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec as P

from dsv3_jax.sharding.mesh import EXPERT, TENSOR

__all__ = ["Exchange", "EPLayout", "ep_layout", "expert_parallel_ffn", "sort_by_destination",
           "padded_dispatch", "padded_return", "ragged_plan", "ragged_dispatch", "ragged_return",
           "local_experts", "combine", "receive_capacity", "hlo_collectives"]

FFN = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


class Exchange(enum.Enum):
  """How tokens cross the expert axis. AUTO: RAGGED on TPU/GPU, PADDED elsewhere (CPU)."""

  AUTO = "auto"
  PADDED = "padded"
  RAGGED = "ragged"

  def resolve(self, platform: str | None = None) -> "Exchange":
    """The concrete exchange for `platform` (the one compiled for; default: jax's backend)."""
    platform = platform or jax.default_backend()
    if self is not Exchange.AUTO:
      if self is Exchange.RAGGED and platform == "cpu":
        raise ValueError("Exchange.RAGGED was requested but XLA:CPU does not implement "
                         "ragged-all-to-all; use Exchange.PADDED or AUTO on CPU")
      return self
    return Exchange.PADDED if platform == "cpu" else Exchange.RAGGED


@dataclasses.dataclass(frozen=True)
class EPLayout:
  """The mesh axes the expert-parallel shard_map uses (derived from the ambient mesh)."""

  mesh: Mesh | AbstractMesh
  token_axes: tuple[str, ...]   # axes splitting the tokens: all axes of size > 1 except tensor
  tensor_axis: str | None       # splits the expert FFN width F (None if absent or size 1)

  @property
  def num_shards(self) -> int:
    return self.mesh.shape[EXPERT]

  @property
  def token_shards(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.token_axes)


def ep_layout(mesh: Mesh | AbstractMesh | None = None) -> EPLayout | None:
  """The EP layout of `mesh` (default: the ambient mesh, `jax.set_mesh`), or None when it has no
  `expert` axis of size > 1 (then the MoE runs its single-program path under GSPMD)."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh is None or mesh.empty or mesh.shape.get(EXPERT, 1) <= 1:
    return None
  sizes = mesh.shape
  tokens = tuple(a for a in mesh.axis_names if a != TENSOR and sizes[a] > 1)
  tensor = TENSOR if sizes.get(TENSOR, 1) > 1 else None
  return EPLayout(mesh, tokens, tensor)


def receive_capacity(tokens_per_shard: int, k: int, experts_per_shard: int, shards: int) -> int:
  """Rows one shard can receive in the worst case: S * n * min(K, El) (dropless bound)."""
  return shards * tokens_per_shard * min(k, experts_per_shard)


def sort_by_destination(x: jax.Array, experts: jax.Array, experts_per_shard: int, shards: int):
  """x [n, D], experts [n, K] global ids -> (xs [n*K, D] sorted by expert, local_ids [n*K]
  (expert id within its shard), dest [n*K] shard of each sorted row, order [n*K] (index of each
  sorted row in the flattened pair list), send_counts [S] int32)."""
  K = experts.shape[1]
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  e_sorted = flat[order]
  dest = e_sorted // experts_per_shard
  send_counts = jnp.bincount(dest, length=shards).astype(jnp.int32)
  return x[order // K], (e_sorted % experts_per_shard).astype(jnp.int32), dest, order, send_counts


def _exclusive_cumsum(a, axis=0):
  return jnp.cumsum(a, axis=axis) - a


def padded_dispatch(xs, local_ids, dest, send_counts, capacity: int, sentinel: int):
  """Fixed-slot all-to-all over `expert`: S slots of `capacity` rows per shard.

  Returns (recv_x [S*C, D] rows grouped by source shard, recv_ids [S*C] local expert id or
  `sentinel` for empty slots, slot [n*K] where each sorted row was placed (for the return trip)).
  """
  S = send_counts.shape[0]
  rank = jnp.arange(xs.shape[0]) - _exclusive_cumsum(send_counts)[dest]
  slot = dest * capacity + rank  # [n*K], all < S*C because rank < count <= C
  buf = jnp.zeros((S * capacity, xs.shape[1]), xs.dtype).at[slot].set(xs, unique_indices=True)
  ids = jnp.full((S * capacity,), sentinel, jnp.int32).at[slot].set(local_ids, unique_indices=True)
  recv_x = jax.lax.all_to_all(buf, EXPERT, 0, 0, tiled=True)
  recv_ids = jax.lax.all_to_all(ids, EXPERT, 0, 0, tiled=True)
  return recv_x, recv_ids, slot


def padded_return(ys, slot):
  """Inverse of `padded_dispatch`: ys [S*C, D] (receive layout) -> [n*K, D] sender's order."""
  return jax.lax.all_to_all(ys, EXPERT, 0, 0, tiled=True)[slot]


@dataclasses.dataclass(frozen=True)
class RaggedPlan:
  """Offsets/sizes for both ragged all-to-alls of one shard (all int32 [S])."""

  send_offsets: jax.Array   # where my chunk for shard j starts in my sorted rows
  send_sizes: jax.Array     # rows I send to shard j
  remote_offsets: jax.Array # where my chunk lands in shard j's receive buffer
  recv_offsets: jax.Array   # where shard i's chunk sits in my receive buffer
  recv_sizes: jax.Array     # rows I receive from shard i
  back_offsets: jax.Array   # where my returned chunk goes in shard i's sorted rows


def ragged_plan(counts: jax.Array, me) -> RaggedPlan:
  """From the all-gathered send counts [S (src), S (dst)] and my index: the ragged offsets.

  Chunks from source i are laid out in source order in each receiver's buffer.
  """
  into = _exclusive_cumsum(counts, 0)   # [i, j]: offset of i's chunk in j's receive buffer
  outof = _exclusive_cumsum(counts, 1)  # [i, j]: offset of i's chunk for j in i's sorted rows
  return RaggedPlan(send_offsets=outof[me], send_sizes=counts[me], remote_offsets=into[me],
                    recv_offsets=into[:, me], recv_sizes=counts[:, me], back_offsets=outof[:, me])


def ragged_dispatch(xs, local_ids, send_counts, capacity: int, sentinel: int):
  """Exact-size all-to-all over `expert` (only the n*K rows move).

  Returns (recv_x [R, D], recv_ids [R] (sentinel past the received rows), plan), R = capacity.
  """
  counts = jax.lax.all_gather(send_counts, EXPERT)  # [S, S]
  plan = ragged_plan(counts, jax.lax.axis_index(EXPERT))

  def send(v, out):
    return jax.lax.ragged_all_to_all(v, out, plan.send_offsets, plan.send_sizes,
                                     plan.remote_offsets, plan.recv_sizes, axis_name=EXPERT)

  recv_x = send(xs, jnp.zeros((capacity, xs.shape[1]), xs.dtype))
  recv_ids = send(local_ids[:, None], jnp.full((capacity, 1), sentinel, jnp.int32))[:, 0]
  return recv_x, recv_ids, plan


def ragged_return(ys, plan: RaggedPlan, rows: int):
  """Inverse of `ragged_dispatch`: ys [R, D] -> [rows = n*K, D] in the sender's sorted order."""
  out = jnp.zeros((rows, ys.shape[1]), ys.dtype)
  return jax.lax.ragged_all_to_all(ys, out, plan.recv_offsets, plan.recv_sizes, plan.back_offsets,
                                   plan.send_sizes, axis_name=EXPERT)


def local_experts(recv_x, recv_ids, num_local: int, ffn: FFN, w_gate, w_up, w_down):
  """recv_x [R, D] with local expert ids [R] (num_local = padding) -> ys [R, D] same order."""
  order = jnp.argsort(recv_ids, stable=True)
  sizes = jnp.bincount(recv_ids, length=num_local + 1)[:num_local].astype(jnp.int32)
  ys = ffn(recv_x[order], sizes, w_gate, w_up, w_down)  # rows past sum(sizes): padding
  return jnp.zeros_like(ys).at[order].set(ys, unique_indices=True)


def combine(ys_sorted, order, weights):
  """ys_sorted [n*K, D] (expert-sorted pairs), order [n*K], weights [n, K] -> [n, D] float32."""
  n, K = weights.shape
  y = jnp.zeros(ys_sorted.shape, jnp.float32).at[order].set(ys_sorted.astype(jnp.float32),
                                                            unique_indices=True)
  return jnp.einsum("nkd,nk->nd", y.reshape(n, K, -1), weights.astype(jnp.float32))


def _ep_shard(x, experts, weights, w_gate, w_up, w_down, *, ffn: FFN, shards: int,
              exchange: Exchange, tensor_axis: str | None):
  n, K = experts.shape
  El = w_gate.shape[0]
  xs, local_ids, dest, order, send_counts = sort_by_destination(x, experts, El, shards)
  cap = n * min(K, El)
  if exchange is Exchange.RAGGED:
    recv_x, recv_ids, plan = ragged_dispatch(xs, local_ids, send_counts, shards * cap, El)
    ys = local_experts(recv_x, recv_ids, El, ffn, w_gate, w_up, w_down)
    ys_sorted = ragged_return(ys, plan, n * K)
  else:
    recv_x, recv_ids, slot = padded_dispatch(xs, local_ids, dest, send_counts, cap, El)
    ys = local_experts(recv_x, recv_ids, El, ffn, w_gate, w_up, w_down)
    ys_sorted = padded_return(ys, slot)
  y = combine(ys_sorted, order, weights)
  return jax.lax.psum(y, tensor_axis) if tensor_axis else y


def expert_parallel_ffn(x: jax.Array, experts: jax.Array, weights: jax.Array, w_gate: jax.Array,
                        w_up: jax.Array, w_down: jax.Array, *, ffn: FFN,
                        layout: EPLayout | None = None, exchange: Exchange = Exchange.AUTO,
                        platform: str | None = None) -> jax.Array:
  """Dropless routed-expert output sum_k w_k Expert_{e_k}(x) with experts split over `expert`.

  x [N, D] (compute dtype); experts [N, K] int32 global ids; weights [N, K] float32;
  w_gate/w_up [E, D, F], w_down [E, F, D]; ffn(xs [M, D], group_sizes [El], w_gate, w_up, w_down)
  -> [M, D] is the local grouped SwiGLU. Returns [N, D] float32. N need not divide the shard
  count (zero-weight padding tokens are appended and dropped). Call under jit with the mesh set
  (`jax.set_mesh`), or pass `layout`. `platform`: the platform compiled for, which AUTO resolves
  the exchange by (default: jax's backend; "tpu" when compiling for TPU on a CPU host).
  """
  layout = layout or ep_layout()
  if layout is None:
    raise ValueError("expert_parallel_ffn needs a mesh with an 'expert' axis of size > 1 "
                     "(set it with jax.set_mesh(mesh))")
  E, S = w_gate.shape[0], layout.num_shards
  if E % S:
    raise ValueError(f"n_routed_experts={E} is not divisible by the expert axis size {S}")
  N, K = experts.shape
  pad = -N % layout.token_shards
  if pad:
    x = jnp.pad(x, ((0, pad), (0, 0)))
    experts = jnp.pad(experts, ((0, pad), (0, 0)))
    weights = jnp.pad(weights, ((0, pad), (0, 0)))
  tok, t = P(layout.token_axes), layout.tensor_axis
  body = jax.shard_map(
      lambda *a: _ep_shard(*a, ffn=ffn, shards=S, exchange=exchange.resolve(platform),
                         tensor_axis=t),
      mesh=layout.mesh,
      in_specs=(tok, tok, tok, P(EXPERT, None, t), P(EXPERT, None, t), P(EXPERT, t, None)),
      out_specs=tok)
  with jax.named_scope("expert_parallel"):
    y = body(x, experts, weights.astype(jnp.float32), w_gate, w_up, w_down)
  return y[:N] if pad else y


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
                "s16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8}


def hlo_collectives(hlo_text: str, ops=("all-to-all", "ragged-all-to-all")):
  """Collectives of a compiled module's HLO text (`jit(f).lower(...).compile().as_text()`).

  Returns [(op, [(dtype, dims), ...] result shapes, bytes)] per instruction; for all-to-all the
  result shapes equal the operand shapes (XLA may split one tiled all-to-all into S operands).
  """
  out = []
  for line in hlo_text.splitlines():
    for op in ops:
      m = re.match(rf"\s*(?:ROOT )?%[\w.-]+ = (.*?) {re.escape(op)}\(", line)
      if m:
        shapes = [(t, tuple(int(d) for d in dims.split(",") if d))
                  for t, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1))]
        nbytes = sum(math.prod(d) * _DTYPE_BYTES.get(t, 4) for t, d in shapes)
        out.append((op, shapes, nbytes))
        break
  return out
