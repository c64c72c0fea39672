"""Inference: latent-cache decode against the full forward, MTP speculative decoding, EOS
handling, the 671B cache size, and `dsv3 generate` end to end (tiny fp32 models, CPU).

Tolerances: cached decode logits vs model.forward on the whole sequence, fp32, max abs error
<= 1e-4 (logits here are O(1); the two paths differ only in float32 summation order: absorbed
vs per-head dot products, observed ~1e-6).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dsv3_jax
from dsv3_jax.checkpoint import name_table, to_hf
from dsv3_jax.inference import (Generator, SamplingParams, Tokenizer, absorb_weights,
                                cache_bytes_per_token, cache_values_per_token, decode_forward,
                                generate, init_cache, make_mtp_agree, prefill)
from dsv3_jax.pretrained import flat_variables, param_shapes
from dsv3_jax.safetensors_io import save_file
from tests.utils import FAST_COMPILE, assert_close, random_model

# TINY cut to 2 layers (1 dense, 1 MoE) to keep compile times down; plus 1 MTP layer (MoE),
# q LoRA, 4 heads, grouped routing with the selection bias.
CFG = dsv3_jax.TINY.replace(num_hidden_layers=2)


def tiny_model(seed: int):
  """CFG with `tests.utils.random_model`'s weights (std 0.08, norms ~1, router bias std 0.3):
  logits are O(1), routing varies and greedy choices are not near-ties."""
  return random_model(CFG, seed)


FULL_SHAPE = (3, 21)  # every full-forward oracle call uses this shape: one compilation


@pytest.fixture(scope="module")
def model():
  return tiny_model(0)


@pytest.fixture(scope="module")
def generator(model):
  # XLA's CPU optimisations off: compiling, not running, the tiny model is what costs here.
  return Generator(model, compiler_options=FAST_COMPILE)


_FULL = {}


def full_logits(model, tokens):
  """model.forward(tokens).logits (fp32, [B, T, V]) for tokens of FULL_SHAPE, compiled once per
  model (FAST_COMPILE) and shared by the tests that use it as the no-cache oracle."""
  assert tokens.shape == FULL_SHAPE, tokens.shape
  graphdef, state = nnx.split(model)
  if id(model) not in _FULL:
    f = jax.jit(lambda s, t: nnx.merge(graphdef, s).forward(t).logits)
    _FULL[id(model)] = (model, f.lower(state, tokens).compile(compiler_options=FAST_COMPILE))
  return np.asarray(_FULL[id(model)][1](state, tokens))


PROMPTS = [[5, 17, 33], [7 + 3 * i for i in range(11)], [200, 9, 9, 41, 2, 250]]


def test_cache_is_576_values_per_token_for_671b():
  cache = jax.eval_shape(lambda: init_cache(dsv3_jax.DEEPSEEK_V3, 2, 16, jnp.bfloat16))
  # main layers + the MTP block; per layer the latent c [.., rows, 512] and the rotated k_pe
  # transposed [.., 64, rows] (lane-aligned parts, see cache.py)
  assert cache.latent.shape == (61 + 1, 2, 16, 512) and cache.rope.shape == (62, 2, 64, 16)
  k = jax.eval_shape(lambda: init_cache(dsv3_jax.DEEPSEEK_V3, 2, 16, jnp.bfloat16).k_pe)
  assert k.shape == (62, 2, 16, 64) and cache.kv_lora_rank == 512
  assert cache_values_per_token(dsv3_jax.DEEPSEEK_V3) == 576
  mla = cache_bytes_per_token(dsv3_jax.DEEPSEEK_V3, jnp.bfloat16)
  assert mla == 61 * 576 * 2
  per_head_kv = 61 * 128 * (192 + 128) * 2  # what a per-head K/V cache holds
  assert per_head_kv / mla > 71
  # W_UK / W_UV of a 671B-shaped layer, from shapes only.
  one = dsv3_jax.DEEPSEEK_V3.replace(num_hidden_layers=1, first_k_dense_replace=1,
                                     num_nextn_predict_layers=0, vocab_size=128)
  w = jax.eval_shape(lambda: absorb_weights(dsv3_jax.DeepseekV3(one, rngs=nnx.Rngs(0))))
  # One entry per layer stack, stacked like its parameters: [layers, H, N|V, C].
  assert w["w_uk"][0].shape == (1, 128, 128, 512) and w["w_uv"][0].shape == (1, 128, 128, 512)


@pytest.mark.parametrize("moe", ["reference", "tpu-kernel"])
def test_cached_decode_logits_match_full_forward(model, moe):
  """Prompts of lengths 3, 8, 13 in one right-padded batch; 4 one-token steps then 2 two-token
  steps (the speculative verify shape) teacher-forced with known tokens; every step's logits
  equal model.forward over the whole sequence at the same positions.

  "tpu-kernel": prefill and decode run the routed experts through the TPU grouped-matmul kernel
  that reads the whole [layers, E, ...] expert stacks at a layer index (Pallas interpret mode),
  against the reference model's full forward (same weights)."""
  rng = np.random.RandomState(1)
  lens = np.array([3, 8, 13])
  B, steps1, steps2, T_pad, S = 3, 4, 2, 16, 32
  seqs = rng.randint(0, CFG.vocab_size, FULL_SHAPE).astype(np.int32)
  assert FULL_SHAPE[1] == 13 + steps1 + 2 * steps2
  full = full_logits(model, jnp.asarray(seqs))
  if moe != "reference":
    model = random_model(CFG, 0, dsv3_jax.RuntimeConfig(moe_backend="interpret",
                                                        kernel_platform="tpu"))

  prompt = rng.randint(0, CFG.vocab_size, (B, T_pad)).astype(np.int32)  # junk padding
  for b in range(B):
    prompt[b, :lens[b]] = seqs[b, :lens[b]]
  graphdef, state = nnx.split(model)
  absorbed = absorb_weights(model)

  def pre(state, toks, lens):
    m = nnx.merge(graphdef, state)
    logits, _, cache = prefill(m, init_cache(m.config, B, S, jnp.float32), toks, lens)
    return logits, cache

  def step(state, absorbed, cache, toks, pos):
    logits, _, cache = decode_forward(nnx.merge(graphdef, state), absorbed, cache, toks, pos)
    return logits, cache

  compiled = {}  # tokens per step -> the step compiled (FAST_COMPILE) for it

  def run_step(*args):
    t = args[3].shape[1]
    if t not in compiled:
      compiled[t] = jax.jit(step).lower(*args).compile(compiler_options=FAST_COMPILE)
    return compiled[t](*args)

  pre_args = (state, jnp.asarray(prompt), jnp.asarray(lens, jnp.int32))
  logits, cache = jax.jit(pre).lower(*pre_args).compile(compiler_options=FAST_COMPILE)(*pre_args)
  rows = np.arange(B)
  assert_close(logits, full[rows, lens - 1], atol=1e-4, what="prefill logits")
  pos = lens.copy()
  for k in range(steps1 + steps2):
    t = 1 if k < steps1 else 2
    p = pos[:, None] + np.arange(t)[None, :]
    toks = seqs[rows[:, None], p]
    logits, cache = run_step(state, absorbed, cache, jnp.asarray(toks), jnp.asarray(p, jnp.int32))
    assert_close(logits, full[rows[:, None], p], atol=1e-4, what=f"step {k} ({t} tokens)")
    pos = pos + t


