"""Flops and bytes of a compiled XLA program per run, with every loop body counted trip-count
times: `hlo_cost(compiled.as_text())`.

Why: XLA's `compiled.cost_analysis()` visits a while loop's body once, whatever its trip count,
so a program whose layers are a `lax.scan` reports about one layer's work. This module reads the
optimized HLO text instead and sums, per computation, each instruction's cost, multiplying a
while loop's body and condition by its trip count (nested loops multiply).

Counting rules (those of XLA's HloCostAnalysis, so that a program without loops gives about the
figures `cost_analysis()` gives; the tests hold it to that):
- flops: dot / convolution 2 x output elements x contracted elements (a convolution's input
  features per group x the window positions that fall on real input, not padding: libtpu
  writes head-batched matmuls as convolutions whose padded window spans the heads);
  elementwise ops 1 per output element (transcendental ops go
  to `transcendentals`); reduce / reduce-window / scatter / select-and-scatter: the reduction
  computation per reduced element; data movement (copy, transpose, slice, gather, collectives,
  ...) 0. A fusion's flops are those of the instructions it fuses.
- bytes: each top-level instruction reads its operands and writes its result once; a fusion
  only what crosses its boundary (an operand used only through dynamic-slice / slice / gather
  reads just the slices; an in-place dynamic-update-slice writes just the update; likewise an
  unfused dynamic-slice / dynamic-update-slice). An async `-start` reads its operands and
  writes its results; tuples, get-tuple-element, bitcasts, parameters, constants and the
  `-done` halves move nothing. Sizes are logical (no tile padding). XLA's TPU cost model
  differs here: it also charges matmul operands re-read across tiles, so its bytes for a
  program without loops come out up to ~1.7x these (its flops agree to 0.1%).
- Pallas TPU kernels (custom-call "tpu_custom_call"): the `pl.CostEstimate` the kernel carries
  (flops, transcendentals, bytes_accessed in its backend_config); other custom calls: their
  operands and results, no flops.
- while: trip count from XLA's `known_trip_count` annotation or, when absent (TPU), from the
  loop's condition `counter < N` with the counter's initial value and step read from the
  program (`dsv3_jax.hlo_trips`); a loop whose trip count cannot be read counts once and is
  counted in `unknown_loops` (callers must not take the totals as exact then). HLO that does
  not parse into the computations it references raises ValueError rather than count 0.
- conditional: `typical` counts the cheapest branch (by flops, then bytes), `worst` the
  costliest. In this model the only conditional is an expert-parallel overflow round, whose
  cheap branch (no round) is what a balanced step runs; `worst` runs every round.
- `once`: every loop body once and conditionals at their costliest branch: XLA's own convention,
  kept as a cross-check against `cost_analysis()`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re

import numpy as np

from dsv3_jax.hlo_trips import TripCounter

__all__ = ["HloCost", "hlo_cost", "parse_hlo", "shape_bytes"]

_DTYPE_BITS = {"pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16,
               "u16": 16, "s32": 32, "u32": 32, "s64": 64, "u64": 64, "f16": 16, "bf16": 16,
               "f32": 32, "f64": 64, "c64": 64, "c128": 128, "token": 0}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_TRANSCENDENTAL = {"exponential", "exponential-minus-one", "log", "log-plus-one", "tanh",
                   "logistic", "sqrt", "rsqrt", "cbrt", "power", "sine", "cosine", "tan",
                   "atan2", "erf"}
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all",
         "partition-id", "replica-id", "iota", "opt-barrier", "add-dependency", "domain"}
_NO_FLOPS = {"copy", "copy-start", "copy-done", "transpose", "reshape", "broadcast", "slice",
             "dynamic-slice", "dynamic-update-slice", "concatenate", "pad", "gather", "reverse",
             "bitcast-convert", "all-gather", "all-gather-start", "all-gather-done",
             "all-to-all", "ragged-all-to-all", "collective-permute", "collective-permute-start",
             "collective-permute-done", "send", "recv", "send-done", "recv-done", "infeed",
             "outfeed", "custom-call", "rng-get-and-update-state", "get-dimension-size",
             "slice-start", "slice-done", "async-start", "async-update", "async-done",
             "call-start", "call-done", "sort", "rng", "rng-bit-generator", "real", "imag",
             "is-finite", "reduce-precision"} | _FREE
_CALLED = ("calls", "to_apply", "body", "condition", "branch_computations",
           "true_computation", "false_computation")
_REDUCING = {"reduce", "reduce-window", "scatter", "select-and-scatter", "all-reduce",
             "all-reduce-start", "reduce-scatter"}


def shape_bytes(shape: str) -> float:
  """Bytes of an HLO shape string, tuples summed (layouts, tiling and padding ignored)."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    bits = _DTYPE_BITS.get(dtype)
    if bits is None and dtype[:2] in ("f8", "f6", "f4"):  # f8e4m3fn, f4e2m1fn, ...
      bits = int(dtype[1])
    if bits is None:
      continue
    total += math.prod(int(d) for d in dims.split(",") if d) * bits / 8
  return total


