"""Shared test helpers: tolerance checks, fast XLA:CPU compiles, random-weight models, child
processes, and counters of kernels / collectives in traced or compiled programs."""
import contextlib
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# bench/common.py (bench/ is not a package) owns the HLO collective parser the EP tests use.
sys.path.insert(0, os.path.join(ROOT, "bench"))
from common import hlo_collectives  # noqa: E402,F401

# Faster XLA:CPU compiles for tests (compile time dominates tiny and interpret-mode programs; the
# numerics are unchanged up to float32 reassociation). FAST_COMPILE_FLAGS: the same as XLA_FLAGS
# for child processes.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# XLA_FLAGS every test process runs with that are not about the devices (tests/conftest.py:
# `_cpu_compile_flags`; "" where this jaxlib has none): for child processes whose XLA_FLAGS a test
# sets itself. FAST_COMPILE_FLAGS includes them.
CPU_TEST_FLAGS = os.environ.get("DSV3_TEST_CPU_FLAGS", "")
FAST_COMPILE_FLAGS = " ".join([f"--{k}={str(v).lower()}" for k, v in FAST_COMPILE.items()]
                              + CPU_TEST_FLAGS.split())


def run_fast(f, *args):
  """jit + compile with FAST_COMPILE, then run on `args`."""
  import jax
  return jax.jit(f).lower(*args).compile(compiler_options=FAST_COMPILE)(*args)


@contextlib.contextmanager
def fast_compiles():
  """Every program compiled inside compiles with FAST_COMPILE's two options (jax's
  `jax_disable_most_optimizations`, a process-wide flag), also those compiled on other threads:
  the Mosaic GPU interpreter compiles each warpgroup's program at run time in a thread pool, out
  of reach of `run_fast`'s compiler_options. For tests that check numerics at a tolerance only.
  On exit the flag is restored and jax's in-memory caches and the package's `CompiledCache`s
  (steps kept compiled across Trainers/Generators) are cleared, so no later test reuses a program
  compiled so (the persistent cache's key holds the options)."""
  import jax
  old = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", old)
    jax.clear_caches()
    from dsv3_jax.jit_cache import CompiledCache
    for name, module in list(sys.modules.items()):
      if name.startswith("dsv3_jax"):
        for value in list(vars(module).values()):
          if isinstance(value, CompiledCache):
            value.clear()


def _run_eqns(jaxpr, consts, *args):
  import jax
  jax.core.eval_jaxpr(jaxpr, consts, *args)


@contextlib.contextmanager
def interpreter_compile_cache():
  """The Mosaic GPU interpreter runs each CTA's warpgroups through `thread_map`, which on jax
  0.10 jits a function it defines anew at every call, so every CTA of every kernel call traces,
  lowers and compiles (or loads from the persistent cache) its warpgroup programs again. Newer
  jax (0.12) jits one top-level function instead, and its caches serve every later CTA; inside
  this context the older jax does the same (the same programs run, compiled once). A no-op where
  jax already has the top-level function."""
  try:
    from jax._src.pallas.mosaic.interpret import thread_map
  except ImportError:
    yield
    return
  if hasattr(thread_map, "_run") or not hasattr(thread_map, "_run_jaxpr"):
    yield
    return
  import jax

  def run_jaxpr(jaxpr, consts, *args):
    jax.jit(_run_eqns, static_argnums=(0,)).trace(jaxpr, consts, *args).lower().compile()(
        consts, *args)

  real = thread_map._run_jaxpr
  thread_map._run_jaxpr = run_jaxpr
  try:
    yield
  finally:
    thread_map._run_jaxpr = real


def max_abs_err(actual, expected) -> float:
  a = np.asarray(actual, dtype=np.float64)
  e = np.asarray(expected, dtype=np.float64)
  assert a.shape == e.shape, f"shape {a.shape} != {e.shape}"
  return float(np.max(np.abs(a - e))) if a.size else 0.0