def test_greedy_speculative_equals_plain_random_mtp(generator):
  plain = generator.run(PROMPTS, max_new_tokens=12, eos_token_id=())
  spec = generator.run(PROMPTS, max_new_tokens=12, eos_token_id=(), speculative=True)
  assert [len(t) for t in plain.tokens] == [12, 12, 12]
  assert spec.tokens == plain.tokens
  assert 0.0 <= spec.acceptance_rate <= 1.0


def test_greedy_speculative_equals_plain_forced_agreement():
  """MTP forced to agree (`make_mtp_agree(main_scale=0)`): every residual branch of the main
  model (o_proj, FFN down projections) is zeroed, so its logits are head(norm(Emb(t))), and the
  MTP block passes Emb(t_{i+1}) through (eh_proj = [I; 0], zeroed block branches) to the same
  head, so the draft equals the main model's greedy choice up to RMSNorm-epsilon rounding. The
  main model still runs every layer and the cache; the random-MTP test covers rejections."""
  m = tiny_model(3)
  make_mtp_agree(m, main_scale=0.0)
  g = Generator(m, compiler_options=FAST_COMPILE)
  plain = g.run(PROMPTS, max_new_tokens=12, eos_token_id=())
  spec = g.run(PROMPTS, max_new_tokens=12, eos_token_id=(), speculative=True)
  assert spec.tokens == plain.tokens
  assert spec.acceptance_rate > 0.9, spec.acceptance_rate
  assert spec.steps < plain.steps  # accepted drafts save steps


