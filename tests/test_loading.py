"""from_pretrained on FP8 and sharded checkpoints, and its errors for bad checkpoints."""
import json
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch

import dsv3_jax
from dsv3_jax.checkpoint import dequantize_fp8
from dsv3_jax.safetensors_io import SafetensorsError, SafetensorsFile, save_file
from tests.hf_reference import hf_logits, make_v3
from tests.utils import assert_close

BLOCK = 16  # tiny dims with 16x16 blocks give partial edge blocks (e.g. kv_a [40, 64] -> [3, 4])
NOT_QUANTISED = ("embed_tokens", "lm_head", "mlp.gate.weight", "norm", "e_score_correction_bias")


def quantize_blockwise(w: np.ndarray, block: int, pow2: bool):
  """Official-format FP8: e4m3 values and float32 scale_inv per block (amax/448)."""
  m, n = w.shape
  bm, bn = -(-m // block), -(-n // block)
  scale = np.zeros((bm, bn), np.float32)
  for i in range(bm):
    for j in range(bn):
      amax = np.abs(w[i * block:(i + 1) * block, j * block:(j + 1) * block]).max()
      s = max(amax / 448.0, 1e-12)
      scale[i, j] = 2.0 ** np.ceil(np.log2(s)) if pow2 else s
  full = np.repeat(np.repeat(scale, block, 0), block, 1)[:m, :n]
  return (w / full).astype(ml_dtypes.float8_e4m3fn), scale


def make_fp8(path, pow2: bool, seed: int, e8m0_scales: bool = False):
  """A transformers checkpoint re-written in the official FP8 format; returns a torch model with
  the dequantised weights (the exact reference). `e8m0_scales` stores the (power-of-two) scales
  as F8_E8M0 tensors instead of float32."""
  make_v3(path, seed=seed)
  f = SafetensorsFile(path / "model.safetensors")
  out = {}
  for k in f.keys():
    w = np.array(f[k])
    if w.ndim == 2 and not any(s in k for s in NOT_QUANTISED):
      q, s = quantize_blockwise(w, BLOCK, pow2)
      out[k], out[k + "_scale_inv"] = q, s
    elif w.dtype == np.float32 and "e_score_correction_bias" not in k:
      out[k] = w.astype(ml_dtypes.bfloat16)  # norms, embeddings, lm_head, gate: bf16 as shipped
    else:
      out[k] = w
  f.close()
  stored = {k: (v.astype(ml_dtypes.float8_e8m0fnu) if e8m0_scales and k.endswith("_scale_inv") else v)
            for k, v in out.items()}
  save_file(stored, str(path / "model.safetensors"))
  cfg = json.loads((path / "config.json").read_text())
  cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": [BLOCK, BLOCK],
                                **({"scale_fmt": "ue8m0"} if pow2 else {})}
  (path / "config.json").write_text(json.dumps(cfg))
  # The exact reference: the dequantised weights as a plain fp32 checkpoint, loaded by
  # transformers itself (which also maps per-expert names onto its fused expert tensors).
  ref_dir = path / "dequantised"
  ref_dir.mkdir()
  plain = {k: (dequantize_fp8(v, out[k + "_scale_inv"], (BLOCK, BLOCK)) if k + "_scale_inv" in out
               else np.asarray(v, np.float32))
           for k, v in out.items() if not k.endswith("_scale_inv")}
  save_file(plain, str(ref_dir / "model.safetensors"))
  del cfg["quantization_config"]
  (ref_dir / "config.json").write_text(json.dumps(cfg))
  from transformers import DeepseekV3ForCausalLM
  return DeepseekV3ForCausalLM.from_pretrained(ref_dir, attn_implementation="eager").float().eval()


@pytest.mark.parametrize("pow2,e8m0", [(False, False), (True, False), (True, True)],
                         ids=["fp32_scales", "ue8m0_scales", "e8m0_typed_scales"])
def test_fp8_checkpoint_dequantised_on_load(tmp_path, pow2, e8m0):
  hf = make_fp8(tmp_path, pow2, seed=21 + pow2, e8m0_scales=e8m0)
  name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"
  f = SafetensorsFile(tmp_path / "model.safetensors")
  assert f.shape(name) == (3, 4)
  if pow2:
    s = np.array(f[name]).astype(np.float32)
    assert np.all(np.log2(s) == np.round(np.log2(s)))
  if e8m0:  # the safetensors library itself reads our F8_E8M0 tensor as torch's e8m0 type
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as g:
      t = g.get_tensor(name)
    assert t.dtype == torch.float8_e8m0fnu
    np.testing.assert_array_equal(t.float().numpy(), s)
  tokens = np.random.RandomState(0).randint(0, 97, (2, 10))
  model = dsv3_jax.from_pretrained(tmp_path)
  assert model.config.quantization_config.weight_block_size == (BLOCK, BLOCK)
  assert_close(model(jnp.asarray(tokens)), hf_logits(hf, tokens), atol=1e-4, what="fp8 logits")


