"""Kernel backend selection shared by every kernel in this package.

Each kernel has a pure-jnp reference (the oracle and the portable fallback), a TPU Pallas
implementation (Mosaic) and a GPU Pallas implementation. `select` turns the user's request into
the implementation to run:

- ``Backend.AUTO``: the Pallas kernel of the current platform (``jax.default_backend()``) when
  the kernel has one, otherwise the reference.
- ``Backend.REFERENCE``: always the reference.
- ``Backend.PALLAS``: the Pallas kernel of the current platform; raises `KernelRequestError`
  when there is none (never silently falls back).
- ``Backend.INTERPRET``: the TPU or GPU kernel (``platform=``) in Pallas interpret mode, which
  runs on CPU; used by the tests.

On GPU a kernel may have two Pallas implementations: the Triton lowering (portable, also ROCm)
and Mosaic GPU (Hopper-only: wgmma, TMA, warp specialisation). `gpu_flavor` picks one. Only
"auto" may choose: an explicitly requested flavour (or kernel-specific block sizes) that cannot
take the inputs raises `KernelRequestError` naming why.

Nothing here is decided at import time or read from the environment: `RuntimeConfig.gpu_kernels`
(whose default comes from DSV3_GPU_KERNELS when the config is built) is how a model asks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum

import jax

from dsv3_jax.errors import UserError

__all__ = ["Backend", "Impl", "KernelRequestError", "select", "gpu_flavor", "GPU_FLAVORS",
           "gpu_lowering_target"]


class KernelRequestError(UserError, ValueError):
  """A kernel request that cannot be honoured: an unknown backend or GPU flavour, or an explicitly
  requested kernel (backend="pallas", gpu_impl="mosaic", kernel-specific block sizes) that cannot
  run these inputs on this platform. The message names why and what to request instead."""


class Backend(enum.Enum):
  AUTO = "auto"
  REFERENCE = "reference"
  PALLAS = "pallas"
  INTERPRET = "interpret"


@dataclasses.dataclass(frozen=True)
class Impl:
  """The implementation to run: ``kind`` is "reference", "tpu" or "gpu"."""

  kind: str
  interpret: bool = False


_KERNEL_PLATFORMS = ("tpu", "gpu")


def select(backend: Backend | str, *, platform: str | None = None,
           available: tuple[str, ...] = _KERNEL_PLATFORMS) -> Impl:
  """Resolves `backend` to an `Impl`.

  Args:
    backend: a `Backend` or its string value ("auto", "reference", "pallas", "interpret").
    platform: for INTERPRET, which kernel to interpret ("tpu" or "gpu", default "tpu"); for
      AUTO/PALLAS, overrides `jax.default_backend()` (useful for lowering tests).
    available: the platforms this kernel has a Pallas implementation for.
  """
  try:
    backend = Backend(backend)
  except ValueError:
    raise KernelRequestError(f"unknown kernel backend {backend!r}; expected one of "
                             f"{[b.value for b in Backend]}") from None
  if backend is Backend.REFERENCE:
    return Impl("reference")
  if backend is Backend.INTERPRET:
    platform = platform or "tpu"
    if platform not in available:
      raise KernelRequestError(f"no Pallas kernel for platform {platform!r} to interpret "
                               f"(this kernel has {available})")
    return Impl(platform, interpret=True)
  current = platform or jax.default_backend()
  # ROCm reports "gpu" too; the Triton lowering serves it.
  current = "gpu" if current in ("cuda", "rocm") else current
  if current in available:
    return Impl(current)
  if backend is Backend.PALLAS:
    raise KernelRequestError(f"backend='pallas' requested but this kernel has no Pallas "
                             f"implementation for platform {current!r} (it has {available}); "
                             f"use backend='reference' or 'auto'")
  return Impl("reference")


GPU_FLAVORS = ("triton", "mosaic")


def gpu_flavor(requested: str | None = None, *, has_mosaic: bool = True) -> str:
  """Which GPU implementation to run: "triton" or "mosaic" (Mosaic GPU).

  requested: "triton" / "mosaic" forces one; None or "auto" picks Mosaic GPU when the kernel has
  one (`has_mosaic`) and the first device is a Hopper GPU (compute capability 9.x), else Triton.
  Interpret mode on CPU follows the same rule with no Hopper device, so tests name the flavour
  explicitly. A pure function of its arguments and the devices (no environment read).
  """
  requested = requested or "auto"
  if requested not in GPU_FLAVORS + ("auto",):
    raise KernelRequestError(f"unknown GPU kernel flavour {requested!r}; expected 'auto', "
                             f"'triton' or 'mosaic'")
  if requested == "mosaic" and not has_mosaic:
    raise KernelRequestError("gpu_impl='mosaic': this kernel has no Mosaic GPU implementation; "
                             "use 'triton' or 'auto'")
  if requested != "auto":
    return requested
  return "mosaic" if has_mosaic and _is_hopper() else "triton"


def _is_hopper() -> bool:
  try:
    dev = jax.devices()[0]
  except RuntimeError:
    return False
  if dev.platform != "gpu":
    return False
  cc = getattr(dev, "compute_capability", None)
  if cc is not None:
    return str(cc).split(".")[0] == "9"
  return any(name in dev.device_kind for name in ("H100", "H200", "H800", "H20", "GH200"))


@contextlib.contextmanager
def gpu_lowering_target(lowering_platform: str = "cuda", device_kind: str = "NVIDIA H100"):
  """Context in which GPU Pallas kernels lower for CUDA on a machine without a GPU.

  `jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` of a Triton-lowered Pallas kernel
  needs the target GPU's compute capability. jax 0.10 falls back to sm_90 when no GPU is
  attached; jax 0.12 reads it from the ambient abstract mesh's `AbstractDevice` and raises
  "No supported GPU devices found" without one. This sets that device (`device_kind`, as
  `jax.Device.device_kind` spells it, e.g. "NVIDIA H100"), keeping the ambient mesh's axes, so
  the same code lowers on both. A no-op unless `lowering_platform` is "cuda" (so a caller may pass
  any platform it lowers for), and when the default backend is a GPU (its own device wins).
  """
  if lowering_platform != "cuda" or jax.default_backend() in ("gpu", "cuda", "rocm"):
    yield
    return
  mesh = jax.sharding.get_abstract_mesh()
  target = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh(
      mesh.axis_sizes, mesh.axis_names, axis_types=mesh.axis_types, abstract_device=target)):
    yield
