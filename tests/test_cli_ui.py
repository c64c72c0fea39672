"""`--log-format plain` / `--quiet`: plain progress lines (no carriage returns) or none."""
import os
import sys

from dsv3_jax import ui


def test_plain_progress_lines_and_quiet(capsys, monkeypatch):
  ui.configure(type("A", (), {"log_format": "plain", "quiet": False})())
  monkeypatch.setattr(ui._PlainProgress, "every_s", 0.0)
  assert list(ui.iterate(range(3), 3, "load", unit="param")) == [0, 1, 2]
  err = capsys.readouterr().err
  assert "\r" not in err and [l.split(" (")[0] for l in err.splitlines()] == [
      "load: 1/3 params", "load: 2/3 params", "load: 3/3 params"]
  ui.configure(type("A", (), {"log_format": "rich", "quiet": True})())
  ui.status("compiling ...")
  list(ui.iterate(range(3), 3, "load"))
  assert capsys.readouterr().err == "" and ui.mode() == "quiet"
  ui.configure(type("A", (), {"log_format": "auto", "quiet": False})())  # stderr is not a tty here
  assert ui.mode() == "plain"


def test_accelerator_free_host_reads_device_nodes(tmp_path):
  """The CLI pins jax to the CPU only where /dev holds no TPU, NVIDIA or AMD nodes."""
  from dsv3_jax.cli import _accelerator_free_host
  assert _accelerator_free_host(str(tmp_path))
  for node in ("accel0", "vfio/0", "nvidia0", "kfd"):
    d = tmp_path / "hosts" / node.replace("/", "_")
    (d / os.path.dirname(node)).mkdir(parents=True, exist_ok=True)
    (d / node).touch()
    assert not _accelerator_free_host(str(d)), node
  (tmp_path / "nvidiactl").touch()  # a control node alone is not a GPU
  assert _accelerator_free_host(str(tmp_path))


def test_cli_on_a_cpu_host_with_libtpu_prints_no_tpu_errors():
  """With libtpu installed (the test extra) and JAX_PLATFORMS unset, the CLI starts jax on the CPU
  and loads a TPU topology (`dsv3 plan`) without libtpu's screen of worker-hostname errors; a
  user's JAX_PLATFORMS is left alone."""
  import subprocess
  from dsv3_jax.cli import _accelerator_free_host
  assert _accelerator_free_host(), "this test expects a host without accelerators (the CI host)"
  code = ("import os, sys\nfrom dsv3_jax import cli\ncli._default_platform()\nimport jax\n"
          "from jax.experimental import topologies\n"
          "topo = topologies.get_topology_desc(topology_name='v5e:2x2', platform='tpu')\n"
          "print(os.environ['JAX_PLATFORMS'], jax.default_backend(), len(topo.devices))")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ["cpu", "cpu", "4"]  # and `dsv3 plan`'s TPU topology still loads
  # (libtpu's one-line "Failed to find host bounds" notice for the topology may remain)
  assert "TPU_WORKER_HOSTNAMES" not in out.stderr and "INVALID_ARGUMENT" not in out.stderr, out.stderr
  env["JAX_PLATFORMS"] = "cpu,"  # user's choice, kept verbatim
  code = "import os\nfrom dsv3_jax import cli\ncli._default_platform()\nprint(os.environ['JAX_PLATFORMS'])"
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
  assert out.stdout.strip() == "cpu,", out.stderr
