"""Every Pallas kernel call of the model runs per shard inside `shard_map` (`sharding.kernel_map`).

CPU, 8 simulated devices: the model sharded by `ShardingRules` with the interpreted kernels
(kernel_platform "tpu" and "gpu") equals the single-device reference backend (the oracle: plain
jnp attention / decode / dequantised matmul on one device), and each traced pallas_call sits
inside a shard_map. TPU (libtpu AOT on CPU): the sharded train step and decode step with
attention_backend="pallas" compile for a v5e 2x2 topology and hold Mosaic custom calls.

Tolerances (fp32): kernel and reference differ only in float32 summation order (online softmax
per block; sharding adds psums of partial products): logits observed ~1e-6, bound 1e-4 (logits
O(1)); gradients bound 1e-4 * max|g| per tensor (observed ~1e-6 * max|g|).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import dsv3_jax
from dsv3_jax.inference import (absorb_weights, abstract_decode_step, decode_forward, init_cache,
                                prefill)
from dsv3_jax.inference.cache import cache_shardings
from dsv3_jax.sharding import (Dim, KernelShardingError, ShardingRules, activation_sharding,
                               kernel_map, kernel_specs, make_mesh, shard_model,
                               state_shardings)
from tests.utils import FAST_COMPILE, assert_close, pallas_calls, random_arrays

# One MoE layer (the expert-parallel shard_map and the kernels' shard_maps in one program), heads
# 4, head dims that the kernels take without padding (q/k 64, v 64, latent 64 + rope 32).
CFG = dsv3_jax.TINY.replace(num_hidden_layers=1, first_k_dense_replace=0,
                            num_nextn_predict_layers=0, qk_nope_head_dim=32, qk_rope_head_dim=32,
                            v_head_dim=64, kv_lora_rank=64)
MESHES = {"fsdp2_ep2_tp2": {"fsdp": 2, "expert": 2, "tensor": 2}, "data8": {"data": 8},
          "data4": {"data": 4}}
B, T = 8, 48


def _arrays(cfg, seed=0, std=0.08):
  return random_arrays(cfg, seed, std=std)


def _model(arrays, platform=None, mesh=None, cfg=CFG):
  kernels = "reference" if platform is None else "interpret"
  rt = dsv3_jax.RuntimeConfig(attention_backend=kernels, moe_backend=kernels,
                              kernel_platform=platform)
  model = dsv3_jax.model_from_arrays(cfg, rt, arrays)
  return model if mesh is None else shard_model(model, ShardingRules(), mesh)


def _traced_in_shard_map(f, mesh, *args):
  """jit(f).trace(*args) (call under `mesh`); asserts that kernels were traced, all inside a
  shard_map. Returns (traced, [(kernel name, inside)])."""
  traced = jax.jit(f).trace(*args)
  calls = pallas_calls(traced.jaxpr)
  assert calls and all(inside for _, inside in calls), calls
  return traced, calls


def run_sharded(f, mesh, *args):
  """jit(f)(*args) under `mesh`, its kernels all inside a shard_map."""
  with jax.set_mesh(mesh):
    traced, _ = _traced_in_shard_map(f, mesh, *args)
    return traced.lower().compile(compiler_options=FAST_COMPILE)(*args)


def _batch():
  """B=8, T=48; rows pack two segments (positions restart per segment)."""
  rng = np.random.RandomState(1)
  tokens = rng.randint(0, CFG.vocab_size, (B, T)).astype(np.int32)
  cut = rng.randint(5, T - 5, B)
  seg = (np.arange(T)[None] >= cut[:, None]).astype(np.int32)
  pos = np.where(seg == 0, np.arange(T)[None], np.arange(T)[None] - cut[:, None]).astype(np.int32)
  return tokens, pos, seg


def _loss_and_grads(model):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  w = jnp.asarray(np.random.RandomState(4).randn(B, T, CFG.vocab_size), jnp.float32)

  def f(params, rest, tokens, pos, seg):
    def loss(p):
      logits = nnx.merge(graphdef, p, rest).forward(tokens, positions=pos, segment_ids=seg).logits
      return jnp.mean(logits * w), logits
    (_, logits), g = jax.value_and_grad(loss, has_aux=True)(params)
    return logits, g
  return f, params, rest


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in
          jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(tree))[0]}


@pytest.fixture(scope="module")
def arrays():
  return _arrays(CFG)


@pytest.fixture(scope="module")
def reference(arrays):
  f, params, rest = _loss_and_grads(_model(arrays))
  logits, g = jax.jit(f).lower(params, rest, *map(jnp.asarray, _batch())).compile(FAST_COMPILE)(
      params, rest, *map(jnp.asarray, _batch()))
  return np.asarray(logits), _flat(g)


@pytest.mark.parametrize("mesh_name,platform", [("fsdp2_ep2_tp2", "tpu"), ("fsdp2_ep2_tp2", "gpu"),
                                               ("data8", "tpu")])
def test_sharded_model_kernels_match_single_device(arrays, reference, platform, mesh_name):
  """Forward logits and all parameter gradients (attention fwd and custom-VJP bwd kernels, the
  grouped-matmul kernels of the routed experts: inside expert parallelism on the `expert` mesh,
  per token shard on "data8", which has no expert axis) equal the single-device reference."""
  mesh = make_mesh(MESHES[mesh_name])
  tokens, pos, seg = _batch()
  ts = activation_sharding(("batch", "sequence"), ShardingRules(), mesh, tokens.shape)
  args = [jax.device_put(a, ts) for a in (tokens, pos, seg)]
  f, params, rest = _loss_and_grads(_model(arrays, platform, mesh))
  logits, g = run_sharded(f, mesh, params, rest, *args)
  want_logits, want_g = reference
  assert np.abs(want_logits).max() > 0.5
  assert_close(np.asarray(logits), want_logits, atol=1e-4, what=f"{mesh_name} {platform} logits")
  got = _flat(g)
  assert set(got) == set(want_g)
  for k, v in want_g.items():
    assert_close(got[k], v, atol=1e-4 * max(np.abs(v).max(), 1e-6), what=f"grad {k}")
  assert np.abs(want_g["['stacks'][0]['block']['self_attn']['kv_b_proj']['kernel']"]).max() > 1e-5


def _decode_run(model, mesh=None):
  """Right-padded prompts of lengths 3, 9, 14, 6 (capacity 40): prefill (attention kernel),
  then a one-token and a two-token step (mla_decode with T = 1 and T = 2), teacher-forced.
  Returns the logits of prefill and of each step; the cache is sharded on batch under `mesh`."""
  rng = np.random.RandomState(6)
  lens = np.array([3, 9, 14, 6])
  nb, pad, cap = len(lens), 16, 40
  seqs = rng.randint(0, CFG.vocab_size, (nb, 20)).astype(np.int32)
  prompt = np.where(np.arange(pad)[None] < lens[:, None], seqs[:, :pad], 7).astype(np.int32)
  graphdef, state = nnx.split(model)
  absorbed = absorb_weights(model)
  cache = init_cache(CFG, nb, cap, jnp.float32)
  if mesh is not None:
    rules = ShardingRules()
    cache = jax.device_put(cache, cache_shardings(cache, rules, mesh))
  run = (lambda f, *a: run_sharded(f, mesh, *a)) if mesh is not None else (
      lambda f, *a: jax.jit(f).lower(*a).compile(FAST_COMPILE)(*a))

  def pre(state, cache, toks, lens):
    logits, _, cache = prefill(nnx.merge(graphdef, state), cache, toks, lens)
    return logits, cache

  def step(state, absorbed, cache, toks, pos):
    logits, _, cache = decode_forward(nnx.merge(graphdef, state), absorbed, cache, toks, pos)
    return logits, cache

  logits, cache = run(pre, state, cache, jnp.asarray(prompt), jnp.asarray(lens, jnp.int32))
  outs, pos, rows = [np.asarray(logits)], lens.copy(), np.arange(nb)
  for t in (1, 2):
    p = pos[:, None] + np.arange(t)[None]
    logits, cache = run(step, state, absorbed, cache, jnp.asarray(seqs[rows[:, None], p]),
                        jnp.asarray(p, jnp.int32))
    outs.append(np.asarray(logits))
    pos = pos + t
  return outs


@pytest.fixture(scope="module")
def decode_reference(arrays):
  return _decode_run(_model(arrays))


@pytest.mark.parametrize("mesh_name,platform", [("fsdp2_ep2_tp2", "tpu"), ("fsdp2_ep2_tp2", "gpu"),
                                               ("data4", "tpu")])
def test_sharded_cached_decode_matches_single_device(arrays, decode_reference, platform,
                                                     mesh_name):
  """Prefill and cached decode steps with the interpreted kernels equal the single-device
  reference backend: on fsdp 2 x expert 2 x tensor 2 (batch over fsdp x expert, heads over
  tensor, cache rows per batch shard, expert parallelism reading the expert stacks at the
  layer), and on data 4 (no expert axis: the routed experts per batch shard)."""
  want = decode_reference
  sizes = MESHES[mesh_name]
  mesh = make_mesh(sizes, devices=jax.devices()[:int(np.prod(list(sizes.values())))])
  got = _decode_run(_model(arrays, platform, mesh), mesh)
  for i, (g, w) in enumerate(zip(got, want)):
    assert np.abs(w).max() > 0.5
    assert_close(g, w, atol=1e-4, what=f"{platform} decode call {i}")


def test_kernel_specs_resolution():
  """Logical axes -> shard_map specs: batch over the batch axes that divide it, heads over
  tensor, a Dim multiple keeps whole blocks, one mesh axis never shards two names."""
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  qa = ("batch", None, "act_heads", None)
  ins, outs, used = kernel_specs([(4, 8, 4, 64), (4, 8)], [qa, ("batch", None)], [qa], mesh)
  assert ins == [P(("data", "fsdp"), None, "tensor", None), P(("data", "fsdp"), None)]
  assert outs == [P(("data", "fsdp"), None, "tensor", None)] and used == ("data", "fsdp", "tensor")
  # batch 2: only `data` divides it; heads 3: not divisible, so whole on every shard.
  ins, _, _ = kernel_specs([(2, 8, 3, 64)], [qa], [qa], mesh)
  assert ins == [P("data", None, None, None)]
  # FP8 weight rows [N, K] in 128-row scale blocks: N=256 splits over tensor (128 per shard),
  # N=192 does not (a shard boundary would cut a block); the scales [ceil(N/128), .] follow.
  for n, spec in ((256, P("tensor", None)), (192, P(None, None))):
    ins, _, _ = kernel_specs([(8, 64), (n, 64), (-(-n // 128), 1)],
                             [("batch", None), (Dim("heads", 128), None), ("heads", None)],
                             [("batch", "heads")], mesh)
    assert ins[1] == spec and ins[2] == spec
  # `embed` is fsdp, already taken by batch: replicated rather than sharding two dims.
  ins, _, _ = kernel_specs([(8, 64), (256, 64)], [("batch", None), ("embed", None)],
                           [("batch", "embed")], mesh)
  assert ins[1] == P(None, None)
  with pytest.raises(KernelShardingError, match="operand 0 has shape"):
    kernel_specs([(8, 64)], [("batch",)], [("batch",)], mesh)
  with pytest.raises(KernelShardingError, match="no operand carries"):
    kernel_specs([(8, 64)], [("batch", None)], [("batch", "act_heads")], mesh)


def test_kernel_map_names_the_sharding_a_kernel_rejects():
  """A kernel that cannot take its per-shard shape raises KernelShardingError with the specs and
  the local shapes (no fallback), and with no mesh the kernel is called directly."""
  def kernel(x):
    if x.shape[0] % 4:
      raise ValueError(f"rows must be a multiple of 4, got {x.shape[0]}")
    return x * 2

  f = kernel_map(kernel, [("batch", None)], ("batch", None), name="toy")
  x = jnp.ones((8, 3))
  np.testing.assert_array_equal(np.asarray(jax.jit(f)(x)), 2 * np.ones((8, 3)))  # no mesh
  mesh = make_mesh({"data": 4, "tensor": 2})
  with jax.set_mesh(mesh), pytest.raises(KernelShardingError, match=r"toy cannot run.*\(2, 3\)"):
    jax.jit(f)(x)


def test_fp8_linear_runs_per_shard():
  """Linear with FP8 weights (`fp8_weight_matmul`, interpreted TPU kernel) on fsdp 2 x tensor 2:
  rows split over the batch axes, the weight's out dim over tensor; equals the dequantised
  matmul on one device."""
  from dsv3_jax.layers import Linear
  rng = np.random.RandomState(0)
  k_in, n_out = 256, 256
  w = (0.1 * rng.randn(n_out, k_in)).astype(np.float32)
  scale = np.full((2, 2), 0.01, np.float32) * np.array([[1.0, 2.0], [0.5, 1.5]], np.float32)
  value = jnp.asarray(np.repeat(np.repeat(1 / scale, 128, 0), 128, 1) * w, jnp.float8_e4m3fn)
  lin = Linear(k_in, n_out, axes=("embed", "heads"), rngs=nnx.Rngs(0))
  lin.to_fp8(value, jnp.asarray(scale), backend="interpret", platform="tpu")
  x = jnp.asarray(rng.randn(4, 8, k_in), jnp.float32)
  want = np.einsum("bti,oi->bto", np.asarray(x), np.asarray(lin.dense_kernel()).T)
  mesh = make_mesh({"fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
  shard_model(lin, ShardingRules(), mesh)
  assert lin.weight.get_value().sharding.spec == P("tensor", "fsdp")
  graphdef, state = nnx.split(lin)
  xs = jax.device_put(x, NamedSharding(mesh, P("fsdp")))
  got = run_sharded(lambda s, x: nnx.merge(graphdef, s)(x), mesh, state, xs)
  assert_close(np.asarray(got), want, atol=1e-4, what="sharded fp8 Linear")


# TPU: hidden 128, 4 heads (2 per tensor shard), q/k 64 + 64, v 128, latent 128 + rope 64 (the
# decode cache rows are 192 wide); one dense layer keeps the Mosaic + XLA:TPU compile short.
TPU_CFG = dsv3_jax.TINY.replace(
    num_hidden_layers=1, first_k_dense_replace=1, num_nextn_predict_layers=0, hidden_size=128,
    intermediate_size=256, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64,
    qk_rope_head_dim=64, v_head_dim=128)


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


@pytest.fixture(scope="module")
def tpu_mesh():
  pytest.importorskip("libtpu", reason="TPU AOT compilation needs libtpu (the test extra)")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
  return make_mesh({"fsdp": 2, "tensor": 2}, devices=topo.devices)


def _tpu_model(fp8: bool, cfg=TPU_CFG):
  from dsv3_jax.layers import Linear
  rt = dsv3_jax.RuntimeConfig(param_dtype=jnp.float32, dtype=jnp.bfloat16,
                              attention_backend="pallas", moe_backend="pallas",
                              kernel_platform="tpu")
  model = dsv3_jax.abstract_model(cfg, rt)
  if fp8:  # the projections into and out of the heads hold FP8 weights (fp8_weight_matmul)
    for path, m in nnx.iter_graph(model):
      if isinstance(m, Linear) and path[-1] in ("q_b_proj", "o_proj"):
        *lead, n_in, n_out = m.kernel.get_value().shape  # lead: the layer stack's axis
        m.to_fp8(jax.ShapeDtypeStruct((*lead, n_out, n_in), jnp.float8_e4m3fn),
                 jax.ShapeDtypeStruct((*lead, -(-n_out // 128), -(-n_in // 128)), jnp.float32),
                 backend="pallas", platform="tpu")
  return model


def _compile_tpu(f, mesh, *args):
  # conftest sets matmul precision "highest": the kernels' bf16 dots must not inherit it
  # (Mosaic rejects an fp32 contract precision on bf16 operands; see kernels_pallas.cost.mxu_dot).
  with jax.set_mesh(mesh):
    traced, calls = _traced_in_shard_map(f, mesh, *args)
    return traced.lower().compile().as_text(), calls


def test_tpu_aot_sharded_train_step_uses_kernels(tpu_mesh):
  """Loss + gradients of the model sharded on v5e 2x2 (fsdp 2 x tensor 2, no expert axis) with
  the TPU attention kernel (forward, dq and dkv kernels per shard) and the routed experts' grouped
  matmuls (forward gmm, backward gmm + tgmm, per token shard) compiles for TPU (Mosaic +
  XLA:TPU)."""
  rules = ShardingRules()
  cfg = TPU_CFG.replace(first_k_dense_replace=0, moe_intermediate_size=128)
  graphdef, params, rest = nnx.split(_tpu_model(fp8=False, cfg=cfg), nnx.Param, ...)
  pa = _abstract(params, state_shardings(params, rules, tpu_mesh))
  ra = _abstract(rest, state_shardings(rest, rules, tpu_mesh))
  shape = (4, 256)
  tok = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=activation_sharding(
      ("batch", "sequence"), rules, tpu_mesh, shape))

  def train(params, rest, tokens):
    def loss(p):
      return jnp.mean(nnx.merge(graphdef, p, rest)(tokens).astype(jnp.float32))
    return jax.value_and_grad(loss)(params)

  hlo, calls = _compile_tpu(train, tpu_mesh, pa, ra, tok)
  # 3 forward gmm, 3 backward gmm (dlhs) + 3 tgmm (drhs), all ours.
  assert sorted(n for n, _ in calls) == (["dsv3_grouped_matmul"] * 6
                                         + ["dsv3_transposed_grouped_matmul"] * 3
                                         + ["mla_attention_dkv", "mla_attention_dq",
                                            "mla_attention_fwd"]), calls
  assert hlo.count('custom_call_target="tpu_custom_call"') == 12


def test_tpu_aot_sharded_decode_step_uses_kernels(tpu_mesh):
  """A cached decode step (cache latent [B, S, 128] + rope [B, 64, S] split on batch; FP8
  q_b_proj / o_proj) on v5e 2x2 compiles for TPU with the mla_decode, rope-write and
  fp8_weight_matmul kernels per shard."""
  rules = ShardingRules()
  model = _tpu_model(fp8=True)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  pa = _abstract(params, state_shardings(params, rules, tpu_mesh))
  ra = _abstract(rest, state_shardings(rest, rules, tpu_mesh))
  step, args, _ = abstract_decode_step(graphdef, pa, ra, rules, tpu_mesh, 4, 256)
  hlo, calls = _compile_tpu(step, tpu_mesh, *args)
  names = sorted(n for n, _ in calls)
  # mla_rope_write: the new rows' rope keys into the transposed rope cache (in place).
  assert names == ["dsv3_fp8_matmul", "dsv3_fp8_matmul", "mla_decode", "mla_rope_write"], names
  assert hlo.count('custom_call_target="tpu_custom_call"') == 4


def test_kernel_map_inside_an_enclosing_shard_map():
  """Inside a shard_map that is manual over `expert` (the expert-parallel MoE's), kernel_map
  splits only over the remaining axes: batch (on data) and heads (on tensor)."""
  seen = []

  def kernel(x):
    seen.append(x.shape)
    return x * 2

  mesh = make_mesh({"data": 2, "expert": 2, "tensor": 2})
  f = kernel_map(kernel, [("batch", "act_heads")], ("batch", "act_heads"), name="toy")
  outer = jax.shard_map(f, mesh=mesh, in_specs=P("expert"), out_specs=P("expert"),
                        axis_names={"expert"}, check_vma=False)
  x = jnp.arange(8 * 4, dtype=jnp.float32).reshape(8, 4)
  with jax.set_mesh(mesh):
    out = jax.jit(outer)(x)
  assert seen == [(2, 2)]  # 8 rows / expert 2 / data 2, 4 heads / tensor 2
  np.testing.assert_array_equal(np.asarray(out), 2 * np.asarray(x))


def test_kernel_map_on_an_explicit_axes_mesh():
  """On a mesh with Explicit axis types the operands are resharded to the kernel's specs (shard_map
  demands it there); the result is the same and sharded batch x heads."""
  from jax.sharding import AxisType
  mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Explicit,) * 2)
  f = kernel_map(lambda x: x * 2, [("batch", "act_heads")], ("batch", "act_heads"), name="toy")
  x = jnp.arange(32, dtype=jnp.float32).reshape(4, 8)
  with jax.set_mesh(mesh):
    out = jax.jit(f)(x)
  assert out.sharding.spec == P("data", "tensor")
  np.testing.assert_array_equal(np.asarray(out), 2 * np.asarray(x))
