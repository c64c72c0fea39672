"""The MoE layer under expert parallelism with the Pallas grouped matmul and with FP8 experts,
against the same layer without a mesh (the single-program dropless path), and the layer compiled
for a real TPU topology (libtpu AOT on CPU): Pallas kernels inside the EP shard_map, ragged
all-to-all, and no all-reduce of token rows.

Tolerances: float32 with matmul precision "highest"; the Pallas (our TPU kernels, interpreted) and
ragged_dot paths agree to 1e-5 on outputs/gradients of size ~1e-1; FP8 forward: the same e4m3
weights and scales on both sides, 1e-5.
"""
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv3_jax.config import TINY, RuntimeConfig
from dsv3_jax.moe import MoE
from dsv3_jax.sharding import Exchange, ep_layout, make_mesh
from dsv3_jax.sharding import expert_parallel as ep
from tests.utils import FAST_COMPILE, assert_close, hlo_collectives

CFG = TINY.replace(n_routed_experts=16, n_group=4, topk_group=4, num_experts_per_tok=4)
B, T = 4, 16  # 64 tokens: 8 per shard on 8 devices


def _moe(rt, seed=0):
  return MoE(CFG, rt, rngs=nnx.Rngs(seed))


def _run(rt, x, mesh=None):
  """(y, stats, grads of every MoE parameter) of sum(sin(MoE(x)))."""
  model = _moe(rt)
  graph, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params, x):
    y, stats = nnx.merge(graph, params, rest)(x)
    return jnp.sum(jnp.sin(y)), (y, stats)

  f = jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=FAST_COMPILE)
  if mesh is None:
    assert ep_layout() is None
    (_, (y, stats)), g = f(params, x)
  else:
    with jax.set_mesh(mesh):
      assert ep_layout() is not None
      (_, (y, stats)), g = f(params, x)
  return y, stats, g


def _x():
  return jnp.asarray(np.random.default_rng(0).standard_normal((B, T, CFG.hidden_size)),
                     jnp.float32)


