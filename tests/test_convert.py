"""`dsv3 convert` / `dsv3 export` on tiny real-format checkpoints.

Oracle: the HF directory loaded by `from_pretrained` (itself tested against transformers in
test_model_parity.py). The converted parameters are the same numbers, so logits must be equal
bit for bit (same dtype, same compiled forward), not merely close. Round trips (export ->
convert, and the official FP8 files -> convert -> export) must reproduce every tensor's bytes.
"""
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import dsv3_jax
from dsv3_jax.cli import main as dsv3_main
from dsv3_jax.convert import Fp8Weight, convert, export, read_manifest, restore_arrays, restore_numpy
from dsv3_jax.pretrained import abstract_model, flat_variables
from tests.test_convert_fixtures import TOKENS, all_tensors, bits, fp8_src, hf_src  # noqa: F401

_forward = nnx.jit(lambda m, t: (lambda o: (o.logits, o.mtp_logits))(m.forward(t, mtp=True)))


def _out(model):
  logits, mtp = _forward(model, jnp.asarray(TOKENS))
  return np.asarray(logits), None if mtp is None else np.asarray(mtp)


def _params(model) -> dict[str, np.ndarray]:
  return {k: np.asarray(v.get_value()) for k, v in flat_variables(model).items()}


def _assert_same_params(a, b):
  pa, pb = _params(a), _params(b)
  assert sorted(pa) == sorted(pb)
  for k in pa:
    assert pa[k].dtype == pb[k].dtype, k
    np.testing.assert_array_equal(bits(pa[k]), bits(pb[k]), err_msg=k)


def _restore_numpy(d, p, m):
  return restore_numpy(os.path.join(d, "params"), [p], m["params"])[p]


def _assert_same_orbax(a: str, b: str):
  ma, mb = read_manifest(a), read_manifest(b)
  assert ma["params"] == mb["params"] and ma["dtype"] == mb["dtype"]
  for p in ma["params"]:
    for x, y in zip(_restore_numpy(a, p, ma), _restore_numpy(b, p, mb)):
      if x is None:
        assert y is None
      else:
        assert x.dtype == y.dtype, p
        np.testing.assert_array_equal(bits(x), bits(y), err_msg=p)


def _assert_same_tensors(a: str, b: str):
  ta, tb = all_tensors(a), all_tensors(b)
  assert sorted(ta) == sorted(tb), set(ta) ^ set(tb)
  for n in ta:
    assert (ta[n].dtype, ta[n].shape) == (tb[n].dtype, tb[n].shape), n
    np.testing.assert_array_equal(bits(ta[n]), bits(tb[n]), err_msg=n)


def test_transformers_checkpoint_converts_and_round_trips(hf_src, tmp_path):
  # Through the CLI: `dsv3 convert SRC DST --dtype float32`.
  dst = str(tmp_path / "orbax")
  assert dsv3_main(["convert", hf_src, dst, "--dtype", "float32", "--no-progress"]) == 0
  m = read_manifest(dst)
  assert m["dtype"] == "float32" and m["num_nextn_predict_layers"] == 0
  assert m["params"]["layers.1.mlp.experts.gate_proj"]["shape"] == [8, 64, 24]  # stacked
  ours, ref = dsv3_jax.from_pretrained(dst), dsv3_jax.from_pretrained(hf_src)
  _assert_same_params(ours, ref)
  np.testing.assert_array_equal(_out(ours)[0], _out(ref)[0])
  # export -> HF: every tensor transformers saved comes back bit-exactly; convert again: same Orbax.
  ex = str(tmp_path / "exported")
  assert dsv3_main(["export", dst, ex, "--dtype", "float32", "--no-progress",
                    "--max-shard-gb", "0.0002"]) == 0
  assert len(json.load(open(os.path.join(ex, "model.safetensors.index.json")))["weight_map"]) > 0
  assert len([f for f in os.listdir(ex) if f.endswith(".safetensors")]) > 1  # sharded
  _assert_same_tensors(ex, hf_src)
  again = convert(ex, tmp_path / "orbax2", dtype="float32", progress=False)
  _assert_same_orbax(dst, again)


