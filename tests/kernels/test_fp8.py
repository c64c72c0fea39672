"""FP8 block-scaled quantisation and matmul: references against numpy, kernels against references.

Kernels run in Pallas interpret mode on CPU (TPU and GPU variants) on shapes with partial tiles
in every dimension; the TPU and GPU kernels are also lowered for their platforms on this CPU-only
install, which applies the Mosaic block-shape rules and the Triton lowering rules.
"""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from dsv3_jax.kernels_pallas import Backend, fp8
from dsv3_jax.kernels_pallas.backend import KernelRequestError, gpu_lowering_target
from dsv3_jax.kernels_pallas.fp8 import gpu, reference, tpu
from tests.utils import TPU_CALL, TRITON_CALL, assert_close, custom_calls

E4M3 = ml_dtypes.float8_e4m3fn
PLATFORMS = ("tpu", "gpu")


def _bits(x) -> np.ndarray:
  return np.asarray(x).view(np.uint8)


def _activations(m=37, k=300, seed=0) -> jax.Array:
  """bf16 [m, k] with tiles that exercise the edge cases of the scale rule."""
  rng = np.random.RandomState(seed)
  x = rng.randn(m, k).astype(np.float32) * np.exp(rng.uniform(-3, 3, (m, 1))).astype(np.float32)
  x[3, 128:256] = 0.0                 # an all-zero tile: scale AMAX_FLOOR/448, zero values
  x[4, :128] *= 1e-12                 # a tile below the amax floor
  x[5, 256:] = -x[5, 256:] * 1e4      # large magnitudes in the partial last tile
  x[6, 7] = 448.0 * 2.0 ** -3         # amax exactly 448 * 2^e: the power-of-two scale is exact
  x[6, :7] = 0.0
  x[6, 8:128] = 1.0
  return jnp.asarray(x).astype(jnp.bfloat16)


