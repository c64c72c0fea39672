"""Aux-loss-free load balancing: the router selection bias follows the observed expert load.

After every optimizer step, for each MoE layer with its step's per-expert load c [E]:
  b_i += gamma * sign(mean(c) - c_i)
so overloaded experts become less likely to be selected and underloaded ones more likely. The bias
is a `dsv3_jax.RouterBias` variable (not an `nnx.Param`): gradients and the optimizer never see
it; this module is its only writer. gamma = 0 freezes it.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.moe import MoE, RouterBias

__all__ = ["router_biases", "bias_update", "update_router_bias", "load_ratio"]


def router_biases(model: nnx.Module) -> list[RouterBias]:
  """The RouterBias variables of `model`'s MoE layers, in the order of `ModelOutput.router_stats`
  (main decoder layers, then MTP blocks). Configs without the bias (V2-style) give []."""
  out = []
  blocks = list(model.layers) + [m.block for m in model.mtp]
  for layer in blocks:
    if isinstance(layer.mlp, MoE) and layer.mlp.gate.e_score_correction_bias is not None:
      out.append(layer.mlp.gate.e_score_correction_bias)
  return out


def bias_update(bias: jax.Array, load: jax.Array, gamma: float | jax.Array) -> jax.Array:
  """bias [E] float32, load [E] (tokens per expert this step) -> the updated bias [E] float32."""
  load = load.astype(jnp.float32)
  return (bias + gamma * jnp.sign(jnp.mean(load) - load)).astype(bias.dtype)


def update_router_bias(model: nnx.Module, router_stats: Sequence[dict[str, Any]],
                       gamma: float | jax.Array) -> None:
  """Applies `bias_update` in place to every RouterBias of `model` from the step's "load" stats.

  Works inside jit (the new values are traced). Raises if the stats do not match the layers.
  """
  biases = router_biases(model)
  if not biases:
    return
  if len(biases) != len(router_stats):
    raise ValueError(f"{len(router_stats)} router stats for {len(biases)} router biases: pass the "
                     "stats of forward(..., mtp=True) so MTP blocks are included")
  for var, stats in zip(biases, router_stats):
    var.set_value(bias_update(var.get_value(), jax.lax.stop_gradient(stats["load"]), gamma))


def load_ratio(router_stats: Sequence[dict[str, Any]]) -> jax.Array:
  """max/mean expert load, averaged over MoE layers (1.0 is perfectly balanced); float32 scalar."""
  if not router_stats:
    return jnp.ones((), jnp.float32)
  r = [jnp.max(s["load"]).astype(jnp.float32) / jnp.maximum(jnp.mean(s["load"].astype(jnp.float32)), 1e-9)
       for s in router_stats]
  return jnp.mean(jnp.stack(r))
