"""The MTP blocks run as extra iterations of the MoE stack's scan (`model._scan_with_mtp`): the
training forward and its gradients equal a plain per-layer loop (each main layer through
`model.layer(i)`, each MTP depth through `MTPLayer.__call__`, no scan), for remat "none" and
"full", on one device and sharded with expert parallelism on 8 simulated CPU devices; the MTP
block's ops appear once in the program (inside the stack's scan body).

Oracle: the loop above, float32, matmul precision "highest". The scan only changes how the layers
are iterated and selects the MTP weights exactly; XLA may still fuse and order the float32 sums of
the scan body and of the loop differently (bitwise on one host, 1.0e-6 off on another), so forward
outputs agree to 1e-5 (values O(1)) and every gradient leaf to 1e-5 of its largest magnitude;
sharding reorders more sums (observed 1.5e-6 of the scale): 1e-5 on logits, 1e-5 of the scale +
1e-4 relative on gradients. A wrong weight or input selection shows as errors of the values' own
size.
Router loads (integers) must be equal.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsv3_jax
from dsv3_jax.model import _mtp_fits_stack
from dsv3_jax.sharding import activation_sharding, make_mesh, state_shardings, use_rules
from tests.test_sharding_model import POD_RULES
from tests.utils import FAST_COMPILE, assert_close, random_arrays

B, T = 8, 8


def _model(cfg, remat):
  return dsv3_jax.model_from_arrays(cfg, dsv3_jax.RuntimeConfig(remat=remat),
                                    random_arrays(cfg, 3, std=0.08))


def _tokens(cfg):
  return jnp.asarray(np.random.RandomState(4).randint(0, cfg.vocab_size, (B, T)), jnp.int32)


def _loop_forward(model, tokens):
  """(logits, mtp_logits, hidden, loads) by the plain per-layer loop."""
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  x, loads = model.embed(tokens), []
  for i in range(model.num_layers):
    x, stats = model.layer(i)(x, positions)
    if stats is not None:
      loads.append(stats["load"])
  hidden = h = model.norm(x)
  mtp_logits = []
  for k, layer in enumerate(model.mtp, start=1):
    h, normed, stats = layer(model.embed(jnp.pad(tokens[:, k:], ((0, 0), (0, k)))), h, positions)
    if stats is not None:
      loads.append(stats["load"])
    mtp_logits.append(model.head(normed))
  return model.head(hidden), jnp.stack(mtp_logits), hidden, jnp.stack(loads)


def _scan_forward(model, tokens):
  out = model.forward(tokens, mtp=True)
  return out.logits, out.mtp_logits, out.hidden, out.router_stats["load"]


def _step(forward, graphdef, rest, weights):
  """jit-able (params, tokens) -> (forward outputs, grads of sum(w0 * logits) + sum(w1 *
  mtp_logits))."""
  def loss(params, tokens):
    logits, mtp_logits, hidden, loads = forward(nnx.merge(graphdef, params, rest), tokens)
    return (logits * weights[0]).sum() + (mtp_logits * weights[1]).sum(), (
        logits, mtp_logits, hidden, loads)

  def step(params, tokens):
    (_, outs), grads = jax.value_and_grad(loss, has_aux=True)(params, tokens)
    return outs, grads
  return step


def _weights(cfg):
  rng = np.random.RandomState(5)
  d = cfg.num_nextn_predict_layers
  return (jnp.asarray(rng.randn(B, T, cfg.vocab_size), jnp.float32),
          jnp.asarray(rng.randn(d, B, T, cfg.vocab_size), jnp.float32))


def _compare(got, ref, *, atol_out, atol_grad, rtol_grad, what):
  (outs, grads), (ref_outs, ref_grads) = got, ref
  for name, a, b in zip(("logits", "mtp_logits", "hidden"), outs[:3], ref_outs[:3]):
    assert_close(a, b, atol=atol_out, what=f"{what} {name}")
  np.testing.assert_array_equal(np.asarray(outs[3]), np.asarray(ref_outs[3]))
  ref_flat = dict(nnx.to_flat_state(ref_grads))
  n = 0
  for path, g in nnx.to_flat_state(grads):
    a, b = np.asarray(g.get_value()), np.asarray(ref_flat[path].get_value())
    scale = max(np.abs(b).max(), 1e-12)
    assert_close(a, b, atol=atol_grad * scale, rtol=rtol_grad, what=f"{what} grad {path}")
    n += "mtp" in map(str, path) and np.abs(b).max() > 1e-4
  assert n > 5, "the MTP parameters got (almost) no gradient: the comparison would be vacuous"


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_mtp_equals_layer_loop(remat):
  """Depth 2 (both MTP inputs: h^0 = norm(main output), then h^1), 1 dense + 2 MoE layers."""
  cfg = dsv3_jax.TINY.replace(num_nextn_predict_layers=2)
  model = _model(cfg, remat)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  assert _mtp_fits_stack(model.stacks[-1], model.mtp)
  tokens, w = _tokens(cfg), _weights(cfg)
  scan = jax.jit(_step(_scan_forward, graphdef, rest, w), compiler_options=FAST_COMPILE)

  # The MTP blocks' routed experts are computed inside the MoE stack's scan body only: one
  # ragged_dot per projection in the whole forward program, not one more per MTP depth.
  fwd = lambda p, t: _scan_forward(nnx.merge(graphdef, p, rest), t)  # noqa: E731
  jaxpr = jax.make_jaxpr(fwd)(params, tokens)
  assert str(jaxpr).count("ragged_dot_general[") == 3, str(jaxpr)
  loop = jax.jit(_step(_loop_forward, graphdef, rest, w), compiler_options=FAST_COMPILE)
  _compare(scan(params, tokens), loop(params, tokens), atol_out=1e-5, atol_grad=1e-5,
           rtol_grad=0.0, what=f"remat={remat}")


def test_scanned_mtp_sharded_with_expert_parallelism():
  """fsdp 2 x expert 4 with the pod rules, remat "full", depth 1: equals the single-device loop."""
  cfg = dsv3_jax.TINY
  model = _model(cfg, "full")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tokens, w = _tokens(cfg), _weights(cfg)
  ref = jax.jit(_step(_loop_forward, graphdef, rest, w), compiler_options=FAST_COMPILE)(
      params, tokens)

  mesh = make_mesh({"fsdp": 2, "expert": 4})
  ps = state_shardings(params, POD_RULES, mesh)
  ts = activation_sharding(("batch", "sequence"), POD_RULES, mesh, tokens.shape)
  step = jax.jit(_step(_scan_forward, graphdef, rest, w), in_shardings=(ps, ts),
                 out_shardings=(None, ps), compiler_options=FAST_COMPILE)
  with jax.set_mesh(mesh), use_rules(POD_RULES):
    args = (jax.device_put(params, ps), jax.device_put(tokens, ts))
    compiled = step.lower(*args).compile()
    assert "all-to-all" in compiled.as_text(), "the MoE did not take the expert-parallel path"
    got = compiled(*args)
  _compare(got, ref, atol_out=1e-5, atol_grad=1e-5, rtol_grad=1e-4, what="fsdp2 x expert4")


def test_mtp_layer_of_another_kind_runs_apart():
  """moe_layer_freq 2: the MTP layer (index 3) is dense, the last stack MoE: the MTP block runs
  apart from the scan (the previous path), with the same results as the loop (forward only)."""
  cfg = dsv3_jax.TINY.replace(moe_layer_freq=2)
  model = _model(cfg, "none")
  assert not model.mtp[0].block.is_moe and model.stacks[-1].is_moe
  assert not _mtp_fits_stack(model.stacks[-1], model.mtp)
  graphdef, state = nnx.split(model)
  tokens = _tokens(cfg)

  def both(state, tokens):
    m = nnx.merge(graphdef, state)
    return _scan_forward(m, tokens), _loop_forward(m, tokens)
  got, ref = jax.jit(both, compiler_options=FAST_COMPILE)(state, tokens)
  for name, a, b in zip(("logits", "mtp_logits", "hidden"), got[:3], ref[:3]):
    assert_close(a, b, atol=1e-5, what=name)
  np.testing.assert_array_equal(np.asarray(got[3]), np.asarray(ref[3]))
