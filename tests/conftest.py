"""Test set-up: CPU backend with 8 simulated devices, configured before jax is imported."""
import os

os.environ["JAX_PLATFORMS"] = "cpu"
# Several test processes (pytest-xdist workers) load libtpu for TPU AOT compilation at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()


def _cpu_compile_flags() -> str:
  """XLA_FLAGS that make XLA:CPU compile faster where this jaxlib has them, for every test process
  (the pytest process, its xdist workers and the `dsv3` children they start, all of which inherit
  the environment; tests that set a child's XLA_FLAGS themselves add `tests.utils.CPU_TEST_FLAGS`).
  `--xla_cpu_use_fusion_emitters=false`: jaxlib 0.10's XLA:CPU emits fusions with its MLIR fusion
  emitters by default, which cost most of a tiny model's compile (its train step: 7.4 -> 3.0 s;
  the suite's summed test durations 2214 -> 1549 s on 2 cores); off, fusions are emitted by the
  elemental IR emitter, and every test passes at its stated tolerance as before. Later jaxlibs (0.12) have only the fusion emitters
  and abort on the unknown flag, so it is probed in a child process, once per test run (the
  verdict is passed on in DSV3_TEST_CPU_FLAGS)."""
  if "DSV3_TEST_CPU_FLAGS" in os.environ:
    return os.environ["DSV3_TEST_CPU_FLAGS"]
  import subprocess
  import sys
  flag = "--xla_cpu_use_fusion_emitters=false"
  probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"],
                         env=dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu"),
                         capture_output=True, timeout=300)
  os.environ["DSV3_TEST_CPU_FLAGS"] = flag if probe.returncode == 0 else ""
  return os.environ["DSV3_TEST_CPU_FLAGS"]


for _f in _cpu_compile_flags().split():
  if _f.split("=")[0] not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + _f

# JAX's persistent compilation cache, one folder per test run (made here by the first process,
# removed at its end): the pytest-xdist workers and the `dsv3` subprocesses the tests start inherit
# the environment, so a program one process compiled is loaded, not compiled again, by the next
# that lowers the same program with the same options (the cache key covers the HLO, the compile
# options, XLA_FLAGS, the devices and the jax/jaxlib versions: results cannot change). Programs
# compiled for TPU topologies on this CPU host are written but never read back (jax cannot
# deserialise them without a TPU client; it warns and compiles again), so `dsv3 plan` figures are
# always freshly compiled. A JAX_COMPILATION_CACHE_DIR already set is used as it is, and kept.
_OWN_CACHE = None
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  import tempfile
  _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dsv3-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# Modules whose module- or session-scoped fixtures compile or run a model (a server process, a
# reference forward/backward, a training run, a generated token list, converted checkpoints):
# under pytest-xdist each group runs on one worker, so those fixtures are built once per run
# instead of once per worker that happens to get one of the module's tests.
SHARED_FIXTURE_GROUPS = {
    "tests/test_serve_http.py": "serve_http",
    "tests/test_inference.py": "inference",
    "tests/test_kernels_in_model.py": "kernels_in_model",
    "tests/test_mesh_entry.py": "mesh_entry",
    "tests/test_serving_engine.py": "serving_engine",
    "tests/test_sharded_kernels.py": "sharded_kernels",
    "tests/test_sharding_model.py": "sharding_model",
    "tests/test_fp8_model.py": "fp8_model",
    "tests/test_rl_consistency.py": "rl_consistency",
    "tests/test_cli_generate.py": "cli_generate",
    # the session-scoped transformers-made checkpoints of test_convert_fixtures.py
    "tests/test_convert_fixtures.py": "convert",
    "tests/test_convert.py": "convert",
    "tests/test_convert_errors.py": "convert",
}

# Tests not marked slow that still take 20-30 s (CI, quiet host): started early with the slow
# ones, so no worker is left running one alone at the end. (The Mosaic GPU interpret tests were
# here until they compiled each kernel once: now under 10 s each.)
HEAVY = ("tests/test_train.py::test_remat_step_matches_plain_step",
         "tests/test_rl_sft.py::test_distillation_generate_then_sft",
         "tests/test_rl_sharded.py::test_sharded_grpo_step_matches_single_device")


def _default_xdist_run(config) -> bool:
  """`-n N` without an explicit --dist/-d (the README's command)."""
  args = " ".join(map(str, config.invocation_params.args))
  return config.getvalue("dist") == "load" and not config.getvalue("distload") \
      and "--dist" not in args


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: absent under -p no:xdist
def pytest_xdist_make_scheduler(config, log):
  """Under `-n N` (the README's command): xdist's scope scheduler with each
  SHARED_FIXTURE_GROUPS module one unit (one worker) and every other test a unit of its own,
  handed out in collection order (pytest_collection_modifyitems) as workers free up. An explicit
  --dist is left alone. (xdist's own --dist loadgroup cannot be used: with pytest 9 its workers
  no longer tag the test ids with the group.)"""
  if not _default_xdist_run(config):
    return None
  from xdist.scheduler import LoadScopeScheduling

  class SharedFixtureScheduling(LoadScopeScheduling):
    def _split_scope(self, nodeid):
      return SHARED_FIXTURE_GROUPS.get(nodeid.split("::")[0], nodeid)

  config.option.loadscopereorder = False  # keep the slow-first order
  return SharedFixtureScheduling(config, log)


def pytest_collection_modifyitems(config, items):
  """Tests marked `slow` (and the HEAVY ones) run first, then the SHARED_FIXTURE_GROUPS modules,
  then the rest (the order is otherwise kept): pytest-xdist hands tests to its workers in this
  order, so the longest ones start early and the workers finish together instead of one of them
  running a long test alone at the end."""
  def rank(item):
    if item.get_closest_marker("slow") is not None or item.nodeid.startswith(HEAVY):
      return 0
    return 1 if item.nodeid.split("::")[0] in SHARED_FIXTURE_GROUPS else 2

  items.sort(key=rank)


def pytest_unconfigure(config):
  """Removes the compilation cache folder this process made (the xdist controller's, after its
  workers have ended)."""
  if _OWN_CACHE is not None and not os.environ.get("PYTEST_XDIST_WORKER"):
    import shutil
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="module")
def module_fast_compiles():
  """Every program a module compiles (eager ops and model init included) without XLA's CPU
  optimisations (`tests.utils.fast_compiles`). For modules whose checks are all at a stated
  tolerance, or exact between programs both compiled inside the module. Opt in with
  `pytestmark = pytest.mark.usefixtures("module_fast_compiles")`."""
  from tests.utils import fast_compiles
  with fast_compiles():
    yield


@pytest.fixture(scope="module")
def module_interpreter_fast_compiles():
  """`module_fast_compiles` plus `tests.utils.interpreter_compile_cache`: the Mosaic GPU
  interpreter's per-warpgroup programs (compiled at run time, most of those tests' CPU) are
  compiled once per kernel, not per CTA. For the Mosaic GPU kernel tests (checks at tolerance)."""
  from tests.utils import fast_compiles, interpreter_compile_cache
  with fast_compiles(), interpreter_compile_cache():
    yield
