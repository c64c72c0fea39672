"""Expert-parallel MoE (shard_map) against a per-token numpy oracle, its collectives' sizes in the
compiled HLO, and the ragged all-to-all offset plan against a simulated exchange.

Oracle: y_n = sum_k w_nk * down(silu(x_n gate_e) * (x_n up_e)), e = experts[n, k], in float64.
Tolerance (float32, matmul precision "highest"): 1e-5 absolute on outputs of size ~1e-1.
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dsv3_jax.moe import grouped_ffn
from dsv3_jax.sharding import Exchange, ep_layout, expert_parallel_ffn, make_mesh
from dsv3_jax.sharding import expert_parallel as ep
from tests.utils import FAST_COMPILE, assert_close, hlo_collectives

E, K, D, F = 32, 2, 40, 24   # E/K = 16 > 8 shards: the padded buffer is smaller than [n, E, D]
FFN = functools.partial(grouped_ffn, backend="reference")


def _case(n_tokens, seed=0):
  r = np.random.default_rng(seed)
  x = r.standard_normal((n_tokens, D)).astype(np.float32)
  experts = np.stack([r.choice(E, K, replace=False) for _ in range(n_tokens)]).astype(np.int32)
  weights = r.uniform(0.1, 1.0, (n_tokens, K)).astype(np.float32)
  wg, wu = (0.2 * r.standard_normal((E, D, F)).astype(np.float32) for _ in range(2))
  wd = (0.2 * r.standard_normal((E, F, D))).astype(np.float32)
  return x, experts, weights, wg, wu, wd


def check_ffn_grads(g, g_ref, what: str) -> None:
  """Gradients w.r.t. (x, routing weights, w_gate, w_up, w_down) of an expert-parallel FFN
  against the single-program ones: atol 1e-5 + rtol 1e-4 (float32 sums reordered by the
  exchange), each reference gradient non-trivial (max |.| > 1e-3) so the check cannot pass
  vacuously."""
  for a, b, name in zip(g, g_ref, ("x", "weights", "w_gate", "w_up", "w_down")):
    assert np.abs(b).max() > 1e-3
    assert_close(a, b, atol=1e-5, rtol=1e-4, what=f"{what} grad {name}")


def _oracle(x, experts, weights, wg, wu, wd):
  x, wg, wu, wd = (a.astype(np.float64) for a in (x, wg, wu, wd))
  y = np.zeros_like(x)
  for n in range(x.shape[0]):
    for k in range(experts.shape[1]):
      e = experts[n, k]
      g, u = x[n] @ wg[e], x[n] @ wu[e]
      y[n] += weights[n, k] * ((g / (1 + np.exp(-g)) * u) @ wd[e])
  return y


def _skewed(n_tokens, seed=1):
  """Every token's K experts among 0..3: all rows go to expert shard 0 (E/S >= 4 here)."""
  r = np.random.default_rng(seed)
  return np.stack([r.choice(4, K, replace=False) for _ in range(n_tokens)]).astype(np.int32)


def _loss(x, experts, weights, wg, wu, wd, capacity_factor=None):
  y, overflow = expert_parallel_ffn(x, experts, weights, wg, wu, wd, ffn=FFN,
                                    capacity_factor=capacity_factor, return_overflow=True)
  return jnp.sum(jnp.sin(y)), (y, overflow)