def _elements(shape: str) -> int:
  m = _ARRAY.search(shape)
  return math.prod(int(d) for d in m.group(2).split(",") if d) if m else 1


def _dims(shape: str) -> list[int]:
  m = _ARRAY.search(shape)
  return [int(d) for d in m.group(2).split(",") if d] if m else []


def _window_pairs(size: int, window: int, stride: int, lo: int, lhs_dilate: int,
                  rhs_dilate: int, out: int) -> int:
  """(output position, window position) pairs of one spatial dimension that land on a real
  input element (not padding, not a dilation hole)."""
  span = (size - 1) * lhs_dilate
  if lhs_dilate == 1:  # per window position: the output range whose input index is real
    base = np.arange(window, dtype=np.int64) * rhs_dilate - lo
    first = np.maximum(-(base // stride), 0)            # ceil(-base / stride)
    last = np.minimum((span - base) // stride, out - 1)
    return int(np.maximum(last - first + 1, 0).sum())
  a, b = (np.arange(out), np.arange(window)) if out <= window else (np.arange(window),
                                                                     np.arange(out))
  total = 0
  for v in a:  # the shorter axis in Python, the longer one vectorized
    o, w = (v, b) if out <= window else (b, v)
    p = o * stride + w * rhs_dilate - lo
    total += int(np.count_nonzero((p >= 0) & (p <= span) & (p % lhs_dilate == 0)))
  return total


def _conv_flops(i: "Instr", lhs: list[int], rhs: list[int], out: list[int]) -> float:
  """2 x multiply-adds of a convolution, counting only window positions over real input (XLA
  writes some batched matmuls as convolutions whose padded window covers one input row)."""
  labels = i.attr("dim_labels") or ""
  m = re.fullmatch(r"(\w+)_(\w+)->(\w+)", labels)
  if not m or len(m.group(1)) != len(lhs) or len(m.group(2)) != len(rhs):
    return 2.0 * math.prod(out) * math.prod(rhs) / max(rhs[-1] if rhs else 1, 1)
  ll, kl, ol = m.groups()
  win = re.search(r"window=\{([^}]*)\}", i.attrs)
  fields = dict(kv.split("=", 1) for kv in win.group(1).split()) if win else {}
  nsp = len([c for c in kl if c.isdigit()])
  def per_dim(key, default):
    v = fields.get(key)
    return [default] * nsp if v is None else v.split("x")
  sizes = [int(v) for v in per_dim("size", 1)]
  strides = [int(v) for v in per_dim("stride", 1)]
  pads = [int(v.split("_")[0]) for v in per_dim("pad", "0_0")]
  ldil = [int(v) for v in per_dim("lhs_dilate", 1)]
  rdil = [int(v) for v in per_dim("rhs_dilate", 1)]
  pairs = 1
  for k in range(nsp):
    d = str(k)
    pairs *= _window_pairs(lhs[ll.index(d)], sizes[k], strides[k], pads[k], ldil[k], rdil[k],
                           out[ol.index(d)])
  return 2.0 * out[ol.index("b")] * out[ol.index("f")] * rhs[kl.index("i")] * pairs


@dataclasses.dataclass
class Instr:
  name: str
  shape: str
  op: str
  operands: list[str]
  attrs: str
  root: bool = False

  def attr(self, key: str) -> str | None:
    m = re.search(rf"\b{key}=(\{{[^}}]*\}}|[^,\s{{}}]+)", self.attrs)
    return m.group(1).lstrip("%") if m else None

  def called(self, key: str) -> list[str]:
    v = self.attr(key)
    if v is None:
      return []
    return [c.strip().lstrip("%") for c in v.strip("{}").split(",") if c.strip()]

  def backend_config(self) -> dict:
    i = self.attrs.find("backend_config=")
    if i < 0:
      return {}
    s = self.attrs[i + len("backend_config="):]
    if s.startswith('"'):  # older form: a quoted, escaped JSON string
      m = re.match(r'"((?:[^"\\]|\\.)*)"', s)
      s = bytes(m.group(1), "utf-8").decode("unicode_escape") if m else "{}"
    try:
      return json.JSONDecoder().raw_decode(s)[0]
    except ValueError:
      return {}


def _balanced(s: str, i: int) -> int:
  """Index just past the bracket group opening at s[i]."""
  depth, pairs = 0, {"(": ")", "{": "}", "[": "]"}
  closers = set(pairs.values())
  while i < len(s):
    c = s[i]
    if c in pairs:
      depth += 1
    elif c in closers:
      depth -= 1
      if depth == 0:
        return i + 1
    i += 1
  return i


def _split_top(s: str) -> list[str]:
  out, depth, cur = [], 0, []
  for c in s:
    if c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
    if c == "," and depth == 0:
      out.append("".join(cur))
      cur = []
    else:
      cur.append(c)
  if "".join(cur).strip():
    out.append("".join(cur))
  return out


def _parse_instr(line: str) -> Instr | None:
  line = re.sub(r"/\*.*?\*/", "", line).strip()
  root = line.startswith("ROOT ")
  if root:
    line = line[5:]
  eq = line.find(" = ")
  if eq < 0:
    return None
  name = line[:eq].lstrip("%")
  rest = line[eq + 3:]
  if rest.startswith("("):
    end = _balanced(rest, 0)
  else:
    end = rest.find(" ")
    j = rest.find("{")
    if 0 <= j < end or (j >= 0 and end < 0):  # layout braces may hold no space
      end = _balanced(rest, j)
  shape, rest = rest[:end], rest[end:].lstrip()
  p = rest.find("(")
  if p < 0:
    return None
  op = rest[:p].strip()
  close = _balanced(rest, p)
  args = rest[p + 1:close - 1]
  operands = []
  for a in _split_top(args):
    m = re.search(r"%([\w.\-]+)\s*$", a.strip())
    operands.append(m.group(1) if m else a.strip().split(" ")[-1].lstrip("%"))
  return Instr(name, shape, op, operands, rest[close:], root)


def parse_hlo(text: str) -> tuple[dict[str, list[Instr]], str]:
  """HLO module text -> ({computation name: instructions}, entry computation name)."""
  comps: dict[str, list[Instr]] = {}
  entry, cur = None, None
  for line in text.splitlines():
    s = line.strip()
    if not s or s.startswith("HloModule") or s.startswith("//"):
      continue
    if s.startswith("}"):  # "}" or "}, execution_thread=..." (async / host computations)
      cur = None
      continue
    if s.endswith("{") and " = " not in s.split("(", 1)[0]:  # a computation's header
      is_entry = s.startswith("ENTRY ")
      head = s[6:] if is_entry else s
      cname = head.split(" ", 1)[0].lstrip("%")
      comps[cname] = cur = []
      if is_entry:
        entry = cname
      continue
    if cur is not None:
      ins = _parse_instr(s)
      if ins is not None:
        cur.append(ins)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  for cname, ins in comps.items():
    for i in ins:
      for key in (k for k in _CALLED if k + "=" in i.attrs):
        missing = [c for c in i.called(key) if c not in comps]
        if missing:
          raise ValueError(f"HLO text not understood: {i.op} {i.name} in {cname} calls "
                           f"{missing[0]}, which was not read as a computation")
  return comps, entry


@dataclasses.dataclass
class HloCost:
  """Per-run cost of one compiled program (per device for an SPMD program).

  flops / transcendentals / bytes: loops x trip count, conditionals at their cheapest branch
  (`typical`); *_worst: conditionals at their costliest branch; *_once: each loop body once
  (XLA's `cost_analysis()` convention). loops: (while instruction, trip count or None,
  flops of one iteration) per loop, outermost first; unknown_loops: loops counted once because
  their trip count could not be read. top_flops / top_bytes: the ops carrying the most flops /
  bytes, (opcode, jax op_name, flops, bytes) summed over the instructions of that name, loop
  multiplicity applied (typical branches).
  """

  flops: float
  transcendentals: float
  bytes: float
  flops_worst: float
  bytes_worst: float
  flops_once: float
  bytes_once: float
  loops: list[tuple[str, int | None, float]]
  unknown_loops: int
  top_flops: list[tuple]
  top_bytes: list[tuple]

  counting = ("while loops x trip count (nested loops multiply); conditionals at the cheapest "
              "branch (EP overflow rounds skipped; *_worst: every round); Pallas calls by "
              "their pl.CostEstimate")


class _Analyzer:
  def __init__(self, comps: dict[str, list[Instr]], entry: str):
    self.comps, self.entry = comps, entry
    self.table = {c: {i.name: i for i in ins} for c, ins in comps.items()}
    self.loops: list[tuple[str, int | None, float]] = []
    self.unknown = 0
    self.trips = TripCounter(comps, self.table)
    self.contrib: dict[tuple, list[float]] = {}

  # shapes and operands ---------------------------------------------------------------------
  def operand(self, comp: str, name: str) -> Instr | None:
    return self.table[comp].get(name)

  def operand_shape(self, comp: str, name: str) -> str:
    i = self.operand(comp, name)
    return i.shape if i is not None else ""

  def trip_count(self, comp: str, w: Instr) -> int | None:
    return self.trips.trip_count(comp, w)

  # costs -------------------------------------------------------------------------------------
  def fused_flops(self, comp: str) -> tuple[float, float]:
    f = t = 0.0
    for i in self.comps.get(comp, []):
      a, b, _ = self.instr_cost(comp, i, "once", bytes_=False)
      f, t = f + a, t + b
    return f, t

  def _apply_flops(self, i: Instr) -> float:
    comp = i.attr("to_apply")
    if comp is None:
      return 1.0
    f, t = self.fused_flops(comp)
    return max(f + t, 1.0)

  def param_read_bytes(self, comp: str, pname: str, full: float, depth=0) -> float:
    """Bytes a fused computation reads of its parameter `pname` (full size unless every use is
    a slice-like op or an in-place update target)."""
    if depth > 6:
      return full
    total = 0.0
    for u in self.comps[comp]:
      if u.root and u.name == pname:  # passed straight through to the output
        return full
      if pname not in u.operands:
        continue
      if u.op in ("dynamic-slice", "slice", "gather") and u.operands[0] == pname:
        total += shape_bytes(u.shape)
      elif u.op == "dynamic-update-slice" and u.operands[0] == pname:
        continue
      elif u.op == "bitcast":
        total += self.param_read_bytes(comp, u.name, full, depth + 1)
      elif u.op == "fusion":
        inner = u.attr("calls")
        idx = u.operands.index(pname)
        p = next((x for x in self.comps.get(inner, []) if x.op == "parameter"
                  and re.match(r"\s*(\d+)", x.operands[0]).group(1) == str(idx)), None)
        total += full if p is None else self.param_read_bytes(inner, p.name, full, depth + 1)
      else:
        return full
    return min(total, full)

  def fusion_bytes(self, comp: str, i: Instr) -> float:
    fused = i.attr("calls")
    params = {}
    for x in self.comps.get(fused, []):
      if x.op == "parameter":
        params[int(re.match(r"\s*(\d+)", x.operands[0]).group(1))] = x.name
    total = 0.0
    for k, o in enumerate(i.operands):
      full = shape_bytes(self.operand_shape(comp, o))
      total += self.param_read_bytes(fused, params[k], full) if k in params else full
    root = next((x for x in self.comps.get(fused, []) if x.root), None)
    outs = [root] if root is None or root.op != "tuple" else [
        self.table[fused].get(n) for n in root.operands]
    for r in outs:
      while r is not None and r.op == "bitcast":
        r = self.table[fused].get(r.operands[0])
      if r is not None and r.op == "dynamic-update-slice":
        total += shape_bytes(self.operand_shape(fused, r.operands[1]))
      elif r is not None:
        total += shape_bytes(r.shape)
    return total

  def instr_cost(self, comp: str, i: Instr, mode: str, bytes_=True) -> tuple[float, float, float]:
    """(flops, transcendentals, bytes) of one instruction, callees included."""
    op = i.op
    io = (sum(shape_bytes(self.operand_shape(comp, o)) for o in i.operands)
          + shape_bytes(i.shape)) if bytes_ else 0.0
    if op in _FREE or op.endswith("-done"):
      return 0.0, 0.0, 0.0
    if op.endswith("-start") and i.shape.startswith("(") and bytes_:
      # async start: (operands..., results..., contexts): read the operands, write the results
      ins = [self.operand_shape(comp, o) for o in i.operands]
      elems = [e.strip() for e in _split_top(i.shape[1:-1])]
      k = len(ins) if [re.sub(r"\{.*", "", e) for e in elems[:len(ins)]] == [
          re.sub(r"\{.*", "", s) for s in ins] else 0
      outs = [e for e in elems[k:] if _elements(e) > 1 or not re.match(r"[us]32\[\]", e)]
      io = sum(map(shape_bytes, ins)) + sum(map(shape_bytes, outs))
    if op == "fusion":
      f, t = self.fused_flops(i.attr("calls"))
      return f, t, self.fusion_bytes(comp, i) if bytes_ else 0.0
    if op == "while":
      body, cond = i.attr("body"), i.attr("condition")
      bf, bt, bb = self.comp_cost(body, mode)
      cf, ct, cb = self.comp_cost(cond, mode)
      if mode == "once":
        return bf + cf, bt + ct, bb + cb
      n = self.trip_count(comp, i)
      return (n * bf + (n + 1) * cf, n * bt + (n + 1) * ct,
              n * bb + (n + 1) * cb) if n is not None else (bf + cf, bt + ct, bb + cb)
    if op == "conditional":
      names = i.called("branch_computations") or [
          c for c in (i.attr("true_computation"), i.attr("false_computation")) if c]
      costs = [self.comp_cost(c, mode) for c in names]
      pick = min if mode == "typical" else max
      f, t, b = pick(costs, key=lambda c: (c[0], c[2])) if costs else (0.0, 0.0, 0.0)
      return f, t, b + shape_bytes(self.operand_shape(comp, i.operands[0]))
    if op in ("call", "async-start", "call-start") or (op.endswith("-start") and i.attr("calls")):
      f = t = b = 0.0
      for c in i.called("calls") + i.called("to_apply"):
        cf, ct, cb = self.comp_cost(c, mode)
        f, t, b = f + cf, t + ct, b + cb
      return f, t, b
    if op == "custom-call":
      est = i.backend_config().get("custom_call_config", {}).get("cost_estimate")
      if 'custom_call_target="tpu_custom_call"' in i.attrs and isinstance(est, dict):
        return (float(est.get("flops", 0)), float(est.get("transcendentals", 0)),
                float(est.get("bytes_accessed", 0)))
      return 0.0, 0.0, io
    if op in ("dynamic-slice", "slice") and bytes_:  # reads only the slice
      io = 2.0 * shape_bytes(i.shape) + sum(shape_bytes(self.operand_shape(comp, o))
                                            for o in i.operands[1:])
    elif op == "dynamic-update-slice" and bytes_:  # in place: reads and writes the update
      io = 2.0 * shape_bytes(self.operand_shape(comp, i.operands[1])) + sum(
          shape_bytes(self.operand_shape(comp, o)) for o in i.operands[2:])
    out = _elements(i.shape) if not i.shape.startswith("(") else 0
    if op == "dot":
      lhs = _dims(self.operand_shape(comp, i.operands[0]))
      contract = i.called("lhs_contracting_dims")
      k = math.prod(lhs[int(c)] for c in contract if int(c) < len(lhs)) if lhs else 1
      return 2.0 * out * k, 0.0, io
    if op == "convolution":
      return _conv_flops(i, _dims(self.operand_shape(comp, i.operands[0])),
                         _dims(self.operand_shape(comp, i.operands[1])), _dims(i.shape)), 0.0, io
    if op in _REDUCING:
      src = self.operand_shape(comp, i.operands[0]) if i.operands else i.shape
      per = self._apply_flops(i)
      if op in ("reduce-window", "select-and-scatter"):
        win = re.search(r"window=\{size=([\dx]+)", i.attrs)
        n = math.prod(int(x) for x in win.group(1).split("x")) if win else 1
        return per * out * n, 0.0, io
      if op == "scatter":
        return per * _elements(self.operand_shape(comp, i.operands[-1])), 0.0, io
      return per * _elements(src), 0.0, io
    if op in _NO_FLOPS:
      return 0.0, 0.0, io
    if op in _TRANSCENDENTAL:
      return 0.0, float(out), io
    return float(out), 0.0, io  # elementwise

  @functools.lru_cache(maxsize=None)
  def comp_cost(self, comp: str, mode: str) -> tuple[float, float, float]:
    f = t = b = 0.0
    for i in self.comps.get(comp, []):
      a, c, d = self.instr_cost(comp, i, mode)
      f, t, b = f + a, t + c, b + d
    return f, t, b

  def attribute(self, comp: str, mult: float, seen=()) -> None:
    """Per-instruction (flops, bytes) x multiplicity in `contrib`, typical branches, and the
    loop list."""
    if comp in seen:
      return
    for i in self.comps.get(comp, []):
      if i.op == "while":
        n = self.trip_count(comp, i)
        if n is None:
          self.unknown += 1
        body = i.attr("body")
        self.loops.append((i.name, n, self.comp_cost(body, "typical")[0]))
        self.attribute(body, mult * (n if n is not None else 1), seen + (comp,))
        continue
      if i.op == "conditional":
        names = i.called("branch_computations") or [
            c for c in (i.attr("true_computation"), i.attr("false_computation")) if c]
        if names:
          best = min(names, key=lambda c: (self.comp_cost(c, "typical")[0],
                                           self.comp_cost(c, "typical")[2]))
          self.attribute(best, mult, seen + (comp,))
        continue
      if i.op in ("call", "async-start", "call-start"):
        for c in i.called("calls") + i.called("to_apply"):
          self.attribute(c, mult, seen + (comp,))
        continue
      f, _, b = self.instr_cost(comp, i, "typical")
      if f or b:
        m = re.search(r'op_name="([^"]*)"', i.attrs)
        key = (i.op, m.group(1) if m else i.name)
        acc = self.contrib.setdefault(key, [0.0, 0.0])
        acc[0] += f * mult
        acc[1] += b * mult


def hlo_cost(hlo_text: str, top: int = 10) -> HloCost:
  """The cost of the program in `hlo_text` (`compiled.as_text()`): see the module docstring."""
  comps, entry = parse_hlo(hlo_text)
  a = _Analyzer(comps, entry)
  f, t, b = a.comp_cost(entry, "typical")
  fw, _, bw = a.comp_cost(entry, "worst")
  fo, _, bo = a.comp_cost(entry, "once")
  a.attribute(entry, 1.0)
  rows = [k + tuple(v) for k, v in a.contrib.items()]
  return HloCost(f, t, b, fw, bw, fo, bo, a.loops, a.unknown,
                 sorted(rows, key=lambda r: -r[2])[:top], sorted(rows, key=lambda r: -r[3])[:top])