def test_eos_stops_each_sequence(generator):
  ref = generator.run(PROMPTS, max_new_tokens=12, eos_token_id=()).tokens
  eos = ref[0][2]
  assert eos not in ref[0][:2]
  for speculative in (False, True):
    got = generator.run(PROMPTS, max_new_tokens=12, eos_token_id=eos, speculative=speculative)
    for r, g in zip(ref, got.tokens):
      want = r[:r.index(eos) + 1] if eos in r else r
      assert g == want, (speculative, r, g)
    assert got.compile_seconds == 0.0  # EOS ids are data, not compile-time constants


def test_no_recompilation_within_a_length_bucket(generator):
  """Other prompt lengths in the same bucket (<= 16) reuse the compiled prefill and loop."""
  generator.run(PROMPTS, max_new_tokens=12, eos_token_id=())
  other = generator.run([p[:-1] + [3, 4] for p in PROMPTS], max_new_tokens=12, eos_token_id=())
  assert other.compile_seconds == 0.0


def test_sampled_speculative_is_seeded(generator):
  sp = SamplingParams(temperature=0.9, top_k=40, top_p=0.95)
  a = generator.run(PROMPTS, max_new_tokens=8, sampling=sp, seed=7, eos_token_id=(), speculative=True)
  b = generator.run(PROMPTS, max_new_tokens=8, sampling=sp, seed=7, eos_token_id=(), speculative=True)
  c = generator.run(PROMPTS, max_new_tokens=8, sampling=sp, seed=8, eos_token_id=(), speculative=True)
  assert a.tokens == b.tokens and a.tokens != c.tokens
  assert all(len(t) == 8 and all(0 <= x < CFG.vocab_size for x in t) for t in a.tokens)


def save_hf(model, path) -> None:
  """Writes `model` as an HF-format checkpoint (MTP layer included) through the name table."""
  flat = {k: np.asarray(v.get_value()) for k, v in flat_variables(model).items()}
  table = name_table(model.config, param_shapes(model))
  save_file({n: to_hf(e, flat[e.target]) for n, e in table.items()}, str(path / "model.safetensors"))
  (path / "config.json").write_text(json.dumps(model.config.to_hf_config()))


def test_cli_generate_streams_greedy_text(model, tmp_path, capsys):
  from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

  from dsv3_jax.cli import main
  vocab = {"<s>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, CFG.vocab_size)}}
  tok = HFTokenizer(models.WordLevel(vocab, unk_token="w2"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
  save_hf(model, tmp_path)

  # Oracle: greedy decoding with the full forward (no cache), stopping at EOS id 1. The CLI runs
  # MTP speculative decoding, whose greedy output must be the same.
  ids, n_new = [0, 5, 6, 7], 5
  expect = []
  for _ in range(n_new):
    t = np.zeros(FULL_SHAPE, np.int32)
    t[0, :len(ids)] = ids
    nxt = int(np.argmax(full_logits(model, jnp.asarray(t))[0, len(ids) - 1]))
    expect.append(nxt)
    ids.append(nxt)
    if nxt == 1:
      break
  rc = main(["generate", "--checkpoint", str(tmp_path), "--prompt", "w5 w6 w7",
             "--max-new-tokens", str(n_new), "--dtype", "float32", "--speculative"])
  out = capsys.readouterr()
  assert rc == 0
  assert out.out.split() == [f"w{t}" for t in expect if t > 1]
  assert "tokens/s" in out.err and "MTP acceptance" in out.err
  # The Python API on the in-memory model: same ids and text.
  tok = Tokenizer.from_dir(tmp_path)
  res = generate(model, ["w5 w6 w7"], tokenizer=tok, max_new_tokens=n_new, speculative=True,
                 on_step=lambda new: None)
  assert res.tokens == [expect]
  assert res.text == [" ".join(f"w{t}" for t in expect if t > 1)]


def test_compiled_cache_is_bounded_lru():
  """The compiled-function cache shared by Generators keeps at most max_entries, evicting the
  least recently used (a hit refreshes an entry)."""
  from dsv3_jax.inference.generate import CompiledCache
  c = CompiledCache(max_entries=2)
  c.put("a", 1)
  c.put("b", 2)
  assert c.get("a") == 1  # "b" is now the least recently used
  c.put("c", 3)
  assert c.get("b") is None and (c.get("a"), c.get("c"), len(c)) == (1, 3, 2)
  assert [k for k, _ in c.items()] == ["a", "c"]
