"""Where a compiled program's peak memory goes: a liveness walk over optimized, scheduled HLO text.

    python bench/hlo_liveness.py DUMP/...-TLP-hlo.txt [--top 40] [--json]

Input: the scheduled HLO of one program (`compiled.as_text()`, or libtpu's dump
`LIBTPU_INIT_ARGS=--xla_jf_dump_to=DIR`, file `*-TLP-hlo.txt`). Output: the estimated peak of
device memory (HBM; buffers in memory space S(1), VMEM, are skipped), the instruction where it
happens (descending into the while loop / conditional / call running there) and the buffers live
at that point, largest first, with their shapes and the op names from the metadata (what jax
code made them).

The model of buffers is an approximation of XLA's buffer assignment, good for attribution, not
for exact figures (compare its peak with `memory_analysis()`): a value that only re-labels its
operands (bitcast, get-tuple-element, tuple, while, optimization-barrier, copy-done, ...) owns
no memory; dynamic-update-slice, scatter, ragged-all-to-all and custom calls with
`output_to_operand_aliasing` write into an operand; everything else allocates its output. A
buffer lives from its definition to its last use in schedule order; entry parameters until
their last use (donated state) unless an output aliases them. A loop body's values that reach
its root take the place of its parameter's (the loop state is updated in place). Tile padding
in layouts is ignored.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
               "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1, "s4": 1, "u4": 1, "token": 0}
VIEW_OPS = {"bitcast", "get-tuple-element", "tuple", "while", "optimization-barrier", "copy-done",
            "call-done", "all-gather-done", "all-reduce-done", "collective-permute-done",
            "async-done", "send-done", "recv-done", "parameter", "constant", "after-all",
            "add-dependency", "domain", "get-dimension-size"}
INPLACE_OPERAND = {"dynamic-update-slice": 0, "scatter": 0, "ragged-all-to-all": 1}
_INSTR = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_COMP = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_ARRAY = re.compile(r"([a-z0-9]+)\[([0-9,]*)\](\{[^}]*\})?")


def _split_shape(s: str) -> tuple[str, str]:
  """'shape opcode(...)...' -> (shape text, rest)."""
  s = s.strip()
  if s.startswith("("):
    depth = 0
    for i, c in enumerate(s):
      depth += c == "("
      depth -= c == ")"
      if depth == 0:
        return s[:i + 1], s[i + 1:].strip()
  m = re.match(r"\S+", s)
  return m.group(0), s[m.end():].strip()


def _parse_shape(text: str):
  """Shape text -> nested list of leaves (bytes, short name); tuples are lists."""
  text = text.strip()
  if text.startswith("("):
    inner, parts, depth, cur = text[1:-1], [], 0, ""
    for c in inner:
      if c in "({[":
        depth += 1
      elif c in ")}]":
        depth -= 1
      if c == "," and depth == 0:
        parts.append(cur)
        cur = ""
      else:
        cur += c
    if cur.strip():
      parts.append(cur)
    return [_parse_shape(re.sub(r"/\*.*?\*/", "", p)) for p in parts]
  m = _ARRAY.search(text)
  if not m:
    return (0, text)
  dt, dims, layout = m.group(1), m.group(2), m.group(3) or ""
  n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
  vmem = "S(1)" in layout or "S(2)" in layout or "S(5)" in layout
  return (0 if vmem else n * DTYPE_BYTES.get(dt, 4), f"{dt}[{dims}]")


def _leaves(v):
  if isinstance(v, list):
    for x in v:
      yield from _leaves(x)
  elif v is not None:
    yield v


def _operands(rest: str) -> tuple[str, list[str], str]:
  """'opcode(%a, %b), attrs' -> (opcode, operand names, attrs)."""
  m = re.match(r"([\w\-]+)\(", rest)
  if not m:
    return rest.split("(")[0], [], ""
  depth, i = 0, m.end() - 1
  for j in range(i, len(rest)):
    depth += rest[j] == "("
    depth -= rest[j] == ")"
    if depth == 0:
      break
  return m.group(1), re.findall(r"%([\w.\-]+)", rest[i:j + 1]), rest[j + 1:]


@dataclass
class Instr:
  name: str
  shape: object
  opcode: str
  operands: list[str]
  attrs: str
  root: bool
  op_name: str = ""
  param: int | None = None  # parameter number


@dataclass
class Comp:
  name: str
  instrs: list[Instr] = field(default_factory=list)
  entry: bool = False


def parse(text: str) -> dict[str, Comp]:
  comps, cur = {}, None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m:
      cur = Comp(m.group(2), entry=bool(m.group(1)))
      comps[cur.name] = cur
      continue
    if cur is None:
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    shape_text, rest = _split_shape(m.group(3))
    opcode, ops, attrs = _operands(rest)
    op = re.search(r'op_name="([^"]*)"', attrs)
    num = re.match(r"parameter\((\d+)\)", rest)
    cur.instrs.append(Instr(m.group(2), _parse_shape(shape_text), opcode, ops, attrs,
                            bool(m.group(1)), op.group(1) if op else "",
                            int(num.group(1)) if num else None))
  return comps


@dataclass
class Buf:
  size: int
  desc: str
  op_name: str
  start: int
  end: int
  name: str = ""


def _called(ins: Instr) -> list[str]:
  names = []
  for key in ("body", "condition", "to_apply", "calls", "true_computation",
              "false_computation"):
    m = re.search(rf"\b{key}=%([\w.\-]+)", ins.attrs)
    if m:
      names.append(m.group(1))
  m = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
  if m:
    names += re.findall(r"%([\w.\-]+)", m.group(1))
  return names


class Liveness:
  def __init__(self, comps: dict[str, Comp], drop: set[str] = frozenset()):
    self.comps = comps
    self.drop = drop  # instruction names whose outputs are not counted (what-if analyses)
    self.memo: dict[str, tuple[int, int, list]] = {}

  def _fusion_alias(self, ins: Instr) -> int | None:
    """Operand index a fusion updates in place (its root is a dynamic-update-slice / scatter of
    a fusion parameter), else None."""
    for c in _called(ins):
      comp = self.comps.get(c)
      if comp is None:
        continue
      root = next((i for i in comp.instrs if i.root), None)
      if root is None or root.opcode not in INPLACE_OPERAND:
        continue
      target = root.operands[INPLACE_OPERAND[root.opcode]]
      for i in comp.instrs:
        if i.opcode == "parameter" and i.name == target:
          return i.param
    return None

  def analyse(self, name: str):
    """-> (peak bytes of buffers this computation allocates, time of the peak, buffers live at
    the peak as [(size, desc, op_name, nested)])."""
    if name in self.memo:
      return self.memo[name]
    comp = self.comps[name]
    values: dict[str, object] = {}
    bufs: list[Buf] = []
    inner: dict[int, tuple[int, list]] = {}

    def new(shape, ins, t):
      if isinstance(shape, list):
        return [new(s, ins, t) for s in shape]
      size, desc = shape
      if size == 0 or ins.name in self.drop:
        return None
      bufs.append(Buf(size, desc, ins.op_name, t, t, ins.name))
      return len(bufs) - 1

    for t, ins in enumerate(comp.instrs):
      op = ins.opcode
      ops = [values.get(o) for o in ins.operands]
      if op == "parameter":
        values[ins.name] = new(ins.shape, ins, t) if comp.entry else None
      elif op == "get-tuple-element":
        idx = int(re.search(r"index=(\d+)", ins.attrs).group(1))
        src = ops[0] if ops else None
        values[ins.name] = src[idx] if isinstance(src, list) and idx < len(src) else None
      elif op == "tuple":
        values[ins.name] = ops
      elif op in ("while",):
        values[ins.name] = ops[0] if ops else None
      elif op == "copy-start":
        values[ins.name] = new(ins.shape, ins, t)
      elif op in VIEW_OPS:
        values[ins.name] = ops[0] if ops and op != "constant" else None
      else:
        alias = INPLACE_OPERAND.get(op)
        if op == "fusion":
          alias = self._fusion_alias(ins)
        m = re.search(r"output_to_operand_aliasing=\{\{\}:\s*\((\d+)", ins.attrs)
        if m:
          alias = int(m.group(1))
        if alias is not None and alias < len(ops) and ops[alias] is not None \
            and not isinstance(ins.shape, list):
          values[ins.name] = ops[alias]
        else:
          values[ins.name] = new(ins.shape, ins, t)
      for v in ([] if op == "get-tuple-element" else ops):
        for b in _leaves(v):
          bufs[b].end = max(bufs[b].end, t)
      called = _called(ins)
      if called and op != "fusion":
        best = (0, [])
        for c in called:
          if c in self.comps:
            p, _, live = self.analyse(c)
            if p > best[0]:
              best = (p, live)
        if best[0]:
          inner[t] = best
    n = len(comp.instrs)
    root = next((i for i in comp.instrs if i.root), None)
    root_bufs = set(_leaves(values.get(root.name))) if root else set()
    for b in root_bufs:
      bufs[b].end = n if comp.entry else bufs[b].end
    if not comp.entry:  # values reaching the root replace the caller's (in-place loop state)
      for b in root_bufs:
        bufs[b].size = 0
    delta = [0] * (n + 2)
    for b in bufs:
      delta[b.start] += b.size
      delta[b.end + 1] -= b.size
    live, peak, at = 0, 0, 0
    for t in range(n):
      live += delta[t]
      total = live + inner.get(t, (0, []))[0]
      if total > peak:
        peak, at = total, t
    here = [(b.size, f"{b.desc} {b.name}->{comp.instrs[min(b.end, n - 1)].name}", b.op_name, None)
            for b in bufs if b.size and b.start <= at <= b.end]
    if at in inner:
      here.append((inner[at][0], f"inside {comp.instrs[at].opcode} {name}@{at}/{n} "
                   f"{comp.instrs[at].name}", comp.instrs[at].op_name, inner[at][1]))
    here.sort(key=lambda r: -r[0])
    self.memo[name] = (peak, at, here)
    return self.memo[name]


def report(text: str, top: int = 40, depth: int = 3, drop=frozenset()) -> dict:
  """The peak and what is live there (see the module docstring); `drop`: names of instructions
  whose outputs are left out (to ask what the peak would be without them)."""
  comps = parse(text)
  entry = next(c for c in comps.values() if c.entry)
  lv = Liveness(comps, set(drop))
  peak, at, live = lv.analyse(entry.name)
  return {"peak_bytes": peak, "at": entry.instrs[at].name, "live": _rows(live, top, depth)}


def _rows(live, top, depth):
  out = []
  for size, desc, op, nested in live[:top]:
    row = {"bytes": size, "shape": desc, "op": op}
    if nested and depth > 0:
      row["inside"] = _rows(nested, top, depth - 1)
    out.append(row)
  return out


def _short(op: str, width: int = 150) -> str:
  op = op.replace("jit(_train_step)/", "").replace("/while/body/closed_call", "/W")
  return op if len(op) <= width else "..." + op[-width:]


def _print(rows, indent=0, file=sys.stdout):
  for r in rows:
    print(f"{' ' * indent}{r['bytes'] / 2**30:8.3f} GiB  {r['shape']:<60} {_short(r['op'])}",
          file=file)
    if "inside" in r:
      _print(r["inside"], indent + 4, file)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("hlo")
  ap.add_argument("--top", type=int, default=40)
  ap.add_argument("--depth", type=int, default=3)
  ap.add_argument("--json", action="store_true")
  ap.add_argument("--drop", default="", help="comma-separated instruction names not to count")
  a = ap.parse_args(argv)
  r = report(open(a.hlo).read(), a.top, a.depth, frozenset(filter(None, a.drop.split(","))))
  if a.json:
    print(json.dumps(r))
    return
  print(f"estimated peak {r['peak_bytes'] / 2**30:.2f} GiB at {r['at']}")
  _print(r["live"])


if __name__ == "__main__":
  main()
