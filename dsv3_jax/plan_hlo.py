"""TPU topologies and compiled-HLO inspection for `dsv3 plan` (`dsv3_jax.plan`): libtpu's
compile-only topology descriptions, usable HBM per device, and counts of collectives and Pallas
kernels in compiled HLO text, plus the figures of libtpu's out-of-memory messages."""
from __future__ import annotations

import importlib.util
import re

import jax

from dsv3_jax.errors import UserError

__all__ = ["PlanError", "get_topology", "hbm_bytes_per_device", "count_collectives",
           "count_kernels", "oom_figures", "first_line", "GiB", "HBM_GIB", "TOPOLOGY_FORMS",
           "HOT_PATHS", "COLLECTIVES"]

GiB = 1024 ** 3
# Usable HBM per device as libtpu reports it ("exceeds available HBM (95.74G)"; G = GiB), used
# when the topology's device does not expose its memory (compile-only devices do not).
HBM_GIB = {"TPU v4": 15.25, "TPU v5 lite": 15.75, "TPU v5": 95.74, "TPU v6 lite": 31.25,
           "TPU7x": 94.75}
TOPOLOGY_FORMS = {"v4": "v4:XxYxZ", "v5e": "v5e:RxC", "v5p": "v5p:XxYxZ", "v6e": "v6e:RxC",
                  "tpu7x": "tpu7x:XxYxZ"}
HOT_PATHS = ("attention", "decode", "moe", "fp8")
COLLECTIVES = ("all-to-all", "ragged-all-to-all", "all-gather", "reduce-scatter", "all-reduce",
               "collective-permute")


class PlanError(ValueError, UserError):
  """A request `plan` cannot compile (bad topology, mesh, flags, missing libtpu)."""


# Topology and HBM ---------------------------------------------------------------------------------
def get_topology(name: str):
  """libtpu's compile-only description of `name` (e.g. "v5p:4x4x16"); PlanError when the name
  is malformed or libtpu is missing."""
  fam, _, dims = name.partition(":")
  ndims = 3 if fam in ("v4", "v5p", "tpu7x") else 2
  if fam not in TOPOLOGY_FORMS or not re.fullmatch(r"\d+(x\d+){%d}" % (ndims - 1), dims):
    raise PlanError(f"--topology {name!r} is not a libtpu topology name; use one of "
                    f"{', '.join(TOPOLOGY_FORMS.values())} (chips per dimension, e.g. v5p:4x4x16 "
                    f"= 256 v5p chips, v6e:16x16); 'v5p-256'-style names are not accepted")
  if importlib.util.find_spec("libtpu") is None:
    raise PlanError(f"compiling for TPU needs libtpu: pip install \"jax[tpu]=={jax.__version__}\"")
  from jax.experimental import topologies
  try:
    return topologies.get_topology_desc(topology_name=name, platform="tpu")
  except Exception as e:  # noqa: BLE001  (libtpu raises assorted runtime errors)
    raise PlanError(f"libtpu rejected --topology {name!r}: {first_line(e)} (at least 2x2 chips; "
                    f"forms: {', '.join(TOPOLOGY_FORMS.values())})") from None


def hbm_bytes_per_device(device) -> int:
  """Usable HBM of one device: from the device when it reports it, else `HBM_GIB`."""
  try:
    limit = (device.memory_stats() or {}).get("bytes_limit")
    if limit:
      return int(limit)
  except Exception:  # noqa: BLE001  compile-only devices have no memory stats
    pass
  kind = device.device_kind
  if kind not in HBM_GIB:
    raise PlanError(f"unknown HBM size for device kind {kind!r}; known: {sorted(HBM_GIB)}")
  return int(HBM_GIB[kind] * GiB)


# HLO inspection ----------------------------------------------------------------------------------
def count_collectives(hlo_text: str) -> dict[str, int]:
  """Collective instructions by kind in compiled HLO text. An async pair counts once: by its
  `op-start`, or by its `op-done` where the start is a generic async wrapper (newer XLA)."""
  out = {}
  for op in COLLECTIVES:
    started = len(re.findall(rf"= [^=\n]*? {op}(?:-start)?\(", hlo_text))
    done = len(re.findall(rf"= [^=\n]*? {op}-done\(", hlo_text))
    out[op] = max(started, done)
  return out


def _kernel_path(name: str) -> str:
  n = name.lower()
  if "fp8" in n:
    return "fp8"
  if "mla_decode" in n:
    return "decode"
  if "attention" in n or "splash" in n or "flash" in n:
    return "attention"
  if "gmm" in n or "grouped" in n:
    return "moe"
  return "other"


def count_kernels(hlo_text: str) -> dict[str, int]:
  """Mosaic (Pallas TPU) calls in compiled HLO text by hot path, from each call's kernel name
  (the instruction name, which is the pallas_call's name: mla_attention_fwd, mla_decode, gmm,
  dsv3_fp8_matmul, ...). A grouped FP8 matmul counts for both moe and fp8."""
  out = dict.fromkeys(HOT_PATHS + ("other",), 0)
  for m in re.finditer(r"%([\w.-]+) = [^\n]*custom_call_target=\"tpu_custom_call\"", hlo_text):
    name = m.group(1)
    path = _kernel_path(name)
    out[path] += 1
    if path == "fp8" and "grouped" in name.lower():
      out["moe"] += 1
  return out


def first_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return f"{type(e).__name__}: {lines[0] if lines else ''}"[:400]


_SIZE = {"": 1, "K": 1024, "M": 1024 ** 2, "G": GiB, "T": 1024 ** 4}


def oom_figures(msg: str) -> tuple[int | None, int | None]:
  """(required, available) bytes from libtpu's RESOURCE_EXHAUSTED message, if it states them."""
  num = r"([\d.]+)([KMGT]?)"
  req = re.search(rf"required for [^()]*\({num}\)", msg) or re.search(rf"Used {num} of", msg)
  avail = re.search(rf"available HBM \({num}\)", msg) or re.search(rf"of {num} hbm", msg)
  conv = lambda m: int(float(m.group(1)) * _SIZE[m.group(2)]) if m else None
  return conv(req), conv(avail)
