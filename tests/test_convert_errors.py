"""Bad input to `dsv3 convert`: each gives an error naming the file/tensor, and nothing
finished-looking is left at DST (no directory at all, or for a killed run only a hidden
`.<name>.partial-<pid>` without the manifest)."""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import dsv3_jax
from dsv3_jax.checkpoint import CheckpointError
from dsv3_jax.cli import main as dsv3_main
from dsv3_jax.convert import convert, is_converted, orbax_io
from tests.test_convert_fixtures import fp8_src, hf_src, write_sharded, all_tensors  # noqa: F401


@pytest.fixture
def src(fp8_src, tmp_path):
  """A private copy of the FP8 checkpoint to damage."""
  path = str(tmp_path / "src")
  shutil.copytree(fp8_src["e4m3"], path)
  return path


def _index(path):
  with open(os.path.join(path, "model.safetensors.index.json")) as f:
    return json.load(f)


def _set_index(path, index):
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f)


def _nothing_at(dst):
  parent = os.path.dirname(dst)
  return not os.path.exists(dst) and not [n for n in os.listdir(parent) if ".partial-" in n]


def _fails(src, dst, match, **kw):
  with pytest.raises((CheckpointError, ValueError)) as e:
    convert(src, dst, progress=False, **kw)
  assert e.match(match), str(e.value)
  assert _nothing_at(dst)
  return str(e.value)


def test_missing_shard(src, tmp_path):
  os.remove(os.path.join(src, "model-00002-of-00004.safetensors"))
  _fails(src, str(tmp_path / "dst"), r"shard model-00002-of-00004\.safetensors is missing")


def test_truncated_shard(src, tmp_path):
  f = os.path.join(src, "model-00003-of-00004.safetensors")
  size = os.path.getsize(f)
  with open(f, "r+b") as fh:
    fh.truncate(size - 100)
  _fails(src, str(tmp_path / "dst"), r"model-00003-of-00004\.safetensors: truncated")


def test_corrupt_header(src, tmp_path):
  f = os.path.join(src, "model-00001-of-00004.safetensors")
  with open(f, "r+b") as fh:
    fh.seek(8)
    fh.write(b"\xff\xfe{{garbage")
  _fails(src, str(tmp_path / "dst"), r"model-00001-of-00004\.safetensors: corrupt")


def test_tensor_missing_from_index(src, tmp_path):
  idx = _index(src)
  del idx["weight_map"]["model.layers.1.mlp.experts.3.down_proj.weight"]
  del idx["weight_map"]["model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"]
  _set_index(src, idx)
  _fails(src, str(tmp_path / "dst"), r"missing.*'model\.layers\.1\.mlp\.experts\.3\.down_proj\.weight'")


def test_shape_contradicts_config(src, tmp_path):
  with open(os.path.join(src, "config.json")) as f:
    cfg = json.load(f)
  cfg["moe_intermediate_size"] = 32
  with open(os.path.join(src, "config.json"), "w") as f:
    json.dump(cfg, f)
  msg = _fails(src, str(tmp_path / "dst"), r"experts\.0\.gate_proj\.weight' has shape \(24, 64\), "
               r"config\.json implies \(32, 64\)")
  assert ".safetensors" in msg


def test_fp8_weight_without_scale(src, tmp_path):
  idx = _index(src)
  del idx["weight_map"]["model.layers.0.self_attn.o_proj.weight_scale_inv"]
  _set_index(src, idx)
  _fails(src, str(tmp_path / "dst"), r"FP8 tensor 'model\.layers\.0\.self_attn\.o_proj\.weight' "
         r"has no 'model\.layers\.0\.self_attn\.o_proj\.weight_scale_inv'")


def test_unknown_tensor_error_and_opt_in(src, tmp_path):
  extra = os.path.join(src, "extra")
  os.makedirs(extra)
  write_sharded({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}, extra, 1)
  shutil.move(os.path.join(extra, "model-00001-of-00001.safetensors"),
              os.path.join(src, "extra.safetensors"))
  idx = _index(src)
  idx["weight_map"]["model.layers.0.self_attn.rotary_emb.inv_freq"] = "extra.safetensors"
  _set_index(src, idx)
  _fails(src, str(tmp_path / "dst"), r"unexpected tensor.*rotary_emb\.inv_freq.*extra\.safetensors"
         r".*--ignore-unexpected")
  dst = convert(src, tmp_path / "dst", ignore_unexpected=True, progress=False)
  assert is_converted(dst)


def test_dst_exists_needs_overwrite(fp8_src, tmp_path, capsys):
  dst = tmp_path / "dst"
  dst.mkdir()
  (dst / "keep.txt").write_text("mine")
  assert dsv3_main(["convert", fp8_src["e4m3"], str(dst), "--no-progress"]) == 2
  assert "already exists (pass --overwrite" in capsys.readouterr().err
  assert (dst / "keep.txt").read_text() == "mine"
  assert dsv3_main(["convert", fp8_src["e4m3"], str(dst), "--overwrite", "--dtype", "float8",
                    "--no-progress"]) == 0
  assert is_converted(dst) and not (dst / "keep.txt").exists()


def test_failure_mid_way_leaves_nothing(fp8_src, tmp_path, monkeypatch):
  real, calls = orbax_io.OrbaxWriter._save, []

  def flaky(self, path, tree):
    calls.append(path)
    if len(calls) == 20:
      raise OSError("disk full (injected)")
    return real(self, path, tree)

  monkeypatch.setattr(orbax_io.OrbaxWriter, "_save", flaky)
  with pytest.raises(OSError, match="injected"):
    convert(fp8_src["e4m3"], tmp_path / "dst", progress=False, workers=2)
  assert _nothing_at(str(tmp_path / "dst"))


def test_killed_conversion_is_not_finished_looking(fp8_src, tmp_path):
  """SIGKILL in the middle (no cleanup can run): DST does not exist; the partial sibling has no
  manifest; loading DST fails."""
  dst = str(tmp_path / "dst")
  code = f"""
import os, signal, tests.conftest
from dsv3_jax.convert import orbax_io, convert
real, n = orbax_io.OrbaxWriter._save, [0]
def save(self, path, tree):
  n[0] += 1
  if n[0] == 15:
    os.kill(os.getpid(), signal.SIGKILL)
  return real(self, path, tree)
orbax_io.OrbaxWriter._save = save
convert({fp8_src['e4m3']!r}, {dst!r}, progress=False)
"""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, timeout=300)
  assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
  assert not os.path.exists(dst)
  partial = [n for n in os.listdir(tmp_path) if n.startswith(".dst.partial-")]
  assert len(partial) == 1 and not is_converted(tmp_path / partial[0])
  with pytest.raises((CheckpointError, FileNotFoundError, ValueError)):
    dsv3_jax.from_pretrained(dst)
  # The next conversion into DST removes the dead process's partial directory and finishes.
  live = tmp_path / ".dst.partial-1"  # pid 1 always exists: a live writer's directory stays
  live.mkdir()
  convert(fp8_src["e4m3"], dst, progress=False)
  assert is_converted(dst)
  assert sorted(n for n in os.listdir(tmp_path) if ".partial-" in n) == [live.name]
