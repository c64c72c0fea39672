"""The one exception type for mistakes a user can fix (a bad flag, file, config field, tensor).

Raise `UserError` (or a subclass) with a one-line message naming the culprit; the `dsv3`
command prints that line and exits non-zero without a traceback (unless `--debug`). Anything
else escaping a command is a bug in dsv3 and keeps its traceback."""
from __future__ import annotations


class UserError(Exception):
  """A user-fixable error; `str(err)` is the whole message shown (one line, names the culprit)."""
