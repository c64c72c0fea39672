"""The RAGGED expert-parallel exchange (the TPU/GPU path) run on CPU, with `ragged_all_to_all`
emulated by an all-gather + per-source row scatter (XLA:CPU has no ragged-all-to-all), against
the single-program dropless MoE (no mesh) and the float64 per-token oracle of
tests/test_sharding_ep.py.

Covers the one-local-expert shortcut of `ragged_round` (wide expert parallelism: the received
rows are used in arrival order, no grouping gathers) beside the grouped path (two local
experts), both with overflow rounds. Tolerances as tests/test_sharding_ep.py: forward equal to
the single-program result, gradients 1e-5 absolute / 1e-4 relative (float32, "highest").
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dsv3_jax.moe import permute, unpermute
from dsv3_jax.sharding import Exchange, make_mesh
from dsv3_jax.sharding import expert_parallel as ep
from tests.test_sharding_ep import D, F, FFN, K, _oracle, check_ffn_grads
from tests.utils import FAST_COMPILE, assert_close

S = 8


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes, *, axis_name, axis_index_groups=None):
  """jax.lax.ragged_all_to_all's documented semantics from plain collectives: source i's rows
  operand_i[input_offsets_i[j] : + send_sizes_i[j]] land in receiver j's output at
  output_offsets_i[j]; the rest of the output is kept."""
  assert axis_index_groups is None
  del recv_sizes  # implied by the senders' sizes
  me = jax.lax.axis_index(axis_name)
  rows, ins, sizes, outs = (jax.lax.all_gather(a, axis_name)
                            for a in (operand, input_offsets, send_sizes, output_offsets))
  t = jnp.arange(min(operand.shape[0], output.shape[0]), dtype=jnp.int32)
  for i in range(rows.shape[0]):
    dst = jnp.where(t < sizes[i, me], outs[i, me] + t, output.shape[0])  # out of range: dropped
    src = jnp.clip(ins[i, me] + t, 0, operand.shape[0] - 1)
    output = output.at[dst].set(rows[i][src], mode="drop")
  return output


def _case(E, n_tokens, seed=0):
  r = np.random.default_rng(seed)
  x = r.standard_normal((n_tokens, D)).astype(np.float32)
  # skewed: half the pairs go to experts 0..1, so receivers overflow and rounds loop
  hot = r.random((n_tokens,)) < 0.5
  experts = np.stack([r.choice(2 if h else E, K, replace=False) for h in hot]).astype(np.int32)
  weights = r.uniform(0.1, 1.0, (n_tokens, K)).astype(np.float32)
  wg, wu = (0.2 * r.standard_normal((E, D, F)).astype(np.float32) for _ in range(2))
  wd = (0.2 * r.standard_normal((E, F, D))).astype(np.float32)
  return x, experts, weights, wg, wu, wd


@pytest.mark.parametrize("E", [S, 2 * S])  # one local expert (no grouping gathers), two
def test_ragged_exchange_matches_single_device(E, monkeypatch):
  monkeypatch.setattr(jax.lax, "ragged_all_to_all", _emulated_ragged_all_to_all)
  n_tokens = 8 * S
  args = _case(E, n_tokens)
  n, El = n_tokens // S, E // S
  nominal, cap, rounds = ep.exchange_rounds(n, K, El, S, 0.5)
  assert rounds >= ep.LOOP_COST_ROUNDS and cap == nominal == 8  # the overflow-rounds loop
  mesh = make_mesh({"expert": S})
  body = jax.shard_map(functools.partial(ep._ep_shard, ffn=FFN, shards=S,
                                         exchange=Exchange.RAGGED, capacity_factor=0.5,
                                         sync_axes=()),
                       mesh=mesh, in_specs=(P("expert"),) * 4, out_specs=P("expert"),
                       check_vma=False)

  def loss(x, experts, weights, *w):
    y, overflow = body(x, experts, weights, w)
    return jnp.sum(jnp.sin(y)), (y, overflow.sum())

  def local_loss(x, experts, weights, wg, wu, wd):
    xs, order, sizes = permute(x, experts, E)
    y = unpermute(FFN(xs, sizes, wg, wu, wd), order, weights)
    return jnp.sum(jnp.sin(y)), y

  argnums = (0, 2, 3, 4, 5)
  (_, (y, overflow)), g = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True),
                                  compiler_options=FAST_COMPILE)(*args)
  (_, y_ref), g_ref = jax.jit(jax.value_and_grad(local_loss, argnums, has_aux=True),
                              compiler_options=FAST_COMPILE)(*args)
  assert_close(y, _oracle(*args), atol=1e-5, what="ragged EP forward vs float64 oracle")
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
  check_ffn_grads(g, g_ref, "ragged EP")
  recv = np.bincount(args[1].reshape(-1) // El, minlength=S)  # rows each shard receives
  assert int(overflow) == int(np.maximum(recv - nominal, 0).sum()) > 0
