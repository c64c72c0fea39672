"""The MLA Pallas kernels wired into the model and the decode path, run in interpret mode on CPU
for both kernel variants (RuntimeConfig.kernel_platform "tpu" and "gpu").

Oracle: the same weights with attention_backend="reference" (the jnp einsum attention and decode
attention, whose own correctness against transformers and the full forward is tested in
test_model_parity.py / test_inference.py).

Tolerances (fp32, logits O(1), max |logit| ~2.6): the kernels do the same float32 math as the
reference up to summation order (online softmax per block, split-K merge): logit errors observed
~1.4e-6 (forward, prefill and every decode step), bound max abs error <= 1e-4. Gradients (max |g|
~2e-4..5e-3): observed max abs error ~1e-6 * max |g|, bound 1e-4 * max |g|. Greedy tokens must
match exactly (logit errors ~1e-6 against top-2 gaps of these random models of ~1e-3 and more;
a flip would be a bug).

The config is TINY with 2 decoder layers + 1 MTP layer, all dense (the MoE is not what is under
test here, and dense layers halve the compile time), and head dims 64 (nope 32 + rope 32, v 64,
kv_lora 64): the smallest that the attention kernels take without padding and the GPU decode
kernel takes at all (latent and rope dims multiples of 16). One case runs TINY's own dims
(q/k 24, v 16) through the zero-padding in `attention()`. Every kernel case also checks that the
traced program holds a pallas_call (or that mla_decode was traced), so it cannot pass by
silently running the reference.
"""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsv3_jax
from dsv3_jax.inference import Generator, absorb_weights, decode_forward, init_cache, prefill
from dsv3_jax.kernels_pallas.backend import gpu_lowering_target
from tests.utils import (FAST_COMPILE, TPU_CALL, TRITON_CALL, assert_close, count_pallas_calls,
                         custom_calls, random_arrays)

CFG = dsv3_jax.TINY.replace(num_hidden_layers=2, qk_nope_head_dim=32, qk_rope_head_dim=32,
                            v_head_dim=64, kv_lora_rank=64, first_k_dense_replace=3)
PLATFORMS = ("tpu", "gpu")


def _arrays(cfg, seed: int, std: float = 0.08):
  """Random weights with std `std` (norms ~1, router bias std 0.3): logits O(1)."""
  return random_arrays(cfg, seed, std=std)


def _model(arrays, platform=None, cfg=CFG):
  """The model on `arrays`: reference attention (platform None) or the interpreted kernel."""
  rt = dsv3_jax.RuntimeConfig(attention_backend="reference" if platform is None else "interpret",
                              kernel_platform=platform)
  return dsv3_jax.model_from_arrays(cfg, rt, arrays)


def compile_fast(f, *args, kernels: bool = False):
  """jit + compile with XLA's CPU optimisations off (compile time dominates interpret-mode
  runs). kernels: assert the traced program does (True) or does not (False) hold a pallas_call,
  so a kernel test cannot pass by silently running the reference."""
  traced = jax.jit(f).trace(*args)
  assert (count_pallas_calls(traced.jaxpr) > 0) == kernels
  return traced.lower().compile(compiler_options=FAST_COMPILE)


def run_fast(f, *args, kernels: bool = False):
  return compile_fast(f, *args, kernels=kernels)(*args)


@pytest.fixture(scope="module")
def arrays():
  return _arrays(CFG, 0)


@pytest.fixture(scope="module")
def packed_logits(arrays):
  f, state = _logits_fn(_model(arrays))
  return np.asarray(run_fast(f, state, *_packed_batch()))


def _packed_batch():
  """B=2, T=80 (not a multiple of any kernel block: 64 / 128): row 0 packs segments of 30 + 50,
  row 1 of 11 + 40 + 29; positions restart per segment."""
  rng = np.random.RandomState(1)
  tokens = rng.randint(0, CFG.vocab_size, (2, 80)).astype(np.int32)
  seg = np.zeros((2, 80), np.int32)
  pos = np.zeros((2, 80), np.int32)
  for b, sizes in enumerate([(30, 50), (11, 40, 29)]):
    start = 0
    for i, n in enumerate(sizes):
      seg[b, start:start + n] = i
      pos[b, start:start + n] = np.arange(n)
      start += n
  return jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg)


def _logits_fn(model):
  graphdef, state = nnx.split(model)

  def f(state, tokens, pos, seg):
    return nnx.merge(graphdef, state).forward(tokens, positions=pos, segment_ids=seg).logits

  return f, state


