"""Test set-up: CPU backend with 8 simulated devices, configured before jax is imported."""
import os

os.environ["JAX_PLATFORMS"] = "cpu"
# Several test processes (pytest-xdist workers) load libtpu for TPU AOT compilation at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
  """Tests marked `slow` run first (the order is otherwise kept): pytest-xdist hands tests to its
  workers in this order, so the longest ones start early and the workers finish together
  instead of one of them running a long test alone at the end."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
