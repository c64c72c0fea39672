"""Compiles every GPU Pallas kernel for an H100 (sm_90a) on a CPU-only machine and reports, per
kernel: compiles, registers, spills, shared memory (deviceless XLA:GPU AOT; needs jax[cuda12] of
the installed jax version in its own environment: `pip install "jax[cuda12]==<jax version>"`).

    python bench/gpu_aot.py [--markdown FILE] [--only SUBSTRING]

XLA compiles all the way to a cubin (PTX -> cubin in-process through nvJitLink): Triton
shared-memory overflow, Mosaic GPU shared-memory overflow and wrong-architecture intrinsics all
fail here. ptxas figures come from `MOSAIC_GPU_DUMP_PTXAS=1` (Mosaic GPU kernels print ptxas's
verbose report while compiling) and, for the Triton kernels, from ptxas -v (the one in the
nvidia-cuda-nvcc wheel) run on the PTX that XLA dumps. Nothing here runs a kernel: numerics are
the interpret-mode tests' job (tests/kernels).

Cases: DeepSeek-V3 shapes of the TPU/CUDA lowering tests in tests/kernels (hidden 7168, expert
inter 2048, 128 heads, q/k 192, v 128, latent 512 + rope 64, decode batch 64 x 8192 rows),
each GPU flavour selected explicitly (gpu_impl=) and checked to be the intended custom call.
Used by tests/gpu_aot (CI stage 3) and to write bench/RESULTS.md's "GPU AOT" section.
"""
from __future__ import annotations

import os

os.environ["JAX_PLATFORMS"] = "cpu"  # required before jax initialises (no cuInit)
os.environ.setdefault("MOSAIC_GPU_DUMP_PTXAS", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import glob  # noqa: E402
import importlib.util  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from typing import Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

# An H100 SXM as XLA's GpuTargetConfigProto (text format; parses on jax 0.10 and 0.12).
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024  threads_per_warp: 32  shared_memory_per_block: 49152
  shared_memory_per_core: 233472  threads_per_core_limit: 2048  core_count: 132  fpus_per_core: 128
  block_dim_limit_x: 2147483647  block_dim_limit_y: 65535  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000  l2_cache_size: 52428800  clock_rate_ghz: 1.98
  device_memory_size: 84942979072  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 8 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

TRITON = "triton"
MOSAIC = "mosaic"
_TARGETS = {TRITON: r"__gpu\$xla\.gpu\.triton", MOSAIC: r"mosaic_gpu\w*"}


def cuda_plugin_available() -> bool:
  """Whether jax's CUDA plugin (jax[cuda12]) is installed: deviceless CUDA AOT needs it."""
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:  # no jax_plugins package at all
    return False


def cuda_mesh(shape: tuple[int, ...] = (1,), names: tuple[str, ...] = ("x",),
              topology: str | None = None) -> jax.sharding.Mesh:
  """A mesh of H100 devices without GPUs (topology "partitions x hosts x devices/host")."""
  from jax.experimental import topologies
  n = 1
  for s in shape:
    n *= s
  topo = topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET,
                                      topology=topology or f"1x1x{n}")
  return topologies.make_mesh(topo, shape, names)


@dataclasses.dataclass
class Ptxas:
  """One kernel's ptxas report."""

  kernel: str
  registers: int
  spill_stores: int
  spill_loads: int
  barriers: int | None = None


