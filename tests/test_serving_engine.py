"""The continuous-batching engine against the static-batch `Generator` (the oracle, float32):
greedy outputs of requests that arrive at different steps with different prompt lengths (several
prefill rows, several in one call, sharing the batch with others) equal the offline ones token
for token; MTP speculative decoding inside the batch equals plain; a full page pool queues
requests instead of failing and every page comes back; a fixed-seed sampled request draws the
same tokens whatever shares its batch; serving never compiles after the first use of a bucket."""
import numpy as np
import pytest

from dsv3_jax.inference.generate import Generator
from dsv3_jax.serving import Engine, RequestError, RequestParams
from tests.cli_helpers import tiny_model
from tests.utils import FAST_COMPILE

LENS = (5, 23, 40, 9, 17)          # prompt lengths: 1 to 3 prefill chunks of 16
MAX_NEW = (7, 12, 5, 20, 9)        # per-request max_tokens
ARRIVE = (0, 0, 2, 3, 6)           # engine step at which each request arrives


@pytest.fixture(scope="module")
def model():
  return tiny_model(0)


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.RandomState(0)
  return [rng.randint(2, 256, size=n).tolist() for n in LENS]


@pytest.fixture(scope="module")
def offline(model, prompts):
  """Greedy continuations from one static batch (20 tokens each; no EOS)."""
  gen = Generator(model, compiler_options=FAST_COMPILE)
  return gen.run(prompts, max_new_tokens=max(MAX_NEW), eos_token_id=()).tokens


def make_engine(model, **kw):
  kw = dict(max_batch=4, page_size=8, num_pages=6, prefill_chunk=16, max_context=64,
            eos_token_id=(), compiler_options=FAST_COMPILE, batch_buckets=(4,),
            page_buckets=(8,)) | kw
  return Engine(model, **kw)


def serve_staggered(engine, prompts, params):
  """Submits request i at engine step ARRIVE[i], steps until idle; returns the requests and
  the number of steps some request waited in the queue (6 pages of 8 rows: the 40-token prompt
  with 5 new tokens needs all of them)."""
  reqs = [None] * len(prompts)
  step = waited = 0
  while step <= max(ARRIVE) or not engine.idle:
    for i, a in enumerate(ARRIVE):
      if a == step:
        reqs[i] = engine.submit(prompts[i], params[i])
    engine.step()
    assert engine.pages_used <= engine.num_pages
    waited += bool(engine.queue)
    step += 1
  return reqs, waited


def test_greedy_equals_offline_and_no_recompile(model, prompts, offline):
  engine = make_engine(model)
  params = [RequestParams(max_tokens=k, temperature=0.0) for k in MAX_NEW]
  reqs, waited = serve_staggered(engine, prompts, params)
  assert waited > 0  # the pool ran out: requests queued instead of failing
  for i, r in enumerate(reqs):
    assert r.finish_reason == "length"
    assert r.output == offline[i][:MAX_NEW[i]], f"request {i}"
  assert engine.pages_used == 0 and not engine.active
  compiled = engine.compile_count
  assert compiled <= 2  # one prefill-chunk and one decode program for the one bucket
  reqs, _ = serve_staggered(engine, prompts[::-1], params[::-1])  # another mix: no compile
  assert engine.compile_count == compiled
  for i, r in enumerate(reqs):
    j = len(prompts) - 1 - i
    assert r.output == offline[j][:MAX_NEW[j]]


def test_speculative_equals_plain(model, prompts, offline):
  engine = make_engine(model, speculative=True)
  params = [RequestParams(max_tokens=k, temperature=0.0) for k in MAX_NEW]
  reqs, _ = serve_staggered(engine, prompts, params)
  for i, r in enumerate(reqs):
    assert r.output == offline[i][:MAX_NEW[i]], f"request {i}"
  assert engine.drafted > 0 and 0 <= engine.accepted <= engine.drafted
  assert engine.pages_used == 0


