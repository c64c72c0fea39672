"""Grouped (MoE) matmul: references against a numpy per-group loop, kernels against references.

Group layouts cover empty groups (first, middle, last), uneven sizes, a sum below T (trailing
rows must come out zero), tiles straddling group boundaries and T not a multiple of the row tile.
Kernels run in Pallas interpret mode (TPU: our gmm/tgmm for bf16/f32 and our FP8 kernel; GPU: our
Triton kernels) and are lowered for TPU and CUDA on this CPU-only install.
"""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsv3_jax.kernels_pallas.backend import KernelRequestError, gpu_lowering_target
from dsv3_jax.kernels_pallas.fp8 import reference as fp8_reference
from dsv3_jax.kernels_pallas.grouped_matmul import (gpu, grouped_matmul, grouped_matmul_fp8,
                                                    reference, schedule, tpu,
                                                    transposed_grouped_matmul)
from tests.utils import TPU_CALL, TRITON_CALL, assert_close, custom_calls

PLATFORMS = ("tpu", "gpu")
T, K, N = 45, 200, 160
SIZES = np.array([0, 7, 0, 20, 13, 0], np.int32)  # sum 40 < 45; groups straddle 16-row tiles
# Forward tiles (bm, bk, bn) giving partial tiles along T, K and N.
TILES = {"tpu": (16, 128, 128), "gpu": (16, 64, 64)}


def _numpy_gmm(lhs, rhs, sizes) -> np.ndarray:
  """Independent oracle: float64 per-group loop; rows past the sum stay zero."""
  lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
  out = np.zeros((lhs.shape[0], rhs.shape[2]))
  start = 0
  for g, size in enumerate(sizes):
    out[start:start + size] = lhs[start:start + size] @ rhs[g]
    start += size
  return out


def _numpy_tgmm(lhs, dout, sizes) -> np.ndarray:
  lhs, dout = np.asarray(lhs, np.float64), np.asarray(dout, np.float64)
  out = np.zeros((len(sizes), lhs.shape[1], dout.shape[1]))
  start = 0
  for g, size in enumerate(sizes):
    out[g] = lhs[start:start + size].T @ dout[start:start + size]
    start += size
  return out


def _operands(dtype, seed=0):
  rng = np.random.RandomState(seed)
  lhs = jnp.asarray(rng.randn(T, K).astype(np.float32)).astype(dtype)
  rhs = jnp.asarray(rng.randn(len(SIZES), K, N).astype(np.float32) / np.sqrt(K)).astype(dtype)
  return lhs, rhs, jnp.asarray(SIZES)


def _tol(dtype, k):
  """f32: float32 sums of k products of O(1) terms. bf16 inputs: exact products, float32 sums,
  one bf16 rounding of the output (2^-8 relative)."""
  if dtype == jnp.float32:
    return dict(atol=1e-5 * np.sqrt(k), rtol=1e-5)
  return dict(atol=1e-3, rtol=2.0 ** -7)


# ---------------------------------------------------------------------------------------------
# The row-tile work list.

