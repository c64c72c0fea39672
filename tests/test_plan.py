"""`dsv3 plan`: the train step and the serve steps compiled for real TPU topologies by libtpu on
this CPU machine (no TPU needed), with reduced configs on the smallest slices.

Oracles: the compiler itself (memory_analysis, RESOURCE_EXHAUSTED), the parameter/optimizer/cache
byte counts from shapes (arguments the compiler reports must hold them), and libtpu's own HBM
figures (`available HBM (95.74G)` in its out-of-memory message). Exit status of the CLI:
0 fits, 1 does not fit, 2 error.
"""
import json
import os
import re

import jax
import jax.numpy as jnp
import pytest

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from dsv3_jax import cli  # noqa: E402
from dsv3_jax.config import ModelConfig  # noqa: E402
from dsv3_jax.sharding import (TPU_COMPILE_OPTIONS, TPU_TRAIN_COMPILE_OPTIONS,  # noqa: E402
                               compile_options_for, make_mesh)
from dsv3_jax.plan import (COLLECTIVES, HBM_GIB, HOT_PATHS, PlanError, PlanRequest,  # noqa: E402
                           count_collectives, count_kernels, plan)

pytest.importorskip("libtpu", reason="TPU AOT compile needs libtpu: pip install -e '.[test]'")

GiB = 1024 ** 3


@pytest.fixture(autouse=True)
def tpu_matmul_precision():
  """Compile with jax's default matmul precision, as a TPU run would: conftest's "highest" (for
  float32 parity on CPU) asks XLA's TPU ragged-dot kernel for fp32 contraction of bf16 operands,
  which Mosaic rejects ("Bad lhs type")."""
  with jax.default_matmul_precision("default"):
    yield


KEYS = ("topology", "mode", "devices", "mesh", "hbm_bytes", "argument_bytes", "output_bytes",
        "temp_bytes", "total_bytes", "peak_bytes", "fits", "compile_seconds", "kernels",
        "model_flops", "compiled_flops", "model_bytes", "compiled_bytes", "flops_ratio",
        "bytes_ratio", "parameter_bytes", "optimizer_bytes", "cache_bytes", "collectives",
        "advice")


def small_config(layers=1, dense=0, mtp=0, **kw) -> ModelConfig:
  """A reduced DeepSeek-V3 whose head dims suit the TPU kernels' (8, 128) block rules: qk 64+64,
  v 128, latent 128 + rope 64; 8 routed experts (top-2) and one shared expert."""
  base = dict(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
              num_hidden_layers=layers, num_attention_heads=2, q_lora_rank=128, kv_lora_rank=128,
              qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=8,
              n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
              first_k_dense_replace=dense, num_nextn_predict_layers=mtp,
              max_position_embeddings=1024)
  return ModelConfig(**{**base, **kw})


def loop_body_ops(hlo: str) -> tuple[int, int]:
  """(ops from a scanned loop body inside non-entry computations, such ops in the entry
  computation: a peeled iteration), by their jax op_name (".../while/body/...")."""
  entry = hlo.index("\nENTRY")
  end = hlo.index("\n}\n", entry)
  def count(text):
    return len(re.findall(r'op_name="[^"]*/while/body/', text))
  return count(hlo[:entry]) + count(hlo[end:]), count(hlo[entry:end])