def test_dequantize_fp8_matches_elementwise_definition():
  rng = np.random.RandomState(0)
  w = rng.randn(37, 300).astype(ml_dtypes.float8_e4m3fn)
  s = rng.rand(1, 3).astype(np.float32)  # 37 rows -> 1 block of 128; 300 cols -> 3 (one partial)
  got = dequantize_fp8(w, s, (128, 128))
  want = np.array([[float(w[i, j]) * s[i // 128, j // 128] for j in range(300)] for i in range(37)])
  assert_close(got, want, atol=0, what="dequant")
  with pytest.raises(ValueError, match=r"expected \(1, 3\)"):
    dequantize_fp8(w, s[:, :2], (128, 128), name="x.weight")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("ok")
  make_v3(path, seed=5)
  return path


def _edit(src, dst, fn):
  """Copies checkpoint `src` to `dst`, lets fn(tensors) edit the tensor dict, saves it."""
  shutil.copytree(src, dst)
  f = SafetensorsFile(dst / "model.safetensors")
  t = {k: np.array(f[k]) for k in f.keys()}
  f.close()
  fn(t)
  save_file(t, str(dst / "model.safetensors"))
  return dst


def test_missing_tensor_named(hf_dir, tmp_path):
  bad = _edit(hf_dir, tmp_path / "b", lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
  with pytest.raises(dsv3_jax.CheckpointError, match=r"missing.*layers\.1\.mlp\.experts\.3\.up_proj"):
    dsv3_jax.from_pretrained(bad)


def test_unexpected_tensor_named_and_ignorable(hf_dir, tmp_path):
  bad = _edit(hf_dir, tmp_path / "b", lambda t: t.update({"model.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(dsv3_jax.CheckpointError, match=r"unexpected.*model\.extra\.weight.*model\.safetensors"):
    dsv3_jax.from_pretrained(bad)
  dsv3_jax.from_pretrained(bad, ignore_unexpected=True)


def test_misshaped_tensor_named(hf_dir, tmp_path):
  def shrink(t):
    t["model.layers.0.self_attn.o_proj.weight"] = t["model.layers.0.self_attn.o_proj.weight"][:, :-1]
  bad = _edit(hf_dir, tmp_path / "b", shrink)
  with pytest.raises(dsv3_jax.CheckpointError,
                     match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.o_proj\.weight' "
                           r"has shape \(64, 47\), config\.json implies \(64, 48\)"):
    dsv3_jax.from_pretrained(bad)


def test_fp8_weight_without_scale(hf_dir, tmp_path):
  def to_fp8(t):
    t["model.layers.0.self_attn.o_proj.weight"] = t["model.layers.0.self_attn.o_proj.weight"].astype(
        ml_dtypes.float8_e4m3fn)
  bad = _edit(hf_dir, tmp_path / "b", to_fp8)
  with pytest.raises(dsv3_jax.CheckpointError, match=r"FP8 tensor .*o_proj\.weight' has no .*_scale_inv"):
    dsv3_jax.from_pretrained(bad)


def test_missing_shard_and_truncated_file(hf_dir, tmp_path):
  sharded = shutil.copytree(hf_dir, tmp_path / "s")
  names = SafetensorsFile(sharded / "model.safetensors").keys()
  (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
  wm = {n: "model-00001-of-00002.safetensors" for n in names}
  wm["lm_head.weight"] = "model-00002-of-00002.safetensors"
  (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
  with pytest.raises(dsv3_jax.CheckpointError, match=r"shard model-00002-of-00002\.safetensors is missing"):
    dsv3_jax.from_pretrained(sharded)
  trunc = shutil.copytree(hf_dir, tmp_path / "t")
  data = (trunc / "model.safetensors").read_bytes()
  (trunc / "model.safetensors").write_bytes(data[:len(data) // 2])
  with pytest.raises(SafetensorsError, match=r"model\.safetensors: truncated"):
    dsv3_jax.from_pretrained(trunc)


def test_safetensors_io_roundtrip_and_torch_compat(tmp_path):
  """Our writer's files read back bit-exactly and open in the reference safetensors library."""
  rng = np.random.RandomState(0)
  t = {"a": rng.randn(3, 5).astype(ml_dtypes.bfloat16), "b": rng.randn(7).astype(np.float32),
       "c": rng.randn(4, 4).astype(ml_dtypes.float8_e4m3fn), "d": np.arange(6, dtype=np.int64)}
  save_file(t, str(tmp_path / "x.safetensors"))
  f = SafetensorsFile(tmp_path / "x.safetensors")
  for k, v in t.items():
    assert f.dtype(k) == v.dtype and np.array_equal(f[k].view(np.uint8), v.view(np.uint8))
  from safetensors.torch import load_file
  ref = load_file(str(tmp_path / "x.safetensors"))
  assert torch.equal(ref["d"], torch.arange(6))
  assert np.array_equal(ref["a"].float().numpy(), t["a"].astype(np.float32))
