"""Abstract models, parameter counting and `from_pretrained`.

The abstract model (`nnx.eval_shape`, nothing allocated) is the single list of parameter paths,
shapes and dtypes that the loader, the converter and the sharding rules read.

Per-layer view: the model stores its decoder layers as stacks (`stacks.{g}.block.<param>` with a
leading layer axis, see `dsv3_jax.model.LayerStack`). Checkpoint I/O (the name table, the
converter, the exporter, `save_pretrained`) works on the per-layer view `layers.{L}.<param>`:
`flat_variables` lists the model in that view (one entry per layer, the leading axis removed)
and `model_from_arrays` stacks per-layer arrays back into the stacks. `stacked_location` is the
one map between the two.

FP8 inference: `from_pretrained(path, fp8="keep")` keeps the tensors that are float8_e4m3fn in
the checkpoint (HF directory with `weight_scale_inv`, or `dsv3 convert --dtype float8`) as e4m3
weights with their 128 x 128 block scales: linears become FP8 `Linear`s (`weight` [out, in] +
`weight_scale_inv`, see `dsv3_jax.layers`), routed experts FP8 `Experts` projections. Everything
else loads as with the default `fp8="dequantize"`. The FP8 matmuls use `runtime.linear_backend`
(dense linears) and `runtime.moe_backend` (experts), with `runtime.kernel_platform`; such a
model is inference-only (gradients raise `Fp8TrainingError`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.checkpoint import (CheckpointError, HFCheckpoint, check_checkpoint, mtp_depth_present,
                                 name_table, read_targets, to_hf)
from dsv3_jax.param_tree import (Fp8Weight, locate, mtp_depth_stored, replicated_like,
                                 restore_arrays, sharding_for, stored_params, swap_last2)
from dsv3_jax.safetensors_io import save_file
from dsv3_jax.config import ModelConfig, RuntimeConfig
from dsv3_jax.layers import FP8_BLOCK, Fp8Variable, Linear, dequantize_blocks
from dsv3_jax.model import DeepseekV3
from dsv3_jax.moe import Experts
from dsv3_jax.sharding.entry import shardings_arg

__all__ = ["abstract_model", "flat_variables", "stacked_variables", "stacked_location",
           "param_shapes", "param_dtypes", "model_from_arrays",
           "from_pretrained", "save_pretrained", "ParamCount", "count_params", "FP8_MODES",
           "fp8_variables", "has_fp8_form", "load_params", "checkpoint_config"]

FP8_MODES = ("dequantize", "keep")

log = logging.getLogger(__name__)


def abstract_model(cfg: ModelConfig, rt: RuntimeConfig | None = None) -> DeepseekV3:
  """The model with jax.ShapeDtypeStruct leaves: no memory is allocated."""
  return nnx.eval_shape(lambda: DeepseekV3(cfg, rt or RuntimeConfig(), rngs=nnx.Rngs(0)))


def _path(p) -> str:
  return ".".join(str(x) for x in p)


def stacked_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
  """{"stacks.1.block.self_attn.kv_b_proj.kernel": Variable, ...}: the model's own variables."""
  return {_path(p): v for p, v in nnx.to_flat_state(nnx.state(model))}


def stacked_location(model: nnx.Module, path: str) -> tuple[str, int | None]:
  """Per-layer path -> (the model's variable path, slot in its leading layer axis or None).

  "layers.5.mlp.gate.kernel" -> ("stacks.1.block.mlp.gate.kernel", 2) for V3's stacks
  (0, 3), (3, 58); paths outside the decoder layers map to themselves with slot None.
  """
  parts = path.split(".")
  if parts[0] != "layers" or len(parts) < 3 or not parts[1].isdigit():
    return path, None
  layer = int(parts[1])
  for g, stack in enumerate(model.stacks):
    if stack.start <= layer < stack.start + stack.count:
      return ".".join(["stacks", str(g), "block", *parts[2:]]), layer - stack.start
  raise KeyError(f"{path}: layer {layer} is not in the model (num_hidden_layers="
                 f"{model.config.num_hidden_layers})")


