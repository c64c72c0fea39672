"""FP8-weight inference (`from_pretrained(..., fp8="keep")`) and the MoE grouped-matmul kernels
through the model.

Oracle: the same checkpoint loaded dequantised (`fp8="dequantize"`, itself checked against
transformers in test_loading.py), computed in float32. Kept-FP8 weights hold exactly the same
values (e4m3 * block scale is exact in float32), so the only differences are float32 summation
order: logits agree to 1e-4 (they are O(1-10)). The checkpoint uses the kernels' 128 x 128
blocks with hidden_size 160, so weights have 1-2 blocks per axis, partial edge blocks included.
Kernel backends run in Pallas interpret mode on CPU ("tpu" and "gpu" kernels); the traced
program's `pallas_call`s are counted, so a kernel path that silently ran the reference fails.
"""
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

import dsv3_jax
from dsv3_jax.config import RuntimeConfig
from dsv3_jax.convert import Fp8Weight, convert
from dsv3_jax.inference import absorb_weights, generate
from dsv3_jax.layers import Fp8Scale, Fp8TrainingError, Fp8Value
from dsv3_jax.pretrained import flat_variables, fp8_variables, model_from_arrays
from dsv3_jax.safetensors_io import SafetensorsFile, save_file
from dsv3_jax.sharding import ShardingRules, make_mesh, variable_spec
from tests.hf_reference import make_v3
from tests.test_loading import NOT_QUANTISED, quantize_blockwise
from tests.utils import assert_close, count_pallas_calls

BLOCK = 128
ATOL = 1e-4  # float32 compute on both sides, same weight values: summation order only
TOKENS = np.random.RandomState(0).randint(0, 97, (2, 8)).astype(np.int32)
BACKENDS = [("reference", None), ("interpret", "tpu"), ("interpret", "gpu")]
BACKEND_IDS = ["reference", "interpret-tpu", "interpret-gpu"]


# XLA's CPU optimisations off for every program here (eager ops included): compiling the tiny
# models is these tests' cost. The checks are at ATOL, and the exact ones compare programs that
# both compile inside this module (the same options).
pytestmark = pytest.mark.usefixtures("module_fast_compiles")


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
  """A 2-layer (dense, MoE) transformers checkpoint in the official FP8 format with 128x128
  blocks: every linear but lm_head / mlp.gate is e4m3 + float32 scale_inv; the rest bf16."""
  path = tmp_path_factory.mktemp("fp8") / "hf"
  make_v3(path, seed=5, num_hidden_layers=2, hidden_size=160)
  f = SafetensorsFile(path / "model.safetensors")
  out = {}
  for k in f.keys():
    w = np.array(f[k])
    if w.ndim == 2 and not any(s in k for s in NOT_QUANTISED):
      out[k], out[k + "_scale_inv"] = quantize_blockwise(w, BLOCK, pow2=False)
    elif "e_score_correction_bias" in k:
      out[k] = w
    else:
      out[k] = w.astype(ml_dtypes.bfloat16)
  f.close()
  save_file(out, str(path / "model.safetensors"))
  cfg = json.loads((path / "config.json").read_text())
  cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": [BLOCK, BLOCK]}
  (path / "config.json").write_text(json.dumps(cfg))
  return path


@pytest.fixture(scope="module")
def orbax_dir(fp8_dir, tmp_path_factory):
  return convert(fp8_dir, tmp_path_factory.mktemp("orbax") / "fp8", dtype="float8", progress=False)


@pytest.fixture(scope="module")
def dense(fp8_dir):
  """The dequantised model (float32) and its logits: the oracle."""
  model = dsv3_jax.from_pretrained(fp8_dir)
  return model, np.asarray(_logits(model, TOKENS))


@nnx.jit
def _logits(model, tokens):
  return model(tokens)


def _logits_and_kernel_calls(model, tokens):
  """(logits, number of pallas_calls in the traced forward), from one trace."""
  graphdef, state = nnx.split(model)
  traced = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)).trace(state, jnp.asarray(tokens))
  return traced.lower().compile()(state, jnp.asarray(tokens)), count_pallas_calls(traced.jaxpr)


def _stored_fp8(path):
  """{checkpoint name: (e4m3 value, scale_inv)} as stored in the HF file."""
  f = SafetensorsFile(path / "model.safetensors")
  out = {k: (np.array(f[k]), np.array(f[k + "_scale_inv"])) for k in f.keys()
         if k + "_scale_inv" in f.keys()}
  f.close()
  return out