@pytest.mark.parametrize("dtype", ["float32", "float8"])
def test_fp8_checkpoint_logits_equal_hf(fp8_src, dtype, tmp_path):
  """e4m3 with float32 scales: dequantised (float32) or kept (float8); MTP converted."""
  src = fp8_src["e4m3"]
  dst = convert(src, tmp_path / "o", dtype=dtype, progress=False)
  m = read_manifest(dst)
  assert m["num_nextn_predict_layers"] == 1
  assert {"mtp.0.eh_proj.kernel", "mtp.0.block.mlp.experts.down_proj",
          "mtp.0.shared_head_norm.weight"} <= set(m["params"])
  assert os.path.exists(os.path.join(dst, "tokenizer_config.json"))
  if dtype == "float8":
    e = m["params"]["layers.0.self_attn.kv_a_proj_with_mqa.kernel"]  # [40, 64]: partial blocks
    assert e["quantized"] and e["dtype"] == "float8_e4m3fn"
    assert e["shape"] == [40, 64] and e["scale_shape"] == [3, 4]
    assert not m["params"]["lm_head.kernel"]["quantized"]
    assert not m["params"]["layers.1.mlp.gate.kernel"]["quantized"]
    raw = all_tensors(src)
    v, s = _restore_numpy(dst, "layers.2.mlp.experts.up_proj", m)
    np.testing.assert_array_equal(bits(v[5]), bits(raw["model.layers.2.mlp.experts.5.up_proj.weight"]))
    np.testing.assert_array_equal(s[5], raw["model.layers.2.mlp.experts.5.up_proj.weight_scale_inv"])
  else:
    assert "quantization_config" not in json.load(open(os.path.join(dst, "config.json")))
  ours, ref = dsv3_jax.from_pretrained(dst), dsv3_jax.from_pretrained(src)
  _assert_same_params(ours, ref)
  (lo, mo), (lr, mr) = _out(ours), _out(ref)
  assert mo is not None and mo.shape == (1,) + lo.shape
  np.testing.assert_array_equal(lo, lr)
  np.testing.assert_array_equal(mo, mr)


def test_fp8_to_bf16_matches_bf16_load(fp8_src, tmp_path):
  """--dtype bfloat16 stores exactly what from_pretrained(HF, bf16) computes (dequant, round)."""
  dst = convert(fp8_src["e4m3"], tmp_path / "o", dtype="bfloat16", progress=False)
  e = read_manifest(dst)["params"]
  assert e["layers.0.mlp.down_proj.kernel"]["dtype"] == "bfloat16"
  assert e["layers.1.mlp.gate.e_score_correction_bias"]["dtype"] == "float32"
  _assert_same_params(dsv3_jax.from_pretrained(dst, dtype=jnp.bfloat16),
                      dsv3_jax.from_pretrained(fp8_src["e4m3"], dtype=jnp.bfloat16))


@pytest.mark.parametrize("kind", ["e4m3", "ue8m0"])
def test_fp8_export_round_trip_bit_exact(fp8_src, kind, tmp_path):
  """official FP8 -> convert float8 -> export float8 == the official files; -> convert == same."""
  src = fp8_src[kind]
  a = convert(src, tmp_path / "a", dtype="float8", progress=False)
  ex = export(a, tmp_path / "ex", dtype="float8", progress=False, max_shard_bytes=50_000)
  _assert_same_tensors(ex, src)
  q = json.load(open(os.path.join(ex, "config.json")))["quantization_config"]
  assert q["weight_block_size"] == [16, 16] and q.get("scale_fmt") == (None if kind == "e4m3" else kind)
  _assert_same_orbax(a, convert(ex, tmp_path / "b", dtype="float8", progress=False))
  if kind == "ue8m0":  # power-of-two scales dequantise like any other
    _assert_same_params(dsv3_jax.from_pretrained(a), dsv3_jax.from_pretrained(src))


