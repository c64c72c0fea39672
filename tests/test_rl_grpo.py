"""GRPO loss, advantages and rewards against numpy references on hand-made inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.rl.grpo import GRPOConfig, group_advantages, grpo_loss, token_logprobs
from dsv3_jax.rl.loop import numpy_advantages
from dsv3_jax.rl.rewards import (Example, combined_reward, correctness_reward, extract_answer,
                                 format_reward, parse_number, split_think)
from tests.utils import assert_close


def np_grpo(logp, old, ref, adv, mask, cfg):
  """Loss and d loss / d logp, written out by hand (float64)."""
  logp, old, ref, adv, mask = (np.asarray(x, np.float64) for x in (logp, old, ref, adv, mask))
  ratio = np.exp(logp - old)
  a = adv[:, None]
  unclipped, clipped = ratio * a, np.clip(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high) * a
  take_unclipped = unclipped <= clipped
  pg = -np.minimum(unclipped, clipped)
  d = ref - logp
  kl = np.exp(d) - d - 1
  tok = pg + cfg.beta * kl
  n = mask.sum(1)
  rows = n > 0
  loss = np.sum((tok * mask).sum(1)[rows] / n[rows]) / rows.sum()
  # d pg / d logp = -A * ratio on the unclipped branch, 0 where the clipped (constant) one is min.
  dtok = np.where(take_unclipped, -a * ratio, 0.0) + cfg.beta * (1 - np.exp(d))
  grad = np.where(rows[:, None], dtok * mask / np.maximum(n, 1)[:, None], 0.0) / rows.sum()
  return loss, grad, np.sum(~take_unclipped & (mask > 0)) / mask.sum()


def hand_batch():
  # 3 rollouts x 5 tokens; row 0: ratios inside the clip range; row 1: ratios far outside (clip
  # active for A > 0 above 1.2, for A < 0 below 0.8); row 2: padding only.
  logp = np.array([[-1.0, -0.5, -2.0, -1.2, 9.0],
                   [-0.2, -3.0, -0.1, -2.5, -1.0],
                   [5.0, -7.0, 3.0, 0.0, 1.0]], np.float32)
  old = np.array([[-1.1, -0.45, -2.05, -1.2, -1.0],
                  [-1.0, -1.0, -1.5, -1.0, -1.0],
                  [-1.0, -1.0, -1.0, -1.0, -1.0]], np.float32)
  ref = np.array([[-0.9, -0.7, -1.5, -1.0, -1.0],
                  [-0.5, -2.0, -0.3, -2.0, -1.0],
                  [-1.0, -1.0, -1.0, -1.0, -1.0]], np.float32)
  mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], np.float32)
  return logp, old, ref, mask


@pytest.mark.parametrize("adv", [[1.3, 0.7, 0.5], [-0.8, -1.1, 2.0]])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_grpo_loss_and_grad_match_numpy(adv, beta):
  cfg = GRPOConfig(group_size=2, beta=beta, clip_low=0.2, clip_high=0.2)
  logp, old, ref, mask = hand_batch()
  adv = np.array(adv, np.float32)
  want_loss, want_grad, want_clip = np_grpo(logp, old, ref, adv, mask, cfg)
  f = lambda lp: grpo_loss(lp, old, ref, adv, mask, cfg)  # noqa: E731
  (loss, m), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logp))
  assert_close(loss, want_loss, atol=1e-6, rtol=1e-6, what="loss")
  assert_close(grad, want_grad, atol=1e-6, rtol=1e-6, what="d loss / d logp")
  assert_close(m["clip_frac"], want_clip, atol=1e-7, what="clip fraction")
  # The batch exercises both branches: some tokens clipped (zero pg gradient), some not.
  assert 0 < want_clip < 1
  # Padding is ignored: any log-probs at masked positions leave loss and gradient unchanged.
  lp2 = np.where(mask > 0, logp, -50.0).astype(np.float32)
  (loss2, _), grad2 = jax.value_and_grad(f, has_aux=True)(jnp.asarray(lp2))
  assert_close(loss2, want_loss, atol=1e-6, rtol=1e-6, what="loss, other padding values")
  assert np.all(np.asarray(grad2)[mask == 0] == 0)


def test_kl_term_is_k3():
  cfg = GRPOConfig(group_size=2, beta=1.0)
  logp, old, ref, mask = hand_batch()
  zero = np.zeros(3, np.float32)
  loss, m = grpo_loss(jnp.asarray(logp), old, ref, zero, mask, cfg)  # A = 0: loss is beta * KL
  d = (ref - logp).astype(np.float64)
  k3 = np.exp(d) - d - 1
  rows = [(k3[i] * mask[i]).sum() / mask[i].sum() for i in (0, 1)]
  assert_close(loss, np.mean(rows), atol=1e-6, rtol=1e-6, what="beta * mean k3")
  assert_close(m["kl"], (k3 * mask).sum() / mask.sum(), atol=1e-6, rtol=1e-6, what="kl metric")
  assert np.all(k3 >= 0)
  # k3 is unbiased: E_{x~pi}[k3] = KL(pi || ref) (Monte Carlo over a small categorical).
  rng = np.random.default_rng(0)
  pi, rf = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.5, 0.3])
  x = rng.choice(3, size=400_000, p=pi)
  dd = np.log(rf[x]) - np.log(pi[x])
  assert abs(np.mean(np.exp(dd) - dd - 1) - np.sum(pi * np.log(pi / rf))) < 3e-3


def test_equal_rewards_give_zero_policy_gradient():
  cfg = GRPOConfig(group_size=4, beta=0.0)
  logp, old, ref, mask = hand_batch()
  rewards = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
  adv = group_advantages(rewards, 4, cfg.eps)
  assert np.all(np.asarray(adv) == 0)
  grad = jax.grad(lambda lp: grpo_loss(lp, old, ref, adv[:3], mask, cfg)[0])(jnp.asarray(logp))
  assert np.all(np.asarray(grad) == 0)


def test_advantages_normalised_per_group():
  rewards = np.array([1.0, 0.0, 0.0, 0.5, 2.0, 2.0, 3.0, 7.0, 0.2, 0.2, 0.2, 0.2], np.float32)
  got = np.asarray(group_advantages(jnp.asarray(rewards), 4, 1e-4))
  want = numpy_advantages(rewards, 4, 1e-4)
  assert_close(got, want, atol=1e-5, what="advantages")
  r = rewards.reshape(3, 4)
  by_hand = (r[1] - r[1].mean()) / (r[1].std() + 1e-4)
  assert_close(got[4:8], by_hand, atol=1e-5, what="group 1")
  assert np.all(got[8:] == 0)  # all-equal group
  # Groups are independent: changing group 0's rewards leaves the others' advantages alone.
  other = rewards.copy()
  other[:4] = [9.0, -3.0, 1.0, 1.0]
  assert_close(np.asarray(group_advantages(jnp.asarray(other), 4, 1e-4))[4:], got[4:], atol=0,
               what="other groups")


def test_token_logprobs():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 4, 7)).astype(np.float32)
  tokens = rng.integers(0, 7, (2, 4))
  got = np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(tokens), 0.7))
  z = logits / 0.7
  lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  want = np.zeros((2, 4))
  for b in range(2):
    for t in range(1, 4):
      want[b, t] = lp[b, t - 1, tokens[b, t]]
  assert_close(got, want, atol=1e-5, what="token log-probs")


def test_rewards_edge_cases():
  ex = Example("12+7", "19")
  assert correctness_reward("<think>12+7</think>19", ex) == 1.0
  assert correctness_reward("<think>x</think> +19.0 ", ex) == 1.0
  assert correctness_reward("19", ex) == 0.0  # no verifiable answer outside the R1 format
  assert format_reward("19", ex) == 0.0
  assert format_reward("  <think>a</think>19", ex) == 1.0
  for bad in ("<think>12+7</think>", "<think>12+7 19", "12+7</think>19", "<think><think></think>1",
              "<think>a</think>1</think>2", "</think><think>19", ""):
    assert format_reward(bad, ex) == 0.0, bad
  for wrong in ("<think></think>18", "<think></think>19.5", "<think></think>1 9", "<think></think>19a",
                "<think></think>1.9.", "<think></think>--19", "<think></think>1e1", "", "<think>19",
                "<think>a</think>x</think>19", "19</think>19"):
    assert correctness_reward(wrong, ex) == 0.0, wrong
  assert correctness_reward("7", Example("q", "seven")) == 0.0  # reference not a number
  assert parse_number("-3") == -3 and parse_number(".5") * 2 == 1 and parse_number("2.50") * 2 == 5
  assert parse_number("1e3") is None and parse_number("") is None and parse_number("+-1") is None
  assert extract_answer("<think>a</think>b</think> c ") == "c"
  assert split_think("<think>why</think> 42") == ("why", "42")
  assert combined_reward("<think></think>19", ex) == 1.5
  assert combined_reward("<think></think>18", ex, {"correct": 1.0, "format": 0.2}) == 0.2
