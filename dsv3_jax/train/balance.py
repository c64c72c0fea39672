"""Aux-loss-free load balancing: the router selection bias follows the observed expert load.

After every optimizer step, for each MoE layer with its step's per-expert load c [E]:
  b_i += gamma * sign(mean(c) - c_i)
so overloaded experts become less likely to be selected and underloaded ones more likely. The bias
is a `dsv3_jax.RouterBias` variable (not an `nnx.Param`): gradients and the optimizer never see
it; this module is its only writer. gamma = 0 freezes it.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.moe import MoE, RouterBias

__all__ = ["router_biases", "bias_update", "update_router_bias", "load_ratio"]


def router_biases(model: nnx.Module) -> list[RouterBias]:
  """The RouterBias variables of `model`'s MoE layers, in the order of `ModelOutput.router_stats`
  (main decoder layer stacks, each [layers, E], then MTP blocks, [E]). Configs without the bias
  (V2-style) give []."""
  blocks = [st.block for st in model.stacks] + [m.block for m in model.mtp]
  return [b.mlp.gate.e_score_correction_bias for b in blocks
          if isinstance(b.mlp, MoE) and b.mlp.gate.e_score_correction_bias is not None]


def bias_update(bias: jax.Array, load: jax.Array, gamma: float | jax.Array) -> jax.Array:
  """bias [..., E] float32, load [..., E] (tokens per expert this step) -> the updated bias."""
  load = load.astype(jnp.float32)
  return (bias + gamma * jnp.sign(jnp.mean(load, -1, keepdims=True) - load)).astype(bias.dtype)


def update_router_bias(model: nnx.Module, router_stats: dict[str, Any] | None,
                       gamma: float | jax.Array) -> None:
  """Applies `bias_update` in place to every RouterBias of `model` from the step's "load" stats
  ([MoE layers, E], stacked in `router_biases` order).

  Works inside jit (the new values are traced). Raises if the stats do not match the layers.
  """
  biases = router_biases(model)
  if not biases:
    return
  load = jax.lax.stop_gradient(router_stats["load"]) if router_stats is not None else None
  rows = sum(v.get_value().shape[0] if v.get_value().ndim == 2 else 1 for v in biases)
  if load is None or load.shape[0] != rows:
    got = 0 if load is None else load.shape[0]
    raise ValueError(f"router stats for {got} MoE layers, but the model has {rows} router biases: "
                     "pass the stats of forward(..., mtp=True) so MTP blocks are included")
  i = 0
  for var in biases:
    b = var.get_value()
    n = b.shape[0] if b.ndim == 2 else 1
    var.set_value(bias_update(b, load[i:i + n].reshape(b.shape), gamma))
    i += n


def load_ratio(router_stats: dict[str, Any] | None) -> jax.Array:
  """max/mean expert load, averaged over MoE layers (1.0 is perfectly balanced); float32 scalar."""
  if router_stats is None:
    return jnp.ones((), jnp.float32)
  load = router_stats["load"].astype(jnp.float32)  # [layers, E]
  return jnp.mean(jnp.max(load, -1) / jnp.maximum(jnp.mean(load, -1), 1e-9))
