"""HF/PyTorch safetensors <-> Orbax conversion (`dsv3 convert`, `dsv3 export`).

  convert(src, dst, dtype="bfloat16"|"float32"|"float8")  HF directory -> Orbax directory,
      streamed (experts stacked per layer, MTP layers kept, FP8 dequantised or kept as e4m3 +
      block scales in the checkpoint's [out, in] layout) and resumable after an interruption.
  export(src, out, dtype="bfloat16"|"float32"|"float8")   a converted directory or a training
      run / step -> HF shards + index.
  restore_arrays(params_dir, abstract_vars, shardings=...)  restore into any sharding (each
      process reads only its shards); `dsv3_jax.from_pretrained(dir, mesh=...)` uses it.
The on-disk layout: `orbax_io` (the directory) and `dsv3_jax.param_tree` (the parameter tree).
"""
from dsv3_jax.convert.convert import convert
from dsv3_jax.convert.export import export, quantize_blocks
from dsv3_jax.convert.orbax_io import TreeWriter
from dsv3_jax.param_tree import (MANIFEST, Fp8Weight, is_converted, read_manifest, restore_arrays,
                                 restore_numpy)

__all__ = ["convert", "export", "quantize_blocks", "restore_arrays", "restore_numpy",
           "is_converted", "read_manifest", "Fp8Weight", "TreeWriter", "MANIFEST"]
