"""Expert parallelism for the routed experts, written with shard_map.

Einsum letters: N tokens, n tokens on one shard, K experts per token, D hidden, F expert width,
E routed experts, El = E / S experts per shard, S expert-axis size, R receive rows per round.

Layout inside the shard_map (mesh axes by their conventional names, see `sharding.mesh`):
  tokens  x [N, D], experts/weights [N, K]  split over every mesh axis of size > 1 (`tensor`
          included, last, so its split is a local slice of the data-parallel shard)
  experts w_gate/w_up [E, D, F], w_down [E, F, D] (or any pytree with a leading E axis, e.g. FP8
          values + block scales)  split over `expert` only; GSPMD gathers the other dims
          (FSDP-style) before the shard_map, and the weight gradients are reduced after it.
  No token buffer is ever all-reduced: every output row is computed whole on one shard, forward
  and backward (see "Why check_vma=False" below).
Per shard, as small pure functions:
  1. sort_by_destination: the n*K (token, expert) pairs sorted by expert id, hence by the shard
     owning the expert (shard s owns experts [s*El, (s+1)*El)); rows per expert [E],
     all-gathered over `expert` ([S, E] int32: the only metadata exchanged).
  2. rounds: receiver j lists the rows bound for it in source order (T_j = sum_i counts[i, j]
     rows); round r moves that list's rows [r*R, (r+1)*R). R = capacity_factor * n*K (the average
     load times the factor, a multiple of 8), so one round suffices unless a shard is overloaded;
     the rest (the "overflow", counted) goes in further rounds, statically at most
     ceil(S*n*min(K, El) / R) (the dropless worst case), each under lax.cond (skipped when no
     shard of the step needs it) and jax.checkpoint, so memory stays ~R rows, not the worst case.
     Nothing is dropped. When the worst case is under LOOP_COST_ROUNDS rounds (few shards), one
     worst-case round is cheaper than the loop and is used instead (`exchange_rounds`).
  3. dispatch: all-to-all over `expert`. RAGGED (jax.lax.ragged_all_to_all; TPU and GPU) moves
     exactly the round's rows into an [R, D] buffer; PADDED (plain all_to_all; any backend,
     XLA:CPU has no ragged-all-to-all) sends S fixed slots of min(R, n*min(K, El)) rows.
  4. local_experts: each received row's local expert id follows from its place in the
     receiver's row list and the gathered counts (no id exchange); rows re-sorted by local
     expert, `ffn` (the model's grouped FFN, a grouped matmul; padding rows go to a sentinel
     group past the last expert).
  5. return: the inverse all-to-all, back into the sender's sorted order (rows of other rounds 0).
  6. combine: un-sort and sum_k w_k y_k in float32.
The router runs outside (replicated weights, tokens data-parallel); shared experts stay outside
under ordinary GSPMD sharding. No [tokens, experts, hidden] one-hot tensor is built anywhere.
This module imports nothing from the model: the grouped FFN is passed in.

Why check_vma=False: Pallas calls (megablox gmm/tgmm, the FP8 grouped matmul) declare plain
`ShapeDtypeStruct` outputs, which shard_map's varying-manual-axes check rejects. Without the
check, shard_map's transpose psums the cotangents of inputs over the mesh axes their spec does
not name: here only the expert weights (over the data-like axes: the data-parallel weight-gradient
reduction), never a token buffer, because the token specs name every axis. (With check_vma=True
the backward also held two token-sized all-reduces, `psum_invariant`, the transposes of the
implicit `pvary` of the zero buffers that scatter / ragged_all_to_all write into.)
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh, PartitionSpec as P

from dsv3_jax.sharding.mesh import EXPERT, TENSOR

__all__ = ["Exchange", "EPLayout", "ep_layout", "expert_parallel_ffn", "sort_by_destination",
           "RoundPlan", "round_plan", "received_expert_ids", "padded_round", "ragged_round",
           "local_experts", "combine", "receive_capacity", "max_rounds", "exchange_rounds",
           "LOOP_COST_ROUNDS", "mesh_platform"]

FFN = Callable[..., jax.Array]  # ffn(xs [M, D], group_sizes [El], w_gate, w_up, w_down) -> [M, D]
_ROW_ALIGN = 8


def mesh_platform(mesh: Mesh | AbstractMesh | None) -> str | None:
  """The platform ("tpu", "gpu", "cpu") of a mesh's devices: a concrete Mesh's first device, an
  AbstractMesh's `abstract_device` (set when it was derived from a concrete mesh); None when the
  mesh does not say."""
  if mesh is None:
    return None
  if isinstance(mesh, Mesh):
    return mesh.devices.flat[0].platform
  device = getattr(mesh, "abstract_device", None)
  return getattr(device, "platform", None)


class Exchange(enum.Enum):
  """How tokens cross the expert axis. AUTO: RAGGED on TPU/GPU, PADDED on CPU, judged by the
  mesh's devices (so a TPU AOT compile on a CPU host gets RAGGED), else by jax.default_backend()."""

  AUTO = "auto"
  PADDED = "padded"
  RAGGED = "ragged"

  def resolve(self, mesh: Mesh | AbstractMesh | None = None) -> "Exchange":
    platform = mesh_platform(mesh) or jax.default_backend()
    if self is Exchange.AUTO:
      return Exchange.PADDED if platform == "cpu" else Exchange.RAGGED
    if self is Exchange.RAGGED and platform == "cpu":
      raise ValueError("Exchange.RAGGED was requested but the mesh's devices are CPUs and "
                       "XLA:CPU does not implement ragged-all-to-all; use Exchange.PADDED or AUTO")
    return self


