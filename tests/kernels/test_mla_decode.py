"""MLA decode: reference vs numpy, TPU and GPU kernels (interpret mode) vs reference on contiguous
and paged caches with split-K, dispatch rules, and lowering for TPU (Mosaic) and GPU (Triton);
the same for multi-token queries q [b, T, h, d] (speculative verification: token t sees
lengths[b] - (T - 1 - t) rows), whose numpy oracle runs each token on its own; a stacked
[layers, ...] cache read at a (traced) layer equals that layer's own cache.

The cases are written as fused rows [.., rows, C + R] (what the numpy oracle reads) and handed to
`mla_decode` in its layout, `split_cache`: latent [.., rows, C] and rope [.., R, rows].

Tolerances. float32: same float32 math as the reference up to summation order (online softmax
per block, split-K merge): observed ~1e-6 on O(1) values, bound 2e-5 + 1e-5 * |x|. bfloat16
(DeepSeek-V3 dims 512 + 64): the kernels round p to bf16 before the value matmul and both sides
round the result to bf16 (one ulp is 3.9e-3 on [0.5, 1)): bound 1e-2 + 1e-2 * |x|.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.kernels_pallas import mla_decode
from dsv3_jax.kernels_pallas.backend import KernelRequestError, gpu_lowering_target
from dsv3_jax.kernels_pallas.mla_decode import gpu, reference, tpu
from dsv3_jax.kernels_pallas.mla_decode.reference import split_cache
from tests.utils import TPU_CALL, TRITON_CALL, assert_close, custom_calls, run_fast


def _numpy_decode(q, cache, lengths, scale, rank):
  q, cache = np.asarray(q, np.float64), np.asarray(cache, np.float64)
  out = np.zeros(q.shape[:2] + (rank,))
  for b in range(q.shape[0]):
    n = int(lengths[b])
    for h in range(q.shape[1]):
      if n:
        sc = cache[b, :n] @ q[b, h] * scale
        w = np.exp(sc - sc.max())
        out[b, h] = (w / w.sum()) @ cache[b, :n, :rank]
  return out


def _numpy_decode_tokens(q, cache, lengths, scale, rank):
  """q [b, T, h, d]: token t is an ordinary one-token decode over lengths - (T - 1 - t) rows."""
  T = q.shape[1]
  return np.stack([_numpy_decode(q[:, t], cache, np.maximum(np.asarray(lengths) - (T - 1 - t), 0),
                                 scale, rank) for t in range(T)], axis=1)


def _to_pages(cache, page, rng, extra_pages=3):
  """Scatters a contiguous cache [b, n * page, d] into a shuffled pool; returns pool, tables."""
  b, length, d = cache.shape
  n = length // page
  perm = rng.permutation(b * n + extra_pages)
  pool = jnp.asarray(rng.standard_normal((b * n + extra_pages, page, d)), cache.dtype)
  tables = perm[:b * n].reshape(b, n)
  pool = pool.at[tables.reshape(-1)].set(cache.reshape(b * n, page, d))
  return pool, jnp.asarray(tables, jnp.int32)


def test_reference_matches_numpy_and_pages():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((3, 2, 24)), jnp.float32)
  cache = jnp.asarray(rng.standard_normal((3, 12, 24)), jnp.float32)
  lengths = np.array([12, 0, 5])
  got = reference.mla_decode_reference(q, *split_cache(cache, 16), jnp.asarray(lengths), scale=0.3)
  assert_close(got, _numpy_decode(q, cache, lengths, 0.3, 16), atol=1e-5, what="vs numpy")
  assert np.all(np.asarray(got)[1] == 0)  # empty sequence -> zeros
  pool, tables = _to_pages(cache, 4, rng)
  paged = reference.mla_decode_reference(q, *split_cache(pool, 16), jnp.asarray(lengths),
                                         scale=0.3, block_tables=tables)
  assert_close(paged, got, atol=0, what="paged vs contiguous")


def test_combine_splits_matches_unsplit():
  rng = np.random.default_rng(1)
  s = jnp.asarray(rng.standard_normal((2, 3, 10)), jnp.float32)  # [b, h, l] scores
  vals = jnp.asarray(rng.standard_normal((2, 10, 4)), jnp.float32)
  full = jnp.einsum("bhl,blc->bhc", jax.nn.softmax(s, -1), vals)
  parts, lses = [], []
  for lo, hi in [(0, 4), (4, 4), (4, 10)]:  # the middle split is empty
    ss = s[..., lo:hi]
    lse = jax.nn.logsumexp(ss, -1) if hi > lo else jnp.full(s.shape[:2], -jnp.inf)
    o = jnp.einsum("bhl,blc->bhc", jnp.exp(ss - lse[..., None]), vals[:, lo:hi])
    parts.append(o)
    lses.append(lse)
  got = reference.combine_splits(jnp.stack(parts, 1), jnp.stack(lses, 1))
  assert_close(got, full, atol=1e-6, what="split-K merge")


SMALL = {
    "tpu": lambda splits: tpu.BlockSizes(block_k=128, num_splits=splits),
    "gpu": lambda splits: gpu.BlockSizes(block_k=32, block_h=16, num_splits=splits),
}


def _case(seed, b, h, rank, rope, length, dtype):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((b, h, rank + rope)) * 0.3, dtype)
  cache = jnp.asarray(rng.standard_normal((b, length, rank + rope)), dtype)
  return q, cache, rng


def _poison(cache, lengths):
  """NaN in every row past each sequence's length: the kernels must never let it through."""
  rows = jnp.arange(cache.shape[1])[None, :, None] < jnp.asarray(lengths)[:, None, None]
  return jnp.where(rows, cache, jnp.nan)


