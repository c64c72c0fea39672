"""MLA decode, Mosaic GPU (Hopper) kernel: interpret mode vs the jnp reference, dispatch, and
lowering for CUDA at DeepSeek-V3 shapes (Mosaic GPU lowers without a GPU).

Interpret mode (CPU) runs the kernel's pipeline, barriers, masking and online softmax; its wgmma
calls are replaced by dots of the same shared-memory tiles (see `mosaic_gpu` docstring), so the
wgmma operand layouts are checked only by the lowering tests here and by the H100 bench.
Small dims keep interpret mode affordable: 64 heads (one CTA), 128 latent + 64 rope.

Cases are written as fused rows [.., rows, 576-style] and passed in the kernel's layout
(`split_cache`: latent [.., rows, C], rope [.., R, rows]).

Rows past each sequence's length (and TMA reads past a contiguous cache's end, NaN in interpret
mode) are poisoned with NaN in the kernel's input; the reference sees a clean copy, so any leak of
a masked row shows as NaN.

Tolerance (bf16 inputs, reference float32 on the same values, result bf16): the kernel rounds p
to bf16 before the value product and stores split-K partials in bf16 before the float32 merge, and
both sides round the result (half an ulp is 3.9e-3 relative): bound 2e-2 + 2e-2 * |x|.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.kernels_pallas import mla_decode
from dsv3_jax.kernels_pallas.backend import gpu_lowering_target
from dsv3_jax.kernels_pallas.mla_decode import gpu, mosaic_gpu, reference
from dsv3_jax.kernels_pallas.mla_decode.reference import split_cache
from tests.utils import MOSAIC_GPU_CALL, TRITON_CALL, assert_close, custom_calls, run_fast

H, RANK, ROPE, SCALE = 64, 128, 64, 0.1
TOL = dict(atol=2e-2, rtol=2e-2)


# Mosaic GPU interpreter programs compiled once per kernel, everything without XLA's CPU
# optimisations: the checks are at tolerance.
pytestmark = pytest.mark.usefixtures("module_interpreter_fast_compiles")


def _poison(cache, lengths):
  """cache [b, s, d] with every row at or past lengths[b] set to NaN."""
  rows = jnp.arange(cache.shape[1])[None, :, None]
  return jnp.where(rows < jnp.asarray(lengths)[:, None, None], cache, jnp.nan)


def _inputs(rng, b, cap):
  q = jnp.asarray(rng.standard_normal((b, H, RANK + ROPE)), jnp.bfloat16)
  cache = jnp.asarray(rng.standard_normal((b, cap, RANK + ROPE)), jnp.bfloat16)
  return q, cache


def _interpret(q, cache, lengths, tables, splits, layer=None):
  """layer: read `cache` as layer `layer` of a stack whose other layers are NaN."""
  blocks = mosaic_gpu.BlockSizes(block_k=64, num_splits=splits)
  if layer is not None:
    cache = jnp.full((layer + 2,) + cache.shape, jnp.nan, cache.dtype).at[layer].set(cache)
    layer = jnp.int32(layer)
  return run_fast(lambda q, c, r, n, t, i: mla_decode(q, c, r, n, scale=SCALE, block_tables=t,
                                                      layer=i, backend="interpret",
                                                      platform="gpu", block_sizes=blocks,
                                                      gpu_impl="mosaic"),
                  q, *split_cache(cache, RANK), lengths, tables, layer)


def _reference(q, cache, lengths):
  return reference.mla_decode_reference(q, *split_cache(cache, RANK), lengths, scale=SCALE)


def _sds_parts(lead, rows, rank=512, rope=64):
  """Abstract (latent [*lead, rows, rank], rope [*lead, rope, rows]) in bf16."""
  return (jax.ShapeDtypeStruct((*lead, rows, rank), jnp.bfloat16),
          jax.ShapeDtypeStruct((*lead, rope, rows), jnp.bfloat16))


def test_contiguous_ragged_split_k():
  """Lengths full (100, not a multiple of the 64-row block: the last TMA box reads past the
  cache end), 0 and 70; two splits per sequence, merged with combine_splits."""
  rng = np.random.default_rng(0)
  q, cache = _inputs(rng, 3, 100)
  lengths = jnp.asarray([100, 0, 70], jnp.int32)
  got = _interpret(q, _poison(cache, lengths), lengths, None, 2)
  want = _reference(q, cache, lengths)
  assert got.shape == (3, H, RANK) and got.dtype == jnp.bfloat16
  assert_close(got, want, **TOL, what="mosaic contiguous")
  assert np.all(np.asarray(got[1], np.float32) == 0)  # empty sequence -> zeros


def test_paged_one_split():
  """Shuffled page pool (64-row pages, NaN in unused pages and rows past the lengths), layer 1 of
  a stacked pool of 3 (the others NaN); one split per sequence (the CTA writes the result
  directly, no merge)."""
  rng = np.random.default_rng(1)
  b, page, pps = 2, 64, 2
  q, cache = _inputs(rng, b, page * pps)
  lengths = jnp.asarray([128, 65], jnp.int32)
  perm = rng.permutation(b * pps + 2)
  tables = jnp.asarray(perm[:b * pps].reshape(b, pps), jnp.int32)
  pool = jnp.full((b * pps + 2, page, RANK + ROPE), jnp.nan, jnp.bfloat16)
  pool = pool.at[tables.reshape(-1)].set(
      _poison(cache, lengths).reshape(b * pps, page, RANK + ROPE))
  got = _interpret(q, pool, lengths, tables, 1, layer=1)
  want = _reference(q, cache, lengths)
  assert_close(got, want, **TOL, what="mosaic paged")


def test_two_tokens_ragged_split_k():
  """T = 2 query tokens per sequence (q [b, 2, 64, d]: two CTAs per sequence, one per token,
  each with its own causal length) vs the reference, two splits; lengths 65 (token 0 sees
  exactly one 64-row block, split 1 empty; token 1 one row more: a masked block in split 1),
  2 = T (token 0 sees 1 row, token 1 sees 2) and 1 < T (token 0 sees no row: zeros)."""
  rng = np.random.default_rng(2)
  b, cap = 3, 100
  q = jnp.asarray(rng.standard_normal((b, 2, H, RANK + ROPE)), jnp.bfloat16)
  cache = jnp.asarray(rng.standard_normal((b, cap, RANK + ROPE)), jnp.bfloat16)
  lengths = jnp.asarray([65, 2, 1], jnp.int32)
  got = _interpret(q, _poison(cache, lengths), lengths, None, 2)
  want = _reference(q, cache, lengths)
  assert got.shape == (b, 2, H, RANK) and got.dtype == jnp.bfloat16
  assert_close(got, want, **TOL, what="mosaic T=2")
  assert np.all(np.asarray(got[2, 0], np.float32) == 0)  # token sees no row -> zeros
  assert np.any(np.asarray(got[2, 1], np.float32) != 0)


def _lower_cuda(q, cache, lengths, tables, **kw):
  """cache: (latent, rope) abstract parts."""
  f = lambda q, c, r, n, t: mla_decode(q, c, r, n, scale=576 ** -0.5, block_tables=t,
                                       backend="pallas", platform="gpu", **kw)
  with gpu_lowering_target("cuda"):  # a Triton fallback needs a target GPU on jax 0.12
    return jax.jit(f).trace(q, *cache, lengths, tables).lower(
        lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("paged", [False, True])
def test_lowers_for_cuda_at_v3_shapes(paged):
  """B=64, 128 heads, 512 + 64, capacity 8192, bf16: the kernel fits shared memory and lowers."""
  sds = jax.ShapeDtypeStruct
  b, cap, page = 64, 8192, 64
  q, n = sds((b, 128, 576), jnp.bfloat16), sds((b,), jnp.int32)
  if paged:
    cache, tables = _sds_parts((b * cap // page,), page), sds((b, cap // page), jnp.int32)
  else:
    cache, tables = _sds_parts((b,), cap), None
  text = _lower_cuda(q, cache, n, tables, gpu_impl="mosaic")
  assert (custom_calls(text, MOSAIC_GPU_CALL), custom_calls(text, TRITON_CALL)) == (1, 0)


def test_two_tokens_lower_for_cuda_at_v3_shapes():
  """T = 2 at DeepSeek-V3 serving shapes (B=64, 128 heads, 512 + 64, capacity 8192, bf16): the
  Mosaic GPU kernel takes it (no Triton fallback) and lowers."""
  sds = jax.ShapeDtypeStruct
  q, cache = sds((64, 2, 128, 576), jnp.bfloat16), _sds_parts((64,), 8192)
  assert mosaic_gpu.unsupported_reason(q, *cache, None) is None
  text = _lower_cuda(q, cache, sds((64,), jnp.int32), None, gpu_impl="mosaic")
  assert (custom_calls(text, MOSAIC_GPU_CALL), custom_calls(text, TRITON_CALL)) == (1, 0)


def test_unsupported_shapes_raise_when_forced_and_run_triton_under_auto(monkeypatch):
  """16 heads (not a multiple of 64) and 16-row pages (below block_k): gpu_impl="mosaic" (or a
  mosaic_gpu.BlockSizes) raises naming the reason; auto (on a Hopper GPU) runs Triton."""
  sds = jax.ShapeDtypeStruct
  q16 = sds((2, 16, 576), jnp.bfloat16)
  cache = _sds_parts((2,), 256)
  assert "heads=16" in mosaic_gpu.unsupported_reason(q16, *cache, None)
  q = sds((2, 128, 576), jnp.bfloat16)
  pool, tables = _sds_parts((32,), 16), sds((2, 16), jnp.int32)
  assert "page size 16" in mosaic_gpu.unsupported_reason(q, *pool, tables)
  assert mosaic_gpu.unsupported_reason(q, *cache, None) is None
  n = sds((2,), jnp.int32)
  import dsv3_jax.kernels_pallas.backend as backend
  monkeypatch.setattr(backend, "_is_hopper", lambda: True)  # auto would pick Mosaic GPU
  for args, why in (((q16, cache, n, None), "heads=16"), ((q, pool, n, tables), "page size 16")):
    with pytest.raises(backend.KernelRequestError, match=f"gpu_impl='mosaic'.*{why}"):
      _lower_cuda(*args, gpu_impl="mosaic")
    with pytest.raises(backend.KernelRequestError, match=why):
      _lower_cuda(*args, block_sizes=mosaic_gpu.BlockSizes())
    text = _lower_cuda(*args)
    assert (custom_calls(text, MOSAIC_GPU_CALL), custom_calls(text, TRITON_CALL)) == (0, 1)
  with pytest.raises(TypeError, match="mosaic_gpu.BlockSizes"):
    _lower_cuda(q, cache, n, None, gpu_impl="mosaic", block_sizes=gpu.BlockSizes())