def _slot_value(value, i: int):
  if isinstance(value, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(value.shape[1:], value.dtype)
  return value[i]


def flat_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
  """{"layers.3.self_attn.kv_b_proj.kernel": Variable, ...}: every variable in the per-layer
  view (stacked variables split into one Variable per layer, holding a slice, without the
  leading "layers" logical axis)."""
  out = {}
  for path, v in stacked_variables(model).items():
    parts = path.split(".")
    if parts[0] != "stacks":
      out[path] = v
      continue
    stack = model.stacks[int(parts[1])]
    rest = ".".join(parts[3:])
    axes = v.get_metadata().get("axes")
    meta = {} if axes is None else {"axes": tuple(axes)[1:]}
    value = v.get_value()
    for i in range(stack.count):
      out[f"layers.{stack.start + i}.{rest}"] = v.replace(_slot_value(value, i), **meta)
  # The order of a per-layer model's state: names sorted, layer/expert indices numerically.
  return dict(sorted(out.items(), key=lambda kv: tuple(
      (0, int(c), "") if c.isdigit() else (1, 0, c) for c in kv[0].split("."))))


def param_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
  return {k: tuple(v.get_value().shape) for k, v in flat_variables(model).items()}


def param_dtypes(model: nnx.Module) -> dict[str, np.dtype]:
  return {k: np.dtype(v.get_value().dtype) for k, v in flat_variables(model).items()}


def fp8_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
  """{path: variable} of the FP8 weights and scales of `model` (empty for a dense model)."""
  return {k: v for k, v in flat_variables(model).items() if isinstance(v, Fp8Variable)}


def _owner(model: nnx.Module, path: str) -> tuple[nnx.Module, str]:
  """(module, attribute name) of the variable at `path` ("layers.1.mlp.experts.up_proj")."""
  *parents, attr = path.split(".")
  obj = model
  for part in parents:
    obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
  return obj, attr


def has_fp8_form(abstract: DeepseekV3, path: str) -> bool:
  """Whether per-layer parameter `path` can be held as FP8 (a Linear kernel or a routed-expert
  projection; `dsv3_jax.param_tree.fp8_paths` names its two leaves)."""
  owner, attr = _owner(abstract, stacked_location(abstract, path)[0])
  return (isinstance(owner, Linear) and attr == "kernel") or (
      isinstance(owner, Experts) and attr in Experts.PROJECTIONS)


def _stack(values: list):
  """Stacks per-layer values on a new leading axis: numpy on the host; jax arrays on device,
  NamedSharding-ed slices giving the stacked array the same sharding with the layer axis whole."""
  if len(values) == 1 and not isinstance(values[0], jax.Array):
    return np.asarray(values[0])[None]
  if not any(isinstance(v, jax.Array) for v in values):
    return np.stack([np.asarray(v) for v in values])
  s = getattr(values[0], "sharding", None)
  if isinstance(s, jax.sharding.NamedSharding):
    out = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(None, *s.spec))
    return jax.jit(lambda *v: jnp.stack(v), out_shardings=out)(*values)
  return jnp.stack([jnp.asarray(v) for v in values])


def _gather_stacked(abstract: DeepseekV3, arrays: Mapping[str, object]) -> dict[str, object]:
  """Per-layer {path: value} -> {model variable path: value}, per-layer slots stacked.

  A stacked target whose every slot is an `Fp8Weight` becomes one stacked `Fp8Weight`; FP8
  slots mixed with dense ones are dequantised (our [..., in, out] layout)."""
  slots: dict[str, dict[int, object]] = {}
  out: dict[str, object] = {}
  for path, value in arrays.items():
    target, slot = stacked_location(abstract, path)
    if slot is None:
      out[target] = value
    else:
      slots.setdefault(target, {})[slot] = value
  counts = {f"stacks.{g}.": st.count for g, st in enumerate(abstract.stacks)}
  for target, by_slot in slots.items():
    count = next(c for pfx, c in counts.items() if target.startswith(pfx))
    if sorted(by_slot) != list(range(count)):
      missing = sorted(set(range(count)) - set(by_slot))
      raise CheckpointError(f"{target}: no value for {len(missing)} layer(s) of its stack "
                            f"(slots {missing[:5]})")
    values = [by_slot[i] for i in range(count)]
    fp8 = [isinstance(v, Fp8Weight) for v in values]
    if all(fp8):
      out[target] = Fp8Weight(_stack([v.value for v in values]),
                              _stack([v.scale_inv for v in values]), values[0].block)
      continue
    if any(fp8):
      values = [_dequant_ours(v) if isinstance(v, Fp8Weight) else v for v in values]
    out[target] = _stack(values)
  return out


