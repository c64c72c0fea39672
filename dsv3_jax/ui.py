"""How the CLI talks while it works: status lines and progress, per `--quiet` / `--log-format`.

`configure(args)` (called by `dsv3_jax.cli.main`) resolves the mode once per command:
  * "rich": live tqdm bars on stderr (the default when stderr is a terminal);
  * "plain": no bars or carriage returns; a progress line every 10 s and at the end (the default
    when stderr is not a terminal: logs, CI, pipes);
  * quiet: neither status lines nor progress (results and errors only).
The mode is kept on this module (set per `dsv3` invocation; library code never reads it).
"""
from __future__ import annotations

import sys
import time

__all__ = ["configure", "status", "progress", "iterate", "mode", "progress_enabled"]

_mode = {"format": "rich" if sys.stderr.isatty() else "plain", "quiet": False}


def configure(args) -> None:
  """Reads --quiet / --log-format from the parsed args (absent flags: the defaults)."""
  fmt = getattr(args, "log_format", "auto")
  _mode["format"] = fmt if fmt in ("plain", "rich") else ("rich" if sys.stderr.isatty() else "plain")
  _mode["quiet"] = bool(getattr(args, "quiet", False))


def mode() -> str:
  """'quiet', 'plain' or 'rich'."""
  return "quiet" if _mode["quiet"] else _mode["format"]


def progress_enabled() -> bool:
  """Whether live progress bars should be drawn (rich mode)."""
  return mode() == "rich"


def status(msg: str) -> None:
  """A status line on stderr ('loading ...', 'compiling ...'); nothing when quiet."""
  if not _mode["quiet"]:
    print(msg, file=sys.stderr, flush=True)


class _PlainProgress:
  """tqdm's update/set_postfix/close subset, printing a line at most every `every_s` seconds
  (and at the end), no carriage returns: for logs and pipes."""

  every_s = 10.0

  def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0):
    self.total, self.desc, self.unit, self.n = total, desc, unit, initial
    self.postfix = ""
    self.t0 = self.last = time.perf_counter()

  def update(self, k: int = 1) -> None:
    self.n += k
    now = time.perf_counter()
    if now - self.last >= self.every_s or (self.total and self.n >= self.total):
      self.last = now
      of = f"/{self.total}" if self.total else ""
      print(f"{self.desc}: {self.n}{of} {self.unit}s ({time.perf_counter() - self.t0:.1f} s)"
            + (f" {self.postfix}" if self.postfix else ""), file=sys.stderr, flush=True)

  def set_postfix(self, d: dict | None = None, **kw) -> None:
    self.postfix = " ".join(f"{k}={v}" for k, v in {**(d or {}), **kw}.items())

  def close(self) -> None:
    pass


class _NoProgress(_PlainProgress):
  def update(self, k: int = 1) -> None:
    self.n += k


def progress(total: int | None, desc: str, unit: str = "it", initial: int = 0, disable: bool = False):
  """A progress object with tqdm's update/set_postfix/close: a tqdm bar (rich), plain lines, or
  nothing (quiet, or `disable`)."""
  if disable or mode() == "quiet":
    return _NoProgress(total, desc, unit, initial)
  if mode() == "plain":
    return _PlainProgress(total, desc, unit, initial)
  from tqdm import tqdm
  return tqdm(total=total, initial=initial, desc=desc, unit=unit)


def iterate(items, total: int | None, desc: str, unit: str = "it"):
  """Yields `items`, reporting progress as `progress` does."""
  bar = progress(total, desc, unit)
  try:
    for x in items:
      yield x
      bar.update(1)
  finally:
    bar.close()
