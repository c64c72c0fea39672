"""The shared case of the sharded-model tests and the multi-host worker.

Import only after the process's JAX environment (platform, device count) is set. One jitted
training step returns the loss, logits and gradients, so one compile per mesh checks forward,
backward and the parameter update.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dsv3_jax.config import TINY, RuntimeConfig
from dsv3_jax.pretrained import model_from_arrays
from dsv3_jax.sharding import ShardingRules, activation_sharding, state_shardings, use_rules
from tests.utils import FAST_COMPILE, random_arrays

# One MoE layer, no MTP (keeps XLA:CPU compile time small); 8 experts over up to 8 shards.
CFG = TINY.replace(num_hidden_layers=1, first_k_dense_replace=0, num_nextn_predict_layers=0)
LR = 0.1
# BATCH * SEQ >= vocab: the embedding and head take the gathered-table path (`sharding.gathered`).
BATCH, SEQ = 8, 32


def tokens() -> np.ndarray:
  return np.random.default_rng(0).integers(0, CFG.vocab_size, (BATCH, SEQ), dtype=np.int32)




def random_state(mesh=None, rules: ShardingRules | None = None):
  """-> (graphdef, params, rest): `tests.utils.random_arrays(CFG, 1, std=0.05)` (numpy, no jax
  compile: eager/jitted nnx init costs ~20 s of XLA:CPU compile here) in the model, sharded per
  `rules` on `mesh`. Weights ~ N(0, 0.05^2), norm scales 1 + N(0, 0.1^2), router bias ~
  N(0, 0.3^2)."""
  model = model_from_arrays(CFG, RuntimeConfig(), random_arrays(CFG, 1, std=0.05))
  graphdef, state = nnx.split(model)
  if mesh is not None:
    state = jax.device_put(state, state_shardings(state, rules, mesh))
  model = nnx.merge(graphdef, state)
  return nnx.split(model, nnx.Param, ...)


def build(mesh=None, rules: ShardingRules | None = None):
  """-> (jitted step, params State, rest State, tokens array). step(params, rest, tokens) ->
  (new params, loss, logits [B, T, V], grads). With a mesh, parameters are placed sharded and
  the step keeps them so (in/out shardings from the rules)."""
  graphdef, params, rest = random_state(mesh, rules)
  tx = optax.sgd(LR)

  def step(params, rest, toks):
    def loss_fn(p):
      logits = nnx.merge(graphdef, p, rest)(toks)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], toks[:, 1:])
      return ce.mean(), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates), loss, logits, grads

  tok = tokens()
  if mesh is None:
    return jax.jit(step, compiler_options=FAST_COMPILE), params, rest, jnp.asarray(tok)
  ps, rs = state_shardings(params, rules, mesh), state_shardings(rest, rules, mesh)
  ts = activation_sharding(("batch", "sequence"), rules, mesh, tok.shape)
  tok = jax.make_array_from_callback(tok.shape, ts, lambda idx: tok[idx])
  jitted = jax.jit(step, in_shardings=(ps, rs, ts), out_shardings=(ps, None, None, ps),
                   compiler_options=FAST_COMPILE)
  return jitted, params, rest, tok


def run_sharded(mesh, rules: ShardingRules):
  """`build(mesh, rules)`, compiled and run once under that mesh and rules -> (params before the
  step, compiled step (for its HLO), (new params, loss, logits, grads))."""
  step, params, rest, tok = build(mesh, rules)
  with jax.set_mesh(mesh), use_rules(rules):
    compiled = step.lower(params, rest, tok).compile()
    return params, compiled, compiled(params, rest, tok)


def flat(tree) -> dict[str, jax.Array]:
  """{"layers.1.mlp.experts.gate_proj": array} for a State / pytree of Variables."""
  out = {}
  for path, v in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
    key = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    out[key] = v.get_value() if isinstance(v, nnx.Variable) else v
  return out