def _dequant_ours(w) -> jax.Array:
  """An Fp8Weight ([..., out, in] e4m3 + scales) -> float32 in our [..., in, out] layout."""
  dense = dequantize_blocks(jnp.asarray(w.value), jnp.asarray(w.scale_inv), tuple(w.block))
  return jnp.swapaxes(dense, -1, -2)


def _use_fp8(abstract: DeepseekV3, rt: RuntimeConfig, arrays: dict[str, object]) -> dict[str, object]:
  """Turns the abstract model's FP8-capable targets whose value in `arrays` (keyed by model
  variable paths) is an FP8 weight (`dsv3_jax.param_tree.Fp8Weight`) into FP8 modules, in place;
  returns the arrays re-keyed by the new variable paths. FP8 values for other targets (e.g. a
  quantised router) are dequantised.
  """
  out = dict(arrays)
  for path, w in arrays.items():
    if not isinstance(w, Fp8Weight):
      continue
    if tuple(w.block) != FP8_BLOCK:
      raise CheckpointError(f"{path}: fp8='keep' needs {FP8_BLOCK[0]}x{FP8_BLOCK[1]} weight "
                            f"blocks (the FP8 kernels' layout), the checkpoint has "
                            f"{tuple(w.block)}; load it with fp8='dequantize'")
    owner, attr = _owner(abstract, path)
    del out[path]
    value = jax.ShapeDtypeStruct(w.value.shape, jnp.float8_e4m3fn)
    scale = jax.ShapeDtypeStruct(w.scale_inv.shape, jnp.float32)
    prefix = path[:-len(attr)]
    if isinstance(owner, Linear) and attr == "kernel":
      owner.to_fp8(value, scale, backend=rt.linear_backend, platform=rt.kernel_platform)
      names = ("weight", "weight_scale_inv")
    elif isinstance(owner, Experts) and attr in Experts.PROJECTIONS:
      names = owner.to_fp8(attr, value, scale)
    else:  # no FP8 form (e.g. the router): dequantise to our [..., in, out] layout
      out[path] = _dequant_ours(w)
      continue
    out[prefix + names[0]], out[prefix + names[1]] = w.value, w.scale_inv
  return out