# (batch, heads, kv_lora_rank, rope dims, capacity, lengths, splits, dtype)
CONTIGUOUS = {
    # Capacity 300 is not a multiple of any block; lengths end mid-block, in the first block, at 0.
    "ragged_one_split": (4, 4, 128, 64, 300, (300, 1, 157, 0), 1, jnp.float32),
    "ragged_split_k": (4, 4, 128, 64, 300, (300, 1, 157, 0), 3, jnp.float32),
    "deepseek_dims_bf16": (2, 16, 512, 64, 200, (200, 77), 2, jnp.bfloat16),
}


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("case", list(CONTIGUOUS))
def test_kernel_contiguous(platform, case):
  b, h, rank, rope, cap, lengths, splits, dtype = CONTIGUOUS[case]
  q, cache, _ = _case(len(case), b, h, rank, rope, cap, dtype)
  lengths = jnp.asarray(lengths, jnp.int32)
  f = functools.partial(mla_decode, scale=0.2, backend="interpret", platform=platform,
                        block_sizes=SMALL[platform](splits))
  got = run_fast(f, q, *split_cache(_poison(cache, lengths), rank), lengths)
  want = reference.mla_decode_reference(q, *split_cache(cache, rank), lengths, scale=0.2)
  assert got.dtype == dtype
  tol = dict(atol=2e-5, rtol=1e-5) if dtype == jnp.float32 else dict(atol=1e-2, rtol=1e-2)
  assert_close(got, want, **tol, what=f"{platform}/{case}")


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_kernel_paged(platform):
  page = 128 if platform == "tpu" else 32
  q, cache, rng = _case(7, 3, 4, 128, 64, 4 * page, jnp.float32)
  lengths = jnp.asarray([4 * page, 0, page + 5], jnp.int32)
  pool, tables = _to_pages(_poison(cache, lengths), page, rng)
  unused = np.setdiff1d(np.arange(pool.shape[0]), np.asarray(tables))
  pool = pool.at[unused].set(jnp.nan)
  f = functools.partial(mla_decode, scale=0.2, backend="interpret", platform=platform,
                        block_sizes=SMALL[platform](2))
  got = run_fast(lambda q, c, r, n, t: f(q, c, r, n, block_tables=t), q,
                 *split_cache(pool, 128), lengths, tables)
  want = reference.mla_decode_reference(q, *split_cache(cache, 128), lengths, scale=0.2)
  assert_close(got, want, atol=2e-5, rtol=1e-5, what=f"{platform}/paged")


