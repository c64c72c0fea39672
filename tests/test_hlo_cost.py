"""`dsv3_jax.hlo_cost`: per-run flops and bytes of compiled HLO with loop bodies x trip count.

Oracle: XLA's own `cost_analysis()` on the same program with every loop unrolled (`unroll=True`,
straight-line code, so XLA's count is complete), on CPU and for a TPU topology (libtpu AOT).
XLA's cost of the *scanned* program (each body once) is the oracle for the `once` convention.
Tolerances: CPU flops and bytes 0.1% (the same rules); TPU flops 1% (XLA's TPU cost model adds
small per-op terms); TPU bytes are not compared with XLA's, whose TPU model also counts matmul
operand re-reads across tiles (see hlo_cost's docstring).
"""
import os

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from dsv3_jax.hlo_cost import hlo_cost, parse_hlo, shape_bytes

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def xla_cost(compiled) -> tuple[float, float]:
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca.get("flops", 0.0)), float(ca.get("bytes accessed", 0.0))


def layers(w, x, unroll):
  """A scan over L stacked [D, D] weights, with a nested scan and a fori_loop inside."""
  def inner(h, v):
    return h * v + 1.0, None

  def body(h, wi):
    h = jnp.tanh(h @ wi)
    h, _ = lax.scan(inner, h, jnp.arange(3, dtype=h.dtype), unroll=unroll)
    h = lax.fori_loop(2, 7, lambda i, g: g @ wi * 0.5, h, unroll=unroll)  # 5 trips
    return h, None

  h, _ = lax.scan(body, x, w, unroll=unroll)
  return h.sum()


def compile_pair(fn, *args, **jit_kw):
  out = []
  for unroll in (1, True):
    out.append(jax.jit(lambda *a: fn(*a, unroll), **jit_kw).lower(*args).compile())
  return out


def test_cpu_scanned_equals_unrolled():
  w = jax.ShapeDtypeStruct((6, 128, 128), jnp.float32)
  x = jax.ShapeDtypeStruct((64, 128), jnp.float32)
  scanned, unrolled = compile_pair(layers, w, x)
  assert "while" in scanned.as_text() and " while(" not in unrolled.as_text()
  c = hlo_cost(scanned.as_text())
  xf, xb = xla_cost(unrolled)
  # 6 layers x (1 + 5) matmuls of 64x128x128 dominate.
  assert xf >= 6 * 6 * 2 * 64 * 128 * 128
  assert c.flops == pytest.approx(xf, rel=1e-3)
  assert c.flops_once == pytest.approx(xla_cost(scanned)[0], rel=1e-3)
  assert c.bytes_once == pytest.approx(xla_cost(scanned)[1], rel=1e-3)
  assert sorted(n for _, n, _ in c.loops) == [3, 5, 6]  # the nested loops, found in the body
  assert c.unknown_loops == 0
  # Our own count of the unrolled program is XLA's.
  u = hlo_cost(unrolled.as_text())
  assert (u.flops, u.bytes) == pytest.approx((xf, xla_cost(unrolled)[1]), rel=1e-3)
  assert c.flops == c.flops_worst  # no conditional


def test_cpu_cond_typical_and_worst_branch():
  """A scan of 4 rounds, each under lax.cond (the expert-parallel overflow rounds' shape):
  typical counts the cheap branch, worst the matmul branch; oracles: the same scan with the
  branch called directly, unrolled."""
  w = jax.ShapeDtypeStruct((256, 256), jnp.float32)
  x = jax.ShapeDtypeStruct((128, 256), jnp.float32)

  def heavy(h, w):
    return jnp.tanh(h @ w)

  def light(h, w):
    return h * 0.5

  def rounds(branch):
    def f(w, x, unroll):
      def body(acc, r):  # x + r: the rounds differ (nothing for XLA to merge)
        return acc + branch(r, x + r.astype(x.dtype), w), None
      acc, _ = lax.scan(body, x, jnp.arange(4), unroll=unroll)
      return acc
    return f

  cond = rounds(lambda r, h, w: lax.cond(r < x.shape[0], heavy, light, h, w))
  c = hlo_cost(jax.jit(lambda w, x: cond(w, x, 1)).lower(w, x).compile().as_text())
  _, hi = compile_pair(rounds(lambda r, h, w: heavy(h, w)), w, x)
  _, lo = compile_pair(rounds(lambda r, h, w: light(h, w)), w, x)
  assert c.flops_worst == pytest.approx(xla_cost(hi)[0], rel=0.01)
  assert c.flops == pytest.approx(xla_cost(lo)[0], rel=0.01)
  assert c.flops < 0.02 * c.flops_worst


