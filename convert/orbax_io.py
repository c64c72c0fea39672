"""Writing a converted directory: the parameter tree streamed into one Orbax PyTree checkpoint
with Orbax's partial save, resumable after an interruption.

A converted checkpoint directory DST holds

  config.json            the model config (quantization_config kept only for --dtype float8)
  tokenizer files        copied from the source when present
  params/                ONE standard Orbax PyTree checkpoint of the parameter tree described
                         in `dsv3_jax.param_tree` (zarr3 + OCDBT, chunks of at most CHUNK_BYTES
                         so a process restoring a shard reads only the chunks it needs)
  dsv3_checkpoint.json   the manifest, written last: format, version, dtype, source, MTP depth,
                         the FP8 block size and scale format.

Streaming: each `write` is one `orbax.checkpoint.experimental.v1.partial.save` of a few leaves
(Orbax writes each call atomically into a pending directory), `finish` calls `partial.finalize`,
which merges them into one checkpoint. One call is in flight (in the background) while the caller
reads the next group; Orbax's partial saves of one checkpoint must not overlap. Memory: about two
groups of leaves.

Resuming and finished-ness: everything is written into the hidden sibling `.<name>.partial`
(job.json: the arguments; writer.pid: the process writing) and renamed to DST only when complete,
so DST never looks finished before it is. A conversion that stops (Ctrl-C, kill -9, full disk)
leaves `.<name>.partial`; running the same conversion again reads which leaves Orbax had
committed (the pending directories' metadata) and writes only the others. Different arguments
start over.
"""
from __future__ import annotations

import ast
import json
import logging
import os
import shutil
from typing import Any, Mapping

import numpy as np

from dsv3_jax.errors import UserError
from dsv3_jax.param_tree import FORMAT, MANIFEST, PARAMS, VERSION, nest

__all__ = ["TreeWriter", "staging_dir", "CHUNK_BYTES", "ConversionBusy"]

log = logging.getLogger(__name__)

CHUNK_BYTES = 16 << 20
_PARTIAL = PARAMS + ".partial_save"  # where Orbax's partial save stages DST/params
_JOB, _PID = "job.json", "writer.pid"


class ConversionBusy(UserError, RuntimeError):
  """Another live process is writing the same destination."""


def staging_dir(dst: str) -> str:
  """The hidden sibling `.<name>.partial` that a write into `dst` fills before renaming it."""
  parent, name = os.path.split(os.path.abspath(dst))
  return os.path.join(parent, f".{name}.partial")


def _alive(pid: int) -> bool:
  if pid == os.getpid():
    return False  # our own earlier attempt in this process: stale by construction
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _context():
  from orbax.checkpoint.experimental import v1
  ctx = v1.Context()
  # Weights are near-incompressible (random-looking bf16/e4m3 bits): no zstd.
  ctx.array.saving.use_compression = False
  ctx.array.saving.storage_options.chunk_byte_size = CHUNK_BYTES
  return ctx


def _committed_leaves(partial: str) -> set[str]:
  """Leaf paths Orbax committed in earlier partial saves under `partial`: each call renames a
  complete snapshot into a `*.pending_*` directory whose state/_METADATA lists its leaves (the
  file Orbax's own `finalize` merges). Anything else there is an unfinished call's leftover and
  is removed; an unreadable pending directory discards them all (the conversion starts over)."""
  done: set[str] = set()
  if not os.path.isdir(partial):
    return done
  for entry in sorted(os.listdir(partial)):
    full = os.path.join(partial, entry)
    try:
      if ".pending" not in entry:
        raise ValueError("not a committed save")
      with open(os.path.join(full, "state", "_METADATA")) as f:
        keys = json.load(f)["tree_metadata"]
      done.update(".".join(ast.literal_eval(k)) for k in keys)
    except (OSError, ValueError, KeyError, SyntaxError, TypeError):
      if ".pending" in entry:
        log.warning("%s: unreadable; converting from the start", full)
        shutil.rmtree(partial)
        return set()
      log.info("removing %s, left by an interrupted write", full)
      shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)
  return done


