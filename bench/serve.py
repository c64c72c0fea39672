"""Continuous batching (`dsv3_jax.serving.Engine`) against static batches (`Generator`) on the
same request mix, and a loopback load test of `dsv3 serve`.

  python bench/serve.py [--requests 256] [--max-batch 16] [--rates 0,20,50] [--repeats 3]
  python bench/serve.py --load [--clients 64 --load-requests 512]

Throughput part (in-process, no HTTP): requests with prompt lengths uniform in [8, 64] and output
lengths geometric (mean --mean-output, capped at --max-output; EOS off, so each request makes
exactly its length). Static: the requests in arrival order, --max-batch at a time, each batch
generating its longest request's length (what `dsv3 generate` does: the batch waits for its
longest member). Continuous: every request submitted at its arrival time (Poisson at each
offered rate in requests/s; 0 = all at once) to a running engine with the same max batch.
Reported: useful tokens per second, time to first token and inter-token latency p50/p99. At
saturation the two modes alternate --repeats times (the host is shared: its load drifts) and
each reports its median run.
Both run the same model, float32, compile excluded (both warm up first).

Load part: starts `dsv3 serve` on a tiny checkpoint in a subprocess and sends --load-requests
completions from --clients concurrent clients over loopback; checks that every request
completes exactly once with its token count and that the pool is empty afterwards.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def request_mix(n: int, mean_output: float, max_output: int, vocab: int, seed: int = 0):
  rng = np.random.RandomState(seed)
  prompts = [rng.randint(2, vocab, size=rng.randint(8, 65)).tolist() for _ in range(n)]
  outputs = np.minimum(rng.geometric(1.0 / mean_output, size=n), max_output).tolist()
  return prompts, outputs


def pct(xs, q):
  return float(np.percentile(np.asarray(xs), q)) if len(xs) else float("nan")


def run_static(gen, prompts, outputs, max_batch):
  t0 = time.perf_counter()
  tokens = 0
  ttft, itl = [], []
  for i in range(0, len(prompts), max_batch):
    ps, ns = prompts[i:i + max_batch], outputs[i:i + max_batch]
    t = time.perf_counter()
    res = gen.run(ps, max_new_tokens=max(ns), eos_token_id=())
    end = time.perf_counter()
    tokens += sum(ns)
    for _ in ns:  # every request of a batch arrived at t0 and gets its tokens at the end
      ttft.append(t - t0 + res.prefill_seconds)
    itl.append(res.decode_seconds / max(res.steps, 1))
    del end
  wall = time.perf_counter() - t0
  return dict(tokens_per_s=tokens / wall, wall=wall, ttft=ttft, itl=itl)


def run_continuous(engine, prompts, outputs, rate: float, seed: int = 0):
  from dsv3_jax.serving import RequestParams
  rng = np.random.RandomState(seed)
  gaps = rng.exponential(1.0 / rate, size=len(prompts)) if rate > 0 else np.zeros(len(prompts))
  arrivals = np.cumsum(gaps)
  stamps = {}

  def on_event(req, new, finished):
    if new:
      stamps.setdefault(req.id, []).extend([time.perf_counter()] * len(new))

  engine.start()
  t0 = time.perf_counter()
  reqs = []
  for p, n, a in zip(prompts, outputs, arrivals):
    delay = t0 + a - time.perf_counter()
    if delay > 0:
      time.sleep(delay)
    reqs.append(engine.submit(p, RequestParams(max_tokens=int(n), temperature=0.0), on_event))
  for r in reqs:
    r.done_event.wait()
  wall = time.perf_counter() - t0
  engine.stop_loop()
  assert all(len(r.output) == n for r, n in zip(reqs, outputs))
  assert engine.pages_used == 0
  ttft = [stamps[r.id][0] - r.t_submit for r in reqs]
  itl = [b - a for r in reqs for a, b in zip(stamps[r.id], stamps[r.id][1:]) if b > a]
  return dict(tokens_per_s=sum(outputs) / wall, wall=wall, ttft=ttft, itl=itl)


def throughput(args) -> str:
  import jax
  import dsv3_jax
  from dsv3_jax.inference.generate import Generator
  from dsv3_jax.serving import Engine
  from dsv3_jax.sharding import make_mesh
  from tests.cli_helpers import tiny_model
  cfg = dsv3_jax.TINY.replace(num_hidden_layers=args.layers)
  model = tiny_model(0, cfg)
  mesh = make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
  prompts, outputs = request_mix(args.requests, args.mean_output, args.max_output,
                                 cfg.vocab_size)
  gen = Generator(model, mesh=mesh)
  # Warm up the static path on every (prompt bucket, max_new) it will meet.
  for i in range(0, len(prompts), args.max_batch):
    ps, ns = prompts[i:i + args.max_batch], outputs[i:i + args.max_batch]
    gen.run(ps, max_new_tokens=max(ns), eos_token_id=())
  engine = Engine(model, max_batch=args.max_batch, page_size=16, num_pages=args.max_batch * 16,
                  prefill_chunk=args.prefill_chunk, max_context=256, eos_token_id=(), mesh=mesh,
                  batch_buckets=(args.max_batch,), page_buckets=(4, 8, 16),
                  prefill_buckets=args.prefill_buckets, decode_steps=args.decode_steps)
  engine.warmup()
  # Saturation (all requests at t=0): static and continuous alternate --repeats times on this
  # shared host; each mode reports its median run (by tokens/s).
  runs = {"static": [], "continuous": []}
  for _ in range(args.repeats):
    runs["static"].append(run_static(gen, prompts, outputs, args.max_batch))
    runs["continuous"].append(run_continuous(engine, prompts, outputs, 0.0))
  median = {k: sorted(v, key=lambda r: r["tokens_per_s"])[len(v) // 2] for k, v in runs.items()}
  static = median["static"]
  tps = lambda rs: ", ".join(f"{r['tokens_per_s']:.0f}" for r in rs)  # noqa: E731
  paired = np.median([c["tokens_per_s"] / s["tokens_per_s"]
                      for s, c in zip(runs["static"], runs["continuous"])])
  rows = [("static generate", "all at t=0", static),
          ("continuous", "all at t=0", median["continuous"])]
  for rate in args.rates:
    if rate > 0:
      rows.append(("continuous", f"{rate:g} req/s", run_continuous(engine, prompts, outputs, rate)))
  lines = [f"{len(prompts)} requests, prompts 8-64 tokens, outputs geometric (mean "
           f"{args.mean_output:g}, cap {args.max_output}; {sum(outputs)} tokens), max batch "
           f"{args.max_batch}, decode steps per call {args.decode_steps}, prefill rows of "
           f"{args.prefill_chunk} tokens (row buckets "
           f"{','.join(map(str, engine.prefill_buckets))}), model TINY with "
           f"{args.layers} layers, float32, saturation rows: median of {args.repeats} "
           f"alternating runs per mode (tokens/s of each: static "
           f"{tps(runs['static'])}; continuous "
           f"{tps(runs['continuous'])}; median of the paired ratios {paired:.2f}x), "
           f"{jax.devices()[0].platform}, jax {jax.__version__}",
           "",
           "| mode | offered load | tokens/s | vs static | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) |",
           "|---|---|---|---|---|---|"]
  base = static["tokens_per_s"]
  for name, load, r in rows:
    lines.append(f"| {name} | {load} | {r['tokens_per_s']:.0f} | "
                 f"{r['tokens_per_s'] / base:.2f}x | {pct(r['ttft'], 50):.2f} / "
                 f"{pct(r['ttft'], 99):.2f} | {1e3 * pct(r['itl'], 50):.1f} / "
                 f"{1e3 * pct(r['itl'], 99):.1f} |")
  return "\n".join(lines)


async def _load_clients(url, key, n_requests, clients, seed=0):
  import openai
  rng = np.random.RandomState(seed)
  prompts = [rng.randint(2, 256, size=rng.randint(3, 41)).tolist() for _ in range(32)]
  jobs = [(i % 32, int(rng.randint(1, 33))) for i in range(n_requests)]
  client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=600)
  sem = asyncio.Semaphore(clients)

  async def one(job):
    async with sem:
      r = await client.completions.create(model="ckpt", prompt=prompts[job[0]],
                                          max_tokens=job[1], temperature=0,
                                          extra_body={"ignore_eos": True})
      return r.id, r.choices[0].model_dump()["token_ids"]

  t = time.perf_counter()
  results = await asyncio.gather(*(one(j) for j in jobs))
  return jobs, results, time.perf_counter() - t


def load(args) -> str:
  import urllib.request
  from tests.cli_helpers import tiny_model, write_checkpoint
  from tests.utils import FAST_COMPILE_FLAGS, ROOT, free_port
  tmp = tempfile.mkdtemp()
  path = write_checkpoint(tiny_model(0), os.path.join(tmp, "ckpt"), shards=False)
  port, key = free_port(), "bench"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE_FLAGS)
  proc = subprocess.Popen(
      [sys.executable, "-m", "dsv3_jax.cli", "serve", "--checkpoint", path, "--dtype", "float32",
       "--port", str(port), "--api-key", key, "--max-batch", str(args.max_batch),
       "--batch-buckets", str(args.max_batch), "--page-size", "32", "--num-pages", "256",
       "--page-buckets", "16", "--warmup"],
      cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
  ready = threading.Event()
  threading.Thread(target=lambda: [ready.set() for line in proc.stderr
                                   if "dsv3 serve: serving" in line], daemon=True).start()
  try:
    if not ready.wait(600):
      raise RuntimeError("the server did not start")
    url = f"http://127.0.0.1:{port}"
    jobs, results, wall = asyncio.run(_load_clients(url, key, args.load_requests, args.clients))
    assert len({rid for rid, _ in results}) == len(jobs), "duplicated or lost responses"
    longest = {}
    for (p, n), (_, ids) in zip(jobs, results):
      assert len(ids) == n, (p, n, len(ids))
      longest[p] = max(longest.get(p, []), ids, key=len)
    assert all(longest[p][:n] == ids for (p, n), (_, ids) in zip(jobs, results))
    req = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {key}"})
    text = urllib.request.urlopen(req).read().decode()
    used = next(float(l.split()[-1]) for l in text.splitlines()
                if l.startswith("dsv3_cache_pages_used "))
    assert used == 0, f"{used} pages still used"
    tokens = sum(n for _, n in jobs)
    return (f"load: {len(jobs)} requests from {args.clients} concurrent clients over loopback, "
            f"all completed once, pages all free: {wall:.1f} s, {len(jobs) / wall:.1f} req/s, "
            f"{tokens / wall:.0f} tokens/s (max batch {args.max_batch})")
  finally:
    proc.terminate()
    proc.wait(60)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--requests", type=int, default=128)
  p.add_argument("--max-batch", type=int, default=16)
  p.add_argument("--mean-output", type=float, default=24.0)
  p.add_argument("--max-output", type=int, default=128)
  p.add_argument("--layers", type=int, default=2)
  p.add_argument("--decode-steps", type=int, default=4, help="engine decode steps per call")
  p.add_argument("--prefill-chunk", type=int, default=16, help="engine prompt tokens per row")
  p.add_argument("--prefill-buckets", type=lambda s: [int(x) for x in s.split(",")],
                 default=[4, 8, 16], help="engine prefill calls' compiled row counts")
  p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[0.0],
                 help="offered loads in requests/s for extra continuous rows (0: the "
                      "saturation rows, always run)")
  p.add_argument("--repeats", type=int, default=5,
                 help="alternating static / continuous runs at saturation (median reported)")
  p.add_argument("--load", action="store_true", help="run the HTTP load test instead")
  p.add_argument("--clients", type=int, default=64)
  p.add_argument("--load-requests", type=int, default=512)
  args = p.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  print(load(args) if args.load else throughput(args))


if __name__ == "__main__":
  main()