# Hand-written HLO in the TPU form: no known_trip_count, the counter's start, limit and step
# in the program (start through a copy, limit a constant, compare fused in one case).
TPU_STYLE = """
HloModule m, is_scheduled=true

%body (p: (s32[], f32[8,128]{1,0:T(8,128)})) -> (s32[], f32[8,128]{1,0:T(8,128)}) {
  %p = (s32[]{:T(128)}, f32[8,128]{1,0:T(8,128)}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  %two = s32[]{:T(128)} constant(2)
  %next = s32[]{:T(128)} add(%i, %two)
  %h = f32[8,128]{1,0:T(8,128)} get-tuple-element(%p), index=1
  %e = f32[8,128]{1,0:T(8,128)} exponential(%h)
  %m = f32[8,128]{1,0:T(8,128)} multiply(%e, %h), metadata={op_name="jit(f)/while/body/mul"}
  ROOT %t = (s32[]{:T(128)}, f32[8,128]{1,0:T(8,128)}) tuple(%next, %m)
}

%fused_cmp (a: s32[], b: s32[]) -> pred[] {
  %a = s32[] parameter(0)
  %b = s32[] parameter(1)
  ROOT %lt = pred[] compare(%a, %b), direction=LT
}

%cond (q: (s32[], f32[8,128])) -> pred[] {
  %q = (s32[]{:T(128)}, f32[8,128]{1,0:T(8,128)}) parameter(0)
  %j = s32[]{:T(128)} get-tuple-element(%q), index=0
  %lim = s32[]{:T(128)} constant(%LIMIT%)
  ROOT %c = pred[]{:T(512)} %CMP%
}

ENTRY %main (x: f32[8,128], n: s32[]) -> f32[8,128] {
  %x = f32[8,128]{1,0:T(8,128)} parameter(0)
  %n = s32[]{:T(128)} parameter(1)
  %one = s32[]{:T(128)} constant(1)
  %start = s32[]{:T(128)} copy(%START%)
  %init = (s32[]{:T(128)}, f32[8,128]{1,0:T(8,128)}) tuple(%start, %x)
  %w = (s32[]{:T(128)}, f32[8,128]{1,0:T(8,128)}) while(%init), condition=%cond, body=%body
  ROOT %out = f32[8,128]{1,0:T(8,128)} get-tuple-element(%w), index=1
}
"""


@pytest.mark.parametrize("limit,cmp,start,trips", [
    (11, "compare(%j, %lim), direction=LT", "%one", 5),       # i = 1, 3, 5, 7, 9
    (11, "compare(%j, %lim), direction=LE", "%one", 6),       # ... 11
    (11, "fusion(%j, %lim), kind=kLoop, calls=%fused_cmp", "%one", 5),
    (11, "compare(%j, %lim), direction=LT", "%n", None),      # start unknown: counted once
])
def test_trip_count_from_the_loop_condition(limit, cmp, start, trips):
  text = (TPU_STYLE.replace("%LIMIT%", str(limit)).replace("%CMP%", cmp)
          .replace("%START%", start))
  c = hlo_cost(text)
  assert c.loops[0][1] == trips
  n = trips or 1
  # Per trip: multiply 1024 flops, add 1 (the counter), exponential 1024 transcendentals; the
  # condition's compare runs trips + 1 times (once with the body when the count is unknown).
  assert c.flops == (n * 1025 + n + 1 if trips else 1025 + 1)
  assert c.transcendentals == n * 8 * 128
  # exponential and multiply: 2 + 3 arrays of 4 KiB each per trip (add / compare are scalars).
  assert c.bytes == pytest.approx(n * 5 * 4096, rel=0.01)
  assert c.unknown_loops == (0 if trips else 1)
  assert c.top_bytes[0][:2] == ("multiply", "jit(f)/while/body/mul")