def test_dispatch():
  q, cache, _ = _case(3, 2, 2, 64, 64, 20, jnp.float32)
  lengths = jnp.asarray([20, 3], jnp.int32)
  lat, rope = split_cache(cache, 64)
  ref = reference.mla_decode_reference(q, lat, rope, lengths, scale=0.1)
  assert_close(mla_decode(q, lat, rope, lengths, scale=0.1), ref, atol=0, what="auto on cpu")
  with pytest.raises(KernelRequestError, match="backend='pallas'"):
    mla_decode(q, lat, rope, lengths, scale=0.1, backend="pallas")
  with pytest.raises(TypeError):
    mla_decode(q, lat, rope, lengths, scale=0.1, backend="interpret",
               block_sizes=gpu.BlockSizes())
  with pytest.raises(ValueError, match="q dim"):
    mla_decode(q, lat[:, :, :40], rope, lengths, scale=0.1)
  with pytest.raises(ValueError, match="disagree"):  # rope not transposed
    mla_decode(q, lat, jnp.swapaxes(rope, 1, 2)[:, :, :64], lengths, scale=0.1)
  with pytest.raises(ValueError, match="layers"):  # a stacked cache needs `layer`
    mla_decode(q, lat[None], rope[None], lengths, scale=0.1)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_kernel_reads_a_layer_of_a_stacked_cache(platform, paged):
  """latent [L, ...], rope [L, ...] with a traced `layer`: equals the reference on that layer's
  own cache; the other layers hold NaN, so reading any of their rows would show."""
  L, layer, page = 3, 1, (128 if platform == "tpu" else 32)
  q, cache, rng = _case(11, 2, 4, 128, 64, 2 * page, jnp.float32)
  lengths = jnp.asarray([2 * page, page + 3], jnp.int32)
  want = reference.mla_decode_reference(q, *split_cache(cache, 128), lengths, scale=0.2)
  tables = None
  if paged:
    cache, tables = _to_pages(cache, page, rng)
  stacked = jnp.full((L,) + cache.shape, jnp.nan, cache.dtype).at[layer].set(cache)
  f = functools.partial(mla_decode, scale=0.2, backend="interpret", platform=platform,
                        block_sizes=SMALL[platform](2))
  got = run_fast(lambda q, c, r, n, i, t: f(q, c, r, n, layer=i, block_tables=t), q,
                 *split_cache(stacked, 128), lengths, jnp.int32(layer), tables)
  assert_close(got, want, atol=2e-5, rtol=1e-5, what=f"{platform}/layer {layer}/paged={paged}")
  ref = reference.mla_decode_reference(q, *split_cache(stacked, 128), lengths,
                                       scale=0.2, layer=jnp.int32(layer), block_tables=tables)
  assert_close(ref, want, atol=1e-6, what="reference with layer")


def _lower(platform, lowering_platform, *, batch, capacity, paged, tokens=None):
  """Lowers at DeepSeek-V3 dims (128 heads, 512 + 64), bf16, default block sizes; tokens: a
  multi-token query [batch, tokens, 128, 576]."""
  sds = jax.ShapeDtypeStruct
  q = sds((batch, 128, 576) if tokens is None else (batch, tokens, 128, 576), jnp.bfloat16)
  lengths = sds((batch,), jnp.int32)
  if paged:
    page = 64
    n, tables = batch * capacity // page + 8, sds((batch, capacity // page), jnp.int32)
  else:
    n, page, tables = batch, capacity, None
  lat, rope = sds((n, page, 512), jnp.bfloat16), sds((n, 64, page), jnp.bfloat16)
  f = lambda q, c, r, l, t: mla_decode(q, c, r, l, scale=0.07, block_tables=t, backend="pallas",
                                       platform=platform)
  with gpu_lowering_target(lowering_platform):
    return jax.jit(f).trace(q, lat, rope, lengths, tables).lower(
        lowering_platforms=(lowering_platform,)).as_text()


@pytest.mark.parametrize("batch,capacity,paged", [(8, 1000, False), (1, 8192, False),
                                                  (4, 2048, True)])
def test_lowers_for_tpu(batch, capacity, paged):
  text = _lower("tpu", "tpu", batch=batch, capacity=capacity, paged=paged)
  assert custom_calls(text, TPU_CALL) == 1


@pytest.mark.parametrize("batch,capacity,paged", [(8, 1000, False), (1, 8192, False),
                                                  (4, 2048, True)])
def test_lowers_for_gpu_triton(batch, capacity, paged):
  text = _lower("gpu", "cuda", batch=batch, capacity=capacity, paged=paged)
  assert custom_calls(text, TRITON_CALL) == 1


