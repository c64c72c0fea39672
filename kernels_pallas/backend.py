"""Kernel backend selection shared by every kernel in this package.

Each kernel has a pure-jnp reference (the oracle and the portable fallback), a TPU Pallas
implementation (Mosaic) and a GPU Pallas implementation. `select` turns the user's request into
the implementation to run:

- ``Backend.AUTO``: the Pallas kernel of the current platform (``jax.default_backend()``) when
  the kernel has one, otherwise the reference.
- ``Backend.REFERENCE``: always the reference.
- ``Backend.PALLAS``: the Pallas kernel of the current platform; raises when there is none
  (never silently falls back).
- ``Backend.INTERPRET``: the TPU or GPU kernel (``platform=``) in Pallas interpret mode, which
  runs on CPU; used by the tests.

Nothing here is decided at import time.
"""
from __future__ import annotations

import dataclasses
import enum

import jax

__all__ = ["Backend", "Impl", "select"]


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
    raise ValueError(f"unknown kernel backend {backend!r}; expected one of "
                     f"{[b.value for b in Backend]}") from None
  if backend is Backend.REFERENCE:
    return Impl("reference")
  if backend is Backend.INTERPRET:
    platform = platform or "tpu"
    if platform not in available:
      raise ValueError(f"no Pallas kernel for platform {platform!r} to interpret "
                       f"(this kernel has {available})")
    return Impl(platform, interpret=True)
  current = platform or jax.default_backend()
  # ROCm reports "gpu" too; the Triton lowering serves it.
  current = "gpu" if current in ("cuda", "rocm") else current
  if current in available:
    return Impl(current)
  if backend is Backend.PALLAS:
    raise RuntimeError(f"backend='pallas' requested but this kernel has no Pallas implementation "
                       f"for platform {current!r} (it has {available}); use backend='reference'")
  return Impl("reference")