@pytest.mark.parametrize("platform", PLATFORMS)
def test_forward_logits_match_reference(arrays, packed_logits, platform):
  want = packed_logits
  f, state = _logits_fn(_model(arrays, platform))
  got = run_fast(f, state, *_packed_batch(), kernels=True)
  assert np.abs(want).max() > 0.5  # logits O(1), so 1e-4 is a tight bound
  assert_close(got, want, atol=1e-4, what=f"{platform} kernel logits (packed, T=80)")


def test_forward_pads_head_dims_that_are_not_multiples_of_64():
  """TINY's own dims (q/k 24, v 16) go through the kernel zero-padded to 64."""
  cfg = dsv3_jax.TINY.replace(num_hidden_layers=1, num_nextn_predict_layers=0)
  arr = _arrays(cfg, 2)
  tokens = jnp.asarray(np.random.RandomState(3).randint(0, cfg.vocab_size, (2, 19)), jnp.int32)
  outs = []
  for platform in (None, "gpu"):
    f, state = _logits_fn(_model(arr, platform, cfg))
    outs.append(run_fast(f, state, tokens, None, None, kernels=platform is not None))
  assert_close(outs[1], outs[0], atol=1e-4, what="padded-dim kernel logits")


def _grad_fn(model):
  graphdef, state = nnx.split(model)
  w = jnp.asarray(np.random.RandomState(4).randn(2, 80, CFG.vocab_size), jnp.float32)

  def loss(state, tokens, pos, seg):
    logits = nnx.merge(graphdef, state).forward(tokens, positions=pos, segment_ids=seg).logits
    return jnp.mean(logits * w)

  def grads(state, tokens, pos, seg):
    g = jax.grad(loss)(state, tokens, pos, seg)
    attn = g["stacks"][0]["block"]["self_attn"]  # one stack: CFG's layers are all dense
    return {f"layers.{i}.{name}": attn[name]["kernel"].get_value()[i]
            for i in range(CFG.num_hidden_layers)
            for name in ("kv_b_proj", "q_b_proj", "kv_a_proj_with_mqa")}

  return grads, state


@pytest.fixture(scope="module")
def packed_grads(arrays):
  f, state = _grad_fn(_model(arrays))
  return run_fast(f, state, *_packed_batch())


@pytest.mark.parametrize("platform", PLATFORMS)
def test_gradients_match_reference(arrays, packed_grads, platform):
  """d mean(logits * w) / d (kv_b_proj, q_b_proj, kv_a_proj_with_mqa kernels of both layers),
  through the kernels' custom_vjp backward."""
  f, state = _grad_fn(_model(arrays, platform))
  got = run_fast(f, state, *_packed_batch(), kernels=True)
  for name, g in packed_grads.items():
    g = np.asarray(g)
    assert np.abs(g).max() > 1e-5
    assert_close(got[name], g, atol=1e-4 * np.abs(g).max(), what=f"{platform} grad {name}")


DECODE_SEQS = np.random.RandomState(5).randint(0, CFG.vocab_size, (3, 17)).astype(np.int32)


@pytest.fixture(scope="module")
def full_logits(arrays):
  """The reference model's full forward over DECODE_SEQS (no cache)."""
  f, state = _logits_fn(_model(arrays))
  return np.asarray(run_fast(f, state, jnp.asarray(DECODE_SEQS), None, None))


@pytest.mark.parametrize("platform", PLATFORMS)
def test_cached_decode_logits_match_full_forward(arrays, full_logits, platform):
  """Prompts of lengths 3, 8, 13 in one right-padded batch, prefilled and decoded through the
  kernels (prefill: mla_attention; steps: mla_decode), 2 one-token steps then 1 two-token step
  (the speculative verify shape), teacher-forced; every step's logits equal the reference
  model's full forward over the whole sequence. The two-token step is one multi-token
  kernel call per layer on the contiguous cache (capacity 40)."""
  rng = np.random.RandomState(6)
  lens = np.array([3, 8, 13])
  B, T_pad, S = 3, 16, 40
  seqs, full = DECODE_SEQS, full_logits

  model = _model(arrays, platform)
  graphdef, state = nnx.split(model)
  absorbed = absorb_weights(model)
  prompt = rng.randint(0, CFG.vocab_size, (B, T_pad)).astype(np.int32)  # junk padding
  for b in range(B):
    prompt[b, :lens[b]] = seqs[b, :lens[b]]

  def pre(state, toks, lens):
    m = nnx.merge(graphdef, state)
    logits, _, cache = prefill(m, init_cache(m.config, B, S, jnp.float32), toks, lens)
    return logits, cache

  def step(state, absorbed, cache, toks, pos):
    logits, _, cache = decode_forward(nnx.merge(graphdef, state), absorbed, cache, toks, pos)
    return logits, cache

  logits, cache = run_fast(pre, state, jnp.asarray(prompt), jnp.asarray(lens, jnp.int32),
                           kernels=True)
  rows = np.arange(B)
  assert_close(logits, full[rows, lens - 1], atol=1e-4, what=f"{platform} prefill logits")
  pos, compiled = lens.copy(), {}
  for k, t in enumerate((1, 1, 2)):
    p = pos[:, None] + np.arange(t)[None, :]
    args = (state, absorbed, cache, jnp.asarray(seqs[rows[:, None], p]), jnp.asarray(p, jnp.int32))
    if t not in compiled:
      compiled[t] = compile_fast(step, *args, kernels=True)
    logits, cache = compiled[t](*args)
    assert_close(logits, full[rows[:, None], p], atol=1e-4, what=f"{platform} step {k} ({t} tok)")
    pos = pos + t


