"""`dsv3 serve` in a subprocess on a tiny float32 checkpoint, driven by the official `openai`
client and raw HTTP: greedy completions of concurrent requests equal the offline `Generator`
(the oracle, one device, same weights); streaming equals non-streaming (completions and chat);
every bad input is a 400 with OpenAI's error body; the API key guards every route but /health;
a client that drops a stream frees its pages (/metrics back to 0 used); SIGTERM aborts in-flight
requests with an error and exits 0."""
import concurrent.futures
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import openai
import pytest

from dsv3_jax.inference.generate import Generator
from dsv3_jax.sharding import make_mesh
from tests.cli_helpers import CFG, tiny_model, write_checkpoint, write_word_tokenizer
from tests.utils import FAST_COMPILE, FAST_COMPILE_FLAGS, ROOT, free_port

KEY = "test-key"
CHAT = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant {% endif %}")
LENS, MAX_NEW = (3, 21, 40, 9), (6, 11, 4, 15)
LOAD = 512


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  """(base url, process, model) of a running server; the model is the checkpoint's."""
  model = tiny_model(0)
  path = write_checkpoint(model, str(tmp_path_factory.mktemp("serve") / "ckpt"), shards=False)
  write_word_tokenizer(path, CFG.vocab_size, chat_template=CHAT)
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE_FLAGS)
  proc = subprocess.Popen(
      [sys.executable, "-m", "dsv3_jax.cli", "serve", "--checkpoint", path, "--dtype", "float32",
       "--port", str(port), "--api-key", KEY, "--max-batch", "8", "--page-size", "32",
       "--num-pages", "64", "--batch-buckets", "8", "--page-buckets", "16",
       "--prefill-chunk", "16", "--warmup", "--shutdown-grace", "0"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  log = []
  ready = threading.Event()

  def pump():
    for line in proc.stdout:
      log.append(line)
      if "dsv3 serve: serving" in line:
        ready.set()

  threading.Thread(target=pump, daemon=True).start()
  yield f"http://127.0.0.1:{port}", proc, model, ready, log
  if proc.poll() is None:
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def url(server):
  base, proc, _, ready, log = server
  if not ready.wait(240) or proc.poll() is not None:
    raise AssertionError("server did not start:\n" + "".join(log))
  return base


@pytest.fixture
def client(url):
  """A fresh client per test, retries off. Fresh: a module-wide one would carry pooled
  keep-alive connections across tests, and the first request after an idle gap longer than
  uvicorn's keep-alive timeout (5 s; here the `offline` fixture's compile after the load test)
  can race the server closing that connection: "Connection reset by peer", which the official
  client retries by default but `max_retries=0` turns into a failure."""
  with openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60) as c:
    yield c


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.RandomState(1)
  return [rng.randint(2, 256, size=n).tolist() for n in LENS]


@pytest.fixture(scope="module")
def offline(server, prompts):
  """Greedy continuations on one device from the static-batch Generator (no EOS)."""
  mesh = make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
  gen = Generator(server[2], compiler_options=FAST_COMPILE, mesh=mesh)
  return gen.run(prompts, max_new_tokens=max(MAX_NEW), eos_token_id=()).tokens


def request(url, method, path, body=None, key=KEY):
  """(status, body text) of one HTTP request (stdlib client: raw bytes, any status)."""
  host, port = url.removeprefix("http://").split(":")
  conn = http.client.HTTPConnection(host, int(port), timeout=60)
  headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"}
                                                    if key else {})
  conn.request(method, path, body=body, headers=headers)
  r = conn.getresponse()
  out = r.status, r.read().decode()
  conn.close()
  return out


