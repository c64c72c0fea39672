"""Mesh construction, the logical-axis rules table and the per-device memory planner.

The planner's parameter bytes are checked against a closed-form count written from the config
formulas (not from the model code); its activation estimate against a two-matmul block whose
saved residuals are known by hand.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dsv3_jax import TINY, abstract_model
from dsv3_jax.sharding import (ShardingRules, init_sharded, logical_to_spec, make_mesh,
                               parse_mesh_shape)
from dsv3_jax.sharding.memory import abstract_mesh, activation_bytes, format_plan, plan_memory


def test_make_mesh_and_parse():
  assert parse_mesh_shape("data=2, expert=-1") == {"data": 2, "expert": -1}
  mesh = make_mesh("data=2,expert=-1")
  assert dict(mesh.shape) == {"data": 2, "expert": 4} and mesh.devices.size == 8
  with pytest.raises(ValueError, match="needs 6 devices, but 8"):
    make_mesh({"data": 2, "expert": 3})
  with pytest.raises(ValueError, match="not an integer"):
    parse_mesh_shape("data=two")


def test_rules_map_and_reject_collisions():
  mesh = make_mesh({"fsdp": 2, "tensor": 2, "expert": 2})
  r = ShardingRules()
  assert logical_to_spec(("expert", "moe_embed", "moe_mlp"), r, mesh) == P("expert", "fsdp",
                                                                            "tensor")
  assert logical_to_spec(("batch", "sequence"), r, mesh) == P(("fsdp", "expert"))
  # Absent / size-1 mesh axes are dropped; non-divisible dims are replicated.
  assert logical_to_spec(("vocab", "embed"), r, make_mesh({"expert": 8})) == P()
  assert logical_to_spec(("embed", "heads"), r, mesh, (6, 3)) == P("fsdp")
  with pytest.raises(ValueError, match="used by both 'moe_embed' and 'moe_mlp'"):
    ShardingRules(moe_mlp="fsdp")
  with pytest.raises(ValueError, match="names a mesh axis twice"):
    ShardingRules(batch=("data", "data"))
  bad = ShardingRules(q_lora="tensor", heads=None)
  with pytest.raises(ValueError, match="mesh axis 'tensor' shards both dim 0"):
    logical_to_spec(("q_lora", "vocab"), bad, mesh, what="w")


def test_init_sharded_places_each_shard():
  class Two(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.arange(32.0).reshape(8, 4), axes=("expert", "embed"))
      self.b = nnx.Param(jnp.ones((4,)), axes=(None,))

  mesh = make_mesh({"fsdp": 2, "expert": 4})
  m = init_sharded(Two, ShardingRules(), mesh)
  assert m.w.get_value().sharding.spec == P("expert", "fsdp")
  assert m.w.get_value().addressable_shards[0].data.shape == (2, 2)
  np.testing.assert_array_equal(np.asarray(m.w.get_value()), np.arange(32.0).reshape(8, 4))
  assert m.b.get_value().sharding.is_fully_replicated


def _closed_form(cfg):
  """Element counts from the DeepSeek-V3 formulas: (total, routed experts, with an embed dim,
  router biases)."""
  D, H, E, F = cfg.hidden_size, cfg.num_attention_heads, cfg.n_routed_experts, cfg.moe_intermediate_size
  ql, kvl, rope = cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_rope_head_dim
  qk, v = cfg.qk_nope_head_dim + rope, cfg.v_head_dim
  attn_embed = D * ql + D * (kvl + rope) + H * v * D
  attn_other = ql + ql * H * qk + kvl + kvl * H * (cfg.qk_nope_head_dim + v)
  dense = 3 * D * cfg.intermediate_size
  routed, shared, router = 3 * E * D * F, 3 * D * F * cfg.n_shared_experts, D * E
  n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)) + cfg.num_nextn_predict_layers
  n_dense = cfg.num_hidden_layers - n_moe + cfg.num_nextn_predict_layers
  blocks = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
  embed_dim = (2 * cfg.vocab_size * D + blocks * attn_embed + n_dense * dense
               + n_moe * (routed + shared + router) + cfg.num_nextn_predict_layers * 2 * D * D)
  other = blocks * (2 * D + attn_other) + D + cfg.num_nextn_predict_layers * 3 * D
  return embed_dim + other + n_moe * E, n_moe * routed, embed_dim, n_moe * E


def test_memory_planner_parameters_match_closed_form():
  cfg = TINY
  state = nnx.state(abstract_model(cfg))
  total, routed, embed_dim, biases = _closed_form(cfg)
  rules = ShardingRules()
  ep = plan_memory(state, rules, {"expert": 8}, batch=8, seq=16)
  assert ep.params == 4 * (total - routed + routed // 8)
  assert ep.grads == 4 * (total - biases - routed + routed // 8)   # the bias is not trained
  assert ep.optimizer == 3 * ep.grads                              # fp32 m, v, master
  assert ep.total == ep.params + ep.grads + ep.optimizer and ep.activations == 0
  assert f"| total | {ep.total / 2**30:,.2f} |" in format_plan(ep)
  fsdp = plan_memory(state, rules, {"fsdp": 4}, batch=8, seq=16)
  assert fsdp.params == 4 * (total - embed_dim + embed_dim // 4)
  assert fsdp.replicated_fallback == ()
  # A 256-device mesh is planned without devices.
  big = plan_memory(state, rules, {"data": 4, "fsdp": 8, "expert": 8}, batch=256, seq=16)
  assert big.params == 4 * (total - embed_dim + embed_dim // 8 - routed // 8 + routed // 64)


def test_activation_estimate_two_matmuls():
  """y = (x @ w1) @ w2: the VJP keeps x (for dw1) and h = x @ w1 (for dw2) plus the weights,
  which are not counted: 4 * (B*T*D + B*T*H) bytes."""
  B, T, D, H = 2, 8, 16, 24
  w = {"w1": jax.ShapeDtypeStruct((D, H), jnp.float32),
       "w2": jax.ShapeDtypeStruct((H, D), jnp.float32)}
  x = jax.ShapeDtypeStruct((B, T, D), jnp.float32)
  got = activation_bytes(lambda p, x: (x @ p["w1"]) @ p["w2"], w, x)
  assert got == 4 * (B * T * D + B * T * H)
  assert abstract_mesh({"data": 4}).axis_sizes == (4,)


def test_sharding_imports_nothing_from_the_model():
  """Dependency direction (STYLE 4): dsv3_jax.sharding imports only itself, jax, flax, numpy
  (and `dsv3_jax.errors`, the dependency-free exception module every layer raises from)."""
  import ast
  import pathlib
  for f in (pathlib.Path(__file__).parent.parent / "sharding").glob("*.py"):
    for node in ast.walk(ast.parse(f.read_text())):
      mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
              [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
      for m in mods:
        assert (not m.startswith("dsv3_jax") or m.startswith("dsv3_jax.sharding")
                or m == "dsv3_jax.errors"), (f.name, m)


def test_one_rule_choice_for_plan_trainer_generator_and_engine():
  """`dsv3 plan` compiles the placement a run makes: the plan's default rules, `Trainer`'s
  (so `dsv3 train --mesh`), `Generator`'s and the serving engine's all come from
  `rules_for_mesh`; a pod mesh (no tensor axis) splits every dense weight over fsdp x expert,
  a mesh with a tensor axis keeps the defaults."""
  from dsv3_jax.plan import parse_rules
  from dsv3_jax.serving.steps import serving_rules
  from dsv3_jax.sharding import POD_RULES, SERVE_POD_RULES, rules_for_mesh
  pod, tp = {"fsdp": 4, "expert": 2}, {"fsdp": 4, "tensor": 2}
  assert rules_for_mesh(pod) == POD_RULES and rules_for_mesh(pod, serve=True) == SERVE_POD_RULES
  assert rules_for_mesh(tp) == ShardingRules() == rules_for_mesh(None)
  assert parse_rules(None, pod) == POD_RULES and parse_rules(None, tp) == ShardingRules()
  mesh = make_mesh(pod)
  assert serving_rules(mesh) == SERVE_POD_RULES
  # Every 2-D dense attention / FFN weight of the tiny model splits over both pod axes.
  state = nnx.state(abstract_model(TINY))
  for path, v in nnx.to_flat_state(state):
    name = ".".join(map(str, path))
    if any(k in name for k in ("q_b_proj", "kv_b_proj", "q_a_proj", "kv_a_proj")) and \
        name.endswith("kernel"):
      spec = logical_to_spec(v.get_metadata()["axes"], POD_RULES, mesh)
      assert {a for s in spec if s for a in ((s,) if isinstance(s, str) else s)} == \
          {"fsdp", "expert"}, (name, spec)