# ptxas 12.x: "Function properties for K\n    N bytes stack frame, ..."; the ptxas in jax 0.12's
# Mosaic GPU prefixes the second line with "ptxas         .".
_PROPS = re.compile(r"Function properties for (\S+)[ \t]*\n[^\n]*?(\d+) bytes stack frame, "
                    r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?")


def parse_ptxas(text: str) -> list[Ptxas]:
  """Every 'Function properties' block of a ptxas -v report with its 'Used N registers' line."""
  out = []
  for m in _PROPS.finditer(text):
    used = _USED.search(text, m.end())
    out.append(Ptxas(m.group(1), int(used.group(1)) if used else -1, int(m.group(3)),
                     int(m.group(4)), int(used.group(2)) if used and used.group(2) else None))
  return out


@contextlib.contextmanager
def captured_output():
  """Captures this process's fd 1 and 2 (C++ code prints ptxas reports there) into a list that
  holds the text once the block exits."""
  sys.stdout.flush()
  sys.stderr.flush()
  saved = [os.dup(1), os.dup(2)]
  result: list[str] = []
  with tempfile.TemporaryFile(mode="w+b") as tmp:
    os.dup2(tmp.fileno(), 1)
    os.dup2(tmp.fileno(), 2)
    try:
      yield result
    finally:
      sys.stdout.flush()
      sys.stderr.flush()
      os.dup2(saved[0], 1)
      os.dup2(saved[1], 2)
      for fd in saved:
        os.close(fd)
      tmp.seek(0)
      result.append(tmp.read().decode(errors="replace"))


@contextlib.contextmanager
def _mosaic_smem_recorder():
  """Records the shared memory (bytes) of each Mosaic GPU kernel lowered in the block (a hook on
  jax's private `_launch`; nothing is recorded on a jax without it)."""
  record: list[int] = []
  try:
    from jax.experimental.mosaic.gpu import core
    orig, size = core._launch, core._smem_tree_size
  except (ImportError, AttributeError):  # pragma: no cover - depends on the jax version
    yield record
    return

  def launch(token, grid, cluster, block, smem_buffers, *args, **kwargs):
    record.append(size(smem_buffers))
    return orig(token, grid, cluster, block, smem_buffers, *args, **kwargs)

  core._launch = launch
  try:
    yield record
  finally:
    core._launch = orig


def _ptxas_binary() -> str | None:
  try:
    import nvidia.cuda_nvcc
    path = os.path.join(list(nvidia.cuda_nvcc.__path__)[0], "bin", "ptxas")
    return path if os.path.exists(path) else None
  except ImportError:
    return shutil.which("ptxas")


def ptxas_of_dumped_ptx(dump_dir: str) -> list[Ptxas] | None:
  """ptxas -v (sm_90a) on the PTX that XLA dumped: registers and spills of XLA's own and the
  Triton kernels. None when XLA dumped no PTX or there is no ptxas."""
  ptxas = _ptxas_binary()
  files = sorted(glob.glob(os.path.join(dump_dir, "*.ptx")))
  if ptxas is None or not files:
    return None
  reports = []
  for ptx in files:
    proc = subprocess.run([ptxas, "-v", "-arch=sm_90a", ptx, "-o", os.devnull],
                          capture_output=True, text=True)
    reports += parse_ptxas(proc.stdout + proc.stderr)
  return reports


@dataclasses.dataclass
class Result:
  """A compiled case: custom calls by flavour, ptxas reports of its kernels, shared memory."""

  name: str
  hlo: str
  calls: dict[str, int]
  ptxas: list[Ptxas]
  smem: list[int]
  seconds: float
  log: str
  ptx_dumped: bool = True  # False: XLA dumped no PTX, so Triton kernels have no ptxas report

  @property
  def spill_stores(self) -> int:
    return sum(p.spill_stores for p in self.ptxas)


def custom_calls(hlo: str) -> dict[str, int]:
  """Kernel custom calls of a compiled (or lowered) module's text, by flavour."""
  return {k: len(re.findall(rf'custom_call_target="{pat}"|@{pat}\(', hlo))
          for k, pat in _TARGETS.items()}


# jax 0.12's XLA writes the PTX (and LLVM IR) of a kernel only when its emitter matches
# xla_dump_emitter_re (empty by default: xla_dump_to alone dumps no PTX); jax 0.10's dumps it
# either way, and the same set of files with this option.
_DUMP_OPTIONS = {"xla_dump_emitter_re": ".*"}


def compile_case(fn: Callable, args, mesh=None, name: str = "") -> Result:
  """jit(fn).lower(*args).compile() for the mesh's CUDA devices (default: one H100); args are
  ShapeDtypeStructs (placed replicated on the mesh when they carry no sharding)."""
  import time
  mesh = mesh or cuda_mesh()
  def place(a):
    if isinstance(a, jax.ShapeDtypeStruct) and a.sharding is None:
      return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P()))
    return a
  args = jax.tree.map(place, args, is_leaf=lambda a: isinstance(a, jax.ShapeDtypeStruct))
  dump = tempfile.mkdtemp(prefix="gpu_aot_")
  t0 = time.perf_counter()
  try:
    with captured_output() as out, _mosaic_smem_recorder() as smem:
      with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        lowered = jax.jit(fn).trace(*args).lower()
        compiled = lowered.compile(compiler_options=_DUMP_OPTIONS | {"xla_dump_to": dump})
    seconds = time.perf_counter() - t0
    hlo = compiled.as_text()
    log = out[0]
    dumped = ptxas_of_dumped_ptx(dump)
    reports = parse_ptxas(log) + (dumped or [])
  finally:
    shutil.rmtree(dump, ignore_errors=True)
  return Result(name, hlo, custom_calls(lowered.as_text()), reports, list(smem), seconds, log,
                ptx_dumped=dumped is not None)


