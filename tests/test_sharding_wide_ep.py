"""Wide expert parallelism (`sharding.wide_expert`): the routed experts whole, one per device over
the fsdp x expert axes (8 experts on 8 simulated CPU devices), the expert-parallel exchange over
both axes. The sharded train step equals the single-device one, no expert weight is gathered and
no expert-weight gradient is reduced; the same step AOT-compiles for TPU with Pallas kernels.

Tolerances as tests/test_sharding_model.py (fp32, "highest"): logits atol 1e-5, gradients atol
1e-6 + rtol 1e-4; a routing or permutation bug gives O(1e-2) errors.
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dsv3_jax.sharding import ShardingRules, ep_layout, make_mesh, use_rules, wide_expert
from tests.sharding_case import CFG, flat, run_sharded
from tests.test_sharding_ep import FFN, E, K, _case, _loss, _skewed
from tests.utils import FAST_COMPILE, assert_close
from tests.test_sharding_model import EXPERT_W, POD_RULES, _compare, reference  # noqa: F401

MESH = {"fsdp": 2, "expert": 4}


def test_wide_expert_rules():
  r = wide_expert(POD_RULES, MESH, CFG.n_routed_experts)
  assert r.expert == ("fsdp", "expert") and r.moe_embed is None
  assert r.embed == "fsdp" and r.heads == "expert"  # dense weights keep the pod rules
  assert wide_expert(ShardingRules(), {"data": 2, "tensor": 2, "expert": 2}).expert == (
      "data", "expert")
  with pytest.raises(ValueError, match="6 routed experts do not split over the 8 devices"):
    wide_expert(POD_RULES, MESH, 6)
  # The experts' hidden dim cannot stay on fsdp once the expert dim uses it.
  with pytest.raises(ValueError, match="used by both 'expert' and 'moe_embed'"):
    ShardingRules(expert=("fsdp", "expert"))
  with pytest.raises(ValueError, match="cannot be split over the 'tensor' axis"):
    ep_layout(make_mesh({"expert": 4, "tensor": 2}), ShardingRules(expert=("expert", "tensor"),
                                                                   moe_mlp=None))
  layout = ep_layout(make_mesh(MESH), r)
  assert layout.expert_axes == ("fsdp", "expert") and layout.num_shards == 8


def test_wide_expert_step_matches_single_device(reference):  # noqa: F811
  mesh = make_mesh(MESH)
  rules = wide_expert(POD_RULES, MESH, CFG.n_routed_experts)
  params, compiled, (new, loss, logits, grads) = run_sharded(mesh, rules)
  hlo = compiled.as_text()
  assert "all-to-all" in hlo, "the MoE did not take the expert-parallel (shard_map) path"
  # One whole expert per device, before and after the step.
  for tree in (params, new):
    w = flat(tree)[EXPERT_W]
    assert w.sharding.spec == P(None, ("fsdp", "expert")), w.sharding.spec
    assert w.addressable_shards[0].data.shape[1:] == (1,) + w.shape[2:]
  # No collective moves an expert-weight-sized array (gather of the weights, reduction of their
  # gradients): the local [1, D, F] / [1, F, D] shards only ever meet local ops.
  D, F = CFG.hidden_size, CFG.moe_intermediate_size
  shapes = {f"{a},{b},{c}]" for a in (1, 2, 4, 8) for b, c in ((D, F), (F, D))}
  moved = [l[:160] for l in hlo.splitlines()
           if re.search(r" (all-gather|all-reduce|reduce-scatter)(-start)?\(", l)
           and any(s in l.split("(")[0] for s in shapes)]
  assert not moved, moved
  _compare(reference, float(loss), np.asarray(logits),
           {k: np.asarray(v) for k, v in flat(grads).items()},
           {k: np.asarray(v) for k, v in flat(new).items()}, "wide expert")


@pytest.mark.slow
def test_wide_expert_train_step_compiles_for_tpu_with_pallas():
  """`dsv3 plan --rules wide` on tpu7x:2x2x1 (8 devices, 8 experts: one per device): the train
  step AOT-compiles with every hot path a Pallas kernel, the exchange a ragged all-to-all over
  fsdp x expert, the expert weights whole on each device."""
  pytest.importorskip("libtpu", reason="TPU AOT compile needs libtpu: pip install -e '.[test]'")
  from dsv3_jax.plan import PlanRequest, plan
  from tests.test_plan import check_consistent, small_config
  with jax.default_matmul_precision("default"):  # as tests/test_plan.py: what a TPU run uses
    j = plan(PlanRequest(topology="tpu7x:2x2x1", mode="train", config=small_config(),
                         mesh=MESH, rules="wide", batch_per_device=1, seq=128,
                         kernels="pallas")).to_json()
  check_consistent(j)
  assert j["mesh"] == MESH and j["devices"] == 8
  assert j["rules"]["expert"] == ("fsdp", "expert") and j["rules"]["moe_embed"] is None
  assert j["kernels"] == {"attention": "pallas", "decode": None, "moe": "pallas", "fp8": None}
  assert j["collectives"]["ragged-all-to-all"] > 0


def test_cli_train_wide_experts_that_do_not_split_is_a_one_line_error(tmp_path, capsys):
  import json

  from dsv3_jax.cli import main
  cfg = CFG.replace(n_routed_experts=4, n_group=1, topk_group=1)
  (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_config()))
  rc = main(["train", "--config", str(tmp_path / "config.json"), "--out", str(tmp_path / "run"),
             "--mesh", "fsdp=2,expert=4", "--wide-experts", "--batch", "8", "--seq", "16"])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and len(err.splitlines()) == 1, err
  assert "--wide-experts: wide expert parallelism: 4 routed experts do not split over the 8 " \
         "devices of mesh axes fsdpxexpert" in err
  assert not (tmp_path / "run").exists()


def test_exchange_over_two_axes_with_overflow_rounds():
  """The expert-parallel FFN alone with its experts over (fsdp, expert) (8 shards of 4 of the
  32 experts, 8 tokens each) and every row sent to shard 0 at capacity factor 0.5: 16 exchange
  rounds through the loop over both axes. Against the single-program MoE: forward equal,
  gradients to 1e-5; overflow = all 128 rows but the 8 of shard 0's nominal round."""
  from dsv3_jax.moe import permute, unpermute
  from dsv3_jax.sharding import expert_parallel as ep
  args = list(_case(64))
  args[1] = _skewed(64)
  mesh = make_mesh(MESH)
  rules = wide_expert(ShardingRules(), MESH, E)
  assert ep.exchange_rounds(8, K, E // 8, 8, 0.5) == (8, 8, 16)
  grad = jax.value_and_grad(functools.partial(_loss, capacity_factor=0.5),
                            argnums=(0, 2, 3, 4, 5), has_aux=True)
  with jax.set_mesh(mesh), use_rules(rules):
    assert ep_layout().expert_axes == ("fsdp", "expert")
    (_, (y, overflow)), g = jax.jit(grad, compiler_options=FAST_COMPILE)(*args)

  def local_loss(x, experts, weights, wg, wu, wd):
    xs, order, sizes = permute(x, experts, E)
    y = unpermute(FFN(xs, sizes, wg, wu, wd), order, weights)
    return jnp.sum(jnp.sin(y)), y

  ref = jax.value_and_grad(local_loss, argnums=(0, 2, 3, 4, 5), has_aux=True)
  (_, y_ref), g_ref = jax.jit(ref, compiler_options=FAST_COMPILE)(*args)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
  for a, b, name in zip(g, g_ref, ("x", "weights", "w_gate", "w_up", "w_down")):
    assert np.abs(b).max() > 1e-3
    assert_close(a, b, atol=1e-5, rtol=1e-4, what=f"wide EP grad {name}")
  assert int(overflow) == 64 * K - 8
