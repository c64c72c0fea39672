"""Routing on hand-computed cases."""
import jax.numpy as jnp
import numpy as np

import dsv3_jax
from dsv3_jax.moe import permute, route, unpermute

CFG = dsv3_jax.TINY.replace(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                            routed_scaling_factor=2.0, norm_topk_prob=True)


def _logit(p):
  return np.log(p / (1 - p))


def test_group_limited_sigmoid_routing_by_hand():
  # Sigmoid scores chosen directly; groups of 2 experts: {0,1} {2,3} {4,5} {6,7}.
  s = np.array([[0.9, 0.1, 0.6, 0.55, 0.7, 0.0001, 0.3, 0.3]])
  bias = np.array([0, 0, 0, 0, 0, 0, 0.5, 0.5])
  # choice = s + bias = [.9 .1 | .6 .55 | .7 .0001 | .8 .8]; group top-2 sums: 1.0, 1.15, .7001, 1.6
  # -> keep groups 3 and 1 -> candidates 2,3,6,7 with choice .6 .55 .8 .8 -> experts {6, 7}
  # (expert 0, the best raw score, sits in a dropped group). Weights use raw s: .3,.3 -> .5,.5 * 2.
  r = route(jnp.asarray(_logit(s)), jnp.asarray(bias), CFG)
  assert sorted(np.asarray(r.experts)[0].tolist()) == [6, 7]
  np.testing.assert_allclose(np.asarray(r.weights)[0], [1.0, 1.0], rtol=1e-6)
  # Without the bias: group sums 1.0, 1.15, .7001, .6 -> groups 1, 0 -> experts {0, 2}.
  r = route(jnp.asarray(_logit(s)), None, CFG)
  e = np.asarray(r.experts)[0].tolist()
  assert sorted(e) == [0, 2]
  w = dict(zip(e, np.asarray(r.weights)[0]))
  np.testing.assert_allclose([w[0], w[2]], [2 * 0.9 / 1.5, 2 * 0.6 / 1.5], rtol=1e-6)


def test_v2_max_group_softmax_routing_by_hand():
  cfg = CFG.replace(scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False,
                    routed_scaling_factor=1.0)
  logits = np.log(np.array([[0.05, 0.3, 0.2, 0.2, 0.01, 0.04, 0.1, 0.1]]))
  # Group max: .3, .2, .04, .1 -> keep groups 0, 1 -> top-2 of {.05,.3,.2,.2}: 1 and (2 or 3).
  r = route(jnp.asarray(logits), None, cfg)
  e = np.asarray(r.experts)[0].tolist()
  assert e[0] == 1 and e[1] in (2, 3)
  np.testing.assert_allclose(np.asarray(r.weights)[0], [0.3, 0.2], rtol=1e-5)


def test_v2_group_score_is_the_max_not_the_top2_sum():
  """A case where the V2 group score (max) and V3's (sum of the top-2) keep different groups."""
  cfg = CFG.replace(scoring_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False,
                    routed_scaling_factor=1.0)
  p = np.array([[0.29, 0.01, 0.18, 0.16, 0.155, 0.155, 0.025, 0.025]])
  # Group max: .29, .18, .155, .025 -> keep groups 0, 1 -> experts 0 (.29) and 2 (.18).
  # (Top-2 sums .30, .34, .31, .05 would keep groups 1, 2 -> experts 2 and 3.)
  r = route(jnp.asarray(np.log(p)), None, cfg)
  assert np.asarray(r.experts)[0].tolist() == [0, 2]
  np.testing.assert_allclose(np.asarray(r.weights)[0], [0.29, 0.18], rtol=1e-5)


def test_permute_unpermute_is_a_dropless_weighted_combine():
  rng = np.random.RandomState(0)
  x = rng.randn(5, 3).astype(np.float32)
  experts = np.array([[0, 2], [2, 1], [3, 0], [2, 3], [1, 2]], np.int32)
  weights = rng.rand(5, 2).astype(np.float32)
  xs, order, sizes = permute(jnp.asarray(x), jnp.asarray(experts), 4)
  assert np.asarray(sizes).tolist() == [2, 2, 4, 2]  # every (token, expert) pair kept
  flat_e = experts.reshape(-1)[np.asarray(order)]
  assert np.all(np.diff(flat_e) >= 0)  # grouped by expert
  ys = np.asarray(xs) * (1 + flat_e[:, None])  # "expert e multiplies by e+1"
  got = unpermute(jnp.asarray(ys), order, jnp.asarray(weights))
  want = sum(weights[:, k:k + 1] * x * (1 + experts[:, k:k + 1]) for k in range(2))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)


def test_top_k_matches_a_stable_descending_sort():
  """`moe.top_k` (k rounds of a max) against numpy's stable argsort of -x (descending, lower index
  first among equal values): exact values and indices, with many ties and rows of -inf (masked
  groups), for every k the router uses."""
  from dsv3_jax.moe import top_k
  rng = np.random.default_rng(0)
  x = rng.integers(0, 4, (96, 64)).astype(np.float32)  # values 0..3: ties everywhere
  x[:16, 20:] = -np.inf
  x[16:24] = -np.inf
  x[24:40] = rng.standard_normal((16, 64)).astype(np.float32)
  for k in (1, 2, 4, 8, 64):
    values, indices = top_k(jnp.asarray(x), k)
    want = np.argsort(-x, axis=-1, kind="stable")[:, :k]
    np.testing.assert_array_equal(np.asarray(indices), want)
    np.testing.assert_array_equal(np.asarray(values), np.take_along_axis(x, want, -1))
    assert indices.dtype == jnp.int32


def test_route_weight_gradient_is_the_chosen_scores():
  """d(sum_k c_k w_k)/d logits through the one-hot select: only the chosen experts' logits get a
  gradient, in closed form (unnormalised sigmoid weights: d w / d logit = s (1 - s))."""
  import jax
  cfg = CFG.replace(norm_topk_prob=False, routed_scaling_factor=1.0)
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.standard_normal((5, 8)).astype(np.float32))
  c = jnp.asarray(rng.standard_normal((5, 2)).astype(np.float32))
  g = jax.grad(lambda l: (route(l, None, cfg).weights * c).sum())(logits)
  r = route(logits, None, cfg)
  s = np.asarray(jax.nn.sigmoid(logits))
  want = np.zeros((5, 8), np.float32)
  for n in range(5):
    for k, e in enumerate(np.asarray(r.experts)[n]):
      want[n, e] += float(c[n, k]) * s[n, e] * (1 - s[n, e])
  np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-7)
