"""Trip counts of the while loops in optimized HLO text (the loop reader of `hlo_cost`).

A loop's trip count comes from XLA's `known_trip_count` backend-config annotation when present;
XLA:TPU often leaves it out (notably after loop peeling, or when it rewrote the loop for host
offload), so otherwise it is derived from the program: the condition compares an induction
variable (one element of the loop-state tuple) with a limit, the body adds a constant step to
that element, and the loop's initial tuple gives its start. Each of these may be written
directly or through fusions, calls, copies, bitcasts, converts, reshapes, get-tuple-element of
tuples and constant arithmetic; the limit may be a constant or a loop-invariant state element
(the bound carried through the tuple), the counter may sit on either side of the compare, and
the compare may test counter + offset. `TripCounter.trip_count` returns None (never a guess)
when one of these cannot be read; `hlo_cost` then counts the loop once and reports it as
unknown.

Expressions are tuples: ("c", v) an integer constant; ("s",) the loop-state tuple (parameter 0
of the condition or body); ("e", k, off) element k of the loop state plus the constant off.
"""
from __future__ import annotations

import re
from typing import Callable

_PASS = ("copy", "bitcast", "convert", "reshape", "broadcast")
_FLIP = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE", "EQ": "EQ", "NE": "NE"}
_MAX_DEPTH = 32
_BUDGET = 20000  # expression nodes visited per loop (the arithmetic branches): then unknown


def _param_index(i) -> int:
  return int(re.match(r"\s*(\d+)", i.operands[0]).group(1))


