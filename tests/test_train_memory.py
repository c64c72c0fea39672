"""Pieces of the train-step memory work (issue 12): `layers.compute_cast` and the HLO liveness
reader `bench/hlo_liveness.py`.

Oracles: jnp's own float32 -> bfloat16 convert (round to nearest even) bit for bit, and jax's
autodiff of `astype`; for the liveness reader, buffer sizes computed by hand for a program whose
schedule is fixed by data dependencies (a chain of elementwise ops on known shapes).
"""
import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.layers import compute_cast

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _liveness():
  spec = importlib.util.spec_from_file_location("hlo_liveness", ROOT / "bench" / "hlo_liveness.py")
  mod = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = mod  # dataclasses look their module up there
  spec.loader.exec_module(mod)
  return mod


def test_compute_cast_is_the_convert_bit_for_bit():
  r = np.random.RandomState(0)
  x = (r.randn(20000) * 10.0 ** r.uniform(-40, 38, 20000)).astype(np.float32)
  # ties at the rounding point (both parities), extremes, specials
  ties = np.array([0x3F808000, 0x3F818000, 0x7F7F8000, 0x00008000, 0x80018000], np.uint32).view(np.float32)
  x = np.concatenate([x, ties, np.array([np.inf, -np.inf, 0.0, -0.0, 3.4e38, -3.4e38, 1e-45],
                                        np.float32)])
  got = np.asarray(compute_cast(jnp.asarray(x), jnp.bfloat16))
  want = np.asarray(jnp.asarray(x).astype(jnp.bfloat16))
  np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
  nan = np.asarray(compute_cast(jnp.asarray([np.nan, -np.nan], jnp.float32), jnp.bfloat16))
  assert np.isnan(nan.astype(np.float32)).all()
  # other pairs are plain converts; the same dtype is the input itself
  assert compute_cast(jnp.ones(3, jnp.bfloat16), jnp.float32).dtype == jnp.float32
  y = jnp.ones(3, jnp.float32)
  assert compute_cast(y, jnp.float32) is y


def test_compute_cast_gradient_is_the_converts():
  w = jnp.asarray(np.random.RandomState(1).randn(5, 7), jnp.float32)
  c = jnp.asarray(np.random.RandomState(2).randn(5, 7), jnp.float32)

  def f(cast):
    return jax.grad(lambda w: (cast(w).astype(jnp.float32) * c).sum())(w)

  got = f(lambda w: compute_cast(w, jnp.bfloat16))
  want = f(lambda w: w.astype(jnp.bfloat16))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert got.dtype == jnp.float32


def test_liveness_peak_of_a_chain():
  lv = _liveness()
  n = 1 << 16  # float32 [n]: 256 KiB per buffer

  def f(x):
    a = jnp.sin(x)
    b = jnp.cos(a) * a          # a, b live together
    return jnp.tanh(b) + x      # x is a parameter, live throughout

  text = jax.jit(f).lower(jax.ShapeDtypeStruct((n,), jnp.float32)).compile().as_text()
  r = lv.report(text)
  size = 4 * n
  # XLA fuses the chain: the parameter and the output are the only full buffers, or the
  # parameter and some fused intermediates. Peak: at least parameter + output, at most the
  # unfused chain (parameter + two intermediates + output).
  assert 2 * size <= r["peak_bytes"] <= 4 * size, r
  assert all(row["bytes"] <= size for row in r["live"])


def test_liveness_parses_tuples_loops_and_skips_vmem():
  lv = _liveness()
  text = """HloModule m, is_scheduled=true

%body (p: (s32[], f32[1024])) -> (s32[], f32[1024]) {
  %p = (s32[], f32[1024]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %v = f32[1024]{0} get-tuple-element(%p), index=1
  %t = f32[4096]{0} broadcast(%v), dimensions={}
  %s = f32[1024]{0} slice(%t), slice={[0:1024]}
  ROOT %r = (s32[], f32[1024]{0}) tuple(%i, %s)
}

%cond (p: (s32[], f32[1024])) -> pred[] {
  %p = (s32[], f32[1024]{0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[1024]) -> f32[1024] {
  %a = f32[1024]{0} parameter(0)
  %z = s32[] constant(0)
  %vm = f32[65536]{0:S(1)} broadcast(%a), dimensions={}
  %tu = (s32[], f32[1024]{0}) tuple(%z, %a)
  %w = (s32[], f32[1024]{0}) while(%tu), condition=%cond, body=%body
  ROOT %o = f32[1024]{0} get-tuple-element(%w), index=1
}
"""
  r = lv.report(text)
  # the parameter (4 KiB, carried in place) + the loop body's 16 KiB broadcast; the VMEM
  # buffer (S(1)) is not HBM
  assert r["peak_bytes"] == 4096 + 16384, r
  assert r["at"] == "w"
  assert any(row["bytes"] == 16384 for row in r["live"][0]["inside"])


def test_offload_remat_traces():
  """remat="offload" names the saved block input with `checkpoint_name` (it used to reach for
  `jax.ad_checkpoint` as an attribute, which plain `import jax` does not provide on jax 0.10,
  and `dsv3 plan --remat offload` died with an AttributeError). Tracing the gradient is enough:
  the offload itself needs a TPU/GPU memory space."""
  from flax import nnx

  import dsv3_jax
  from dsv3_jax.train.optim import training_runtime
  cfg = dsv3_jax.TINY.replace(num_hidden_layers=2, first_k_dense_replace=1)
  model = dsv3_jax.DeepseekV3(cfg, training_runtime(jnp.bfloat16, remat="offload"),
                              rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tokens = jnp.zeros((1, 8), jnp.int32)

  def loss(p):
    return nnx.merge(graphdef, p, rest).forward(tokens).logits.sum()

  jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
  assert "decoder_layer_input" in str(jaxpr)
