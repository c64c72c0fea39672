"""Scanned layer stacks: the stacked model equals the same layers run one by one, every remat
policy gives the same gradients, the per-layer checkpoint view round-trips into the stacks, and
the lowered program does not grow with depth.

Oracle for the forward: an explicit Python loop over `model.layer(i)` (each a stand-alone
`DecoderLayer` holding slices of the stacks) and the model's own norm/head: the scan must only
change how the layers are iterated, so fp32 results agree to summation-order noise (bound 1e-5 on
logits of magnitude ~1). Remat changes what is saved, not the math: gradients agree to 1e-6
relative to their scale.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsv3_jax
from dsv3_jax.model import layer_groups
from dsv3_jax.pretrained import flat_variables, model_from_arrays, stacked_location
from tests.utils import FAST_COMPILE, assert_close, random_arrays

CFG = dsv3_jax.TINY.replace(num_hidden_layers=4, first_k_dense_replace=1)


def _arrays(cfg, seed=0, std=0.08):
  return random_arrays(cfg, seed, std=std, bias_std=std)


def test_layer_groups_follow_the_config():
  assert layer_groups(dsv3_jax.DEEPSEEK_V3) == [(0, 3), (3, 58)]
  assert layer_groups(CFG) == [(0, 1), (1, 3)]
  # moe_layer_freq 2 interleaves dense and MoE layers: runs of one.
  assert layer_groups(CFG.replace(first_k_dense_replace=0, moe_layer_freq=2)) == [
      (0, 1), (1, 1), (2, 1), (3, 1)]
  abstract = dsv3_jax.abstract_model(dsv3_jax.DEEPSEEK_V3)
  k = nnx.state(abstract)["stacks"][1]["block"]["mlp"]["experts"]["gate_proj"]
  assert k.get_value().shape == (58, 256, 7168, 2048)
  assert k.get_metadata()["axes"] == ("layers", "expert", "moe_embed", "moe_mlp")
  assert stacked_location(abstract, "layers.5.mlp.gate.kernel") == ("stacks.1.block.mlp.gate.kernel", 2)
  assert stacked_location(abstract, "layers.2.mlp.up_proj.kernel") == ("stacks.0.block.mlp.up_proj.kernel", 2)
  assert stacked_location(abstract, "mtp.0.enorm.weight") == ("mtp.0.enorm.weight", None)


def test_per_layer_view_round_trips():
  arrays = _arrays(CFG)
  model = model_from_arrays(CFG, dsv3_jax.RuntimeConfig(), arrays)
  back = {k: np.asarray(v.get_value()) for k, v in flat_variables(model).items()}
  assert set(back) == set(arrays)
  for k in arrays:
    np.testing.assert_array_equal(back[k], arrays[k], err_msg=k)


def test_scan_equals_layer_by_layer_loop():
  model = model_from_arrays(CFG, dsv3_jax.RuntimeConfig(), _arrays(CFG))
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, CFG.vocab_size, (2, 9)), jnp.int32)
  graphdef, state = nnx.split(model)

  def both(state, tokens):
    m = nnx.merge(graphdef, state)
    out = m.forward(tokens)
    positions = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (2, 9))
    x, loads = m.embed(tokens), []
    for i in range(CFG.num_hidden_layers):
      x, stats = m.layer(i)(x, positions)
      if stats is not None:
        loads.append(stats["load"])
    return out.logits, out.router_stats["load"], m.head(m.norm(x)), jnp.stack(loads)
  # Both forwards in one program compiled without CPU optimisations (eagerly, every op of the
  # loop compiled apart: ~4x the time); the check is at a tolerance plus integer loads.
  logits, loads, loop_logits, loop_loads = jax.jit(both, compiler_options=FAST_COMPILE)(
      state, tokens)
  assert_close(logits, loop_logits, atol=1e-5, what="logits")
  np.testing.assert_array_equal(np.asarray(loads), np.asarray(loop_loads))


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_policies_give_the_same_gradients(remat):
  arrays = _arrays(CFG)
  tokens = jnp.asarray(np.random.RandomState(2).randint(0, CFG.vocab_size, (2, 8)), jnp.int32)

  def grads(policy):
    model = model_from_arrays(CFG, dsv3_jax.RuntimeConfig(remat=policy), arrays)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
      out = nnx.merge(graphdef, p, rest).forward(tokens, mtp=True)
      return out.logits.mean() + out.mtp_logits.mean()
    # CPU optimisations off: compiling the tiny model's gradient, not running it, is the cost.
    # The "none" program is the same in both cases: the second compile is a persistent-cache hit.
    return jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE)(params)

  ref, got = grads("none"), grads(remat)
  for (path, a), (_, b) in zip(nnx.to_flat_state(ref), nnx.to_flat_state(got)):
    a, b = np.asarray(a.get_value()), np.asarray(b.get_value())
    assert_close(b, a, atol=1e-6 * max(np.abs(a).max(), 1e-12), what=".".join(map(str, path)))


def test_program_size_does_not_grow_with_depth():
  def hlo_len(layers):
    cfg = CFG.replace(num_hidden_layers=layers)
    model = dsv3_jax.abstract_model(cfg, dsv3_jax.RuntimeConfig(remat="full"))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tok = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    f = jax.jit(jax.grad(lambda p, r, t: nnx.merge(graphdef, p, r).forward(t).logits.mean()))
    return len(f.lower(params, rest, tok).as_text())

  small, big = hlo_len(3), hlo_len(12)
  assert big < 1.05 * small, (small, big)
