"""Training: loss vs a numpy reference, MTP target shifts, balance loss, router-bias rule, optimizer
mask and schedule, data packing/resume, kill-and-resume with identical losses.

Oracles: explicit numpy loops written from the formulas in ARCHITECTURE.md (not from our code),
hand-built examples, and the uninterrupted run itself for the resume test.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv3_jax import TINY, DeepseekV3, ModelOutput, RouterBias, RuntimeConfig
from dsv3_jax.errors import UserError
from dsv3_jax.sharding import make_mesh
from dsv3_jax.train import balance, corpus
from dsv3_jax.train.data import DataState, TokenDataset, segments_and_positions, write_tokens
from dsv3_jax.train.loss import LossConfig, balance_loss, training_loss
from dsv3_jax.train.optim import OptimConfig, decay_mask, make_schedule
from dsv3_jax.train.trainer import TrainConfig, Trainer
from tests.utils import FAST_COMPILE, assert_close

# 1 dense layer + 1 MoE layer + 1 MTP depth (MoE): small enough to compile quickly on CPU.
CFG = TINY.replace(num_hidden_layers=2)


# XLA's CPU optimisations off for every program here, eager ops and model init included (the
# steps already compile with FAST_COMPILE): every check is at a stated tolerance, and the exact
# ones (resume) compare runs that both compile inside this module (the same options).
pytestmark = pytest.mark.usefixtures("module_fast_compiles")


def _np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _np_loss(logits, mtp_logits, stats, tokens, seg, lam, alpha, K):
  """Reference written from the definitions with explicit loops."""
  B, T = tokens.shape
  lp = _np_log_softmax(logits)
  nll, n = 0.0, 0
  for b in range(B):
    for i in range(T - 1):
      if seg[b, i] > 0 and seg[b, i + 1] == seg[b, i]:
        nll -= lp[b, i, tokens[b, i + 1]]
        n += 1
  ce = nll / n
  D = mtp_logits.shape[0]
  mtp = 0.0
  for k in range(1, D + 1):
    lpk = _np_log_softmax(mtp_logits[k - 1])
    s, c = 0.0, 0
    for b in range(B):
      for i in range(T - k - 1):  # depth k at position i predicts token i+k+1
        if seg[b, i] > 0 and seg[b, i + k + 1] == seg[b, i]:
          s -= lpk[b, i, tokens[b, i + k + 1]]
          c += 1
    mtp += s / c
  mtp /= D
  bal = 0.0
  for st in stats:
    load, prob = np.asarray(st["seq_load"], np.float64), np.asarray(st["seq_prob"], np.float64)
    E = load.shape[1]
    per_row = [sum(E / (K * T) * load[b, i] * prob[b, i] for i in range(E)) for b in range(B)]
    bal += np.mean(per_row)
  return ce + lam * mtp + alpha * bal, ce, mtp, bal


def test_loss_matches_numpy_reference():
  model = DeepseekV3(CFG, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, CFG.vocab_size, (2, 12)).astype(np.int32)
  seg = np.array([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3], np.int32)  # two documents; padding
  fwd = nnx.jit(lambda m, t: dataclasses.astuple(m.forward(t, mtp=True)))
  out = ModelOutput(*fwd(model, jnp.asarray(tokens)))
  assert out.router_stats["load"].shape[0] == 2  # the MoE layer and the MTP block
  stats = jax.device_get(out.router_stats)
  per_layer = [{k: v[i] for k, v in stats.items()} for i in range(2)]
  lc = LossConfig(mtp_lambda=0.3, balance_alpha=0.05)
  loss, m = training_loss(out, jnp.asarray(tokens), jnp.asarray(seg), lc, CFG.num_experts_per_tok)
  ref, ce, mtp, bal = _np_loss(np.asarray(out.logits), np.asarray(out.mtp_logits),
                               per_layer, tokens, seg, 0.3, 0.05,
                               CFG.num_experts_per_tok)
  assert_close(m["ce"], ce, atol=1e-5, what="ce")
  assert_close(m["mtp_ce"], mtp, atol=1e-5, what="mtp ce")
  assert_close(m["balance"], bal, atol=1e-5, what="balance")
  assert_close(loss, ref, atol=1e-5, what="total")
  assert int(m["tokens"]) == 4 + 6 + 8


def test_mtp_targets_hand_built():
  # Depth k at position i must predict token i+k+1. Logits that put all mass on exactly that
  # token give ~0 loss; the same logits judged one position off give a large loss.
  V, T, D = 16, 7, 2
  tokens = np.array([[3, 9, 4, 11, 7, 2, 5]], np.int32)
  big = 30.0
  mtp = np.zeros((D, 1, T, V), np.float32)
  for k in range(1, D + 1):
    for i in range(T - k - 1):
      mtp[k - 1, 0, i, tokens[0, i + k + 1]] = big
  main = np.zeros((1, T, V), np.float32)
  main[0, np.arange(T - 1), tokens[0, 1:]] = big
  out = ModelOutput(jnp.asarray(main), jnp.asarray(mtp), None, None)
  lc = LossConfig(mtp_lambda=1.0, balance_alpha=0.0)
  _, m = training_loss(out, jnp.asarray(tokens), None, lc, 2)
  exact = np.log1p((V - 1) * np.exp(-big))  # CE of a one-hot-ish logit row
  assert_close(m["mtp_ce"], exact, atol=1e-6, what="mtp ce with right targets")
  assert_close(m["ce"], exact, atol=1e-6, what="ce")
  # Targets one step early (i+k) must be wrong: the loss is ~big for every position.
  wrong = np.zeros_like(mtp)
  for k in range(1, D + 1):
    for i in range(T - k - 1):
      wrong[k - 1, 0, i, tokens[0, i + k]] = big
  _, m2 = training_loss(ModelOutput(jnp.asarray(main), jnp.asarray(wrong), None, None),
                        jnp.asarray(tokens), None, lc, 2)
  assert float(m2["mtp_ce"]) > big - 1


def test_balance_loss_hand_cases():
  # Perfect balance: each of E experts gets T*K/E tokens and P_i = 1/E -> sum_i f_i P_i = 1.
  B, E, K, T = 2, 8, 2, 16
  # Stats stacked over MoE layers: [layers=1, B, E].
  stats = {"seq_load": jnp.full((1, B, E), T * K / E), "seq_prob": jnp.full((1, B, E), 1 / E)}
  assert_close(balance_loss(stats, K), 1.0, atol=1e-6, what="balanced")
  # Collapse: all tokens to experts 0,1 with all probability there -> f = E/K on them, P = 1/2.
  load = jnp.zeros((B, E)).at[:, :2].set(T)
  prob = jnp.zeros((B, E)).at[:, :2].set(0.5)
  assert_close(balance_loss({"seq_load": load[None], "seq_prob": prob[None]}, K), E / K,
               atol=1e-6, what="collapsed")
  # Two layers sum: the balanced and the collapsed one.
  two = {"seq_load": jnp.stack([stats["seq_load"][0], load]),
         "seq_prob": jnp.stack([stats["seq_prob"][0], prob])}
  assert_close(balance_loss(two, K), 1.0 + E / K, atol=1e-6, what="two layers")


def _corpus_file(tmp_path, n_docs=300):
  path = str(tmp_path / "corpus.bin")
  write_tokens(path, corpus.corpus_tokens(corpus.generate_corpus(n_docs, seed=7)))
  return path


def _trainer(path, tmp_dir=None, steps=6, model=None, runtime=RuntimeConfig(), data_seed=3,
             mesh=None, **train_kw):
  data = TokenDataset(path, seq_len=32, batch_size=4, eos_id=0, seed=data_seed, vocab_size=256)
  tc = TrainConfig(steps=steps, optim=OptimConfig(lr=3e-3, warmup_steps=2, total_steps=steps),
                   save_every=3, keep=5, **train_kw)
  # CPU optimisations off: compiling the step, not running a few tiny steps, is the cost here.
  return Trainer(CFG, runtime, tc, data, out_dir=tmp_dir, model=model, mesh=mesh,
                 compiler_options=FAST_COMPILE)


def test_router_bias_has_no_gradient_and_follows_load(tmp_path):
  model = DeepseekV3(CFG, rngs=nnx.Rngs(0))
  moe = model.stacks[1].block.mlp  # the MoE layer stack (one layer: its arrays are [1, ...])
  # Skew the router: expert 0 scores far above the rest for every token; start from a non-zero
  # bias so that any optimizer/weight-decay touch would show.
  moe.gate.kernel.set_value(moe.gate.kernel.get_value().at[..., 0].add(0.5))
  bias0 = np.random.default_rng(1).normal(0, 0.01, CFG.n_routed_experts).astype(np.float32)
  for b in balance.router_biases(model):
    b.set_value(jnp.broadcast_to(jnp.asarray(bias0), b.get_value().shape))
  # The trainer differentiates the Params split off the model; the bias is not among them.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  assert any(isinstance(v, RouterBias) for _, v in nnx.to_flat_state(rest))
  grads = jax.eval_shape(jax.grad(lambda p: nnx.merge(graphdef, p, rest)(
      jnp.ones((1, 8), jnp.int32)).mean()), params)
  assert not any(isinstance(v, RouterBias) for _, v in nnx.to_flat_state(grads))
  assert "e_score_correction_bias" not in str(jax.tree_util.tree_structure(grads))
  tr = _trainer(_corpus_file(tmp_path), model=model, bias_gamma=1e-3)
  opt_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tr.state["opt"])]
  assert opt_paths and not any("e_score_correction_bias" in p for p in opt_paths)
  m = tr.train_step(tr.data.next_batch())
  load = m["layer_load"][0]  # the main MoE layer
  assert load[0] == load.max() and load[0] > 2 * load.mean()  # the skew took hold
  after = np.asarray(balance.router_biases(tr.model)[0].get_value()).reshape(-1)
  expected = bias0 + 1e-3 * np.sign(load.mean() - load)
  assert_close(after, expected, atol=1e-7, what="bias after one step")
  assert after[0] < bias0[0]  # the overloaded expert is pushed down
  # gamma = 0 freezes it.
  tr0 = _trainer(_corpus_file(tmp_path), model=DeepseekV3(CFG, rngs=nnx.Rngs(0)), bias_gamma=0.0)
  tr0.train_step(tr0.data.next_batch())
  assert np.all(np.asarray(balance.router_biases(tr0.model)[0].get_value()) == 0)


def test_kill_and_resume_reproduces_losses(tmp_path):
  path = _corpus_file(tmp_path)
  full = _trainer(path, str(tmp_path / "full"))
  ref = [m["loss"] for m in full.run()]
  ref_state = jax.device_get(full.state)
  full.close()
  first = _trainer(path, str(tmp_path / "cut"))
  losses = [m["loss"] for m in first.run(3)]  # "killed" after the step-3 checkpoint
  first.close()
  resumed = _trainer(path, str(tmp_path / "cut"))
  assert resumed.restore() and resumed.step == 3 and resumed.data.state == DataState(0, 3)
  losses += [m["loss"] for m in resumed.run()]
  assert losses == ref
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state), ref_state)
  assert resumed.checkpointer.all_steps() == [3, 6]
  resumed.close()
  # The data order is part of the run: another data seed cannot resume it.
  other = _trainer(path, str(tmp_path / "cut"), data_seed=4)
  with pytest.raises(UserError, match="data seed 3, this run reads its data with seed 4"):
    other.restore()
  other.close()


def test_remat_step_matches_plain_step(tmp_path):
  # Rematerialisation changes what is stored for the backward pass, not the maths.
  # On one device: remat does not change how the step is partitioned, and the two steps compile
  # ~25% faster than for the default 8-device mesh (remat "full" sharded with expert parallelism
  # is checked against the loop in tests/test_mtp_scan.py).
  path = _corpus_file(tmp_path)
  one = make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
  plain = _trainer(path, mesh=one)
  remat = _trainer(path, runtime=RuntimeConfig(remat="full"), mesh=one)
  for _ in range(2):
    a, b = plain.train_step(plain.data.next_batch()), remat.train_step(remat.data.next_batch())
    assert_close(b["loss"], a["loss"], atol=1e-5, what="loss with remat")
  jax.tree.map(lambda x, y: assert_close(x, y, atol=1e-5, what="params with remat"),
               jax.device_get(remat.state["params"]), jax.device_get(plain.state["params"]))


def test_decay_mask_and_schedules():
  model = DeepseekV3(CFG, rngs=nnx.Rngs(0))
  flat = dict(nnx.to_flat_state(jax.tree.map(lambda x: x, nnx.state(model, nnx.Param))))
  mask = decay_mask(nnx.state(model, nnx.Param))
  for p, m in nnx.to_flat_state(mask):
    assert m.get_value() == (flat[p].get_value().ndim >= 2), p
  c = OptimConfig(lr=1.0, warmup_steps=10, total_steps=110, schedule="cosine", final_lr_ratio=0.1)
  s = make_schedule(c)
  assert_close([s(0), s(5), s(10), s(60), s(110)],
               [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1], atol=1e-6, what="cosine")
  c = dataclasses.replace(c, schedule="constant_decay", decay_start=0.5)  # decay from step 55
  s = make_schedule(c)
  assert_close([s(10), s(54), s(55), s(110), s(200)], [1.0, 1.0, 1.0, 0.1, 0.1], atol=1e-6,
               what="constant then decay")


def test_packing_segments_positions():
  tokens = np.array([[5, 6, 0, 7, 0, 0, 8, 9]])
  seg, pos = segments_and_positions(tokens, eos_id=0)
  np.testing.assert_array_equal(seg, [[1, 1, 1, 2, 2, 3, 4, 4]])
  np.testing.assert_array_equal(pos, [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_dataset_deterministic_resumable_sharded(tmp_path):
  path = str(tmp_path / "t.bin")
  write_tokens(path, np.arange(1000) % 50 + 1)
  def make(**kw):
    return TokenDataset(path, seq_len=10, batch_size=4, eos_id=0, seed=9, **kw)
  a, b = make(), make()
  run_a = [a.next_batch().tokens for _ in range(30)]  # 25 steps per epoch: crosses an epoch
  assert a.state == DataState(1, 5)
  for t in run_a:
    np.testing.assert_array_equal(t, b.next_batch().tokens)
  # Every window appears exactly once per epoch.
  firsts = np.concatenate([t[:, 0] for t in run_a[:25]])
  assert len(set(int(x) for x in np.concatenate([t.ravel() for t in run_a[:25]]))) == 50
  assert firsts.size == 100
  # Resume mid-epoch from the two-integer state.
  c = make(state=DataState.from_dict(DataState(0, 7).to_dict()))
  np.testing.assert_array_equal(c.next_batch().tokens, run_a[7])
  # Two shards split each global batch.
  s0, s1 = make(shard_index=0, num_shards=2), make(shard_index=1, num_shards=2)
  np.testing.assert_array_equal(np.concatenate([s0.next_batch().tokens, s1.next_batch().tokens]),
                                run_a[0])
  with pytest.raises(ValueError, match="vocab_size"):
    make(vocab_size=20).next_batch()


def test_bundled_corpus_is_the_generated_one():
  with open(corpus.corpus_path(), encoding="utf-8") as f:
    assert f.read() == "\n\n".join(corpus.generate_corpus()) + "\n\n"