# Forms XLA:TPU writes (peeled loops, host offload): the limit carried in the loop state, the
# compare fused with its get-tuple-elements, the counter stepped inside a fusion, the start
# computed (a peeled first iteration), and a host computation ("}, execution_thread=...")
# printed before the loop's body.
TPU_FUSED = """
HloModule m2, is_scheduled=true

%host_side (x: f32[8,128]) -> f32[8,128] {
  %x = f32[8,128]{1,0} parameter(0)
  ROOT %y = f32[8,128]{1,0} copy(%x)
}, execution_thread="host"

%step_fused (a: s32[]) -> s32[] {
  %a = s32[] parameter(0)
  %c = s32[] constant(%STEP%)
  ROOT %r = s32[] add(%c, %a)
}

%body (p: (s32[], f32[8,128], s32[])) -> (s32[], f32[8,128], s32[]) {
  %p = (s32[], f32[8,128]{1,0}, s32[]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %next = s32[] fusion(%i), kind=kLoop, calls=%step_fused
  %h = f32[8,128]{1,0} get-tuple-element(%p), index=1
  %m = f32[8,128]{1,0} multiply(%h, %h)
  %n = s32[] get-tuple-element(%p), index=2
  %n2 = s32[] copy(%n)
  ROOT %t = (s32[], f32[8,128]{1,0}, s32[]) tuple(%next, %m, %n2)
}

%cmp_fused (q: (s32[], f32[8,128], s32[])) -> pred[] {
  %q = (s32[], f32[8,128]{1,0}, s32[]) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %lim = s32[] get-tuple-element(%q), index=2
  ROOT %c = pred[] compare(%CMP%), direction=%DIR%
}

%cond (q: (s32[], f32[8,128], s32[])) -> pred[] {
  %q = (s32[], f32[8,128]{1,0}, s32[]) parameter(0)
  ROOT %c = pred[] fusion(%q), kind=kLoop, calls=%cmp_fused
}

ENTRY %main (x: f32[8,128]) -> f32[8,128] {
  %x = f32[8,128]{1,0} parameter(0)
  %zero = s32[] constant(%START%)
  %one = s32[] constant(1)
  %peeled = s32[] add(%zero, %one)
  %limit = s32[] constant(%LIMIT%)
  %init = (s32[], f32[8,128]{1,0}, s32[]) tuple(%peeled, %x, %limit)
  %w = (s32[], f32[8,128]{1,0}, s32[]) while(%init), condition=%cond, body=%body
  ROOT %out = f32[8,128]{1,0} get-tuple-element(%w), index=1
}
"""


@pytest.mark.parametrize("start,limit,step,cmp,direction,trips", [
    (0, 58, 1, "%j, %lim", "LT", 57),     # peeled: runs i = 1 .. 57
    (0, 58, 1, "%lim, %j", "GT", 57),     # the same test written the other way round
    (0, 9, 2, "%j, %lim", "LE", 5),       # i = 1, 3, 5, 7, 9
    (9, 0, -1, "%j, %lim", "GT", 10),     # counting down from 10
    (0, 7, 2, "%j, %lim", "NE", 3),       # i = 1, 3, 5
    (0, 8, 2, "%j, %lim", "NE", None),    # never equals 8: no count, never a guess
])
def test_trip_count_through_fusions_and_the_loop_state(start, limit, step, cmp, direction,
                                                       trips):
  text = (TPU_FUSED.replace("%START%", str(start)).replace("%LIMIT%", str(limit))
          .replace("%STEP%", str(step)).replace("%CMP%", cmp).replace("%DIR%", direction))
  comps, _ = parse_hlo(text)
  assert {"host_side", "body", "cond", "main"} <= set(comps)
  c = hlo_cost(text)
  assert c.loops[0][1] == trips
  assert c.unknown_loops == (trips is None)
  # Oracle: per trip the 8 x 128 multiply and the counter's add; the condition's compare runs
  # trips + 1 times; plus the peeled start's add.
  n = trips if trips is not None else 1
  assert c.flops == n * (8 * 128 + 1) + (n + 1 if trips is not None else 1) + 1