def assert_close(actual, expected, *, atol: float, rtol: float = 0.0, what: str = "") -> float:
  """Asserts |actual - expected| <= atol + rtol*|expected| elementwise; returns the max abs error.

  Both sides are compared in float64, so a bf16 result is judged against an fp32/fp64 oracle with
  the tolerance the caller states (and justifies) for that dtype.
  """
  a = np.asarray(actual, dtype=np.float64)
  e = np.asarray(expected, dtype=np.float64)
  assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
  assert np.all(np.isfinite(a) == np.isfinite(e)), f"{what}: non-finite values differ"
  fin = np.isfinite(e)
  err = np.abs(a - e)[fin]
  bound = (atol + rtol * np.abs(e))[fin]
  worst = float(err.max()) if err.size else 0.0
  if not np.all(err <= bound):
    i = int(np.argmax(err - bound))
    raise AssertionError(f"{what}: max abs err {worst:.3e} exceeds atol={atol:g} rtol={rtol:g} "
                         f"(worst excess at flat index {i}: |{a[fin][i]:.6g} - {e[fin][i]:.6g}|)")
  return worst




def _sub_jaxprs(eqn):
  for v in eqn.params.values():
    for x in (v if isinstance(v, (list, tuple)) else [v]):
      j = getattr(x, "jaxpr", x)
      if hasattr(j, "eqns"):
        yield j


def pallas_calls(jaxpr, inside: bool = False) -> list[tuple[str, bool]]:
  """[(kernel name, inside a shard_map?)] for every `pallas_call` of a (closed) jaxpr, nested
  jaxprs included (jit, scan, shard_map, custom_vjp, cond): once per call site as traced (a scan
  body counts once)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      name = eqn.params.get("name") or eqn.params.get("name_and_src_info")
      out.append((str(name).split(" ")[0], inside))
    for sub in _sub_jaxprs(eqn):
      out += pallas_calls(sub, inside or eqn.primitive.name == "shard_map")
  return out


def count_pallas_calls(jaxpr) -> int:
  """len(pallas_calls(jaxpr)): so a kernel test cannot pass by silently running the reference."""
  return len(pallas_calls(jaxpr))


def value_scale(name: str, std: float, bias_std: float) -> tuple[float, float]:
  """(mean, std) of the random test value of parameter `name`: norm scales 1 + N(0, 0.1^2), the
  router bias N(0, bias_std^2), every weight N(0, std^2). Larger than the init (std 0.02, norms
  1, bias 0), so activations and logits are O(1), routing varies and the bias changes which
  experts are chosen. The one rule of every random-weight model in the tests (ours and the
  transformers references of hf_reference.py)."""
  if name.endswith("norm.weight"):
    return 1.0, 0.1
  if name.endswith("e_score_correction_bias"):
    return 0.0, bias_std
  return 0.0, std


def random_arrays(cfg, seed: int = 0, *, std: float = 0.08, bias_std: float = 0.3):
  """{per-layer parameter path: float32 numpy array} for `cfg` (`value_scale`), drawn from
  np.random.RandomState(seed) in `param_shapes` order (no jax compile)."""
  import dsv3_jax
  from dsv3_jax.pretrained import param_shapes
  rng = np.random.RandomState(seed)
  arrays = {}
  for path, shape in param_shapes(dsv3_jax.abstract_model(cfg, dsv3_jax.RuntimeConfig())).items():
    mean, s = value_scale(path, std, bias_std)
    arrays[path] = (mean + s * rng.randn(*shape)).astype(np.float32)
  return arrays


def random_model(cfg, seed: int = 0, runtime=None, **kw):
  """A DeepseekV3 on `random_arrays(cfg, seed, **kw)` with `runtime` (default RuntimeConfig())."""
  import dsv3_jax
  return dsv3_jax.model_from_arrays(cfg, runtime or dsv3_jax.RuntimeConfig(),
                                    random_arrays(cfg, seed, **kw))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(argvs: list[list[str]], env: dict, *, timeout: float) -> list[str]:
  """Runs `python <argv>` for every argv at once (cwd: the repository root), waits for all (the
  rest are killed when one times out), asserts each exited 0; returns their combined output."""
  procs = [subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for argv in argvs]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i} failed (rc={p.returncode}):\n{logs[i][-4000:]}"
  return logs


TRITON_CALL = "__gpu$xla.gpu.triton"  # the custom-call target of a Pallas Triton kernel
TPU_CALL = "tpu_custom_call"          # ... of a Pallas Mosaic (TPU) kernel
MOSAIC_GPU_CALL = "mosaic_gpu"        # ... of a Mosaic GPU kernel (a version suffix may follow)


def custom_calls(lowered_text: str, target: str) -> int:
  """How many kernel calls `stablehlo.custom_call @<target>[suffix](` a lowered module's text
  holds (a kernel's serialized IR may itself mention "triton": this counts calls only)."""
  import re
  return len(re.findall(rf"stablehlo\.custom_call @{re.escape(target)}\w*\(", lowered_text))