PROMPTS = [[5, 17, 33], [7 + 3 * i for i in range(11)], [200, 9, 9, 41, 2, 250]]


@pytest.fixture(scope="module")
def gen_arrays():
  """Weights with std 0.15: at 0.08 greedy output mostly repeats one token, which would make
  the token comparison weak."""
  return _arrays(CFG, 0, std=0.15)


@pytest.fixture(scope="module")
def reference_tokens(gen_arrays):
  """Plain greedy decoding with the reference backend (speculative greedy output equals it:
  test_inference.py)."""
  g = Generator(_model(gen_arrays), compiler_options=FAST_COMPILE)
  tokens = g.run(PROMPTS, max_new_tokens=6, eos_token_id=()).tokens
  assert all(len(set(t)) >= 3 for t in tokens), tokens  # varied output
  return tokens


@pytest.mark.slow
@pytest.mark.parametrize("platform", PLATFORMS)
def test_greedy_generate_matches_reference(gen_arrays, reference_tokens, platform, monkeypatch):
  """Generator (prefill, on-device loop, capacity 64: the speculative two-token verify is one
  multi-token kernel call on the contiguous cache) with the interpreted kernels: plain and
  MTP-speculative greedy output equal the reference backend's token for token."""
  decode_module = importlib.import_module("dsv3_jax.inference.decode")
  generate_module = importlib.import_module("dsv3_jax.inference.generate")  # not the function
  monkeypatch.setattr(generate_module, "COMPILED", generate_module.CompiledCache())  # trace afresh
  calls = []  # traced mla_decode calls (tokens per call): the compiled steps use the kernel
  kernel = decode_module.mla_decode

  def counted(*a, **k):
    assert k.get("block_tables") is None and k["backend"] != "reference"  # no paged view
    calls.append(a[0].shape[1] if a[0].ndim == 4 else 1)
    return kernel(*a, **k)

  monkeypatch.setattr(decode_module, "mla_decode", counted)
  g = Generator(_model(gen_arrays, platform), compiler_options=FAST_COMPILE)
  for spec in (False, True):
    calls.clear()
    got = g.run(PROMPTS, max_new_tokens=6, eos_token_id=(), speculative=spec).tokens
    assert got == reference_tokens, (platform, spec)
    # speculative: the two-token verify is one call with T = 2 (and the one-token MTP draft);
    # plain: one token per call
    assert calls and (2 in calls) == spec and set(calls) <= {1, 2}, calls


@pytest.mark.parametrize("platform,lowering", [("tpu", "tpu"), ("gpu", "cuda")])
@pytest.mark.parametrize("T,capacity", [(1, 576), (2, 576), (2, 1024)])
def test_decode_steps_lower_at_v3_dims(platform, lowering, T, capacity):
  """`decode_attention_steps` at DeepSeek-V3 dims (128 heads, 512 + 64, bf16) lowers for the
  real TPU (Mosaic) and GPU (Triton) with Generator-style capacities (multiples of 64): one
  contiguous kernel call for T=1 and one multi-token call for T=2 (no reference fallback).
  Interpret mode does not check TPU block-shape rules; lowering does."""
  from dsv3_jax.inference import decode_attention_steps
  sds = jax.ShapeDtypeStruct
  f = lambda q, c, r, p: decode_attention_steps(q, c, r, p, 0.07, backend="pallas",
                                                platform=platform)
  with gpu_lowering_target(lowering):
    text = jax.jit(f).trace(sds((4, T, 128, 576), jnp.bfloat16),
                            sds((4, capacity, 512), jnp.bfloat16),
                            sds((4, 64, capacity), jnp.bfloat16),
                            sds((4, T), jnp.int32)).lower(lowering_platforms=(lowering,)).as_text()
  # one kernel launch, also for T=2
  assert custom_calls(text, TPU_CALL if platform == "tpu" else TRITON_CALL) == 1