def check_consistent(j: dict) -> None:
  for k in KEYS:
    assert k in j, k
  for name, s in j["steps"].items():
    assert s["fits"], (name, s["error"])
    assert s["total_bytes"] == (s["argument_bytes"] + s["output_bytes"] - s["alias_bytes"]
                                + s["temp_bytes"]), name
    assert s["total_bytes"] <= j["hbm_bytes"]
    assert s["compiled_flops"] > 0 and s["compiled_bytes"] > 0 and s["model_flops"] > 0
  assert j["fits"] is True and j["advice"] == []
  assert j["peak_bytes"] == max(s["peak_bytes"] for s in j["steps"].values())
  assert j["compile_seconds"] > 0
  for s in j["steps"].values():  # jax's lowering and XLA's compile timed apart, wall and CPU
    laps = s["compile_times"]
    assert set(laps) == {"lower", "xla"} and laps["xla"]["cpu"] > 0, laps
    assert sum(lap["wall"] for lap in laps.values()) <= s["compile_seconds"] + 0.05
  assert j["compile_cpu_seconds"] == pytest.approx(
      sum(lap["cpu"] for s in j["steps"].values() for lap in s["compile_times"].values()), abs=0.02)
  assert set(j["kernels"]) == set(HOT_PATHS)
  assert j["flops_ratio"] == pytest.approx(j["compiled_flops"] / j["model_flops"], rel=1e-3)
  for s in j["steps"].values():
    assert s["bytes_ratio"] == pytest.approx(s["compiled_bytes"] / s["model_bytes"], rel=1e-3)
    assert s["compiled_flops_worst"] >= s["compiled_flops"] and s["xla_flops"] > 0


# (topology, mode, devices, libtpu's HBM per device in GiB, config)
CASES = [
    # a scanned dense stack of 3 + MTP (the layer loop the collective-pipeliner check looks at)
    ("v5e:2x2", "train", 4, 15.75, small_config(layers=3, dense=4, mtp=1)),
    ("v5p:2x2x1", "train", 4, 95.74, small_config()),
    ("v6e:2x2", "train", 4, 31.25, small_config()),
    ("tpu7x:2x2x1", "train", 8, 94.75, small_config()),
    ("v5e:2x2", "serve", 4, 15.75, small_config()),
    ("v5p:2x2x1", "serve", 4, 95.74, small_config()),
    ("v6e:2x2", "serve", 4, 31.25, small_config(layers=2, dense=1)),
    ("tpu7x:2x2x1", "serve", 8, 94.75, small_config()),
]