def test_prefill_rows_share_the_step(model):
  """A step's prefill rows (4 of 16 tokens here): each prompt's next chunk in turn, then the
  following chunks of the longer ones while rows are left; the rest waits for the next step."""
  from dsv3_jax.serving.engine import Request
  engine = make_engine(model)
  a, b = Request(0, [3] * 60, RequestParams()), Request(1, [3] * 5, RequestParams())
  rows = [(r.id, s, e) for r, s, e in engine._prefill_rows([a, b])]
  assert rows == [(0, 0, 16), (1, 0, 5), (0, 16, 32), (0, 32, 48)]
  a.prefilled = 48
  assert [(r.id, s, e) for r, s, e in engine._prefill_rows([a])] == [(0, 48, 60)]


def test_requests_that_never_fit(model):
  engine = make_engine(model)
  with pytest.raises(RequestError, match="pages"):
    engine.submit([5] * 42, RequestParams(max_tokens=8))  # 50 rows: 7 pages of the 6
  with pytest.raises(RequestError, match="context"):
    engine.submit([5] * 60, RequestParams(max_tokens=8))
  with pytest.raises(RequestError, match="temperature"):
    engine.submit([5], RequestParams(temperature=-1.0))
  assert engine.idle


def test_seeded_sampling_ignores_batch_and_cancel_frees(model, prompts):
  engine = make_engine(model)
  p = RequestParams(max_tokens=10, temperature=0.8, top_p=0.9, top_k=50, seed=1234)
  alone = engine.submit(prompts[0], p)
  engine.run_until_idle()
  others = [engine.submit(q, RequestParams(max_tokens=8, temperature=1.0, seed=s))
            for s, q in enumerate(prompts[1:3])]
  engine.step()  # others: prefilled and 4 decode steps (5 of their 8 tokens)
  engine.cancel(others[0])
  crowded = engine.submit(prompts[0], p)  # shares its steps with others[1]
  engine.run_until_idle()
  assert crowded.output == alone.output and len(alone.output) == 10
  assert others[0].finish_reason == "cancelled" and len(others[0].output) < 8
  assert engine.pages_used == 0 and not engine.active


def test_engine_imports_without_http_stack():
  import subprocess
  import sys
  from tests.utils import ROOT
  code = ("import sys; import dsv3_jax.serving.engine; "
          "bad = [m for m in ('fastapi', 'uvicorn', 'starlette', 'prometheus_client') "
          "if m in sys.modules]; assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                 env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})


def test_serve_cli_user_errors(capsys, tmp_path):
  from tests.cli_helpers import assert_user_error, run_cli
  assert_user_error(run_cli(capsys, "serve", "--checkpoint", tmp_path / "nope"), "serve",
                    "--checkpoint", "not a directory")
  assert_user_error(run_cli(capsys, "serve", "--checkpoint", tmp_path, "--port", "0"), "serve",
                    "--port")


@pytest.mark.parametrize("tokens", [3])
def test_paged_attention_kernel_equals_reference(tokens):
  """`paged_attention_steps` through the TPU kernel (interpret mode) per shard of an 8-device
  mesh (queries and block tables split on the batch, the page pools replicated) equals the
  jnp reference gathering the pages; float32, 1e-5."""
  import jax
  import jax.numpy as jnp
  from dsv3_jax.inference.decode import paged_attention_steps
  from dsv3_jax.sharding import ShardingRules, default_mesh, use_rules
  from tests.utils import assert_close
  rng = np.random.RandomState(3)
  L, pages, page, C, R, B, H, P = 2, 20, 8, 32, 8, 8, 4, 4
  latent = jnp.asarray(rng.randn(L, pages, page, C), jnp.float32)
  rope = jnp.asarray(rng.randn(L, pages, R, page), jnp.float32)
  q = jnp.asarray(rng.randn(B, tokens, H, C + R), jnp.float32)
  tables = jnp.asarray(np.stack([rng.permutation(np.arange(1, pages))[:P] for _ in range(B)]),
                       jnp.int32)
  start = rng.randint(0, P * page - tokens, size=B)
  positions = jnp.asarray(start[:, None] + np.arange(tokens)[None, :], jnp.int32)
  kw = dict(block_tables=tables, layer=1)
  want = paged_attention_steps(q, latent, rope, positions, 0.3, backend="reference", **kw)
  with jax.set_mesh(default_mesh()), use_rules(ShardingRules()):
    got = jax.jit(lambda *a: paged_attention_steps(*a, 0.3, backend="interpret",
                                                   platform="tpu", **kw))(
        q, latent, rope, positions)
  assert_close(got, want, atol=1e-5, what="paged decode attention")