def _check_fp8_layout(model, fp8_dir):
  """Every FP8 tensor of the checkpoint is e4m3 in the model, bit-equal, 1 byte per element;
  the dense kernels they replace are gone; non-FP8 tensors stay float32 Params."""
  stored = _stored_fp8(fp8_dir)
  fp8 = fp8_variables(model)
  values = {k: v.get_value() for k, v in fp8.items() if isinstance(v, Fp8Value)}
  scales = {k: v.get_value() for k, v in fp8.items() if isinstance(v, Fp8Scale)}
  for k, v in values.items():
    assert v.dtype == jnp.float8_e4m3fn and v.nbytes == v.size, k
  # Bit-exact against the checkpoint: a dense linear and one routed expert.
  v, s = stored["model.layers.1.self_attn.kv_b_proj.weight"]
  np.testing.assert_array_equal(np.asarray(values["layers.1.self_attn.kv_b_proj.weight"]).view(np.uint8),
                                v.view(np.uint8))
  np.testing.assert_array_equal(scales["layers.1.self_attn.kv_b_proj.weight_scale_inv"], s)
  v, s = stored["model.layers.1.mlp.experts.5.down_proj.weight"]
  np.testing.assert_array_equal(
      np.asarray(values["layers.1.mlp.experts.down_proj_weight"][5]).view(np.uint8), v.view(np.uint8))
  np.testing.assert_array_equal(scales["layers.1.mlp.experts.down_proj_weight_scale_inv"][5], s)
  # One model tensor per (non-expert) checkpoint tensor, one stack per expert projection.
  n_expert = sum(1 for n in stored if ".mlp.experts." in n)
  assert len(values) == len(scales) == len(stored) - n_expert + 3
  names = flat_variables(model)
  assert "layers.1.self_attn.kv_b_proj.kernel" not in names
  assert "layers.1.mlp.experts.gate_proj" not in names
  for k in ("lm_head.kernel", "layers.1.mlp.gate.kernel", "embed_tokens"):
    assert isinstance(names[k], nnx.Param) and names[k].get_value().dtype == jnp.float32, k
  # Logical axes: the FP8 value's are the dense kernel's, last two swapped.
  assert names["layers.1.self_attn.o_proj.weight"].get_metadata()["axes"] == ("embed", "heads")
  assert names["layers.1.mlp.experts.up_proj_weight"].get_metadata()["axes"] == (
      "expert", "moe_mlp", "moe_embed")


# Kernel call sites of the 2-layer FP8 model's forward (each stack's layer body traced once):
# per layer the 5 MLA linears (q_a, q_b, kv_a, kv_b, o); layer 0's dense MLP (3); layer 1's
# shared experts (3) and routed experts (3 grouped_matmul_fp8). lm_head and the router stay bf16.
FP8_KERNEL_CALLS = 2 * 5 + 3 + 3 + 3


@pytest.mark.parametrize("backend,platform", BACKENDS, ids=BACKEND_IDS)
def test_hf_fp8_kept_matches_dequantised(fp8_dir, dense, backend, platform):
  rt = RuntimeConfig(moe_backend=backend, linear_backend=backend, kernel_platform=platform)
  model = dsv3_jax.from_pretrained(fp8_dir, runtime=rt, fp8="keep")
  if backend == "reference":
    _check_fp8_layout(model, fp8_dir)
  logits, calls = _logits_and_kernel_calls(model, TOKENS)
  assert calls == (0 if backend == "reference" else FP8_KERNEL_CALLS)
  assert_close(logits, dense[1], atol=ATOL, what=f"fp8 {backend} {platform}")


def test_fp8_linears_follow_linear_backend(fp8_dir):
  """FP8 dense linears take `linear_backend`, routed experts `moe_backend`: each knob alone
  brings only its own kernels."""
  for rt, want in ((RuntimeConfig(linear_backend="interpret"), 2 * 5 + 3 + 3),
                   (RuntimeConfig(moe_backend="interpret"), 3)):
    model = dsv3_jax.from_pretrained(fp8_dir, runtime=rt, fp8="keep")
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(jnp.asarray(TOKENS)))(state)
    assert count_pallas_calls(jaxpr) == want, rt


def test_orbax_float8_kept_matches_dequantised(orbax_dir, fp8_dir, dense):
  """`dsv3 convert --dtype float8` then fp8="keep": the same FP8 model as from the HF directory
  (layout checked bit-exactly; the kernels after loading are the ones tested above)."""
  model = dsv3_jax.from_pretrained(orbax_dir, fp8="keep")
  _check_fp8_layout(model, fp8_dir)
  assert_close(_logits(model, TOKENS), dense[1], atol=ATOL, what="orbax fp8")


def test_fp8_model_sharded_load(fp8_dir, dense):
  """Kept-FP8 weights placed by the logical-axis rules on a 2x2 (fsdp, tensor) mesh."""
  mesh, rules = make_mesh({"fsdp": 2, "tensor": 2}, devices=jax.devices()[:4]), ShardingRules()

  def shardings(path, var):
    return NamedSharding(mesh, variable_spec(var, rules, mesh, path))

  model = dsv3_jax.from_pretrained(fp8_dir, fp8="keep", shardings=shardings)
  names = flat_variables(model)
  w = names["layers.1.self_attn.o_proj.weight"]  # [out=embed, in=heads]
  assert w.get_value().sharding.spec == variable_spec(w, rules, mesh)
  assert tuple(w.get_value().sharding.spec) == ("fsdp", "tensor")
  assert_close(_logits(model, TOKENS), dense[1], atol=ATOL, what="sharded fp8")