def test_unreadable_hlo_raises_instead_of_counting_zero():
  broken = TPU_FUSED.replace('%body (p: (s32[], f32[8,128], s32[])) -> (s32[], f32[8,128], '
                             's32[]) {', "%body_renamed {")
  with pytest.raises(ValueError, match="body"):
    hlo_cost(broken)


def test_shape_bytes_and_parser():
  assert shape_bytes("bf16[4,128]{1,0:T(8,128)(2,1)S(1)}") == 4 * 128 * 2
  assert shape_bytes("(f32[2,3]{1,0}, /*index=1*/s8[5], pred[])") == 24 + 5 + 1
  comps, entry = parse_hlo(TPU_STYLE.replace("%LIMIT%", "3").replace(
      "%CMP%", "compare(%j, %lim), direction=LT").replace("%START%", "%one"))
  assert entry == "main" and set(comps) == {"body", "fused_cmp", "cond", "main"}
  assert [i.op for i in comps["main"]][-2:] == ["while", "get-tuple-element"]


@pytest.fixture(scope="module")
def v5e_mesh():
  pytest.importorskip("libtpu", reason="TPU AOT compile needs libtpu")
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
  return topologies.make_mesh(topo, (4,), ("d",))


def test_tpu_scanned_equals_unrolled(v5e_mesh):
  from jax.sharding import NamedSharding, PartitionSpec as P
  sh = lambda *spec: NamedSharding(v5e_mesh, P(*spec))
  w = jax.ShapeDtypeStruct((6, 512, 512), jnp.bfloat16, sharding=sh())
  x = jax.ShapeDtypeStruct((1024, 512), jnp.bfloat16, sharding=sh("d"))
  with jax.default_matmul_precision("default"):
    scanned, unrolled = compile_pair(layers, w, x)
  c = hlo_cost(scanned.as_text())
  xf, _ = xla_cost(unrolled)
  assert xf >= 6 * 6 * 2 * 256 * 512 * 512  # per device: 256 rows
  assert c.flops == pytest.approx(xf, rel=0.01)
  assert c.flops_once == pytest.approx(xla_cost(scanned)[0], rel=1e-3)
  assert c.flops > 4 * xla_cost(scanned)[0]  # what cost_analysis alone misses
  assert c.unknown_loops == 0


def test_tpu_pallas_cost_estimate_counted_per_iteration(v5e_mesh):
  """A Pallas TPU kernel with a pl.CostEstimate inside a scan of 5, under shard_map: its
  estimate counts 5 times; XLA's cost_analysis counts it once."""
  from jax.experimental import pallas as pl
  from jax.sharding import NamedSharding, PartitionSpec as P

  est = pl.CostEstimate(flops=10**9, transcendentals=0, bytes_accessed=3 * 10**7)

  def kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2.0

  def double(x):
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                          cost_estimate=est, name="toy_double")(x)

  def f(x):
    def body(h, _):
      return double(h), None
    return lax.scan(body, x, None, length=5)[0]

  fn = jax.jit(jax.shard_map(f, mesh=v5e_mesh, in_specs=P("d"), out_specs=P("d"),
                               check_vma=False))
  x = jax.ShapeDtypeStruct((32, 128), jnp.float32, sharding=NamedSharding(v5e_mesh, P("d")))
  compiled = fn.lower(x).compile()
  text = compiled.as_text()
  assert 'custom_call_target="tpu_custom_call"' in text
  c = hlo_cost(text)
  assert c.flops == pytest.approx(5 * 10**9, rel=1e-6, abs=1e4)
  assert c.bytes == pytest.approx(5 * 3 * 10**7, rel=1e-3)
  assert xla_cost(compiled)[0] == pytest.approx(10**9, rel=1e-6, abs=1e4)
  assert c.top_flops[0][1].endswith("pallas_call") or "toy_double" in c.top_flops[0][1]


