"""`pl.CostEstimate` for the TPU kernels: XLA schedules around a custom call by these figures
(and reports them in `compiled.cost_analysis()`), and has no other way to see inside one.

Figures are per call, from shapes only: flops count multiply-adds as 2; causal attention counts
the visible half of the score matrix; bytes are every operand and result crossing HBM once (a
lower bound where blocks are re-read).
"""
from __future__ import annotations

import math

from jax.experimental import pallas as pl

__all__ = ["nbytes", "estimate"]


def nbytes(*arrays) -> int:
  """Total bytes of arrays / ShapeDtypeStructs (None entries count 0)."""
  return sum(math.prod(a.shape) * a.dtype.itemsize for a in arrays if a is not None)


def estimate(flops: float, transcendentals: float = 0, *, reads=(), writes=()) -> pl.CostEstimate:
  """CostEstimate with bytes_accessed = nbytes(reads) + nbytes(writes)."""
  return pl.CostEstimate(flops=int(flops), transcendentals=int(transcendentals),
                         bytes_accessed=nbytes(*reads) + nbytes(*writes))


def mxu_dot(a, b, dimension_numbers):
  """dot_general with a float32 accumulator and the precision the operands' dtype allows on the
  MXU: HIGHEST for float32 operands, DEFAULT for narrower ones (Mosaic rejects a float32 contract
  precision on bf16 operands, which a global `jax_default_matmul_precision="highest"` would
  otherwise request)."""
  import jax.numpy as jnp
  from jax import lax
  wide = a.dtype == jnp.float32 and b.dtype == jnp.float32
  precision = lax.Precision.HIGHEST if wide else lax.Precision.DEFAULT
  return lax.dot_general(a, b, dimension_numbers, precision=(precision, precision),
                         preferred_element_type=jnp.float32)
