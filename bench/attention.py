"""MLA attention throughput (training/prefill): our Pallas kernel vs cuDNN and the XLA reference.

Causal attention, bf16, DeepSeek-V3 head dims (q/k 192, v 128), 128 heads (default), for
sequence lengths 2k-16k at --batch (default 1). Forward and forward+backward
(gradients w.r.t. q, k, v). Baselines:
  ours   our Pallas kernel, GPU flavour Triton (forward and backward), column "ours";
  mosaic our Mosaic GPU forward (Hopper: wgmma, TMA, warp specialisation) with the Mosaic GPU
         backward (`gpu_impl="mosaic"`; --mosaic-blocks BQ BK STAGES tunes its forward,
         --mosaic-bwd-blocks its backward, --mosaic-bwd triton swaps in the Triton backward);
  cudnn  jax.nn.dot_product_attention(..., implementation="cudnn"), whose public API requires
         v to have k's head dim (jax 0.10-0.11 check value [B, S, K, H] against key), so v is
         zero-padded to 192 inside the timed function and the output sliced back to 128;
  xla    the jnp reference (`mla_attention_reference`: einsum, fp32 softmax, masks).
Every TFLOP/s figure uses the same MLA flop count (visible (query, key) pairs only; 2 flops per
multiply-add; forward dqk + dv, backward 3 dqk + 2 dv per pair per head), so ratios between
columns are ratios of time. "% peak" is against 790 TFLOP/s, the dense bf16 matmul rate measured
on the H100 (ARCHITECTURE.md). The XLA reference materialises fp32 scores [batch, heads, seq,
seq]; it is only run where that tensor fits in --xla-max-gb ("-" otherwise), and a baseline that
fails (out of memory, unsupported) prints "err" (the reason goes to stderr).

Timing (bench/common.py `time_call`): --warmup calls, then the best of --repeats batches of
--iters calls, one block_until_ready per batch. Prints a markdown table preceded by device and
jax version; --markdown PATH writes it as a section of PATH.

  python bench/attention.py [--quick] [--seqs 2048 4096] [--heads 128] [--batch 1]
  python bench/attention.py --smoke   (CPU: tiny shapes, GPU kernel in interpret mode, cuDNN
                                       column computed by implementation="xla", plus CUDA
                                       lowering of the kernel at the real shapes)
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (H100_BF16_TFLOPS, Table, add_timing_args, attempt,  # noqa: E402
                    check_cuda_lowering, kernel_options, peak_fraction, print_header, ratio,
                    save_table, time_call)

from dsv3_jax.kernels_pallas.mla_attention import (mla_attention,  # noqa: E402
                                                   mla_attention_reference)

__all__ = ["flops", "implementations", "fwd_bwd", "main"]

DQK, DV = 192, 128


def flops(batch: int, seq: int, heads: int, backward: bool) -> float:
  """MLA attention flops of one causal call (q_len == kv_len == seq)."""
  pairs = seq * (seq + 1) / 2
  per_pair = (DQK + DV) + ((3 * DQK + 2 * DV) if backward else 0)
  return 2.0 * batch * heads * pairs * per_pair


def implementations(scale: float, kernel_kw: dict, cudnn_impl: str = "cudnn",
                    mosaic_blocks=None) -> dict:
  """{"ours", "mosaic", "cudnn", "xla"} -> f(q [B,T,H,192], k [B,T,H,192], v [B,T,H,128])
  -> [B,T,H,128]. mosaic_blocks: `mosaic_gpu.BlockSizes` of the Mosaic GPU forward (or None).

  cudnn_impl: the `implementation=` of jax.nn.dot_product_attention ("xla" in --smoke runs,
  where cuDNN does not exist; the padding and slicing are the same).
  """
  def ours(q, k, v):
    return mla_attention(q, k, v, scale=scale, causal=True, gpu_impl="triton", **kernel_kw)

  def mosaic(q, k, v):
    return mla_attention(q, k, v, scale=scale, causal=True, gpu_impl="mosaic",
                         block_sizes=mosaic_blocks, **kernel_kw)

  def cudnn(q, k, v):
    v_pad = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, DQK - DV)))
    o = jax.nn.dot_product_attention(q, k, v_pad, scale=scale, is_causal=True,
                                     implementation=cudnn_impl)
    return o[..., :DV]

  def xla(q, k, v):
    return mla_attention_reference(q, k, v, scale=scale, causal=True)

  return {"ours": ours, "mosaic": mosaic, "cudnn": cudnn, "xla": xla}


def fwd_bwd(f):
  """(q, k, v, do) -> (dq, dk, dv) of f."""
  def run(q, k, v, do):
    _, vjp = jax.vjp(f, q, k, v)
    return vjp(do)
  return run


def lowering_checks(seq: int, heads: int, batch: int) -> None:
  """Lowers our kernel's forward and forward+backward for CUDA at the real shapes."""
  sds = jax.ShapeDtypeStruct
  q = sds((batch, seq, heads, DQK), jnp.bfloat16)
  v = sds((batch, seq, heads, DV), jnp.bfloat16)
  impls = implementations(DQK ** -0.5, {"backend": "pallas", "platform": "gpu"})
  ours = impls["ours"]
  check_cuda_lowering(f"mla_attention fwd seq {seq} heads {heads}", ours, q, q, v)
  check_cuda_lowering(f"mla_attention fwd+bwd seq {seq} heads {heads}", fwd_bwd(ours),
                      q, q, v, v)
  check_cuda_lowering(f"mla_attention mosaic fwd seq {seq} heads {heads}", impls["mosaic"],
                      q, q, v, marker="mosaic_gpu")
  check_cuda_lowering(f"mla_attention mosaic fwd+bwd seq {seq} heads {heads}",
                      fwd_bwd(impls["mosaic"]), q, q, v, v, marker="custom_call @mosaic_gpu")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="seq 2k and 8k, fewer iterations")
  ap.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
  ap.add_argument("--heads", type=int, default=128)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--xla-max-gb", type=float, default=10.0,
                  help="largest fp32 score tensor the XLA reference is run with")
  ap.add_argument("--mosaic-blocks", type=int, nargs=3, metavar=("BQ", "BK", "STAGES"),
                  help="Mosaic GPU forward tiles: block_q (per warpgroup), block_k, "
                       "max_concurrent_steps (default 64 128 2)")
  ap.add_argument("--no-schedule-barrier", action="store_true",
                  help="Mosaic GPU forward without the warpgroup ping-pong barrier")
  ap.add_argument("--mosaic-bwd", choices=("mosaic", "triton"), default="mosaic",
                  help="backward of the mosaic column (default: the Mosaic GPU backward)")
  ap.add_argument("--mosaic-bwd-blocks", type=int, nargs=5,
                  metavar=("BQ_DQ", "BK_DQ", "BQ_DKV", "BK_DKV", "STAGES"),
                  help="Mosaic GPU backward tiles (default 64 64 64 64 2)")
  add_timing_args(ap, warmup=3, iters=10, repeats=3)
  a = ap.parse_args(argv)
  if a.quick:
    a.seqs, a.iters, a.repeats, a.warmup = [2048, 8192], 3, 2, 2
  cudnn_impl = "cudnn"
  if a.smoke:
    lowering_checks(a.seqs[0], a.heads, a.batch)
    a.seqs, a.heads, a.batch, a.warmup, a.iters, a.repeats = [128], 2, 1, 1, 1, 1
    cudnn_impl = "xla"
    print("note: cuDNN needs a GPU; in --smoke the cudnn column runs the same call with "
          "implementation='xla'")

  print_header(f"causal bf16 MLA attention, {a.heads} heads, dqk {DQK}, dv {DV}, batch "
               f"{a.batch}; TFLOP/s on the MLA flop count, % of {H100_BF16_TFLOPS:.0f} peak", a)
  table = Table([("seq", "seq", "d"), ("batch", "batch", "d"), ("pass", "pass", "s"),
                 ("ours", "ours", ".1f"), ("mosaic", "mosaic", ".1f"),
                 ("cudnn", "cudnn (v padded)", ".1f"),
                 ("xla", "xla ref", ".1f"), ("vs_cudnn", "ours/cudnn", "s"),
                 ("mosaic_vs_cudnn", "mosaic/cudnn", "s"), ("vs_xla", "ours/xla", "s"),
                 ("peak", "ours % peak", "s")])
  scale = DQK ** -0.5
  timing = dict(warmup=a.warmup, iters=a.iters, repeats=a.repeats)
  from dsv3_jax.kernels_pallas.mla_attention import mosaic_gpu
  mb = dict(zip(("block_q", "block_k", "max_concurrent_steps"), a.mosaic_blocks or ()))
  bb = dict(zip(("block_q_dq", "block_k_dq", "block_q_dkv", "block_k_dkv",
                 "max_concurrent_steps"), a.mosaic_bwd_blocks or ()))
  mosaic_blocks = mosaic_gpu.BlockSizes(**mb, use_schedule_barrier=not a.no_schedule_barrier,
                                        backward_impl=a.mosaic_bwd,
                                        mosaic_backward=mosaic_gpu.BackwardBlockSizes(**bb))
  impls = implementations(scale, kernel_options(a), cudnn_impl, mosaic_blocks)
  for seq in a.seqs:
    keys = jax.random.split(jax.random.key(seq), 4)
    q = jax.random.normal(keys[0], (a.batch, seq, a.heads, DQK), jnp.bfloat16)
    k = jax.random.normal(keys[1], (a.batch, seq, a.heads, DQK), jnp.bfloat16)
    v = jax.random.normal(keys[2], (a.batch, seq, a.heads, DV), jnp.bfloat16)
    do = jax.random.normal(keys[3], (a.batch, seq, a.heads, DV), jnp.bfloat16)
    xla_gb = a.batch * a.heads * seq * seq * 4 / 1e9
    for backward in (False, True):
      fl = flops(a.batch, seq, a.heads, backward)
      row = {"seq": seq, "batch": a.batch, "pass": "fwd+bwd" if backward else "fwd"}
      for name, f in impls.items():
        if name == "xla" and xla_gb > a.xla_max_gb:
          row[name] = None
          continue
        fn = jax.jit(fwd_bwd(f)) if backward else jax.jit(f)
        args = (q, k, v, do) if backward else (q, k, v)
        row[name] = attempt(lambda: fl / time_call(fn, args, **timing) / 1e12)
      row.update(vs_cudnn=ratio(row["ours"], row["cudnn"]), vs_xla=ratio(row["ours"], row["xla"]),
                 mosaic_vs_cudnn=ratio(row["mosaic"], row["cudnn"]),
                 peak=peak_fraction(row["ours"], H100_BF16_TFLOPS))
      table.add(row)
    del q, k, v, do
  save_table(a.markdown, "MLA attention (bench/attention.py)", table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
