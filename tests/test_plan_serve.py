"""`dsv3 plan --mode serve` compiles the serving engine's own programs for a TPU (libtpu AOT on
CPU, v5p 2x2x1, a reduced config with one MoE layer): `serving.steps.forward_step`
(prefill chunk) and `decode_steps`, through the engine's builder `steps.jit_step`, over the page
pool split across the batch shards, with every hot path a Pallas (Mosaic) kernel: the paged
`mla_decode`, the grouped matmul, and the in-place rope-pool write.

Oracles: the optimized HLO text itself (module names, custom-call kernel names and the names of
the code that emitted them, copy/transpose/scatter ops and their shapes) and shape arithmetic
for the pool. Fails if a hot path fell back to the jnp reference."""
import os
import re

import jax
import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import dsv3_jax.plan as plan_mod  # noqa: E402
from dsv3_jax.plan import PlanRequest, plan  # noqa: E402
from tests.test_cache_layout import copy_bytes  # noqa: E402
from tests.test_plan import check_consistent, small_config  # noqa: E402

pytest.importorskip("libtpu", reason="TPU AOT compile needs libtpu: pip install -e '.[test]'")

CUSTOM = re.compile(r"%([\w.-]+) = [^\n]*custom_call_target=\"tpu_custom_call\"[^\n]*")


@pytest.fixture(scope="module")
def compiled():
  """(plan JSON, {step: optimized HLO text}) for 4 rows x context 512 in pages of 128."""
  texts = []
  count = plan_mod.count_kernels

  def spy(hlo):
    texts.append(hlo)
    return count(hlo)

  plan_mod.count_kernels = spy
  try:
    with jax.default_matmul_precision("default"):  # as a TPU run (see test_plan.py)
      j = plan(PlanRequest(topology="v5p:2x2x1", mode="serve",
                           config=small_config(layers=1),
                           decode_batch=4, context=512, prefill_chunk=64,
                           kernels="pallas")).to_json()
  finally:
    plan_mod.count_kernels = count
  return j, dict(zip(("prefill", "decode"), texts))


def test_engine_steps_compile_with_every_hot_path_pallas(compiled):
  j, hlo = compiled
  check_consistent(j)
  assert j["kernels"] == {"attention": None, "decode": "pallas", "moe": "pallas", "fp8": None}
  g = j["config"]
  # The engine's layout: 4 batch shards (mesh expert=4), one row and 4 pages (+ scratch) each.
  assert (g["pool_split"], g["pool_shards"], g["step_rows"], g["pages_per_seq"]) == (
      True, 4, 4, 4)
  assert j["cache_bytes"] == 1 * 5 * 128 * (128 + 64) * 2  # layers x pages x rows x values
  for step, module in (("prefill", "jit_forward_step"), ("decode", "jit_decode_steps")):
    text = hlo[step]
    assert text.startswith(f"HloModule {module}"), (step, text[:80])
    calls = CUSTOM.findall(text)
    lines = [m.group(0) for m in CUSTOM.finditer(text)]
    # Paged decode attention (the kernel_map of paged_attention_steps), grouped matmul, and the
    # rope write kernel: no jnp reference attention or scatter into the rope pool.
    assert any("mla_decode" in n and "mla_decode_paged" in l for n, l in zip(calls, lines)), step
    assert any("gmm" in n or "grouped" in n for n in calls), (step, calls)
    assert any("mla_rope_write" in n for n in calls), (step, calls)
    assert "bf16[1,5,64,128]" in text  # the rope pool shard
    assert not re.search(r"= bf16\[1,5,64,128\][^\n]* scatter\(", text), step
    # Nothing copies or re-lays out the pool's rope or latent part (5 x 128 rows of 64 or 128).
    assert copy_bytes(text, 5 * 128 * 64 * 2, dim=5) == [], step
