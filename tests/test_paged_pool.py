"""The serving engine's page pool split over the batch shards of a mesh (`serving.steps.
pool_layout` / `pool_sharding`), and the paged cache write.

Oracles: numpy (the rows each token must land in, from the block tables), and the static-batch
`Generator` on the same model (float32 greedy tokens), as in test_serving_engine.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.inference.cache import write_paged_rows
from dsv3_jax.inference.generate import Generator
from dsv3_jax.serving import Engine, RequestParams
from dsv3_jax.serving import steps
from dsv3_jax.sharding import ShardingRules, default_mesh, use_rules
from tests.cli_helpers import tiny_model
from tests.utils import FAST_COMPILE


def expected_pools(latent, rope, layer, c, k_pe, positions, tables, shard_pages):
  """numpy: token t of row b at position p lands in pool page tables[b, p // page] (page 0 past
  the table), row p % page; with shard_pages, the page is taken in row b's shard."""
  latent, rope = np.array(latent), np.array(rope)
  page = latent.shape[2]
  B, T = positions.shape
  for b in range(B):
    for t in range(T):
      p = positions[b, t]
      g = tables[b, p // page] if p // page < tables.shape[1] else 0
      if shard_pages:  # the table's ids are read modulo the shard's pages, in row b's shard
        g = (b // (B // (latent.shape[1] // shard_pages))) * shard_pages + g % shard_pages
      latent[layer, g, p % page] = c[b, t]
      rope[layer, g, :, p % page] = k_pe[b, t]
  return latent, rope


@pytest.mark.parametrize("split", [False, True])
def test_paged_write_tpu_kernel_equals_numpy(split):
  """`write_paged_rows` through the TPU rope-write kernel (interpret mode), a chunk of 5 tokens
  straddling pages of 4 rows and rows past the table (scratch page), replicated or split over
  the 8 devices' batch shards: every row lands where numpy puts it, nothing else changes."""
  rng = np.random.RandomState(0)
  L, page, C, R, B, T, P = 2, 4, 16, 8, 8, 5, 3
  # Every row owns distinct pages (as the engine hands them out); page 0 of a shard is scratch.
  if split:  # row b's pages in shard b (ids as the engine hands them out: global)
    shard_pages = P + 1
    tables = np.stack([b * shard_pages + rng.permutation(np.arange(1, shard_pages))
                       for b in range(B)])
  else:
    shard_pages = B * P + 1
    tables = rng.permutation(np.arange(1, shard_pages)).reshape(B, P)
  pages = 8 * shard_pages if split else shard_pages
  latent = rng.randn(L, pages, page, C).astype(np.float32)
  rope = rng.randn(L, pages, R, page).astype(np.float32)
  c, k_pe = rng.randn(B, T, C).astype(np.float32), rng.randn(B, T, R).astype(np.float32)
  start = np.array([0, 2, 3, 7, 9, 10, 11, 1])  # rows 10.. spill past the 3 x 4 table
  positions = (start[:, None] + np.arange(T)[None, :]).astype(np.int32)
  want = expected_pools(latent, rope, 1, c, k_pe, positions, tables, shard_pages if split else 0)
  fn = jax.jit(lambda *a: write_paged_rows(*a, jnp.asarray(tables, jnp.int32), split=split,
                                           backend="interpret", platform="tpu"))
  with jax.set_mesh(default_mesh()), use_rules(ShardingRules()):
    got = fn(latent, rope, 1, c, k_pe, positions)
  for g, w in zip(got, want):
    scratch = np.zeros(w.shape[1], bool)
    scratch[::shard_pages] = True  # scratch pages hold whichever padding write came last
    np.testing.assert_array_equal(np.asarray(g)[:, ~scratch], w[:, ~scratch])


def test_layout_rounds_and_splits():
  lay = steps.pool_layout(8, 50, 5, 8, (1, 2, 4, 5))  # 7 pages a shard < 8
  assert (lay.split, lay.shards, lay.shard_pages, lay.shard_rows) == (False, 1, 50, 5)
  lay = steps.pool_layout(8, 70, 20, 8, (4, 8, 16, 20))
  assert (lay.split, lay.shards, lay.shard_pages, lay.shard_rows) == (True, 8, 9, 3)
  assert lay.row_buckets == (1, 2, 3) and lay.pool_pages == 8 * 10


def test_split_pool_engine_equals_offline():
  """The engine with its pool split over the 8 simulated devices (each request's pages and rows
  in one shard) gives the static-batch Generator's greedy tokens (float32) for requests of
  several prefill chunks arriving at different steps, and frees every page."""
  model = tiny_model(0)
  rng = np.random.RandomState(0)
  prompts = [rng.randint(2, 256, size=n).tolist() for n in (5, 23, 40, 9, 17)]
  offline = Generator(model, compiler_options=FAST_COMPILE).run(
      prompts, max_new_tokens=12, eos_token_id=()).tokens
  engine = Engine(model, max_batch=4, page_size=8, num_pages=64, prefill_chunk=16,
                  max_context=64, eos_token_id=(), compiler_options=FAST_COMPILE,
                  batch_buckets=(4,), page_buckets=(8,))
  assert engine.pool_split and engine.shards == 8 and engine.shard_rows == 1
  assert engine.latent.sharding.shard_shape(engine.latent.shape)[1] == 9  # 8 pages + scratch
  reqs = []
  for step in range(200):
    if step in (0, 1, 3) and len(reqs) < len(prompts):
      reqs += [engine.submit(p, RequestParams(max_tokens=12)) for p in
               prompts[len(reqs):len(reqs) + (3 if step == 0 else 1)]]
    if engine.idle and len(reqs) == len(prompts):
      break
    engine.step()
  for i, r in enumerate(reqs):
    assert r.finish_reason == "length" and r.output == offline[i][:12], f"request {i}"
  assert engine.pages_used == 0


def test_paged_attention_in_query_row_groups(monkeypatch):
  """A prefill chunk's queries go to the paged kernel in groups of PAGED_QUERY_ROWS rows
  (VMEM): with groups of one token (4 heads, 4 rows) the TPU kernel (interpret mode, pool split
  over the 8 devices) equals the jnp reference on the whole pool, float32, 1e-5."""
  from dsv3_jax.inference import decode
  from tests.utils import assert_close
  rng = np.random.RandomState(1)
  L, shard_pages, page, C, R, B, T, H, P = 1, 4, 8, 32, 8, 8, 3, 4, 3
  latent = jnp.asarray(rng.randn(L, 8 * shard_pages, page, C), jnp.float32)
  rope = jnp.asarray(rng.randn(L, 8 * shard_pages, R, page), jnp.float32)
  q = jnp.asarray(rng.randn(B, T, H, C + R), jnp.float32)
  tables = jnp.asarray(np.stack([b * shard_pages + rng.permutation(np.arange(1, shard_pages))
                                 for b in range(B)]), jnp.int32)
  start = rng.randint(0, P * page - T, size=B)
  positions = jnp.asarray(start[:, None] + np.arange(T)[None, :], jnp.int32)
  kw = dict(block_tables=tables, layer=0)
  want = decode.paged_attention_steps(q, latent, rope, positions, 0.3, backend="reference", **kw)
  monkeypatch.setattr(decode, "PAGED_QUERY_ROWS", H)
  with jax.set_mesh(default_mesh()), use_rules(ShardingRules()):
    got = jax.jit(lambda *a: decode.paged_attention_steps(
        *a, 0.3, backend="interpret", platform="tpu", pool_split=True, **kw))(
            q, latent, rope, positions)
  assert_close(got, want, atol=1e-5, what="paged attention in token groups")
