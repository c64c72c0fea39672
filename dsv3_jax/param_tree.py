"""The parameter tree on disk: one standard Orbax PyTree checkpoint, shared by `dsv3 convert`
(a converted directory's `params/`) and `dsv3 train` (each step's `params` item).

Tree: the model's variables in the per-layer view of `dsv3_jax.pretrained.flat_variables`,
nested on ".", layer/expert indices as string keys:

  {"embed_tokens": [V, D],
   "layers": {"0": {"input_layernorm": {"weight": [D]},
                    "self_attn": {"q_a_proj": {"kernel": [D, q_lora]}, ...},   # kernels [in, out]
                    "mlp": {"experts": {"gate_proj": [E, D, I], ...}, "gate": {...}, ...}}, ...},
   "mtp": {"0": {"enorm": ..., "eh_proj": ..., "block": {...}}},   # when the model has MTP
   "norm": {"weight": [D]}, "lm_head": {"kernel": [D, V]}}

FP8 (`dsv3 convert --dtype float8`): a quantised Linear stores `weight` [out, in] float8_e4m3fn and
`weight_scale_inv` [ceil(out/bm), ceil(in/bn)] float32 in place of `kernel`; routed experts store
`{proj}_weight` [E, out, in] and `{proj}_weight_scale_inv` in place of `{proj}` (the variable
names of the model loaded with `from_pretrained(..., fp8="keep")`).

Per layer rather than stacked (the model itself keeps a leading `layers` axis per LayerStack):
Orbax writes a leaf whole, and the stacked routed experts of DeepSeek-V3 are one 435 GB leaf in
bf16; per layer the largest leaf is one layer's experts (7.5 GB), which bounds the converter's
memory. Loading stacks the layers on device (`pretrained.model_from_arrays`).

Plain Orbax reads it with no dsv3 code:
  orbax.checkpoint.PyTreeCheckpointer().restore(pytree_dir(d))   # d/state for `dsv3 convert`
  orbax.checkpoint.experimental.v1.load_pytree(d)                # the converted d = DIR/params

Checkpoint directories (`locate`): a converted directory (config.json, dsv3_checkpoint.json,
params/), a training run (config.json, checkpoints/<step>/params: the latest step is used) or one
of its step directories.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.errors import UserError
from dsv3_jax.layers import dequantize_blocks

__all__ = ["PARAMS", "MANIFEST", "FORMAT", "VERSION", "Fp8Weight", "nest", "flatten",
           "fp8_paths", "pytree_dir", "stored_params", "mtp_depth_stored", "restore_arrays", "restore_numpy",
           "sharding_for", "swap_last2", "replicated_like", "Located", "locate", "is_converted",
           "read_manifest", "latest_step", "ShardingsArg", "CheckpointNotFound"]

PARAMS = "params"
MANIFEST = "dsv3_checkpoint.json"
FORMAT = "dsv3-jax-orbax-pytree"
VERSION = 2

ShardingsArg = (Mapping[str, jax.sharding.Sharding]
                | Callable[[str, Any], jax.sharding.Sharding] | None)


class CheckpointNotFound(UserError, FileNotFoundError):
  """A path is not a checkpoint this project can read (the message says what was looked for)."""


@dataclasses.dataclass(frozen=True)
class Fp8Weight:
  """A block-quantised weight in the checkpoint layout: value [..., out, in] float8_e4m3fn,
  scale_inv [..., ceil(out/bm), ceil(in/bn)] float32, block (bm, bn)."""

  value: Any
  scale_inv: Any
  block: tuple[int, int]


# The tree ---------------------------------------------------------------------------------------
# Bytes per Orbax partial restore when loading (progress is reported between them).
RESTORE_GROUP_BYTES = 1 << 30

def nest(flat: Mapping[str, Any]) -> dict:
  """{"layers.0.mlp.gate.kernel": x, ...} -> {"layers": {"0": {"mlp": {"gate": {"kernel": x}}}}}."""
  out: dict = {}
  for path, x in flat.items():
    *parents, leaf = path.split(".")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = x
  return out


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """The inverse of `nest`."""
  out = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, path + "."))
    else:
      out[path] = v
  return out


def fp8_paths(path: str) -> tuple[str, str]:
  """The tree paths (value, scale) that hold dense parameter `path` in FP8 form:
  "x.q_b_proj.kernel" -> ("x.q_b_proj.weight", "x.q_b_proj.weight_scale_inv");
  "x.experts.up_proj" -> ("x.experts.up_proj_weight", "x.experts.up_proj_weight_scale_inv")."""
  prefix, _, last = path.rpartition(".")
  base = f"{prefix}.weight" if last == "kernel" else f"{path}_weight"
  return base, base + "_scale_inv"


def _dense_path(scale_path: str) -> str:
  base = scale_path[:-len("_scale_inv")]
  prefix, _, last = base.rpartition(".")
  return f"{prefix}.kernel" if last == "weight" else base[:-len("_weight")]


def pytree_dir(d: str | os.PathLike) -> str:
  """The directory Orbax's PyTreeCheckpointer reads: `d/state` for a checkpoint written with
  the v1 API (`dsv3 convert`), `d` itself for one written by a CheckpointManager (`dsv3 train`)."""
  d = os.fspath(d)
  return os.path.join(d, "state") if os.path.isfile(os.path.join(d, "state", "_METADATA")) else d


def _checkpointer():
  import orbax.checkpoint as ocp
  return ocp.PyTreeCheckpointer()


def stored_params(params_dir: str | os.PathLike) -> dict[str, dict]:
  """{dense parameter path: {"dtype", "shape", "quantized"[, "scale_shape"]}} from the Orbax
  metadata alone (no tensor read); FP8 pairs are reported under their dense path."""
  import orbax.checkpoint as ocp
  from etils import epath
  d = pytree_dir(params_dir)
  if not os.path.isfile(os.path.join(d, "_METADATA")):
    raise CheckpointNotFound(f"{params_dir}: not an Orbax PyTree checkpoint (no _METADATA)")
  from dsv3_jax.checkpoint import CheckpointError
  try:
    leaves = flatten(ocp.PyTreeCheckpointHandler().metadata(epath.Path(d)).tree)
  except (ValueError, FileNotFoundError, KeyError) as e:  # missing/corrupt files
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise CheckpointError(f"{params_dir}: cannot restore the parameter tree ({first[:200]})") from e
  out: dict[str, dict] = {}
  for path, m in leaves.items():
    if path.endswith("weight_scale_inv"):
      continue
    entry = {"dtype": str(np.dtype(m.dtype)), "shape": list(m.shape), "quantized": False}
    scale = path + "_scale_inv"
    if scale in leaves:
      entry.update(quantized=True, scale_shape=list(leaves[scale].shape))
      out[_dense_path(scale)] = entry
    else:
      out[path] = entry
  return out


def mtp_depth_stored(stored: Mapping[str, Any]) -> int:
  """How many MTP depths a parameter tree holds (`stored`: `stored_params` or any dict keyed by
  parameter path)."""
  depth = 0
  while f"mtp.{depth}.enorm.weight" in stored:
    depth += 1
  return depth


# Restoring ----------------------------------------------------------------------------------------
def sharding_for(shardings: ShardingsArg, path: str, abstract_var) -> jax.sharding.Sharding:
  """The sharding `shardings` gives parameter `path` (default: the first local device)."""
  if shardings is None:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if callable(shardings) and not isinstance(shardings, Mapping):
    return shardings(path, abstract_var)
  if path not in shardings:
    raise KeyError(f"shardings has no entry for parameter {path!r}")
  return shardings[path]


def swap_last2(s: jax.sharding.Sharding, ndim: int) -> jax.sharding.Sharding:
  """The sharding of the transposed ([..., out, in]) array, for a NamedSharding; others as is."""
  if isinstance(s, jax.sharding.NamedSharding):
    spec = list(s.spec) + [None] * (ndim - len(s.spec))
    spec[-2], spec[-1] = spec[-1], spec[-2]
    return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*spec))
  if isinstance(s, jax.sharding.SingleDeviceSharding):
    return s
  raise TypeError(f"FP8 weights restore into NamedSharding or SingleDeviceSharding, got {s}")


def replicated_like(s: jax.sharding.Sharding) -> jax.sharding.Sharding:
  if isinstance(s, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
  return s


@functools.lru_cache(maxsize=64)  # one compiled function per (block, dtype, sharding)
def _dequantize_fn(block: tuple[int, int], dtype, out_sharding):
  def f(w, s):  # w [..., out, in] e4m3, s [..., so, si] -> [..., in, out] dtype
    return jnp.swapaxes(dequantize_blocks(w, s, block), -1, -2).astype(dtype)
  return jax.jit(f, out_shardings=out_sharding)


def _restore(params_dir, d: str, args) -> dict:
  """Orbax's restore; a missing or corrupt file (an incomplete copy, a damaged disk) becomes a
  CheckpointError naming the directory, with Orbax's first line."""
  from dsv3_jax.checkpoint import CheckpointError
  try:
    return _checkpointer().restore(d, args=args)
  except (ValueError, FileNotFoundError, KeyError) as e:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise CheckpointError(f"{params_dir}: cannot restore the parameter tree ({first[:200]})") from e


