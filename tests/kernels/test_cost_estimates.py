"""Every TPU Pallas call carries a `pl.CostEstimate` (XLA cannot look inside a Mosaic custom
call; without one it schedules it as free). Each kernel is lowered for TPU on CPU (no libtpu
compile needed) and every tpu_custom_call in the module must hold a cost estimate; the matmul
and attention flops are checked against the hand count (2 per multiply-add; causal attention
counts half of the T x T scores).
"""
import re

import jax
import jax.numpy as jnp
import pytest

from dsv3_jax.kernels_pallas import (fp8_matmul, fp8_weight_matmul, grouped_matmul,
                                     grouped_matmul_fp8, mla_attention, mla_decode,
                                     quantize_activations)

TPU = dict(backend="pallas", platform="tpu")


def _estimates(f, *args):
  """[(flops, transcendentals, bytes_accessed)] of each tpu_custom_call in f's TPU lowering."""
  text = jax.jit(f).trace(*args).lower(lowering_platforms=("tpu",)).as_text()
  calls = text.count("@tpu_custom_call")
  found = []
  for chunk in text.split("cost_estimate")[1:]:
    head = chunk[:400]
    get = lambda key: int(re.search(key + r"\\+22:\s*(\d+)", head).group(1))
    found.append((get("flops"), get("transcendentals"), get("bytes_accessed")))
  assert calls > 0 and len(found) == calls, (calls, found)
  return found


def _z(shape, dtype=jnp.bfloat16):
  return jnp.zeros(shape, dtype)


def test_mla_attention_forward_and_backward_have_cost_estimates():
  b, t, h, dqk, dv = 2, 256, 2, 192, 128
  q, k, v = _z((b, t, h, dqk)), _z((b, t, h, dqk)), _z((b, t, h, dv))
  fwd = _estimates(lambda q, k, v: mla_attention(q, k, v, scale=0.1, **TPU), q, k, v)
  pairs = b * h * t * t // 2
  assert fwd == [(2 * pairs * (dqk + dv), pairs, fwd[0][2])] and fwd[0][2] >= 2 * (
      q.size + k.size + v.size + b * t * h * dv)
  grad = jax.grad(lambda q, k, v: mla_attention(q, k, v, scale=0.1, **TPU).astype(
      jnp.float32).sum(), argnums=(0, 1, 2))
  flops = sorted(e[0] for e in _estimates(grad, q, k, v))
  assert flops == sorted([2 * pairs * (dqk + dv), 2 * pairs * (2 * dqk + dv),
                          2 * pairs * (2 * dqk + 2 * dv)])


def test_mla_decode_has_cost_estimate():
  b, h, s, rank, d = 4, 16, 512, 512, 576
  (est,) = _estimates(lambda q, c, r, n: mla_decode(q, c, r, n, scale=0.1, **TPU), _z((b, h, d)),
                      _z((b, s, rank)), _z((b, d - rank, s)), jnp.full((b,), 100, jnp.int32))
  assert est[0] == 2 * b * h * s * (d + rank) and est[1] == b * h * s
  assert est[2] >= 2 * b * s * d  # the cache is read once
  # A stacked cache [3 layers, ...]: the call reads one layer, and says so.
  (stacked,) = _estimates(
      lambda q, c, r, n: mla_decode(q, c, r, n, scale=0.1, layer=jnp.int32(1), **TPU),
      _z((b, h, d)), _z((3, b, s, rank)), _z((3, b, d - rank, s)), jnp.full((b,), 100, jnp.int32))
  assert stacked[:2] == est[:2] and 2 * b * s * d <= stacked[2] < 2 * 2 * b * s * d


def test_rope_cache_write_has_cost_estimate():
  from dsv3_jax.kernels_pallas.mla_decode import write_rope
  L, b, r, s, t = 3, 4, 64, 1024, 2
  (est,) = _estimates(lambda c, k, p: write_rope(c, k, p, layer=jnp.int32(1), **TPU),
                      _z((L, b, r, s)), _z((b, t, r)), jnp.zeros((b, t), jnp.int32))
  # Each sequence's 256-lane window read and written back, plus the new keys: not the cache.
  assert est[0] == 0 and est[2] == 2 * b * r * 256 * 2 + b * t * r * 2


def test_fp8_kernels_have_cost_estimates():
  m, n, k = 256, 384, 512
  x = _z((m, k))
  w, ws = _z((n, k), jnp.float8_e4m3fn), jnp.ones((3, 4), jnp.float32)
  (est,) = _estimates(lambda x, w, s: fp8_weight_matmul(x, w, s, **TPU), x, w, ws)
  assert est[0] == 2 * m * n * k and est[2] >= 2 * m * k + n * k + 2 * m * n
  a, a_s = _z((m, k), jnp.float8_e4m3fn), jnp.ones((m, 4), jnp.float32)
  (est,) = _estimates(lambda a, s, w, ws: fp8_matmul(a, s, w, ws, **TPU), a, a_s, w, ws)
  assert est[0] == 2 * m * n * k
  (est,) = _estimates(lambda x: quantize_activations(x, **TPU), x)
  assert est[2] >= 3 * m * k


