"""The log-probs the inference engine reports for its sampled tokens equal the training
forward's for the same tokens (float32; plain and MTP-speculative sampling)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.config import TINY, RuntimeConfig
from dsv3_jax.inference.generate import Generator
from dsv3_jax.inference.sampling import SamplingParams
from dsv3_jax.rl.grpo import token_logprobs
from dsv3_jax.sharding import make_mesh
from tests.utils import FAST_COMPILE, assert_close, random_model


@pytest.fixture(scope="module")
def model():
  return random_model(TINY, seed=3, runtime=RuntimeConfig(param_dtype=jnp.float32,
                                                          dtype=jnp.float32))


@pytest.mark.parametrize("speculative", [False, True])
def test_engine_logprobs_equal_training_forward(model, speculative):
  mesh = make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
  gen = Generator(model, mesh=mesh, compiler_options=FAST_COMPILE)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, 256, n).tolist() for n in (5, 9, 3, 12)]
  temp = 0.8
  out = gen.run(prompts, max_new_tokens=10, sampling=SamplingParams(temperature=temp), seed=4,
                eos_token_id=(), speculative=speculative)
  if speculative:
    assert 0 < out.acceptance_rate < 1  # both accepted drafts and rejections are covered
  T = max(len(p) for p in prompts) + 10
  rows = np.zeros((len(prompts), T), np.int32)
  for i, (p, c) in enumerate(zip(prompts, out.tokens)):
    assert len(c) == 10 and len(out.logprobs[i]) == 10
    rows[i, :len(p) + 10] = p + c
  logp = np.asarray(token_logprobs(model.forward(jnp.asarray(rows)).logits, jnp.asarray(rows), temp))
  for i, p in enumerate(prompts):
    want = logp[i, len(p):len(p) + 10]
    assert_close(out.logprobs[i], want, atol=2e-5, rtol=1e-5, what=f"row {i} log-probs")
    assert np.all(want < 0)