# ---------------------------------------------------------------------------------------------
# The kernel cases: DeepSeek-V3 shapes, each GPU flavour selected explicitly.

_SD = jax.ShapeDtypeStruct
_BF16, _F8, _F32, _I32 = jnp.bfloat16, jnp.float8_e4m3fn, jnp.float32, jnp.int32
_GPU = dict(backend="pallas", platform="gpu")


@dataclasses.dataclass(frozen=True)
class Case:
  """A kernel variant: `build()` -> (fn, abstract args); `flavour` the custom call it must be,
  `calls` how many of them the program holds."""

  name: str
  flavour: str
  calls: int
  build: Callable


def _attention(flavour: str, grad: bool, segments: bool = False):
  from dsv3_jax.kernels_pallas import mla_attention
  from dsv3_jax.kernels_pallas.mla_attention import mosaic_gpu
  b, s, h = 1, 4096, 128
  q, k, v = _SD((b, s, h, 192), _BF16), _SD((b, s, h, 192), _BF16), _SD((b, s, h, 128), _BF16)
  seg = (_SD((b, s), _I32), _SD((b, s), _I32)) if segments else None
  blocks = mosaic_gpu.BlockSizes(backward_impl="mosaic") if flavour == MOSAIC else None

  def attn(q, k, v, seg):
    return mla_attention(q, k, v, scale=192 ** -0.5, segment_ids=seg, gpu_impl=flavour,
                         block_sizes=blocks, **_GPU)

  if not grad:
    return attn, (q, k, v, seg)

  def loss(q, k, v, seg):
    return jnp.sum(attn(q, k, v, seg).astype(jnp.float32) ** 2)

  return jax.grad(loss, argnums=(0, 1, 2)), (q, k, v, seg)


def _decode(flavour: str, paged: bool = False, tokens: int | None = None):
  from dsv3_jax.kernels_pallas import mla_decode
  batch, capacity, page = 64, 8192, 64
  q = _SD((batch, 128, 576) if tokens is None else (batch, tokens, 128, 576), _BF16)
  if paged:
    n, rows, tables = batch * capacity // page + 8, page, _SD((batch, capacity // page), _I32)
  else:
    n, rows, tables = batch, capacity, None
  lat, rope = _SD((n, rows, 512), _BF16), _SD((n, 64, rows), _BF16)

  def f(q, lat, rope, lengths, tables):
    return mla_decode(q, lat, rope, lengths, scale=576 ** -0.5, block_tables=tables,
                      gpu_impl=flavour, **_GPU)

  return f, (q, lat, rope, _SD((batch,), _I32), tables)


_M, _N, _K = 4096, 2048, 7168  # tokens x (expert inter 2048) x (hidden 7168)


