"""MLA attention throughput (training/prefill): our Pallas kernel vs cuDNN and the XLA reference.

Causal attention, bf16, DeepSeek-V3 head dims (q/k 192, v 128), 128 heads (default), for
sequence lengths 2k-16k at --batch (default 1). Forward and forward+backward
(gradients w.r.t. q, k, v). Baselines:
  cudnn  jax.nn.dot_product_attention(..., implementation="cudnn"), which rejects dv != dqk, so v
         is zero-padded to 192 inside the timed function and the output sliced back to 128;
  xla    the jnp reference (`mla_attention_reference`: einsum, fp32 softmax, masks).
Every TFLOP/s figure uses the same MLA flop count (visible (query, key) pairs only; 2 flops per
multiply-add; forward dqk + dv, backward 3 dqk + 2 dv per pair per head), so ratios between
columns are ratios of time. "% peak" is against 790 TFLOP/s, the dense bf16 matmul rate measured
on the H100 (ARCHITECTURE.md). The XLA reference materialises fp32 scores [batch, heads, seq,
seq]; it is only run where that tensor fits in --xla-max-gb ("-" otherwise), and a baseline that
fails (out of memory, unsupported) prints "err".

Each function is jitted, run --warmup times, then timed over --iters calls (block_until_ready
after each timed batch of calls); the best of --repeats batches is reported. Prints a markdown
table (ready for bench/RESULTS.md) preceded by device and jax version.

  python bench/attention.py [--quick] [--seqs 2048 4096] [--heads 128] [--batch 1]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from dsv3_jax.kernels_pallas.mla_attention import mla_attention, mla_attention_reference

PEAK_TFLOPS = 790.0
DQK, DV = 192, 128


def flops(batch: int, seq: int, heads: int, backward: bool) -> float:
  pairs = seq * (seq + 1) / 2  # causal, q_len == kv_len
  per_pair = (DQK + DV) + ((3 * DQK + 2 * DV) if backward else 0)
  return 2.0 * batch * heads * pairs * per_pair


def bench(fn, args, *, warmup: int, iters: int, repeats: int) -> float:
  """Best seconds per call of a jitted fn."""
  out = None
  for _ in range(warmup):
    out = fn(*args)
  jax.block_until_ready(out)
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t) / iters)
  return best


def implementations(scale: float, backend: str):
  def ours(q, k, v):
    return mla_attention(q, k, v, scale=scale, causal=True, backend=backend)

  def cudnn(q, k, v):
    v_pad = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, DQK - DV)))
    o = jax.nn.dot_product_attention(q, k, v_pad, scale=scale, is_causal=True,
                                     implementation="cudnn")
    return o[..., :DV]

  def xla(q, k, v):
    return mla_attention_reference(q, k, v, scale=scale, causal=True)

  return {"ours": ours, "cudnn": cudnn, "xla": xla}


def fwd_bwd(f):
  def run(q, k, v, do):
    o, vjp = jax.vjp(f, q, k, v)
    return vjp(do)
  return run


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="seq 2k and 8k, fewer iterations")
  ap.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
  ap.add_argument("--heads", type=int, default=128)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--backend", default="pallas", help="backend for ours (pallas | interpret ...)")
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--xla-max-gb", type=float, default=10.0,
                  help="largest fp32 score tensor the XLA reference is run with")
  a = ap.parse_args()
  if a.quick:
    a.seqs, a.iters, a.repeats, a.warmup = [2048, 8192], 3, 2, 2

  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  print(f"causal bf16 MLA attention, {a.heads} heads, dqk {DQK}, dv {DV}, batch {a.batch}; "
        f"TFLOP/s on the MLA flop count, % of {PEAK_TFLOPS:.0f} peak\n")
  print("| seq | batch | pass | ours | cudnn (v padded) | xla ref | ours/cudnn | ours/xla "
        "| ours % peak |")
  print("|---|---|---|---|---|---|---|---|---|")
  scale = DQK ** -0.5
  timing = dict(warmup=a.warmup, iters=a.iters, repeats=a.repeats)
  for seq in a.seqs:
    batch = a.batch
    keys = jax.random.split(jax.random.key(seq), 4)
    q = jax.random.normal(keys[0], (batch, seq, a.heads, DQK), jnp.bfloat16)
    k = jax.random.normal(keys[1], (batch, seq, a.heads, DQK), jnp.bfloat16)
    v = jax.random.normal(keys[2], (batch, seq, a.heads, DV), jnp.bfloat16)
    do = jax.random.normal(keys[3], (batch, seq, a.heads, DV), jnp.bfloat16)
    xla_gb = batch * a.heads * seq * seq * 4 / 1e9
    impls = implementations(scale, a.backend)
    for backward in (False, True):
      tf = {}
      for name, f in impls.items():
        if name == "xla" and xla_gb > a.xla_max_gb:
          tf[name] = None
          continue
        fn = jax.jit(fwd_bwd(f)) if backward else jax.jit(f)
        args = (q, k, v, do) if backward else (q, k, v)
        try:
          sec = bench(fn, args, **timing)
          tf[name] = flops(batch, seq, a.heads, backward) / sec / 1e12
        except Exception as e:  # noqa: BLE001 -- a baseline failing must not stop the table
          tf[name] = f"err ({type(e).__name__})"
      fmt = lambda x: "-" if x is None else (x if isinstance(x, str) else f"{x:.1f}")
      ratio = lambda x, y: (f"{x / y:.2f}x" if isinstance(x, float) and isinstance(y, float)
                            else "-")
      ours = tf["ours"]
      peak = f"{100 * ours / PEAK_TFLOPS:.1f}%" if isinstance(ours, float) else "-"
      print(f"| {seq} | {batch} | {'fwd+bwd' if backward else 'fwd'} | {fmt(ours)} | "
            f"{fmt(tf['cudnn'])} | {fmt(tf['xla'])} | {ratio(ours, tf['cudnn'])} | "
            f"{ratio(ours, tf['xla'])} | {peak} |", flush=True)


if __name__ == "__main__":
  main()