def test_grouped_matmul_kernels_have_cost_estimates():
  """Our grouped kernels (FP8, and bf16 at a layer of a stack) count the work they do: one
  bm-row tile x K x N product per (row tile, group) item with rows, for `rows` live rows routed
  uniformly over the G groups: items = G (1 - (1 - 1/G)^rows) + ceil(rows / bm) - 1 (the
  expected non-empty groups plus the tile boundaries inside the rows; checked against the
  schedule in test_grouped_matmul.py)."""
  t, k, n, g = 256, 256, 384, 4
  items = lambda rows, bm: g * (1 - (1 - 1 / g) ** rows) + -(-rows // bm) - 1  # noqa: E731
  sizes = jnp.array([64, 0, 100, 92], jnp.int32)
  rhs8, s8 = _z((g, n, k), jnp.float8_e4m3fn), jnp.ones((g, 3, 2), jnp.float32)
  (est,) = _estimates(lambda x, w, s, gs: grouped_matmul_fp8(x, w, s, gs, **TPU), _z((t, k)),
                      rhs8, s8, sizes)
  assert est[0] == round(2 * items(t, t) * t * n * k)  # 4 groups sharing one 256-row tile
  # Stacked bf16 weights [3, G, K, N] at a layer: weights of the items' groups only, never the
  # stack; rows = the average load of a capacity-sized (64-row) buffer.
  stack = _z((3, g, k, n))
  for rows in (8, 2, None):
    m = 64 if rows else t
    it = items(rows or t, m)
    (est,) = _estimates(lambda x, w, gs: grouped_matmul(x, w, gs, layer=jnp.int32(2), rows=rows,
                                                        **TPU), _z((m, k)), stack, sizes)
    assert est[0] == round(2 * it * m * k * n), (rows, est)
    assert est[2] == round(it * m * k * 2 + it * k * n * 2 + m * n * 2), (rows, est)
    assert est[2] <= stack.size * 2 / 3 + m * n * 2 + g * m * k * 2  # one layer at most
  (est,) = _estimates(lambda x, w, s, gs: grouped_matmul_fp8(x, w, s, gs, layer=jnp.int32(1),
                                                             rows=8, **TPU),
                      _z((64, k)), _z((3, g, n, k), jnp.float8_e4m3fn),
                      jnp.ones((3, g, 3, 2), jnp.float32), sizes)
  assert est[0] == round(2 * items(8, 64) * 64 * k * n) and est[2] < 3 * g * n * k


def test_training_grouped_matmul_counts_the_rows_it_computes():
  """The bf16 grouped matmul's training kernels (forward gmm, input-gradient gmm with rhs read
  transposed, weight-gradient tgmm) count `rows` live rows of a T-row buffer (a capacity-sized
  expert-parallel receive buffer), not T: each call's flops are 2 x items x bm x K x N, items
  the expected (row tile, group) pairs with rows = 4 groups + 3 tile boundaries inside 1024 rows
  of 256-row tiles = 7.0 (what the kernels compute: whole tiles, see the schedule tests)."""
  t, k, n, g, rows, bm = 2048, 256, 384, 4, 1024, 256
  sizes = jnp.array([300, 0, 500, 224], jnp.int32)
  grad = jax.value_and_grad(lambda x, w: grouped_matmul(x, w, sizes, rows=rows, **TPU)
                  .astype(jnp.float32).sum(), argnums=(0, 1))
  ests = _estimates(grad, _z((t, k)), _z((g, k, n)))
  items = g * (1 - (1 - 1 / g) ** rows) + 3
  assert len(ests) == 3 and items == pytest.approx(7.0)
  for flops, _, _ in ests:
    assert flops == round(2 * items * bm * k * n), ests
  # forward bytes: x tiles (one N tile), each item's weight tile, the whole bf16 output
  assert ests[0][2] == round(items * bm * k * 2 + items * k * n * 2 + t * n * 2)
  # Without rows the whole buffer counts as live: 8 tile boundaries + 4 groups - 1.
  full = _estimates(lambda x, w: grouped_matmul(x, w, sizes, **TPU), _z((t, k)), _z((g, k, n)))
  assert full[0][0] == round(2 * (g * (1 - (1 - 1 / g) ** t) + 7) * bm * k * n)
  assert full[0][2] > ests[0][2]