class TripCounter:
  """Reads while loops' trip counts from parsed HLO (`hlo_cost.parse_hlo`'s computations)."""

  def __init__(self, comps: dict, table: dict):
    self.comps, self.table = comps, table
    self.roots = {c: next((i for i in ins if i.root), None) for c, ins in comps.items()}
    # callee -> (computation, instruction) for computations with exactly one fusion / call site
    sites: dict[str, list] = {}
    for c, ins in comps.items():
      for i in ins:
        if i.op in ("fusion", "call", "async-start", "call-start"):
          for callee in i.called("calls") + i.called("to_apply"):
            sites.setdefault(callee, []).append((c, i))
    self.caller = {k: v[0] for k, v in sites.items() if len(v) == 1}
    self._budget = _BUDGET

  # expressions ------------------------------------------------------------------------------
  def expr(self, comp: str, name: str, env: Callable | None, depth: int = 0):
    """The value of instruction `name` in `comp` as an expression (module docstring), or None.
    env(k): the expression of parameter k (None: look through the computation's unique caller;
    a loop's condition/body: parameter 0 is ("s",))."""
    i = self.table.get(comp, {}).get(name)
    self._budget -= 1
    if i is None or depth > _MAX_DEPTH or self._budget < 0:
      return None
    op, d = i.op, depth + 1
    if op == "constant":
      m = re.fullmatch(r"\s*(-?\d+)\s*", i.operands[0] if i.operands else "")
      return ("c", int(m.group(1))) if m else None
    if op in _PASS and i.operands:
      return self.expr(comp, i.operands[0], env, d)
    if op == "parameter":
      return self._param(comp, _param_index(i), env, d)
    if op == "get-tuple-element":
      return self.select(comp, i.operands[0], int(i.attr("index")), env, d)
    if op in ("fusion", "call"):
      callee = (i.called("calls") or i.called("to_apply") or [None])[0]
      root = self.roots.get(callee)
      if root is None:
        return None
      return self.expr(callee, root.name, self._bind(comp, i, env, d), d)
    if op in ("add", "subtract", "multiply") and len(i.operands) == 2:
      a = self.expr(comp, i.operands[0], env, d)
      b = self.expr(comp, i.operands[1], env, d)
      return _arith(op, a, b)
    return None

  def select(self, comp: str, name: str, k: int, env, depth: int):
    """Element k of the tuple-valued instruction `name`, as an expression."""
    i = self.table.get(comp, {}).get(name)
    if i is None or depth > _MAX_DEPTH:
      return None
    d = depth + 1
    if i.op == "tuple":
      return self.expr(comp, i.operands[k], env, d) if k < len(i.operands) else None
    if i.op in ("copy", "bitcast", "opt-barrier") and i.operands:
      return self.select(comp, i.operands[0], k, env, d)
    if i.op == "parameter":
      whole = self._param(comp, _param_index(i), env, d)
      return ("e", k, 0) if whole == ("s",) else None
    if i.op in ("fusion", "call"):
      callee = (i.called("calls") or i.called("to_apply") or [None])[0]
      root = self.roots.get(callee)
      if root is None:
        return None
      return self.select(callee, root.name, k, self._bind(comp, i, env, d), d)
    if i.op == "get-tuple-element":  # nested tuples: not a scalar counter
      return None
    return None

  def _param(self, comp: str, k: int, env, depth: int):
    if env is not None:
      return env(k)
    site = self.caller.get(comp)
    if site is None:
      return None
    ccomp, ci = site
    if k >= len(ci.operands):
      return None
    return self.expr(ccomp, ci.operands[k], None, depth)

  def _bind(self, comp: str, i, env, depth: int) -> Callable:
    def inner(k):
      return self.expr(comp, i.operands[k], env, depth) if k < len(i.operands) else None
    return inner

  def _compare(self, comp: str, name: str, env, depth: int = 0):
    """(lhs, rhs, direction) of the compare computing `name` (through fusions / calls)."""
    i = self.table.get(comp, {}).get(name)
    if i is None or depth > _MAX_DEPTH:
      return None
    if i.op == "compare" and len(i.operands) == 2:
      m = re.search(r"direction=(\w+)", i.attrs)
      if m is None:
        return None
      return (self.expr(comp, i.operands[0], env, depth + 1),
              self.expr(comp, i.operands[1], env, depth + 1), m.group(1))
    if i.op in ("copy", "bitcast", "reshape") and i.operands:
      return self._compare(comp, i.operands[0], env, depth + 1)
    if i.op in ("fusion", "call"):
      callee = (i.called("calls") or i.called("to_apply") or [None])[0]
      root = self.roots.get(callee)
      if root is None:
        return None
      return self._compare(callee, root.name, self._bind(comp, i, env, depth + 1), depth + 1)
    return None

  # trip count -------------------------------------------------------------------------------
  def trip_count(self, comp: str, w) -> int | None:
    """Trip count of while instruction `w` in computation `comp`, or None when unreadable."""
    known = w.backend_config().get("known_trip_count", {})
    if isinstance(known, dict) and "n" in known:
      return int(known["n"])
    cond, body = w.attr("condition"), w.attr("body")
    if cond not in self.comps or body not in self.comps or not w.operands:
      return None
    self._budget = _BUDGET
    state = lambda k: ("s",) if k == 0 else None  # noqa: E731
    croot = self.roots.get(cond)
    cmp = self._compare(cond, croot.name, state) if croot is not None else None
    if cmp is None:
      return None
    lhs, rhs, direction = cmp
    if _is_elem(rhs) and not _is_elem(lhs) or (
        _is_elem(lhs) and _is_elem(rhs) and self._invariant(body, lhs[1])
        and not self._invariant(body, rhs[1])):
      lhs, rhs, direction = rhs, lhs, _FLIP.get(direction)
    if not _is_elem(lhs) or direction is None:
      return None
    k, off = lhs[1], lhs[2]
    step = self._step(body, k)
    start = self._init(comp, w, k)
    limit = self._limit(comp, w, body, rhs, k)
    if step is None or start is None or limit is None:
      return None
    return _count(start + off, step, limit, direction)

  def _step(self, body: str, k: int) -> int | None:
    root = self.roots.get(body)
    if root is None:
      return None
    e = self.select(body, root.name, k, lambda j: ("s",) if j == 0 else None, 0)
    if e is None or e[0] != "e" or e[1] != k or e[2] == 0:
      return None
    return e[2]

  def _invariant(self, body: str, k: int) -> bool:
    root = self.roots.get(body)
    return root is not None and self.select(
        body, root.name, k, lambda j: ("s",) if j == 0 else None, 0) == ("e", k, 0)

  def _init(self, comp: str, w, k: int) -> int | None:
    e = self.select(comp, w.operands[0], k, None, 0)
    return e[1] if e is not None and e[0] == "c" else None

  def _limit(self, comp: str, w, body: str, rhs, k: int) -> int | None:
    if rhs is None:
      return None
    if rhs[0] == "c":
      return rhs[1]
    if rhs[0] == "e" and rhs[1] != k and self._invariant(body, rhs[1]):
      init = self._init(comp, w, rhs[1])
      return None if init is None else init + rhs[2]
    return None


def _is_elem(e) -> bool:
  return e is not None and e[0] == "e"


def _arith(op: str, a, b):
  if a is None or b is None:
    return None
  if a[0] == "c" and b[0] == "c":
    return ("c", {"add": a[1] + b[1], "subtract": a[1] - b[1], "multiply": a[1] * b[1]}[op])
  if op == "add" and a[0] == "e" and b[0] == "c":
    return ("e", a[1], a[2] + b[1])
  if op == "add" and a[0] == "c" and b[0] == "e":
    return ("e", b[1], b[2] + a[1])
  if op == "subtract" and a[0] == "e" and b[0] == "c":
    return ("e", a[1], a[2] - b[1])
  return None


def _count(first: int, step: int, limit: int, direction: str) -> int | None:
  """Iterations of `for (v = first; v <direction> limit; v += step)`; None if it never ends."""
  test = {"LT": first < limit, "LE": first <= limit, "GT": first > limit, "GE": first >= limit,
          "NE": first != limit}.get(direction)
  if test is None:
    return None
  if not test:
    return 0
  if direction == "NE":
    span = limit - first
    return span // step if span % step == 0 and span // step > 0 else None
  up = direction in ("LT", "LE")
  if (step > 0) != up:
    return None  # moves away from the limit
  span = (limit - first if up else first - limit) + (1 if direction in ("LE", "GE") else 0)
  return -(-span // abs(step))
