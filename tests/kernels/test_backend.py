"""Kernel backend selection: the documented rules of `select` and `gpu_flavor`."""
import pytest

from dsv3_jax.errors import UserError
from dsv3_jax.kernels_pallas.backend import Backend, Impl, KernelRequestError, gpu_flavor, select


def test_select_rules():
  assert select("reference") == Impl("reference")
  assert select(Backend.INTERPRET) == Impl("tpu", interpret=True)
  assert select("interpret", platform="gpu") == Impl("gpu", interpret=True)
  # on this CPU-only machine AUTO falls back to the reference, PALLAS refuses to
  assert select("auto") == Impl("reference")
  with pytest.raises(KernelRequestError, match="no Pallas implementation for platform 'cpu'"):
    select("pallas")
  # a user's request: the CLI prints it as one line (UserError); callers may catch ValueError
  assert issubclass(KernelRequestError, UserError) and issubclass(KernelRequestError, ValueError)
  # an explicit platform is honoured (lowering tests); CUDA and ROCm both mean the GPU kernel
  assert select("pallas", platform="cuda") == Impl("gpu")
  assert select("auto", platform="rocm") == Impl("gpu")
  assert select("auto", platform="tpu", available=("gpu",)) == Impl("reference")
  with pytest.raises(ValueError, match="unknown kernel backend 'mosaic'"):
    select("mosaic")
  with pytest.raises(ValueError, match="no Pallas kernel for platform 'gpu'"):
    select("interpret", platform="gpu", available=("tpu",))


def test_gpu_flavor_rules(monkeypatch):
  assert gpu_flavor() == gpu_flavor("auto") == "triton"  # no Hopper GPU here
  assert gpu_flavor("mosaic") == "mosaic" and gpu_flavor("triton") == "triton"
  # the environment is read once, by RuntimeConfig, never at trace time here
  monkeypatch.setenv("DSV3_GPU_KERNELS", "mosaic")
  assert gpu_flavor() == "triton"
  with pytest.raises(KernelRequestError, match="no Mosaic GPU implementation"):
    gpu_flavor("mosaic", has_mosaic=False)
  with pytest.raises(KernelRequestError, match="unknown GPU kernel flavour 'cudnn'"):
    gpu_flavor("cudnn")
  import dsv3_jax.kernels_pallas.backend as b
  monkeypatch.setattr(b, "_is_hopper", lambda: True)
  assert gpu_flavor() == "mosaic" and gpu_flavor(has_mosaic=False) == "triton"