def _numpy_quantize(x: np.ndarray, power_of_two_scale: bool):
  """Independent oracle: numpy float32 arithmetic and ml_dtypes' e4m3 cast."""
  m, k = x.shape
  kb = -(-k // 128)
  xp = np.zeros((m, kb * 128), np.float32)
  xp[:, :k] = x.astype(np.float32)
  t = xp.reshape(m, kb, 128)
  amax = np.maximum(np.abs(t).max(-1), np.float32(reference.AMAX_FLOOR))
  scale = (amax * np.float32(1.0 / 448.0)).astype(np.float32)
  if power_of_two_scale:
    scale = (2.0 ** np.ceil(np.log2(scale.astype(np.float64)))).astype(np.float32)
  q = np.clip(t / scale[..., None], -448, 448).astype(E4M3).reshape(m, kb * 128)[:, :k]
  return q, scale


def _weights(n, k, seed=1):
  """e4m3 [n, k] with positive block scales [ceil(n/128), ceil(k/128)] of varied magnitude."""
  rng = np.random.RandomState(seed)
  b = np.clip(rng.randn(n, k) * 100, -448, 448).astype(E4M3)
  s = (rng.uniform(0.5, 2.0, (-(-n // 128), -(-k // 128))) * 1e-3).astype(np.float32)
  return jnp.asarray(b), jnp.asarray(s)


def _numpy_matmul(a, a_scale, b, b_scale) -> np.ndarray:
  """float64 oracle: dequantise with ml_dtypes, multiply in float64."""
  def deq(w, s, rows):
    w64 = np.asarray(w).astype(np.float64)
    s64 = np.repeat(np.repeat(np.asarray(s, np.float64), rows, 0), 128, 1)
    return w64 * s64[:w64.shape[0], :w64.shape[1]]
  a64 = deq(a, a_scale, 1) if a_scale is not None else np.asarray(a).astype(np.float64)
  return a64 @ deq(b, b_scale, 128).T


def _abs_products(a, a_scale, b, b_scale) -> np.ndarray:
  """sum_k |a b| per output: the scale in which rounding errors of the products are measured."""
  return _numpy_matmul(jnp.abs(a), a_scale, jnp.abs(b), b_scale)


# ---------------------------------------------------------------------------------------------
# The e4m3 codec the TPU kernels use in place of float8 vector conversions.

def test_e4m3_decode_all_codes():
  codes = np.arange(256, dtype=np.uint8)
  got = np.asarray(tpu.e4m3_to_f32(jnp.asarray(codes.view(np.int8))))
  want = codes.view(E4M3).astype(np.float32)
  nan = np.isnan(want)
  assert nan.sum() == 2 and np.all(np.abs(got[nan]) == 480.0)
  np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def test_e4m3_encode_matches_ml_dtypes_rounding():
  # Every bf16 value in range, plus the exact midpoints between neighbouring e4m3 values (ties
  # to even) and the float32 values one ulp either side of them, normal and subnormal.
  bf = np.arange(1 << 16, dtype=np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)
  bf = bf[np.isfinite(bf) & (np.abs(bf) <= 448)]
  grid = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32)
  grid = np.unique(grid[np.isfinite(grid) & (grid >= 0)])
  mid = ((grid[1:].astype(np.float64) + grid[:-1]) / 2).astype(np.float32)
  near = np.concatenate([mid, np.nextafter(mid, 0), np.nextafter(mid, np.float32(np.inf))])
  v = np.concatenate([bf, near, -near, np.float32([0.0, -0.0, 448.0, -448.0, 1e-30, -1e-30])])
  got = _bits(tpu.f32_to_e4m3(jnp.asarray(v)))
  np.testing.assert_array_equal(got, _bits(v.astype(E4M3)))


def test_pow2_round_up_is_exact():
  s = jnp.asarray(np.float32([1.0, 1.5, 2.0, 3e-13, 2.0 ** -40, 2.0 ** -40 * 1.0000001, 7.0]))
  want = np.float32([1.0, 2.0, 2.0, 2.0 ** -41, 2.0 ** -40, 2.0 ** -39, 8.0])
  np.testing.assert_array_equal(np.asarray(reference.pow2_round_up(s)), want)


@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 5), (8, 16), (37, 3), (20, 7)])
def test_gpu_swizzle_is_a_permutation(rows, cols):
  pid = jnp.arange(rows * cols)
  i, j = jax.jit(gpu.swizzle, static_argnums=(1, 2))(pid, rows, cols)
  assert np.all((0 <= i) & (i < rows) & (0 <= j) & (j < cols))
  assert len(set(zip(np.asarray(i).tolist(), np.asarray(j).tolist()))) == rows * cols


# ---------------------------------------------------------------------------------------------
# Quantisation.

@pytest.mark.parametrize("power_of_two_scale", [False, True])
def test_quantize_reference_matches_numpy(power_of_two_scale):
  x = _activations()
  q, s = reference.quantize_activations_ref(x, power_of_two_scale=power_of_two_scale)
  q_np, s_np = _numpy_quantize(np.asarray(x.astype(jnp.float32)), power_of_two_scale)
  np.testing.assert_array_equal(np.asarray(s), s_np)
  np.testing.assert_array_equal(_bits(q), _bits(q_np))
  floor_scale = np.float32(reference.AMAX_FLOOR) * np.float32(1 / 448)
  if not power_of_two_scale:
    assert np.asarray(s)[3, 1] == floor_scale and np.asarray(s)[4, 0] == floor_scale
  assert not np.any(_bits(q)[3, 128:256] & 0x7F)  # the zero tile quantises to zeros
  # Round trip: each value is within half an e4m3 step (2^-4 relative) of x, or below the
  # subnormal spacing of its tile's scale.
  deq = np.asarray(fp8.dequantize(q, s, block_rows=1))
  xf = np.asarray(x.astype(jnp.float32))
  tol = np.repeat(np.asarray(s), 128, 1)[:, :x.shape[1]] * 2.0 ** -10 + np.abs(xf) * 2.0 ** -4
  assert np.all(np.abs(deq - xf) <= tol)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("power_of_two_scale", [False, True])
def test_quantize_kernel_equals_reference_bitwise(platform, power_of_two_scale):
  x = _activations()
  q_ref, s_ref = reference.quantize_activations_ref(x, power_of_two_scale=power_of_two_scale)
  kernel = tpu.quantize_activations if platform == "tpu" else gpu.quantize_activations
  rows = 32 if platform == "tpu" else 16  # several row blocks, the last one partial
  q, s = kernel(x, power_of_two_scale=power_of_two_scale, block_rows=rows, interpret=True)
  assert q.dtype == jnp.float8_e4m3fn and s.dtype == jnp.float32
  np.testing.assert_array_equal(_bits(q), _bits(q_ref))
  np.testing.assert_array_equal(np.asarray(s), np.asarray(s_ref))
  # The public entry point with its default tiles.
  q2, s2 = fp8.quantize_activations(x.astype(jnp.float32)[:9], backend="interpret",
                                    platform=platform, power_of_two_scale=power_of_two_scale)
  np.testing.assert_array_equal(_bits(q2), _bits(q_ref[:9]))
  np.testing.assert_array_equal(np.asarray(s2), np.asarray(s_ref[:9]))


# ---------------------------------------------------------------------------------------------
# Matmuls. Shapes: M=37, K=300 (3 scale blocks, the last 44 wide), N=200 (2 blocks, last 72).

M, K, N = 37, 300, 200


def _fp8_operands():
  x = _activations(M, K)
  a, a_scale = reference.quantize_activations_ref(x)
  b, b_scale = _weights(N, K)
  return x, a, a_scale, b, b_scale


def test_matmul_references_match_numpy():
  x, a, a_scale, b, b_scale = _fp8_operands()
  want = _numpy_matmul(a, a_scale, b, b_scale)
  mag = _abs_products(a, a_scale, b, b_scale).max()
  # float32 accumulation of exact float32 products: relative error ~ K * 2^-24 of sum |a b|.
  got = reference.fp8_matmul_ref(a, a_scale, b, b_scale, out_dtype=jnp.float32)
  assert_close(got, want, atol=1e-5 * mag, what="fp8_matmul_ref")
  got_w = reference.fp8_weight_matmul_ref(x, b, b_scale, out_dtype=jnp.float32)
  assert_close(got_w, _numpy_matmul(x.astype(jnp.float32), None, b, b_scale), atol=1e-5 * mag,
               what="fp8_weight_matmul_ref")
  # Partial edge blocks: the weight dequantises element by element with its own block's scale.
  deq = np.asarray(fp8.dequantize(b, b_scale))
  np.testing.assert_array_equal(
      deq[130:, 260:], np.asarray(b)[130:, 260:].astype(np.float32) * np.asarray(b_scale)[1, 2])


def _check_matmul(out, ref, platform, a, a_scale, b, b_scale, what):
  """GPU: exact products, float32 sums, one bf16 rounding of the output (2^-8 relative).
  TPU: the dequantised operands are rounded to bf16 (2^-9 relative each) before the MXU: at
  most 2^-8 * sum_k |a b| per output on top of the output rounding. Both: the RMS error is at
  most 2^-7 of the RMS output (measured ~2^-9), which a wrong block or a lost edge would break.
  """
  mag = _abs_products(a, a_scale, b, b_scale).max()
  atol = 1e-5 * mag if platform == "gpu" else 2.0 ** -8 * mag
  assert_close(out, ref, atol=atol, rtol=2.0 ** -8, what=what)
  err = np.asarray(out, np.float64) - np.asarray(ref, np.float64)
  rms_err, rms_ref = np.sqrt(np.mean(err ** 2)), np.sqrt(np.mean(np.asarray(ref, np.float64) ** 2))
  assert rms_err <= 2.0 ** -7 * rms_ref, f"{what}: rms error {rms_err:.3g} vs output {rms_ref:.3g}"


@pytest.mark.parametrize("platform", PLATFORMS)
def test_fp8_matmul_kernel_matches_reference(platform):
  _, a, a_scale, b, b_scale = _fp8_operands()
  ref = reference.fp8_matmul_ref(a, a_scale, b, b_scale, out_dtype=jnp.float32)
  if platform == "tpu":  # (8, 128, 128) tiles: partial tiles in M, K and N
    out = tpu.fp8_matmul(a, a_scale, b, b_scale, tiles=(8, 128, 128), interpret=True)
  else:
    out = gpu.fp8_matmul(a, a_scale, b, b_scale, block_m=16, block_n=64, interpret=True)
  assert out.dtype == jnp.bfloat16 and out.shape == (M, N)
  _check_matmul(out, ref, platform, a, a_scale, b, b_scale, f"{platform} fp8_matmul")
  out_api = fp8.fp8_matmul(a, a_scale, b, b_scale, out_dtype=jnp.float32, backend="interpret",
                           platform=platform)
  assert out_api.dtype == jnp.float32
  _check_matmul(out_api, ref, platform, a, a_scale, b, b_scale, f"{platform} default tiles")


@pytest.mark.parametrize("platform", PLATFORMS)
def test_fp8_weight_matmul_kernel_matches_reference(platform):
  x, _, _, b, b_scale = _fp8_operands()
  ref = reference.fp8_weight_matmul_ref(x, b, b_scale, out_dtype=jnp.float32)
  if platform == "tpu":
    out = tpu.fp8_matmul(x, None, b, b_scale, tiles=(16, 256, 128), interpret=True)
  else:
    out = gpu.fp8_matmul(x, None, b, b_scale, block_m=32, block_n=128, interpret=True)
  _check_matmul(out, ref, platform, x, None, b, b_scale, f"{platform} fp8_weight_matmul")
  out_api = fp8.fp8_weight_matmul(x[:5], b, b_scale, backend="interpret", platform=platform)
  _check_matmul(out_api, ref[:5], platform, x[:5], None, b, b_scale, f"{platform} default tiles")


def test_dispatch_and_validation():
  x, a, a_scale, b, b_scale = _fp8_operands()
  ref = reference.fp8_matmul_ref(a, a_scale, b, b_scale)
  np.testing.assert_array_equal(
      np.asarray(fp8.fp8_matmul(a, a_scale, b, b_scale, backend=Backend.REFERENCE)),
      np.asarray(ref))
  # AUTO on a CPU host: no Pallas kernel for CPU, so the reference runs.
  np.testing.assert_array_equal(np.asarray(fp8.fp8_matmul(a, a_scale, b, b_scale)),
                                np.asarray(ref))
  with pytest.raises(KernelRequestError, match="no Pallas implementation"):
    fp8.fp8_weight_matmul(x, b, b_scale, backend="pallas")
  with pytest.raises(ValueError, match="b_scale must be"):
    fp8.fp8_matmul(a, a_scale, b, b_scale[:, :2])
  with pytest.raises(ValueError, match="a must be"):
    fp8.fp8_matmul(x, a_scale, b, b_scale)
  with pytest.raises(ValueError, match="multiples of"):
    tpu.fp8_matmul(x, None, b, b_scale, tiles=(8, 100, 128))


# ---------------------------------------------------------------------------------------------
# Lowering for the real platforms (no accelerator needed): DeepSeek-V3 shapes.

def _lower(f, platform, *args) -> str:
  with gpu_lowering_target(platform):
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


_SD = jax.ShapeDtypeStruct
_LOWERING_CASES = {
    # kv_a_proj_with_mqa: [576, 7168] weight with a [5, 56] scale.
    "kv_a": (512, 7168, 576),
    "down_proj": (128, 2048, 7168),
    "partial": (300, 7000, 200),
}


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("case", sorted(_LOWERING_CASES))
def test_kernels_lower_for_platform(platform, case):
  m, k, n = _LOWERING_CASES[case]
  kb, nb = -(-k // 128), -(-n // 128)
  mod = tpu if platform == "tpu" else gpu
  target = TPU_CALL if platform == "tpu" else TRITON_CALL  # one kernel call per product
  x = _SD((m, k), jnp.bfloat16)
  a, a_s = _SD((m, k), jnp.float8_e4m3fn), _SD((m, kb), jnp.float32)
  b, b_s = _SD((n, k), jnp.float8_e4m3fn), _SD((nb, kb), jnp.float32)
  def calls(f, *args):
    text = _lower(f, platform, *args)
    if platform == "tpu":  # e4m3 crosses into and out of the kernels as is: no XLA byte copy
      assert "bitcast_convert" not in text
    return custom_calls(text, target)
  for pow2 in (False, True):
    assert calls(lambda x: mod.quantize_activations(x, power_of_two_scale=pow2), x) == 1
  assert calls(lambda a, s, b, t: mod.fp8_matmul(a, s, b, t), a, a_s, b, b_s) == 1
  assert calls(lambda x, b, t: mod.fp8_matmul(x, None, b, t), x, b, b_s) == 1


def test_tpu_lowering_rejects_illegal_blocks():
  # The lowering tests above have teeth: a (12, K) block breaks Mosaic's (8, 128) rule.
  x = _SD((40, 256), jnp.bfloat16)
  with pytest.raises(ValueError, match="divisible by 8 and 128"):
    _lower(lambda x: tpu.quantize_activations(x, block_rows=12), "tpu", x)