def model_from_arrays(cfg: ModelConfig, rt: RuntimeConfig, arrays: Mapping[str, object],
                      ) -> DeepseekV3:
  """Builds a model whose variables are `arrays` ({per-layer path: array}, the view of
  `flat_variables`); every path must be present. Per-layer arrays are stacked into the model's
  layer stacks (sharded slices keep their sharding, see `_stack`).

  A value may also be a `dsv3_jax.param_tree.Fp8Weight` (value [..., out, in] float8_e4m3fn,
  scale_inv, block (128, 128)): that Linear kernel or routed-expert projection is then held as
  FP8 (see the module docstring); any other parameter given as FP8 is dequantised.
  """
  abstract = abstract_model(cfg, rt)
  arrays = _use_fp8(abstract, rt, _gather_stacked(abstract, arrays))
  graphdef, state = nnx.split(abstract)
  flat = nnx.to_flat_state(state)
  missing = [_path(p) for p, _ in flat if _path(p) not in arrays]
  if missing:
    raise CheckpointError(f"no value for {len(missing)} parameter(s), e.g. {missing[:5]}")
  for p, v in flat:
    a = arrays[_path(p)]
    want = v.get_value()
    if tuple(a.shape) != tuple(want.shape):
      raise CheckpointError(f"{_path(p)}: shape {tuple(a.shape)} != expected {tuple(want.shape)}")
    v.set_value(jnp.asarray(a, dtype=want.dtype))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def from_pretrained(path: str | os.PathLike, dtype=jnp.float32, *, runtime: RuntimeConfig | None = None,
                    mtp: bool | None = None, ignore_unexpected: bool = False,
                    shardings=None, fp8: str = "dequantize", mesh=None, rules=None,
                    progress: bool = False) -> DeepseekV3:
  """Loads an HF-format DeepSeek-V2/V3 checkpoint directory, one written by `dsv3 convert`, or a
  `dsv3 train` run (its latest step) or step directory (relative paths are fine).

  path: a directory with config.json and model.safetensors or model.safetensors.index.json
    (bf16/fp32 weights, or FP8 e4m3 weights with `weight_scale_inv`, dequantised on load), or a
    converted Orbax directory (`dsv3_jax.convert`; FP8 entries are dequantised on device), or a
    training run's directory / checkpoints/<step> (the same parameter tree, `dsv3_jax.param_tree`).
  shardings: where each parameter goes: {path: jax.sharding.Sharding} or a callable
    (path, abstract nnx.Variable) -> Sharding (e.g. from the variable's logical axes and a mesh);
    None = the default device. From an Orbax directory each process reads only its own shards.
  mesh / rules: the convenient form of `shardings`: every parameter goes where
    `dsv3_jax.sharding.ShardingRules` (None: the defaults) put its logical axes on `mesh` (a
    `jax.sharding.Mesh`, "fsdp=4,expert=2" or {name: size}; None with rules: every device on
    `fsdp`). Pass the same mesh to `Trainer`/`Generator`. Not together with `shardings`.
  dtype: parameter and compute dtype (overridden by `runtime` when given).
  mtp: True requires the MTP layers named by `num_nextn_predict_layers`; False skips them;
    None (default) loads them when present (transformers' save_pretrained drops them) and
    otherwise builds the model without MTP, with a warning.
  fp8: "dequantize" (default): FP8 weights become `dtype` parameters. "keep": the weights that
    are float8_e4m3fn in the checkpoint stay e4m3 with their 128 x 128 block scales (needs
    weight_block_size [128, 128]); dense layers then run `fp8_weight_matmul` and routed experts
    `grouped_matmul_fp8`, with `runtime.linear_backend` / `runtime.moe_backend` (and
    `runtime.kernel_platform`) choosing the kernels. Everything else loads as with "dequantize"
    (in `dtype`). The model is then inference-only: taking gradients through it raises
    `dsv3_jax.layers.Fp8TrainingError`; `save_pretrained` and expert parallelism are not
    supported for it.
  progress: report reading progress on stderr (per `dsv3_jax.ui`: a bar, plain lines or nothing).
  Returns a `DeepseekV3`; `m.config` is its ModelConfig and `m(tokens)` its logits.
  Raises CheckpointError naming the tensor and file for missing, unexpected or mis-shaped tensors.
  """
  path = os.path.abspath(os.fspath(path))
  if fp8 not in FP8_MODES:
    raise ValueError(f"fp8 must be one of {FP8_MODES}, got {fp8!r}")
  shardings = shardings_arg(shardings, mesh, rules)
  located = locate(path)
  if located is not None:  # Orbax partial restores of ~1 GiB, progress between them
    return load_params(located, dtype, runtime=runtime, mtp=mtp, shardings=shardings,
                       keep_fp8=fp8 == "keep", progress=progress)
  cfg = ModelConfig.from_hf_config(path)
  rt = runtime or RuntimeConfig(param_dtype=dtype, dtype=dtype)
  ckpt = HFCheckpoint(path)
  try:
    present = mtp_depth_present(ckpt, cfg)
    if mtp is False:
      ignore = {f"model.layers.{cfg.num_hidden_layers + k}." for k in range(cfg.num_nextn_predict_layers)}
      cfg = cfg.replace(num_nextn_predict_layers=0)
    elif present < cfg.num_nextn_predict_layers:
      if mtp:
        raise CheckpointError(f"{path}: config.json has num_nextn_predict_layers="
                              f"{cfg.num_nextn_predict_layers} but the checkpoint holds {present} "
                              f"MTP layer(s)")
      log.warning("%s: no MTP tensors for depth %d..%d (transformers drops them); loading without",
                  path, present + 1, cfg.num_nextn_predict_layers)
      cfg = cfg.replace(num_nextn_predict_layers=present)
    abstract = abstract_model(cfg, rt)
    shapes, dtypes = param_shapes(abstract), param_dtypes(abstract)
    table = name_table(cfg, shapes)
    if mtp is False:
      # The skipped MTP layers' tensors are expected, not unexpected.
      ckpt.drop([n for n in ckpt.names() if any(n.startswith(pfx) for pfx in ignore)])
    block = tuple(cfg.quantization_config.weight_block_size if cfg.quantization_config else (128, 128))
    check_checkpoint(ckpt, table, shapes, ignore_unexpected=ignore_unexpected)
    targets = read_targets(ckpt, table, shapes, dtypes, block=block, keep_fp8=fp8 == "keep")
    if progress:
      from dsv3_jax.ui import iterate
      targets = iterate(targets, len(shapes), "load", unit="param")
    arrays = {t: (v if s is None else Fp8Weight(v, s, block)) for t, v, s in targets}
  finally:
    ckpt.close()
  if shardings is not None:
    variables = flat_variables(abstract)
    arrays = {k: _place(a, sharding_for(shardings, k, variables[k]))
              for k, a in arrays.items()}
  return model_from_arrays(cfg, rt, arrays)


