"""MLA attention: reference vs numpy, TPU and GPU kernels (interpret mode) vs reference (forward
and gradients), dispatch rules, and lowering of the kernels for TPU (Mosaic) and GPU (Triton).

Tolerances. float32: kernels and reference both accumulate in float32; the only difference is
summation order (online softmax over blocks): observed <= 5e-6 on values up to ~6, bound
2e-5 + 1e-5 * |x|. bfloat16: the kernels round p (and dS in the backward) to bf16 before their
matmuls, as every flash attention does, and both sides round the result to bf16 (one ulp is
3.9e-3 on [0.5, 1)): observed one ulp, bound 1e-2 + 1e-2 * |x| (two to three ulps).
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.kernels_pallas import mla_attention
from dsv3_jax.kernels_pallas.mla_attention import gpu, reference, tpu
from dsv3_jax.kernels_pallas.backend import KernelRequestError, gpu_lowering_target
from tests.utils import TPU_CALL, TRITON_CALL, assert_close, custom_calls, run_fast


def _numpy_attention(q, k, v, *, scale, causal, q_offset, segment_ids=None):
  """Row-by-row float64 attention, written independently of the jnp reference."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, h, _ = q.shape
  g = h // k.shape[2]
  off = np.broadcast_to(np.asarray(q_offset), (b,))
  out = np.zeros((b, t, h, v.shape[-1]))
  for bi in range(b):
    for ti in range(t):
      vis = np.ones(k.shape[1], bool)
      if causal:
        vis &= np.arange(k.shape[1]) <= off[bi] + ti
      if segment_ids is not None:
        vis &= np.asarray(segment_ids[1])[bi] == np.asarray(segment_ids[0])[bi, ti]
      for hi in range(h):
        if vis.any():
          sc = k[bi, vis, hi // g] @ q[bi, ti, hi] * scale
          w = np.exp(sc - sc.max())
          out[bi, ti, hi] = (w / w.sum()) @ v[bi, vis, hi // g]
  return out


def _inputs(seed, b, sq, sk, h, hk, dqk, dv, dtype):
  rng = np.random.default_rng(seed)
  mk = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)
  return mk(b, sq, h, dqk), mk(b, sk, hk, dqk), mk(b, sk, hk, dv), rng


def test_reference_matches_numpy():
  q, k, v, rng = _inputs(0, 2, 5, 7, 4, 2, 8, 6, jnp.float32)
  seg = (jnp.asarray([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]]), jnp.asarray(rng.integers(0, 3, (2, 7))))
  off = np.array([2, -2])  # batch 1: query rows 0 and 1 see no key -> zero rows
  for causal, segment_ids in [(True, None), (True, seg), (False, seg)]:
    got = reference.mla_attention_reference(q, k, v, scale=0.3, causal=causal,
                                            segment_ids=segment_ids, q_offset=jnp.asarray(off))
    want = _numpy_attention(q, k, v, scale=0.3, causal=causal, q_offset=off,
                            segment_ids=segment_ids)
    assert_close(got, want, atol=1e-5, what=f"causal={causal} seg={segment_ids is not None}")
  got = reference.mla_attention_reference(q, k, v, scale=0.3, q_offset=jnp.asarray(off))
  assert np.all(np.asarray(got)[1, :2] == 0)


def test_reference_gradient_of_masked_rows_is_finite():
  q, k, v, _ = _inputs(1, 1, 4, 4, 2, 2, 8, 8, jnp.float32)
  loss = lambda q, k, v: mla_attention(q, k, v, scale=0.5, q_offset=-2, backend="reference").sum()
  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  for gr in grads:
    assert np.all(np.isfinite(np.asarray(gr)))
  assert np.all(np.asarray(grads[0])[0, :2] == 0)


