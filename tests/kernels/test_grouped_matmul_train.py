"""Our TPU grouped matmul kernels for training (tpu_train.py: gmm, gmm with rhs read transposed,
tgmm) in Pallas interpret mode against a float64 numpy per-group loop, with small tiles so that
row tiles straddle group boundaries, K and N span several tiles with an overhang, T is not a
multiple of the row tile, and groups are empty (first, middle, last); plus their work list.

Rows past sum(group_sizes) hold NaN in the kernel tests: the kernels must never multiply them
into a result (gmm writes zeros there, tgmm never reads them), which is what lets a capacity-
sized receive buffer cost only its live rows.

Tolerances: f32 operands, float32 sums of k O(1) products: 1e-5 sqrt(k) absolute; bf16 operands
(exact products, float32 sums) with one output rounding: 2^-7 relative + 1e-3 (as
test_grouped_matmul.py); bf16 with a float32 output: the sums only, 1e-4 sqrt(k).
"""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.kernels_pallas.grouped_matmul import (grouped_matmul, reference, schedule,
                                                    tpu_train)
from tests.utils import TPU_CALL, assert_close

T, K, N = 45, 200, 160
SIZES = np.array([0, 7, 0, 20, 13, 0], np.int32)  # sum 40 < 45: rows 40..44 are padding
TILES = (16, 128, 128)


def _numpy_gmm(lhs, rhs, sizes):
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  out, start = np.zeros((lhs.shape[0], rhs.shape[2])), 0
  for g, size in enumerate(sizes):
    out[start:start + size] = lhs[start:start + size] @ rhs[g]
    start += size
  return out


def _numpy_tgmm(lhs, dout, sizes):
  lhs, dout = np.asarray(lhs, np.float64), np.asarray(dout, np.float64)
  out, start = np.zeros((len(sizes), lhs.shape[1], dout.shape[1])), 0
  for g, size in enumerate(sizes):
    out[g] = lhs[start:start + size].T @ dout[start:start + size]
    start += size
  return out


def _rows(shape, dtype, seed, sizes=SIZES):
  """Random rows, NaN past sum(sizes) (the padding of a receive buffer)."""
  a = np.random.RandomState(seed).randn(*shape).astype(np.float32)
  a[int(np.sum(sizes)):] = np.nan
  return jnp.asarray(a).astype(dtype)


def _finite(a):
  return np.nan_to_num(np.asarray(a, np.float32), nan=0.0)


def _tol(dtype, out_dtype, k):
  if dtype == jnp.float32:
    return dict(atol=1e-5 * np.sqrt(k), rtol=1e-5)
  if out_dtype == jnp.float32:
    return dict(atol=1e-4 * np.sqrt(k), rtol=1e-5)
  return dict(atol=1e-3, rtol=2.0 ** -7)