def test_reference_multi_token_matches_numpy():
  """T = 3 tokens per sequence, lengths: full, = T (no history), 0 (< T: all-zero tokens)."""
  rng = np.random.default_rng(10)
  q = jnp.asarray(rng.standard_normal((4, 3, 2, 24)), jnp.float32)
  cache = jnp.asarray(rng.standard_normal((4, 12, 24)), jnp.float32)
  lengths = np.array([12, 3, 0, 7])
  parts = split_cache(cache, 16)
  got = reference.mla_decode_reference(q, *parts, jnp.asarray(lengths), scale=0.3)
  assert got.shape == (4, 3, 2, 16)
  assert_close(got, _numpy_decode_tokens(q, cache, lengths, 0.3, 16), atol=1e-5,
               what="multi-token vs numpy")
  assert np.all(np.asarray(got)[2] == 0)
  pool, tables = _to_pages(cache, 4, rng)
  paged = reference.mla_decode_reference(q, *split_cache(pool, 16), jnp.asarray(lengths),
                                         scale=0.3, block_tables=tables)
  assert_close(paged, got, atol=0, what="multi-token paged vs contiguous")
  one = reference.mla_decode_reference(q[:, :1], *parts, jnp.asarray(lengths), scale=0.3)
  assert_close(one[:, 0], reference.mla_decode_reference(q[:, 0], *parts, jnp.asarray(lengths),
                                                         scale=0.3),
               atol=0, what="T=1 equals the 3-d form")


# case -> (T, heads, lengths): ragged, one sequence with length == T (empty history), one whose
# shortest and longest token lengths straddle a block boundary (128 / 32 rows), 8 heads so the
# GPU's 16-row head blocks hold 2 tokens (T=2) or cut across tokens with padding (T=3).
# "T2_aligned": lengths that are whole blocks (256, 128: the last token sees whole blocks, the
# first one row less, so those blocks still need the per-token mask) and that straddle one
# (257, 129), contiguous: a kernel that skipped the mask on blocks the LAST token sees whole
# passed every other case (error ~0.26 here).
MULTI = {"T2": (2, 8, (300, 2, 157, 129)), "T3": (3, 8, (300, 3, 129, 98)),
         "T2_aligned": (2, 8, (256, 128, 257, 129))}
MULTI_CASES = [(case, paged) for case in MULTI for paged in (False, True)
               if not (paged and case == "T2_aligned")]


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("case,paged", MULTI_CASES,
                         ids=[f"{c}-{'paged' if p else 'contiguous'}" for c, p in MULTI_CASES])
def test_kernel_multi_token(platform, case, paged):
  """Multi-token queries vs the reference (checked against numpy above), split-K on (3 splits),
  NaN in every cache row past each sequence's length and in unused pages."""
  T, h, lengths = MULTI[case]
  b, rank, rope = len(lengths), 128, 64
  rng = np.random.default_rng(20 + T)
  q = jnp.asarray(rng.standard_normal((b, T, h, rank + rope)) * 0.3, jnp.float32)
  page = 128 if platform == "tpu" else 32
  cap = 300 if not paged else 3 * page
  lengths = jnp.asarray(np.minimum(lengths, cap), jnp.int32)
  cache = jnp.asarray(rng.standard_normal((b, cap, rank + rope)), jnp.float32)
  want = reference.mla_decode_reference(q, *split_cache(cache, rank), lengths, scale=0.2)
  f = functools.partial(mla_decode, scale=0.2, backend="interpret", platform=platform,
                        block_sizes=SMALL[platform](3))
  if paged:
    pool, tables = _to_pages(_poison(cache, lengths), page, rng)
    unused = np.setdiff1d(np.arange(pool.shape[0]), np.asarray(tables))
    pool = pool.at[unused].set(jnp.nan)
    got = run_fast(lambda q, c, r, n, t: f(q, c, r, n, block_tables=t), q,
                   *split_cache(pool, rank), lengths, tables)
  else:
    got = run_fast(f, q, *split_cache(_poison(cache, lengths), rank), lengths)
  assert got.shape == (b, T, h, rank) and got.dtype == jnp.float32
  assert_close(got, want, atol=2e-5, rtol=1e-5, what=f"{platform}/T={T}/paged={paged}")


