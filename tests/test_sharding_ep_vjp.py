"""The expert-parallel custom VJP against jax's own autodiff of the same forward, and what its
backward costs in the compiled program.

Oracle: `_ep_shard(..., custom_vjp=False)`, the same exchange rounds differentiated by jax
(transposed all-to-alls, scan + cond), on 8 simulated CPU devices in float32 with matmul
precision "highest". The custom backward sums the K pair rows of a token and the router-weight
dot products in another order, so gradients (size ~1e-1) agree to 2e-6, not bit for bit.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dsv3_jax.hlo_cost import _Analyzer, parse_hlo
from dsv3_jax.moe import grouped_ffn, grouped_ffn_vjp
from dsv3_jax.sharding import ep_layout, make_mesh
from dsv3_jax.sharding import expert_parallel as ep
from tests.test_sharding_ep import D, E, F, FFN, K, _case, _skewed
from tests.utils import FAST_COMPILE, assert_close


def _grads(shape, args, cf, custom_vjp, ffn=FFN, ffn_vjp=None):
  """(y, overflow, grads wrt x, weights, w_gate, w_up, w_down) of sum(sin(EP(x))) on `shape`,
  compiled; and the compiled program."""
  mesh = make_mesh(shape)
  layout = ep_layout(mesh)
  tok = P(layout.token_axes)
  body = functools.partial(ep._ep_shard, ffn=ffn, shards=shape["expert"],
                           exchange=ep.Exchange.PADDED, capacity_factor=cf,
                           sync_axes=tuple(a for a in layout.token_axes if a != "expert"),
                           custom_vjp=custom_vjp, ffn_vjp=ffn_vjp)
  body = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, P("expert")),
                       out_specs=(tok, tok), check_vma=False)

  def loss(x, weights, wg, wu, wd, experts):
    y, overflow = body(x, experts, weights, (wg, wu, wd))
    return jnp.sum(jnp.sin(y)), (y, overflow.sum())

  x, experts, weights, wg, wu, wd = args
  f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True),
              compiler_options=FAST_COMPILE)
  compiled = f.lower(x, weights, wg, wu, wd, experts).compile()
  (_, (y, overflow)), g = compiled(x, weights, wg, wu, wd, experts)
  return y, int(overflow), g, compiled


@pytest.mark.parametrize("shape,n_tokens,skew,cf,rounds", [
    ({"expert": 8}, 96, False, None, 1),                       # one worst-case round
    ({"expert": 8}, 768, False, 1.0, 8),                       # 7 overflow rounds, some run
    ({"data": 2, "tensor": 2, "expert": 2}, 64, True, 0.5, 4)])  # all rows to one shard
def test_custom_vjp_equals_autodiff(shape, n_tokens, skew, cf, rounds):
  """Forward equal (to XLA's fusion choices), every gradient within 2e-6 of jax's autodiff, with the overflow rounds
  inactive (one round), partly active and all active (skewed routing: every round runs)."""
  args = list(_case(n_tokens))
  if skew:
    args[1] = _skewed(n_tokens)
  n = n_tokens // int(np.prod(list(shape.values())))
  assert ep.exchange_rounds(n, K, E // shape["expert"], shape["expert"], cf)[2] == rounds
  y, overflow, g, _ = _grads(shape, args, cf, True)
  y0, overflow0, g0, _ = _grads(shape, args, cf, False)
  assert_close(y, y0, atol=1e-6, what="forward")  # one function, two programs (XLA fuses apart)
  assert overflow == overflow0 and (overflow > 0) == (rounds > 1)
  for a, b, name in zip(g, g0, ("x", "weights", "w_gate", "w_up", "w_down")):
    assert np.abs(np.asarray(b)).max() > 1e-2, name
    assert_close(a, b, atol=2e-6, rtol=1e-5, what=f"custom VJP grad {name}")


KERNELS = dict(backend="interpret", platform="tpu")


def test_grouped_ffn_vjp_equals_autodiff_plus_acc():
  """`grouped_ffn_vjp` (our TPU kernels, interpreted: recomputed gate/up, dlhs summed in place,
  weight gradients written into acc) against jax's VJP of the reference `grouped_ffn`
  (ragged_dot), plus acc for the weight gradients; empty groups and padding rows included."""
  r = np.random.default_rng(3)
  M, sizes = 44, jnp.asarray([9, 0, 20, 11], jnp.int32)  # rows 40..43: padding
  xs, dys = (jnp.asarray(r.standard_normal((M, D)), jnp.float32) for _ in range(2))
  ws = [jnp.asarray(0.2 * r.standard_normal(s), jnp.float32) for s in
        ((4, D, F), (4, D, F), (4, F, D))]
  acc = [jnp.asarray(r.standard_normal(w.shape), jnp.float32) for w in ws]
  _, vjp = jax.vjp(lambda xs, *w: FFN(xs, sizes, *w), xs, *ws)
  want_dx, *want_dw = vjp(dys)
  for a in (None, acc):
    dx, dw = jax.jit(functools.partial(grouped_ffn_vjp, **KERNELS))(xs, dys, sizes, *ws, acc=a)
    assert_close(dx, want_dx, atol=2e-6, rtol=1e-5, what="dxs")
    assert not np.asarray(dx)[40:].any()
    for got, want, base, name in zip(dw, want_dw, a or (0, 0, 0), ("gate", "up", "down")):
      assert_close(got, np.asarray(want) + np.asarray(base), atol=2e-6, rtol=1e-5,
                   what=f"dw_{name} acc={a is not None}")


def test_ep_with_kernel_ffn_vjp_equals_autodiff():
  """The EP backward with the FFN's own VJP (`grouped_ffn_vjp` on the interpreted TPU kernels:
  weight gradients accumulated in place over the rounds) against jax's autodiff of the
  reference-FFN forward, skewed routing so that every overflow round runs."""
  shape, n_tokens, cf = {"data": 2, "tensor": 2, "expert": 2}, 64, 0.5
  args = list(_case(n_tokens))
  args[1] = _skewed(n_tokens)
  y, overflow, g, _ = _grads(shape, args, cf, True, functools.partial(grouped_ffn, **KERNELS),
                             functools.partial(grouped_ffn_vjp, **KERNELS))
  y0, overflow0, g0, _ = _grads(shape, args, cf, False)
  assert_close(y, y0, atol=1e-6, what="forward")
  assert overflow == overflow0 > 0
  for a, b, name in zip(g, g0, ("x", "weights", "w_gate", "w_up", "w_down")):
    assert np.abs(np.asarray(b)).max() > 1e-2, name
    assert_close(a, b, atol=2e-6, rtol=1e-5, what=f"kernel VJP grad {name}")


def _round_loops(text, trips):
  """[(flops, bytes)] of one iteration, cheap branches, of each while loop with `trips` trips."""
  comps, entry = parse_hlo(text)
  a = _Analyzer(comps, entry)
  return [a.comp_cost(i.attr("body"), "typical")[::2] for c, ins in comps.items() for i in ins
          if i.op == "while" and a.trip_count(c, i) == trips]


def test_skipped_rounds_cost_nothing_in_the_backward():
  """Balanced step, EP=8, capacity factor 1.5: 6 possible rounds, only the first needed. In the
  compiled forward + backward, each rounds loop counted at its cheap branch (a skipped round, as
  `hlo_cost` counts a typical step) does only scalar work and moves under 1 KiB per round: no
  zero expert-weight gradients or token buffers are written. jax's autodiff of the same loop
  writes El*D*F*3 zeros of expert-weight gradient per skipped round."""
  N, S = 768, 8
  args = list(_case(N))
  assert ep.exchange_rounds(N // S, K, E // S, S, 1.5)[2] == 6
  _, overflow, _, compiled = _grads({"expert": S}, args, 1.5, True)
  assert overflow == 0
  ours = _round_loops(compiled.as_text(), 5)
  assert len(ours) == 2, ours  # the forward's rounds loop and the backward's
  for flops, nbytes in ours:
    assert flops < 64 and nbytes < 1024, ours
  _, _, _, autodiff = _grads({"expert": S}, args, 1.5, False)
  zeros = (E // S) * D * F * 3 * 4
  assert max(b for _, b in _round_loops(autodiff.as_text(), 5)) >= zeros


def test_sort_free_permutations_equal_the_stable_argsort():
  """`expert_sort` (per-token counts + cumsum) against numpy's stable argsort of the flattened
  expert ids, padding tokens (K copies of expert 0) included; `round_groups` (the receiver's
  grouping of a round's rows by local expert) against the stable argsort of the local expert ids
  the old code computed (padding id El last), over random segment counts and round windows."""
  r = np.random.default_rng(0)
  for n, k, e in [(37, 3, 8), (128, 8, 256), (5, 2, 4)]:
    experts = np.stack([r.choice(e, k, replace=False) for _ in range(n)]).astype(np.int32)
    experts[-2:] = 0
    order, inv, counts = jax.jit(ep.expert_sort, static_argnums=1)(experts, e)
    np.testing.assert_array_equal(order, np.argsort(experts.reshape(-1), kind="stable"))
    np.testing.assert_array_equal(np.asarray(inv)[np.asarray(order)], np.arange(n * k))
    np.testing.assert_array_equal(counts, np.bincount(experts.reshape(-1), minlength=e))
  S, El = 4, 3
  groups = jax.jit(ep.round_groups)  # one shape: R = 24 received rows, the capacity traced
  q = np.arange(24)
  for _ in range(60):
    local_counts = r.integers(0, 5, (S, El)).astype(np.int32)
    total = int(local_counts.sum())
    cap = int(r.integers(1, min(total, 21) + 2))
    start = int(r.integers(0, max(1, total))) // cap * cap
    live = max(0, min(cap, total - start))
    dest, sizes = groups(jnp.asarray(start + q, jnp.int32), jnp.asarray(q < live),
                         jnp.asarray(q - live, jnp.int32), jnp.asarray(local_counts), start, cap)
    seg = np.searchsorted(np.cumsum(local_counts.reshape(-1)), start + q, side="right")
    ids = np.where(q < live, np.minimum(seg, S * El - 1) % El, El)
    np.testing.assert_array_equal(np.asarray(dest)[np.argsort(ids, kind="stable")], q)
    np.testing.assert_array_equal(sizes, np.bincount(ids, minlength=El + 1)[:El])