def restore_arrays(params_dir: str | os.PathLike, abstract_vars: Mapping[str, Any], *,
                   shardings: ShardingsArg = None, keep_fp8: bool = False,
                   block: tuple[int, int] | None = None, progress: bool = False,
                   group_bytes: int = RESTORE_GROUP_BYTES) -> dict[str, Any]:
  """Restores the parameters named by `abstract_vars` ({per-layer path: abstract nnx.Variable})
  from the parameter tree at `params_dir` (or the converted directory holding it), in Orbax
  partial restores of about `group_bytes` each (parameters in tree order). block: the FP8 block
  size (default: the converted directory's, else 128 x 128). progress: report the bytes restored
  (`dsv3_jax.ui.progress`: a bar, plain lines or nothing) after each group.

  Each parameter is restored with the abstract variable's dtype into its sharding (`shardings`:
  {path: Sharding} or a callable (path, abstract_variable) -> Sharding; default the first local
  device), so each process reads only the chunks of its own shards. FP8 entries are dequantised
  (and transposed to our [in, out] layout) on device, unless `keep_fp8`: then they come back as
  `Fp8Weight` (value sharded like the target with its last two axes swapped, scales replicated).
  Returns {path: jax.Array | Fp8Weight}. Raises CheckpointError naming the directory and the
  parameter for a missing or mis-shaped one.
  """
  import orbax.checkpoint as ocp
  from dsv3_jax.checkpoint import CheckpointError
  if is_converted(params_dir):
    fp8 = read_manifest(params_dir).get("fp8") or {}
    block = block or tuple(fp8.get("weight_block_size") or (128, 128))
    params_dir = os.path.join(os.fspath(params_dir), PARAMS)
  block = tuple(block or (128, 128))
  d = pytree_dir(params_dir)
  stored = stored_params(d)
  missing = [p for p in abstract_vars if p not in stored]
  if missing:
    raise CheckpointError(f"{params_dir}: {len(missing)} parameter(s) the model needs are not in "
                          f"the checkpoint, e.g. {missing[:3]}")
  target: dict[str, Any] = {}
  args: dict[str, Any] = {}
  plan: dict[str, tuple] = {}

  def want(path, shape, dtype, sharding):
    target[path] = jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)
    args[path] = ocp.ArrayRestoreArgs(sharding=sharding, dtype=dtype, global_shape=tuple(shape))

  for p, var in abstract_vars.items():
    abs_value = var.get_value() if hasattr(var, "get_value") else var
    entry, s = stored[p], sharding_for(shardings, p, var)
    if not entry["quantized"]:
      if tuple(entry["shape"]) != tuple(abs_value.shape):
        raise CheckpointError(f"{params_dir}: parameter {p!r} has shape {tuple(entry['shape'])}, "
                              f"the model's is {tuple(abs_value.shape)}")
      want(p, abs_value.shape, abs_value.dtype, s)
      plan[p] = (None, abs_value.dtype, s)
      continue
    qshape = tuple(abs_value.shape[:-2]) + (abs_value.shape[-1], abs_value.shape[-2])
    if tuple(entry["shape"]) != qshape:
      raise CheckpointError(f"{params_dir}: FP8 parameter {p!r} has shape {tuple(entry['shape'])},"
                            f" the model needs {qshape} (layout [..., out, in])")
    vp, sp = fp8_paths(p)
    want(vp, qshape, jnp.float8_e4m3fn, swap_last2(s, len(qshape)))
    want(sp, entry["scale_shape"], jnp.float32, replicated_like(s))
    plan[p] = ((vp, sp), abs_value.dtype, s)
  r = {}
  from dsv3_jax.ui import progress as progress_bar
  sizes = {k: int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for k, v in target.items()}
  bar = progress_bar(sum(sizes.values()), "load", unit="B", disable=not progress)
  try:
    for group in _groups(list(target), sizes, group_bytes):
      r.update(flatten(_restore(params_dir, d, ocp.args.PyTreeRestore(
          item=nest({k: target[k] for k in group}), restore_args=nest({k: args[k] for k in group}),
          partial_restore=True))))
      bar.update(sum(sizes[k] for k in group))
  finally:
    bar.close()
  out: dict[str, Any] = {}
  for p, (fp8, dtype, s) in plan.items():
    if fp8 is None:
      out[p] = r[p]
    elif keep_fp8:
      out[p] = Fp8Weight(r[fp8[0]], r[fp8[1]], tuple(block))
    else:
      out[p] = _dequantize_fn(tuple(block), np.dtype(dtype), s)(r[fp8[0]], r[fp8[1]])
  return out


