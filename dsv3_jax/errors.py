"""The one exception type for mistakes a user can fix (a bad flag, file, config field, tensor).

Raise `UserError` (or a subclass) with a one-line message naming the culprit; the `dsv3`
command prints that line and exits with status 2 without a traceback (unless `--debug`).
Filesystem errors (`OSError`: a missing path, a read-only destination, a full disk) are shown
the same way, naming the path (`describe_os_error`). Anything else escaping a command is a bug in
dsv3 and keeps its traceback.

The specific error classes of the package (`CheckpointError`, `SafetensorsError`, `PlanError`,
`MemoryBudgetError`, `ConfigError`, ...) subclass both `UserError` and their historical base
(`ValueError`), so `except ValueError` in existing code keeps working.
"""
from __future__ import annotations

import errno
import os
import re

__all__ = ["UserError", "ConfigError", "describe_os_error", "check_free_space", "as_os_error"]


class UserError(Exception):
  """A user-fixable error; `str(err)` is the whole message shown (one line, names the culprit)."""


class ConfigError(UserError, ValueError):
  """A model config (config.json, a preset, a ModelConfig field) is missing, malformed or invalid;
  the message names the file and the field."""


def describe_os_error(e: OSError) -> str:
  """One line for a filesystem error, naming the path: 'PATH: reason' (plus a hint for the
  common cases: full disk, read-only file system, permission)."""
  reason = e.strerror or str(e) or type(e).__name__
  where = e.filename if e.filename is not None else None
  if where is None:  # an OSError raised with a message only (e.g. FileNotFoundError("no x at y"))
    msg = str(e) or reason
  else:
    msg = f"{os.fspath(where)}: {reason}"
    if e.filename2 is not None:
      msg += f" (-> {os.fspath(e.filename2)})"
  hint = {errno.ENOSPC: "free some space or choose another destination",
          errno.EROFS: "choose a writable destination",
          errno.EACCES: "check the permissions or choose another destination"}.get(e.errno)
  return f"{msg}; {hint}" if hint else msg


_OS_CODE = re.compile(r"os_error_code='(\d+)'")
_PATH = re.compile(r'"(/[^"]+)"')


def as_os_error(e: BaseException) -> OSError | None:
  """The filesystem error inside a library exception, or None. Orbax writes through tensorstore,
  which reports a full disk or a read-only file system as a ValueError whose message carries
  `[os_error_code='28']` and the quoted file path; that becomes OSError(errno, reason, path)."""
  if isinstance(e, OSError):
    return e
  msg = str(e)
  m = _OS_CODE.search(msg)
  if not isinstance(e, (ValueError, RuntimeError)) or m is None:
    return None
  code = int(m.group(1))
  paths = _PATH.findall(msg[:m.start()])
  return OSError(code, os.strerror(code), paths[-1] if paths else None)


def check_free_space(directory: str | os.PathLike, need_bytes: int, what: str) -> None:
  """Raises UserError (one line) when the file system holding `directory` (or its nearest
  existing parent) has less than `need_bytes` free. `what` names the output (e.g. "--out DST")."""
  d = os.path.abspath(os.fspath(directory))
  while not os.path.exists(d) and os.path.dirname(d) != d:
    d = os.path.dirname(d)
  try:
    st = os.statvfs(d)
  except (OSError, AttributeError):  # not a POSIX file system: nothing to check
    return
  free = st.f_bavail * st.f_frsize
  if need_bytes > free:
    raise UserError(f"{what}: needs about {_gib(need_bytes)} but {d} has {_gib(free)} free; "
                    f"free some space or choose another destination")


def _gib(n: int) -> str:
  return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"
