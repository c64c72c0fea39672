"""Our TPU training grouped matmuls with an accumulator (`acc=`, written in place through an
input_output alias): gmm (plain and rhs read transposed) and tgmm, in Pallas interpret mode,
against a float64 numpy oracle acc + per-group product; the public wrappers
(`grouped_matmul_dlhs`, `transposed_grouped_matmul(acc=)`) on the kernel and reference backends
against the same oracle; and the alias in the compiled TPU program (libtpu AOT on CPU).

Shapes as test_grouped_matmul_train.py (row tiles straddle groups, empty groups, NaN padding
rows past sum(group_sizes) that must never reach a result). Tolerances: f32 operands 1e-5
sqrt(k); bf16 operands with a bf16 acc/output: one rounding of the float32 sum, 2^-7 relative +
1e-3; with a float32 acc/output: 1e-4 sqrt(k).
"""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.kernels_pallas import grouped_matmul_dlhs, transposed_grouped_matmul
from dsv3_jax.kernels_pallas.grouped_matmul import tpu_train
from tests.kernels.test_grouped_matmul_train import (K, N, SIZES, TILES, T, _finite, _numpy_gmm,
                                                     _numpy_tgmm, _rows, _tol)
from tests.utils import TPU_CALL, assert_close


def _acc(shape, dtype, seed):
  return jnp.asarray(np.random.RandomState(seed).randn(*shape).astype(np.float32)).astype(dtype)


@pytest.mark.parametrize("dtype,out_dtype", [(jnp.float32, jnp.float32),
                                             (jnp.bfloat16, jnp.bfloat16),
                                             (jnp.bfloat16, jnp.float32)])
@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_gmm_acc_matches_numpy(dtype, out_dtype, transpose_rhs):
  """acc + lhs_g . rhs[g] on the groups' rows; rows past the groups keep acc exactly."""
  lhs = _rows((T, K), dtype, 0)
  w = jnp.asarray(np.random.RandomState(1).randn(len(SIZES), K, N).astype(np.float32)
                  / np.sqrt(K)).astype(dtype)
  rhs = jnp.swapaxes(w, 1, 2) if transpose_rhs else w
  acc = _acc((T, N), out_dtype, 2)
  out = jax.jit(lambda *a: tpu_train.gmm(*a[:3], transpose_rhs=transpose_rhs, tiles=TILES,
                                         interpret=True, acc=a[3]))(lhs, rhs, jnp.asarray(SIZES),
                                                                    acc)
  assert out.dtype == out_dtype and out.shape == (T, N)
  live = int(SIZES.sum())
  np.testing.assert_array_equal(np.asarray(out[live:]), np.asarray(acc[live:]))
  want = np.asarray(acc, np.float64) + _numpy_gmm(_finite(lhs), w.astype(jnp.float32), SIZES)
  assert_close(out, want, **_tol(dtype, out_dtype, K), what=f"gmm acc T={transpose_rhs}")


@pytest.mark.parametrize("dtype,out_dtype", [(jnp.float32, jnp.float32),
                                             (jnp.bfloat16, jnp.bfloat16),
                                             (jnp.bfloat16, jnp.float32)])
@pytest.mark.parametrize("sizes", [SIZES, np.zeros(6, np.int32)])
def test_tgmm_acc_matches_numpy(dtype, out_dtype, sizes):
  """acc[g] + lhs_g^T . dout_g; empty groups keep acc exactly (float32 accumulates in the output
  block, bf16 in a scratch)."""
  lhs, dout = _rows((T, K), dtype, 3, sizes), _rows((T, N), dtype, 4, sizes)
  acc = _acc((len(sizes), K, N), out_dtype, 5)
  out = jax.jit(lambda *a: tpu_train.tgmm(*a[:3], tiles=TILES, interpret=True, acc=a[3]))(
      lhs, dout, jnp.asarray(sizes), acc)
  assert out.dtype == out_dtype and out.shape == acc.shape
  np.testing.assert_array_equal(np.asarray(out)[sizes == 0], np.asarray(acc)[sizes == 0])
  want = np.asarray(acc, np.float64) + _numpy_tgmm(_finite(lhs), _finite(dout), sizes)
  assert_close(out, want, **_tol(dtype, out_dtype, max(1, int(sizes.max()))), what="tgmm acc")


@pytest.mark.parametrize("backend,platform", [("interpret", "tpu"), ("interpret", "gpu"),
                                              ("reference", "tpu")])
def test_public_wrappers_with_acc(backend, platform):
  """grouped_matmul_dlhs (dout . rhs^T) and transposed_grouped_matmul, with and without acc, on
  the TPU kernels, the GPU kernels (both interpreted; GPU adds acc after the kernel) and the
  reference backend, against numpy."""
  dt = jnp.float32
  dout = _rows((T, N), dt, 6)
  rhs = _acc((len(SIZES), K, N), dt, 7) / np.sqrt(N)
  lhs = _rows((T, K), dt, 8)
  gs = jnp.asarray(SIZES)
  kw = dict(backend=backend, platform=platform)
  dlhs = _numpy_gmm(_finite(dout), np.swapaxes(np.asarray(rhs), 1, 2), SIZES)
  drhs = _numpy_tgmm(_finite(lhs), _finite(dout), SIZES)
  acc_l, acc_r = _acc((T, K), dt, 9), _acc((len(SIZES), K, N), dt, 10)
  live = int(SIZES.sum())
  got = grouped_matmul_dlhs(dout, rhs, gs, **kw)
  assert not np.asarray(got)[live:].any()
  assert_close(got, dlhs, **_tol(dt, dt, N), what=f"dlhs {backend}")
  got = grouped_matmul_dlhs(dout, rhs, gs, acc=acc_l, **kw)
  assert_close(got, np.asarray(acc_l, np.float64) + dlhs, **_tol(dt, dt, N),
               what=f"dlhs acc {backend}")
  assert_close(transposed_grouped_matmul(lhs, dout, gs, acc=acc_r, **kw),
               np.asarray(acc_r, np.float64) + drhs, **_tol(dt, dt, live),
               what=f"drhs acc {backend}")
  with pytest.raises(ValueError, match="acc must be"):
    grouped_matmul_dlhs(dout, rhs, gs, acc=acc_r, **kw)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu (the test extra) is needed to compile for TPU on CPU")
def test_acc_is_aliased_in_the_tpu_program():
  """Compiled for v5p (libtpu AOT on CPU), both kernels with acc= alias it to their output: the
  custom calls carry output_to_operand_aliasing, and with acc donated the program needs no
  temporary of the output's size (no copy of acc)."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  device = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu").devices[0]
  sd = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(  # noqa: E731
      shape, dt, sharding=jax.sharding.SingleDeviceSharding(device))
  t, k, n, g = 1024, 1024, 512, 4

  def step(x, w, dy, gs, acc_x, acc_w):
    return (tpu_train.gmm(dy, w, gs, transpose_rhs=True, acc=acc_x),
            tpu_train.tgmm(x, dy, gs, acc=acc_w))

  compiled = jax.jit(step, donate_argnums=(4, 5)).lower(
      sd((t, k)), sd((g, k, n)), sd((t, n)), sd((g,), jnp.int32), sd((t, k)),
      sd((g, k, n))).compile()
  text = compiled.as_text()
  calls = [l for l in text.splitlines() if f'custom_call_target="{TPU_CALL}"' in l]
  assert len(calls) == 2 and all("output_to_operand_aliasing" in l for l in calls), calls
  assert compiled.memory_analysis().temp_size_in_bytes < g * k * n * 2 // 4