@pytest.mark.slow
@pytest.mark.parametrize("topology,mode,devices,hbm_gib,cfg", CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_sharded_steps_compile_with_every_hot_path_pallas(topology, mode, devices, hbm_gib, cfg,
                                                         monkeypatch):
  """The real train step / serve steps, sharded over the topology, compile for TPU with every hot
  path as a Pallas (Mosaic) kernel: fails if any of them fell back to the reference. Train steps
  compile with TPU_TRAIN_COMPILE_OPTIONS: no copy of a layer loop's body outside its loop."""
  import dsv3_jax.plan
  programs = []  # the optimized HLO of each compiled step
  monkeypatch.setattr(dsv3_jax.plan, "count_kernels",
                      lambda hlo: programs.append(hlo) or count_kernels(hlo))
  # The scanned dense stack trains with the 671B command's layer-input offload, where XLA's
  # collective pipeliner peeled the layer loops (with full remat it did not).
  scanned = mode == "train" and cfg.num_hidden_layers > 2
  remat = "offload" if scanned else "full"
  j = plan(PlanRequest(topology=topology, mode=mode, config=cfg, batch_per_device=1, seq=128,
                       decode_batch=devices, context=128, prompt_len=128, remat=remat,
                       kernels="pallas")).to_json()
  check_consistent(j)
  assert (j["topology"], j["mode"], j["devices"]) == (topology, mode, devices)
  assert j["hbm_bytes"] == int(hbm_gib * GiB)
  moe = cfg.n_routed_experts and cfg.first_k_dense_replace < cfg.num_hidden_layers
  # Default mesh: expert shards = gcd(devices, 8 experts), so EP over every device.
  assert j["mesh"] == {"fsdp": 1, "expert": devices}
  # Serving runs the engine's steps: prefill chunks attend over the paged cache too (mla_decode).
  expect = {"attention": "pallas" if mode == "train" else None,
            "decode": "pallas" if mode == "serve" else None,
            "moe": "pallas" if moe else None, "fp8": None}
  assert j["kernels"] == expect
  # libtpu accepted the package's TPU compile options on every topology (an unknown or refused
  # option is an INVALID_ARGUMENT compile error).
  if mode == "serve":
    assert j["compile_options"] == TPU_COMPILE_OPTIONS
  if moe:  # the EP exchange is resolved for the TPU target, not for this CPU host
    assert j["collectives"]["ragged-all-to-all"] > 0
  if mode == "train":
    assert set(j["steps"]) == {"train"}
    assert j["compile_options"] == {**TPU_COMPILE_OPTIONS, **TPU_TRAIN_COMPILE_OPTIONS}
    # XLA's collective pipeliner peels an iteration of each layer loop into the entry computation
    # (the v5e:2x2 case with it on: 322 ops of the dense stack's forward and backward bodies
    # there, compiled a second time); off, the layer ops stay in the loop bodies (2 outside).
    inside, peeled = loop_body_ops(programs[-1])
    if scanned:
      assert inside > 100 and peeled < 20, (inside, peeled)
    # The compiler's arguments hold the sharded parameters and Adam moments (plus tokens etc.,
    # and TPU tile padding of narrow shards: kv_a's [64, 192] per device pads 192 lanes to 256).
    # That padding is 48 KiB per layer (16 KiB for each of the parameter, m and v).
    extra = j["argument_bytes"] - j["parameter_bytes"] - j["optimizer_bytes"]
    layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    assert 0 <= extra < (48 * layers + 64) * 1024, extra
    # m and v in float32 like the parameters, plus optax's step counters.
    assert 0 <= j["optimizer_bytes"] - 2 * j["parameter_bytes"] < 1024
    assert j["cache_bytes"] == 0
  else:
    assert set(j["steps"]) == {"prefill", "decode"}
    dec = j["steps"]["decode"]
    # Decode arguments: bf16 params + absorbed weights + the page pool (one sequence's page of
    # 128 rows + the scratch page per device: the pool split over the batch shards).
    rows = cfg.num_hidden_layers * 2 * 128 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    assert j["config"]["pool_split"] and j["cache_bytes"] == rows * 2
    assert dec["argument_bytes"] >= j["parameter_bytes"] + j["cache_bytes"]
    assert j["optimizer_bytes"] == 0


def test_cli_json_and_text(tmp_path, capsys, monkeypatch):
  """`dsv3 plan --json` and the text form of the same report, with reference kernels (reported
  as such for attention and the MoE)."""
  import dsv3_jax.plan
  path = tmp_path / "config.json"
  path.write_text(json.dumps(small_config(layers=1).to_hf_config()))
  args = ["plan", "--topology", "v6e:2x2", "--mode", "train", "--config", str(path), "--seq",
          "64", "--kernels", "reference", "--mesh", "fsdp=2,expert=2", "--opt-dtype", "bfloat16"]
  reports = []
  monkeypatch.setattr(dsv3_jax.plan, "plan", lambda req: reports.append(plan(req)) or reports[-1])
  assert cli.main(args + ["--json"]) == 0
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 1
  j = json.loads(out[0])
  check_consistent(j)
  assert j["mesh"] == {"fsdp": 2, "expert": 2} and j["config"]["global_batch"] == 4
  assert j["kernels"] == {"attention": "reference", "decode": None, "moe": "reference",
                          "fp8": None}
  # First moment in bf16 (half the float32 parameters), second in float32, plus step counters.
  assert 0 <= j["optimizer_bytes"] - 1.5 * j["parameter_bytes"] < 1024
  assert set(j["collectives"]) == set(COLLECTIVES)
  # The text form of the same request (not compiled a second time: the same report).
  monkeypatch.setattr(dsv3_jax.plan, "plan", lambda req: reports[0])
  assert cli.main(args) == 0
  text = capsys.readouterr().out
  assert "fits: yes" in text and "temporaries" in text and "collectives:" in text


def test_does_not_fit_reports_compiler_verdict_and_advice(tmp_path, capsys):
  # Dense, 1 layer, but a 524288 x 8192 embedding and head in float32 with Adam moments:
  # ~24 GiB of state per v5e device (15.75 GiB).
  cfg = small_config(layers=1, dense=1, n_routed_experts=0, vocab_size=524288, hidden_size=8192)
  path = tmp_path / "config.json"
  path.write_text(json.dumps(cfg.to_hf_config()))
  code = cli.main(["plan", "--topology", "v5e:2x2", "--mode", "train", "--config", str(path),
                   "--seq", "8", "--kernels", "reference", "--json"])
  assert code == 1
  j = json.loads(capsys.readouterr().out)
  assert j["fits"] is False
  assert "RESOURCE_EXHAUSTED" in j["error"]
  assert j["total_bytes"] > j["hbm_bytes"] == int(15.75 * GiB)
  assert j["temp_bytes"] is None  # the compiler gave no analysis of a rejected program
  assert any("--opt-dtype bfloat16" in a for a in j["advice"])
  assert any("devices" in a for a in j["advice"])


@pytest.mark.parametrize("argv,needle", [
    (["--topology", "v5p-256", "--config", "tiny"], "v5p:XxYxZ"),
    (["--topology", "v5e:2x2", "--config", "tiny", "--mesh", "fsdp=3"], "multiply to 4"),
    (["--topology", "v5e:2x2", "--config", "tiny", "--mesh", "fsdp=2,expert=x"], "not an integer"),
    (["--topology", "v5e:2x2", "--config", "nope"], "neither a preset"),
    (["--topology", "v5e:2x2", "--config", "tiny", "--ep-capacity-factor", "0"],
     "--ep-capacity-factor must be > 0, got 0.0"),
])
def test_errors_are_one_line_with_status_2(argv, needle, capsys):
  assert cli.main(["plan", *argv]) == 2
  err = capsys.readouterr().err.strip()
  assert needle in err and len(err.splitlines()) == 1, err


def test_ep_capacity_factor_reaches_the_runtime(monkeypatch):
  """--ep-capacity-factor goes into the RuntimeConfig the step is compiled with (1.5 unset)."""
  import dsv3_jax.plan
  from dsv3_jax.plan import _runtime
  reqs = []

  def stop(req):  # the request is all this test needs: nothing is compiled
    reqs.append(req)
    raise KeyError("stop")

  monkeypatch.setattr(dsv3_jax.plan, "plan", stop)
  base = ["plan", "--topology", "v5e:2x2", "--config", "tiny"]
  for extra, want in (([], 1.5), (["--ep-capacity-factor", "1.25"], 1.25)):
    with pytest.raises(KeyError, match="stop"):
      cli.main(base + extra)
    assert reqs[-1].ep_capacity_factor == want
    assert _runtime(reqs[-1]).ep_capacity_factor == want


def test_missing_libtpu_says_what_to_install(monkeypatch):
  import importlib.util

  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "libtpu" else real(name, *a))
  with pytest.raises(PlanError, match=f'pip install "jax\\[tpu\\]=={jax.__version__}"'):
    plan(PlanRequest(topology="v5e:2x2", mode="train", config=small_config()))