def _groups(keys: list[str], sizes: Mapping[str, int], group_bytes: int) -> list[list[str]]:
  """`keys` in order, cut into consecutive groups of about `group_bytes` (at least one key each)."""
  groups, cur, n = [], [], 0
  for k in keys:
    if cur and n + sizes[k] > group_bytes:
      groups.append(cur)
      cur, n = [], 0
    cur.append(k)
    n += sizes[k]
  return groups + ([cur] if cur else [])


def restore_numpy(params_dir: str | os.PathLike, paths: list[str], stored: Mapping[str, dict],
                  ) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
  """{dense path: (value, scale_inv or None)} as stored, on the host (for export)."""
  import orbax.checkpoint as ocp
  target = {}
  for p in paths:
    for leaf in (fp8_paths(p) if stored[p]["quantized"] else (p,)):
      target[leaf] = np.zeros((), np.float32)
  args = {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in target}
  r = flatten(_restore(params_dir, pytree_dir(params_dir), ocp.args.PyTreeRestore(
      item=nest(target), restore_args=nest(args), partial_restore=True)))
  out = {}
  for p in paths:
    if stored[p]["quantized"]:
      vp, sp = fp8_paths(p)
      out[p] = (np.asarray(r[vp]), np.asarray(r[sp]))
    else:
      out[p] = (np.asarray(r[p]), None)
  return out


