"""A GRPO step on 8 simulated devices (fsdp=2, expert=2, tensor=2) equals the single-device
step: log-probs, loss and metrics rtol 1e-5, parameters after 2 AdamW steps atol 1e-6 + rtol
1e-5 (fp32; sharding only reorders sums). Adam eps 1e-3 for the reason given in
tests/test_mesh_entry.py (eps 1e-8 turns reassociation noise of tiny gradients into lr steps)."""
import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import TINY, RuntimeConfig
from dsv3_jax.rl.grpo import GRPOConfig
from dsv3_jax.rl.loop import numpy_advantages
from dsv3_jax.rl.policy import GRPOObjective, PolicyTrainer
from dsv3_jax.sharding import make_mesh
from dsv3_jax.train.optim import OptimConfig
from tests.utils import FAST_COMPILE, assert_close, random_model

CFG = TINY.replace(num_hidden_layers=1, first_k_dense_replace=0)
OPT = OptimConfig(lr=1e-2, warmup_steps=0, total_steps=2, eps=1e-3)
GCFG = GRPOConfig(group_size=4, beta=0.05, temperature=0.9)


def run(mesh, batch_fn):
  """(policy log-probs before training, metrics of 2 GRPO steps, parameters after) on `mesh`."""
  model = random_model(CFG, seed=1, runtime=RuntimeConfig(param_dtype=jnp.float32,
                                                          dtype=jnp.float32))
  pol = PolicyTrainer(model, OPT, mesh=mesh, compiler_options=FAST_COMPILE)
  logp = pol.logprobs(TOKENS, GCFG.temperature)
  batch = batch_fn(logp)
  metrics = [pol.step(GRPOObjective(GCFG), batch) for _ in range(2)]
  params = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(pol.state["params"])[0]}
  return logp, metrics, params


RNG = np.random.default_rng(0)
N, T = 8, 16
TOKENS = RNG.integers(1, CFG.vocab_size, (N, T)).astype(np.int32)


def test_sharded_grpo_step_matches_single_device():
  mask = np.zeros((N, T), np.float32)
  for i in range(N):
    mask[i, 5:5 + int(RNG.integers(3, 11))] = 1.0  # ragged completions, padding after
  adv = numpy_advantages(RNG.integers(0, 3, N).astype(np.float32), 4, GCFG.eps).astype(np.float32)
  noise = RNG.normal(0, 0.3, (N, T)).astype(np.float32)
  batch = None

  def batch_fn(logp):  # the single-device run's batch, reused as is on 8 devices
    nonlocal batch
    if batch is None:
      batch = {"tokens": TOKENS, "mask": mask, "old_logp": (logp + noise) * mask,
               "ref_logp": (logp - 0.1 * noise) * mask, "adv": adv}
    return batch

  lp1, m1, p1 = run(make_mesh({"fsdp": 1}, devices=jax.devices()[:1]), batch_fn)
  lp8, m8, p8 = run(make_mesh({"fsdp": 2, "expert": 2, "tensor": 2}), batch_fn)
  assert_close(lp8, lp1, atol=1e-5, rtol=1e-5, what="policy log-probs")
  assert m1[0]["clip_frac"] > 0 and abs(m1[0]["pg"]) > 0  # the clip and the advantages act
  for a, b in zip(m8, m1):
    for k in ("loss", "pg", "kl", "clip_frac", "grad_norm"):
      assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, what=k)
  assert p1.keys() == p8.keys()
  for k in p1:
    assert_close(p8[k], p1[k], atol=1e-6, rtol=1e-5, what=k)


def test_default_rules_are_the_trainers():
  """Without `rules`, the policy takes the Trainer's defaults (`rules_for_mesh`): the pod rules on
  a mesh without `tensor` (fsdp x expert), the plain rules on one with it."""
  from dsv3_jax.sharding import POD_RULES, ShardingRules
  model = random_model(CFG, seed=1)
  pod = PolicyTrainer(model, OPT, mesh=make_mesh({"fsdp": 2, "expert": 4}),
                      compiler_options=FAST_COMPILE)
  assert pod.rules == POD_RULES != ShardingRules()
  tp = PolicyTrainer(model, OPT, mesh=make_mesh({"fsdp": 2, "expert": 2, "tensor": 2}),
                     compiler_options=FAST_COMPILE)
  assert tp.rules == ShardingRules()