def test_hlo_counters_on_hand_written_hlo():
  hlo = "\n".join([
      '  %all-gather-start.1 = (bf16[4]{0}, bf16[16]{0}) all-gather-start(bf16[4]{0} %p), dims={0}',
      '  %all-gather-done.1 = bf16[16]{0} all-gather-done((bf16[4]{0}, bf16[16]{0}) %ag)',
      '  %ra = bf16[8,4]{1,0} ragged-all-to-all(bf16[8,4]{1,0} %x, bf16[8,4]{1,0} %o, s32[2] %a)',
      '  %a2a = bf16[8,4]{1,0} all-to-all(bf16[8,4]{1,0} %x), dimensions={0}',
      '  %ar = f32[] all-reduce(f32[] %s), to_apply=%add',
      # newer XLA: the start is a generic async wrapper, only the done names the collective
      '  %cs = ((f32[4]), f32[4]) call-start(f32[4] %v), async_execution_thread="x"',
      '  %cp = f32[4]{0} collective-permute-done(((f32[4]), f32[4]) %cs)',
      '  %mla_decode.3 = bf16[8] custom-call(%q), custom_call_target="tpu_custom_call"',
      '  %mla_attention_dkv.1 = bf16[8] custom-call(%q), custom_call_target="tpu_custom_call"',
      '  %gmm.2 = bf16[8] custom-call(%x), custom_call_target="tpu_custom_call"',
      '  %dsv3_grouped_matmul_fp8 = bf16[8] custom-call(%x), custom_call_target="tpu_custom_call"',
      '  %ragged-dot-none.1 = bf16[8] custom-call(%x), custom_call_target="tpu_custom_call"',
  ])
  assert count_collectives(hlo) == {"all-to-all": 1, "ragged-all-to-all": 1, "all-gather": 1,
                                    "reduce-scatter": 0, "all-reduce": 1,
                                    "collective-permute": 1}
  assert count_kernels(hlo) == {"attention": 1, "decode": 1, "moe": 2, "fp8": 1, "other": 1}


