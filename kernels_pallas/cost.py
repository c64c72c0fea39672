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
