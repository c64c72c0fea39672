"""Mosaic GPU (Hopper) grouped matmul kernels: GPU interpret mode on CPU against the references,
plus CUDA lowering at DeepSeek-V3 expert shapes (Mosaic GPU lowers without a GPU).

Oracles: `jax.lax.ragged_dot` at HIGHEST precision in float32 (`grouped_matmul_ref`,
`transposed_grouped_matmul_ref`) and `jax.grad` of the reference. Tolerance: the kernels
accumulate exact bf16 products in float32 and round once to bf16, so outputs agree to one bf16
rounding (relative 2^-8) plus float32 summation-order noise; we allow rtol 2^-7, atol 2e-2 on
values of magnitude ~sqrt(K) ~ 11.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.kernels_pallas.grouped_matmul import (grouped_matmul, mosaic_gpu,
                                                    transposed_grouped_matmul)
from dsv3_jax.kernels_pallas.grouped_matmul.reference import (grouped_matmul_ref,
                                                              transposed_grouped_matmul_ref)
from tests.utils import MOSAIC_GPU_CALL, assert_close, custom_calls

RTOL, ATOL = 2.0 ** -7, 2e-2
# T = 104: not a multiple of the 128-row tile; sum = 77 < T (trailing rows must be zero); an empty
# group in the middle; the first group's boundary falls inside a row tile.
T, K, N = 104, 128, 128
SIZES = np.array([40, 0, 37], np.int32)
MOSAIC = dict(backend="interpret", platform="gpu", gpu_impl="mosaic")


# Mosaic GPU interpreter programs compiled once per kernel, everything without XLA's CPU
# optimisations: the checks are at tolerance.
pytestmark = pytest.mark.usefixtures("module_interpreter_fast_compiles")


def _operands(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  lhs = jax.random.normal(k1, (T, K), jnp.float32).astype(jnp.bfloat16)
  rhs = jax.random.normal(k2, (len(SIZES), K, N), jnp.float32).astype(jnp.bfloat16)
  dout = jax.random.normal(k3, (T, N), jnp.float32).astype(jnp.bfloat16)
  return lhs, rhs, dout, jnp.asarray(SIZES)


def test_forward_matches_ragged_dot_and_zeroes_trailing_rows():
  lhs, rhs, _, gs = _operands()
  out = grouped_matmul(lhs, rhs, gs, **MOSAIC)
  assert out.shape == (T, N) and out.dtype == jnp.bfloat16
  ref = grouped_matmul_ref(lhs, rhs, gs, out_dtype=jnp.float32)
  assert_close(np.float32(out), np.float32(ref), atol=ATOL, rtol=RTOL, what="mosaic gmm")
  assert np.all(np.float32(out)[int(SIZES.sum()):] == 0.0), "rows past sum(group_sizes)"


def test_gradients_match_grad_of_reference():
  lhs, rhs, dout, gs = _operands(1)

  def loss(f):
    return lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * dout.astype(jnp.float32))

  got = jax.grad(loss(lambda x, w: grouped_matmul(x, w, gs, **MOSAIC)), (0, 1))(lhs, rhs)
  want = jax.grad(loss(lambda x, w: grouped_matmul_ref(x, w, gs)), (0, 1))(
      lhs.astype(jnp.float32), rhs.astype(jnp.float32))
  assert_close(np.float32(got[0]), np.float32(want[0]), atol=ATOL, rtol=RTOL, what="dlhs")
  assert_close(np.float32(got[1]), np.float32(want[1]), atol=ATOL, rtol=RTOL, what="drhs")
  assert np.all(np.float32(got[1])[1] == 0.0), "empty group's weight gradient"


def test_transposed_with_small_tiles_straddling_groups():
  """tgmm with 64-row steps: a group starts and ends inside a step; rows past T are read."""
  lhs, _, dout, gs = _operands(2)
  out = mosaic_gpu.tgmm(lhs, dout, gs, tiles=(64, 64, 64, 2, 1), interpret=True)
  ref = transposed_grouped_matmul_ref(lhs, dout, gs, out_dtype=jnp.float32)
  assert_close(np.float32(out), np.float32(ref), atol=ATOL, rtol=RTOL, what="mosaic tgmm")
  out2 = transposed_grouped_matmul(lhs, dout, gs, **MOSAIC)
  assert_close(np.float32(out2), np.float32(ref), atol=ATOL, rtol=RTOL, what="dispatch tgmm")


def test_unsupported_cases_name_a_reason():
  assert mosaic_gpu.unsupported_reason(jnp.bfloat16, jnp.bfloat16, jnp.bfloat16, 7168, 2048,
                                       rows=4096) is None
  assert "float32" in mosaic_gpu.unsupported_reason(jnp.float32, jnp.float32, jnp.float32,
                                                    128, 128)
  assert "multiple of 8" in mosaic_gpu.unsupported_reason(jnp.bfloat16, jnp.bfloat16,
                                                          jnp.bfloat16, 128, 128, rows=100)
  assert "multiple" in mosaic_gpu.unsupported_reason(jnp.bfloat16, jnp.bfloat16, jnp.bfloat16,
                                                     100, 128)
  with pytest.raises(ValueError, match="multiple"):
    mosaic_gpu.gmm(jnp.zeros((64, 100), jnp.bfloat16), jnp.zeros((2, 100, 128), jnp.bfloat16),
                   jnp.array([10, 20], jnp.int32))


def test_dispatch_raises_when_mosaic_is_forced_on_inputs_it_rejects(monkeypatch):
  """float32 operands (wgmma here takes bf16): gpu_impl="mosaic" raises naming the reason, for
  the forward, `tiling` and the transposed product; auto (on a Hopper GPU) runs Triton, which
  matches the reference."""
  import dsv3_jax.kernels_pallas.backend as backend
  monkeypatch.setattr(backend, "_is_hopper", lambda: True)
  lhs, rhs, dout, gs = _operands(3)
  lhs, rhs, dout = (x.astype(jnp.float32) for x in (lhs, rhs, dout))
  with pytest.raises(backend.KernelRequestError, match="grouped_matmul gpu_impl='mosaic'.*float32"):
    grouped_matmul(lhs, rhs, gs, **MOSAIC)
  with pytest.raises(backend.KernelRequestError, match="tiling"):
    grouped_matmul(lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16), gs, tiling=(64, 64, 64),
                   **MOSAIC)
  with pytest.raises(backend.KernelRequestError, match="transposed_grouped_matmul.*float32"):
    transposed_grouped_matmul(lhs, dout, gs, **MOSAIC)
  auto = grouped_matmul(lhs, rhs, gs, backend="interpret", platform="gpu")
  assert_close(auto, grouped_matmul_ref(lhs, rhs, gs), atol=1e-4, rtol=1e-5, what="auto f32")


@pytest.mark.parametrize("which", ["gmm", "gmm_transposed", "tgmm"])
def test_lowers_for_cuda_at_deepseek_v3_shapes(which):
  """Mosaic GPU compiles to a CUDA module on a CPU-only machine: catches layout/TMA errors."""
  t, d, f, g = 4096, 7168, 2048, 32
  s = jax.ShapeDtypeStruct
  gs = s((g,), jnp.int32)
  if which == "gmm":
    fn, args = (lambda a, b, c: mosaic_gpu.gmm(a, b, c)), (s((t, d), jnp.bfloat16),
                                                           s((g, d, f), jnp.bfloat16), gs)
  elif which == "gmm_transposed":
    fn, args = (lambda a, b, c: mosaic_gpu.gmm(a, b, c, transpose_rhs=True)), (
        s((t, f), jnp.bfloat16), s((g, d, f), jnp.bfloat16), gs)
  else:
    fn, args = (lambda a, b, c: mosaic_gpu.tgmm(a, b, c)), (s((t, d), jnp.bfloat16),
                                                            s((t, f), jnp.bfloat16), gs)
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert custom_calls(text, MOSAIC_GPU_CALL) == 1
