"""Where an XLA:TPU compile spends its time, from libtpu's own logs and a light LLO dump.

Run the compile (any `dsv3 plan`, or a script) with

    LIBTPU_INIT_ARGS="--xla_jf_print_compilation_stats=true --log_dir=LOGS \
      --xla_jf_dump_to=DUMP --xla_jf_dump_llo_pass_label_regex=final_bundles"

then `python bench/compile_breakdown.py LOGS DUMP`. It prints:
- libtpu's stage durations (HLO_PASSES, BACKEND_PASSES = per-op LLO code generation,
  CODE_GENERATION, END_TO_END) and the slowest HLO passes (`compilation_stats`), wall seconds;
- the ops the backend compiled one by one (XLA deduplicates identical ops first, so each is one
  distinct fusion / copy / collective / Mosaic kernel), grouped by where they come from in the
  model (the op_name of the optimized HLO: scanned stack, MoE exchange, attention, ...) and by
  opcode, with each group's share of per-op wall seconds and of the generated code (bytes of the
  final-bundles listing, a load-independent proxy of the work). A dump file is named
  <start ns>-<op>-NN-<stage>.txt: an op's duration is its last file's mtime minus its start.
Wall seconds on a loaded host stretch with the load; compare shares, or CPU seconds
(`compile_times` in `dsv3 plan --json`).
"""
from __future__ import annotations

import collections
import os
import re
import sys


def stages(log_dir: str) -> tuple[list[str], list[tuple[str, float]]]:
  """(stage lines, [(pass, ms)]) from libtpu's INFO logs in log_dir."""
  lines, passes = [], []
  for f in sorted(os.listdir(log_dir)):
    if ".INFO." not in f:
      continue
    for line in open(os.path.join(log_dir, f), errors="replace"):
      if "stage duration" in line or "Total runtime (ms) of HLO passes" in line:
        lines.append(line.split("] ", 1)[-1].strip())
      m = re.search(r"compilation_stats.cc:\d+\] ([^,]+), (\d+), ([\d.]+)$", line.strip())
      if m:
        passes.append((m.group(1), float(m.group(3))))
  return lines, passes


def ops(dump: str) -> list[tuple[str, float, int]]:
  """[(op name, seconds, final-bundles bytes)] per op the backend compiled."""
  seen: dict[tuple[int, str], list[int]] = {}
  for f in os.listdir(dump):
    m = re.match(r"(\d+)-(.+?)-(\d\d)-", f)
    if not m or m.group(2) == "TLP" or m.group(2).startswith("<"):
      continue
    st = os.stat(os.path.join(dump, f))
    end, size = seen.setdefault((int(m.group(1)), m.group(2)), [0, 0])
    seen[(int(m.group(1)), m.group(2))] = [max(end, st.st_mtime_ns),
                                          size + (st.st_size if f.endswith("final_bundles.txt") and "schedule" not in f else 0)]
  return [(name, (end - start) / 1e9, size) for (start, name), (end, size) in seen.items()]


def hlo_meta(dump: str) -> dict[str, tuple[str, str]]:
  """op name -> (opcode, op_name metadata) from the dumped optimized HLO (*TLP-hlo.txt)."""
  path = next(os.path.join(dump, f) for f in os.listdir(dump) if f.endswith("TLP-hlo.txt"))
  out = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%([\w.-]+) = (?:\([^=]*?\)|\S+) ([\w-]+)\((.*)$",
                       open(path).read(), re.M):
    on = re.search(r'op_name="([^"]*)"', m.group(3))
    out[m.group(1)] = (m.group(2), on.group(1) if on else "")
  return out


def origin(op_name: str) -> str:
  """Where in the train step an op comes from, by its op_name."""
  o = op_name.split("/", 1)[-1] if op_name.startswith("jit(") else op_name
  stack = re.search(r"layers_(\d+)_(\d+)", o)
  where = f"stack layers {stack.group(1)}-{stack.group(2)}" if stack else "outside the stacks"
  if not stack and ("mla" in o or "moe" in o or "checkpoint" in o):
    where = "MTP block"  # the only decoder layer (and the only remat) outside the stacks
  if not o:
    return "no op_name (SPMD partitioner / layout copies)"
  if "expert_parallel" in o:
    part = "MoE exchange + experts"
  elif "/moe/" in o or o.startswith("moe"):
    part = "router + shared expert"
  elif "mla" in o:
    part = "attention"
  elif "shard_map" in o:
    part = "vocab tables"
  else:
    part = "other"
  return f"{where}: {part}{' (backward)' if o.startswith('transpose') else ''}"


def main(log_dir: str, dump: str) -> None:
  lines, passes = stages(log_dir)
  print("\n".join(dict.fromkeys(lines)))
  for name, ms in sorted(passes, key=lambda p: -p[1])[:8]:
    print(f"  HLO pass {name}: {ms / 1e3:.1f} s")
  meta, rows = hlo_meta(dump), ops(dump)
  secs, code = sum(r[1] for r in rows), sum(r[2] for r in rows) or 1
  print(f"\nbackend: {len(rows)} distinct ops, per-op wall seconds summed {secs:.0f}, "
        f"code {code / 1e6:.1f} MB")
  for title, key in (("by place", lambda n: origin(meta.get(n, ("", ""))[1]).split(":")[0]),
                     ("by origin", lambda n: origin(meta.get(n, ("", ""))[1])),
                     ("by opcode", lambda n: meta.get(n, ("?", ""))[0])):
    t, c, k = collections.Counter(), collections.Counter(), collections.Counter()
    for name, s, size in rows:
      g = key(name)
      t[g] += s
      c[g] += size
      k[g] += 1
    print(f"{title}:")
    for g, s in t.most_common(14):
      print(f"  {s / secs:6.1%} of time {c[g] / code:6.1%} of code  {k[g]:4d} ops  {g}")
  print("slowest ops:")
  for name, s, size in sorted(rows, key=lambda r: -r[1])[:12]:
    opcode, op_name = meta.get(name, ("?", ""))
    print(f"  {s:6.1f} s {size / 1e6:5.2f} MB {name} ({opcode}) {op_name[-90:]}")


if __name__ == "__main__":
  main(*sys.argv[1:3])
