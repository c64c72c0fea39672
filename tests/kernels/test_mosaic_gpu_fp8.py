"""Mosaic GPU (Hopper) block-scaled FP8 GEMM: GPU interpret mode on CPU against a float64 numpy
oracle, CUDA lowering at DeepSeek-V3 shapes (Mosaic GPU lowers without a GPU), and the
dispatcher's rules (auto: Triton for shapes Mosaic GPU rejects; gpu_impl="mosaic": an error).

Oracle: numpy float64 sum_k (a * a_scale)[m, k] (b * b_scale)[n, k] with the 1 x 128 / 128 x 128
scale tiles expanded by hand. Tolerances: e4m3 x e4m3 products are exact in float32 and the
kernel adds float32 partials per 128-wide K block, so a float32 output agrees with the float64
oracle to summation-order noise (we allow 1e-5 of the output's max magnitude, ~100 float32 ulps);
a bf16 output adds one bf16 rounding (relative 2^-8), so rtol 2^-7 plus that atol.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.kernels_pallas import fp8
from dsv3_jax.kernels_pallas.fp8 import mosaic_gpu
from tests.utils import MOSAIC_GPU_CALL, assert_close, custom_calls

MOSAIC = dict(backend="interpret", platform="gpu", gpu_impl="mosaic")


# Mosaic GPU interpreter programs compiled once per kernel, everything without XLA's CPU
# optimisations: the checks are at tolerance.
pytestmark = pytest.mark.usefixtures("module_interpreter_fast_compiles")


def _operands(m, n, k, seed=0):
  """Quantised a [m,k] with [m, k/128] scales, b [n,k] e4m3 with random [ceil(n/128), k/128]."""
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  a, a_scale = fp8.quantize_activations(jax.random.normal(k1, (m, k), jnp.float32),
                                        backend="reference")
  b = (jax.random.normal(k2, (n, k), jnp.float32) * 8).astype(jnp.float8_e4m3fn)
  b_scale = jax.random.uniform(k3, (-(-n // 128), k // 128), jnp.float32, 0.01, 0.03)
  return a, a_scale, b, b_scale


def _oracle(a, a_scale, b, b_scale):
  a64 = np.asarray(a.astype(jnp.float32), np.float64)
  b64 = np.asarray(b.astype(jnp.float32), np.float64)
  n, k = b64.shape
  sa = np.repeat(np.asarray(a_scale, np.float64), 128, axis=1)[:, :k]
  sb = np.repeat(np.repeat(np.asarray(b_scale, np.float64), 128, 0), 128, 1)[:n, :k]
  return (a64 * sa) @ (b64 * sb).T


@pytest.mark.parametrize("m,n,k,config", [
    # partial M tile (104 = 64 + 40), N = 192 (64-wide tiles, a partial weight scale block),
    # 4 K blocks = 2 pipeline steps (the carried, overlapped promotion crosses a step)
    (104, 192, 512, None),
    # 128-row tiles, 2 stages, one partial tile of 8 rows, 6 K blocks
    (136, 128, 768, (128, 128, 2, 1)),
])
def test_float32_output_matches_float64_oracle(m, n, k, config):
  a, a_scale, b, b_scale = _operands(m, n, k)
  out = mosaic_gpu.fp8_matmul(a, a_scale, b, b_scale, out_dtype=jnp.float32, config=config,
                              interpret=True)
  want = _oracle(a, a_scale, b, b_scale)
  assert out.shape == (m, n) and out.dtype == jnp.float32
  assert_close(out, want, atol=1e-5 * np.abs(want).max(), what=f"{m}x{n}x{k}")


def test_dispatcher_bf16_output_single_step():
  m, n, k = 72, 256, 256  # one pipeline step; two N tiles in two weight scale blocks
  a, a_scale, b, b_scale = _operands(m, n, k, seed=1)
  out = fp8.fp8_matmul(a, a_scale, b, b_scale, **MOSAIC)
  want = _oracle(a, a_scale, b, b_scale)
  assert out.dtype == jnp.bfloat16
  assert_close(out, want, rtol=2.0 ** -7, atol=1e-5 * np.abs(want).max(), what="bf16")


def test_unsupported_shapes_name_a_reason():
  e4m3 = jnp.float8_e4m3fn
  assert mosaic_gpu.unsupported_reason(e4m3, e4m3, 4096, 2048, 7168) is None
  assert mosaic_gpu.unsupported_reason(e4m3, e4m3, 4096, 576, 7168) is None  # kv_a: bn = 64
  assert "multiple of 256" in mosaic_gpu.unsupported_reason(e4m3, e4m3, 64, 128, 384)
  assert "multiple of 16" in mosaic_gpu.unsupported_reason(e4m3, e4m3, 64, 200, 256)
  assert "multiple of 8" in mosaic_gpu.unsupported_reason(e4m3, e4m3, 100, 128, 256)
  assert "e4m3" in mosaic_gpu.unsupported_reason(jnp.bfloat16, e4m3, 64, 128, 256)
  with pytest.raises(ValueError, match="multiple of 8"):
    mosaic_gpu.fp8_matmul(*_operands(100, 128, 256), interpret=True)


@pytest.mark.parametrize("m,k,want", [(104, 512, "mosaic"), (100, 512, "triton"),
                                      (104, 384, "triton")])
def test_dispatcher_auto_uses_triton_for_rejected_shapes(monkeypatch, m, k, want):
  """Auto on a Hopper GPU runs Mosaic GPU where it can and Triton for the shapes it rejects;
  gpu_impl="mosaic" runs Mosaic GPU or raises naming the reason; "triton" always runs Triton."""
  import dsv3_jax.kernels_pallas.backend as backend
  monkeypatch.setattr(backend, "_is_hopper", lambda: True)
  called = []

  def recorder(name):
    def fake(a, a_scale, b, b_scale, *, out_dtype, interpret):
      called.append(name)
      return jnp.zeros((a.shape[0], b.shape[0]), out_dtype)
    return fake

  monkeypatch.setattr(fp8.mosaic_gpu, "fp8_matmul", recorder("mosaic"))
  monkeypatch.setattr(fp8.gpu, "fp8_matmul", recorder("triton"))
  auto = dict(backend="interpret", platform="gpu")
  fp8.fp8_matmul(*_operands(m, 128, k), **auto)
  fp8.fp8_matmul(*_operands(m, 128, k), **auto, gpu_impl="triton")
  assert called == [want, "triton"]
  if want == "triton":
    with pytest.raises(backend.KernelRequestError, match="gpu_impl='mosaic'.*multiple"):
      fp8.fp8_matmul(*_operands(m, 128, k), **MOSAIC)
  else:
    fp8.fp8_matmul(*_operands(m, 128, k), **MOSAIC)
    assert called[-1] == "mosaic"


@pytest.mark.parametrize("n,k", [(2048, 7168), (7168, 2048), (18432, 7168)])
def test_lowers_for_cuda_at_deepseek_v3_shapes(n, k):
  """Mosaic GPU compiles to a CUDA module on a CPU-only machine: catches layout/TMA errors."""
  m = 4096
  s = jax.ShapeDtypeStruct
  args = (s((m, k), jnp.float8_e4m3fn), s((m, k // 128), jnp.float32),
          s((n, k), jnp.float8_e4m3fn), s((-(-n // 128), k // 128), jnp.float32))
  text = jax.jit(mosaic_gpu.fp8_matmul).trace(*args).lower(
      lowering_platforms=("cuda",)).as_text()
  assert custom_calls(text, MOSAIC_GPU_CALL) == 1