def test_export_quantises_plain_weights(fp8_src, tmp_path):
  """A bf16/fp32 tree exported as FP8: per-block e4m3 within half an e4m3 step of the weight."""
  a = convert(fp8_src["e4m3"], tmp_path / "a", dtype="float32", progress=False)
  ex = export(a, tmp_path / "ex", dtype="float8", progress=False)
  t, src = all_tensors(ex), all_tensors(fp8_src["e4m3"])
  assert sorted(t) == sorted(src)
  name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
  # The dequantised tree has no block size of its own: the official 128x128 (one partial block).
  assert t[name].dtype == ml_dtypes.float8_e4m3fn and t[name + "_scale_inv"].shape == (1, 1)
  w = np.repeat(np.repeat(src[name + "_scale_inv"], 16, 0), 16, 1)[:40, :64] * src[name].astype(np.float32)
  back = t[name + "_scale_inv"][0, 0] * t[name].astype(np.float32)
  # e4m3 has 3 mantissa bits: relative rounding <= 2^-4 of the value (plus subnormal steps).
  assert np.all(np.abs(back - w) <= 2.0 ** -4 * np.abs(w) + 2.0 ** -9 * np.abs(w).max())


def test_restore_into_sharding(fp8_src, tmp_path):
  """from_pretrained(..., shardings=fn) places each parameter as asked, values unchanged;
  keep_fp8 restores e4m3 values sharded in the checkpoint layout."""
  dst = convert(fp8_src["e4m3"], tmp_path / "o", dtype="float8", progress=False)
  mesh = jax.make_mesh((2, 4), ("data", "model"))

  def spec(path, var):  # shard the last axis over "model" where it divides, else replicate
    shape = var.get_value().shape
    return NamedSharding(mesh, P(*([None] * (len(shape) - 1) + ["model"]))
                         if shape and shape[-1] % 4 == 0 else P())

  sharded = dsv3_jax.from_pretrained(dst, shardings=spec)
  k = flat_variables(sharded)["layers.1.mlp.experts.gate_proj"].get_value()
  assert k.sharding.spec == P(None, None, "model") and len(k.sharding.device_set) == 8
  _assert_same_params(sharded, dsv3_jax.from_pretrained(fp8_src["e4m3"]))
  abstract = flat_variables(abstract_model(sharded.config))
  name = "layers.0.self_attn.q_b_proj.kernel"  # ours [40, 96], stored [96, 40]
  r = restore_arrays(dst, {name: abstract[name]}, shardings=spec, keep_fp8=True)[name]
  assert isinstance(r, Fp8Weight) and r.value.dtype == jnp.float8_e4m3fn
  assert r.value.shape == (96, 40) and r.value.sharding.spec == P("model", None)
  assert r.block == (16, 16)
  raw = all_tensors(fp8_src["e4m3"])["model.layers.0.self_attn.q_b_proj.weight"]
  np.testing.assert_array_equal(bits(np.asarray(r.value)), bits(raw))


def test_grouped_restore_reports_bytes_and_equals_one_restore(hf_src, tmp_path, capsys,
                                                             monkeypatch):
  """Loading restores in groups of ~group_bytes with a progress line per group (plain mode):
  the arrays equal one whole-tree restore bit for bit, and the bytes reported add up to the
  parameters' total."""
  from dsv3_jax import ui
  dst = convert(hf_src, tmp_path / "o", dtype="bfloat16", progress=False)
  abstract = flat_variables(abstract_model(dsv3_jax.from_pretrained(dst).config))
  whole = restore_arrays(dst, abstract)
  ui.configure(type("A", (), {"log_format": "plain", "quiet": False})())
  monkeypatch.setattr(ui._PlainProgress, "every_s", 0.0)
  capsys.readouterr()
  try:
    parts = restore_arrays(dst, abstract, group_bytes=4096, progress=True)
  finally:
    ui.configure(type("A", (), {"log_format": "auto", "quiet": False})())
  lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("load: ")]
  total = sum(int(np.prod(v.get_value().shape)) * np.dtype(v.get_value().dtype).itemsize
              for v in abstract.values())
  assert len(lines) > 3 and lines[-1].startswith(f"load: {total}/{total} Bs"), lines[-3:]
  assert set(parts) == set(whole)
  for k in whole:
    np.testing.assert_array_equal(np.asarray(parts[k]), np.asarray(whole[k]), err_msg=k)
