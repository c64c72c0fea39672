"""The converter's Orbax layout: write one parameter at a time, restore into any sharding.

A converted checkpoint directory DST holds

  config.json            the model config (quantization_config kept only for --dtype float8)
  tokenizer files        copied from the source when present
  params/<path>/         one Orbax PyTree checkpoint per parameter (zarr3 + OCDBT, chunked at
                         CHUNK_BYTES so a process restoring a shard reads only the chunks it needs):
                           {"value": array}                       a plain parameter, our layout
                           {"value": e4m3, "scale_inv": float32}  an FP8 block-quantised weight
  dsv3_checkpoint.json   the manifest, written last: format, version, dtype, MTP depth, the FP8
                         block size, and per parameter its stored dtype and shapes.

Why one checkpoint per parameter: Orbax's stable API saves a whole PyTree at once, and holding the
671B tree is what the converter must not do; per-parameter checkpoints are written as they are
produced, and each restores on its own into a `jax.sharding.Sharding` (each process reads only its
addressable shards).

FP8 layout: a quantised weight keeps the *checkpoint's* layout, the one the FP8 matmul kernels
take (`dsv3_jax.kernels_pallas.fp8`: weights [N, K] = [out, in], K-major):
  value     [..., out, in] float8_e4m3fn
  scale_inv [..., ceil(out/bm), ceil(in/bn)] float32, dequantised = value * scale_inv[i//bm, j//bn]
with a leading expert axis for stacked routed experts. Our own layout is the transpose
([..., in, out]); `restore_arrays` dequantises and transposes when asked for bf16/fp32.

Finished-ness: a directory is a converted checkpoint iff its manifest exists. The converter
writes into a hidden sibling (`.<name>.partial-<pid>`) and renames it to DST only when complete,
so an interrupted run never leaves a finished-looking DST.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import shutil
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.checkpoint import CheckpointError

__all__ = ["MANIFEST", "FORMAT", "CHUNK_BYTES", "Fp8Weight", "OrbaxWriter", "is_converted",
           "staging_dir",
           "read_manifest", "restore_arrays", "restore_numpy", "load_model", "ShardingsArg",
           "sharding_for"]

log = logging.getLogger(__name__)

MANIFEST = "dsv3_checkpoint.json"
FORMAT = "dsv3-jax-orbax-per-parameter"
VERSION = 1
PARAMS_DIR = "params"
CHUNK_BYTES = 16 << 20

ShardingsArg = (Mapping[str, jax.sharding.Sharding]
                | Callable[[str, Any], jax.sharding.Sharding] | None)


@dataclasses.dataclass(frozen=True)
class Fp8Weight:
  """A block-quantised weight in the checkpoint layout: value [..., out, in] float8_e4m3fn,
  scale_inv [..., ceil(out/bm), ceil(in/bn)] float32, block (bm, bn)."""

  value: Any
  scale_inv: Any
  block: tuple[int, int]


def staging_dir(dst: str) -> str:
  """The hidden sibling `.<name>.partial-<pid>` that a write into `dst` fills before renaming it.

  Also removes the staging directories of earlier writes into `dst` whose process is gone (a
  killed conversion leaves its partial directory behind; a running one keeps its own).
  """
  parent, name = os.path.split(os.path.abspath(dst))
  prefix = f".{name}.partial-"
  for entry in os.listdir(parent) if os.path.isdir(parent) else ():
    pid = entry[len(prefix):]
    if entry.startswith(prefix) and pid.isdigit() and not _alive(int(pid)):
      log.info("removing %s, left by an interrupted write (process %s)", entry, pid)
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
  return os.path.join(parent, f"{prefix}{os.getpid()}")


def _alive(pid: int) -> bool:
  if pid == os.getpid():
    return False  # our own earlier attempt in this process: stale by construction
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # exists, owned by someone else
  return True


def _checkpointer():
  import orbax.checkpoint as ocp
  # Weights are near-incompressible (random-looking bf16/e4m3 bits); zstd would cost CPU for ~10%.
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False, use_zarr3=True))


def is_converted(path: str | os.PathLike) -> bool:
  """True if `path` is a finished checkpoint written by the converter (its manifest exists)."""
  return os.path.isfile(os.path.join(os.fspath(path), MANIFEST))


def read_manifest(path: str | os.PathLike) -> dict:
  """The manifest of a converted checkpoint; ValueError naming the file if it is not one."""
  file = os.path.join(os.fspath(path), MANIFEST)
  if not os.path.isfile(file):
    raise CheckpointError(f"{path}: not a converted dsv3 checkpoint (no {MANIFEST}; an "
                          f"interrupted conversion never writes it)")
  with open(file) as f:
    m = json.load(f)
  if m.get("format") != FORMAT or m.get("version") != VERSION:
    raise CheckpointError(f"{file}: format {m.get('format')!r} version {m.get('version')!r} "
                          f"is not {FORMAT!r} version {VERSION}")
  return m


class OrbaxWriter:
  """Writes parameters one at a time into a temporary sibling of `dst`, renamed on `finish`.

  Use as a context manager: an exception inside (or a failed write) removes the temporary
  directory; `dst` is only ever replaced by a complete checkpoint. `workers` bounds how many
  parameters are being written while the caller produces the next one (peak memory is about
  workers + 1 parameter arrays).
  """

  def __init__(self, dst: str | os.PathLike, *, overwrite: bool = False, workers: int = 1):
    self.dst = os.path.abspath(os.fspath(dst))
    if os.path.lexists(self.dst) and not overwrite:
      raise FileExistsError(f"{self.dst} already exists (pass --overwrite / overwrite=True to "
                            f"replace it)")
    if workers < 1:
      raise ValueError(f"workers must be >= 1, got {workers}")
    parent, name = os.path.split(self.dst)
    os.makedirs(parent, exist_ok=True)
    self.tmp = staging_dir(self.dst)
    if os.path.lexists(self.tmp):
      shutil.rmtree(self.tmp)
    os.makedirs(os.path.join(self.tmp, PARAMS_DIR))
    self.overwrite = overwrite
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="orbax-writer")
    self._pending: list[concurrent.futures.Future] = []
    self._workers = workers
    self.entries: dict[str, dict] = {}

  def __enter__(self) -> "OrbaxWriter":
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is not None:
      self.abort()
    return False

  def write(self, path: str, value: np.ndarray, scale_inv: np.ndarray | None = None,
            info: dict | None = None) -> None:
    """Queues parameter `path`: a plain array in our layout, or FP8 values + scales."""
    while len(self._pending) >= self._workers:
      self._pending.pop(0).result()
    tree = {"value": value} if scale_inv is None else {"value": value, "scale_inv": scale_inv}
    entry = {"dtype": str(value.dtype), "shape": list(value.shape), "quantized": scale_inv is not None}
    if scale_inv is not None:
      entry["scale_shape"] = list(scale_inv.shape)
    entry.update(info or {})
    self.entries[path] = entry
    self._pending.append(self._pool.submit(self._save, path, tree))

  def _save(self, path: str, tree: dict) -> None:
    import orbax.checkpoint as ocp
    args = {k: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES) for k in tree}
    _checkpointer().save(os.path.join(self.tmp, PARAMS_DIR, path),
                         args=ocp.args.PyTreeSave(tree, save_args=args))

  def flush(self) -> None:
    while self._pending:
      self._pending.pop(0).result()

  def finish(self, manifest: dict, files: Mapping[str, bytes | str] = {}) -> str:
    """Waits for the writes, writes `files` ({name: content}) and the manifest, renames to dst."""
    self.flush()
    self._pool.shutdown()
    for name, content in files.items():
      mode = "wb" if isinstance(content, bytes) else "w"
      with open(os.path.join(self.tmp, name), mode) as f:
        f.write(content)
    full = {"format": FORMAT, "version": VERSION, **manifest, "params": self.entries}
    with open(os.path.join(self.tmp, MANIFEST), "w") as f:
      json.dump(full, f, indent=1)
    old = None
    if os.path.lexists(self.dst):  # overwrite: move the old one aside only now
      old = os.path.join(os.path.dirname(self.dst), f".{os.path.basename(self.dst)}.old-{os.getpid()}")
      os.rename(self.dst, old)
    os.rename(self.tmp, self.dst)
    if old is not None:
      shutil.rmtree(old) if os.path.isdir(old) and not os.path.islink(old) else os.remove(old)
    return self.dst

  def abort(self) -> None:
    for f in self._pending:
      f.cancel()
    self._pool.shutdown(wait=True)
    self._pending.clear()
    shutil.rmtree(self.tmp, ignore_errors=True)


# Restoring ------------------------------------------------------------------------------------
def sharding_for(shardings: ShardingsArg, path: str, abstract_var) -> jax.sharding.Sharding:
  if shardings is None:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if callable(shardings) and not isinstance(shardings, Mapping):
    return shardings(path, abstract_var)
  if path not in shardings:
    raise KeyError(f"shardings has no entry for parameter {path!r}")
  return shardings[path]


def _swap_last2(s: jax.sharding.Sharding, ndim: int) -> jax.sharding.Sharding:
  """The sharding of the transposed ([..., out, in]) array, for a NamedSharding; others as is."""
  if isinstance(s, jax.sharding.NamedSharding):
    spec = list(s.spec) + [None] * (ndim - len(s.spec))
    spec[-2], spec[-1] = spec[-1], spec[-2]
    return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*spec))
  if isinstance(s, jax.sharding.SingleDeviceSharding):
    return s
  raise TypeError(f"FP8 weights restore into NamedSharding or SingleDeviceSharding, got {s}")


def _replicated(s: jax.sharding.Sharding) -> jax.sharding.Sharding:
  if isinstance(s, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
  return s


def _restore(directory: str, items: Mapping[str, tuple[tuple, Any, Any]]) -> dict:
  """items {key: (shape, dtype, sharding)} -> {key: jax.Array} from one parameter checkpoint."""
  import orbax.checkpoint as ocp
  target = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=s) for k, (shape, dtype, s) in items.items()}
  args = {k: ocp.ArrayRestoreArgs(sharding=s, dtype=dtype, global_shape=tuple(shape))
          for k, (shape, dtype, s) in items.items()}
  if not os.path.isdir(directory):
    raise CheckpointError(f"{directory}: parameter listed in the manifest is missing from the "
                          f"checkpoint (deleted or incompletely copied)")
  try:
    return _checkpointer().restore(directory, args=ocp.args.PyTreeRestore(item=target,
                                                                          restore_args=args))
  except (ValueError, FileNotFoundError, KeyError) as e:  # Orbax: missing/corrupt files
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise CheckpointError(f"{directory}: cannot restore this parameter ({first[:200]})") from e


@functools.lru_cache(maxsize=64)  # one compiled function per (block, dtype, sharding), not per parameter
def _dequantize_fn(block: tuple[int, int], dtype, out_sharding):
  bm, bn = block

  def f(w, s):  # w [..., out, in] e4m3, s [..., so, si] -> [..., in, out] dtype
    m, n = w.shape[-2:]
    full = jnp.repeat(jnp.repeat(s.astype(jnp.float32), bm, axis=-2), bn, axis=-1)[..., :m, :n]
    return jnp.swapaxes(w.astype(jnp.float32) * full, -1, -2).astype(dtype)
  return jax.jit(f, out_shardings=out_sharding)


def restore_arrays(path: str | os.PathLike, abstract_vars: Mapping[str, Any], *,
                   shardings: ShardingsArg = None, keep_fp8: bool = False,
                   progress: bool = False) -> dict[str, Any]:
  """Restores the parameters named by `abstract_vars` ({path: abstract nnx.Variable}).

  Each parameter is restored with the abstract variable's dtype into its sharding
  (`shardings`: {path: Sharding}, or a callable (path, abstract_variable) -> Sharding; default
  the first local device), so each process reads only the chunks of its addressable shards.
  FP8 entries are dequantised (and transposed to our [in, out] layout) on device, unless
  `keep_fp8`, which returns them as `Fp8Weight` (checkpoint layout, value sharded like the
  target with its last two axes swapped, scales replicated).
  Returns {path: jax.Array | Fp8Weight}.
  """
  path = os.fspath(path)
  manifest = read_manifest(path)
  params = manifest["params"]
  missing = [p for p in abstract_vars if p not in params]
  if missing:
    raise CheckpointError(f"{path}: {len(missing)} parameter(s) the model needs are not in the "
                          f"checkpoint, e.g. {missing[:5]}")
  block = tuple((manifest.get("fp8") or {}).get("weight_block_size", (128, 128)))
  out: dict[str, Any] = {}
  items = abstract_vars.items()
  if progress:
    from dsv3_jax.ui import iterate
    items = iterate(items, len(abstract_vars), "restore", unit="param")
  for p, var in items:
    want = var.get_value() if hasattr(var, "get_value") else var
    entry = params[p]
    directory = os.path.join(path, PARAMS_DIR, p)
    s = sharding_for(shardings, p, var)
    if not entry["quantized"]:
      if tuple(entry["shape"]) != tuple(want.shape):
        raise CheckpointError(f"{directory}: shape {tuple(entry['shape'])} != model "
                              f"{tuple(want.shape)}")
      out[p] = _restore(directory, {"value": (want.shape, want.dtype, s)})["value"]
      continue
    qshape = tuple(want.shape[:-2]) + (want.shape[-1], want.shape[-2])
    if tuple(entry["shape"]) != qshape:
      raise CheckpointError(f"{directory}: FP8 shape {tuple(entry['shape'])} != model {qshape} "
                            f"(checkpoint layout [..., out, in])")
    qs = _swap_last2(s, len(qshape))
    r = _restore(directory, {"value": (qshape, jnp.float8_e4m3fn, qs),
                             "scale_inv": (tuple(entry["scale_shape"]), jnp.float32, _replicated(s))})
    if keep_fp8:
      out[p] = Fp8Weight(r["value"], r["scale_inv"], block)
    else:
      out[p] = _dequantize_fn(tuple(block), np.dtype(want.dtype), s)(r["value"], r["scale_inv"])
  return out


def restore_numpy(path: str | os.PathLike, param: str, manifest: dict | None = None,
                  ) -> tuple[np.ndarray, np.ndarray | None]:
  """(value, scale_inv or None) of one parameter as stored, on the host (for export)."""
  import orbax.checkpoint as ocp
  path = os.fspath(path)
  entry = (manifest or read_manifest(path))["params"][param]
  keys = ["value", "scale_inv"] if entry["quantized"] else ["value"]
  target = {k: np.zeros((), np.float32) for k in keys}
  args = {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in keys}
  r = _checkpointer().restore(os.path.join(path, PARAMS_DIR, param),
                              args=ocp.args.PyTreeRestore(item=target, restore_args=args))
  return np.asarray(r["value"]), (np.asarray(r["scale_inv"]) if entry["quantized"] else None)


def load_model(path: str | os.PathLike, dtype=jnp.float32, *, runtime=None, mtp: bool | None = None,
               shardings: ShardingsArg = None, keep_fp8: bool = False, mesh=None, rules=None,
               progress: bool = False):
  """`from_pretrained` for a converted directory: a `DeepseekV3` restored into `shardings`
  (or, with mesh / rules, where the `ShardingRules` put each parameter on that mesh; each
  process reads only its own shards).

  keep_fp8: FP8 entries (`--dtype float8`) stay e4m3 + block scales in the model
  (`from_pretrained(..., fp8="keep")`); otherwise they are dequantised on device.
  """
  from dsv3_jax.config import ModelConfig, RuntimeConfig
  from dsv3_jax.pretrained import abstract_model, flat_variables, model_from_arrays
  from dsv3_jax.sharding.entry import shardings_arg
  shardings = shardings_arg(shardings, mesh, rules)
  path = os.fspath(path)
  manifest = read_manifest(path)
  cfg = ModelConfig.from_hf_config(path)
  rt = runtime or RuntimeConfig(param_dtype=dtype, dtype=dtype)
  present = int(manifest.get("num_nextn_predict_layers", 0))
  if mtp is False:
    cfg = cfg.replace(num_nextn_predict_layers=0)
  elif present < cfg.num_nextn_predict_layers:
    if mtp:
      raise CheckpointError(f"{path}: config.json has num_nextn_predict_layers="
                            f"{cfg.num_nextn_predict_layers} but the checkpoint holds {present}")
    log.warning("%s: checkpoint holds %d of %d MTP layer(s); loading without the rest", path,
                present, cfg.num_nextn_predict_layers)
    cfg = cfg.replace(num_nextn_predict_layers=present)
  abstract = flat_variables(abstract_model(cfg, rt))
  arrays = restore_arrays(path, abstract, shardings=shardings, keep_fp8=keep_fp8,
                          progress=progress)
  return model_from_arrays(cfg, rt, arrays)