def checkpoint_config(path: str | os.PathLike) -> ModelConfig:
  """The ModelConfig `from_pretrained(path)` builds (config.json, MTP depth limited to the MTP
  layers the checkpoint holds), read without loading any weight. path: as for from_pretrained."""
  located = locate(path)
  if located is not None:
    cfg = ModelConfig.from_hf_config(located.config_dir)
    stored = stored_params(located.params_dir)
    present = mtp_depth_stored(stored)
  else:
    cfg = ModelConfig.from_hf_config(path)
    ckpt = HFCheckpoint(path)
    try:
      present = mtp_depth_present(ckpt, cfg)
    finally:
      ckpt.close()
  return cfg.replace(num_nextn_predict_layers=min(present, cfg.num_nextn_predict_layers))


def load_params(located, dtype=jnp.float32, *, runtime: RuntimeConfig | None = None,
                mtp: bool | None = None, shardings=None, keep_fp8: bool = False,
                progress: bool = False) -> DeepseekV3:
  """`from_pretrained` for a parameter tree (`dsv3_jax.param_tree.locate`: a converted
  directory, a training run or step): config.json from `located.config_dir`, each parameter
  restored straight into its sharding (each process reads only its own shards), the layers
  stacked on device. keep_fp8: FP8 leaves stay e4m3 + block scales (fp8="keep"). progress:
  report the bytes restored (see `restore_arrays`)."""
  cfg = ModelConfig.from_hf_config(located.config_dir)
  rt = runtime or RuntimeConfig(param_dtype=dtype, dtype=dtype)
  stored = stored_params(located.params_dir)
  present = mtp_depth_stored(stored)
  if mtp is False:
    cfg = cfg.replace(num_nextn_predict_layers=0)
  elif present < cfg.num_nextn_predict_layers:
    if mtp:
      raise ValueError(f"{located.config_dir}: config.json has num_nextn_predict_layers="
                       f"{cfg.num_nextn_predict_layers} but the checkpoint holds {present}")
    log.warning("%s: checkpoint holds %d of %d MTP layer(s); loading without the rest",
                located.config_dir, present, cfg.num_nextn_predict_layers)
    cfg = cfg.replace(num_nextn_predict_layers=present)
  fp8 = (located.manifest or {}).get("fp8") or {}
  block = tuple(fp8.get("weight_block_size") or (128, 128))
  abstract = flat_variables(abstract_model(cfg, rt))
  arrays = restore_arrays(located.params_dir, abstract, shardings=shardings, keep_fp8=keep_fp8,
                          block=block, progress=progress)
  return model_from_arrays(cfg, rt, arrays)


