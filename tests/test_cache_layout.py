"""The decode step compiled for a TPU (libtpu AOT on CPU, v6e 2x2) reads and writes the latent
cache in place: the optimized HLO holds no copy or transpose of a cache-sized buffer, XLA's
temporaries are small next to the cache, and the bytes the compiler says the step accesses stay
near the per-device arguments (the cache dominates them).

Why this can fail: a cache row of 576 values (512 latent + 64 rope) is not a multiple of the
TPU's 128 lanes, so XLA:TPU keeps such an array with positions minor and copies all of it to
row-major around the `mla_decode` custom call (and a per-layer slice of a stacked cache handed
to a custom call is materialised). Measured on this config (T=1), the old fused [L, B, S, 576]
layout: 302 MB copies of the whole cache at the scan's entry and exit, temporaries 336 MB,
bytes accessed 1.79 GB (5.8x the arguments); this layout (see `cache.py` and
`kernels_pallas/mla_decode`): no such copy, temporaries 0.65 MB, bytes accessed 175 MB.

The oracle is independent of the code under test: the HLO text's own copy/transpose ops and
their result shapes, and the compiler's memory_analysis / cost_analysis.
"""
import math
import os
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import dsv3_jax
from dsv3_jax.inference import abstract_decode_step
from dsv3_jax.sharding import ShardingRules, make_mesh, state_shardings

pytest.importorskip("libtpu", reason="TPU AOT compilation needs libtpu (the test extra)")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# Two dense layers (no MoE: a short compile), DeepSeek-V3's latent dims 512 + 64, 8 heads.
CFG = dsv3_jax.TINY.replace(
    num_hidden_layers=2, first_k_dense_replace=2, num_nextn_predict_layers=0, hidden_size=256,
    intermediate_size=256, num_attention_heads=8, q_lora_rank=128, kv_lora_rank=512,
    qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=128)
