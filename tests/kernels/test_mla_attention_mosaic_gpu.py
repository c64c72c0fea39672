"""MLA attention, Mosaic GPU forward + Mosaic GPU backward (dq and dk/dv kernels): GPU interpret
mode on CPU vs the jnp reference (outputs, and dq/dk/dv against jax's autodiff of it) and a numpy
log-sum-exp, the dispatch rules of `gpu_impl` and `backward_impl`, and lowering for CUDA.

Interpret mode runs the kernels' TMA pipelines, barriers (three warpgroups), block skipping,
masking, online softmax and the backward's GQA group loop; its wgmma takes only untransposed
shared-memory operands, so the products run as plain dots of the shared-memory tiles there (the
wgmma calls are checked by the CUDA lowering test and on a GPU only).

Tolerances (bf16 inputs; the kernel rounds p to bf16 before p @ v, as every flash attention does,
and both sides round the result to bf16, one ulp = 3.9e-3 on [0.5, 1)): outputs and gradients
1e-2 + 1e-2 * |x| (two to three ulps, the bound of tests/kernels/test_mla_attention.py). The
base-2 log-sum-exp is float32 from bf16-exact scores: 1e-4 + 1e-5 * |x|.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.kernels_pallas import mla_attention
from dsv3_jax.kernels_pallas.backend import gpu_lowering_target
from dsv3_jax.kernels_pallas.mla_attention import gpu, mosaic_gpu, reference
from tests.utils import MOSAIC_GPU_CALL, TRITON_CALL, assert_close, custom_calls, run_fast

BLOCKS = mosaic_gpu.BlockSizes(
    block_q=64, block_k=64, max_concurrent_steps=2, backward_impl="mosaic",
    mosaic_backward=mosaic_gpu.BackwardBlockSizes(block_q_dq=64, block_k_dq=64, block_q_dkv=64,
                                                  block_k_dkv=64, max_concurrent_steps=2),
    backward=gpu.BlockSizes(block_q=64, block_k=32, num_warps=4, num_stages=2, block_q_dkv=32,
                            block_k_dkv=64, block_q_dq=64, block_k_dq=32))
TOL = dict(atol=1e-2, rtol=1e-2)


# Mosaic GPU interpreter programs compiled once per kernel, everything without XLA's CPU
# optimisations: the checks are at tolerance.
pytestmark = pytest.mark.usefixtures("module_interpreter_fast_compiles")


def _inputs(seed, b, sq, sk, h, hk, dqk, dv):
  rng = np.random.default_rng(seed)
  mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
  return mk(b, sq, h, dqk), mk(b, sk, hk, dqk), mk(b, sk, hk, dv), rng


CASES = {
    # DeepSeek-V3 head dims, GQA, batch 2, chunked prefill with per-batch offsets (batch 1: the
    # first 3 rows see no key, keys 67.. are seen by no query), ragged lengths (3 key blocks
    # stream through 2 slots; the dk/dv kernel streams 2 heads x 2 query blocks per key tile).
    "gqa_chunked_prefill": (2, 70, 150, 2, 1, 192, 128, True, (80, -3), False),
    # Packed sequences (segment ids) under the causal mask, 2 query tiles (heaviest first),
    # dqk == dv (one Q/K part).
    "segments_causal_two_tiles": (1, 130, 130, 1, 1, 64, 64, True, 0, True),
    # Not causal, segment ids, MQA, dv > dqk (separate output tile), key padding only.
    "segments_noncausal_wide_v": (1, 60, 90, 2, 1, 64, 128, False, 0, True),
    # Not causal, no segments, no key padding: no masked code at all (the dk/dv kernel streams
    # every query block of both query heads), MHA.
    "unmasked_mha": (1, 128, 128, 2, 2, 192, 128, False, 0, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_grad_match_reference(case):
  b, sq, sk, h, hk, dqk, dv, causal, off, segments = CASES[case]
  q, k, v, rng = _inputs(sum(map(ord, case)), b, sq, sk, h, hk, dqk, dv)
  seg = None
  if segments:
    seg = (jnp.asarray(np.sort(rng.integers(0, 3, (b, sq)), axis=1), jnp.int32),
           jnp.asarray(np.sort(rng.integers(0, 3, (b, sk)), axis=1), jnp.int32))
  off = jnp.asarray(off, jnp.int32)
  do = jnp.asarray(rng.standard_normal((b, sq, h, dv)), jnp.bfloat16)
  scale = 1 / math.sqrt(dqk)

  def run(backend, **kw):
    f = functools.partial(mla_attention, scale=scale, causal=causal, segment_ids=seg, q_offset=off,
                          backend=backend, **kw)
    o, vjp = jax.vjp(f, q, k, v)
    return (o, *vjp(do))

  got = run_fast(lambda: run("interpret", platform="gpu", gpu_impl="mosaic", block_sizes=BLOCKS))
  want = run("reference")
  for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
    assert a.dtype == jnp.bfloat16, name
    assert_close(a, e, **TOL, what=f"mosaic/{case}/{name}")
  if case == "gqa_chunked_prefill":  # rows with no visible key: zero output, zero dq
    assert np.all(np.asarray(got[0])[1, :3] == 0) and np.all(np.asarray(got[1])[1, :3] == 0)
    # keys no query sees (batch 1, positions > 66): zero dk and dv
    assert np.all(np.asarray(got[2])[1, 67:] == 0) and np.all(np.asarray(got[3])[1, 67:] == 0)


def test_lse_matches_numpy():
  """The residual the Triton backward consumes: base-2 logsumexp of the scaled scores, +inf on
  rows with no visible key, [batch, heads, padded q_len]."""
  b, sq, sk, h, dqk, dv = 1, 128, 64, 1, 64, 64
  q, k, v, _ = _inputs(7, b, sq, sk, h, h, dqk, dv)
  off = jnp.asarray([-10], jnp.int32)
  cfg = reference.KernelConfig(scale=0.125, causal=True, has_segments=False, blocks=BLOCKS,
                               interpret=True, kv_len=sk)
  o, lse = run_fast(lambda: mosaic_gpu.forward(q, k, v, off, None, None, cfg))
  s = np.einsum("bthd,bshd->bhts", np.asarray(q, np.float64), np.asarray(k, np.float64)) * 0.125
  vis = np.arange(sk)[None, :] <= np.arange(sq)[:, None] - 10
  s = np.where(vis, s, -np.inf)
  with np.errstate(divide="ignore"):
    want = np.log2(np.exp(s).sum(-1))
  want = np.where(vis.any(-1), want, np.inf)
  lse = np.asarray(lse)
  assert np.array_equal(np.isinf(lse), np.isinf(want)) and np.all(lse[np.isinf(lse)] > 0)
  fin = np.isfinite(want)
  assert_close(lse[fin], want[fin], atol=1e-4, rtol=1e-5, what="lse")
  assert_close(o, reference.mla_attention_reference(q, k, v, scale=0.125, q_offset=-10), **TOL,
               what="out")


def test_dispatch():
  q, k, v, _ = _inputs(3, 1, 8, 8, 2, 2, 64, 64)
  kw = dict(scale=0.1, backend="interpret", platform="gpu")
  with pytest.raises(ValueError, match="gpu_impl='mosaic'"):  # fp32: wgmma here takes bf16/f16
    mla_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                  gpu_impl="mosaic", **kw)
  with pytest.raises(ValueError, match="unknown GPU kernel flavour"):
    mla_attention(q, k, v, gpu_impl="cutlass", **kw)
  big = mosaic_gpu.BlockSizes(block_q=128, block_k=256, max_concurrent_steps=4)
  reason = mosaic_gpu.unsupported_reason(q, k, v, scale=0.1, blocks=big, has_segments=False)
  assert reason is not None and "shared memory" in reason
  assert mosaic_gpu.unsupported_reason(q, k, v, scale=0.1, blocks=mosaic_gpu.BlockSizes(),
                                       has_segments=True) is None
  with pytest.raises(ValueError):
    mosaic_gpu.BlockSizes(block_q=96)
  with pytest.raises(ValueError):
    mosaic_gpu.BlockSizes(max_concurrent_steps=1)
  with pytest.raises(ValueError, match="backward_impl"):
    mosaic_gpu.BlockSizes(backward_impl="cudnn")
  with pytest.raises(ValueError, match="block_k_dkv"):
    mosaic_gpu.BackwardBlockSizes(block_k_dkv=32)
  # Backward selection: Mosaic by default at the DeepSeek-V3 dims, Triton when asked for or when
  # the Mosaic backward's tiles exceed shared memory.
  assert mosaic_gpu.backward_choice(192, 128, 2, mosaic_gpu.BlockSizes(), True) == ("mosaic", None)
  impl, why = mosaic_gpu.backward_choice(192, 128, 2,
                                         mosaic_gpu.BlockSizes(backward_impl="triton"), False)
  assert impl == "triton" and "backward_impl" in why
  huge = mosaic_gpu.BlockSizes(mosaic_backward=mosaic_gpu.BackwardBlockSizes(
      block_k_dq=256, max_concurrent_steps=4))
  impl, why = mosaic_gpu.backward_choice(192, 128, 2, huge, False)
  assert impl == "triton" and "shared memory" in why


@pytest.mark.parametrize("segments,backward_impl",
                         [(False, "mosaic"), (True, "mosaic"), (False, "triton")])
def test_lowers_for_cuda_at_deepseek_shape(segments, backward_impl):
  """jax.grad through the forward (Mosaic GPU) and the backward (Mosaic GPU dq + dk/dv kernels,
  or Triton) lowers for CUDA without a GPU: seq 4096, 128 heads, 192/128 head dims, bf16,
  default tiles."""
  sds = jax.ShapeDtypeStruct
  b, s, h = 1, 4096, 128
  q, k, v = sds((b, s, h, 192), jnp.bfloat16), sds((b, s, h, 192), jnp.bfloat16), sds(
      (b, s, h, 128), jnp.bfloat16)
  seg = (sds((b, s), jnp.int32), sds((b, s), jnp.int32)) if segments else None

  blocks = mosaic_gpu.BlockSizes(backward_impl=backward_impl)

  def f(q, k, v, seg):
    o = mla_attention(q, k, v, scale=192 ** -0.5, segment_ids=seg, backend="pallas",
                      platform="gpu", gpu_impl="mosaic", block_sizes=blocks)
    return jnp.sum(o.astype(jnp.float32) ** 2)

  grad = jax.jit(jax.grad(f, argnums=(0, 1, 2)))
  with gpu_lowering_target("cuda"):  # the Triton backward needs a target GPU on jax 0.12
    text = grad.trace(q, k, v, seg).lower(lowering_platforms=("cuda",)).as_text()
  n_mosaic, n_triton = custom_calls(text, MOSAIC_GPU_CALL), custom_calls(text, TRITON_CALL)
  if backward_impl == "mosaic":
    assert (n_mosaic, n_triton) == (3, 0)  # forward, dq, dk/dv
  else:
    assert (n_mosaic, n_triton) == (1, 2)  # forward; Triton dq and dk/dv