class TreeWriter:
  """Writes the parameter tree of `dst` leaf group by leaf group; resumable.

  job: the conversion's arguments (JSON-able); a staging directory left by an interrupted run
  with the same job is resumed (`done` lists the leaves it already holds), one with another job
  is discarded. Raises FileExistsError if `dst` exists and not `overwrite`, ConversionBusy if a live process
  is writing `dst`.
  """

  def __init__(self, dst: str | os.PathLike, job: Mapping[str, Any], *, overwrite: bool = False):
    self.dst = os.path.abspath(os.fspath(dst))
    if os.path.lexists(self.dst) and not overwrite:
      raise FileExistsError(f"{self.dst} already exists (pass --overwrite / overwrite=True to "
                            f"replace it)")
    self.tmp = staging_dir(self.dst)
    self.job = json.loads(json.dumps(dict(job)))
    self.resumed = False
    if os.path.isdir(self.tmp):
      self._check_not_busy()
      if self._read_job() == self.job and not os.path.isdir(os.path.join(self.tmp, PARAMS)):
        self.resumed = True
      else:
        log.info("%s: left by a conversion with other arguments; starting over", self.tmp)
        shutil.rmtree(self.tmp)
    elif os.path.lexists(self.tmp):
      os.remove(self.tmp)
    os.makedirs(self.tmp, exist_ok=True)
    with open(os.path.join(self.tmp, _PID), "w") as f:
      f.write(str(os.getpid()))
    if not self.resumed:
      with open(os.path.join(self.tmp, _JOB), "w") as f:
        json.dump(self.job, f, indent=1)
    self.done = frozenset(_committed_leaves(os.path.join(self.tmp, _PARTIAL)))
    self._params = os.path.join(self.tmp, PARAMS)
    self._pending: list = []
    self._ctx = _context()

  def _read_job(self):
    try:
      with open(os.path.join(self.tmp, _JOB)) as f:
        return json.load(f)
    except (OSError, ValueError):
      return None

  def _check_not_busy(self):
    try:
      with open(os.path.join(self.tmp, _PID)) as f:
        pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
      return
    if pid and _alive(pid):
      raise ConversionBusy(f"{self.tmp} is being written by process {pid}; wait for it or stop it")

  def write(self, leaves: Mapping[str, np.ndarray]) -> None:
    """Queues a partial save of `leaves` ({tree path: array}); paths already committed are
    skipped. Waits for the previous save first (partial saves of one checkpoint must not
    overlap)."""
    todo = {k: v for k, v in leaves.items() if k not in self.done}
    if not todo:
      return
    from orbax.checkpoint.experimental.v1 import partial
    self.flush()
    with self._ctx:
      self._pending.append(partial.save_async(self._params, nest(todo)))

  def flush(self) -> None:
    while self._pending:
      self._pending.pop(0).result()

  def finish(self, manifest: Mapping[str, Any], files: Mapping[str, bytes | str] = {}) -> str:
    """Waits for the writes, finalizes the tree, writes `files` ({name: content}) and the
    manifest, renames the staging directory to dst; returns dst."""
    from orbax.checkpoint.experimental.v1 import partial
    self.flush()
    if not os.path.isdir(os.path.join(self.tmp, _PARTIAL)):
      raise ValueError(f"{self.dst}: nothing was written")
    with self._ctx:
      partial.finalize(self._params)
    for name, content in files.items():
      mode = "wb" if isinstance(content, bytes) else "w"
      with open(os.path.join(self.tmp, name), mode) as f:
        f.write(content)
    for name in (_JOB, _PID):
      os.remove(os.path.join(self.tmp, name))
    with open(os.path.join(self.tmp, MANIFEST), "w") as f:
      json.dump({"format": FORMAT, "version": VERSION, **manifest}, f, indent=1)
    old = None
    if os.path.lexists(self.dst):  # overwrite: move the old one aside only now
      old = os.path.join(os.path.dirname(self.dst), f".{os.path.basename(self.dst)}.old-{os.getpid()}")
      os.rename(self.dst, old)
    os.rename(self.tmp, self.dst)
    if old is not None:
      shutil.rmtree(old) if os.path.isdir(old) and not os.path.islink(old) else os.remove(old)
    return self.dst

  def stop(self) -> None:
    """After a failure: lets the saves in flight finish (they stay committed for a resume)."""
    for f in self._pending:
      try:
        f.result()
      except Exception:  # noqa: BLE001 - the original error is what the caller reports
        pass
    self._pending.clear()
    try:
      os.remove(os.path.join(self.tmp, _PID))
    except OSError:
      pass