@pytest.mark.parametrize("sizes,rows,bm", [
    ([0, 7, 0, 20, 13, 0], 45, 16),
    ([16, 16, 13], 45, 16),        # sum == T, boundaries on tile edges
    ([0, 0, 0], 33, 8),            # every group empty: all rows belong to the zero group
    ([50], 50, 128),               # one group, one partial tile
    ([1] * 9, 40, 4),              # many tiny groups, several per tile
])
def test_schedule_covers_every_row_once(sizes, rows, bm):
  build = jax.jit(schedule.row_tile_schedule, static_argnums=(1, 2))
  sched = jax.tree.map(np.asarray, build(jnp.asarray(sizes, jnp.int32), rows, bm))
  count = int(sched.num_items)
  assert count <= len(sched.tile) == -(-rows // bm) + len(sizes)
  ends = np.cumsum(sizes)
  starts = ends - np.asarray(sizes)
  written = np.zeros(rows, int)
  for i in range(count):
    t, g, lo, hi = sched.tile[i], sched.group[i], sched.lo[i], sched.hi[i]
    assert t * bm <= lo < hi <= min(rows, (t + 1) * bm)
    if g < len(sizes):
      assert starts[g] <= lo and hi <= ends[g]
    else:  # the virtual group: rows past the sum
      assert lo >= ends[-1]
    written[lo:hi] += 1
  np.testing.assert_array_equal(written, 1)
  sizes = np.asarray(sizes)
  pairs = np.where(sizes > 0, (ends - 1) // bm - starts // bm + 1, 0).sum()
  assert np.sum(sched.group[:count] < len(sizes)) == pairs  # what the cost estimate counts
  assert np.all(np.diff(sched.tile[:count]) >= 0)  # output tiles revisited only consecutively
  assert np.all(sched.hi[count:] == sched.lo[count:])  # padding items write nothing


# ---------------------------------------------------------------------------------------------
# References.

def test_references_match_numpy():
  lhs, rhs, gs = _operands(jnp.float32)
  assert_close(reference.grouped_matmul_ref(lhs, rhs, gs), _numpy_gmm(lhs, rhs, SIZES),
               **_tol(jnp.float32, K), what="grouped_matmul_ref")
  dout = jnp.asarray(np.random.RandomState(1).randn(T, N).astype(np.float32))
  assert_close(reference.transposed_grouped_matmul_ref(lhs, dout, gs),
               _numpy_tgmm(lhs, dout, SIZES), **_tol(jnp.float32, T),
               what="transposed_grouped_matmul_ref")
  # FP8: dequantise with ml_dtypes and multiply in float64.
  w8, w_scale = _fp8_weights()
  w64 = np.asarray(w8).astype(np.float64) * np.repeat(
      np.repeat(np.asarray(w_scale, np.float64), 128, 1), 128, 2)[:, :N, :K]
  want = _numpy_gmm(lhs, np.swapaxes(w64, 1, 2), SIZES)
  got = reference.grouped_matmul_fp8_ref(lhs, w8, w_scale, gs, out_dtype=jnp.float32)
  assert_close(got, want, **_tol(jnp.float32, K), what="grouped_matmul_fp8_ref")


# ---------------------------------------------------------------------------------------------
# bf16 / f32 kernels, forward and backward.

@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_grouped_matmul_kernel_matches_reference(platform, dtype):
  lhs, rhs, gs = _operands(dtype)
  ref = reference.grouped_matmul_ref(lhs, rhs, gs, out_dtype=jnp.float32)
  out = grouped_matmul(lhs, rhs, gs, tiling=TILES[platform], backend="interpret",
                          platform=platform)
  assert out.dtype == dtype and out.shape == (T, N)
  assert_close(out, ref, **_tol(dtype, K), what=f"{platform} {dtype.__name__} forward")
  assert not np.any(np.asarray(out)[SIZES.sum():])  # rows past sum(group_sizes) are zero


@pytest.mark.parametrize("platform", PLATFORMS)
def test_grouped_matmul_gradients_match_reference(platform):
  lhs, rhs, gs = _operands(jnp.float32)
  cot = jnp.asarray(np.random.RandomState(2).randn(T, N).astype(np.float32))

  def loss(lhs, rhs, backend):
    out = grouped_matmul(lhs, rhs, gs, backend=backend, platform=platform)
    return jnp.sum(out * cot)

  dlhs, drhs = jax.grad(loss, argnums=(0, 1))(lhs, rhs, "interpret")
  dlhs_ref, drhs_ref = jax.grad(loss, argnums=(0, 1))(lhs, rhs, "reference")
  assert_close(dlhs, dlhs_ref, **_tol(jnp.float32, N), what=f"{platform} dlhs")
  assert_close(drhs, drhs_ref, **_tol(jnp.float32, T), what=f"{platform} drhs")
  assert not np.any(np.asarray(drhs)[SIZES == 0])  # empty groups get zero weight gradients
  assert not np.any(np.asarray(dlhs)[SIZES.sum():])
  # The backward products against the numpy oracle directly.
  assert_close(drhs, _numpy_tgmm(lhs, cot, SIZES), **_tol(jnp.float32, T), what="drhs oracle")


@pytest.mark.parametrize("platform", PLATFORMS)
def test_degenerate_group_layouts(platform):
  rng = np.random.RandomState(3)
  lhs = jnp.asarray(rng.randn(24, 32).astype(np.float32))
  rhs = jnp.asarray(rng.randn(3, 32, 16).astype(np.float32))
  for sizes in ([0, 0, 0], [24, 0, 0], [0, 0, 24]):
    gs = jnp.asarray(sizes, jnp.int32)
    out = grouped_matmul(lhs, rhs, gs, backend="interpret", platform=platform)
    assert_close(out, _numpy_gmm(lhs, rhs, sizes), **_tol(jnp.float32, 32), what=str(sizes))
    drhs = transposed_grouped_matmul(lhs, out, gs, backend="interpret", platform=platform)
    assert_close(drhs, _numpy_tgmm(lhs, out, sizes), atol=1e-3, rtol=1e-5, what=str(sizes))


# ---------------------------------------------------------------------------------------------
# FP8 (inference): rhs [G, N, K] e4m3 with per-expert 128 x 128 block scales.

def _fp8_weights(seed=4):
  rng = np.random.RandomState(seed)
  g, nb, kb = len(SIZES), -(-N // 128), -(-K // 128)
  w8 = jnp.asarray(np.clip(rng.randn(g, N, K) * 64, -448, 448).astype(ml_dtypes.float8_e4m3fn))
  scale = jnp.asarray((rng.uniform(0.5, 2.0, (g, nb, kb)) / (64 * np.sqrt(K))).astype(np.float32))
  return w8, scale


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("fp8_lhs,sizes", [
    (False, SIZES),
    (True, np.array([0, 5, 0, 9, 0, 0], np.int32)),  # rows 14..44: two whole tiles of zeros
])
def test_grouped_matmul_fp8_kernel_matches_reference(platform, fp8_lhs, sizes):
  lhs, _, _ = _operands(jnp.bfloat16)
  gs = jnp.asarray(sizes)
  w8, w_scale = _fp8_weights()
  lhs_scale = None
  if fp8_lhs:
    lhs, lhs_scale = fp8_reference.quantize_activations_ref(lhs)
  ref = reference.grouped_matmul_fp8_ref(lhs, w8, w_scale, gs, lhs_scale=lhs_scale,
                                         out_dtype=jnp.float32)
  tiling = (16, 128, 128) if platform == "tpu" else (16, 128, 64)
  out = grouped_matmul_fp8(lhs, w8, w_scale, gs, lhs_scale=lhs_scale, tiling=tiling,
                              backend="interpret", platform=platform)
  assert out.dtype == jnp.bfloat16 and out.shape == (T, N)
  # GPU: exact products, one bf16 output rounding. TPU: operands rounded to bf16 after
  # dequantisation (2^-9 relative each) before the MXU, ~2^-9 * sqrt(K) of |a||w| per output.
  assert_close(out, ref, atol=2e-2 if platform == "tpu" else 1e-3, rtol=2.0 ** -7,
               what=f"{platform} fp8 lhs={fp8_lhs}")
  assert not np.any(np.asarray(out.astype(jnp.float32))[sizes.sum():])


# ---------------------------------------------------------------------------------------------
# Stacked weights read at a layer index (inference): rhs [L, G, K, N] / FP8 [L, G, N, K].

L = 3


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_grouped_matmul_at_layer_matches_reference(dtype):
  """The TPU kernel that reads the whole stack at a (traced) layer index, in interpret mode,
  against the numpy oracle on rhs[layer] and the reference with layer= (tolerances as the
  unstacked kernel: `_tol`)."""
  lhs, _, gs = _operands(dtype)
  rng = np.random.RandomState(5)
  stack = jnp.asarray(rng.randn(L, len(SIZES), K, N).astype(np.float32) / np.sqrt(K)).astype(dtype)
  run = jax.jit(lambda x, w, g, layer: grouped_matmul(
      x, w, g, layer=layer, tiling=TILES["tpu"], backend="interpret", platform="tpu"))
  for layer in range(L):
    want = _numpy_gmm(lhs, stack[layer], SIZES)
    out = run(lhs, stack, gs, jnp.int32(layer))
    assert out.dtype == dtype and out.shape == (T, N)
    assert_close(out, want, **_tol(dtype, K), what=f"layer {layer} {dtype.__name__}")
    ref = reference.grouped_matmul_ref(lhs, stack, gs, layer=layer, out_dtype=jnp.float32)
    assert_close(ref, want, **_tol(dtype, K), what=f"reference layer {layer}")
    assert not np.any(np.asarray(out)[SIZES.sum():])
  # A bf16 stack under f32 activations: tiles cast in VMEM, the stack is not converted.
  out = run(lhs.astype(jnp.float32), stack.astype(jnp.bfloat16), gs, jnp.int32(1))
  want = _numpy_gmm(lhs.astype(jnp.float32), stack.astype(jnp.bfloat16)[1], SIZES)
  assert out.dtype == jnp.float32
  assert_close(out, want, **_tol(jnp.float32, K), what="bf16 stack, f32 lhs")
  with pytest.raises(TypeError, match="no gradient"):
    jax.grad(lambda w: run(lhs, w, gs, jnp.int32(0)).astype(jnp.float32).sum())(stack)
  with pytest.raises(ValueError, match=r"\[L, G, K, N\]"):
    grouped_matmul(lhs, stack[0], gs, layer=0)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_grouped_matmul_fp8_at_layer_matches_reference(platform):
  lhs, _, _ = _operands(jnp.bfloat16)
  sizes = np.array([0, 5, 0, 9, 30, 0], np.int32)
  gs = jnp.asarray(sizes)
  ws = [_fp8_weights(seed) for seed in (6, 7)]
  w8, w_scale = jnp.stack([w for w, _ in ws]), jnp.stack([s for _, s in ws])
  tiling = (16, 128, 128) if platform == "tpu" else (16, 128, 64)
  run = jax.jit(lambda x, w, s, g, layer: grouped_matmul_fp8(
      x, w, s, g, layer=layer, tiling=tiling, backend="interpret", platform=platform))
  for layer in range(2):
    ref = reference.grouped_matmul_fp8_ref(lhs, ws[layer][0], ws[layer][1], gs,
                                           out_dtype=jnp.float32)
    out = run(lhs, w8, w_scale, gs, jnp.int32(layer))
    # As the unstacked FP8 test: bf16 rounding of the decoded operands on TPU.
    assert_close(out, ref, atol=2e-2 if platform == "tpu" else 1e-3, rtol=2.0 ** -7,
                 what=f"{platform} fp8 layer {layer}")
    assert_close(reference.grouped_matmul_fp8_ref(lhs, w8, w_scale, gs, layer=layer,
                                                  out_dtype=jnp.float32), ref, atol=0,
                 what="fp8 reference at layer")


@pytest.mark.parametrize("rows,groups,bm,hand", [
    (8, 4, 16, 3.6),      # a decode step's few rows: ~3.6 of 4 groups non-empty, one tile
    (512, 4, 256, 5.0),   # every group non-empty, one boundary inside a group
    (100, 3, 16, 9.0),    # 3 groups and 6 internal boundaries
    (1, 4, 16, 1.0),
])
def test_estimate_items_matches_the_schedule_on_average(rows, groups, bm, hand):
  """The cost estimate's closed form for the expected work items equals (a) the hand value
  (3.6 = 4 (1 - 0.75^8)) and (b) within 5%, the mean over 2000 random uniform routings of
  `rows` rows of the (row tile, group) pairs with rows, counted directly (a group spanning rows
  [s, e) meets tiles s // bm .. (e - 1) // bm), which is what `row_tile_schedule` lists
  (test_schedule_covers_every_row_once)."""
  assert tpu.estimate_items(rows, groups, bm) == pytest.approx(hand, abs=0.01)
  rng = np.random.default_rng(0)
  sizes = np.stack([np.bincount(rng.integers(0, groups, rows), minlength=groups)
                    for _ in range(2000)])
  ends = np.cumsum(sizes, 1)
  starts = ends - sizes
  pairs = np.where(sizes > 0, (ends - 1) // bm - starts // bm + 1, 0).sum(1)
  assert tpu.estimate_items(rows, groups, bm) == pytest.approx(pairs.mean(), rel=0.05)


def test_dispatch_and_validation():
  lhs, rhs, gs = _operands(jnp.float32)
  ref = reference.grouped_matmul_ref(lhs, rhs, gs)
  np.testing.assert_array_equal(np.asarray(grouped_matmul(lhs, rhs, gs)), np.asarray(ref))
  with pytest.raises(KernelRequestError, match="no Pallas implementation"):
    grouped_matmul(lhs, rhs, gs, backend="pallas")
  with pytest.raises(ValueError, match="group_sizes"):
    grouped_matmul(lhs, rhs, gs[:3])
  with pytest.raises(ValueError, match="grouped_matmul_fp8"):
    grouped_matmul(lhs, rhs.astype(jnp.float8_e4m3fn), gs)
  w8, w_scale = _fp8_weights()
  with pytest.raises(ValueError, match="rhs_scale"):
    grouped_matmul_fp8(lhs, w8, w_scale[:, :1], gs)
  with pytest.raises(ValueError, match="FP8 gmm needs"):
    gpu.gmm(lhs, w8, gs, transpose_rhs=True, rhs_scale=w_scale, tiles=(16, 64, 64))


# ---------------------------------------------------------------------------------------------
# Lowering for the real platforms at DeepSeek-V3 expert shapes (hidden 7168, moe_inter 2048).

_SD = jax.ShapeDtypeStruct


def _lower(f, platform, *args) -> str:
  with gpu_lowering_target(platform):
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("shape", [(4096, 7168, 2048, 32), (300, 700, 200, 3)])
def test_kernels_lower_for_platform(platform, shape):
  t, k, n, g = shape
  mod = tpu if platform == "tpu" else gpu
  target = TPU_CALL if platform == "tpu" else TRITON_CALL  # one kernel call per product
  x, gs = _SD((t, k), jnp.bfloat16), _SD((g,), jnp.int32)
  w, dy = _SD((g, k, n), jnp.bfloat16), _SD((t, n), jnp.bfloat16)
  w8, w8_s = _SD((g, n, k), jnp.float8_e4m3fn), _SD((g, -(-n // 128), -(-k // 128)), jnp.float32)
  x8, x8_s = _SD((t, k), jnp.float8_e4m3fn), _SD((t, -(-k // 128)), jnp.float32)
  def calls(f, *args):
    text = _lower(f, platform, *args)
    if platform == "tpu":  # e4m3 crosses into the kernel as is: no XLA byte copy of the weights
      assert "bitcast_convert" not in text
    return custom_calls(text, target)
  assert calls(lambda x, w, g: mod.gmm(x, w, g), x, w, gs) == 1
  assert calls(lambda y, w, g: mod.gmm(y, w, g, transpose_rhs=True), dy, w, gs) == 1
  assert calls(lambda x, y, g: mod.tgmm(x, y, g), x, dy, gs) == 1
  if platform == "tpu":
    fp8_w = lambda x, w, s, g: tpu.gmm_fp8(x, w, s, g)
    fp8_a = lambda x, xs, w, s, g: tpu.gmm_fp8(x, w, s, g, lhs_scale=xs)
  else:
    fp8_w = lambda x, w, s, g: gpu.gmm(x, w, g, transpose_rhs=True, rhs_scale=s)
    fp8_a = lambda x, xs, w, s, g: gpu.gmm(x, w, g, transpose_rhs=True, lhs_scale=xs,
                                           rhs_scale=s)
  assert calls(fp8_w, x, w8, w8_s, gs) == 1
  assert calls(fp8_a, x8, x8_s, w8, w8_s, gs) == 1
  if platform == "tpu":  # the stacked weights at a traced layer index
    stack, layer = _SD((3, g, k, n), jnp.bfloat16), _SD((), jnp.int32)
    assert calls(lambda x, w, g, i: tpu.gmm_layer(x, w, g, i), x, stack, gs, layer) == 1
    w8l, w8l_s = _SD((3,) + w8.shape, w8.dtype), _SD((3,) + w8_s.shape, jnp.float32)
    assert calls(lambda x, w, s, g, i: tpu.gmm_fp8(x, w, s, g, layer=i), x, w8l, w8l_s, gs,
                 layer) == 1