# Finding checkpoints ------------------------------------------------------------------------------
def is_converted(path: str | os.PathLike) -> bool:
  """True if `path` is a finished `dsv3 convert` output (its manifest is written last)."""
  return os.path.isfile(os.path.join(os.fspath(path), MANIFEST))


def read_manifest(path: str | os.PathLike) -> dict:
  """A converted directory's manifest (dtype, MTP depth, FP8 block, ...) with "params":
  `stored_params` of its tree. CheckpointNotFound naming the directory if it is not one."""
  file = os.path.join(os.fspath(path), MANIFEST)
  if not os.path.isfile(file):
    raise CheckpointNotFound(f"{path}: not a converted dsv3 checkpoint (no {MANIFEST}; an "
                             f"interrupted conversion never writes it)")
  with open(file) as f:
    m = json.load(f)
  if m.get("format") != FORMAT or m.get("version") != VERSION:
    raise CheckpointNotFound(f"{file}: format {m.get('format')!r} version {m.get('version')!r} "
                             f"is not {FORMAT!r} version {VERSION} (convert it again)")
  return dict(m, params=stored_params(os.path.join(os.fspath(path), PARAMS)))


def latest_step(checkpoints: str) -> int | None:
  """The highest finished step under a run's checkpoints/ directory (Orbax renames a step's
  temporary directory to its number only when the step is complete)."""
  steps = [int(n) for n in os.listdir(checkpoints) if n.isdigit()
           and os.path.isdir(os.path.join(checkpoints, n, PARAMS))] if os.path.isdir(checkpoints) else []
  return max(steps) if steps else None


@dataclasses.dataclass(frozen=True)
class Located:
  """Where a checkpoint's parts are. kind: "converted" | "run" (a training run or one of its
  steps). config_dir holds config.json (and tokenizer files); params_dir the parameter tree."""

  kind: str
  config_dir: str
  params_dir: str
  manifest: dict | None = None
  step: int | None = None


def locate(path: str | os.PathLike) -> Located | None:
  """A converted directory, a training run directory (its latest step) or a step directory
  (run/checkpoints/<step>) -> Located; None for anything else (e.g. an HF directory). Relative
  paths are resolved against the working directory. Raises CheckpointNotFound for a run with no
  finished step or a step directory whose run has no config.json."""
  path = os.path.abspath(os.fspath(path))
  if is_converted(path):
    return Located("converted", path, os.path.join(path, PARAMS), read_manifest(path))
  ckpts = os.path.join(path, "checkpoints")
  if os.path.isdir(ckpts) and os.path.isfile(os.path.join(path, "config.json")):
    step = latest_step(ckpts)
    if step is None:
      raise CheckpointNotFound(f"{path}: a training run without a finished checkpoint (nothing in "
                               f"{ckpts})")
    return Located("run", path, os.path.join(ckpts, str(step), PARAMS), step=step)
  if os.path.isdir(os.path.join(path, PARAMS)) and os.path.basename(path).isdigit():
    run = os.path.dirname(os.path.dirname(path))
    if not os.path.isfile(os.path.join(run, "config.json")):
      raise CheckpointNotFound(f"{path}: a training step directory, but its run {run} has no "
                               f"config.json")
    return Located("run", run, os.path.join(path, PARAMS), step=int(os.path.basename(path)))
  return None