def _fp8(which: str, flavour: str = TRITON):
  from dsv3_jax.kernels_pallas import fp8_matmul, fp8_weight_matmul, quantize_activations
  a, a_s = _SD((_M, _K), _F8), _SD((_M, _K // 128), _F32)
  b, b_s = _SD((_N, _K), _F8), _SD((_N // 128, _K // 128), _F32)
  if which == "quantize":
    return (lambda x: quantize_activations(x, **_GPU)), (_SD((_M, _K), _BF16),)
  if which == "weight":
    return (lambda x, b, s: fp8_weight_matmul(x, b, s, **_GPU)), (_SD((_M, _K), _BF16), b, b_s)
  return (lambda a, s, b, t: fp8_matmul(a, s, b, t, gpu_impl=flavour, **_GPU)), (a, a_s, b, b_s)


def _grouped(which: str, flavour: str = TRITON):
  from dsv3_jax.kernels_pallas import grouped_matmul, grouped_matmul_fp8
  g = 32
  x, gs, w = _SD((_M, _K), _BF16), _SD((g,), _I32), _SD((g, _K, _N), _BF16)
  if which == "fwd":
    return (lambda x, w, gs: grouped_matmul(x, w, gs, gpu_impl=flavour, **_GPU)), (x, w, gs)
  if which == "grad":
    def loss(x, w, gs):
      out = grouped_matmul(x, w, gs, gpu_impl=flavour, **_GPU)
      return jnp.sum(out.astype(jnp.float32) ** 2)
    return jax.grad(loss, argnums=(0, 1)), (x, w, gs)
  w8, w8_s = _SD((g, _N, _K), _F8), _SD((g, _N // 128, _K // 128), _F32)
  if which == "fp8_weight":
    return (lambda x, w, s, gs: grouped_matmul_fp8(x, w, s, gs, **_GPU)), (x, w8, w8_s, gs)
  x8, x8_s = _SD((_M, _K), _F8), _SD((_M, _K // 128), _F32)
  return (lambda x, xs, w, s, gs: grouped_matmul_fp8(x, w, s, gs, lhs_scale=xs, **_GPU)), (
      x8, x8_s, w8, w8_s, gs)


CASES = [
    Case("mla_attention fwd (triton)", TRITON, 1, lambda: _attention(TRITON, False)),
    Case("mla_attention fwd+bwd (triton)", TRITON, 3, lambda: _attention(TRITON, True)),
    Case("mla_attention fwd (mosaic)", MOSAIC, 1, lambda: _attention(MOSAIC, False)),
    Case("mla_attention fwd+bwd (mosaic)", MOSAIC, 3, lambda: _attention(MOSAIC, True)),
    Case("mla_attention fwd+bwd segments (mosaic)", MOSAIC, 3,
         lambda: _attention(MOSAIC, True, segments=True)),
    Case("mla_decode T=1 (triton)", TRITON, 1, lambda: _decode(TRITON)),
    Case("mla_decode T=2 (triton)", TRITON, 1, lambda: _decode(TRITON, tokens=2)),
    Case("mla_decode paged (triton)", TRITON, 1, lambda: _decode(TRITON, paged=True)),
    Case("mla_decode T=1 (mosaic)", MOSAIC, 1, lambda: _decode(MOSAIC)),
    Case("mla_decode T=2 (mosaic)", MOSAIC, 1, lambda: _decode(MOSAIC, tokens=2)),
    Case("mla_decode paged (mosaic)", MOSAIC, 1, lambda: _decode(MOSAIC, paged=True)),
    Case("fp8 quantize_activations (triton)", TRITON, 1, lambda: _fp8("quantize")),
    Case("fp8_matmul (triton)", TRITON, 1, lambda: _fp8("matmul")),
    Case("fp8_matmul (mosaic)", MOSAIC, 1, lambda: _fp8("matmul", MOSAIC)),
    Case("fp8_weight_matmul (triton)", TRITON, 1, lambda: _fp8("weight")),
    Case("grouped_matmul fwd (triton)", TRITON, 1, lambda: _grouped("fwd")),
    Case("grouped_matmul fwd+grad (triton)", TRITON, 3, lambda: _grouped("grad")),
    Case("grouped_matmul fwd (mosaic)", MOSAIC, 1, lambda: _grouped("fwd", MOSAIC)),
    Case("grouped_matmul fwd+grad (mosaic)", MOSAIC, 3, lambda: _grouped("grad", MOSAIC)),
    Case("grouped_matmul_fp8 bf16 x e4m3 (triton)", TRITON, 1, lambda: _grouped("fp8_weight")),
    Case("grouped_matmul_fp8 e4m3 x e4m3 (triton)", TRITON, 1, lambda: _grouped("fp8_both")),
]


def kernel_reports(result: Result) -> list[Ptxas]:
  """The ptxas reports of the Pallas kernels of a compiled case (XLA's own fusions left out):
  Mosaic GPU kernels (their own ptxas run) and the Triton kernels, named by their pallas_call."""
  return [p for p in result.ptxas
          if "mosaic_gpu" in p.kernel or p.kernel.startswith(("dsv3_", "mla_"))]


def run_case(case: Case) -> Result:
  fn, args = case.build()
  return compile_case(fn, args, name=case.name)


# ptxas's note when it compiles relocatable code (jax 0.12's Mosaic GPU path): every warpgroup is
# then held to the launch bound, whatever its setmaxnreg budget, and spills accordingly.
SETMAXNREG_IGNORED = "'setmaxnreg' ignored"


def _row(case: Case, res: Result | None, error: str | None) -> str:
  if res is None:
    return f"| {case.name} | no: {error} | | | |"
  ks = kernel_reports(res)
  def short(p):
    name = p.kernel.replace("_mosaic_gpu_kernel", "").replace("dsv3_", "")
    return name.replace("mla_attention_", "")

  label = (lambda p: f"{short(p)} ") if len(ks) > 1 else (lambda p: "")
  none = "(cached)" if case.flavour == MOSAIC or res.ptx_dumped else "(no PTX dump)"
  regs = ", ".join(f"{label(p)}{p.registers}" for p in ks) or none
  if SETMAXNREG_IGNORED in res.log:  # jax 0.12's relocatable Mosaic GPU compile (bench/RESULTS.md)
    regs += " (setmaxnreg ignored)"
  spills = ", ".join(f"{label(p)}{p.spill_stores}" for p in ks) or none
  smem = (", ".join(f"{s // 1024} KiB" for s in res.smem) if res.smem
          else "(Triton: XLA checks the limit)")
  return f"| {case.name} | yes ({res.seconds:.0f} s) | {regs} | {spills} | {smem} |"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--markdown", help="write the table (a RESULTS.md section) to this file")
  parser.add_argument("--only", default="", help="run the cases whose name contains this")
  opts = parser.parse_args(argv)
  if not cuda_plugin_available():
    print("jax's CUDA plugin is missing: pip install \"jax[cuda12]==%s\"" % jax.__version__)
    return 2
  rows, failed = [], 0
  for case in CASES:
    if opts.only not in case.name:
      continue
    try:
      res, err = run_case(case), None
    except Exception as e:  # noqa: BLE001 - reported in the table
      res, err = None, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
      failed += 1
    rows.append(_row(case, res, err))
    print(rows[-1], flush=True)
  date = datetime.date.today().isoformat()
  text = "\n".join([
      f"## GPU AOT: kernels compiled for H100 (sm_90a) on CPU ({date}, jax {jax.__version__})",
      "",
      "`python bench/gpu_aot.py` in a jax[cuda12] environment (deviceless XLA:GPU AOT; CI stage 3 "
      "runs the same cases as tests/gpu_aot). Registers and spill stores (bytes) per kernel from "
      "ptxas; shared memory: Mosaic GPU's allocation per kernel.",
      "",
      "| kernel | compiles | registers | spill stores (B) | shared memory |",
      "| --- | --- | --- | --- | --- |",
      *rows, ""])
  if opts.markdown:
    with open(opts.markdown, "w") as f:
      f.write(text)
  print(text)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
