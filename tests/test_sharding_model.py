"""The tiny model sharded on 8 simulated CPU devices (and on 2 processes x 4 devices) matches
the single-device run: logits, gradients and one SGD step, with parameters really sharded.

Tolerances (fp32, matmul precision "highest"): logits atol 1e-5; gradients atol 1e-6 + rtol 1e-4.
Sharding only reorders float32 sums (psum over tensor/fsdp partial products), observed errors are
~2e-7 on logits and ~1e-9 on gradients; a routing or permutation bug gives O(1e-2) errors.
"""
import os

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dsv3_jax.sharding import ShardingRules, make_mesh
from tests.sharding_case import CFG
from tests.sharding_case import build, flat, run_sharded
from tests.utils import ROOT, assert_close, free_port, run_processes

MESHES = {
    "ep8": {"expert": 8},
    "ep4_data2": {"data": 2, "expert": 4},
    "fsdp2_tp2_ep2": {"fsdp": 2, "tensor": 2, "expert": 2},
    # The rules of sharding/MEMORY_PLAN.md: dense head/FFN/vocab dims over the expert axis too.
    "fsdp2_ep4_pod_rules": {"fsdp": 2, "expert": 4},
}
# `dsv3 plan`'s pod rules: dense head/FFN/vocab dims over `expert`, the low-rank attention
# projections over both axes (rank dims on `fsdp`, hidden / heads dims on `expert`).
POD_RULES = ShardingRules(vocab="expert", heads="expert", mlp="expert", lora_in="expert",
                          q_lora="fsdp", kv_lora="fsdp")
EXPERT_W = "stacks.0.block.mlp.experts.gate_proj"  # [layers, E, D, F]


@pytest.fixture(scope="module")
def reference():
  step, params, rest, tok = build()
  new, loss, logits, grads = step(params, rest, tok)
  return {"params": flat(params), "loss": float(loss), "logits": np.asarray(logits),
          "grads": {k: np.asarray(v) for k, v in flat(grads).items()},
          "new": {k: np.asarray(v) for k, v in flat(new).items()}}


def _compare(ref, loss, logits, grads, new, what):
  assert_close(loss, ref["loss"], atol=1e-5, what=f"{what} loss")
  assert_close(logits, ref["logits"], atol=1e-5, what=f"{what} logits")
  assert set(grads) == set(ref["grads"])
  for k, g in grads.items():
    assert_close(g, ref["grads"][k], atol=1e-6, rtol=1e-4, what=f"{what} grad {k}")
    assert_close(new[k], ref["new"][k], atol=1e-6, rtol=1e-5, what=f"{what} updated {k}")
  # The step really moved the experts (SGD: p - lr * g), so the gradient check is not vacuous.
  assert np.abs(ref["grads"][EXPERT_W]).max() > 1e-4


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_step_matches_single_device(name, reference):
  mesh = make_mesh(MESHES[name])
  rules = POD_RULES if name.endswith("pod_rules") else ShardingRules()
  params, compiled, (new, loss, logits, grads) = run_sharded(mesh, rules)
  hlo = compiled.as_text()
  assert "all-to-all" in hlo, "the MoE did not take the expert-parallel (shard_map) path"
  # Vocab tables sharded over every batch axis (the pod rules): their gradients leave as
  # reduce-scatters into the shards; no device all-reduces a full-size [vocab, hidden] partial
  # gradient (GSPMD's own partitioning of the lookup and the head did, 7 GiB at 671B).
  if rules is POD_RULES:
    V, D = CFG.vocab_size, CFG.hidden_size
    full = [l[:120] for l in hlo.splitlines() if " all-reduce(" in l and any(
        f"[{a},{b}]" in l.split(" all-reduce(")[0] for a, b in ((V, D), (D, V)))]
    assert not full, full
    assert "reduce-scatter" in hlo

  # Parameters are sharded before and after the step, as the rules say.
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  expect = {"ep8": P(None, "expert"), "ep4_data2": P(None, "expert"),
            "fsdp2_tp2_ep2": P(None, "expert", "fsdp", "tensor"),
            "fsdp2_ep4_pod_rules": P(None, "expert", "fsdp")}[name]
  for tree in (params, new):
    w = flat(tree)[EXPERT_W]
    assert w.sharding.spec == expect, w.sharding.spec
    assert w.addressable_shards[0].data.shape[1] == w.shape[1] // sizes["expert"]
  if "tensor" in sizes:
    assert (flat(new)["stacks.0.block.mlp.shared_experts.gate_proj.kernel"].sharding.spec
            == P(None, "fsdp", "tensor"))
    assert flat(new)["embed_tokens"].sharding.spec == P("tensor", "fsdp")
  if rules is POD_RULES:
    from dsv3_jax.plan import POD_RULES as PLAN_POD_RULES
    assert POD_RULES == PLAN_POD_RULES  # what `dsv3 plan` compiles is what this test runs
    assert flat(new)["stacks.0.block.self_attn.o_proj.kernel"].sharding.spec == P(None, "expert", "fsdp")
    assert flat(new)["embed_tokens"].sharding.spec == P("expert", "fsdp")
    attn = "stacks.0.block.self_attn."
    for w, spec in (("q_a_proj", P(None, "expert", "fsdp")), ("q_b_proj", P(None, "fsdp", "expert")),
                    ("kv_a_proj_with_mqa", P(None, "expert", "fsdp")),
                    ("kv_b_proj", P(None, "fsdp", "expert"))):
      assert flat(new)[attn + w + ".kernel"].sharding.spec == spec, (w, spec)
  _compare(reference, float(loss), np.asarray(logits),
           {k: np.asarray(v) for k, v in flat(grads).items()},
           {k: np.asarray(v) for k, v in flat(new).items()}, name)


def test_two_process_expert_parallel_matches_single_process(reference, tmp_path):
  out = tmp_path / "mh.npz"
  port = free_port()
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  run_processes([["-m", "tests.multihost_worker", str(i), str(port), str(out)] for i in range(2)],
                env, timeout=240)
  got = dict(np.load(out))
  grads = {k[5:]: v for k, v in got.items() if k.startswith("grad.")}
  new = {k[4:]: v for k, v in got.items() if k.startswith("new.")}
  _compare(reference, float(got["loss"]), got["logits"], grads, new, "2 processes")
