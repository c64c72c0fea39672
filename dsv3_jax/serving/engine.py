"""Continuous batching over a paged latent cache (no HTTP here: `server.py` drives this).

Requests join the running batch at any engine step and leave when done. Each `Engine.step`:
  1. applies cancellations and admits queued requests (FIFO) while a batch slot is free and the
     page pool holds the pages the request can ever need (prompt + max_tokens rows, reserved at
     admission: a running request never runs out of pages, and when the pool is full new
     requests wait in the queue);
  2. runs one prefill call (when due: see `prefill_min`) over the requests still being
     prefilled: their prompts cut into rows of `prefill_chunk` tokens, at most the largest
     prefill bucket of rows per step (each request gets its next row in turn, then its
     following ones while rows are left), so a long prompt takes several steps and never
     stalls the running requests, and a step's prefill costs about the prompt tokens it
     holds, not max batch x chunk;
  3. runs `decode_steps` decode steps in one device call (or one MTP-speculative step) for
     every request past its prefill (including those whose prefill ended in this step); the
     host cuts each request at its stop condition.
Prefill chunks and decode steps are the model's own `decode_forward` (absorbed MLA over the
cache, causal among a chunk's tokens) with block tables: the latent cache is a pool of
fixed-size pages, latent [L, pages, page, C] / rope [L, pages, R, page] (the layout of
`inference.cache`, positions paged), and each request owns a list of pages. Several rows of one
prompt may share a prefill call: each layer writes every row's latents into the pool before any
row attends, so a row sees the earlier rows' positions as if earlier calls had written them.
Pool page 0 is a scratch page no request owns: padding rows of a step write there. On a mesh
whose batch shards can each hold a full-context request, the pool is split over them
(`steps.pool_layout`): each device holds its shard's pages (the first its scratch page), a
request takes its pages from one shard and its rows of every step lie in that shard's row
block, so no device holds the pool.

Compiled shapes are fixed per bucket: the rows of a step are padded to a batch bucket and the
block tables to a page-count bucket (powers of two by default), so serving never compiles after
each bucket was met once (`Engine.warmup` compiles them all up front; `compile_count` counts).
The host keeps all request state (`request.Request`: token lists, stop conditions, page
tables); a step returns the sampled ids only.

Einsum letters: see `steps.py`.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import threading
import time
import traceback
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dsv3_jax.errors import UserError
from dsv3_jax.inference.generate import Generator
from dsv3_jax.jit_cache import CompiledCache, sharding_key
from dsv3_jax.serving import steps
from dsv3_jax.serving.request import EngineClosed, Request, RequestError, RequestParams
from dsv3_jax.sharding import resolve_mesh, use_rules

# The request types live in `request.py`; they stay importable from here.
__all__ = ["Engine", "RequestParams", "Request", "RequestError", "EngineClosed"]


# Programs shared by engines on the same model structure, mesh, shardings and compiler options
# (an engine also keeps its own, so serving never evicts and recompiles).
COMPILED = CompiledCache(64)


def _pow2_buckets(maximum: int, minimum: int = 1) -> tuple[int, ...]:
  out, b = [], max(1, minimum)
  while b < maximum:
    out.append(b)
    b *= 2
  return tuple(out) + (maximum,)


def _bucket(n: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if b >= n:
      return b
  raise AssertionError(f"{n} exceeds the largest bucket {buckets[-1]}")


class Engine:
  """A continuous-batching engine on one model and one mesh.

  model: a DeepseekV3 (speculative needs an MTP layer). max_batch: most requests in flight
  (prefilling or decoding). page_size: cache rows per page. num_pages: pages in the pool (the
  scratch page is extra). prefill_chunk: prompt tokens per prefill row (a step prefills at most
  prefill_buckets[-1] rows). max_context: most
  rows per request (default: max_position_embeddings). speculative: MTP self-speculative
  decoding (1 or 2 tokens per request per step). eos_token_id: id(s) that end a request (default:
  the config's). tokenizer: needed for stop strings only. mesh / rules / cache_dtype /
  compiler_options: as for `inference.Generator` (whose weight placement and absorbed weights
  the engine reuses). batch_buckets / page_buckets: the compiled batch sizes and block-table
  widths (default: powers of two up to max_batch and to the pages of max_context);
  prefill_buckets: the compiled row counts of prefill calls (default: batch_buckets).
  decode_steps: plain decode steps per engine step (one device call, one host round trip; a
  request that stops mid-way wastes the rest of its steps; 1 with speculative decoding).
  prefill_min / prefill_wait: while requests decode, a step runs its prefill call only when
  prefill_min requests wait for prefill (default: max_batch // 4, at least 1) or one was
  admitted prefill_wait steps ago (a call's fixed cost is shared by more prompts; TTFT grows
  by at most prefill_wait steps); an idle batch prefills at once.
  rules default to `steps.serving_rules(mesh)`. split_pool: split the page pool over the
  batch's mesh axes (`steps.pool_sharding`: each device holds its own requests' pages, not the
  whole pool; num_pages is then rounded up to a multiple of the shards and a request's pages
  come from one shard); None (default): split when there are several batch shards and each
  shard can still hold a full-context request.
  """

  def __init__(self, model, *, max_batch: int = 8, page_size: int = 16, num_pages: int = 256,
               prefill_chunk: int = 64, max_context: int | None = None,
               speculative: bool = False, eos_token_id=None, tokenizer=None, mesh=None,
               rules=None, cache_dtype=None, compiler_options: dict | None = None,
               batch_buckets: Sequence[int] | None = None,
               page_buckets: Sequence[int] | None = None, decode_steps: int = 4,
               prefill_buckets: Sequence[int] | None = None, prefill_min: int | None = None,
               prefill_wait: int = 2, split_pool: bool | None = None):
    cfg = model.config
    for name, v in (("max_batch", max_batch), ("page_size", page_size), ("num_pages", num_pages),
                    ("prefill_chunk", prefill_chunk), ("decode_steps", decode_steps)):
      if v < 1:
        raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if speculative and cfg.num_nextn_predict_layers < 1:
      raise UserError("--speculative needs an MTP layer: the model has num_nextn_predict_layers=0")
    mesh = resolve_mesh(mesh)
    rules = rules if rules is not None else steps.serving_rules(mesh)
    self.gen = Generator(model, cache_dtype=cache_dtype, compiler_options=compiler_options,
                         mesh=mesh, rules=rules)
    self.config, self.mesh = cfg, self.gen.mesh
    self.max_batch, self.page_size, self.num_pages = max_batch, page_size, num_pages
    self.prefill_chunk, self.speculative, self.tokenizer = prefill_chunk, speculative, tokenizer
    self.decode_steps = 1 if speculative else decode_steps
    self.prefill_min = max(1, max_batch // 4) if prefill_min is None else prefill_min
    self.prefill_wait = prefill_wait
    self.max_context = min(max_context or cfg.max_position_embeddings,
                           cfg.max_position_embeddings)
    self.max_pages_per_seq = -(-self.max_context // page_size)
    self.batch_buckets = tuple(sorted(batch_buckets or _pow2_buckets(max_batch)))
    self.page_buckets = tuple(sorted(page_buckets or _pow2_buckets(self.max_pages_per_seq)))
    self.prefill_buckets = tuple(sorted(prefill_buckets or self.batch_buckets))
    if self.prefill_buckets[0] < 1:
      raise UserError(f"--prefill-buckets must be >= 1, got {self.prefill_buckets}")
    if self.batch_buckets[-1] < max_batch or self.page_buckets[-1] < self.max_pages_per_seq:
      raise UserError(f"--batch-buckets / --page-buckets: the largest ({self.batch_buckets[-1]}, "
                      f"{self.page_buckets[-1]}) must cover --max-batch {max_batch} and the "
                      f"{self.max_pages_per_seq} pages of a full context")
    self.layout = lay = steps.pool_layout(steps.batch_shards(self.mesh, self.gen.rules),
                                          num_pages, max_batch, self.max_pages_per_seq,
                                          self.batch_buckets, split_pool)
    self.pool_split, self.shards, self.shard_pages = lay.split, lay.shards, lay.shard_pages
    self.shard_rows, self.row_buckets = lay.shard_rows, lay.row_buckets
    self.num_pages = self.shards * self.shard_pages  # usable (scratch pages not counted)
    # prefill rows per shard (a prefill bucket counts the rows of the whole call)
    self.prefill_row_buckets = tuple(sorted({-(-b // self.shards) for b in self.prefill_buckets}))
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    self.eos_ids = frozenset(() if eos is None else (eos,) if isinstance(eos, int) else eos)
    layers = cfg.num_hidden_layers + (1 if speculative else 0)
    dt = self.gen.cache_dtype
    self._rep = NamedSharding(self.mesh, PartitionSpec())
    put = lambda x: jax.device_put(x, self._rep)  # noqa: E731
    self._pool_sh = steps.pool_sharding(self.mesh, self.gen.rules, self.pool_split)
    pool = lay.pool_pages
    self.latent = jax.device_put(
        jnp.zeros((layers, pool, page_size, cfg.kv_lora_rank), dt), self._pool_sh)
    self.rope = jax.device_put(
        jnp.zeros((layers, pool, cfg.qk_rope_head_dim, page_size), dt), self._pool_sh)
    self.q_buf = put(jnp.zeros((max_batch + 1, cfg.vocab_size if speculative else 0),
                               jnp.float32))
    # Per shard, pop() hands out low pages first; page k * (shard_pages + 1) is scratch.
    self._free_pages = [list(range(k * (self.shard_pages + 1) + self.shard_pages,
                                   k * (self.shard_pages + 1), -1)) for k in range(self.shards)]
    self._free_slots = list(range(max_batch - 1, -1, -1))
    self._compiled: dict = {}
    self.compile_count = 0
    self.compile_seconds = 0.0
    self._lock = threading.Lock()
    self._wake = threading.Condition(self._lock)
    self._incoming: list[Request] = []
    self.queue: list[Request] = []        # admitted to the engine, waiting for pages / a slot
    self.active: list[Request] = []       # holding pages (prefilling or decoding)
    self._ids = itertools.count()
    self.closed = False
    self.steps = 0
    self.generated_tokens = 0
    self.drafted = 0
    self.accepted = 0
    self._thread: threading.Thread | None = None
    self._stop_thread = False

  # ---- requests (any thread) ------------------------------------------------------------

  def check_request(self, prompt: Sequence[int], params: RequestParams) -> None:
    """RequestError when `prompt` / `params` can never be served by this engine."""
    params.check()
    if len(prompt) == 0:
      raise RequestError("prompt is empty: it needs at least one token")
    V = self.config.vocab_size
    if any((not isinstance(t, (int, np.integer))) or t < 0 or t >= V for t in prompt):
      raise RequestError(f"prompt token ids must be integers in [0, {V})")
    if len(prompt) + params.max_tokens > self.max_context:
      raise RequestError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) "
                         f"exceeds the context length {self.max_context}")
    if self.pages_needed(len(prompt), params.max_tokens) > self.shard_pages:
      raise RequestError(f"prompt + max_tokens needs {self.pages_needed(len(prompt), params.max_tokens)} "
                         f"pages of {self.page_size} rows; the pool has {self.shard_pages}"
                         + (" per shard" if self.shards > 1 else ""))
    if params.stop and self.tokenizer is None:
      raise RequestError("stop strings need a tokenizer (this checkpoint has none): use stop ids")

  def pages_needed(self, prompt_len: int, max_tokens: int) -> int:
    """Pages reserved for a request: every row it can write, prompt_len + max_tokens - 1 (a
    speculative step at output length k < max_tokens writes rows up to prompt_len + k)."""
    return -(-(prompt_len + max_tokens) // self.page_size)

  def submit(self, prompt: Sequence[int], params: RequestParams = RequestParams(),
             on_event: Callable | None = None) -> Request:
    """Queues a request (thread-safe); RequestError if it can never be served, EngineClosed
    after `close`. Returns its Request (wait on `request.done_event`, or use `on_event`)."""
    prompt = [int(t) if isinstance(t, (int, np.integer)) else t for t in prompt]
    self.check_request(prompt, params)
    if params.seed is None:
      params = dataclasses.replace(params, seed=int(np.random.randint(0, 2**31 - 1)))
    with self._wake:
      if self.closed:
        raise EngineClosed("the server is shutting down and admits no new requests")
      req = Request(next(self._ids), prompt, params, on_event, t_submit=time.perf_counter())
      self._incoming.append(req)
      self._wake.notify_all()
    return req

  def cancel(self, req: Request) -> None:
    """Ends `req` at the next step (finish_reason "cancelled") and frees its pages."""
    with self._wake:
      req.cancelled = True
      self._wake.notify_all()

  def close(self, *, abort: bool = True, reason: str = "the server is shutting down") -> None:
    """Stops admitting requests. abort: in-flight and queued requests end at the next step with
    finish_reason "abort" and `reason` as their error; else they run to completion."""
    with self._wake:
      self.closed = True
      if abort:
        for r in self._incoming + self.queue + self.active:
          r.error = reason
          r.cancelled = True
      self._wake.notify_all()

  @property
  def pages_used(self) -> int:
    return self.num_pages - sum(map(len, self._free_pages))

  @property
  def idle(self) -> bool:
    with self._lock:
      return not (self._incoming or self.queue or self.active)

  def stats(self) -> dict:
    """A snapshot for metrics: pages used/free, queued, running, totals."""
    with self._lock:
      queued = len(self._incoming) + len(self.queue)
    return dict(pages_used=self.pages_used, pages_free=sum(map(len, self._free_pages)),
                queued=queued, running=len(self.active), steps=self.steps,
                generated_tokens=self.generated_tokens, drafted=self.drafted,
                accepted=self.accepted, compile_count=self.compile_count)

  # ---- the loop ---------------------------------------------------------------------------

  def start(self) -> None:
    """Runs `step` on a background thread until `stop_loop` (sleeps while idle)."""
    if self._thread is not None:
      return
    self._stop_thread = False
    self._thread = threading.Thread(target=self._loop, name="dsv3-engine", daemon=True)
    self._thread.start()

  def stop_loop(self, timeout: float | None = None) -> None:
    with self._wake:
      self._stop_thread = True
      self._wake.notify_all()
    if self._thread is not None:
      self._thread.join(timeout)
      self._thread = None

  def _loop(self) -> None:
    while True:
      with self._wake:
        while not (self._stop_thread or self._incoming or self.queue or self.active):
          self._wake.wait()
        if self._stop_thread:
          return
      try:
        self.step()
      except Exception as e:  # a failed step must not leave clients waiting forever
        traceback.print_exc()
        self._fail_all(f"engine step failed: {type(e).__name__}: {e}")

  def _fail_all(self, message: str) -> None:
    """Ends every queued and running request with finish_reason "abort" and `message`."""
    with self._lock:
      self.queue.extend(self._incoming)
      self._incoming.clear()
      reqs = self.queue + self.active
    for r in reqs:
      r.error = message
      self._finish(r, "abort")
    for name in ("latent", "rope", "q_buf"):  # donated to a step that failed: start afresh
      buf = getattr(self, name)
      if buf.is_deleted():
        sh = self._rep if name == "q_buf" else self._pool_sh
        setattr(self, name, jax.device_put(jnp.zeros(buf.shape, buf.dtype), sh))

  def run_until_idle(self, max_steps: int = 1_000_000) -> None:
    """Steps on the calling thread until nothing is queued or running."""
    for _ in range(max_steps):
      if self.idle:
        return
      self.step()
    raise RuntimeError(f"engine still busy after {max_steps} steps")

  def step(self) -> None:
    """One engine iteration: cancellations, admission, one prefill call (a chunk of each
    prefilling request), one decode call (`decode_steps` steps of each decoding request, those
    whose prefill just ended included: a slot never idles for a step)."""
    with self._lock:
      self.queue.extend(self._incoming)
      self._incoming.clear()
      gone = [r for r in self.queue + self.active if r.cancelled]
    for r in gone:
      self._finish(r, "abort" if r.error else "cancelled")
    self._admit()
    prefilling = [r for r in self.active if r.prefilled < len(r.prompt)]
    busy = any(r.prefilled == len(r.prompt) and not r.finished for r in self.active)
    if prefilling and (not busy or len(prefilling) >= self.prefill_min or
                       min(r.admitted_step for r in prefilling) + self.prefill_wait <= self.steps):
      self._prefill(prefilling)
    decoding = [r for r in self.active if r.prefilled == len(r.prompt) and not r.finished]
    if decoding:
      self._decode(decoding)
    self.steps += 1

  def _admit(self) -> None:
    while self.queue and self._free_slots:
      r = self.queue[0]
      need = self.pages_needed(len(r.prompt), r.params.max_tokens)
      rows = [0] * self.shards
      for a in self.active:
        rows[a.shard] += 1
      fit = [k for k in range(self.shards)
             if need <= len(self._free_pages[k]) and rows[k] < self.shard_rows]
      if not fit:
        return  # FIFO: wait for pages to come back
      self.queue.pop(0)
      r.shard = max(fit, key=lambda k: (len(self._free_pages[k]), -k))
      r.pages = [self._free_pages[r.shard].pop() for _ in range(need)]
      r.slot, r.admitted_step = self._free_slots.pop(), self.steps
      self.active.append(r)

  def _finish(self, r: Request, reason: str) -> None:
    if r.finished:
      return
    r.finish_reason, r.t_done = reason, time.perf_counter()
    # The caller hears of the end (the server counts it in its metrics) before the pages and the
    # slot are freed: a metrics scrape that shows them free also shows the request finished.
    # They are freed even if the callback raises (e.g. a server's event loop already closed).
    try:
      if r.on_event is not None:
        r.on_event(r, [], True)
    finally:
      with self._lock:
        if r in self.queue:
          self.queue.remove(r)
      if r in self.active:
        self.active.remove(r)
        self._free_pages[r.shard].extend(reversed(r.pages))
        self._free_slots.append(r.slot)
      r.pages = []
      r.done_event.set()

  def _emit(self, r: Request, ids: list[int]) -> None:
    """Appends sampled ids to r (stopping at EOS / stop ids / max_tokens / stop strings)."""
    if r.t_first is None:
      r.t_first = time.perf_counter()
    new, reason = [], None
    for t in ids:
      new.append(int(t))
      r.output.append(int(t))
      if (t in self.eos_ids and not r.params.ignore_eos) or t in r.params.stop_ids:
        reason = "stop"
      elif len(r.output) >= r.params.max_tokens:
        reason = "length"
      if reason:
        break
    if reason is None and r.params.stop:
      text = self.tokenizer.decode(r.output)
      if any(s in text for s in r.params.stop):
        reason = "stop"
    self.generated_tokens += len(new)
    if r.on_event is not None and new:
      r.on_event(r, new, False)
    if reason:
      self._finish(r, reason)

  # ---- compiled steps --------------------------------------------------------------------

  def _compiled_fn(self, kind: str, fn, args):
    key = (kind,) + tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(args[2:]))
    compiled = self._compiled.get(key)
    if compiled is not None:
      return compiled
    g = self.gen
    shared_key = (key, g.graphdef, self.mesh, g.rules, sharding_key(g.state_shardings),
                  tuple(sorted(g.compiler_options.items())))
    compiled = COMPILED.get(shared_key)
    if compiled is not None:
      self._compiled[key] = compiled
    else:
      pools = (self._pool_sh, self._pool_sh) + ((self._rep,) if kind.startswith("spec") else ())
      jitted = steps.jit_step(fn, g.graphdef, g.state_shardings, g.absorbed_shardings, pools,
                              self._rep, len(args) - 2 - len(pools), pool_split=self.pool_split)
      t = time.perf_counter()
      with jax.set_mesh(self.mesh), use_rules(g.rules):
        compiled = jitted.lower(*args).compile(compiler_options=g.compiler_options or None)
      self.compile_seconds += time.perf_counter() - t
      self.compile_count += 1
      self._compiled[key] = compiled
      COMPILED.put(shared_key, compiled)
    return compiled

  def _rows(self, reqs: list[Request], ends: list[int], buckets: Sequence[int] | None = None):
    """Bucketed per-row arrays (one row per entry of reqs; a request may fill several): block
    tables [B, P] covering rows < ends[i] (a chunk's padding past them writes to the scratch
    page), sampling, slots (padding rows: scratch), and the row of each entry. B = shards x a
    bucket of `buckets` (per-shard row counts; default: the decode row buckets); shard k's
    entries lie in row block k."""
    counts = [0] * self.shards
    rows = []
    for r in reqs:
      rows.append(counts[r.shard])
      counts[r.shard] += 1
    b = _bucket(max(counts), buckets or self.row_buckets)
    rows = [r.shard * b + i for r, i in zip(reqs, rows)]
    B = b * self.shards
    P = _bucket(max(-(-e // self.page_size) for e in ends), self.page_buckets)
    tables = np.zeros((B, P), np.int32)
    temp, top_p = np.zeros(B, np.float32), np.ones(B, np.float32)
    top_k, seed, counter = np.zeros(B, np.int32), np.zeros(B, np.uint32), np.zeros(B, np.int32)
    slots = np.full(B, self.max_batch, np.int32)
    for i, r in zip(rows, reqs):
      n = min(len(r.pages), P)
      tables[i, :n] = r.pages[:n]
      p = r.params
      temp[i], top_p[i], top_k[i], seed[i] = p.temperature, p.top_p, p.top_k, p.seed
      counter[i], slots[i] = len(r.output), r.slot
    return B, tables, steps.RowSampling(temp, top_k, top_p, seed, counter), slots, rows

  def _prefill_rows(self, reqs: list[Request]) -> list[tuple[Request, int, int]]:
    """The rows of this step's prefill call, (request, first, end) prompt positions: each
    request's next chunk of `prefill_chunk` tokens in turn, then their following chunks while
    its shard has rows left in the largest prefill bucket."""
    T, budget = self.prefill_chunk, self.prefill_row_buckets[-1]
    rows, at, used = [], {id(r): r.prefilled for r in reqs}, [0] * self.shards
    added = True
    while added:
      added = False
      for r in reqs:
        pos = at[id(r)]
        if pos < len(r.prompt) and used[r.shard] < budget:
          end = min(pos + T, len(r.prompt))
          rows.append((r, pos, end))
          at[id(r)], added = end, True
          used[r.shard] += 1
    return rows

  def _prefill(self, reqs: list[Request]) -> None:
    T = self.prefill_chunk
    entries = self._prefill_rows(reqs)
    B, tables, sampling, slots, rows = self._rows(
        [r for r, _, _ in entries], [e for _, _, e in entries], self.prefill_row_buckets)
    tokens, nxt = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    start, pick, final = np.zeros(B, np.int32), np.zeros(B, np.int32), np.zeros(B, bool)
    for i, (r, pos, end) in zip(rows, entries):
      tokens[i, :end - pos] = r.prompt[pos:end]
      after = r.prompt[pos + 1:pos + T + 1]
      nxt[i, :len(after)] = after
      start[i], pick[i] = pos, end - pos - 1
      final[i] = end == len(r.prompt)
      if not final[i]:
        slots[i] = self.max_batch  # only a request's last row stores its draft distribution
    if self.speculative:
      args = (self.gen.state, self.gen.absorbed, self.latent, self.rope, self.q_buf, tokens, nxt,
              start, tables, pick, slots, final, sampling)
      fn = self._compiled_fn("spec_prefill", steps.speculative_prefill_step, args)
      self.latent, self.rope, self.q_buf, first, draft = fn(*args)
      draft = np.asarray(draft)
    else:
      args = (self.gen.state, self.gen.absorbed, self.latent, self.rope, tokens, start, tables,
              pick, sampling)
      fn = self._compiled_fn("prefill", steps.forward_step, args)
      self.latent, self.rope, first = fn(*args)
    first = np.asarray(first)
    for i, (r, pos, end) in zip(rows, entries):
      r.prefilled = max(r.prefilled, end)
      if final[i]:
        if self.speculative:
          r.draft = int(draft[i])
        self._emit(r, [int(first[i])])

  def _decode(self, reqs: list[Request]) -> None:
    T = 2 if self.speculative else self.decode_steps
    starts = [r.length for r in reqs]
    # Rows past a request's reserved pages (steps after its max_tokens) go to the scratch page.
    B, tables, sampling, slots, rows = self._rows(
        reqs, [min(s + T, len(r.pages) * self.page_size) for s, r in zip(starts, reqs)])
    last, start, draft = np.zeros(B, np.int32), np.zeros(B, np.int32), np.zeros(B, np.int32)
    for i, s, r in zip(rows, starts, reqs):
      last[i], start[i], draft[i] = r.output[-1], s, r.draft
    if not self.speculative:
      args = (self.gen.state, self.gen.absorbed, self.latent, self.rope, last, start, tables,
              sampling)
      fn = self._compiled_fn(f"decode{T}", functools.partial(steps.decode_steps, steps=T), args)
      self.latent, self.rope, tok = fn(*args)
      tok = np.asarray(tok)
      for i, r in zip(rows, reqs):
        self._emit(r, tok[i].tolist())
      return
    args = (self.gen.state, self.gen.absorbed, self.latent, self.rope, self.q_buf, last, draft,
            start, tables, slots, sampling)
    fn = self._compiled_fn("spec_decode", steps.speculative_decode_step, args)
    self.latent, self.rope, self.q_buf, first, bonus, accept, nxt = fn(*args)
    first, bonus, accept, nxt = map(np.asarray, (first, bonus, accept, nxt))
    for i, r in zip(rows, reqs):
      r.drafted += 1
      self.drafted += 1
      ok = bool(accept[i])
      r.accepted += ok
      self.accepted += ok
      r.draft = int(nxt[i])
      self._emit(r, [int(first[i]), int(bonus[i])] if ok else [int(first[i])])

  def warmup(self) -> None:
    """Compiles the prefill-chunk and decode programs of every (batch bucket, page bucket) and
    (prefill bucket, page bucket) up front by running them on padding rows (which touch only
    the scratch page), so no request waits for a compile."""
    saved = self.page_buckets
    fake = lambda b: [Request(-1, [0], RequestParams(seed=0), slot=self.max_batch, output=[0],
                              shard=i // b) for i in range(b * self.shards)]  # noqa: E731
    try:
      for P in saved:
        self.page_buckets = (P,)
        for b in self.row_buckets:
          self._decode(fake(b))
        for b in self.prefill_row_buckets:
          reqs = fake(b)
          for r in reqs:
            r.output = []
          self._prefill(reqs)
    finally:
      self.page_buckets = saved
      self.generated_tokens = self.drafted = self.accepted = 0