def test_hbm_table_matches_libtpu():
  # libtpu's "exceeds available HBM (...)" per device; v4 and tpu7x expose 2 devices per chip.
  assert HBM_GIB == {"TPU v4": 15.25, "TPU v5 lite": 15.75, "TPU v5": 95.74,
                     "TPU v6 lite": 31.25, "TPU7x": 94.75}


# Model figures and compiled figures ------------------------------------------------------------
def matmul_params(cfg: ModelConfig, mtp: bool) -> tuple[int, int]:
  """(activated matmul weights per token, routed-expert weights in all) of the main model
  (+ MTP blocks with their shared head), counted by hand from the architecture: attention
  (q_a, q_b, kv_a, kv_b, o), dense SwiGLU or router + shared + top-K routed experts, lm_head."""
  D, H, C, R, Q = (cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank,
                   cfg.qk_rope_head_dim, cfg.q_lora_rank)
  attn = (D * Q + Q * H * (cfg.qk_nope_head_dim + R) + D * (C + R)
          + C * H * (cfg.qk_nope_head_dim + cfg.v_head_dim) + H * cfg.v_head_dim * D)
  dense = 3 * D * cfg.intermediate_size
  expert = 3 * D * cfg.moe_intermediate_size
  moe = D * cfg.n_routed_experts + cfg.n_shared_experts * expert
  act = routed = 0
  blocks = [cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)]
  blocks += [True] * (cfg.num_nextn_predict_layers if mtp else 0)
  for is_moe in blocks:
    act += attn + (moe + cfg.num_experts_per_tok * expert if is_moe else dense)
    routed += cfg.n_routed_experts * expert if is_moe else 0
  heads = 1 + (cfg.num_nextn_predict_layers if mtp else 0)
  act += heads * D * cfg.vocab_size + (cfg.num_nextn_predict_layers * 2 * D * D if mtp else 0)
  return act, routed