def open_stream(url, body):
  """An open streaming completion: (connection, response); read lines with readline()."""
  host, port = url.removeprefix("http://").split(":")
  conn = http.client.HTTPConnection(host, int(port), timeout=60)
  conn.request("POST", "/v1/completions", body=json.dumps(body),
               headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
  r = conn.getresponse()
  assert r.status == 200
  while not r.readline().startswith(b"data:"):
    pass
  return conn, r


def metric(url, name):
  text = request(url, "GET", "/metrics")[1]
  return float(next(l.split()[-1] for l in text.splitlines() if l.startswith(name + " ")))


def test_concurrent_greedy_equals_offline(offline, client, prompts):
  def one(i):
    r = client.completions.create(model="ckpt", prompt=prompts[i], max_tokens=MAX_NEW[i],
                                  temperature=0, extra_body={"ignore_eos": True})
    return r.choices[0].model_dump()

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    got = list(pool.map(one, range(len(prompts))))
  for i, c in enumerate(got):
    assert c["token_ids"] == offline[i][:MAX_NEW[i]], f"prompt {i}"
    assert c["finish_reason"] == "length"
    assert c["text"] == " ".join(f"w{t}" for t in c["token_ids"] if t > 1)


def test_streaming_equals_non_streaming(client):
  kw = dict(model="ckpt", prompt="w5 w6 w7 w8", max_tokens=12, temperature=0,
            extra_body={"ignore_eos": True})
  full = client.completions.create(**kw).choices[0].model_dump()
  chunks = [c.choices[0].model_dump() for c in client.completions.create(stream=True, **kw)]
  assert "".join(c["text"] for c in chunks) == full["text"]
  assert sum((c["token_ids"] for c in chunks), []) == full["token_ids"]
  assert chunks[-1]["finish_reason"] == full["finish_reason"] == "length"
  msgs = [{"role": "user", "content": "w9 w10"}]
  chat = client.chat.completions.create(model="ckpt", messages=msgs, max_tokens=8, temperature=0)
  parts = client.chat.completions.create(model="ckpt", messages=msgs, max_tokens=8,
                                         temperature=0, stream=True)
  text = "".join(p.choices[0].delta.content or "" for p in parts)
  assert text == chat.choices[0].message.content and text
  assert chat.usage.prompt_tokens == 4  # "user w9 w10 assistant": the template writes no BOS
  models = client.models.list()
  assert [m.id for m in models.data] == ["ckpt"]


BAD = [
    (b"{not json", "JSON"),
    (b'["a list"]', "object"),
    (b'{"model": "ckpt", "prompt": [5], "max_tokens": "3"}', "max_tokens"),
    (b'{"model": "ckpt", "prompt": [5], "max_tokens": 0}', "max_tokens"),
    (b'{"model": "ckpt", "prompt": [5], "temperature": -0.5}', "temperature"),
    (b'{"model": "ckpt", "prompt": [5], "temperature": "hot"}', "temperature"),
    (b'{"model": "ckpt", "prompt": [5], "top_p": 0}', "top_p"),
    (b'{"model": "ckpt", "prompt": [5], "stream": "yes"}', "stream"),
    (b'{"model": "ckpt", "prompt": [5, "x"]}', "prompt"),
    (b'{"model": "ckpt", "prompt": [5, 9999]}', "prompt"),
    (b'{"model": "ckpt", "prompt": []}', "prompt"),
    (b'{"model": "ckpt"}', "prompt"),
    (b'{"model": "ckpt", "prompt": [5], "n": 2}', "n"),
    (b'{"model": "nope", "prompt": [5]}', "model"),
    (b'{"model": "ckpt", "prompt": [5], "stop": 3}', "stop"),
    (b'{"model": "ckpt", "prompt": ' + str([5] * 600).encode() + b'}', "context"),
    (b'{"model": "ckpt", "prompt": [5], "max_tokens": 100000}', "context"),
]


def test_bad_inputs_are_400(url, client):
  for body, needle in BAD:
    status, text = request(url, "POST", "/v1/completions", body)
    assert status == 400, (body, status, text)
    err = json.loads(text)["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error", (body, err)
  for body in (b'{"model": "ckpt"}', b'{"model": "ckpt", "messages": [{"role": "user"}]}',
               b'{"model": "ckpt", "messages": [{"role": "user", "content": "w3"}], '
               b'"max_tokens": -1}'):
    status, text = request(url, "POST", "/v1/chat/completions", body)
    assert status == 400 and "error" in json.loads(text), (body, text)
  with pytest.raises(openai.BadRequestError, match="does not exist"):
    client.completions.create(model="other", prompt=[5], max_tokens=2)
  assert metric(url, "dsv3_cache_pages_used") == 0


def test_api_key_guards_all_but_health(url):
  assert request(url, "GET", "/health", key=None)[0] == 200
  for path in ("/v1/models", "/metrics"):
    status, text = request(url, "GET", path, key=None)
    assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
  assert request(url, "POST", "/v1/completions", b'{"prompt": [5]}', key="wrong")[0] == 401


def test_dropped_stream_frees_pages(url):
  body = {"model": "ckpt", "prompt": [5, 6, 7], "max_tokens": 450, "temperature": 0,
          "stream": True, "ignore_eos": True}
  conn, _ = open_stream(url, body)
  assert metric(url, "dsv3_cache_pages_used") > 0
  conn.sock.shutdown(2)
  conn.close()
  deadline = time.time() + 20
  while metric(url, "dsv3_cache_pages_used") > 0 and time.time() < deadline:
    time.sleep(0.1)
  assert metric(url, "dsv3_cache_pages_used") == 0
  assert metric(url, "dsv3_running_requests") == 0
  assert metric(url, "dsv3_cache_pages_free") == 64
  assert metric(url, 'dsv3_requests_total{finish_reason="cancelled"}') == 1


@pytest.mark.slow
def test_load_64_clients(url, client):
  """LOAD requests from 64 concurrent clients: 32 prompts (3..40 tokens) each asked several
  times with output lengths 1..12; every request completes exactly once with its max_tokens
  tokens, and the greedy outputs of one prompt are prefixes of each other (no crossed streams).
  (`python bench/serve.py --load` runs the same over AsyncOpenAI with outputs up to 32.)"""
  rng = np.random.RandomState(2)
  prompts = [rng.randint(2, 256, size=rng.randint(3, 41)).tolist() for _ in range(32)]
  jobs = [(i % 32, int(rng.randint(1, 13))) for i in range(LOAD)]

  def one(job):
    p, n = job
    r = client.completions.create(model="ckpt", prompt=prompts[p], max_tokens=n, temperature=0,
                                  extra_body={"ignore_eos": True})
    return r.id, r.choices[0].model_dump()["token_ids"]

  t = time.time()
  with concurrent.futures.ThreadPoolExecutor(64) as pool:
    results = list(pool.map(one, jobs))
  elapsed = time.time() - t
  assert len({rid for rid, _ in results}) == LOAD
  longest = {}
  for (p, n), (_, ids) in zip(jobs, results):
    assert len(ids) == n
    if len(ids) > len(longest.get(p, [])):
      longest[p] = ids
  for (p, n), (_, ids) in zip(jobs, results):
    assert longest[p][:n] == ids, f"prompt {p}"
  assert metric(url, "dsv3_cache_pages_used") == 0 and metric(url, "dsv3_queue_length") == 0
  print(f"{LOAD} requests from 64 clients in {elapsed:.1f} s")


def test_sigterm_aborts_in_flight_and_exits_0(server, url):
  proc = server[1]
  body = {"model": "ckpt", "prompt": [5, 6], "max_tokens": 500, "temperature": 0,
          "stream": True, "ignore_eos": True}
  conn, r = open_stream(url, body)
  proc.send_signal(signal.SIGTERM)
  rest = r.read().decode()
  conn.close()
  assert "shutting down" in rest and rest.rstrip().endswith("[DONE]"), rest[-500:]
  assert proc.wait(timeout=30) == 0
