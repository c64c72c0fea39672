"""Shared test helpers."""
import os
import sys

import numpy as np

# bench/common.py (bench/ is not a package) owns the HLO collective parser the EP tests use.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "bench"))
from common import hlo_collectives  # noqa: E402,F401


def max_abs_err(actual, expected) -> float:
  a = np.asarray(actual, dtype=np.float64)
  e = np.asarray(expected, dtype=np.float64)
  assert a.shape == e.shape, f"shape {a.shape} != {e.shape}"
  return float(np.max(np.abs(a - e))) if a.size else 0.0


def assert_close(actual, expected, *, atol: float, rtol: float = 0.0, what: str = "") -> float:
  """Asserts |actual - expected| <= atol + rtol*|expected| elementwise; returns the max abs error.

  Both sides are compared in float64, so a bf16 result is judged against an fp32/fp64 oracle with
  the tolerance the caller states (and justifies) for that dtype.
  """
  a = np.asarray(actual, dtype=np.float64)
  e = np.asarray(expected, dtype=np.float64)
  assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
  assert np.all(np.isfinite(a) == np.isfinite(e)), f"{what}: non-finite values differ"
  fin = np.isfinite(e)
  err = np.abs(a - e)[fin]
  bound = (atol + rtol * np.abs(e))[fin]
  worst = float(err.max()) if err.size else 0.0
  if not np.all(err <= bound):
    i = int(np.argmax(err - bound))
    raise AssertionError(f"{what}: max abs err {worst:.3e} exceeds atol={atol:g} rtol={rtol:g} "
                         f"(worst excess at flat index {i}: |{a[fin][i]:.6g} - {e[fin][i]:.6g}|)")
  return worst




def count_pallas_calls(jaxpr) -> int:
  """The `pallas_call`s in a (Closed)Jaxpr, nested jaxprs included (jit, scan, shard_map,
  custom_vjp, cond): once per call site as traced (a scan body counts once)."""
  from jax.extend import core
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)

  def subs(v):
    if isinstance(v, (core.Jaxpr, core.ClosedJaxpr)):
      yield v
    elif isinstance(v, (tuple, list)):
      for x in v:
        yield from subs(x)

  return sum((eqn.primitive.name == "pallas_call")
             + sum(count_pallas_calls(sub) for v in eqn.params.values() for sub in subs(v))
             for eqn in jaxpr.eqns)