# (batch, q_len, kv_len, heads, kv_heads, dqk, dv, causal, q_offset, segments, dtype)
CASES = {
    # GQA, chunked prefill with per-batch offsets (batch 1 starts with 5 rows that see nothing),
    # lengths that are not multiples of any block.
    "gqa_chunked_prefill": (2, 200, 300, 4, 2, 192, 128, True, (100, -5), False, jnp.float32),
    # MQA, packed sequences (segment ids) under the causal mask.
    "mqa_segments": (2, 150, 150, 2, 1, 64, 64, True, 0, True, jnp.float32),
    # Plain MHA, not causal, dv = 192 (three 64-wide tiles, a 128 + 64 split on GPU), bf16.
    "mha_bf16_noncausal": (1, 70, 200, 2, 2, 128, 192, False, 0, False, jnp.bfloat16),
}
SMALL_BLOCKS = {
    "tpu": tpu.BlockSizes(128, 128, 128, 128, 128, 128),
    "gpu": gpu.BlockSizes(block_q=64, block_k=32, num_warps=4, num_stages=2, block_q_dkv=32,
                          block_k_dkv=64, block_q_dq=64, block_k_dq=32),
}


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(platform, case):
  b, sq, sk, h, hk, dqk, dv, causal, off, segments, dtype = CASES[case]
  q, k, v, rng = _inputs(list(CASES).index(case), b, sq, sk, h, hk, dqk, dv, dtype)
  seg = None
  if segments:
    seg = (jnp.asarray(np.sort(rng.integers(0, 3, (b, sq)), axis=1), jnp.int32),
           jnp.asarray(np.sort(rng.integers(0, 3, (b, sk)), axis=1), jnp.int32))
  off = jnp.asarray(off, jnp.int32)
  do = jnp.asarray(rng.standard_normal((b, sq, h, dv)), dtype)
  scale = 1 / math.sqrt(dqk)

  def run(backend, blocks):
    f = functools.partial(mla_attention, scale=scale, causal=causal, segment_ids=seg, q_offset=off,
                          backend=backend, platform=platform, block_sizes=blocks)
    o, vjp = jax.vjp(f, q, k, v)
    return (o, *vjp(do))

  got = run_fast(lambda: run("interpret", SMALL_BLOCKS[platform]))
  want = run("reference", None)
  tol = dict(atol=2e-5, rtol=1e-5) if dtype == jnp.float32 else dict(atol=1e-2, rtol=1e-2)
  for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
    assert a.dtype == dtype, name
    assert_close(a, e, **tol, what=f"{platform}/{case}/{name}")
  if case == "gqa_chunked_prefill":  # rows with no visible key: zero output, zero dq
    assert np.all(np.asarray(got[0])[1, :5] == 0) and np.all(np.asarray(got[1])[1, :5] == 0)


def test_dispatch():
  q, k, v, _ = _inputs(2, 1, 8, 8, 2, 2, 64, 64, jnp.float32)
  ref = reference.mla_attention_reference(q, k, v, scale=0.1)
  assert_close(mla_attention(q, k, v, scale=0.1, backend="auto"), ref, atol=0, what="auto on cpu")
  with pytest.raises(KernelRequestError, match="backend='pallas'"):
    mla_attention(q, k, v, scale=0.1, backend="pallas")
  with pytest.raises(TypeError):
    mla_attention(q, k, v, scale=0.1, backend="interpret", platform="gpu",
                  block_sizes=tpu.BlockSizes())
  with pytest.raises(ValueError):
    mla_attention(q[..., :40], k[..., :40], v, scale=0.1, backend="interpret")
  with pytest.raises(ValueError):
    mla_attention(q, k[:, :, :1].repeat(3, axis=2), v, scale=0.1)  # 3 kv heads vs 2 heads


def _lower_fwd_bwd(platform, lowering_platform, *, heads, kv_heads, seq, segments, causal=True):
  """Lowers forward + backward at DeepSeek-V3 head dims (192 / 128), bf16, default blocks."""
  sds = jax.ShapeDtypeStruct
  q = sds((2, seq, heads, 192), jnp.bfloat16)
  k = sds((2, seq, kv_heads, 192), jnp.bfloat16)
  v = sds((2, seq, kv_heads, 128), jnp.bfloat16)
  seg = (sds((2, seq), jnp.int32), sds((2, seq), jnp.int32)) if segments else None

  def f(q, k, v, seg):
    attn = lambda q, k, v: mla_attention(q, k, v, scale=0.07, causal=causal, segment_ids=seg,
                                         q_offset=jnp.array([0, 3]), backend="pallas",
                                         platform=platform)
    o, vjp = jax.vjp(attn, q, k, v)
    return o, vjp(o)

  with gpu_lowering_target(lowering_platform):
    return jax.jit(f).trace(q, k, v, seg).lower(lowering_platforms=(lowering_platform,)).as_text()


@pytest.mark.parametrize("segments", [False, True])
def test_lowers_for_tpu(segments):
  text = _lower_fwd_bwd("tpu", "tpu", heads=4, kv_heads=2, seq=1000, segments=segments)
  assert custom_calls(text, TPU_CALL) == 3  # forward, dq, dk/dv


def test_lowers_for_tpu_noncausal_mha():
  text = _lower_fwd_bwd("tpu", "tpu", heads=2, kv_heads=2, seq=384, segments=False, causal=False)
  assert custom_calls(text, TPU_CALL) == 3


@pytest.mark.parametrize("segments", [False, True])
def test_lowers_for_gpu_triton(segments):
  text = _lower_fwd_bwd("gpu", "cuda", heads=4, kv_heads=1, seq=1000, segments=segments)
  assert custom_calls(text, TRITON_CALL) == 3  # forward, dq, dk/dv