@pytest.mark.parametrize("kw", [
    dict(window_strides=(1,), padding=[(0, 0)]),
    dict(window_strides=(2,), padding=[(3, 1)]),
    dict(window_strides=(1,), padding=[(2, 2)], lhs_dilation=(2,), rhs_dilation=(1,)),
    dict(window_strides=(1,), padding=[(4, 4)], rhs_dilation=(3,)),
])
def test_cpu_convolution_counts_only_real_window_positions(kw):
  """Padded / strided / dilated 1-d convolutions (XLA writes some batched matmuls this way):
  only window positions over real input count, as in XLA's own cost analysis."""
  x = jax.ShapeDtypeStruct((4, 16, 37), jnp.float32)   # N C W
  k = jax.ShapeDtypeStruct((24, 16, 5), jnp.float32)   # O I W
  f = lambda x, k: lax.conv_general_dilated(x, k, **kw)
  compiled = jax.jit(f).lower(x, k).compile()
  assert " convolution(" in compiled.as_text()
  assert hlo_cost(compiled.as_text()).flops == pytest.approx(xla_cost(compiled)[0], rel=1e-3)


def test_tpu_head_batched_projection(v5e_mesh):
  """The MLA projections' einsum shape ([T, i] x [H, o, i] -> [T, H, o]), which libtpu writes
  as a convolution whose padded window spans the heads: ours equals XLA's count."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  sh = NamedSharding(v5e_mesh, P())
  x = jax.ShapeDtypeStruct((256, 384), jnp.bfloat16, sharding=sh)
  w = jax.ShapeDtypeStruct((16, 192, 384), jnp.bfloat16, sharding=sh)
  with jax.default_matmul_precision("default"):
    compiled = jax.jit(lambda x, w: jnp.einsum("ti,hoi->tho", x, w)).lower(x, w).compile()
  c = hlo_cost(compiled.as_text())
  assert c.flops == pytest.approx(xla_cost(compiled)[0], rel=1e-3)
  assert c.flops == pytest.approx(2 * 256 * 384 * 16 * 192, rel=1e-3)


@pytest.mark.parametrize("out_spec", [(None, "d"), ()])
def test_tpu7x_loop_after_sparsecore_computation(out_spec):
  """tpu7x runs some collectives on its SparseCores: their computations close with
  `}, execution_thread="sparsecore"`. A scan whose layers end in a reduce-scatter (or
  all-reduce) prints such a computation just before the loop's body; the 671B tpu7x train step
  lost its MoE loop body this way (no trip count, counted as 0 flops). Closed-form oracle per
  device: L x (the [T, D/n] x [D/n, D] matmul, 2 T (D/n) D, plus the collective's T D adds)."""
  pytest.importorskip("libtpu", reason="TPU AOT compile needs libtpu")
  from jax.experimental import topologies
  from jax.sharding import NamedSharding, PartitionSpec as P
  topo = topologies.get_topology_desc(topology_name="tpu7x:2x2x1", platform="tpu")
  mesh = topologies.make_mesh(topo, (len(topo.devices),), ("d",))
  n, L, T, D = len(topo.devices), 6, 1024, 512
  sh = lambda *spec: NamedSharding(mesh, P(*spec))

  def f(ws, x):
    step = lambda h, w: (lax.with_sharding_constraint(h @ w, sh(*out_spec)), None)
    return lax.scan(step, x, ws)[0]

  ws = jax.ShapeDtypeStruct((L, D, D), jnp.bfloat16, sharding=sh(None, "d", None))
  x = jax.ShapeDtypeStruct((T, D), jnp.bfloat16, sharding=sh(None, "d"))
  text = jax.jit(f, out_shardings=sh(*out_spec)).lower(ws, x).compile().as_text()
  assert '}, execution_thread="sparsecore"' in text  # the form this test is about
  c = hlo_cost(text)
  assert [trips for _, trips, _ in c.loops] == [L] and c.unknown_loops == 0
  assert c.flops == pytest.approx(L * (2 * T * (D // n) * D + T * D), rel=1e-4)