def test_pallas_grouped_matmul_under_ep_matches_single_device():
  """moe_backend="interpret" (our TPU grouped matmuls, forward and custom-VJP dlhs/drhs) inside
  the EP shard_map, capacity factor 1.0 (overflow rounds taken), equals the single-program
  reference MoE; the overflow counter equals numpy's from the routed experts."""
  x = _x()
  rt_ref = RuntimeConfig(moe_backend="reference")
  rt_ep = RuntimeConfig(moe_backend="interpret", kernel_platform="tpu", ep_capacity_factor=1.0)
  y0, s0, g0 = _run(rt_ref, x)
  mesh = make_mesh({"expert": 8})
  y1, s1, g1 = _run(rt_ep, x, mesh)
  assert_close(y1, y0, atol=1e-5, what="EP + Pallas forward")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g0)):
    assert np.abs(np.asarray(b)).max() > 1e-4, path
    assert_close(a, b, atol=1e-5, rtol=1e-4, what=f"EP + Pallas grad {jax.tree_util.keystr(path)}")
  np.testing.assert_array_equal(s1["load"], s0["load"])
  assert int(s0["ep_overflow"]) == 0
  # numpy: routed (token, expert) rows per receiving shard, over capacity R = 1.0 * n * K
  load_by_token = np.asarray(jax.jit(lambda m, x: m.gate(x.reshape(-1, CFG.hidden_size)).experts)(
      _moe(rt_ref), x))
  n, K, S = B * T // 8, CFG.num_experts_per_tok, 8
  recv = np.bincount(load_by_token.ravel() // (CFG.n_routed_experts // S), minlength=S)
  cap, _, rounds = ep.exchange_rounds(n, K, CFG.n_routed_experts // S, S, 1.0)
  assert rounds > 1  # the overflow rounds loop ran the kernels too
  assert int(s1["ep_overflow"]) == int(np.maximum(recv - cap, 0).sum()) > 0


def test_stacked_experts_at_layer_under_ep_match_single_device():
  """Inference with the routed experts held as whole layer stacks [3, E, ...] (as decode and
  prefill pass them) and read at layer 1 by the TPU kernel (interpret mode) inside the EP
  shard_map equals the single-program reference MoE holding that layer's experts (1e-5, f32)."""
  x = _x()
  y0, s0 = jax.jit(lambda m, x: m(x))(_moe(RuntimeConfig(moe_backend="reference")), x)
  moe = _moe(RuntimeConfig(moe_backend="interpret", kernel_platform="tpu", ep_capacity_factor=1.0))
  rng = np.random.default_rng(3)
  for name in moe.experts.PROJECTIONS:
    param = getattr(moe.experts, name)
    w = param.get_value()
    other = lambda: jnp.asarray(rng.standard_normal(w.shape), w.dtype)  # noqa: E731
    param.set_value(jnp.stack([other(), w, other()]))
  with jax.set_mesh(make_mesh({"expert": 8})):
    y1, s1 = jax.jit(lambda m, x, i: m(x, layer=i))(moe, x, jnp.int32(1))
  assert_close(y1, y0, atol=1e-5, what="EP + stacked experts at layer 1")
  np.testing.assert_array_equal(s1["load"], s0["load"])


def _fp8_experts(moe, seed=1):
  r = np.random.default_rng(seed)
  for name in moe.experts.PROJECTIONS:
    E, n_in, n_out = getattr(moe.experts, name).get_value().shape
    value = jnp.asarray(0.2 * r.standard_normal((E, n_out, n_in)), jnp.float8_e4m3fn)
    scale = jnp.asarray(r.uniform(0.5, 1.5, (E, -(-n_out // 128), -(-n_in // 128))), jnp.float32)
    moe.experts.to_fp8(name, value, scale)
  return moe


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_fp8_experts_under_ep_match_single_device(backend):
  """FP8 routed experts (e4m3 + block scales, inference) under EP equal the no-mesh FP8 layer;
  "interpret": the TPU `grouped_matmul_fp8` Pallas kernel inside the EP shard_map. The two
  programs may fuse and order the float32 sums differently (bitwise on one host, 1 ulp on 0.8%
  of the outputs on another: 2.4e-7 at values O(1)): atol 1e-5, as the other EP tests here; a
  wrong row, expert or scale block shows as errors of the outputs' own size (~1)."""
  x = _x()
  rt = RuntimeConfig(moe_backend=backend, kernel_platform="tpu", ep_capacity_factor=1.0)
  model = _fp8_experts(_moe(rt))
  f = jax.jit(lambda m, x: m(x))
  y0, _ = f(model, x)
  with jax.set_mesh(make_mesh({"data": 2, "expert": 4})):
    y1, s1 = f(model, x)
  assert_close(y1, y0, atol=1e-5, what=f"FP8 experts under EP ({backend})")
  assert np.abs(np.asarray(y0)).max() > 1e-2 and int(s1["ep_overflow"]) >= 0


def test_capacity_factor_is_validated():
  with pytest.raises(ValueError, match="ep_capacity_factor"):
    RuntimeConfig(ep_capacity_factor=0)
  assert RuntimeConfig().ep_capacity_factor == 1.5 and RuntimeConfig(ep_capacity_factor=None)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu (the test extra) is needed to compile for TPU on CPU")
def test_tpu_aot_moe_layer_uses_kernels_and_ragged_exchange():
  """The MoE layer's train gradient compiled for v5p:2x2x1 (fsdp 2 x expert 2) with
  moe_backend="pallas": Mosaic kernels (tpu_custom_call) inside the EP shard_map, Exchange.AUTO
  resolves to ragged-all-to-all from the mesh's TPU devices (the host is CPU), and every
  all-reduce is a weight gradient or a scalar, never token rows."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu")
  mesh = make_mesh({"fsdp": 2, "expert": 2}, devices=topo.devices)
  assert Exchange.AUTO.resolve(mesh) is Exchange.RAGGED
  assert Exchange.AUTO.resolve(mesh.abstract_mesh) is Exchange.RAGGED
  cfg = CFG.replace(hidden_size=384, moe_intermediate_size=256, n_routed_experts=8,
                    n_group=1, topk_group=1, num_experts_per_tok=2)
  rt = RuntimeConfig(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, moe_backend="pallas",
                     kernel_platform="tpu", ep_capacity_factor=0.5)
  model = nnx.eval_shape(lambda: MoE(cfg, rt, rngs=nnx.Rngs(0)))
  graph, params, rest = nnx.split(model, nnx.Param, ...)
  rep = NamedSharding(mesh, P())
  expert_sh = NamedSharding(mesh, P("expert"))
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      a.shape, a.dtype, sharding=expert_sh if a.ndim == 3 else rep), params)
  rest = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), rest)
  tokens = 256  # 64 per device: R = 0.5 x 64 x 2 = 64 rows, 4 rounds (the loop compiles too)
  assert ep.exchange_rounds(tokens // 4, 2, 4, 2, 0.5) == (64, 64, 4)
  x = jax.ShapeDtypeStruct((tokens // 64, 64, cfg.hidden_size), jnp.bfloat16,
                           sharding=NamedSharding(mesh, P(("fsdp", "expert"))))

  def loss(params, rest, x):
    y, _ = nnx.merge(graph, params, rest)(x)
    return jnp.sum(y.astype(jnp.float32) ** 2)

  # conftest's "highest" matmul precision asks Mosaic for fp32 contraction of bf16: not on TPU.
  with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
    compiled = jax.jit(jax.grad(loss)).lower(params, rest, x).compile()
  hlo = compiled.as_text()
  kernels = [l for l in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in l]
  # Pallas everywhere: no XLA ragged-dot (whose weight gradient is a dense masked convolution),
  # and kernels in the backward too (gmm for dlhs, tgmm for the expert-weight grads).
  assert kernels and not any("ragged-dot" in l or "ragged_dot" in l for l in kernels)
  assert any("dsv3_transposed_grouped_matmul" in l for l in kernels)
  colls = hlo_collectives(hlo)
  assert any(op == "ragged-all-to-all" and shapes[0][0] == "bf16" for op, shapes, _ in colls)
  for op, shapes, nbytes in colls:  # plain all-to-alls only carry the int32 send counts
    assert op == "ragged-all-to-all" or (shapes[0][0] == "s32" and nbytes <= 64), (op, shapes)
  El, D, F, E = 4, cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
  weights = {tuple(sorted(s)) for s in ((El, D, F), (D, E), (D, F))}  # experts, router, shared
  reduces = hlo_collectives(hlo, ops=("all-reduce",))
  assert reduces  # the data-parallel (fsdp) weight-gradient reduction is there
  for _, shapes, _ in reduces:
    for _, dims in shapes:
      assert tuple(sorted(dims)) in weights or np.prod(dims, dtype=int) <= 64, shapes


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu (the test extra) is needed to compile for TPU on CPU")
def test_tpu_aot_fp8_moe_layer_under_ep():
  """FP8 routed experts (inference) under EP compile for v5e:2x2 (expert 4) with the Pallas FP8
  grouped matmul inside the shard_map and the ragged exchange."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
  mesh = make_mesh({"expert": 4}, devices=topo.devices)
  cfg = CFG.replace(hidden_size=256, moe_intermediate_size=256, n_routed_experts=8,
                    n_group=1, topk_group=1, num_experts_per_tok=2)
  rt = RuntimeConfig(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, moe_backend="pallas",
                     kernel_platform="tpu")

  def build():
    moe = MoE(cfg, rt, rngs=nnx.Rngs(0))
    for name in moe.experts.PROJECTIONS:
      E, n_in, n_out = getattr(moe.experts, name).get_value().shape
      moe.experts.to_fp8(name, jnp.zeros((E, n_out, n_in), jnp.float8_e4m3fn),
                         jnp.ones((E, -(-n_out // 128), -(-n_in // 128)), jnp.float32))
    return moe

  graph, state = nnx.split(nnx.eval_shape(build))
  rep, by_expert = NamedSharding(mesh, P()), NamedSharding(mesh, P("expert"))
  state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      a.shape, a.dtype, sharding=by_expert if a.ndim == 3 else rep), state)
  x = jax.ShapeDtypeStruct((4, 64, cfg.hidden_size), jnp.bfloat16,
                           sharding=NamedSharding(mesh, P("expert")))
  with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
    hlo = jax.jit(lambda s, x: nnx.merge(graph, s)(x)[0]).lower(state, x).compile().as_text()
  kernels = [l for l in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in l]
  assert len(kernels) >= 3 and not any("ragged-dot" in l for l in kernels)
  assert sum("dsv3_grouped_matmul_fp8" in l for l in kernels) >= 3, [l[:200] for l in kernels]
  assert any(op == "ragged-all-to-all" for op, _, _ in hlo_collectives(hlo))
