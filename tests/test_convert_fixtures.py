"""Checkpoints for the converter tests (fixtures only; no tests here).

`hf_src`: a transformers-saved tiny DeepseekV3ForCausalLM (fp32, one file, no MTP layer).
`fp8_src(kind)`: the same weights in the official FP8 format, built here independently of the
converter: every linear weight except mlp.gate / lm_head quantised to float8_e4m3fn with a
float32 `weight_scale_inv` per 16x16 block (the tiny dims 40 and 24 leave partial edge blocks),
either scale = amax/448 ("e4m3") or its power of two above ("ue8m0", V3.1); other tensors bf16,
the router bias fp32; plus an MTP layer at index num_hidden_layers (a full MoE decoder block,
enorm, hnorm, eh_proj, shared_head.norm and the copies embed_tokens / shared_head.head); split
over 4 shards with model.safetensors.index.json.
"""
from __future__ import annotations

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest

from dsv3_jax.safetensors_io import SafetensorsFile, save_file

BLOCK = 16
QCONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [BLOCK, BLOCK],
           "activation_scheme": "dynamic"}
N_LAYERS = 3
TOKENS = np.random.RandomState(7).randint(0, 97, (2, 11)).astype(np.int32)


def _quantize(w: np.ndarray, pow2: bool) -> tuple[np.ndarray, np.ndarray]:
  """Reference block quantisation, loop over blocks (deliberately not the converter's code)."""
  m, n = w.shape
  q = np.empty((m, n), ml_dtypes.float8_e4m3fn)
  s = np.empty((-(-m // BLOCK), -(-n // BLOCK)), np.float32)
  for i in range(s.shape[0]):
    for j in range(s.shape[1]):
      tile = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK].astype(np.float32)
      scale = np.float32(max(float(np.abs(tile).max()), 1e-12) / 448.0)
      if pow2:
        scale = np.float32(2.0 ** np.ceil(np.log2(scale)))
      s[i, j] = scale
      q[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = (tile / scale).astype(
          ml_dtypes.float8_e4m3fn)
  return q, s


def _is_quantised(name: str, arr: np.ndarray) -> bool:
  return (arr.ndim == 2 and name.endswith("proj.weight") or name.endswith("proj_with_mqa.weight")) \
      and ".mlp.gate." not in name


def write_sharded(tensors: dict[str, np.ndarray], path: str, n_shards: int = 4) -> None:
  """Writes `tensors` over n_shards files + model.safetensors.index.json."""
  names = list(tensors)
  files = {}
  for i in range(n_shards):
    fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
    part = names[i::n_shards]
    save_file({n: tensors[n] for n in part}, os.path.join(path, fname), {"format": "pt"})
    files.update({n: fname for n in part})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": files}, f)


def build_fp8(hf_dir: str, out: str, *, scale_fmt: str | None) -> None:
  """The FP8 official-format checkpoint of the module docstring, from `hf_dir`."""
  os.makedirs(out)
  src = SafetensorsFile(os.path.join(hf_dir, "model.safetensors"))
  base = {n: np.array(src[n]) for n in src.keys()}
  with open(os.path.join(hf_dir, "config.json")) as f:
    cfg = json.load(f)
  rng = np.random.RandomState(3)
  mtp = f"model.layers.{N_LAYERS}."
  last = f"model.layers.{N_LAYERS - 1}."
  for n in list(base):  # the MTP block: a perturbed copy of the last (MoE) layer
    if n.startswith(last):
      v = base[n]
      base[mtp + n[len(last):]] = (v + 0.02 * rng.randn(*v.shape)).astype(v.dtype) \
          if not n.endswith("bias") else v
  d = cfg["hidden_size"]
  base[mtp + "enorm.weight"] = (1 + 0.1 * rng.randn(d)).astype(np.float32)
  base[mtp + "hnorm.weight"] = (1 + 0.1 * rng.randn(d)).astype(np.float32)
  base[mtp + "shared_head.norm.weight"] = (1 + 0.1 * rng.randn(d)).astype(np.float32)
  base[mtp + "eh_proj.weight"] = (0.08 * rng.randn(d, 2 * d)).astype(np.float32)
  base[mtp + "embed_tokens.weight"] = base["model.embed_tokens.weight"]
  base[mtp + "shared_head.head.weight"] = base["lm_head.weight"]
  out_t = {}
  for n, v in base.items():
    if n.endswith("e_score_correction_bias"):
      out_t[n] = v.astype(np.float32)
    elif _is_quantised(n, v):
      out_t[n], out_t[n + "_scale_inv"] = _quantize(v, scale_fmt == "ue8m0")
    else:
      out_t[n] = v.astype(ml_dtypes.bfloat16)
  write_sharded(out_t, out)
  q = dict(QCONFIG, **({"scale_fmt": scale_fmt} if scale_fmt else {}))
  cfg.update(num_nextn_predict_layers=1, quantization_config=q)
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(cfg, f)
  for extra in ("generation_config.json",):
    if os.path.exists(os.path.join(hf_dir, extra)):
      shutil.copy(os.path.join(hf_dir, extra), out)
  with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump({"model_max_length": 256}, f)


def all_tensors(path: str) -> dict[str, np.ndarray]:
  """{name: array} of an HF directory (single file or index)."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = ["model.safetensors"]
  out = {}
  for fname in files:
    f = SafetensorsFile(os.path.join(path, fname))
    out.update({n: np.array(f[n]) for n in f.keys()})
  return out


def bits(a: np.ndarray) -> np.ndarray:
  """The raw bytes of an array, for bit-exact comparison (NaN-safe)."""
  return np.ascontiguousarray(a).view(np.uint8)


@pytest.fixture(scope="session")
def hf_src(tmp_path_factory):
  from tests.hf_reference import make_v3
  path = str(tmp_path_factory.mktemp("hf") / "hf")
  make_v3(path, seed=11, num_hidden_layers=N_LAYERS)
  return path


@pytest.fixture(scope="session")
def fp8_src(hf_src, tmp_path_factory):
  """{"e4m3": dir, "ue8m0": dir}."""
  root = tmp_path_factory.mktemp("fp8")
  out = {}
  for kind, fmt in (("e4m3", None), ("ue8m0", "ue8m0")):
    out[kind] = str(root / kind)
    build_fp8(hf_src, out[kind], scale_fmt=fmt)
  return out