@pytest.mark.parametrize("sizes,rows,bm", [
    ([0, 7, 0, 20, 13, 0], 45, 16),
    ([16, 16, 13], 45, 16),        # boundaries on tile edges
    ([0, 0, 0], 33, 8),            # every group empty: one zero-writing item each
    ([50, 0], 50, 128),            # one partial tile, then an empty group at the end
    ([1] * 9, 40, 4),              # several groups per tile
    ([30, 30], 40, 16),            # sum > T: clipped, the second group ends at T
])
def test_group_tile_schedule(sizes, rows, bm):
  """Every group has >= 1 consecutive items, in group order; the items of a non-empty group
  cover exactly its rows (clipped to T) once; empty groups' items write nothing and repeat the
  previous item's tile; no item touches rows past the sum."""
  build = jax.jit(schedule.group_tile_schedule, static_argnums=(1, 2))
  sched = jax.tree.map(np.asarray, build(jnp.asarray(sizes, jnp.int32), rows, bm))
  count = int(sched.num_items)
  assert count <= len(sched.tile) == -(-rows // bm) + len(sizes)
  ends = np.minimum(np.cumsum(sizes), rows)
  starts = np.concatenate([[0], ends[:-1]])
  group = sched.group[:count]
  assert np.all(np.diff(group) >= 0) and set(group) == set(range(len(sizes)))
  written = np.zeros(rows, int)
  for i in range(count):
    t, g, lo, hi = sched.tile[i], sched.group[i], sched.lo[i], sched.hi[i]
    assert 0 <= t < -(-rows // bm)
    if ends[g] > starts[g]:
      assert t * bm <= lo < hi <= min(rows, (t + 1) * bm) and starts[g] <= lo and hi <= ends[g]
    else:
      assert lo == hi and (i == 0 or t == sched.tile[i - 1])
    written[lo:hi] += 1
  np.testing.assert_array_equal(written[:ends[-1]], 1)
  assert not written[ends[-1]:].any()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_gmm_matches_numpy(dtype, transpose_rhs):
  lhs = _rows((T, K), dtype, 0)
  w = np.random.RandomState(1).randn(len(SIZES), K, N).astype(np.float32) / np.sqrt(K)
  w = jnp.asarray(w).astype(dtype)
  rhs = jnp.swapaxes(w, 1, 2) if transpose_rhs else w
  out = tpu_train.gmm(lhs, rhs, jnp.asarray(SIZES), transpose_rhs=transpose_rhs, tiles=TILES,
                      interpret=True)
  assert out.dtype == dtype and out.shape == (T, N)
  assert np.all(np.asarray(out, np.float32)[SIZES.sum():] == 0)  # NaN padding never leaks
  assert_close(out, _numpy_gmm(_finite(lhs), w.astype(jnp.float32), SIZES),
               **_tol(dtype, dtype, K), what=f"gmm {dtype.__name__} T={transpose_rhs}")


@pytest.mark.parametrize("dtype,out_dtype", [(jnp.float32, jnp.float32),
                                             (jnp.bfloat16, jnp.bfloat16),
                                             (jnp.bfloat16, jnp.float32)])
@pytest.mark.parametrize("sizes", [SIZES, np.array([0, 0, 45, 0, 0, 0], np.int32),
                                   np.zeros(6, np.int32)])
def test_tgmm_matches_numpy(dtype, out_dtype, sizes):
  """float32 outputs accumulate in the output block itself, others in a scratch."""
  lhs, dout = _rows((T, K), dtype, 2, sizes), _rows((T, N), dtype, 3, sizes)
  out = tpu_train.tgmm(lhs, dout, jnp.asarray(sizes), out_dtype=out_dtype, tiles=TILES,
                       interpret=True)
  assert out.dtype == out_dtype and out.shape == (len(sizes), K, N)
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
  assert not np.asarray(out, np.float32)[sizes == 0].any()  # empty groups: exact zeros
  assert_close(out, _numpy_tgmm(_finite(lhs), _finite(dout), sizes),
               **_tol(dtype, out_dtype, int(sizes.max())), what=f"tgmm {sizes}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradients_match_ragged_dot(dtype):
  """jax.grad through `grouped_matmul` (TPU kernels, interpret mode: forward gmm, then gmm with
  rhs transposed and tgmm in the custom VJP) equals jax's gradient of `jax.lax.ragged_dot` (the
  reference backend) on the same bf16/f32 operands; rows = the live rows (cost estimate only)."""
  rng = np.random.RandomState(4)
  lhs = jnp.asarray(rng.randn(T, K).astype(np.float32)).astype(dtype)
  rhs = jnp.asarray(rng.randn(len(SIZES), K, N).astype(np.float32) / np.sqrt(K)).astype(dtype)
  cot = jnp.asarray(rng.randn(T, N).astype(np.float32))
  gs = jnp.asarray(SIZES)

  def loss(lhs, rhs, backend):
    out = grouped_matmul(lhs, rhs, gs, backend=backend, platform="tpu", rows=40)
    return jnp.sum(out.astype(jnp.float32) * cot)

  got = jax.grad(loss, argnums=(0, 1))(lhs, rhs, "interpret")
  want = jax.grad(loss, argnums=(0, 1))(lhs, rhs, "reference")
  for name, g, w, k in (("dlhs", got[0], want[0], N), ("drhs", got[1], want[1], T)):
    assert g.dtype == dtype
    assert_close(g, w, **_tol(dtype, dtype, k), what=f"{name} {dtype.__name__}")
  assert not np.asarray(got[1], np.float32)[SIZES == 0].any()
  assert not np.asarray(got[0], np.float32)[SIZES.sum():].any()
  # and the weight gradient against the numpy oracle of the same product
  assert_close(got[1], _numpy_tgmm(lhs.astype(jnp.float32), cot.astype(dtype).astype(jnp.float32),
                                   SIZES), **_tol(dtype, dtype, T), what="drhs numpy")


def test_stacked_gmm_at_layer_matches_reference():
  """gmm reading the [L, G, K, N] stack at a traced layer equals the reference at that layer."""
  rng = np.random.RandomState(5)
  lhs = jnp.asarray(rng.randn(T, K).astype(np.float32))
  stack = jnp.asarray(rng.randn(3, len(SIZES), K, N).astype(np.float32) / np.sqrt(K))
  run = jax.jit(lambda x, w, i: tpu_train.gmm(x, w, jnp.asarray(SIZES), i, tiles=TILES,
                                              interpret=True))
  for layer in (0, 2):
    want = reference.grouped_matmul_ref(lhs, stack, jnp.asarray(SIZES), layer=layer)
    assert_close(run(lhs, stack, jnp.int32(layer)), want, **_tol(jnp.float32, None, K),
                 what=f"layer {layer}")


def test_tile_validation():
  x, w = jnp.zeros((8, 128)), jnp.zeros((2, 128, 128))
  with pytest.raises(ValueError, match="multiples of"):
    tpu_train.gmm(x, w, jnp.array([4, 4]), tiles=(8, 100, 128), interpret=True)
  with pytest.raises(ValueError, match="K = 128"):
    tpu_train.gmm(x, jnp.zeros((2, 128, 256)), jnp.array([4, 4]), transpose_rhs=True)
  with pytest.raises(ValueError, match="num_groups"):
    tpu_train.tgmm(x, x, jnp.array([4, 4]), num_groups=3, interpret=True)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu (the test extra) is needed to compile for TPU on CPU")
@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1", "v6e:2x2", "tpu7x:2x2x1"])
def test_kernels_compile_for_tpu(topology):
  """Mosaic (libtpu AOT on CPU) compiles the forward, transposed and weight-gradient kernels
  (bf16, f32 weight-gradient output) for each TPU generation at a small shape with partial
  tiles: block shapes, the transposed-lhs dot and VMEM use are legal on the chip."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  device = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]
  sd = lambda shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(  # noqa: E731
      shape, dt, sharding=jax.sharding.SingleDeviceSharding(device))
  t, k, n, g = 600, 1152, 384, 4

  def step(x, w, dy, gs):  # the forward and both backward products of x . w
    return (tpu_train.gmm(x, w, gs), tpu_train.gmm(dy, w, gs, transpose_rhs=True),
            tpu_train.tgmm(x, dy, gs, out_dtype=jnp.float32))

  compiled = jax.jit(step).lower(sd((t, k)), sd((g, k, n)), sd((t, n)),
                                 sd((g,), jnp.int32)).compile()
  assert compiled.as_text().count(f'custom_call_target="{TPU_CALL}"') == 3
