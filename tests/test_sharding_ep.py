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
from tests.sharding_case import FAST_COMPILE
from tests.utils import assert_close

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


def _oracle(x, experts, weights, wg, wu, wd):
  x, wg, wu, wd = (a.astype(np.float64) for a in (x, wg, wu, wd))
  y = np.zeros_like(x)
  for n in range(x.shape[0]):
    for k in range(experts.shape[1]):
      e = experts[n, k]
      g, u = x[n] @ wg[e], x[n] @ wu[e]
      y[n] += weights[n, k] * ((g / (1 + np.exp(-g)) * u) @ wd[e])
  return y


def _loss(x, experts, weights, wg, wu, wd):
  y = expert_parallel_ffn(x, experts, weights, wg, wu, wd, ffn=FFN)
  return jnp.sum(jnp.sin(y)), y


@pytest.mark.parametrize("shape,n_tokens", [({"expert": 8}, 96),
                                            ({"data": 2, "tensor": 2, "expert": 2}, 61)])
def test_ep_forward_backward_matches_oracle(shape, n_tokens):
  """Forward against the numpy oracle; gradients (x, weights, all expert weights) against the
  single-program path (jax.grad of permute -> grouped FFN -> unpermute without a mesh)."""
  args = _case(n_tokens)
  mesh = make_mesh(shape)
  grad = jax.value_and_grad(_loss, argnums=(0, 2, 3, 4, 5), has_aux=True)
  with jax.set_mesh(mesh):
    assert ep_layout() is not None
    (_, y), g = jax.jit(grad, compiler_options=FAST_COMPILE)(*args)
  assert_close(y, _oracle(*args), atol=1e-5, what="EP forward")

  from dsv3_jax.moe import permute, unpermute

  def local_loss(x, experts, weights, wg, wu, wd):
    xs, order, sizes = permute(x, experts, E)
    y = unpermute(FFN(xs, sizes, wg, wu, wd), order, weights)
    return jnp.sum(jnp.sin(y)), y

  assert ep_layout() is None  # no ambient mesh: the single-program path
  (_, y_ref), g_ref = jax.jit(jax.value_and_grad(local_loss, argnums=(0, 2, 3, 4, 5), has_aux=True),
                              compiler_options=FAST_COMPILE)(*args)
  assert_close(y_ref, _oracle(*args), atol=1e-5, what="single-program forward")
  for a, b, name in zip(g, g_ref, ("x", "weights", "w_gate", "w_up", "w_down")):
    assert np.abs(b).max() > 1e-3
    assert_close(a, b, atol=1e-5, rtol=1e-4, what=f"EP grad {name}")


