"""MTP: a real-format checkpoint with layer `num_hidden_layers` loads, and its MTP logits equal an
independent implementation: the MTP equations in numpy, with the inner decoder block run by
transformers' own DeepseekV3DecoderLayer loaded with the MTP block's weights.

h^0 = the main model's hidden state after model.norm (vLLM's serving choice).
x = eh_proj([enorm(Emb(t_{i+1})) ; hnorm(h^0_i)]); h^1 = Block(x); logits = head(norm(h^1)).
Tolerance 1e-4 (fp32).
"""
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dsv3_jax
from dsv3_jax.safetensors_io import SafetensorsFile, save_file
from tests.hf_reference import make_v3
from tests.utils import assert_close

N_LAYERS = 2


# XLA's CPU optimisations off for every program here (eager ops included): compiling, not
# running, the tiny models is these tests' cost, and every check is at a stated tolerance.
pytestmark = pytest.mark.usefixtures("module_fast_compiles")


def _rms(x, w, eps=1e-6):
  return w * (x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps))


@pytest.fixture(scope="module")
def mtp_checkpoint(tmp_path_factory):
  """transformers checkpoint + an MTP layer (index N_LAYERS) written in the official names."""
  path = tmp_path_factory.mktemp("mtp")
  hf = make_v3(path, seed=11, num_hidden_layers=N_LAYERS, num_nextn_predict_layers=1)
  from transformers import DeepseekV3Config
  from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer
  cfg = DeepseekV3Config.from_pretrained(path)
  block = DeepseekV3DecoderLayer(cfg, layer_idx=N_LAYERS).eval()  # MoE block (>= first_k_dense)
  g = torch.Generator().manual_seed(7)
  with torch.no_grad():
    for name, p in block.named_parameters():
      p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("norm.weight")
              else 0.08 * torch.randn(p.shape, generator=g))
    block.mlp.gate.e_score_correction_bias.copy_(0.3 * torch.randn(cfg.n_routed_experts, generator=g))
  # Write the block through a throwaway model so transformers' own save path names its tensors.
  rng = np.random.RandomState(3)
  D = cfg.hidden_size
  extra = {
      "enorm.weight": (1 + 0.1 * rng.randn(D)).astype(np.float32),
      "hnorm.weight": (1 + 0.1 * rng.randn(D)).astype(np.float32),
      "eh_proj.weight": (0.08 * rng.randn(D, 2 * D)).astype(np.float32),
      "shared_head.norm.weight": (1 + 0.1 * rng.randn(D)).astype(np.float32),
      "embed_tokens.weight": hf.model.embed_tokens.weight.detach().numpy().copy(),
      "shared_head.head.weight": hf.lm_head.weight.detach().numpy().copy(),
  }
  from transformers import DeepseekV3ForCausalLM
  holder = DeepseekV3ForCausalLM(DeepseekV3Config.from_dict({**cfg.to_dict(),
                                                             "num_hidden_layers": N_LAYERS + 1}))
  holder.model.layers[N_LAYERS].load_state_dict(block.state_dict())
  holder.save_pretrained(path / "holder")
  held = SafetensorsFile(path / "holder" / "model.safetensors")
  prefix = f"model.layers.{N_LAYERS}."
  mtp = {k: np.array(held[k]) for k in held.keys() if k.startswith(prefix)}
  mtp.update({prefix + k: v for k, v in extra.items()})
  # A second shard plus an index, as the official checkpoint is laid out.
  save_file(mtp, str(path / "model-00002-of-00002.safetensors"))
  main = SafetensorsFile(path / "model.safetensors")
  save_file({k: np.array(main[k]) for k in main.keys()}, str(path / "model-00001-of-00002.safetensors"))
  (path / "model.safetensors").unlink()
  weight_map = {k: "model-00001-of-00002.safetensors" for k in main.keys()}
  weight_map.update({k: "model-00002-of-00002.safetensors" for k in mtp})
  (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  return path, hf, block, extra


def test_mtp_logits_match_independent_implementation(mtp_checkpoint):
  path, hf, block, w = mtp_checkpoint
  model = dsv3_jax.from_pretrained(path)
  assert model.config.num_nextn_predict_layers == 1 and len(model.mtp) == 1
  B, T = 2, 9
  tokens = np.random.RandomState(1).randint(0, 97, (B, T))
  out = model.forward(jnp.asarray(tokens, jnp.int32), mtp=True)

  with torch.no_grad():
    t = torch.as_tensor(tokens)
    h0 = hf.model(t).last_hidden_state.numpy()  # after model.norm
    shifted = np.concatenate([tokens[:, 1:], np.zeros((B, 1), tokens.dtype)], 1)
    emb = hf.model.embed_tokens.weight.numpy()[shifted]
    x = np.concatenate([_rms(emb, w["enorm.weight"]), _rms(h0, w["hnorm.weight"])], -1)
    x = x @ w["eh_proj.weight"].T
    pos = torch.arange(T)[None].expand(B, T)
    cos_sin = hf.model.rotary_emb(torch.as_tensor(x), pos)
    causal = torch.full((T, T), float("-inf")).triu(1)[None, None].expand(B, 1, T, T)
    h1 = block(torch.as_tensor(x, dtype=torch.float32), attention_mask=causal, position_ids=pos,
               position_embeddings=cos_sin)
    h1 = (h1[0] if isinstance(h1, tuple) else h1).numpy()
  ref = _rms(h1, w["shared_head.norm.weight"]) @ w["shared_head.head.weight"].T
  assert_close(out.mtp_logits[0], ref, atol=1e-4, what="MTP logits")
  # The main logits are unaffected by the MTP layer's presence.
  assert_close(out.logits, hf(torch.as_tensor(tokens)).logits.detach().numpy(), atol=1e-4,
               what="main logits")


def test_mtp_layer_differing_copy_is_an_error(mtp_checkpoint, tmp_path):
  """The stored MTP copy of lm_head must equal lm_head (the model shares them)."""
  import shutil
  path, *_ = mtp_checkpoint
  bad = tmp_path / "bad"
  shutil.copytree(path, bad)
  shard = bad / "model-00002-of-00002.safetensors"
  f = SafetensorsFile(shard)
  tensors = {k: np.array(f[k]) for k in f.keys()}
  f.close()
  tensors[f"model.layers.{N_LAYERS}.shared_head.head.weight"][0, 0] += 1.0
  save_file(tensors, str(shard))
  with pytest.raises(dsv3_jax.CheckpointError, match="shared_head.head.weight.*differs"):
    dsv3_jax.from_pretrained(bad)


def test_mtp_required_but_absent(tmp_path):
  make_v3(tmp_path, seed=2, num_hidden_layers=2, num_nextn_predict_layers=1)
  with pytest.raises(ValueError, match="num_nextn_predict_layers=1 but the checkpoint holds 0"):
    dsv3_jax.from_pretrained(tmp_path, mtp=True)
  assert dsv3_jax.from_pretrained(tmp_path).config.num_nextn_predict_layers == 0


def _eqns(jaxpr):
  """Every equation of a (closed) jaxpr, nested jaxprs included."""
  from tests.utils import _sub_jaxprs
  for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
    yield eqn
    for sub in _sub_jaxprs(eqn):
      yield from _eqns(sub)


@pytest.mark.parametrize("depth", [1, 2])
def test_mtp_shares_one_vocab_lookup_and_one_head(depth):
  """With MTP the main model and every depth go through one embedding lookup and one head call
  (fewer distinct ops for the compiler), and the outputs equal separate per-part calls:
  logits = head(hidden), mtp_logits[k-1] = head(normed h^k), h^k from Emb(t_{i+k}) (float32,
  1e-6)."""
  import dataclasses

  import jax
  from flax import nnx
  from tests.utils import random_model
  cfg = dataclasses.replace(dsv3_jax.TINY, num_nextn_predict_layers=depth)
  model = random_model(cfg, seed=5)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 12)), jnp.int32)
  graphdef, state = nnx.split(model)

  def fwd(state, tokens):
    return nnx.merge(graphdef, state).forward(tokens, mtp=True)
  jaxpr = jax.make_jaxpr(fwd)(state, tokens)
  V, D = cfg.vocab_size, cfg.hidden_size
  shapes = [tuple(v.aval.shape) for e in _eqns(jaxpr) for v in e.invars[:2]
            if e.primitive.name in ("gather", "dot_general") and hasattr(v, "aval")]
  assert shapes.count((V, D)) == 1 and shapes.count((D, V)) == 1, shapes

  out = fwd(state, tokens)
  assert out.mtp_logits.shape == (depth, 2, 12, V)
  assert_close(out.logits, model.head(out.hidden), atol=1e-6, what="main logits")
  h = out.hidden
  for k, layer in enumerate(model.mtp, start=1):
    shifted = jnp.pad(tokens[:, k:], ((0, 0), (0, k)))
    h, normed, _ = layer(model.embed(shifted), h, jnp.broadcast_to(jnp.arange(12), (2, 12)))
    assert_close(out.mtp_logits[k - 1], model.head(normed), atol=1e-6, what=f"depth {k}")