def test_model_figures_closed_form():
  """The model's own figures against the issue's definitions, counted by hand: training 6 x
  activated matmul parameters x tokens + causal attention (3 x 2 x T/2 x H x (d_qk + d_v) per
  token and block); a decode step 2 x activated weights x tokens + attention over the context
  (absorbed: 2 x H x (2C + R) per row), bytes = weights touched (routed experts: the expected
  distinct share) + the embedding rows + the cache."""
  from flax import nnx

  from dsv3_jax.config import RuntimeConfig
  from dsv3_jax.plan import _serve_model_figures
  from dsv3_jax.pretrained import abstract_model
  from dsv3_jax.train.trainer import train_flops_per_token

  cfg = small_config(layers=3, dense=1, mtp=1)
  T, H = 128, cfg.num_attention_heads
  act, _ = matmul_params(cfg, mtp=True)
  attn = 3 * (3 + 1) * T * H * (cfg.qk_head_dim + cfg.v_head_dim)
  # train_flops_per_token takes count_params' activated count, which holds the norm scales
  # too (not matmul weights): 6 flops each, 1e-3 of the total here, 3e-5 at 671B.
  D, C, Q = cfg.hidden_size, cfg.kv_lora_rank, cfg.q_lora_rank
  norms = 4 * (2 * D + C + Q) + D + 3 * D  # 3 layers + MTP block; final; enorm/hnorm/head norm
  assert train_flops_per_token(cfg, T) == pytest.approx(6 * (act + norms) + attn, rel=1e-12)
  assert norms < 2e-3 * act

  scfg = cfg.replace(num_nextn_predict_layers=0)
  _, params, _ = nnx.split(abstract_model(scfg, RuntimeConfig(param_dtype=jnp.bfloat16)),
                           nnx.Param, ...)
  B, S = 4, 256
  cache = 3 * B * S * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
  flops, nbytes = _serve_model_figures(scfg, params, B, 1, S, cache, absorbed=True)
  act, routed = matmul_params(scfg, mtp=False)
  C, R = cfg.kv_lora_rank, cfg.qk_rope_head_dim
  assert flops == pytest.approx(2 * B * act + 3 * B * S * 2 * H * (2 * C + R), rel=1e-9)
  E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
  touched = 1 - (1 - K / E) ** B  # expected share of an MoE layer's experts a batch uses
  routed_act = 2 * 3 * K * 3 * cfg.hidden_size * cfg.moe_intermediate_size  # 2 MoE layers
  norms = 3 * (2 * cfg.hidden_size + C + cfg.q_lora_rank) + cfg.hidden_size
  weights = (act - routed_act // 3 + routed * touched + norms) * 2  # bf16
  assert nbytes == pytest.approx(weights + B * cfg.hidden_size * 2 + cache, rel=1e-9)


@pytest.mark.slow
def test_compiled_flops_count_scanned_layers_like_unrolled(monkeypatch):
  """The real reduced train step, layers scanned (2 MoE layers in one stack; EP's own loops)
  vs the same step with every lax.scan unrolled, whose XLA cost_analysis is complete: the
  scanned program's compiled_flops match it within 2% (XLA's fusion of the unrolled program
  differs slightly), while XLA's own count of the scanned program misses a layer's work."""
  req = PlanRequest(topology="v5e:2x2", mode="train", config=small_config(layers=2), seq=128)
  scanned = plan(req).to_json()
  real_scan = jax.lax.scan
  monkeypatch.setattr(jax.lax, "scan", lambda *a, **k: real_scan(*a, **{**k, "unroll": True}))
  unrolled = plan(req).to_json()
  assert [n for n, _ in scanned["steps"]["train"]["loops"]].count(2) >= 2  # fwd + bwd stacks
  assert scanned["compiled_flops"] == pytest.approx(unrolled["xla_flops"], rel=0.02)
  assert scanned["xla_flops"] < 0.7 * unrolled["xla_flops"]
  assert scanned["flops_ratio"] == pytest.approx(
      scanned["compiled_flops"] / scanned["model_flops"], rel=1e-3)
  assert "trip count" in scanned["cost_counting"]
  top = scanned["steps"]["train"]["top_ops"]
  assert top["flops"][0][2] >= top["flops"][-1][2] > 0


def test_advice_suggests_wide_experts_only_where_they_divide():
  """advice() on a train report that does not fit: `--rules wide` is suggested when the routed
  experts divide over every non-tensor device and the rules do not already spread them so."""
  from types import SimpleNamespace

  from dsv3_jax.config import DEEPSEEK_V3
  from dsv3_jax.plan import advice

  def report(mesh, expert_rules, experts=256):
    return SimpleNamespace(fits=False, hbm_bytes=95 * GiB, parameter_bytes=GiB,
                           optimizer_bytes=2 * GiB, cache_bytes=0, devices=256, mesh=mesh,
                           rules={"expert": expert_rules}, config={"n_routed_experts": experts})
  req = PlanRequest(topology="v5p:4x4x16", mode="train", config=DEEPSEEK_V3, remat="full")
  wide = lambda r: [a for a in advice(r, req) if a.startswith("--rules wide")]  # noqa: E731
  mesh = {"fsdp": 16, "expert": 16}
  assert wide(report(mesh, "expert")) == [
      "--rules wide (the 256 routed experts whole over all 256 non-tensor devices: no gathers "
      "of expert weights, no reductions of their gradients)"]
  assert wide(report(mesh, ("fsdp", "expert"))) == []              # already wide
  assert wide(report(mesh, "expert", experts=160)) == []           # 160 % 256 != 0
  assert wide(report({"fsdp": 8, "expert": 4, "tensor": 8}, "expert")) != []  # 32 | 256
  assert any(a.startswith("--remat offload") for a in advice(report(mesh, "expert"), req))


def test_unknown_loop_withholds_the_ratios(monkeypatch, capsys):
  """A step whose HLO had a loop with no readable trip count (counted once) reports
  loops_unknown and null flops/bytes ratios, and the CLI says so (text and, on stderr, --json)
  instead of printing a ratio that undercounts; a known step keeps its ratios."""
  import dsv3_jax.plan
  from dsv3_jax.plan import PlanReport, StepReport

  def step(unknown):
    return StepReport("train", True, 1.0, GiB, GiB, 0, GiB, 3 * GiB, 3 * GiB, 3e12, 4e9, 2e12,
                      2e9, dict.fromkeys(COLLECTIVES, 0), dict.fromkeys(HOT_PATHS, 0),
                      loops=[[None if unknown else 4, 1e11]], loops_unknown=int(unknown))
  def report(unknown):
    return PlanReport("tpu7x:2x2x1", "train", 8, "TPU7x", {"fsdp": 8}, {}, {}, 94 * GiB, GiB,
                      2 * GiB, 0, dict.fromkeys(HOT_PATHS), {"train": step(unknown)}, "train", [])
  known = report(False).to_json()
  assert known["flops_ratio"] == 1.5 and known["bytes_ratio"] == 2.0
  assert known["loops_unknown"] == 0
  j = report(True).to_json()
  assert j["flops_ratio"] is None and j["bytes_ratio"] is None and j["loops_unknown"] == 1
  assert j["steps"]["train"]["flops_ratio"] is None
  monkeypatch.setattr(dsv3_jax.plan, "plan", lambda req: report(True))
  args = ["plan", "--topology", "tpu7x:2x2x1", "--mode", "train", "--config", "tiny"]
  assert cli.main(args) == 0
  text = capsys.readouterr().out
  assert "WARNING: 1 loop(s) with no readable trip count" in text and "(-)" in text
  assert cli.main(args + ["--json"]) == 0
  captured = capsys.readouterr()
  assert json.loads(captured.out)["flops_ratio"] is None
  assert "train step: 1 loop(s) with no readable trip count" in captured.err


def test_compile_options_follow_the_mesh_platform():
  """TPU meshes (a libtpu topology's devices here) get TPU_COMPILE_OPTIONS (training programs also
  TPU_TRAIN_COMPILE_OPTIONS) under the caller's own options; CPU meshes (8 simulated devices)
  only the caller's. The package's options are ones libtpu knows: a made-up option is refused at
  compile time, these compile."""
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
  tpu_mesh = topologies.make_mesh(topo, (4,), ("fsdp",))
  cpu_mesh = make_mesh({"fsdp": 8})
  mine = {"xla_cpu_enable_fast_math": False}
  assert compile_options_for(cpu_mesh) == {}
  assert compile_options_for(cpu_mesh, mine) == mine
  assert compile_options_for(tpu_mesh) == TPU_COMPILE_OPTIONS
  key = next(iter(TPU_COMPILE_OPTIONS))
  assert compile_options_for(tpu_mesh, {key: False}) == {**TPU_COMPILE_OPTIONS, key: False}
  assert compile_options_for(tpu_mesh, mine) == {**TPU_COMPILE_OPTIONS, **mine}
  assert compile_options_for(cpu_mesh, train=True) == {}
  train = compile_options_for(tpu_mesh, train=True)
  assert train == {**TPU_COMPILE_OPTIONS, **TPU_TRAIN_COMPILE_OPTIONS} != TPU_COMPILE_OPTIONS
  key = next(iter(TPU_TRAIN_COMPILE_OPTIONS))
  assert compile_options_for(tpu_mesh, {key: True}, train=True)[key] is True  # the caller's wins
  x = jax.ShapeDtypeStruct((512, 128), jnp.float32,
                           sharding=jax.sharding.NamedSharding(tpu_mesh, jax.P("fsdp")))
  lowered = jax.jit(lambda a: (a * 2).sum(0)).lower(x)
  lowered.compile(compiler_options=compile_options_for(tpu_mesh))
  lowered.compile(compiler_options=train)
  with pytest.raises(Exception, match="No such compile option"):
    lowered.compile(compiler_options={"xla_tpu_no_such_option_dsv3": True})


def test_router_compiles_token_local():
  """Routing is per token, so the router sharded over tokens on 8 tpu7x devices compiles with no
  collective and no sort. (Its group mask, once a scatter `zeros.at[rows,
  keep].set(True)`, became in the SPMD partitioner an all-gather of every device's indices and a
  sort of all of them: 65536 keys here, 4M per MoE layer in the 671B train step, where that one
  sort was the largest op XLA:TPU generated code for.)"""
  from jax.experimental import topologies
  from dsv3_jax.moe import route
  cfg = small_config(n_routed_experts=32, num_experts_per_tok=4, n_group=4, topk_group=2)
  topo = topologies.get_topology_desc(topology_name="tpu7x:2x2x1", platform="tpu")
  mesh = topologies.make_mesh(topo, (2, 4), ("fsdp", "expert"))
  rows = jax.sharding.NamedSharding(mesh, jax.P(("fsdp", "expert")))
  logits = jax.ShapeDtypeStruct((8 * 4096, 32), jnp.float32, sharding=rows)
  bias = jax.ShapeDtypeStruct((32,), jnp.float32,
                              sharding=jax.sharding.NamedSharding(mesh, jax.P()))

  def routing(lg, b):
    r = route(lg, b, cfg)
    return r.weights, r.experts

  hlo = jax.jit(routing, out_shardings=rows).lower(logits, bias).compile().as_text()
  assert not any(count_collectives(hlo).values()), count_collectives(hlo)
  # No sort at all, forward or backward: the top-ks are rounds of a max (`moe.top_k`; lax.top_k
  # sorted every row) and the weights' gradient is a select (take_along_axis's was a scatter,
  # which XLA:TPU sorts).
  grad = jax.jit(jax.grad(lambda lg, b: (routing(lg, b)[0] ** 2).sum()), out_shardings=rows)
  hlo_grad = grad.lower(logits, bias).compile().as_text()
  for text in (hlo, hlo_grad):
    assert not re.findall(r" (sort|scatter)\(", text), re.findall(r" (sort|scatter)\(", text)


def test_train_options_keep_all_gathers_out_of_sparsecore_all_reduces():
  """On tpu7x libtpu turns an all-gather over a 2-D mesh of 64 devices into a zero-filled buffer
  plus an all-reduce offloaded to the SparseCores, one SparseCore program per distinct collective
  (the compile-time cost TPU_TRAIN_COMPILE_OPTIONS removes for training programs): with the
  training options the gather compiles with no SparseCore all-reduce; the default options still
  show the rewrite, so this test sees the option take effect through `compiler_options`."""
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(topology_name="tpu7x:2x4x4", platform="tpu")
  mesh = topologies.make_mesh(topo, (4, 16), ("fsdp", "expert"))
  w = jax.ShapeDtypeStruct((1024, 512), jnp.float32,
                           sharding=jax.sharding.NamedSharding(mesh, jax.P("fsdp", "expert")))
  lowered = jax.jit(lambda a: a.astype(jnp.bfloat16) * 2,
                    out_shardings=jax.sharding.NamedSharding(mesh, jax.P())).lower(w)

  def sparsecore_ops(train: bool) -> list[str]:
    hlo = lowered.compile(compiler_options=compile_options_for(mesh, train=train)).as_text()
    return [line.split(" = ")[0].strip() for line in hlo.splitlines()
            if 'async_execution_thread="sparsecore"' in line]

  serve = sparsecore_ops(False)
  assert any("all-reduce" in op for op in serve), serve
  train = sparsecore_ops(True)
  assert not any("all-reduce" in op for op in train), train