@dataclasses.dataclass(frozen=True)
class EPLayout:
  """The mesh axes the expert-parallel shard_map uses (derived from the ambient mesh)."""

  mesh: Mesh | AbstractMesh
  token_axes: tuple[str, ...]   # axes splitting the tokens: every axis of size > 1, tensor last

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
  if sizes.get(TENSOR, 1) > 1:
    tokens += (TENSOR,)
  return EPLayout(mesh, tokens)


def receive_capacity(tokens_per_shard: int, k: int, experts_per_shard: int, shards: int,
                     capacity_factor: float | None = None) -> int:
  """Rows one shard receives per exchange round.

  capacity_factor None: the dropless worst case S * n * min(K, El) (one round always suffices).
  Otherwise capacity_factor * n * K (the average load, n*K, times the factor) rounded up to a
  multiple of 8, at most the worst case.
  """
  worst = shards * tokens_per_shard * min(k, experts_per_shard)
  if capacity_factor is None:
    return worst
  if not capacity_factor > 0:
    raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
  cap = math.ceil(capacity_factor * tokens_per_shard * k)
  return max(1, min(worst, -(-cap // _ROW_ALIGN) * _ROW_ALIGN))


def max_rounds(tokens_per_shard: int, k: int, experts_per_shard: int, shards: int,
               capacity: int) -> int:
  """Static bound on exchange rounds: ceil(worst-case receive rows / capacity)."""
  return -(-receive_capacity(tokens_per_shard, k, experts_per_shard, shards) // capacity)


# The rounds loop keeps about this many rounds' buffers live (the first round's residuals, the
# loop's forward and its rematerialised backward; measured with XLA:TPU's memory_analysis), so
# it only saves memory when the worst case needs more rounds than this.
LOOP_COST_ROUNDS = 4


def exchange_rounds(tokens_per_shard: int, k: int, experts_per_shard: int, shards: int,
                    capacity_factor: float | None) -> tuple[int, int, int]:
  """(nominal, capacity, rounds): `nominal` = receive_capacity(..., capacity_factor), the load
  beyond which rows count as overflow; `capacity` the receive rows per round and `rounds` the
  static bound on rounds. When the worst case needs fewer than LOOP_COST_ROUNDS rounds of
  `nominal` rows, one worst-case round is smaller than the loop: capacity = worst, rounds = 1."""
  nominal = receive_capacity(tokens_per_shard, k, experts_per_shard, shards, capacity_factor)
  rounds = max_rounds(tokens_per_shard, k, experts_per_shard, shards, nominal)
  if rounds < LOOP_COST_ROUNDS:
    return nominal, receive_capacity(tokens_per_shard, k, experts_per_shard, shards), 1
  return nominal, nominal, rounds


def sort_by_destination(x: jax.Array, experts: jax.Array, num_experts: int):
  """x [n, D], experts [n, K] global ids -> (xs [n*K, D] sorted by expert, dest [n*K] expert id
  of each sorted row, order [n*K] (index of each sorted row in the flattened pair list),
  expert_counts [E] int32 rows per expert). Also the single-program MoE's `moe.permute`."""
  K = experts.shape[1]
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  counts = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  return x[order // K], flat[order], order, counts


def _exclusive_cumsum(a, axis=0):
  return jnp.cumsum(a, axis=axis) - a


@dataclasses.dataclass(frozen=True)
class RoundPlan:
  """Offsets/sizes of one exchange round for one shard (all int32 [S]). Chunks are laid out in
  source order in each receiver's buffer; sizes are 0 for pairs with nothing in this round."""

  start: jax.Array          # the round's first position in each receiver's row list (r * R)
  send_offsets: jax.Array   # where my chunk for shard j starts in my sorted rows
  send_sizes: jax.Array     # rows I send to shard j this round
  remote_offsets: jax.Array # where my chunk lands in shard j's receive buffer
  recv_offsets: jax.Array   # where shard i's chunk sits in my receive buffer
  recv_sizes: jax.Array     # rows I receive from shard i this round
  back_offsets: jax.Array   # where my returned chunk goes in shard i's sorted rows


def round_plan(counts: jax.Array, me, r, capacity: int) -> RoundPlan:
  """From the all-gathered send counts [S (src), S (dst)], my index and the round r: the offsets.

  Receiver j's rows, in source order, occupy [into[i, j], into[i, j] + counts[i, j]) for source
  i; round r moves the window [r*R, (r+1)*R) of that list (R = capacity).
  """
  counts = counts.astype(jnp.int32)
  into = _exclusive_cumsum(counts, 0)   # [i, j]: offset of i's chunk in j's list
  outof = _exclusive_cumsum(counts, 1)  # [i, j]: offset of i's chunk for j in i's sorted rows
  start = jnp.asarray(r, jnp.int32) * capacity
  lo = jnp.clip(start - into, 0, counts)
  hi = jnp.clip(start + capacity - into, 0, counts)
  size = hi - lo
  live = size > 0
  dst = jnp.where(live, into + lo - start, 0)    # offset inside the receiver's round buffer
  src = jnp.where(live, outof + lo, 0)           # offset inside the sender's sorted rows
  return RoundPlan(start=start, send_offsets=src[me], send_sizes=size[me], remote_offsets=dst[me],
                   recv_offsets=dst[:, me], recv_sizes=size[:, me], back_offsets=src[:, me])


def received_expert_ids(position, valid, local_counts):
  """Local expert id of received rows, computed by the receiver (no id exchange).

  position [R] int32: each row's place in my full row list (source-major, then by local expert,
  as the senders sorted them); valid [R] bool; local_counts [S (src), El] rows per (source,
  local expert) -> ids [R] int32, El (the padding group) where not valid.
  """
  El = local_counts.shape[1]
  ends = jnp.cumsum(local_counts.reshape(-1))  # [S*El] end of each (source, expert) segment
  seg = jnp.searchsorted(ends, position, side="right").astype(jnp.int32)
  return jnp.where(valid, seg % El, El)


def local_experts(recv_x, recv_ids, num_local: int, ffn: FFN, params):
  """recv_x [R, D] with local expert ids [R] (num_local = padding) -> ys [R, D] same order."""
  order = jnp.argsort(recv_ids, stable=True)
  sizes = jnp.bincount(recv_ids, length=num_local + 1)[:num_local].astype(jnp.int32)
  ys = ffn(recv_x[order], sizes, *params)  # rows past sum(sizes): padding
  return jnp.zeros_like(ys).at[order].set(ys, unique_indices=True)


def ragged_round(xs, plan: RoundPlan, local_counts, capacity: int, ffn: FFN,
                 params) -> jax.Array:
  """One exact-size exchange round: xs [n*K, D] sorted by destination -> [n*K, D], the expert
  outputs of this round's rows in place, zeros elsewhere. local_counts [S, El]: rows each
  source sends me per local expert (over all rounds)."""
  recv_x = jax.lax.ragged_all_to_all(xs, jnp.zeros((capacity, xs.shape[1]), xs.dtype),
                                     plan.send_offsets, plan.send_sizes, plan.remote_offsets,
                                     plan.recv_sizes, axis_name=EXPERT)
  q = jnp.arange(capacity, dtype=jnp.int32)
  ids = received_expert_ids(plan.start + q, q < plan.recv_sizes.sum(), local_counts)
  ys = local_experts(recv_x, ids, local_counts.shape[1], ffn, params)
  out = jnp.zeros(xs.shape, ys.dtype)
  return jax.lax.ragged_all_to_all(ys, out, plan.recv_offsets, plan.recv_sizes, plan.back_offsets,
                                   plan.send_sizes, axis_name=EXPERT)


def padded_round(xs, dest, plan: RoundPlan, local_counts, slot_rows: int, ffn: FFN,
                 params) -> jax.Array:
  """One fixed-slot exchange round (S slots of `slot_rows` per shard; any backend): the same
  rows and result as `ragged_round`. dest [n*K]: the destination shard of each sorted row."""
  S = plan.send_sizes.shape[0]
  pos = jnp.arange(xs.shape[0], dtype=jnp.int32) - plan.send_offsets[dest]  # place in this round
  mine = (pos >= 0) & (pos < plan.send_sizes[dest])
  slot = jnp.where(mine, dest * slot_rows + pos, S * slot_rows)       # out of range: dropped
  buf = jnp.zeros((S * slot_rows, xs.shape[1]), xs.dtype).at[slot].set(xs, mode="drop")
  recv_x = jax.lax.all_to_all(buf, EXPERT, 0, 0, tiled=True)  # [S (source), slot_rows] rows
  q = jnp.arange(slot_rows, dtype=jnp.int32)[None, :]
  position = plan.start + plan.recv_offsets[:, None] + q       # [S, slot] place in my list
  ids = received_expert_ids(position.reshape(-1), (q < plan.recv_sizes[:, None]).reshape(-1),
                            local_counts)
  ys = local_experts(recv_x, ids, local_counts.shape[1], ffn, params)
  back = jax.lax.all_to_all(ys, EXPERT, 0, 0, tiled=True)
  got = back.at[jnp.minimum(slot, S * slot_rows - 1)].get(mode="clip")
  return jnp.where(mine[:, None], got, jnp.zeros_like(got))


def combine(ys_sorted, order, weights):
  """ys_sorted [n*K, D] (expert-sorted pairs), order [n*K], weights [n, K] -> [n, D] float32:
  sum_k w_k y_k. Also the single-program MoE's `moe.unpermute`."""
  n, K = weights.shape
  y = jnp.zeros(ys_sorted.shape, jnp.float32).at[order].set(ys_sorted.astype(jnp.float32),
                                                            unique_indices=True)
  return jnp.einsum("nkd,nk->nd", y.reshape(n, K, -1), weights.astype(jnp.float32))


def _ep_shard(x, experts, weights, params, layer=None, *, ffn: FFN, shards: int,
              exchange: Exchange, capacity_factor: float | None, sync_axes: tuple[str, ...]):
  """Per-shard body: x [n, D], experts/weights [n, K], params (w_gate, w_up, w_down) with El
  local experts (layer stacks [L, El, ...] when `layer` is given, passed on to `ffn`) ->
  (y [n, D] float32, overflow [1] int32: rows this shard received beyond the nominal
  capacity)."""
  n, K = experts.shape
  El = jax.tree.leaves(params)[0].shape[0 if layer is None else 1]
  if layer is not None:
    ffn = functools.partial(ffn, layer=layer)
  xs, e_sorted, order, expert_counts = sort_by_destination(x, experts, El * shards)
  by_expert = jax.lax.all_gather(expert_counts, EXPERT)       # [S src, E]
  me = jax.lax.axis_index(EXPERT)
  counts = by_expert.reshape(shards, shards, El).sum(-1)      # [S src, S dst]
  local_counts = jax.lax.dynamic_slice_in_dim(by_expert, me * El, El, axis=1)  # [S src, El]
  nominal, cap, rounds = exchange_rounds(n, K, El, shards, capacity_factor)
  if exchange is Exchange.RAGGED:
    def one_round(r, xs, params):
      return ragged_round(xs, round_plan(counts, me, r, cap), local_counts, cap, ffn, params)
  else:
    # one source sends a receiver at most its own worst case (the one-shard bound) per round
    slot = min(cap, receive_capacity(n, K, El, 1))
    dest = e_sorted // El

    def one_round(r, xs, params):
      return padded_round(xs, dest, round_plan(counts, me, r, cap), local_counts, slot, ffn,
                          params)

  ys = one_round(0, xs, params)
  totals = counts.sum(0)  # [S] rows each receiver gets in all
  if rounds > 1:
    need = -(-jnp.max(totals) // cap)  # the same on every shard of this expert group
    need = jax.lax.pmax(need, sync_axes) if sync_axes else need  # one branch for all devices

    # Remat around the cond: the scan then keeps only its loop-invariant inputs as residuals
    # (a cond's own residuals would be stacked per round).
    # The accumulator goes through the cond, so a skipped round returns it as it is: no zero
    # buffer written and added (a skipped round moves nothing). Its backward needs no copy of
    # the accumulator (the round's output is added linearly), so the scan saves none per round.
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def extra(acc, r, xs, params):
      add = lambda acc, r, xs, p: acc + one_round(r, xs, p)
      keep = lambda acc, r, xs, p: acc
      return jax.lax.cond(r < need, add, keep, acc, r, xs, params)

    def body(acc, r):
      return extra(acc, r, xs, params), None

    # Not carried from the first round: its backward need not wait for the loop's, so the
    # scheduler can keep the first round's residuals and the loop's buffers apart in time.
    more, _ = jax.lax.scan(body, jnp.zeros_like(ys), jnp.arange(1, rounds, dtype=jnp.int32))
    ys = ys + more
  overflow = jnp.maximum(totals[me] - nominal, 0).astype(jnp.int32)
  return combine(ys, order, weights), overflow[None]


def expert_parallel_ffn(x: jax.Array, experts: jax.Array, weights: jax.Array, w_gate: Any,
                        w_up: Any, w_down: Any, *, ffn: FFN, layout: EPLayout | None = None,
                        exchange: Exchange = Exchange.AUTO, capacity_factor: float | None = None,
                        return_overflow: bool = False, layer=None):
  """Dropless routed-expert output sum_k w_k Expert_{e_k}(x) with experts split over `expert`.

  x [N, D] (compute dtype); experts [N, K] int32 global ids; weights [N, K] float32;
  w_gate/w_up [E, D, F], w_down [E, F, D] (or pytrees whose leaves all lead with E, passed to
  `ffn` as they are, e.g. FP8 values + scales); ffn(xs [M, D], group_sizes [El], w_gate, w_up,
  w_down) -> [M, D] is the local grouped SwiGLU. capacity_factor: receive rows per exchange
  round = factor x the average load (None: the dropless worst case, one round); overflow goes in
  further rounds, never dropped (see `exchange_rounds`). Returns y [N, D] float32, and with
  return_overflow also the overflow: (token, expert) rows beyond capacity_factor x the average
  load of their receiving shard (int32 scalar, summed over shards; 0 when the factor is None).
  N need not divide the shard count (zero-weight padding tokens are appended and dropped).
  Call under jit with the mesh set (`jax.set_mesh`), or pass `layout`.
  layer: None, or an int (may be traced, inference): the weights are layer stacks whose leaves
  lead with [L, E] (split over `expert` on E), and `ffn` is called with `layer=layer` to read
  that layer of its local [L, El, ...] stacks in place.
  """
  layout = layout or ep_layout()
  if layout is None:
    raise ValueError("expert_parallel_ffn needs a mesh with an 'expert' axis of size > 1 "
                     "(set it with jax.set_mesh(mesh))")
  params = (w_gate, w_up, w_down)
  e_dim = 0 if layer is None else 1
  E, S = jax.tree.leaves(w_gate)[0].shape[e_dim], layout.num_shards
  if E % S:
    raise ValueError(f"n_routed_experts={E} is not divisible by the expert axis size {S}")
  for leaf in jax.tree.leaves(params):
    if leaf.shape[e_dim] != E:
      raise ValueError(f"every expert weight must have E={E} on axis {e_dim}, got a leaf "
                       f"{leaf.shape}")
  N, K = experts.shape
  pad = -N % layout.token_shards
  if pad:
    x = jnp.pad(x, ((0, pad), (0, 0)))
    experts = jnp.pad(experts, ((0, pad), (0, 0)))
    weights = jnp.pad(weights, ((0, pad), (0, 0)))
  tok = P(layout.token_axes)
  sync = tuple(a for a in layout.token_axes if a != EXPERT)
  body = functools.partial(_ep_shard, ffn=ffn, shards=S, exchange=exchange.resolve(layout.mesh),
                           capacity_factor=capacity_factor, sync_axes=sync)
  w_spec, extra = (P(EXPERT), ()) if layer is None else (P(None, EXPERT), (P(),))
  body = jax.shard_map(body, mesh=layout.mesh, in_specs=(tok, tok, tok, w_spec) + extra,
                       out_specs=(tok, tok), check_vma=False)
  args = () if layer is None else (jnp.asarray(layer, jnp.int32),)
  with jax.named_scope("expert_parallel"):
    y, overflow = body(x, experts, weights.astype(jnp.float32), params, *args)
  y = y[:N] if pad else y
  return (y, overflow.sum()) if return_overflow else y