def test_all_to_all_carries_only_token_rows():
  """Compiled HLO on EP=8: every all-to-all moves the bounded dropless buffer of token rows
  (S slots x n*min(K, E/S) rows x D) or its int32 expert ids; no array anywhere has both an
  expert dim and a token dim (no dense [tokens, experts, hidden] dispatch/combine tensors)."""
  N, S = 96, 8
  n = N // S
  args = _case(N)
  mesh = make_mesh({"expert": S})
  with jax.set_mesh(mesh):
    hlo = jax.jit(jax.grad(lambda *a: _loss(*a)[0], argnums=(0, 3)),
                  compiler_options=FAST_COMPILE).lower(*args).compile().as_text()
  colls = ep.hlo_collectives(hlo)
  cap = n * min(K, E // S)  # per-destination slot: a token reaches <= min(K, E/S) experts/shard
  # forward: ids out, rows out, rows back; backward: the transposes of the two row exchanges.
  assert sorted(c[1][0][0] for c in colls) == ["f32"] * 4 + ["s32"], colls
  ideal = n * K * D * 4         # this shard's token-expert pairs, f32
  for op, shapes, nbytes in colls:
    assert op == "all-to-all"
    # XLA splits the tiled all-to-all into S operands of one destination slot each.
    assert shapes in ([("f32", (cap, D))] * S, [("f32", (S * cap, D))],
                      [("s32", (cap,))] * S, [("s32", (S * cap,))]), shapes
    if shapes[0][0] == "f32":
      assert nbytes == min(S, E // K) * ideal  # the padded dropless bound, 8x the ideal here
  for _, dims in {(t, d) for t, d in re.findall(r"(\w+)\[([\d,]*)\]", hlo)}:
    ds = [int(v) for v in dims.split(",") if v]
    assert not (E in ds and (n in ds or N in ds)), f"dense token x expert array {ds} in HLO"


def _simulate_ragged(send_rows, plan_of, S, cap):
  """numpy model of jax.lax.ragged_all_to_all's documented semantics, for S shards."""
  plans = [plan_of(i) for i in range(S)]
  out = [np.full((cap,), -1) for _ in range(S)]
  for i in range(S):
    p = plans[i]
    for j in range(S):
      lo, sz, dst = int(p.send_offsets[j]), int(p.send_sizes[j]), int(p.remote_offsets[j])
      out[j][dst:dst + sz] = send_rows[i][lo:lo + sz]
  return out, plans


def test_ragged_plan_round_trip_and_receive_order():
  """The ragged offsets deliver every row to its shard, chunks in source order, and the return
  offsets put every row back where it came from (checked with a numpy model of the op)."""
  S, El, n = 4, 3, 5
  r = np.random.default_rng(3)
  experts = [np.sort(np.stack([r.choice(S * El, 2, replace=False) for _ in range(n)]).ravel())
             for _ in range(S)]
  counts = np.stack([np.bincount(e // El, minlength=S) for e in experts])
  cap = ep.receive_capacity(n, 2, El, S)
  rows = [100 * i + np.arange(n * 2) for i in range(S)]  # row ids tag (source, position)
  recv, plans = _simulate_ragged(rows, lambda i: ep.ragged_plan(jnp.asarray(counts), i), S, cap)
  for j in range(S):
    want = np.concatenate([rows[i][experts[i] // El == j] for i in range(S)])
    np.testing.assert_array_equal(recv[j][:len(want)], want)
    assert (recv[j][len(want):] == -1).all()
  back = [np.full((n * 2,), -1) for _ in range(S)]
  for j in range(S):  # the return trip: ragged_return's arguments
    p = plans[j]
    for i in range(S):
      lo, sz, dst = int(p.recv_offsets[i]), int(p.recv_sizes[i]), int(p.back_offsets[i])
      back[i][dst:dst + sz] = recv[j][lo:lo + sz]
  for i in range(S):
    np.testing.assert_array_equal(back[i], rows[i])
    assert int(plans[i].send_sizes.sum()) == n * 2


def test_ragged_exchange_lowers_and_cpu_refuses_it():
  """The RAGGED path (TPU/GPU) traces forward+backward and lowers to ragged_all_to_all; XLA:CPU
  cannot compile that op, so AUTO picks PADDED here and an explicit RAGGED request raises."""
  args = _case(64)
  mesh = make_mesh({"expert": 8})
  layout = ep_layout(mesh)
  body = jax.shard_map(functools.partial(ep._ep_shard, ffn=FFN, shards=8,
                                         exchange=Exchange.RAGGED, tensor_axis=None),
                       mesh=mesh, in_specs=(P("expert"),) * 3 + (P("expert"),) * 3,
                       out_specs=P("expert"))
  text = jax.jit(jax.grad(lambda *a: body(*a).sum(), argnums=(0, 3))).lower(*args).as_text()
  assert text.count("ragged_all_to_all") >= 4  # dispatch x2 (rows, ids) + return, fwd and bwd
  assert layout.token_axes == ("expert",)
  assert Exchange.AUTO.resolve() is Exchange.PADDED
  with pytest.raises(ValueError, match="ragged-all-to-all"):
    Exchange.RAGGED.resolve()


def test_ep_needs_divisible_experts():
  mesh = make_mesh({"data": 2, "expert": 4})
  args = list(_case(8))
  args[3], args[4], args[5] = args[3][:6], args[4][:6], args[5][:6]
  args[1] = args[1] % 6
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="not divisible by the expert axis"):
    jax.jit(lambda *a: expert_parallel_ffn(*a, ffn=FFN)).lower(*args)
