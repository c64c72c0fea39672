"""Wide expert parallelism (`sharding.wide_expert`): the routed experts whole, one per device over
the fsdp x expert axes (8 experts on 8 simulated CPU devices), the expert-parallel exchange over
both axes. The sharded train step equals the single-device one, no expert weight is gathered and
no expert-weight gradient is reduced; the same step AOT-compiles for TPU with Pallas kernels.

Tolerances as tests/test_sharding_model.py (fp32, "highest"): logits atol 1e-5, gradients atol
1e-6 + rtol 1e-4; a routing or permutation bug gives O(1e-2) errors.
"""
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dsv3_jax.sharding import ShardingRules, ep_layout, make_mesh, use_rules, wide_expert
from tests.sharding_case import CFG, build, flat
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
  step, params, rest, tok = build(mesh, rules)
  with jax.set_mesh(mesh), use_rules(rules):
    compiled = step.lower(params, rest, tok).compile()
    new, loss, logits, grads = compiled(params, rest, tok)
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
