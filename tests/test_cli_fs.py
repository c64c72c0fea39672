"""Filesystem errors and interruptions in convert / export / train / demo are one line (exit 2 /
130, no traceback, no library log lines); the free-space check runs before a conversion writes
anything; `dsv3 demo` keeps everything under --out and handles a rerun; `dsv3 --version`."""
import errno
import importlib
import logging
import os
import re
from types import SimpleNamespace

import pytest

from dsv3_jax.errors import describe_os_error
from tests.cli_helpers import assert_user_error, run_cli, tiny_model, write_checkpoint


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  return write_checkpoint(tiny_model(1), str(tmp_path_factory.mktemp("fs") / "hf"), shards=False)


def test_free_space_checked_before_converting(capsys, hf, tmp_path, monkeypatch):
  from dsv3_jax.convert.cli import estimate_output_bytes
  need = estimate_output_bytes(hf, "float32")
  # oracle: the float32 bytes of every tensor of the checkpoint (its own bf16/fp32 files, read here)
  from dsv3_jax.safetensors_io import SafetensorsFile
  f = SafetensorsFile(os.path.join(hf, "model.safetensors"))
  want = sum(4 * int(__import__("math").prod(f.shape(k))) for k in f.keys())
  assert want <= need <= 1.03 * want
  real = os.statvfs
  monkeypatch.setattr(os, "statvfs", lambda p: SimpleNamespace(f_bavail=10, f_frsize=4096))
  dst = tmp_path / "out"
  msg = assert_user_error(run_cli(capsys, "convert", "--quiet", hf, dst, "--dtype", "float32"),
                          "convert", f"DST {dst}", "needs about", "0.0 MiB free")
  assert not dst.exists() and os.listdir(tmp_path) == []
  monkeypatch.setattr(os, "statvfs", real)
  assert "MiB" in msg


def test_destination_under_a_file(capsys, hf, tmp_path):
  (tmp_path / "file").write_text("x")
  dst = tmp_path / "file" / "out"
  assert_user_error(run_cli(capsys, "convert", "--quiet", hf, dst), "convert", str(tmp_path / "file"))
  res = run_cli(capsys, "train", "--quiet", "--out", dst, "--steps", "1")
  assert_user_error(res, "train", str(tmp_path / "file"))


def test_full_disk_mid_conversion_is_one_line_without_orbax_logs(capsys, hf, tmp_path, monkeypatch):
  import absl.logging

  conv = importlib.import_module("dsv3_jax.convert.convert")

  def full_disk(*a, **k):
    for i in range(30):  # what Orbax does on a failed save
      absl.logging.error("orbax: failed to write chunk %d", i)
      logging.getLogger("orbax.checkpoint").error("orbax: retrying %d", i)
    raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "params"))
  monkeypatch.setattr(conv, "convert", full_disk)
  res = run_cli(capsys, "convert", hf, tmp_path / "out")
  assert_user_error(res, "convert", "No space left on device", str(tmp_path / "out" / "params"),
                    "free some space")


def test_read_only_export_destination(capsys, tmp_path, monkeypatch):
  exp = importlib.import_module("dsv3_jax.convert.export")

  def read_only(src, out, **k):
    raise OSError(errno.EROFS, "Read-only file system", out)
  monkeypatch.setattr(exp, "export", read_only)
  (tmp_path / "src").mkdir()
  res = run_cli(capsys, "export", tmp_path / "src", tmp_path / "hf")
  assert_user_error(res, "export", f"{tmp_path / 'hf'}: Read-only file system",
                    "writable destination")


def test_ctrl_c_in_convert(capsys, hf, tmp_path, monkeypatch):
  conv = importlib.import_module("dsv3_jax.convert.convert")

  def interrupted(*a, **k):
    raise KeyboardInterrupt
  monkeypatch.setattr(conv, "convert", interrupted)
  res = run_cli(capsys, "convert", hf, tmp_path / "out")
  assert_user_error(res, "convert", f"{tmp_path / 'out'} is not complete", status=130)


