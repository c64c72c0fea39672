"""Expert parallelism for the routed experts, written with shard_map.

Einsum letters: N tokens, n tokens on one shard, K experts per token, D hidden, F expert width,
E routed experts, El = E / S experts per shard, S expert-axis size, R receive rows per round.

Layout inside the shard_map (mesh axes by their conventional names, see `sharding.mesh`):
  tokens  x [N, D], experts/weights [N, K]  split over every mesh axis of size > 1 (`tensor`
          included, last, so its split is a local slice of the data-parallel shard)
  experts w_gate/w_up [E, D, F], w_down [E, F, D] (or any pytree with a leading E axis, e.g. FP8
          values + block scales)  split over the expert axes only (the rules' `expert` entry:
          `expert` by default; wide expert parallelism, `sharding.wide_expert`: e.g. (fsdp,
          expert), whole experts on each device); GSPMD gathers the other dims (FSDP-style)
          before the shard_map and reduces the weight gradients after it, which the wide layout
          avoids (no other dim is split). "The expert axis" below: those axes together.
  No token buffer is ever all-reduced: every output row is computed whole on one shard, forward
  and backward (see "Why check_vma=False" below).
Per shard, as small pure functions:
  1. expert_sort: the n*K (token, expert) pairs sorted by expert id, hence by the shard owning
     the expert (shard s owns experts [s*El, (s+1)*El)), computed without a sort (per-token
     expert counts and a cumsum); rows per expert [E], all-gathered over `expert` ([S, E] int32:
     the only metadata exchanged).
  2. rounds: receiver j lists the rows bound for it in source order (T_j = sum_i counts[i, j]
     rows); round r moves that list's rows [r*R, (r+1)*R). R = capacity_factor * n*K (the average
     load times the factor, a multiple of 8), so one round suffices unless a shard is overloaded;
     the rest (the "overflow", counted) goes in further rounds, statically at most
     ceil(S*n*min(K, El) / R) (the dropless worst case), each under lax.cond in a scan (skipped
     when no shard of the step needs it), so memory stays ~R rows, not the worst case.
     Nothing is dropped. When the worst case is under LOOP_COST_ROUNDS rounds (few shards), one
     worst-case round is cheaper than the loop and is used instead (`exchange_rounds`).
  3. dispatch: all-to-all over `expert`. RAGGED (jax.lax.ragged_all_to_all; TPU and GPU) moves
     exactly the round's rows into an [R, D] buffer; PADDED (plain all_to_all; any backend,
     XLA:CPU has no ragged-all-to-all) sends S fixed slots of min(R, n*min(K, El)) rows.
  4. local_experts: each received row's place in the round's rows grouped by local expert
     follows from its place in the receiver's row list and the gathered counts (`round_groups`:
     no id exchange, no sort); rows gathered into that order, `ffn` (the model's grouped FFN, a
     grouped matmul; padding rows last, past the groups). With one local expert (wide expert
     parallelism) and the ragged exchange the received rows are already in that order: no
     gathers.
  5. return: the inverse all-to-all, back into the sender's sorted order (rows of other rounds 0).
  6. combine: un-sort (a gather) and sum_k w_k y_k in float32.
Gradient: a custom VJP around steps 2-6 (`_routed_ffn`). The backward sends the sorted rows of x
and of w * dy through the same rounds, the receiver recomputes its experts' forward and takes
their VJP; input-row gradients come back into one accumulator (the return exchange writes them in
place), expert-weight gradients are added into another (in place, inside the weight-gradient
kernel, when the model passes the FFN's own backward `ffn_vjp`), and a skipped round passes both
through untouched. Residuals: the inputs, the routing (int32) and the expert outputs [n*K, D].
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
from dsv3_jax.sharding.rules import ShardingRules, current_rules

__all__ = ["Exchange", "EPLayout", "ep_layout", "expert_parallel_ffn", "sort_by_destination",
           "RoundPlan", "round_plan", "round_groups", "expert_sort", "padded_round", "ragged_round",
           "local_experts", "combine", "inverse_permutation", "receive_capacity", "max_rounds", "exchange_rounds",
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
  """The mesh axes the expert-parallel shard_map uses (derived from the ambient mesh and the
  rules' `expert` entry)."""

  mesh: Mesh | AbstractMesh
  token_axes: tuple[str, ...]   # axes splitting the tokens: every axis of size > 1, tensor last
  expert_axes: tuple[str, ...] = (EXPERT,)  # axes splitting the routed experts (major first)

  @property
  def num_shards(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.expert_axes)

  @property
  def axis_name(self) -> str | tuple[str, ...]:
    """The collectives' axis name: one mesh axis, or a tuple (linearised major to minor, as
    the weights' PartitionSpec orders their expert shards)."""
    return self.expert_axes[0] if len(self.expert_axes) == 1 else self.expert_axes

  @property
  def token_shards(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.token_axes)


def ep_layout(mesh: Mesh | AbstractMesh | None = None,
              rules: ShardingRules | None = None) -> EPLayout | None:
  """The EP layout of `mesh` (default: the ambient mesh, `jax.set_mesh`) under `rules` (default:
  `current_rules()`): the experts are split over the mesh axes of the rules' `expert` entry
  (default `expert`; wide expert parallelism: e.g. (fsdp, expert), one expert per device).
  None when those axes have size 1 (then the MoE runs its single-program path under GSPMD).
  Raises ValueError when an expert axis is `tensor` (the token split's last, local axis)."""
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh is None or mesh.empty:
    return None
  sizes = mesh.shape
  rules = current_rules() if rules is None else rules
  experts = tuple(a for a in rules.mesh_axes("expert") if sizes.get(a, 1) > 1)
  if not experts:
    return None
  if TENSOR in experts:
    raise ValueError(f"sharding rules expert={rules.expert!r}: the routed experts cannot be "
                     f"split over the {TENSOR!r} axis (it splits each data shard's tokens)")
  tokens = tuple(a for a in mesh.axis_names if a != TENSOR and sizes[a] > 1)
  if sizes.get(TENSOR, 1) > 1:
    tokens += (TENSOR,)
  return EPLayout(mesh, tokens, experts)


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


def expert_sort(experts: jax.Array, num_experts: int):
  """The stable sort of the flattened (token, expert) pairs by expert id, without a sort.

  experts [n, K] int32 -> (order [n*K]: the pair index of each sorted row, i.e.
  argsort(experts.reshape(-1), stable=True); inv [n*K]: each pair's sorted position;
  counts [E] int32 pairs per expert). A pair's position is the rows of lower experts, plus the
  pairs of earlier tokens with its expert (a cumsum over tokens of per-token expert counts
  [n, E]), plus the earlier slots of its own token with the same expert (padding tokens repeat
  one expert). Sorting 32k-49k rows dominated TPU compile time; this is elementwise + cumsum.
  """
  n, K = experts.shape
  e = jnp.arange(num_experts, dtype=experts.dtype)
  per_token = (experts[:, :, None] == e).sum(1, dtype=jnp.int32)            # [n, E]
  counts = per_token.sum(0, dtype=jnp.int32)
  earlier = _exclusive_cumsum(per_token, 0)                                  # [n, E]
  k = jnp.arange(K)
  same = (experts[:, :, None] == experts[:, None, :]) & (k[None, None, :] < k[None, :, None])
  rank = jnp.take_along_axis(earlier, experts, axis=1) + same.sum(-1, dtype=jnp.int32)  # [n, K]
  inv = (_exclusive_cumsum(counts)[experts] + rank).reshape(-1).astype(jnp.int32)
  return inverse_permutation(inv), inv, counts


def sort_by_destination(x: jax.Array, experts: jax.Array, num_experts: int):
  """x [n, D], experts [n, K] global ids -> (xs [n*K, D] sorted by expert, dest [n*K] expert id
  of each sorted row, order [n*K] (index of each sorted row in the flattened pair list),
  expert_counts [E] int32 rows per expert). Also the single-program MoE's `moe.permute`."""
  K = experts.shape[1]
  order, _, counts = expert_sort(experts, num_experts)
  return x[order // K], experts.reshape(-1)[order], order, counts


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


def round_groups(position, valid, spill, local_counts, start, capacity: int):
  """Where the receiver puts each row of a round to group them by local expert (no sort).

  position [R] int32: each received row's place in my full row list (source-major, then by
  local expert, as the senders sorted them); valid [R] bool; spill [R]: each invalid row's rank
  among the invalid rows; local_counts [S (src), El] rows per (source, local expert) over all
  rounds; the round holds the list's window [start, start + capacity).
  -> (dest [R]: each row's place in the grouped order, the stable sort by local expert with the
  padding rows last (in received order); sizes [El] int32 rows per local expert this round).
  The ids are never exchanged: a row's (source, expert) segment follows from its position.
  """
  S, El = local_counts.shape
  size = local_counts.reshape(-1)
  seg_start = _exclusive_cumsum(size)
  lo = jnp.clip(start - seg_start, 0, size)              # [S*El] segment rows before the window
  win = jnp.clip(start + capacity - seg_start, 0, size) - lo  # segment rows in the window
  group = _exclusive_cumsum(win.reshape(S, El).T.reshape(-1)).reshape(El, S)  # [e, i] offsets
  seg = jnp.searchsorted(seg_start + size, position, side="right").astype(jnp.int32)
  seg = jnp.minimum(seg, S * El - 1)
  t = position - seg_start[seg] - lo[seg]                 # rank inside the segment's window part
  dest = jnp.where(valid, group[seg % El, seg // El] + t, win.sum() + spill)
  return dest.astype(jnp.int32), win.reshape(S, El).sum(0).astype(jnp.int32)


def local_experts(recv, dest, sizes, local_fn):
  """recv: a tuple of [R, Di] received rows; dest [R] / sizes [El] from `round_groups`;
  local_fn(rows grouped by local expert (tuple), group_sizes [El]) -> (out [R, D], aux)
  -> (out in the received order, aux). Both permutations are row gathers."""
  order = inverse_permutation(dest)
  out, aux = local_fn(tuple(a[order] for a in recv), sizes)  # rows past sum(sizes): padding
  return out[dest], aux


def ragged_round(sends, acc, plan: RoundPlan, local_counts, capacity: int, local_fn,
                 axis_name=EXPERT):
  """One exact-size exchange round. sends: tuple of [n*K, Di] arrays sorted by destination, sent
  to the shards owning their experts; there local_fn (see `local_experts`) maps them to [., D]
  rows, which come back written into acc [n*K, D] at this round's rows (the other rows kept:
  ragged_all_to_all writes only what it receives). local_counts [S, El]: rows each source sends
  me per local expert (over all rounds); axis_name: the expert mesh axis (or a tuple of them).
  -> (acc, aux)."""
  recv = tuple(jax.lax.ragged_all_to_all(s, jnp.zeros((capacity, s.shape[1]), s.dtype),
                                         plan.send_offsets, plan.send_sizes, plan.remote_offsets,
                                         plan.recv_sizes, axis_name=axis_name) for s in sends)
  q = jnp.arange(capacity, dtype=jnp.int32)
  total = plan.recv_sizes.sum()  # the round's rows arrive packed at the front
  if local_counts.shape[1] == 1:
    # One local expert (wide expert parallelism): the rows, packed in source order with the
    # padding last, are already grouped (`round_groups` would return the identity), so no
    # [R, D] gather of the received rows and none of the outputs.
    out, aux = local_fn(recv, total.astype(jnp.int32)[None])
  else:
    dest, sizes = round_groups(plan.start + q, q < total, q - total, local_counts, plan.start,
                               capacity)
    out, aux = local_experts(recv, dest, sizes, local_fn)
  acc = jax.lax.ragged_all_to_all(out, acc, plan.recv_offsets, plan.recv_sizes, plan.back_offsets,
                                  plan.send_sizes, axis_name=axis_name)
  return acc, aux


def padded_round(sends, acc, dest, plan: RoundPlan, local_counts, capacity: int, slot_rows: int,
                 local_fn, axis_name=EXPERT):
  """One fixed-slot exchange round (S slots of `slot_rows` per shard; any backend): the same
  rows and result as `ragged_round`. dest [n*K]: the destination shard of each sorted row."""
  S = plan.send_sizes.shape[0]
  pos = jnp.arange(acc.shape[0], dtype=jnp.int32) - plan.send_offsets[dest]  # place in round
  mine = (pos >= 0) & (pos < plan.send_sizes[dest])
  slot = jnp.where(mine, dest * slot_rows + pos, S * slot_rows)       # out of range: dropped

  def send(s):
    buf = jnp.zeros((S * slot_rows, s.shape[1]), s.dtype).at[slot].set(s, mode="drop")
    return jax.lax.all_to_all(buf, axis_name, 0, 0, tiled=True)  # [S (source), slot_rows] rows

  q = jnp.arange(slot_rows, dtype=jnp.int32)[None, :]
  position = plan.start + plan.recv_offsets[:, None] + q       # [S, slot] place in my list
  valid = q < plan.recv_sizes[:, None]
  before = (_exclusive_cumsum(plan.recv_sizes) + plan.recv_sizes)[:, None]  # valid rows through i
  spill = jnp.arange(S * slot_rows, dtype=jnp.int32).reshape(S, slot_rows) - before
  dest, sizes = round_groups(position.reshape(-1), valid.reshape(-1), spill.reshape(-1),
                             local_counts, plan.start, capacity)
  out, aux = local_experts(tuple(send(s) for s in sends), dest, sizes, local_fn)
  back = jax.lax.all_to_all(out, axis_name, 0, 0, tiled=True)
  got = back.at[jnp.minimum(slot, S * slot_rows - 1)].get(mode="clip")
  return jnp.where(mine[:, None], got, acc), aux


def inverse_permutation(order: jax.Array) -> jax.Array:
  """order [M] a permutation -> inv [M] with inv[order[j]] = j (an int32 scatter)."""
  return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype),
                                             unique_indices=True)


def combine(ys_sorted, order, weights):
  """ys_sorted [n*K, D] (expert-sorted pairs), order [n*K], weights [n, K] -> [n, D] float32:
  sum_k w_k y_k. Also the single-program MoE's `moe.unpermute`. The un-sort is a row gather
  (XLA fuses it into the weighted sum: no [n*K, D] float32 buffer)."""
  return _unsort_sum(ys_sorted, inverse_permutation(order), weights)


def _unsort_sum(ys_sorted, inv, weights):
  """combine with inv [n*K] (each pair's sorted row) in place of order."""
  n, K = weights.shape
  y = ys_sorted[inv].astype(jnp.float32).reshape(n, K, -1)
  return (y * weights.astype(jnp.float32)[..., None]).sum(1)


def _sum_over_k(rows, inv):
  """rows [n*K, D], inv [n, K] (each pair's row) -> sum_k rows[inv[:, k]] [n, D] float32, one
  [n, D] gather per k: written as one gather of all n*K rows, XLA:TPU materialised an
  [n*K, D] float32 buffer (0.9 GiB per device at DeepSeek-V3's 4096 x 8 rows of 7168) in the
  expert-parallel backward. (The forward's weighted sum, `_unsort_sum`, is fused as it is.)"""
  out = None
  for k in range(inv.shape[1]):
    y = rows[inv[:, k]].astype(jnp.float32)
    out = y if out is None else out + y
  return out


@dataclasses.dataclass(frozen=True)
class _Exchange:
  """One shard's exchange: how (`exchange`, static sizes) and the routing (int arrays, built
  inside the traced function that uses them: a custom VJP's rules must not close over them)."""

  exchange: Exchange
  capacity: int             # receive rows per round
  rounds: int               # static bound on rounds
  slot: int                 # PADDED: rows per (source, receiver) slot
  sync_axes: tuple[str, ...]
  axis_name: Any = EXPERT   # the expert mesh axis, or a tuple of them
  counts: Any = None        # [S src, S dst] rows
  local_counts: Any = None  # [S src, El] rows each source sends me per local expert
  dest: Any = None          # [n*K] destination shard of each sorted row

  def routed(self, dest, counts, local_counts) -> "_Exchange":
    return dataclasses.replace(self, dest=dest, counts=counts, local_counts=local_counts)

  def round(self, r, sends, acc, local_fn, aux=None):
    plan = round_plan(self.counts, jax.lax.axis_index(self.axis_name), r, self.capacity)
    fn = lambda rows, sizes: local_fn(rows, sizes, aux)  # noqa: E731
    if self.exchange is Exchange.RAGGED:
      return ragged_round(sends, acc, plan, self.local_counts, self.capacity, fn, self.axis_name)
    return padded_round(sends, acc, self.dest, plan, self.local_counts, self.capacity, self.slot,
                        fn, self.axis_name)

  def run(self, sends, out_dtype, local_fn):
    """Every round: -> (acc [n*K, D] the rows local_fn computed for each sorted row, aux).
    local_fn(rows, sizes, aux) -> (out, aux'): aux is None in the first round, then the previous
    rounds' aux, which local_fn accumulates into (e.g. weight gradients added in place). Rounds
    past the first run under lax.cond in a scan, skipped when no shard of the step needs them;
    acc and aux pass through a skipped round untouched (no zero buffers) and a round that runs
    writes its rows into acc in place."""
    rows = sends[0].shape[0]
    acc, aux = self.round(0, sends, jnp.zeros((rows, sends[0].shape[1]), out_dtype), local_fn)
    if self.rounds == 1:
      return acc, aux
    need = -(-jnp.max(self.counts.sum(0)) // self.capacity)  # the same on every shard of a group
    need = jax.lax.pmax(need, self.sync_axes) if self.sync_axes else need  # one branch for all

    def step(carry, r):
      def run_round(carry):
        acc, aux = carry
        return self.round(r, sends, acc, local_fn, aux)
      return jax.lax.cond(r < need, run_round, lambda carry: carry, carry), None

    (acc, aux), _ = jax.lax.scan(step, (acc, aux), jnp.arange(1, self.rounds, dtype=jnp.int32))
    return acc, aux


def _routed_ffn(ffn: FFN, how: _Exchange, custom_vjp: bool = True, ffn_vjp=None):
  """The custom-VJP core of one shard: f(x [n, D], weights [n, K] f32, params, route) -> y [n, D]
  float32; route = (order [n*K] the expert sort of the flattened pairs, inv [n*K] its inverse,
  dest [n*K] destination shard of each sorted pair, counts [S, S], local_counts [S, El]), int32,
  no gradient.

  Forward: gather x into the sorted pair rows, the exchange rounds (`_Exchange.run`), combine.
  Residuals: the inputs and the expert outputs ys [n*K, D] (compute dtype). Backward, per round:
  the sorted rows of x (re-gathered) and of the output cotangent w * dy go out together, the
  receiver recomputes its experts' forward and takes their VJP (input rows back into one
  [n*K, D] accumulator, expert-weight gradients added into one accumulator); then the un-sort
  of the input rows (a gather summed over K) and the router-weight gradient <dy, y_k>. Nothing
  is carried per round but the two accumulators, and no zero weight gradient is built.
  ffn_vjp: None (jax's VJP of `ffn`, weight gradients of later rounds added to the carried
  ones), or the FFN's own backward (see `expert_parallel_ffn`), which accumulates them in place."""

  def primal(x, weights, params, route):
    return fwd(x, weights, params, route)[0]

  def fwd(x, weights, params, route):
    (order, inv), K = route[:2], weights.shape[1]
    ys, _ = how.routed(*route[2:]).run(
        (x[order // K],), x.dtype, lambda rows, sizes, _: (ffn(rows[0], sizes, *params), None))
    return _unsort_sum(ys, inv, weights), (x, weights, params, route, ys)

  def bwd(res, dy):
    # No optimization barrier on the residuals: one kept the backward's rounds apart from the
    # rematerialised forward's, but also kept XLA from sharing the forward's gate/up grouped
    # matmuls with expert_vjp's (5-layer 671B plan on v5p-256: 1.32x -> 1.28x flops, peak
    # 14.99 -> 14.45 GiB without it).
    x, weights, params, route, ys = res
    (order, inv), (n, K) = route[:2], weights.shape
    inv = inv.reshape(n, K)
    dweights = jnp.stack([(ys[inv[:, k]].astype(jnp.float32) * dy).sum(-1) for k in range(K)],
                         axis=1)                                               # [n, K]
    token = order // K
    # w * dy rounded to the compute dtype per (token, k), then sorted: a gather of compute-dtype
    # rows (gathering the float32 dy first made XLA:TPU materialise two f32 [n*K, D] buffers,
    # 1.75 GiB per device at 671B); the same values as rounding after the gather.
    dys = (weights[:, :, None] * dy[:, None, :]).astype(ys.dtype).reshape(n * K, -1)[order]
    # The router-weight gradient is the expert outputs' last use: taking it before the rounds
    # frees ys [n*K, D] (XLA:TPU had scheduled it after them, holding ys through the backward).
    dweights, dys = jax.lax.optimization_barrier((dweights, dys))

    def expert_vjp(rows, sizes, acc):
      xr, dyr = rows
      if ffn_vjp is not None:
        return ffn_vjp(xr, dyr, sizes, *params, acc=acc)
      _, vjp = jax.vjp(lambda xr, p: ffn(xr, sizes, *p), xr, params)
      dxr, dp = vjp(dyr)
      return dxr, dp if acc is None else jax.tree.map(jnp.add, acc, dp)

    dxs, dparams = how.routed(*route[2:]).run((x[token], dys), x.dtype, expert_vjp)
    dx = _sum_over_k(dxs, inv).astype(x.dtype)
    return dx, dweights.astype(weights.dtype), dparams, None

  if not custom_vjp:  # jax's autodiff of the same forward (tests compare the two)
    return primal
  f = jax.custom_vjp(primal)
  f.defvjp(fwd, bwd)
  return f


def _ep_shard(x, experts, weights, params, layer=None, *, ffn: FFN, shards: int,
              exchange: Exchange, capacity_factor: float | None, sync_axes: tuple[str, ...],
              axis_name=EXPERT, custom_vjp: bool = True, ffn_vjp=None):
  """Per-shard body: x [n, D], experts/weights [n, K], params (w_gate, w_up, w_down) with El
  local experts (layer stacks [L, El, ...] when `layer` is given, passed on to `ffn`) ->
  (y [n, D] float32, overflow [1] int32: rows this shard received beyond the nominal
  capacity). custom_vjp False: jax differentiates the forward itself (for tests)."""
  n, K = experts.shape
  El = jax.tree.leaves(params)[0].shape[0 if layer is None else 1]
  if layer is not None:
    ffn = functools.partial(ffn, layer=layer)
  order, inv, expert_counts = expert_sort(experts, El * shards)
  by_expert = jax.lax.all_gather(expert_counts, axis_name)    # [S src, E]
  me = jax.lax.axis_index(axis_name)
  counts = by_expert.reshape(shards, shards, El).sum(-1)      # [S src, S dst]
  local_counts = jax.lax.dynamic_slice_in_dim(by_expert, me * El, El, axis=1)  # [S src, El]
  nominal, cap, rounds = exchange_rounds(n, K, El, shards, capacity_factor)
  # one source sends a receiver at most its own worst case (the one-shard bound) per round
  slot = min(cap, receive_capacity(n, K, El, 1))
  how = _Exchange(exchange, cap, rounds, slot, sync_axes, axis_name)
  route = (order, inv, experts.reshape(-1)[order] // El, counts, local_counts)
  y = _routed_ffn(ffn, how, custom_vjp, ffn_vjp if layer is None else None)(x, weights, params,
                                                                            route)
  overflow = jnp.maximum(counts.sum(0)[me] - nominal, 0).astype(jnp.int32)
  return y, overflow[None]


def expert_parallel_ffn(x: jax.Array, experts: jax.Array, weights: jax.Array, w_gate: Any,
                        w_up: Any, w_down: Any, *, ffn: FFN, layout: EPLayout | None = None,
                        exchange: Exchange = Exchange.AUTO, capacity_factor: float | None = None,
                        return_overflow: bool = False, layer=None, ffn_vjp=None):
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
  ffn_vjp: None (the backward takes jax's VJP of `ffn`), or the grouped FFN's own backward
  ffn_vjp(xs [M, D], dys [M, D], group_sizes [El], w_gate, w_up, w_down, acc=None) ->
  (dxs [M, D], (dw_gate, dw_up, dw_down)) with acc None or earlier rounds' weight gradients to
  add the new ones to (e.g. `moe.grouped_ffn_vjp`, which writes them in place).
  """
  layout = layout or ep_layout()
  if layout is None:
    raise ValueError("expert_parallel_ffn needs a mesh whose expert axes (the rules' `expert` "
                     "entry) have size > 1 (set it with jax.set_mesh(mesh))")
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
  sync = tuple(a for a in layout.token_axes if a not in layout.expert_axes)
  body = functools.partial(_ep_shard, ffn=ffn, shards=S, exchange=exchange.resolve(layout.mesh),
                           capacity_factor=capacity_factor, sync_axes=sync,
                           axis_name=layout.axis_name, ffn_vjp=ffn_vjp)
  e_spec = layout.axis_name
  w_spec, extra = (P(e_spec), ()) if layer is None else (P(None, e_spec), (P(),))
  body = jax.shard_map(body, mesh=layout.mesh, in_specs=(tok, tok, tok, w_spec) + extra,
                       out_specs=(tok, tok), check_vma=False)
  args = () if layer is None else (jnp.asarray(layer, jnp.int32),)
  with jax.named_scope("expert_parallel"):
    y, overflow = body(x, experts, weights.astype(jnp.float32), params, *args)
  y = y[:N] if pad else y
  return (y, overflow.sum()) if return_overflow else y