def test_fp8_decode_and_generate_match_dequantised(fp8_dir, dense):
  model = dsv3_jax.from_pretrained(fp8_dir, fp8="keep")
  got, want = absorb_weights(model), absorb_weights(dense[0])
  for key in ("w_uk", "w_uv"):
    for a, b in zip(got[key], want[key]):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # dequantised once: exact
  prompts = [[3, 17, 42, 5], [9, 1, 64, 2]]
  out = generate(model, prompts, max_new_tokens=4, temperature=0.0)
  ref = generate(dense[0], prompts, max_new_tokens=4, temperature=0.0)
  assert [list(t) for t in out.tokens] == [list(t) for t in ref.tokens]
  assert all(1 <= len(t) <= 4 for t in ref.tokens)


def test_cli_generate_fp8_keep_matches_dequantised(fp8_dir, dense, capsys):
  from dsv3_jax.cli import main
  prompt = [3, 17, 42, 5]
  ref = generate(dense[0], [prompt], max_new_tokens=4, temperature=0.0, eos_token_id=[])
  rc = main(["generate", "--checkpoint", str(fp8_dir), "--prompt-ids", "3,17,42,5",
             "--max-new-tokens", "4", "--fp8", "keep", "--dtype", "float32", "--eos-id", "-1"])
  assert rc == 0
  out = capsys.readouterr().out
  assert " ".join(str(t) for t in ref.tokens[0]) in out, out


def test_fp8_model_refuses_training(fp8_dir):
  model = dsv3_jax.from_pretrained(fp8_dir, fp8="keep")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # as the trainer differentiates

  def loss(p):
    return nnx.merge(graphdef, p, rest)(jnp.asarray(TOKENS)).mean()

  with pytest.raises(Fp8TrainingError, match="FP8.*inference-only.*fp8='dequantize'"):
    jax.jit(jax.grad(loss))(params)  # fails while tracing the backward pass
  assert not any(isinstance(v, Fp8Value) for v in jax.tree.leaves(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable)))
  with pytest.raises(ValueError, match="FP8 weights"):
    dsv3_jax.save_pretrained(model, fp8_dir.parent / "out")


def test_fp8_keep_errors(fp8_dir, dense):
  with pytest.raises(ValueError, match="fp8 must be one of"):
    dsv3_jax.from_pretrained(fp8_dir, fp8="yes")
  arrays = {k: v.get_value() for k, v in flat_variables(dense[0]).items()}
  w = np.zeros((112, 32), ml_dtypes.float8_e4m3fn)
  arrays["layers.1.self_attn.kv_b_proj.kernel"] = Fp8Weight(w, np.ones((7, 2), np.float32), (16, 16))
  with pytest.raises(ValueError, match=r"kv_b_proj.kernel: fp8='keep' needs 128x128"):
    model_from_arrays(dense[0].config, RuntimeConfig(), arrays)


# MoE grouped matmul kernels through the model (bf16/f32 path, forward and backward) ----------
def _logits_and_expert_grads(model, tokens, cot):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def run(p):
    def loss(p):
      logits = nnx.merge(graphdef, p, rest)(tokens)
      return (logits * cot).sum(), logits
    return jax.grad(loss, has_aux=True)(p)

  traced = run.trace(params)
  grads, logits = traced.lower().compile()(params)
  flat = {k: v.get_value() for k, v in flat_variables_state(grads).items() if ".experts." in k}
  # The MoE stack of this config holds one layer (layer 1): its arrays are [1, ...].
  flat = {k.replace("stacks.1.block.", "layers.1."): v[0] for k, v in flat.items()}
  return np.asarray(logits), flat, count_pallas_calls(traced.jaxpr)


def flat_variables_state(state):
  return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


COT = np.random.RandomState(1).randn(*TOKENS.shape, 97).astype(np.float32)


@pytest.fixture(scope="module")
def moe_reference(dense):
  """Logits and routed-expert gradients with moe_backend="reference" (jax.lax.ragged_dot)."""
  return _logits_and_expert_grads(dense[0], jnp.asarray(TOKENS), jnp.asarray(COT))


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_moe_kernel_through_model_matches_reference(fp8_dir, moe_reference, platform):
  got = dsv3_jax.from_pretrained(fp8_dir, runtime=RuntimeConfig(moe_backend="interpret",
                                                                kernel_platform=platform))
  want_logits, want, ref_calls = moe_reference
  logits, grads, calls = _logits_and_expert_grads(got, jnp.asarray(TOKENS), jnp.asarray(COT))
  # gate/up/down: a gmm forward each, and in the backward a gmm (dlhs) and a tgmm (drhs) each
  assert (ref_calls, calls) == (0, 3 * 3)
  assert_close(logits, want_logits, atol=ATOL, what=f"logits moe {platform}")
  assert set(grads) == set(want) == {f"layers.1.mlp.experts.{p}" for p in
                                     ("gate_proj", "up_proj", "down_proj")}
  for k in want:
    scale = float(np.abs(want[k]).max())
    assert scale > 1e-3, k  # the routed experts really get gradient
    assert_close(grads[k], want[k], atol=1e-5 * scale, rtol=1e-4, what=f"grad {k} {platform}")
