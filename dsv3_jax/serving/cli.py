"""`dsv3 serve`: an OpenAI-compatible HTTP server with continuous batching over a paged latent
cache (see `dsv3_jax.serving.engine` and `.server`).

The flags shared with `dsv3 generate` (--checkpoint, --tokenizer, --dtype, --fp8, --kernels,
--speculative, --mesh and the multi-host flags) mean the same. Binds 127.0.0.1 unless --host
says otherwise; --api-key (or DSV3_API_KEY) requires a bearer token on every route but /health.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from dsv3_jax.errors import UserError

__all__ = ["add_arguments", "run"]


def _buckets(spec: str) -> tuple[int, ...]:
  try:
    out = tuple(sorted(int(x) for x in spec.split(",") if x.strip()))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {spec!r}") from None
  if not out or out[0] < 1:
    raise argparse.ArgumentTypeError(f"bucket sizes must be >= 1, got {spec!r}")
  return out


def add_arguments(p: argparse.ArgumentParser) -> None:
  from dsv3_jax.inference.cli import add_model_arguments
  add_model_arguments(p)
  p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
  p.add_argument("--port", type=int, default=8000, help="TCP port")
  p.add_argument("--api-key", default=os.environ.get("DSV3_API_KEY"),
                 help="require 'Authorization: Bearer KEY' (default: $DSV3_API_KEY; none: open)")
  p.add_argument("--served-model-name", help="the model name clients send (default: the "
                                             "checkpoint directory's name)")
  p.add_argument("--max-batch", type=int, default=8, help="most requests in flight at once")
  p.add_argument("--page-size", type=int, default=None,
                 help="latent-cache rows per page (default: 128 on TPU, which keeps the rope "
                      "pages lane-aligned so no call copies the pool; 16 elsewhere)")
  p.add_argument("--num-pages", type=int, default=512, help="pages in the latent-cache pool")
  p.add_argument("--prefill-chunk", type=int, default=64,
                 help="prompt tokens per prefill row (prompts are prefilled in rows between "
                      "decode steps, at most the largest --prefill-buckets rows per step)")
  p.add_argument("--decode-steps", type=int, default=4,
                 help="decode steps per device call (fewer host round trips; streams arrive in "
                      "groups of this many tokens; 1 with --speculative)")
  p.add_argument("--max-context", type=int, help="most tokens per request, prompt + output "
                                                 "(default: max_position_embeddings)")
  p.add_argument("--batch-buckets", type=_buckets, help="compiled batch sizes, e.g. 1,4,8 "
                                                        "(default: powers of two to --max-batch)")
  p.add_argument("--prefill-buckets", type=_buckets,
                 help="compiled row counts of prefill calls (default: --batch-buckets)")
  p.add_argument("--page-buckets", type=_buckets,
                 help="compiled block-table widths in pages (default: powers of two)")
  p.add_argument("--warmup", action="store_true",
                 help="compile every batch/page bucket before listening")
  p.add_argument("--shutdown-grace", type=float, default=30.0,
                 help="seconds in-flight requests get to finish after SIGTERM")


def run(args: argparse.Namespace) -> int:
  try:
    import fastapi  # noqa: F401
    import prometheus_client  # noqa: F401
    import uvicorn  # noqa: F401
  except ImportError as e:
    raise UserError(f"dsv3 serve needs {e.name} (pip install fastapi uvicorn prometheus-client)"
                    ) from None
  from dsv3_jax import ui
  from dsv3_jax.inference.cli import load_model
  from dsv3_jax.serving.engine import Engine
  from dsv3_jax.serving.server import build_app, serve

  if not 0 < args.port < 65536:
    raise UserError(f"--port must be in 1..65535, got {args.port}")
  model, tokenizer, mesh = load_model(args)
  if args.page_size is None:
    import jax
    args.page_size = 128 if jax.default_backend() == "tpu" else 16
  eos = args.eos_id
  if eos is None and tokenizer is not None and tokenizer.eos_token_id is not None:
    eos = tokenizer.eos_token_id
  engine = Engine(model, max_batch=args.max_batch, page_size=args.page_size,
                  num_pages=args.num_pages, prefill_chunk=args.prefill_chunk,
                  max_context=args.max_context, speculative=args.speculative,
                  eos_token_id=eos, tokenizer=tokenizer, mesh=mesh,
                  batch_buckets=args.batch_buckets, page_buckets=args.page_buckets,
                  decode_steps=args.decode_steps, prefill_buckets=args.prefill_buckets)
  if args.warmup:
    ui.status("compiling every batch/page bucket ...")
    t = time.perf_counter()
    engine.warmup()
    ui.status(f"compiled {engine.compile_count} programs in {time.perf_counter() - t:.1f} s")
  name = args.served_model_name or os.path.basename(os.path.normpath(args.checkpoint))
  app = build_app(engine, model_name=name, tokenizer=tokenizer, api_key=args.api_key)

  def ready():
    print(f"dsv3 serve: serving {name!r} on http://{args.host}:{args.port} "
          f"(max batch {args.max_batch}, {args.num_pages} pages of {args.page_size})",
          file=sys.stderr, flush=True)

  return serve(engine, app, host=args.host, port=args.port, grace=args.shutdown_grace,
               on_ready=ready)
