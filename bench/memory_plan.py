"""Writes sharding/MEMORY_PLAN.md: the 671B DeepSeek-V3 training layout per device, on paper.

    python bench/memory_plan.py [--out sharding/MEMORY_PLAN.md]

Uses dsv3_jax.sharding.memory (jax.eval_shape only, nothing allocated; the abstract 671B model
takes ~20 s to trace). Meshes are AbstractMeshes, so no TPU is needed.
"""
import argparse
import datetime
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax import DEEPSEEK_V3, RuntimeConfig, abstract_model
from dsv3_jax.sharding import EXPERT, ShardingRules
from dsv3_jax.sharding.memory import GiB, plan_memory

MESHES = [
    ("v5p-256-like", 95, {"fsdp": 16, "expert": 16}),
    ("v6e-256-like", 32, {"fsdp": 16, "expert": 16}),
    ("v6e-256-like, EP=32", 32, {"fsdp": 8, "expert": 32}),
]
BATCH, SEQ = 256, 4096
# Pod rules: the dense weights' head / FFN / vocab dims go over the expert axis too (ZeRO-3 over
# fsdp x expert for every weight); with the defaults (those dims on an absent `tensor` axis)
# q_b/kv_b/o_proj and the dense FFNs would be replicated 16x (12.8 GiB of bf16 parameters).
POD_RULES = ShardingRules(vocab=EXPERT, heads=EXPERT, mlp=EXPERT)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="sharding/MEMORY_PLAN.md")
  args = ap.parse_args(argv)
  cfg = DEEPSEEK_V3
  rt = RuntimeConfig(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
  model = abstract_model(cfg, rt)
  state = nnx.state(model)
  moe_block = model.layers[cfg.first_k_dense_replace]
  gd, bstate = nnx.split(moe_block)

  def block(p, x):
    pos = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
    return nnx.merge(gd, p)(x, pos)[0]

  blocks = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
  rules = POD_RULES
  lines = [
      "# DeepSeek-V3 671B: per-device memory plan (on paper)", "",
      f"Generated {datetime.date.today()} by `python bench/memory_plan.py` with jax "
      f"{jax.__version__} (`dsv3_jax.sharding.memory.plan_memory`; jax.eval_shape only).", "",
      f"Model: the DEEPSEEK_V3 preset ({blocks} blocks incl. 1 MTP), bf16 parameters and "
      f"activations, AdamW with fp32 m, v and master weights (12 B per trainable parameter). "
      f"Global batch {BATCH} x {SEQ} tokens. Rules: `ShardingRules(vocab='expert', heads='expert', "
      "mlp='expert')` (embed over fsdp, routed experts over expert and their FFN dim over tensor "
      "(absent here), the dense weights' head/FFN/vocab dims over expert as well, batch over "
      "data+fsdp+expert); with the default rules those dims map to an absent tensor axis and "
      "q_b/kv_b/o_proj/dense FFNs would be replicated. Parameters and optimizer state are sharded by the same rules "
      "(ZeRO-3 style); gradients one full bf16 set.", "",
      "Activations: the residuals one MoE block's VJP keeps (`jax.eval_shape` of "
      "`jax.vjp(block, params, x)[1]`, the block's own weights not counted), at the per-device "
      "micro-batch; *no remat* multiplies by the number of blocks, *full remat* keeps only each "
      "block's bf16 input plus one block's residuals. The residuals are those of the *reference* "
      "(einsum) attention, which materialises the [heads, T, T] float32 probabilities; a "
      "flash-style kernel removes most of that. Tensor-parallel splitting inside the block is "
      "ignored (upper bound).", ""]
  for name, hbm, shape in MESHES:
    plan = plan_memory(state, rules, shape, batch=BATCH, seq=SEQ, block=block, block_params=bstate,
                       hidden_size=cfg.hidden_size, blocks=blocks, compute_dtype=jnp.bfloat16,
                       vocab_size=cfg.vocab_size)
    local_b = plan.batch // (shape.get("data", 1) * shape.get("fsdp", 1) * shape.get("expert", 1))
    remat = (blocks * local_b * SEQ * cfg.hidden_size * 2 + plan.activations_per_block
             + (plan.activations - plan.activations_per_block * blocks))
    g = lambda b: f"{b / GiB:,.1f}"
    state_total = plan.params + plan.grads + plan.optimizer
    lines += [f"## {name}: mesh {shape} ({hbm} GiB HBM per chip)", "",
              "| per device | GiB |", "|---|---:|",
              f"| parameters (bf16) | {g(plan.params)} |",
              f"| gradients (bf16) | {g(plan.grads)} |",
              f"| AdamW m + v + fp32 master | {g(plan.optimizer)} |",
              f"| **weights + optimizer** | **{g(state_total)}** |",
              f"| activations, one MoE block ({local_b} x {SEQ} tokens) | "
              f"{g(plan.activations_per_block)} |",
              f"| activations, no remat ({blocks} blocks + fp32 logits) | {g(plan.activations)} |",
              f"| activations, full remat | {g(remat)} |",
              f"| **total with full remat** | **{g(state_total + remat)}** |", ""]
    verdict = ("fits" if state_total + remat < hbm * GiB else "does NOT fit")
    lines += [f"Training with full remat {verdict} in {hbm} GiB."
              + (f" Replicated by fallback (dims not divisible): {', '.join(plan.replicated_fallback[:5])}"
                 if plan.replicated_fallback else ""), ""]
    print(name, shape, {k: g(v) for k, v in [("params", plan.params), ("opt", plan.optimizer),
                                             ("act/block", plan.activations_per_block)]})
  lines += ["Reading: on v5p-256 the 671B model trains with EP=16 x FSDP=16 and full remat. "
            "On v6e-256 (32 GiB) the fp32 AdamW state alone (12 B per parameter, 685B with MTP, / 256 ~ 33 GiB) leaves "
            "no room: train on a larger v6e slice, or keep optimizer state in bf16 / offload it; "
            "serving needs only the parameter rows.", ""]
  with open(args.out, "w") as f:
    f.write("\n".join(lines))
  print("wrote", args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
