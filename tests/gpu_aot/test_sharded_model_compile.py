"""The sharded model's train step and cached decode step compile for 8 H100s (topology 1x1x8,
sm_90a, deviceless XLA:GPU AOT) with the GPU Pallas kernels in place, each inside a shard_map.

Mesh fsdp 2 x expert 2 x tensor 2 over the 8 devices; one MoE layer (expert-parallel shard_map
with the grouped-matmul kernels inside) and MLA attention (forward + dq + dk/dv kernels) or, for
decode, the latent-decode kernel and FP8 projections. gpu_kernels="triton" (every kernel has a
Triton form at these small dims; the Mosaic GPU kernels need 64-head / 64-multiple tiles and are
compiled at DeepSeek-V3 shapes in test_kernels_compile.py). The traced program's kernels must all
sit inside shard_maps (`tests.utils.pallas_calls`) and the compiled module must hold them as
Triton custom calls.
"""
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

import dsv3_jax
from dsv3_jax.inference import abstract_decode_step
from dsv3_jax.sharding import ShardingRules, activation_sharding, make_mesh, state_shardings
from tests.utils import pallas_calls

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
import gpu_aot  # noqa: E402

# hidden 128, 4 heads (2 per tensor shard), q/k 64 + 64, v 128, latent 128 + rope 64, one MoE
# layer with 8 experts of width 128 (4 per expert shard).
CFG = dsv3_jax.TINY.replace(
    num_hidden_layers=1, first_k_dense_replace=0, num_nextn_predict_layers=0, hidden_size=128,
    intermediate_size=256, moe_intermediate_size=128, q_lora_rank=128, kv_lora_rank=128,
    qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=128)


def _mesh():
  mesh = gpu_aot.cuda_mesh((8,), ("all",))
  return make_mesh({"fsdp": 2, "expert": 2, "tensor": 2}, devices=mesh.devices.flat)


def _model(fp8: bool):
  from dsv3_jax.layers import Linear
  rt = dsv3_jax.RuntimeConfig(param_dtype=jnp.float32, dtype=jnp.bfloat16,
                              attention_backend="pallas", moe_backend="pallas",
                              kernel_platform="gpu", gpu_kernels="triton")
  model = dsv3_jax.abstract_model(CFG, rt)
  if fp8:  # q_b_proj / o_proj hold FP8 weights (fp8_weight_matmul)
    for path, m in nnx.iter_graph(model):
      if isinstance(m, Linear) and path[-1] in ("q_b_proj", "o_proj"):
        *lead, n_in, n_out = m.kernel.get_value().shape
        m.to_fp8(jax.ShapeDtypeStruct((*lead, n_out, n_in), jnp.float8_e4m3fn),
                 jax.ShapeDtypeStruct((*lead, -(-n_out // 128), -(-n_in // 128)), jnp.float32),
                 backend="pallas", platform="gpu")
  return model


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


def _compile(f, mesh, *args):
  """-> (names of the traced kernels, all inside shard_maps; compiled result)."""
  with jax.set_mesh(mesh):
    calls = pallas_calls(jax.jit(f).trace(*args).jaxpr)
  assert calls and all(inside for _, inside in calls), calls
  with jax.set_mesh(mesh):
    res = gpu_aot.compile_case(f, args, mesh=mesh)
  return sorted(n for n, _ in calls), res


def test_sharded_train_step_compiles_for_8_h100s():
  """Loss + gradients: attention fwd/dq/dkv and the grouped matmuls (forward, dlhs, drhs) per
  shard, compiled for 1x1x8 H100s."""
  mesh, rules = _mesh(), ShardingRules()
  graphdef, params, rest = nnx.split(_model(fp8=False), nnx.Param, ...)
  pa = _abstract(params, state_shardings(params, rules, mesh))
  ra = _abstract(rest, state_shardings(rest, rules, mesh))
  shape = (8, 256)
  tok = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=activation_sharding(
      ("batch", "sequence"), rules, mesh, shape))

  def train(params, rest, tokens):
    def loss(p):
      return jnp.mean(nnx.merge(graphdef, p, rest)(tokens).astype(jnp.float32))
    return jax.value_and_grad(loss)(params)

  names, res = _compile(train, mesh, pa, ra, tok)
  assert {"mla_attention_fwd", "mla_attention_dq", "mla_attention_dkv"} <= set(names), names
  assert any("grouped_matmul" in n for n in names), names
  # (a custom_vjp's traced jaxpr names a kernel in its forward and its fwd rule; the program
  # holds each once)
  assert res.calls["mosaic"] == 0 and res.calls["triton"] >= len(set(names)), (res.calls, names)
  assert all(p.spill_stores == 0 for p in gpu_aot.kernel_reports(res))


def test_sharded_decode_step_compiles_for_8_h100s():
  """A cached decode step (cache split on batch, FP8 q_b_proj / o_proj): mla_decode,
  fp8_weight_matmul and the grouped matmul per shard, compiled for 1x1x8 H100s."""
  mesh, rules = _mesh(), ShardingRules()
  graphdef, params, rest = nnx.split(_model(fp8=True), nnx.Param, ...)
  pa = _abstract(params, state_shardings(params, rules, mesh))
  ra = _abstract(rest, state_shardings(rest, rules, mesh))
  step, args, _ = abstract_decode_step(graphdef, pa, ra, rules, mesh, 8, 256)
  names, res = _compile(step, mesh, *args)
  assert "mla_decode" in names and names.count("dsv3_fp8_matmul") == 2, names
  # (a custom_vjp's traced jaxpr names a kernel in its forward and its fwd rule; the program
  # holds each once)
  assert res.calls["mosaic"] == 0 and res.calls["triton"] >= len(set(names)), (res.calls, names)
  assert all(p.spill_stores == 0 for p in gpu_aot.kernel_reports(res))
