"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over a running `Engine`.

Routes: POST /v1/completions, POST /v1/chat/completions (both stream by server-sent events
with "stream": true), GET /v1/models, GET /health (no auth), GET /metrics (Prometheus text).
With an API key every route but /health needs `Authorization: Bearer KEY` (401 otherwise).
Client mistakes are 400s with OpenAI's error body (`api.ApiError`); a client that disconnects
mid-request cancels it (its pages go back to the pool). `serve` runs uvicorn and handles
SIGTERM: stop admitting (503 for new requests), let in-flight requests finish for `grace`
seconds, abort the rest with an error, exit 0.
"""
from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dsv3_jax.serving.api import (ApiError, TextStream, chat_body, chat_chunk, completion_body,
                                  completion_chunk, error_body, new_id, parse_chat,
                                  parse_completion)
from dsv3_jax.serving.engine import Engine, EngineClosed, RequestError

__all__ = ["build_app", "Metrics", "serve"]


class Metrics:
  """Prometheus metrics of one engine (own registry): gauges dsv3_cache_pages_used / _free,
  dsv3_queue_length, dsv3_running_requests, dsv3_tokens_per_second (since the previous scrape),
  dsv3_mtp_acceptance_rate; counters of generated tokens and requests; histograms
  dsv3_time_to_first_token_seconds and dsv3_inter_token_latency_seconds."""

  def __init__(self, engine: Engine):
    import prometheus_client as pc
    self.engine, self.pc = engine, pc
    r = self.registry = pc.CollectorRegistry()
    g = lambda name, doc: pc.Gauge(name, doc, registry=r)  # noqa: E731
    self.pages_used = g("dsv3_cache_pages_used", "latent-cache pages held by requests")
    self.pages_free = g("dsv3_cache_pages_free", "latent-cache pages free")
    self.queue = g("dsv3_queue_length", "requests waiting for a batch slot or pages")
    self.running = g("dsv3_running_requests", "requests being prefilled or decoded")
    self.tps = g("dsv3_tokens_per_second", "generated tokens per second since the last scrape")
    self.acceptance = g("dsv3_mtp_acceptance_rate", "accepted / drafted MTP tokens")
    self.tokens = pc.Counter("dsv3_generated_tokens", "generated tokens", registry=r)
    self.requests = pc.Counter("dsv3_requests", "finished requests", ["finish_reason"],
                               registry=r)
    buckets = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)
    self.ttft = pc.Histogram("dsv3_time_to_first_token_seconds", "time to first token",
                             buckets=buckets, registry=r)
    self.itl = pc.Histogram("dsv3_inter_token_latency_seconds", "time between tokens",
                            buckets=buckets, registry=r)
    self._last = (time.perf_counter(), 0)

  def on_tokens(self, req, n: int, now: float, prev: float | None) -> None:
    self.tokens.inc(n)
    if prev is None:
      self.ttft.observe(now - req.t_submit)
    else:
      for _ in range(n):
        self.itl.observe((now - prev) / n)

  def render(self) -> bytes:
    s = self.engine.stats()
    self.pages_used.set(s["pages_used"])
    self.pages_free.set(s["pages_free"])
    self.queue.set(s["queued"])
    self.running.set(s["running"])
    self.acceptance.set(s["accepted"] / s["drafted"] if s["drafted"] else 0.0)
    now, total = time.perf_counter(), s["generated_tokens"]
    t0, n0 = self._last
    self.tps.set((total - n0) / max(now - t0, 1e-9))
    self._last = (now, total)
    return self.pc.generate_latest(self.registry)


def build_app(engine: Engine, *, model_name: str, tokenizer=None, api_key: str | None = None):
  """The FastAPI app serving `engine` (whose loop must be running: `engine.start()`)."""
  app = FastAPI(title="dsv3 serve")
  metrics = Metrics(engine)
  app.state.metrics, app.state.engine = metrics, engine

  def err(e: ApiError) -> JSONResponse:
    return JSONResponse(error_body(e.message, type=e.type, param=e.param, code=e.code),
                        status_code=e.status)

  @app.middleware("http")
  async def auth(request: Request, call_next):
    if api_key and request.url.path != "/health":
      if request.headers.get("authorization", "") != f"Bearer {api_key}":
        return err(ApiError("missing or wrong API key (Authorization: Bearer KEY)",
                            status=401, type="authentication_error", code="invalid_api_key"))
    return await call_next(request)

  @app.exception_handler(ApiError)
  async def api_error(request, e: ApiError):
    return err(e)

  @app.exception_handler(RequestValidationError)
  async def validation_error(request, e: RequestValidationError):
    return err(ApiError(f"invalid request: {e.errors()[:1]}"))

  @app.get("/health")
  async def health():
    return {"status": "shutting_down" if engine.closed else "ok"}

  @app.get("/metrics")
  async def prometheus():
    return Response(metrics.render(), media_type="text/plain; version=0.0.4")

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                        "owned_by": "dsv3-jax"}]}

  async def body_of(request: Request):
    try:
      return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ApiError(f"the request body is not valid JSON ({e})") from None

  def submit(ids, params, loop, q: asyncio.Queue, index: int):
    last = [None]

    def on_event(req, new, finished):
      now = time.perf_counter()
      if new:
        metrics.on_tokens(req, len(new), now, last[0])
        last[0] = now
      if finished:
        metrics.requests.labels(req.finish_reason).inc()
      loop.call_soon_threadsafe(q.put_nowait, (index, new, finished))

    try:
      return engine.submit(ids, params, on_event)
    except RequestError as e:
      raise ApiError(str(e), param="prompt" if "prompt" in str(e) else None) from None
    except EngineClosed as e:
      raise ApiError(str(e), status=503, type="server_error", code="shutting_down") from None

  def start(ids_list, params):
    loop, q = asyncio.get_running_loop(), asyncio.Queue()
    for ids in ids_list:  # every prompt is checked before any is queued
      try:
        engine.check_request(ids, params)
      except RequestError as e:
        raise ApiError(str(e), param="prompt" if "prompt" in str(e) else None) from None
    reqs = []
    try:
      for i, ids in enumerate(ids_list):
        reqs.append(submit(ids, params, loop, q, i))
    except ApiError:
      for r in reqs:
        engine.cancel(r)
      raise
    return reqs, q

  async def events(request: Request, reqs, q: asyncio.Queue):
    """Yields (index, new ids, finished) until every request finished; cancels them all if the
    client goes away."""
    left = len(reqs)
    try:
      while left:
        try:
          item = await asyncio.wait_for(q.get(), timeout=0.5)
        except asyncio.TimeoutError:
          if await request.is_disconnected():
            return
          continue
        left -= item[2]
        yield item
    finally:
      for r in reqs:
        if not r.finished:
          engine.cancel(r)

  def abort_error(reqs) -> ApiError | None:
    bad = next((r for r in reqs if r.finish_reason == "abort"), None)
    if bad is None:
      return None
    return ApiError(f"request aborted: {bad.error}", status=503, type="server_error",
                    code="aborted")

  def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"

  @app.post("/v1/completions")
  async def completions(request: Request):
    model, ids_list, params, stream = parse_completion(
        await body_of(request), served=model_name, tokenizer=tokenizer,
        max_context=engine.max_context)
    reqs, q = start(ids_list, params)
    rid = new_id("cmpl")
    texts = [TextStream(tokenizer, params.stop) for _ in reqs]
    if not stream:
      async for i, new, _ in events(request, reqs, q):
        texts[i].ids.extend(new)
      e = abort_error(reqs)
      if e is not None:
        raise e
      choices = [{"text": t.text(), "token_ids": r.output, "finish_reason": _reason(r)}
                 for t, r in zip(texts, reqs)]
      return completion_body(rid, model, choices, sum(len(x) for x in ids_list))

    async def gen():
      async for i, new, finished in events(request, reqs, q):
        if new:
          yield sse(completion_chunk(rid, model, i, texts[i].push(new), new, None))
        if finished:
          if reqs[i].finish_reason == "abort":
            e = abort_error([reqs[i]])
            yield sse(error_body(e.message, type=e.type, code=e.code))
            continue
          yield sse(completion_chunk(rid, model, i, texts[i].final(), [], _reason(reqs[i])))
      yield "data: [DONE]\n\n"

    return StreamingResponse(gen(), media_type="text/event-stream")

  @app.post("/v1/chat/completions")
  async def chat(request: Request):
    model, ids, params, stream = parse_chat(await body_of(request), served=model_name,
                                            tokenizer=tokenizer, max_context=engine.max_context)
    reqs, q = start([ids], params)
    rid, text = new_id("chatcmpl"), TextStream(tokenizer, params.stop)
    if not stream:
      async for _, new, _ in events(request, reqs, q):
        text.ids.extend(new)
      e = abort_error(reqs)
      if e is not None:
        raise e
      return chat_body(rid, model, text.text(), reqs[0].output, _reason(reqs[0]), len(ids))

    async def gen():
      yield sse(chat_chunk(rid, model, {"role": "assistant", "content": ""}, [], None))
      async for _, new, finished in events(request, reqs, q):
        if new:
          yield sse(chat_chunk(rid, model, {"content": text.push(new)}, new, None))
        if finished:
          e = abort_error(reqs)
          if e is not None:
            yield sse(error_body(e.message, type=e.type, code=e.code))
          else:
            yield sse(chat_chunk(rid, model, {"content": text.final()}, [], _reason(reqs[0])))
      yield "data: [DONE]\n\n"

    return StreamingResponse(gen(), media_type="text/event-stream")

  return app


def _reason(req) -> str:
  return "stop" if req.finish_reason == "stop" else "length" \
      if req.finish_reason == "length" else req.finish_reason or "stop"


def serve(engine: Engine, app, *, host: str = "127.0.0.1", port: int = 8000,
          grace: float = 30.0, on_ready=None) -> int:
  """Runs `app` under uvicorn until SIGTERM / Ctrl-C: then no new requests (503), in-flight
  ones get `grace` seconds to finish before they are aborted with an error; returns 0."""
  import uvicorn

  class Server(uvicorn.Server):
    def handle_exit(self, sig, frame):
      if not engine.closed:
        engine.close(abort=False)
        timer = threading.Timer(grace, lambda: engine.close(
            abort=True, reason=f"the server is shutting down (grace period {grace:g} s over)"))
        timer.daemon = True
        timer.start()
      super().handle_exit(sig, frame)
      if sig == signal.SIGTERM and hasattr(self, "_captured_signals"):
        # uvicorn re-raises captured signals after shutting down; SIGTERM is a clean exit (0).
        self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    async def startup(self, sockets=None):
      await super().startup(sockets)
      if on_ready is not None and self.started:
        on_ready()

  config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                          timeout_graceful_shutdown=grace + 5)
  engine.start()
  try:
    Server(config).run()
  finally:
    engine.close(abort=True)
    engine.stop_loop(timeout=10)
  return 0
