"""Converter throughput and peak RSS on a synthetic FP8 checkpoint with the real 671B shapes (CPU).

Builds, for each number of layers in --layers, an official-format FP8 checkpoint: the
DeepSeek-V3 config (hidden 7168, vocab 129280, q_lora 1536, kv_lora 512, 128 heads, dense
intermediate 18432, expert intermediate 2048, one shared expert, 128x128 blocks) with
num_hidden_layers = L (layer 0 dense, the rest MoE), n_routed_experts reduced to --experts
(default 8; 256 would be 11 GB per layer) and no MTP layer (its copies of the embedding and head
would add 3.7 GB). Every tensor has its real 671B shape; linear/expert weights are random e4m3
bytes (NaN codes removed) with float32 block scales, the rest bf16 (bias fp32), split into
~--shard-mb shards with model.safetensors.index.json. Then `dsv3 convert` runs in a child
process (so its peak RSS is its own: VmHWM from /proc/self/status at exit) and the bench
prints source size, time, throughput (source MB/s) and peak RSS (VmHWM). Everything is deleted after.

  python bench/convert.py [--layers 2 4] [--dtype bfloat16] [--group-mb 512] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

# Peak RSS = VmHWM of the child's own address space. (getrusage's ru_maxrss would carry the
# parent's high-water mark across fork+exec on Linux, and the parent holds a shard while building.)
CHILD = r"""
import json, sys, time
def hwm_kb():
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
from dsv3_jax.convert import convert
r1 = hwm_kb()
t = time.perf_counter()
convert(sys.argv[1], sys.argv[2], dtype=sys.argv[3], group_bytes=int(float(sys.argv[4]) * (1 << 20)), progress=False)
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "peak_rss_kb": hwm_kb(), "import_rss_kb": r1}))
"""


def bench_config(layers: int, experts: int) -> dict:
  from dsv3_jax.config import DEEPSEEK_V3
  cfg = DEEPSEEK_V3.replace(num_hidden_layers=layers, n_routed_experts=experts, n_group=1,
                            topk_group=1, num_experts_per_tok=min(8, experts),
                            first_k_dense_replace=1, num_nextn_predict_layers=0)
  return cfg


def build(path: str, cfg, shard_bytes: int, seed: int = 0) -> tuple[int, int]:
  """Writes the synthetic FP8 checkpoint; returns (bytes, number of shards)."""
  import ml_dtypes
  from dsv3_jax.checkpoint import hf_shape, name_table
  from dsv3_jax.pretrained import abstract_model, param_shapes
  from dsv3_jax.safetensors_io import save_file
  os.makedirs(path)
  shapes = param_shapes(abstract_model(cfg))
  table = name_table(cfg, shapes)
  rng = np.random.default_rng(seed)
  pool = rng.integers(0, 256, 64 << 20, dtype=np.uint8)
  pool[(pool & 0x7F) == 0x7F] = 0  # no NaN codes in e4m3

  def fp8(shape):
    n = int(np.prod(shape))
    reps = -(-n // pool.size)
    off = int(rng.integers(0, 4096))
    return np.tile(pool, reps + 1)[off:off + n].view(ml_dtypes.float8_e4m3fn).reshape(shape) \
        if reps > 1 else pool[off:off + n].view(ml_dtypes.float8_e4m3fn).reshape(shape)

  weight_map, shard, size, total, files = {}, {}, 0, 0, []

  def flush():
    nonlocal shard, size
    if shard:
      name = f"model-{len(files) + 1:05d}.safetensors"
      save_file(shard, os.path.join(path, name), {"format": "pt"})
      files.append(name)
      weight_map.update({n: name for n in shard})
      shard, size = {}, 0

  for name, e in table.items():
    shp = hf_shape(e, tuple(shapes[e.target]))
    quant = e.kind in ("linear", "expert") and not e.target.endswith(("mlp.gate.kernel", "lm_head.kernel"))
    if quant:
      tensors = {name: fp8(shp), name + "_scale_inv": (rng.random(
          (-(-shp[0] // 128), -(-shp[1] // 128)), dtype=np.float32) * 1e-3 + 1e-4)}
    elif name.endswith("bias"):
      tensors = {name: rng.standard_normal(shp, dtype=np.float32)}
    else:
      # finite bf16 in [2^-7, 2^-5): exponent bits fixed, the random byte in the low bits
      tensors = {name: (fp8(shp).view(np.uint8).astype(np.uint16) | 0x3C00).view(ml_dtypes.bfloat16)}
    for n, t in tensors.items():
      nb = t.nbytes
      if size and size + nb > shard_bytes:
        flush()
      shard[n] = t
      size += nb
      total += nb
  flush()
  n = len(files)
  for i, f in enumerate(files):  # official names: model-0000i-of-0000n
    new = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
    os.rename(os.path.join(path, f), os.path.join(path, new))
    weight_map = {k: (new if v == f else v) for k, v in weight_map.items()}
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
  with open(os.path.join(path, "config.json"), "w") as fh:
    json.dump(cfg.to_hf_config(), fh)
  return total, n


def du(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--layers", type=int, nargs="+", default=[2, 4])
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float8"])
  p.add_argument("--group-mb", type=float, default=512)
  p.add_argument("--shard-mb", type=int, default=256)
  p.add_argument("--dir", default="/tmp")
  args = p.parse_args(argv)
  import jax
  root = os.path.join(args.dir, f"dsv3_convert_bench_{os.getpid()}")
  rows = []
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    for layers in args.layers:
      cfg = bench_config(layers, args.experts)
      src, dst = os.path.join(root, f"src{layers}"), os.path.join(root, f"dst{layers}")
      t = time.perf_counter()
      nbytes, shards = build(src, cfg, args.shard_mb << 20)
      print(f"built {layers}-layer checkpoint: {nbytes / 1e9:.2f} GB in {shards} shards "
            f"({time.perf_counter() - t:.0f} s)", flush=True)
      env = dict(os.environ, JAX_PLATFORMS="cpu")
      out = subprocess.run([sys.executable, "-c", CHILD, src, dst, args.dtype, str(args.group_mb)],
                           cwd=repo, env=env, capture_output=True, text=True)
      if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        return 1
      r = json.loads(out.stdout.strip().splitlines()[-1])
      from dsv3_jax.pretrained import param_shapes, param_dtypes, abstract_model
      from dsv3_jax.convert.convert import DTYPES
      from dsv3_jax.config import RuntimeConfig
      ab = abstract_model(cfg, RuntimeConfig(param_dtype=DTYPES[args.dtype]))
      dts = param_dtypes(ab)
      largest = max(int(np.prod(s)) * dts[k].itemsize for k, s in param_shapes(ab).items())
      rows.append(dict(layers=layers, src_gb=nbytes / 1e9, shards=shards, dst_gb=du(dst) / 1e9,
                       s=r["seconds"], mbps=nbytes / 1e6 / r["seconds"],
                       rss_gb=r["peak_rss_kb"] / 2**20, import_gb=r["import_rss_kb"] / 2**20,
                       largest_gb=largest / 2**30))
      shutil.rmtree(src)
      shutil.rmtree(dst)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  print(f"\njax {jax.__version__}, dtype {args.dtype}, group {args.group_mb} MiB, "
        f"{args.experts} routed experts/layer, real 671B tensor shapes")
  head = ("| layers | checkpoint (FP8) | shards | output | time | throughput | peak RSS | "
          "RSS after imports | largest output parameter |")
  print(head)
  print("|" + "---|" * 9)
  for r in rows:
    print(f"| {r['layers']} | {r['src_gb']:.2f} GB | {r['shards']} | {r['dst_gb']:.2f} GB | "
          f"{r['s']:.0f} s | {r['mbps']:.0f} MB/s | {r['rss_gb']:.2f} GiB | {r['import_gb']:.2f} GiB | "
          f"{r['largest_gb']:.2f} GiB |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
