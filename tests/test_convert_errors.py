"""Bad input to `dsv3 convert`: each gives an error naming the file/tensor, and nothing
finished-looking is left at DST (no directory at all, or for an interrupted run only the hidden
`.<name>.partial` without the manifest, from which the same command resumes)."""
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
from dsv3_jax.convert import convert, is_converted, orbax_io, read_manifest
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
  return not os.path.exists(dst) and not [n for n in os.listdir(parent) if ".partial" in n]


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


def _spy_saves(monkeypatch, fail_at=None, exc=OSError("disk full (injected)")):
  """Records the leaf paths of every Orbax partial save; raises `exc` at call `fail_at`."""
  from orbax.checkpoint.experimental.v1 import partial
  from dsv3_jax.param_tree import flatten
  real, calls = partial.save_async, []

  def save_async(path, tree, **kw):
    if fail_at is not None and len(calls) + 1 == fail_at:
      raise exc
    calls.append(sorted(flatten(tree)))
    return real(path, tree, **kw)

  monkeypatch.setattr(partial, "save_async", save_async)
  return calls


def test_failure_mid_way_resumes(fp8_src, tmp_path, monkeypatch):
  """A write that fails mid-way (or Ctrl-C) leaves DST absent and only the hidden staging
  directory; the same command again writes only the parameters not yet written, and the result
  equals an uninterrupted conversion."""
  from tests.test_convert import _assert_same_orbax
  dst = str(tmp_path / "dst")
  first = _spy_saves(monkeypatch, fail_at=12)
  with pytest.raises(OSError, match="injected"):
    convert(fp8_src["e4m3"], dst, dtype="float8", progress=False, group_bytes=1)
  assert not os.path.exists(dst) and os.path.isdir(tmp_path / ".dst.partial")
  assert not is_converted(tmp_path / ".dst.partial") and len(first) == 11
  monkeypatch.undo()
  second = _spy_saves(monkeypatch, fail_at=3, exc=KeyboardInterrupt())
  with pytest.raises(KeyboardInterrupt):
    convert(fp8_src["e4m3"], dst, dtype="float8", progress=False, group_bytes=1)
  monkeypatch.undo()
  third = _spy_saves(monkeypatch)
  convert(fp8_src["e4m3"], dst, dtype="float8", progress=False, group_bytes=1)
  written = [leaf for c in first + second + third for leaf in c]
  assert len(written) == len(set(written)), "a parameter was written twice"
  assert is_converted(dst) and not os.path.exists(tmp_path / ".dst.partial")
  _assert_same_orbax(dst, convert(fp8_src["e4m3"], tmp_path / "fresh", dtype="float8",
                                  progress=False))


def test_other_arguments_start_over(fp8_src, tmp_path, monkeypatch):
  dst = str(tmp_path / "dst")
  _spy_saves(monkeypatch, fail_at=5)
  with pytest.raises(OSError):
    convert(fp8_src["e4m3"], dst, dtype="float8", progress=False, group_bytes=1)
  monkeypatch.undo()
  calls = _spy_saves(monkeypatch)
  convert(fp8_src["e4m3"], dst, dtype="bfloat16", progress=False, group_bytes=1)
  assert read_manifest(dst)["dtype"] == "bfloat16"
  assert len({leaf for c in calls for leaf in c}) == len(read_manifest(dst)["params"])


def test_killed_conversion_resumes(fp8_src, tmp_path):
  """SIGKILL in the middle (no cleanup can run): DST does not exist and cannot be loaded; the
  next run resumes and finishes; a live writer's staging directory is not touched."""
  dst = str(tmp_path / "dst")
  code = f"""
import os, signal, tests.conftest
from orbax.checkpoint.experimental.v1 import partial
from dsv3_jax.convert import convert
real, n = partial.save_async, [0]
def save_async(*a, **k):
  n[0] += 1
  if n[0] == 15:
    os.kill(os.getpid(), signal.SIGKILL)
  return real(*a, **k)
partial.save_async = save_async
convert({fp8_src['e4m3']!r}, {dst!r}, progress=False, group_bytes=1)
"""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, timeout=300)
  assert r.returncode == -signal.SIGKILL, r.stderr.decode()[-2000:]
  assert not os.path.exists(dst) and not is_converted(tmp_path / ".dst.partial")
  with pytest.raises((CheckpointError, FileNotFoundError, ValueError)):
    dsv3_jax.from_pretrained(dst)
  # A staging directory whose writer is alive (pid 1 always exists) is refused, not reused.
  busy = tmp_path / "busy"
  (tmp_path / ".busy.partial").mkdir()
  (tmp_path / ".busy.partial" / "writer.pid").write_text("1")
  with pytest.raises(orbax_io.ConversionBusy, match="process 1"):
    convert(fp8_src["e4m3"], busy, progress=False)
  convert(fp8_src["e4m3"], dst, progress=False, group_bytes=1)
  assert is_converted(dst)
  from tests.test_convert import _assert_same_params
  _assert_same_params(dsv3_jax.from_pretrained(dst, dtype=np.dtype("bfloat16")),
                      dsv3_jax.from_pretrained(fp8_src["e4m3"], dtype=np.dtype("bfloat16")))