# 8 sequences per device: 2 x 8 x 16384 x 576 bf16 = 302 MB of cache each, too big for XLA to
# move into VMEM (it does so with small caches, which would blur the byte counts).
B, S = 32, 16384
ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
            "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_INSTR = re.compile(r"^\s*(?:ROOT )?%\S+ = (.+?) ([a-z][a-z0-9-]*)\(")
_ARRAY = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
_SPACE = re.compile(r"S\(\d+\)")


def copy_bytes(hlo: str, at_least: int, dim: int | None = None) -> list[tuple[str, int]]:
  """(op, result bytes) of every copy / copy-start / transpose in HLO text (fused or not) whose
  result has at least `at_least` bytes (and, given `dim`, a dimension of that size). A
  copy-start between two memory spaces in one layout (XLA's prefetch of a buffer into VMEM,
  (dst, src, context) differing only in their S(n) annotation) is a move, not a re-layout, and
  does not count."""
  out = []
  for line in hlo.splitlines():
    m = _INSTR.match(line)
    if not m or m.group(2) not in ("copy", "copy-start", "transpose"):
      continue
    arrays = _ARRAY.findall(m.group(1))
    layout = lambda x: _SPACE.sub("", "".join(x)).replace(":}", "}")  # noqa: E731
    if m.group(2) == "copy-start" and len(arrays) >= 2 and layout(arrays[0]) == layout(arrays[1]):
      continue
    a = _ARRAY.search(m.group(1))  # copy-start: the first tuple element is the copy
    dims = [int(d) for d in a.group(2).split(",") if d]
    n = math.prod(dims) * ITEMSIZE.get(a.group(1), 1)
    if n >= at_least and (dim is None or dim in dims):
      out.append((line.strip()[:160], n))
  return out


def test_copy_bytes_on_hand_written_hlo():
  hlo = "\n".join([
      "  %copy.75 = bf16[2,4,4096,576]{3,2,1,0:T(8,128)(2,1)} copy(%param.8), metadata={}",
      "  ROOT %transpose.1 = f32[8,128]{0,1} transpose(%x), dimensions={1,0}",
      "  %copy-start = (bf16[256,256]{1,0}, bf16[256,256]{0,1}, u32[]) copy-start(%p)",
      "  %copy-start.2 = (f32[9,256]{1,0:S(1)}, f32[9,256]{1,0}, u32[]) copy-start(%p)",
      "  %fusion.1 = bf16[2,4,4096,576]{3,2,1,0} fusion(%a), kind=kLoop, calls=%f",
  ])
  assert [n for _, n in copy_bytes(hlo, 0)] == [2 * 4 * 4096 * 576 * 2, 8 * 128 * 4,
                                                256 * 256 * 2]
  assert len(copy_bytes(hlo, 1 << 20)) == 1 and copy_bytes(hlo, 0, dim=256) == [
      (hlo.splitlines()[2].strip()[:160], 256 * 256 * 2)]


@pytest.fixture(scope="module")
def v6e_mesh():
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(topology_name="v6e:2x2", platform="tpu")
  return make_mesh({"data": 4}, devices=topo.devices)


@pytest.mark.parametrize("tokens", [1, 2], ids=["step", "verify2"])
def test_tpu_decode_step_keeps_the_cache_in_place(v6e_mesh, tokens):
  """T=1 (a decode step) and T=2 (speculative verification: the multi-token kernel and a
  two-column rope write) with the Pallas kernels, batch split over 4 v6e chips."""
  mesh, rules = v6e_mesh, ShardingRules()
  rt = dsv3_jax.RuntimeConfig(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16,
                              attention_backend="pallas", kernel_platform="tpu")
  graphdef, params, rest = nnx.split(dsv3_jax.abstract_model(CFG, rt), nnx.Param, ...)
  sds = lambda tree, sh: jax.tree.map(  # noqa: E731
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
  pa = sds(params, state_shardings(params, rules, mesh))
  ra = sds(rest, state_shardings(rest, rules, mesh))
  step, args, _ = abstract_decode_step(graphdef, pa, ra, rules, mesh, B, S, tokens=tokens)
  with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
    compiled = jax.jit(step, donate_argnums=(3,)).trace(*args).lower().compile()
  hlo = compiled.as_text()
  assert hlo.count("mla_decode") > 0  # the Pallas kernel, not the reference einsum
  per_device_cache = CFG.num_hidden_layers * (B // 4) * S * 576 * 2
  # Cache-sized: at least one layer's rope part (16 MiB) with a dim of S rows.
  layer_rope = (B // 4) * S * 64 * 2
  big = copy_bytes(hlo, layer_rope, dim=S)
  assert not big, big
  ma = compiled.memory_analysis()
  assert ma.temp_size_in_bytes < 0.05 * per_device_cache, ma
  assert ma.alias_size_in_bytes >= per_device_cache  # the donated cache is updated in place
  accessed = compiled.cost_analysis()["bytes accessed"]
  # XLA counts the scan body once: one layer's cache read (151 MB) + weights + the new rows;
  # the old layout adds copies of the whole cache.
  assert accessed < 0.8 * ma.argument_size_in_bytes, (accessed, ma.argument_size_in_bytes)


# Three layers (one dense, then a stack of two MoE layers) with experts split over 4 v5p chips:
# each device holds local expert stacks [2 layers, 4 experts, 256, 384] (gate/up) and
# [2, 4, 384, 256] (down). D != F and El != L so a per-layer slice has its own shape.
MOE_CFG = CFG.replace(num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=16,
                      num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1,
                      moe_intermediate_size=384, kv_lora_rank=128)


def _shapes(hlo: str, dtype: str) -> list[tuple[str, tuple[int, ...]]]:
  """(op, dims) of every instruction's result (fused or not; tuple results: each element)."""
  out = []
  for line in hlo.splitlines():
    m = _INSTR.match(line)
    if m:
      out += [(m.group(2), tuple(int(d) for d in dims.split(",") if d))
              for t, dims, _ in _ARRAY.findall(m.group(1)) if t == dtype]
  return out


def test_tpu_moe_decode_step_reads_expert_stacks_in_place():
  """The decode step with routed experts under expert parallelism (v5p:2x2x1, expert 4, Pallas
  kernels everywhere) compiles with the grouped matmul that takes the whole [L, El, ...] stack and
  the layer index (`dsv3_grouped_matmul_layer`, three per MoE layer), and no instruction produces
  a per-layer expert slice [El, D, F] / [El, F, D] (the scan used to slice the stacks and XLA
  materialised each layer's experts before the kernel: 2.2x the model's bytes at 671B)."""
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu")
  mesh, rules, cfg = make_mesh({"expert": 4}, devices=topo.devices), ShardingRules(), MOE_CFG
  rt = dsv3_jax.RuntimeConfig(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16,
                              attention_backend="pallas", moe_backend="pallas",
                              kernel_platform="tpu")
  graphdef, params, rest = nnx.split(dsv3_jax.abstract_model(cfg, rt), nnx.Param, ...)
  sds = lambda tree, sh: jax.tree.map(  # noqa: E731
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
  pa = sds(params, state_shardings(params, rules, mesh))
  ra = sds(rest, state_shardings(rest, rules, mesh))
  step, args, _ = abstract_decode_step(graphdef, pa, ra, rules, mesh, 8, 1024)
  with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
    compiled = jax.jit(step, donate_argnums=(3,)).trace(*args).lower().compile()
  hlo = compiled.as_text()
  kernels = [l for l in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in l]
  assert sum("dsv3_grouped_matmul_layer" in l for l in kernels) == 3, [l[:160] for l in kernels]
  el, d, f = cfg.n_routed_experts // 4, cfg.hidden_size, cfg.moe_intermediate_size
  slices = [(op, dims) for op, dims in _shapes(hlo, "bf16") if dims in ((el, d, f), (el, f, d))]
  assert not slices, slices
