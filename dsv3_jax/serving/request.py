"""A serving request's host-side state and settings (`Request`, `RequestParams`) and the errors
the engine raises for requests (`RequestError`, `EngineClosed`). No jax here: the engine
(`engine.py`) owns the pages, slots and compiled steps; the HTTP layer (`api.py`) builds
`RequestParams` from a request body."""
from __future__ import annotations

import dataclasses
import threading
from typing import Callable

from dsv3_jax.errors import UserError

__all__ = ["EngineClosed", "Request", "RequestError", "RequestParams"]


class RequestError(ValueError, UserError):
  """A request the engine cannot serve (bad sampling parameter, prompt too long, ...): the
  message names the field."""


class EngineClosed(RuntimeError):
  """The engine stopped admitting requests (shutting down)."""


@dataclasses.dataclass(frozen=True)
class RequestParams:
  """Per-request generation settings. temperature 0 = greedy; top_k 0 / top_p 1 = off; seed:
  the sampling seed (None: drawn per request); stop_ids: ids that end the request (emitted);
  stop: strings that end it (checked on the decoded text; needs the engine's tokenizer);
  ignore_eos: do not stop at the model's EOS ids."""

  max_tokens: int = 16
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  seed: int | None = None
  stop_ids: tuple[int, ...] = ()
  stop: tuple[str, ...] = ()
  ignore_eos: bool = False

  def check(self) -> None:
    """RequestError naming the first bad field."""
    if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
      raise RequestError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
    if not self.temperature >= 0:
      raise RequestError(f"temperature must be >= 0, got {self.temperature!r}")
    if not 0.0 < self.top_p <= 1.0:
      raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
    if self.top_k < 0:
      raise RequestError(f"top_k must be >= 0 (0 = off), got {self.top_k!r}")


@dataclasses.dataclass(eq=False)
class Request:
  """One request's host-side state. `on_event(request, new_ids, finished)` is called from the
  engine's thread after every step that emitted tokens or finished it. finish_reason: "stop"
  (EOS / stop id / stop string), "length" (max_tokens), "cancelled", "abort" (engine stopped;
  `error` says why)."""

  id: int
  prompt: list[int]
  params: RequestParams
  on_event: Callable | None = None
  output: list[int] = dataclasses.field(default_factory=list)
  pages: list[int] = dataclasses.field(default_factory=list)
  slot: int = -1
  shard: int = 0          # the pool shard holding its pages (its rows: that shard's row block)
  prefilled: int = 0      # prompt tokens already in the cache
  admitted_step: int = 0  # the engine step that gave it pages
  draft: int = 0          # speculative: the MTP draft for the token after output[-1]
  finish_reason: str | None = None
  error: str | None = None
  cancelled: bool = False
  t_submit: float = 0.0
  t_first: float | None = None
  t_done: float | None = None
  drafted: int = 0
  accepted: int = 0
  done_event: threading.Event = dataclasses.field(default_factory=threading.Event)

  @property
  def finished(self) -> bool:
    return self.finish_reason is not None

  @property
  def length(self) -> int:
    """Cache rows holding this request's context (prompt prefilled, then every emitted token
    but the newest, which is fed at the next step)."""
    return self.prefilled + max(len(self.output) - 1, 0)