def _place(a, sharding):
  """device_put of an array, or of an Fp8Weight (value: the sharding with its last two axes
  swapped, [out, in] being our [in, out] transposed; scales replicated)."""
  if isinstance(a, Fp8Weight):
    return Fp8Weight(jax.device_put(a.value, swap_last2(sharding, a.value.ndim)),
                     jax.device_put(a.scale_inv, replicated_like(sharding)), a.block)
  return jax.device_put(a, sharding)


def save_pretrained(model: DeepseekV3, path: str | os.PathLike, *, dtype=None,
                    max_shard_bytes: int = 4 << 30) -> None:
  """Writes `model` as an HF-format checkpoint (official tensor names, [out, in] weights,
  per-expert tensors, the MTP layers with their embedding/head copies) plus config.json.

  dtype: storage dtype (default: the parameters' own); the router bias stays float32.
  Shards of at most `max_shard_bytes` with model.safetensors.index.json when more than one.
  The directory must not exist or be empty; files appear only once fully written.
  """
  path = os.fspath(path)
  if fp8_variables(model):
    raise ValueError("save_pretrained: this model holds FP8 weights (from_pretrained(fp8='keep')); "
                     "export the FP8 checkpoint with `dsv3 export` from a converted directory, or "
                     "load it with fp8='dequantize' first")
  os.makedirs(path, exist_ok=True)
  if os.listdir(path):
    raise FileExistsError(f"{path}: directory is not empty")
  cfg = model.config
  values = {k: v.get_value() for k, v in flat_variables(model).items()}
  table = name_table(cfg, {k: v.shape for k, v in values.items()})
  shards, current, size = [], [], 0
  for name, entry in table.items():
    x = np.asarray(to_hf(entry, np.asarray(values[entry.target])))
    if dtype is not None and not entry.target.endswith("e_score_correction_bias"):
      x = x.astype(np.dtype(dtype))
    if current and size + x.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append((name, np.ascontiguousarray(x)))
    size += x.nbytes
  shards.append(current)
  files = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  for file, tensors in zip(files, shards):
    save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
  if len(shards) > 1:
    weight_map = {n: f for f, tensors in zip(files, shards) for n, _ in tensors}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg.to_hf_config(), f, indent=1)


@dataclasses.dataclass(frozen=True)
class ParamCount:
  """Parameter counts. `activated` counts what one token uses: everything except the routed
  experts it is not sent to (embedding and head included, as DeepSeek reports 37B)."""

  total: int
  activated: int
  mtp: int
  mtp_activated: int

  @property
  def total_with_mtp(self) -> int:
    return self.total + self.mtp


def count_params(cfg: ModelConfig) -> ParamCount:
  """Counts parameters from the abstract model (nothing allocated); router bias excluded."""
  shapes = {k: v for k, v in flat_variables(abstract_model(cfg)).items() if isinstance(v, nnx.Param)}
  total = mtp = inactive = mtp_inactive = 0
  unused = (cfg.n_routed_experts - cfg.num_experts_per_tok) / max(cfg.n_routed_experts, 1)
  for path, v in shapes.items():
    n = int(np.prod(v.get_value().shape))
    idle = int(round(n * unused)) if ".mlp.experts." in path else 0
    if path.startswith("mtp."):
      mtp, mtp_inactive = mtp + n, mtp_inactive + idle
    else:
      total, inactive = total + n, inactive + idle
  return ParamCount(total=total, activated=total - inactive, mtp=mtp,
                    mtp_activated=mtp - mtp_inactive)
