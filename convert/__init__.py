"""HF/PyTorch safetensors <-> Orbax conversion (`dsv3 convert`, `dsv3 export`).

  convert(src, dst, dtype="bfloat16"|"float32"|"float8")  HF directory -> Orbax directory,
      streamed one parameter at a time (experts stacked, MTP layers kept, FP8 dequantised or
      kept as e4m3 + block scales in the checkpoint's [out, in] layout).
  export(src, out, dtype="bfloat16"|"float32"|"float8")   Orbax directory -> HF shards + index.
  restore_arrays(dir, abstract_vars, shardings=...)       restore into any sharding (each
      process reads only its shards); `dsv3_jax.from_pretrained(dir, shardings=...)` uses it.
The on-disk layout is described in `orbax_io`.
"""
from dsv3_jax.convert.convert import check_checkpoint, convert, read_targets_fp8
from dsv3_jax.convert.export import export, quantize_blocks
from dsv3_jax.convert.orbax_io import (MANIFEST, Fp8Weight, OrbaxWriter, is_converted, read_manifest,
                                       restore_arrays, restore_numpy)

__all__ = ["convert", "export", "read_targets_fp8", "check_checkpoint", "quantize_blocks",
           "restore_arrays", "restore_numpy", "is_converted", "read_manifest", "Fp8Weight",
           "OrbaxWriter", "MANIFEST"]
