"""tests/gpu_aot: GPU kernels and the sharded model compiled for H100s (sm_90a) on CPU.

They need jax's CUDA plugin (jax[cuda12] of the installed jax version), which the CPU test
environment does not have: without it this folder is not collected at all (CI stage 3 builds
.venvcuda with the plugin and runs `pytest tests/gpu_aot`; stages 1 and 2 pass
--ignore=tests/gpu_aot). Nothing here needs a GPU.
"""
import importlib.util


def _has_cuda_plugin() -> bool:
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:  # no jax_plugins package at all
    return False


if not _has_cuda_plugin():
  collect_ignore_glob = ["test_*.py"]
else:
  # No persistent compilation cache here (tests/conftest.py makes one for the run): these tests
  # read what XLA and ptxas report while compiling, which a cache hit would skip.
  import os

  import jax

  os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"  # for the processes the tests start
  jax.config.update("jax_enable_compilation_cache", False)
