"""Sampling (top-k / top-p / temperature), the speculative rejection rule, and the tokenizer.

Statistical tests use fixed seeds and a chi-square goodness-of-fit bound at significance 1e-4:
critical values chi2_{0.9999}(df) = 18.42 (df 2), 21.11 (df 3), 23.51 (df 4), 25.74 (df 5).
Besides the bound, no token outside the allowed support may ever appear.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.inference import SamplingParams, Tokenizer, probabilities, rejection_sample, sample

CHI2_CRIT = {2: 18.42, 3: 21.11, 4: 23.51, 5: 25.74}
PROBS = np.array([0.30, 0.22, 0.16, 0.12, 0.08, 0.05, 0.04, 0.02, 0.007, 0.003])
PERM = np.array([3, 7, 0, 9, 5, 1, 8, 2, 6, 4])  # token PERM[i] has probability PROBS[i]


def oracle(temperature, top_k, top_p):
  """Closed-form target distribution over the 10 tokens (numpy, independent of the code)."""
  p = PROBS ** (1.0 / temperature)
  p = p / p.sum()  # softmax(log p / T); PROBS is sorted descending
  if top_k:
    p[top_k:] = 0
    p = p / p.sum()
  if top_p < 1.0:
    before = np.cumsum(p) - p
    p[before >= top_p] = 0
    p = p / p.sum()
  out = np.zeros(10)
  out[PERM] = p
  return out


def chi2(counts, expected_p):
  n = counts.sum()
  support = expected_p > 0
  e = n * expected_p[support]
  return float(((counts[support] - e) ** 2 / e).sum()), int(support.sum()) - 1


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 4, 1.0),    # top-k only: 4 tokens
    (1.0, 0, 0.62),   # nucleus: 0.30 + 0.22 + 0.16 = 0.68 >= 0.62 -> 3 tokens
    (0.7, 6, 0.8),    # temperature, then top-k 6, then top-p on the renormalised 6
    (1.5, 0, 0.5),
])
def test_sampling_support_and_frequencies(temperature, top_k, top_p):
  logits = np.zeros(10, np.float32)
  logits[PERM] = np.log(PROBS)
  params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
  want = oracle(temperature, top_k, top_p)
  N = 20000
  batch = jnp.broadcast_to(jnp.asarray(logits), (N, 10))
  draws = np.asarray(jax.jit(lambda k, l: sample(k, l, params))(jax.random.key(123), batch))
  counts = np.bincount(draws, minlength=10)
  assert set(np.flatnonzero(counts)) <= set(np.flatnonzero(want)), "token outside the support"
  stat, df = chi2(counts, want)
  assert 2 <= df <= 5
  assert stat < CHI2_CRIT[df], (stat, df, counts, want)
  np.testing.assert_allclose(np.asarray(probabilities(jnp.asarray(logits[None]), params))[0], want,
                             atol=1e-6)


def test_greedy_is_argmax_and_params_validate():
  logits = jnp.asarray(np.random.RandomState(0).randn(5, 33), jnp.float32)
  assert np.array_equal(np.asarray(sample(jax.random.key(0), logits, SamplingParams())),
                        np.argmax(np.asarray(logits), -1))
  for bad in (dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)):
    with pytest.raises(ValueError):
      SamplingParams(**bad)


def test_rejection_rule_outputs_target_distribution():
  """Drafts d ~ q; the kept token must be distributed as p, and the acceptance rate must be
  sum_v min(p_v, q_v) (binomial, 5 sigma)."""
  p = np.array([0.05, 0.40, 0.25, 0.0, 0.30])
  q = np.array([0.30, 0.10, 0.25, 0.20, 0.15])
  N = 40000
  kd, ka, kr = jax.random.split(jax.random.key(5), 3)
  P, Q = jnp.broadcast_to(jnp.asarray(p, jnp.float32), (N, 5)), jnp.broadcast_to(
      jnp.asarray(q, jnp.float32), (N, 5))
  draft = jax.random.categorical(kd, jnp.log(Q), axis=-1).astype(jnp.int32)
  tok, acc = jax.jit(rejection_sample)(ka, kr, P, Q, draft)
  tok, acc = np.asarray(tok), np.asarray(acc)
  counts = np.bincount(tok, minlength=5)
  assert counts[3] == 0  # p = 0 token never kept
  stat, df = chi2(counts, p)
  assert stat < CHI2_CRIT[df], (stat, counts)
  rate = np.minimum(p, q).sum()
  assert abs(acc.mean() - rate) < 5 * np.sqrt(rate * (1 - rate) / N), (acc.mean(), rate)


def _write_tokenizer(path, *, template=True):
  from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
  tok = HFTokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<unk>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 20,
                          trainer=trainer)
  tok.save(str(path / "tokenizer.json"))
  cfg = {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "add_bos_token": True}
  if template:
    cfg["chat_template"] = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>"
                            "{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}"
                            "<|assistant|>{% endif %}")
  (path / "tokenizer_config.json").write_text(json.dumps(cfg))


def test_tokenizer_roundtrip_bos_eos_and_chat_template(tmp_path):
  _write_tokenizer(tmp_path)
  tok = Tokenizer.from_dir(tmp_path)
  assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)
  ids = tok.encode("hello world, the lazy fox")
  assert ids[0] == 0 and 0 not in ids[1:]
  assert tok.decode(ids) == "hello world, the lazy fox"
  assert tok.encode("hello", add_bos=False)[0] != 0
  text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
  assert text == "<s><|user|>hi<|assistant|>"
  chat = tok.encode_chat("hi")
  assert chat[0] == 0 and chat.count(0) == 1  # the template's BOS, not a second one


def test_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    Tokenizer.from_dir(tmp_path)
  _write_tokenizer(tmp_path, template=False)
  tok = Tokenizer.from_dir(tmp_path)
  with pytest.raises(ValueError, match="no chat_template"):
    tok.apply_chat_template([{"role": "user", "content": "hi"}])
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<nope>"}))
  with pytest.raises(ValueError, match="<nope>"):
    Tokenizer.from_dir(tmp_path)