def test_multi_token_dispatch():
  """T = 1 in 4-d form is the 3-d call; Mosaic GPU accepts T = 2 (no fallback reason)."""
  from dsv3_jax.kernels_pallas.mla_decode import mosaic_gpu
  q, cache, _ = _case(4, 2, 4, 64, 64, 40, jnp.float32)
  lengths = jnp.asarray([40, 9], jnp.int32)
  parts = split_cache(cache, 64)
  f = functools.partial(mla_decode, scale=0.1, backend="interpret", platform="gpu")
  assert_close(f(q[:, None], *parts, lengths)[:, 0], f(q, *parts, lengths), atol=0, what="T=1")
  q2 = jax.ShapeDtypeStruct((2, 2, 64, 576), jnp.bfloat16)
  c2 = (jax.ShapeDtypeStruct((2, 128, 512), jnp.bfloat16),
        jax.ShapeDtypeStruct((2, 64, 128), jnp.bfloat16))
  assert mosaic_gpu.unsupported_reason(q2, *c2, None) is None
  assert mosaic_gpu.unsupported_reason(jax.ShapeDtypeStruct((2, 1, 64, 576), jnp.bfloat16), *c2,
                                       None) is None
  with pytest.raises(ValueError):
    mla_decode(q[:, None, None], *parts, lengths, scale=0.1)


@pytest.mark.parametrize("platform,lowering", [("tpu", "tpu"), ("gpu", "cuda")])
def test_multi_token_lowers_at_v3_dims(platform, lowering):
  """T = 2 at DeepSeek-V3 serving shapes (B=64, 128 heads, 512 + 64, bf16, capacity 8192)."""
  text = _lower(platform, lowering, batch=64, capacity=8192, paged=False, tokens=2)
  assert custom_calls(text, TPU_CALL if platform == "tpu" else TRITON_CALL) == 1


# (capacity, tokens): one window of the whole capacity (<= 256 lanes), 128-lane windows (T=1),
# 256-lane windows (T=2, straddling a tile boundary at 127/128 and ending at the capacity).
ROPE_WRITES = [(64, 2), (200, 1), (384, 1), (384, 2), (512, 2)]


@pytest.mark.parametrize("capacity,tokens", ROPE_WRITES)
def test_write_rope_matches_numpy(capacity, tokens):
  """`write_rope` (TPU kernel, interpret mode; and the scatter) vs numpy on a stacked rope cache
  [L, B, R, S]: new columns at the first row, across a 128-lane tile boundary and at the end;
  every other value (other layers, other columns) unchanged."""
  from dsv3_jax.kernels_pallas.mla_decode import write_rope
  rng = np.random.default_rng(capacity + tokens)
  L, B, R = 3, 5, 16
  rope = jnp.asarray(rng.standard_normal((L, B, R, capacity)), jnp.float32)
  new = jnp.asarray(rng.standard_normal((B, tokens, R)), jnp.float32)
  starts = np.array([0, 127, capacity - tokens, 40, capacity // 2]) % (capacity - tokens + 1)
  positions = jnp.asarray(starts[:, None] + np.arange(tokens)[None, :], jnp.int32)
  want = np.array(rope)
  for b in range(B):
    want[1, b][:, starts[b]:starts[b] + tokens] = np.asarray(new[b]).T
  for backend in ("interpret", "reference"):
    got = jax.jit(lambda r, n, p: write_rope(r, n, p, layer=jnp.int32(1), backend=backend,
                                             platform="tpu"))(rope, new, positions)
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=backend)
  got = write_rope(rope[1], new, positions, backend="interpret", platform="tpu")  # no layers
  np.testing.assert_array_equal(np.asarray(got), want[1])


def test_write_rope_rejects_what_the_tpu_kernel_cannot_take():
  from dsv3_jax.kernels_pallas.mla_decode import write_rope
  rope, new = jnp.zeros((2, 16, 300)), jnp.zeros((2, 1, 16))
  with pytest.raises(ValueError, match="capacity .* multiple of 128.*300"):
    write_rope(rope, new, jnp.zeros((2, 1), jnp.int32), backend="interpret", platform="tpu")
  with pytest.raises(ValueError, match="k_pe"):
    write_rope(rope, jnp.zeros((2, 1, 8)), jnp.zeros((2, 1), jnp.int32))