def test_describe_os_error():
  e = OSError(errno.EACCES, "Permission denied", "/x/y")
  assert describe_os_error(e) == "/x/y: Permission denied; check the permissions or choose another destination"
  assert describe_os_error(FileNotFoundError("no tokenizer.json in /d")) == "no tokenizer.json in /d"
  assert "a -> b" not in describe_os_error(OSError(errno.EXDEV, "Invalid cross-device link", "a", None, "b"))


@pytest.fixture
def quick_demo(monkeypatch):
  """The demo's folder handling with a stand-in for its body (tests/test_demo.py runs the real
  demo and checks that it writes only under --out)."""
  import dsv3_jax.demo

  def body(args, root):
    for part in ("tiny-deepseek-v3", "train"):
      os.makedirs(os.path.join(root, part))
      open(os.path.join(root, part, "config.json"), "w").close()
    return 0
  monkeypatch.setattr(dsv3_jax.demo, "_run", body)


def test_demo_rerun_needs_overwrite(capsys, tmp_path, quick_demo):
  out = tmp_path / "mydemo"
  args = ["demo", "--out", out]
  assert run_cli(capsys, *args)[0] == 0
  assert_user_error(run_cli(capsys, *args), "demo", f"--out {out} already holds a demo",
                    "--overwrite")
  (out / "train" / "old").write_text("x")
  assert run_cli(capsys, *args, "--overwrite")[0] == 0
  assert not (out / "train" / "old").exists() and (out / "train" / "config.json").exists()


def test_demo_temp_folder_is_named_and_removed(capsys, quick_demo):
  rc, text, _ = run_cli(capsys, "demo")
  assert rc == 0
  tmp = re.search(r"temporary folder (\S+) \(removed at the end", text).group(1)
  assert f"removed {tmp}" in text and not os.path.exists(tmp)
  rc, text, _ = run_cli(capsys, "demo", "--keep")
  tmp = re.search(r"temporary folder (\S+) \(kept at the end", text).group(1)
  assert os.path.exists(os.path.join(tmp, "train", "config.json"))
  import shutil
  shutil.rmtree(tmp)


def test_version(capsys):
  with pytest.raises(SystemExit) as e:
    run_cli(capsys, "--version")
  assert e.value.code == 0
  assert re.fullmatch(r"dsv3 \S+\n", capsys.readouterr().out)


# What tensorstore (under Orbax) raised when `dsv3 convert` filled a 300 KiB tmpfs (shortened).
TENSORSTORE_ENOSPC = (
    'RESOURCE_EXHAUSTED: Error opening "zarr3" driver: Error writing "value/zarr.json" in OCDBT '
    'database at local file "/mnt/small/.out.partial-24111/params/layers.0.kernel/ocdbt.process_0/": '
    'Failed writing: "/mnt/small/.out.partial-24111/params/layers.0.kernel/ocdbt.process_0/'
    'manifest.ocdbt.__lock": Failed to write 113 bytes to file 15: No space left on device '
    "[os_error_code='28'] [tensorstore_spec='{\"driver\":\"zarr3\",\"path\":\"/x/\"}']")


def test_full_disk_reported_by_orbax_is_one_line(capsys, hf, tmp_path, monkeypatch):
  conv = importlib.import_module("dsv3_jax.convert.convert")

  def full_disk(*a, **k):
    raise ValueError(TENSORSTORE_ENOSPC)
  monkeypatch.setattr(conv, "convert", full_disk)
  res = run_cli(capsys, "convert", hf, tmp_path / "out")
  assert_user_error(res, "convert", "/mnt/small/.out.partial-24111/params/layers.0.kernel/"
                    "ocdbt.process_0/manifest.ocdbt.__lock: No space left on device", "free some space")

  def other(*a, **k):  # a ValueError without an OS error code is a bug: traceback
    raise ValueError("RESOURCE_EXHAUSTED: out of memory")
  monkeypatch.setattr(conv, "convert", other)
  with pytest.raises(ValueError, match="out of memory"):
    run_cli(capsys, "convert", hf, tmp_path / "out")