def _overflow_oracle(experts, shape, capacity):
  """numpy: per expert group (the shards sharing all non-expert coordinates), each receiver's
  rows beyond `capacity`, summed. Token shards are laid out in mesh-axis order, tensor last."""
  S = shape["expert"]
  axes = [a for a in shape if a != "tensor" and shape[a] > 1] + (["tensor"] if "tensor" in shape else [])
  sizes = [shape[a] for a in axes]
  n = experts.shape[0] // int(np.prod(sizes))
  total = 0
  coords = np.stack(np.unravel_index(np.arange(int(np.prod(sizes))), sizes), -1)
  groups = {}
  for shard, c in enumerate(coords):
    key = tuple(v for a, v in zip(axes, c) if a != "expert")
    groups.setdefault(key, []).append(experts[shard * n:(shard + 1) * n])
  for rows in groups.values():
    recv = np.bincount(np.concatenate(rows).ravel() // (E // S), minlength=S)
    total += int(np.maximum(recv - capacity, 0).sum())
  return total


@pytest.mark.parametrize("shape,n_tokens,skew,cf", [
    ({"expert": 8}, 96, False, None),               # dropless worst-case buffer, one round
    ({"expert": 8}, 96, False, 1.0),                # balanced, a few rows overflow
    ({"data": 2, "tensor": 2, "expert": 2}, 61, True, 0.5)])  # all rows to one shard: 4 rounds
def test_ep_matches_single_device(shape, n_tokens, skew, cf):
  """EP (padded exchange on CPU) against the single-program dropless MoE (permute -> grouped FFN
  -> unpermute, no mesh): forward exactly equal (every row is computed whole on one shard, the
  K-sum in the same order), gradients to 1e-5 (weight gradients are summed over shards in another
  order); forward also against the float64 numpy oracle; the overflow counter against numpy."""
  args = list(_case(n_tokens))
  if skew:
    args[1] = _skewed(n_tokens)
  mesh = make_mesh(shape)
  grad = jax.value_and_grad(functools.partial(_loss, capacity_factor=cf),
                            argnums=(0, 2, 3, 4, 5), has_aux=True)
  with jax.set_mesh(mesh):
    assert ep_layout() is not None
    compiled = jax.jit(grad, compiler_options=FAST_COMPILE).lower(*args).compile()
    (_, (y, overflow)), g = compiled(*args)
  # The only all-reduces: expert-weight gradients [El, ., .] over the data-like axes, scalars.
  for _, shapes, _ in hlo_collectives(compiled.as_text(), ops=("all-reduce",)):
    for _, dims in shapes:
      assert (len(dims) == 3 and dims[0] == E // shape["expert"]) or np.prod(dims) <= 64, shapes

  from dsv3_jax.moe import permute, unpermute

  def local_loss(x, experts, weights, wg, wu, wd):
    xs, order, sizes = permute(x, experts, E)
    y = unpermute(FFN(xs, sizes, wg, wu, wd), order, weights)
    return jnp.sum(jnp.sin(y)), y

  assert ep_layout() is None  # no ambient mesh: the single-program path
  (_, y_ref), g_ref = jax.jit(jax.value_and_grad(local_loss, argnums=(0, 2, 3, 4, 5), has_aux=True),
                              compiler_options=FAST_COMPILE)(*args)
  assert_close(y_ref, _oracle(*args), atol=1e-5, what="single-program forward")
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
  check_ffn_grads(g, g_ref, "EP")
  n = (n_tokens + (-n_tokens % 8)) // 8
  cap = ep.receive_capacity(n, K, E // shape["expert"], shape["expert"], cf)
  padded = np.concatenate([args[1], np.zeros((-n_tokens % 8, K), np.int32)])  # padding tokens
  want = _overflow_oracle(padded, shape, cap)
  assert int(overflow) == want
  if skew:  # closed form: each group's 2n tokens send all 2n*K rows to shard 0
    assert want == 4 * max(2 * n * K - cap, 0) > 0
    assert ep.exchange_rounds(n, K, E // 2, 2, cf) == (cap, cap, 4)  # the rounds loop runs
  elif cf is None:
    assert want == 0


def test_all_to_all_carries_only_token_rows():
  """Compiled HLO on EP=8, capacity factor 1: every all-to-all moves S slots of min(R, n*min(K,
  E/S)) token rows (R = the per-round receive capacity); only the [S, E] counts are gathered; no
  all-reduce
  carries token rows (only the weight gradients' reduction and scalars); no floating-point array
  anywhere has both an expert dim and a token dim (no dense [tokens, experts, hidden] tensors;
  the sort-free expert sort counts pairs per (token, expert) in small integer arrays)."""
  N, S = 96, 8
  n = N // S
  args = _case(N)
  mesh = make_mesh({"expert": S})
  with jax.set_mesh(mesh):
    hlo = jax.jit(jax.grad(lambda *a: _loss(*a, capacity_factor=1.0)[0], argnums=(0, 3)),
                  compiler_options=FAST_COMPILE).lower(*args).compile().as_text()
  cap = ep.receive_capacity(n, K, E // S, S, 1.0)
  slot = min(cap, n * min(K, E // S))
  assert cap == 24 and slot == 24 and ep.exchange_rounds(n, K, E // S, S, 1.0) == (24, 24, 8)
  colls = hlo_collectives(hlo)
  # rows out and back per round (the first, and the scan's), forward and backward; the receiver
  # derives the expert ids itself (no int32 exchange)
  assert len(colls) >= 8, colls
  for op, shapes, nbytes in colls:
    assert op == "all-to-all"
    assert shapes in ([("f32", (slot, D))] * S, [("f32", (S * slot, D))]), shapes
  for _, shapes, nbytes in hlo_collectives(hlo, ops=("all-gather",)):
    assert shapes[0][0] == "s32" and nbytes <= S * E * 4, shapes  # the [S, E] counts
  for _, shapes, _ in hlo_collectives(hlo, ops=("all-reduce",)):
    for _, dims in shapes:
      assert D not in dims or E // S in dims, f"token-sized all-reduce {shapes}"
  for dtype, dims in {(t, d) for t, d in re.findall(r"(\w+)\[([\d,]*)\]", hlo)}:
    ds = [int(v) for v in dims.split(",") if v]
    if E in ds and (n in ds or N in ds):
      assert dtype in ("s32", "pred") and np.prod(ds) <= n * K * E, f"token x expert {dtype}{ds}"


def test_round_plan_delivers_every_row_once_in_source_order():
  """numpy model of jax.lax.ragged_all_to_all's documented semantics driven by `round_plan` for
  skewed counts: over the rounds every row reaches its shard exactly once, each receiver's round
  buffer holds at most R rows, chunks in source order, and the return offsets put every row back
  where it came from."""
  S, El, n, K_, R = 4, 3, 5, 2, 4
  r = np.random.default_rng(3)
  experts = [np.sort(np.stack([r.choice(2 * El, K_, replace=False) for _ in range(n)]).ravel())
             for _ in range(S)]  # skewed: only shards 0 and 1 receive
  counts = np.stack([np.bincount(e // El, minlength=S) for e in experts])
  rounds = ep.max_rounds(n, K_, El, S, R)
  assert rounds == -(-S * n * min(K_, El) // R) and counts.sum(0).max() > R
  rows = [100 * i + np.arange(n * K_) for i in range(S)]  # row ids tag (source, position)
  got = [[] for _ in range(S)]
  back = [np.full((n * K_,), -1) for _ in range(S)]
  for rnd in range(rounds):
    plans = [ep.round_plan(jnp.asarray(counts), i, rnd, R) for i in range(S)]
    recv = [np.full((R,), -1) for _ in range(S)]
    for i in range(S):
      p = plans[i]
      for j in range(S):
        lo, sz, dst = int(p.send_offsets[j]), int(p.send_sizes[j]), int(p.remote_offsets[j])
        assert 0 <= dst and dst + sz <= R
        recv[j][dst:dst + sz] = rows[i][lo:lo + sz]
    for j in range(S):
      assert int(plans[j].recv_sizes.sum()) <= R
      got[j].extend(v for v in recv[j] if v >= 0)
      p = plans[j]
      for i in range(S):  # the return trip: ragged_round's second exchange
        lo, sz, dst = int(p.recv_offsets[i]), int(p.recv_sizes[i]), int(p.back_offsets[i])
        back[i][dst:dst + sz] = recv[j][lo:lo + sz]
  for j in range(S):
    want = np.concatenate([rows[i][experts[i] // El == j] for i in range(S)])
    np.testing.assert_array_equal(np.array(got[j], dtype=int).reshape(-1), want)
  for i in range(S):
    np.testing.assert_array_equal(back[i], rows[i])


def test_ragged_exchange_lowers_and_cpu_refuses_it():
  """The RAGGED path (TPU/GPU) traces forward+backward with overflow rounds and lowers to
  ragged_all_to_all; XLA:CPU cannot compile that op, so AUTO picks PADDED for a CPU mesh and an
  explicit RAGGED request raises."""
  args = _case(64)
  mesh = make_mesh({"expert": 8})
  layout = ep_layout(mesh)
  body = jax.shard_map(functools.partial(ep._ep_shard, ffn=FFN, shards=8,
                                         exchange=Exchange.RAGGED, capacity_factor=1.0,
                                         sync_axes=()),
                       mesh=mesh, in_specs=(P("expert"),) * 3 + (P("expert"),),
                       out_specs=P("expert"), check_vma=False)
  loss = lambda x, *w: body(x, args[1], args[2], w)[0].sum()
  text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(args[0], *args[3:]).as_text()
  # dispatch + return: the first round forward and transposed, and the rounds loop
  assert text.count("ragged_all_to_all") >= 6
  assert layout.token_axes == ("expert",)
  assert Exchange.AUTO.resolve(mesh) is Exchange.PADDED
  assert Exchange.AUTO.resolve(mesh.abstract_mesh) is Exchange.PADDED
  with pytest.raises(ValueError, match="ragged-all-to-all"):
    Exchange.RAGGED.resolve(mesh)


def test_exchange_rounds_bound_and_fallback():
  """R = factor x n*K rounded up to 8; rounds = ceil(worst / R); below LOOP_COST_ROUNDS rounds
  one worst-case round (S*n*min(K, El) rows) replaces the loop; None is always that round."""
  n, K_ = 4096, 8
  assert ep.exchange_rounds(n, K_, 16, 16, 1.5) == (49152, 49152, 11)  # DeepSeek-V3, EP 16
  assert ep.exchange_rounds(n, K_, 64, 4, 1.5) == (49152, 4 * n * K_, 1)  # EP 4: 3 rounds > 1
  assert ep.exchange_rounds(n, K_, 16, 16, None) == (16 * n * K_, 16 * n * K_, 1)
  assert ep.receive_capacity(5, 3, 4, 8, 1.0) == 16
  with pytest.raises(ValueError, match="capacity_factor"):
    ep.receive_capacity(5, 3, 4, 8, 0.0)


def test_ep_needs_divisible_experts():
  mesh = make_mesh({"data": 2, "expert": 4})
  args = list(_case(8))
  args[3], args[4], args[5] = args[3][:6], args[4][:6], args[5][:6]
  args[1] = args[1] % 6
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="not divisible by the expert axis"):
    jax.jit(lambda *a: expert_parallel_ffn(*a, ffn=FFN)).lower(*args)


def test_skipped_overflow_round_costs_nothing():
  """A balanced step on EP=8 with capacity factor 1 has 7 possible overflow rounds after the
  first; when no shard overflows they are skipped, and a skipped round must touch no token
  buffer: the rounds loop, counted at its cheap branch (`hlo_cost`'s typical), does only its
  predicate's scalar work (it used to write a zero [n*K, D] buffer and add it to the
  accumulator: n*K*D flops and 3 buffers of bytes per round). Forward output checked against the
  numpy oracle."""
  from dsv3_jax.hlo_cost import hlo_cost
  N, S = 768, 8
  n = N // S
  args = _case(N)
  assert ep.exchange_rounds(n, K, E // S, S, 1.0) == (2 * n, 2 * n, 8)
  with jax.set_mesh(make_mesh({"expert": S})):
    f = jax.jit(lambda *a: expert_parallel_ffn(*a, ffn=FFN, capacity_factor=1.0),
                compiler_options=FAST_COMPILE)
    compiled = f.lower(*args).compile()
    y = compiled(*args)
  assert_close(y, _oracle(*args), atol=1e-5, what="EP forward")
  cost = hlo_cost(compiled.as_text())
  rounds = [flops for _, trips, flops in cost.loops if trips == 7]
  assert rounds, cost.loops
  assert max(rounds) < 64, (rounds, n * K * D)
