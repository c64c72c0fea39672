"""The HF checkpoint <-> parameter-tree name table, and the engine that applies it.

One declarative table (`BLOCK_RULES`, `TOP_RULES`, `MTP_RULES`) maps official tensor names to
parameter paths of `DeepseekV3`. `name_table(cfg, shapes)` expands it over layers and experts,
keeping the rules whose target exists in the abstract model; the loader, the converter and the
exporter all use that expansion. The engine checks that every source tensor matches exactly one
entry, every target is filled exactly once, and every shape equals the abstract shape.

Layouts: a checkpoint linear weight is [out, in]; ours is [in, out] ("linear" rules transpose).
Routed experts are stacked: entry {E} of [n_experts, in, out]. FP8 tensors (float8_e4m3fn with a
float32 `<name>_scale_inv` of [ceil(out/128), ceil(in/128)]) are dequantised on read.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import UserError
from dsv3_jax.safetensors_io import SafetensorsError, SafetensorsFile

__all__ = ["Rule", "Entry", "BLOCK_RULES", "TOP_RULES", "MTP_RULES", "name_table", "HFCheckpoint",
           "CheckpointError", "dequantize_fp8", "read_targets", "hf_shape",
           "to_hf", "SCALE_SUFFIX", "check_checkpoint", "mtp_depth_present",
           "TOKENIZER_FILES"]

SCALE_SUFFIX = "_scale_inv"
# Files beside the weights that travel with a checkpoint (convert, export, train --init).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "generation_config.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "added_tokens.json")
_E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
_FP8 = (_E4M3, np.dtype(ml_dtypes.float8_e5m2))


class CheckpointError(ValueError, UserError):
  """A checkpoint does not match the model (the message names the tensor and the file)."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """hf -> ours. kind: "copy" | "linear" (transpose) | "expert" (transpose into slot {E}) |
  "tied" (a stored copy of another parameter, `ours`, checked equal; "tied_linear" transposes)."""

  hf: str
  ours: str
  kind: str


# Relative to a decoder block: model.layers.{L}. -> layers.{L}. (or mtp.{k}.block. for MTP).
BLOCK_RULES = (
    Rule("input_layernorm.weight", "input_layernorm.weight", "copy"),
    Rule("post_attention_layernorm.weight", "post_attention_layernorm.weight", "copy"),
    Rule("self_attn.q_proj.weight", "self_attn.q_proj.kernel", "linear"),
    Rule("self_attn.q_a_proj.weight", "self_attn.q_a_proj.kernel", "linear"),
    Rule("self_attn.q_a_layernorm.weight", "self_attn.q_a_layernorm.weight", "copy"),
    Rule("self_attn.q_b_proj.weight", "self_attn.q_b_proj.kernel", "linear"),
    Rule("self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_a_proj_with_mqa.kernel", "linear"),
    Rule("self_attn.kv_a_layernorm.weight", "self_attn.kv_a_layernorm.weight", "copy"),
    Rule("self_attn.kv_b_proj.weight", "self_attn.kv_b_proj.kernel", "linear"),
    Rule("self_attn.o_proj.weight", "self_attn.o_proj.kernel", "linear"),
    Rule("mlp.gate_proj.weight", "mlp.gate_proj.kernel", "linear"),
    Rule("mlp.up_proj.weight", "mlp.up_proj.kernel", "linear"),
    Rule("mlp.down_proj.weight", "mlp.down_proj.kernel", "linear"),
    Rule("mlp.gate.weight", "mlp.gate.kernel", "linear"),
    Rule("mlp.gate.e_score_correction_bias", "mlp.gate.e_score_correction_bias", "copy"),
    Rule("mlp.experts.{E}.gate_proj.weight", "mlp.experts.gate_proj", "expert"),
    Rule("mlp.experts.{E}.up_proj.weight", "mlp.experts.up_proj", "expert"),
    Rule("mlp.experts.{E}.down_proj.weight", "mlp.experts.down_proj", "expert"),
    Rule("mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.gate_proj.kernel", "linear"),
    Rule("mlp.shared_experts.up_proj.weight", "mlp.shared_experts.up_proj.kernel", "linear"),
    Rule("mlp.shared_experts.down_proj.weight", "mlp.shared_experts.down_proj.kernel", "linear"),
)
TOP_RULES = (
    Rule("model.embed_tokens.weight", "embed_tokens", "copy"),
    Rule("model.norm.weight", "norm.weight", "copy"),
    Rule("lm_head.weight", "lm_head.kernel", "linear"),
)
# Relative to model.layers.{num_hidden_layers + k}. -> mtp.{k}.
MTP_RULES = (
    Rule("enorm.weight", "enorm.weight", "copy"),
    Rule("hnorm.weight", "hnorm.weight", "copy"),
    Rule("eh_proj.weight", "eh_proj.kernel", "linear"),
    Rule("shared_head.norm.weight", "shared_head_norm.weight", "copy"),
    Rule("embed_tokens.weight", "embed_tokens", "tied"),
    Rule("shared_head.head.weight", "lm_head.kernel", "tied_linear"),
)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One source tensor: where it goes (`target`, slot `expert` for stacked experts) and how."""

  target: str
  kind: str
  expert: int | None = None


def name_table(cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Entry]:
  """Expands the rules to {hf_name: Entry} for the parameters present in `shapes`.

  shapes: {parameter path: shape} of the abstract model (e.g. from `dsv3_jax.param_shapes`).
  """
  table: dict[str, Entry] = {}

  def add(hf_prefix, ours_prefix, rules):
    for r in rules:
      target = r.ours if r.kind.startswith("tied") else ours_prefix + r.ours
      if target not in shapes:
        continue
      if r.kind == "expert":
        for e in range(shapes[target][0]):
          table[hf_prefix + r.hf.format(E=e)] = Entry(target, r.kind, e)
      else:
        table[hf_prefix + r.hf] = Entry(target, r.kind)

  add("", "", TOP_RULES)
  for layer in range(cfg.num_hidden_layers):
    add(f"model.layers.{layer}.", f"layers.{layer}.", BLOCK_RULES)
  for k in range(cfg.num_nextn_predict_layers):
    if f"mtp.{k}.enorm.weight" not in shapes:
      continue
    hf = f"model.layers.{cfg.num_hidden_layers + k}."
    add(hf, f"mtp.{k}.block.", BLOCK_RULES)
    add(hf, f"mtp.{k}.", MTP_RULES)
  return table


def hf_shape(entry: Entry, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The checkpoint shape of a source tensor whose target has abstract `shape`."""
  if entry.kind in ("linear", "tied_linear"):
    return shape[::-1]
  if entry.kind == "expert":
    return shape[1:][::-1]
  return tuple(shape)


def to_hf(entry: Entry, value: np.ndarray) -> np.ndarray:
  """Our tensor (the full target, or for experts the whole stack) -> the checkpoint tensor."""
  if entry.kind == "expert":
    value = value[entry.expert]
  return value.T if entry.kind in ("linear", "tied_linear", "expert") else value


def dequantize_fp8(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = (128, 128),
                   name: str = "") -> np.ndarray:
  """w[..., m, n] * scale_inv[..., m // bm, n // bn] in float32 (partial edge blocks allowed;
  leading dims: a stack of weights)."""
  bm, bn = block
  m, n = w.shape[-2:]
  want = tuple(w.shape[:-2]) + (-(-m // bm), -(-n // bn))
  if scale_inv.shape != want:
    raise CheckpointError(f"{name}{SCALE_SUFFIX}: shape {scale_inv.shape} does not fit weight "
                          f"{w.shape} with {bm}x{bn} blocks (expected {want})")
  s = np.repeat(np.repeat(scale_inv.astype(np.float32), bm, -2), bn, -1)[..., :m, :n]
  return w.astype(np.float32) * s


class HFCheckpoint:
  """An HF-format directory: config.json + model.safetensors or an index.json with shards."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    if not os.path.isdir(self.path):
      raise FileNotFoundError(f"{self.path}: not a directory")
    index = os.path.join(self.path, "model.safetensors.index.json")
    single = os.path.join(self.path, "model.safetensors")
    self._files: dict[str, SafetensorsFile] = {}
    if os.path.exists(index):
      with open(index) as f:
        try:
          weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
          raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
      self._location = dict(weight_map)
      for file in sorted(set(weight_map.values())):
        if not os.path.isfile(os.path.join(self.path, file)):
          first = next(n for n, fl in weight_map.items() if fl == file)
          raise CheckpointError(f"{index}: shard {file} is missing from {self.path} "
                                f"(it holds {first!r} among others)")
    elif os.path.exists(single):
      self._location = {n: "model.safetensors" for n in self._open("model.safetensors").keys()}
    else:
      raise CheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json")

  def _open(self, file: str) -> SafetensorsFile:
    if file not in self._files:
      self._files[file] = SafetensorsFile(os.path.join(self.path, file))
    return self._files[file]

  def names(self) -> list[str]:
    return list(self._location)

  def drop(self, names) -> None:
    """Forgets the tensors `names` and their FP8 `_scale_inv`s (tensors that are there but not
    to be loaded, e.g. skipped MTP layers): later checks and reads treat them as absent."""
    for n in list(names):
      self._location.pop(n, None)
      self._location.pop(n + SCALE_SUFFIX, None)

  def shard(self, name: str) -> SafetensorsFile:
    """The opened shard that holds tensor `name` (header parsed, no tensor data read), for
    shape/dtype/nbytes checks. Raises CheckpointError naming the file when it is not there."""
    if name not in self._location:
      raise CheckpointError(f"{self.path}: tensor {name!r} is not in the checkpoint")
    f = self._open(self._location[name])
    if name not in f:
      raise CheckpointError(f"{f.path}: the index says it holds {name!r}, but it does not")
    return f

  def __contains__(self, name: str) -> bool:
    return name in self._location

  def file_of(self, name: str) -> str:
    return os.path.join(self.path, self._location[name])

  def raw(self, name: str) -> np.ndarray:
    """The stored tensor (memory-mapped), or a CheckpointError naming the file."""
    return self.shard(name)[name]

  def read(self, name: str, block: tuple[int, int] = (128, 128)) -> np.ndarray:
    """The tensor as float32/bf16/..., FP8 weights dequantised with their `_scale_inv`."""
    w = self.raw(name)
    scale = name + SCALE_SUFFIX
    if w.dtype == np.dtype(ml_dtypes.float8_e4m3fn) or w.dtype == np.dtype(ml_dtypes.float8_e5m2):
      if scale not in self._location:
        raise CheckpointError(f"{self.file_of(name)}: FP8 tensor {name!r} has no {scale!r}")
      return dequantize_fp8(w, np.asarray(self.raw(scale)), block, name)
    if scale in self._location:
      raise CheckpointError(f"{self.file_of(scale)}: {scale!r} given for non-FP8 tensor {name!r} "
                            f"({w.dtype})")
    return w

  def close(self):
    for f in self._files.values():
      f.close()
    self._files.clear()


def mtp_depth_present(ckpt: HFCheckpoint, cfg: ModelConfig) -> int:
  """How many of the config's MTP layers (checkpoint index num_hidden_layers + k) are stored."""
  prefixes = [f"model.layers.{cfg.num_hidden_layers + k}." for k in range(cfg.num_nextn_predict_layers)]
  names = ckpt.names()
  depth = 0
  while depth < len(prefixes) and any(n.startswith(prefixes[depth]) for n in names):
    depth += 1
  return depth


def check_checkpoint(ckpt: HFCheckpoint, table: Mapping[str, Entry],
                     shapes: Mapping[str, tuple[int, ...]], *, ignore_unexpected: bool = False,
                     ) -> int:
  """Checks names, shapes and FP8 scales from the shard headers alone (no tensor data read).

  Opens every shard (a missing, truncated or corrupt file fails here: SafetensorsError naming
  it), and raises CheckpointError naming the tensor and file for: an unexpected name (unless
  `ignore_unexpected`: then it is dropped from `ckpt`), a scale without its weight, a tensor
  missing from the checkpoint or from its shard, a shape that contradicts config.json, an FP8
  weight without `_scale_inv`. Returns the bytes to be read.
  """
  names = set(ckpt.names())
  scales = {n for n in names if n.endswith(SCALE_SUFFIX)}
  unexpected = sorted(names - scales - set(table))
  if unexpected and not ignore_unexpected:
    raise CheckpointError(f"{len(unexpected)} unexpected tensor(s) in {ckpt.path}, e.g. "
                          + ", ".join(f"{n!r} ({ckpt.file_of(n)})" for n in unexpected[:5])
                          + " (pass --ignore-unexpected / ignore_unexpected=True to skip them)")
  ckpt.drop(unexpected)
  names = set(ckpt.names())
  for s in sorted(n for n in names if n.endswith(SCALE_SUFFIX)):
    if s[:-len(SCALE_SUFFIX)] not in names:
      raise CheckpointError(f"{ckpt.file_of(s)}: scale {s!r} has no weight "
                            f"{s[:-len(SCALE_SUFFIX)]!r}")
  missing = sorted(n for n in table if n not in names)
  if missing:
    raise CheckpointError(f"{len(missing)} tensor(s) the model needs are missing from "
                          f"{ckpt.path}, e.g. " + ", ".join(repr(n) for n in missing[:5]))
  total = 0
  for name, e in table.items():
    try:
      f = ckpt.shard(name)
    except SafetensorsError as err:
      raise SafetensorsError(f"{err} (while reading {name!r})") from None
    got, want = tuple(f.shape(name)), hf_shape(e, tuple(shapes[e.target]))
    if got != want:
      raise CheckpointError(f"{f.path}: tensor {name!r} has shape {got}, config.json implies {want}")
    total += f.nbytes(name)
    scale = name + SCALE_SUFFIX
    if f.dtype(name) in _FP8:
      if scale not in names:
        raise CheckpointError(f"{f.path}: FP8 tensor {name!r} has no {scale!r}")
    if scale in names:
      total += ckpt.shard(scale).nbytes(scale)
  ckpt.close()
  return total


def read_targets(ckpt: HFCheckpoint, table: Mapping[str, Entry],
                 shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, np.dtype], *,
                 block: tuple[int, int] = (128, 128), keep_fp8: bool = False,
                 skip: frozenset[str] = frozenset(),
                 ) -> Iterator[tuple[str, np.ndarray, np.ndarray | None]]:
  """The one reading engine (loader and converter): yields (parameter path, value, scale_inv),
  one target at a time (routed experts stacked), after `check_checkpoint` passed:
    - keep_fp8 and a target whose source tensors are float8_e4m3fn with scales (linear and
      routed-expert weights): value [..., out, in] e4m3 (the checkpoint layout),
      scale_inv [..., ceil(out/bm), ceil(in/bn)] float32;
    - otherwise: value in our layout and abstract dtype (`dtypes`), FP8 blocks dequantised,
      scale_inv None.
  Stored MTP copies ("tied") are compared with the main tensors at the end (CheckpointError
  naming the file when they differ). Targets in `skip` (already written by a resumed
  conversion) are not yielded, nor read unless a stored copy is checked against them.
  """
  by_target: dict[str, list[tuple[str, Entry]]] = {}
  copies = [(n, e) for n, e in table.items() if e.kind.startswith("tied")]
  for name, e in table.items():
    if not e.kind.startswith("tied"):
      by_target.setdefault(e.target, []).append((name, e))
  keep = {e.target: None for _, e in copies}
  for target, sources in by_target.items():
    if target in skip and target not in keep:
      continue
    shape, dtype = tuple(shapes[target]), np.dtype(dtypes[target])
    quantized = [keep_fp8 and ckpt.raw(n).dtype == _E4M3 and sources[0][1].kind in ("linear", "expert")
                 for n, _ in sources]
    if all(quantized):
      value, scale = _read_quantized(ckpt, sources, shape, block)
      if target in keep:
        keep[target] = _dequant_ours(value, scale, block).astype(dtype)
      if target not in skip:
        yield target, value, scale
      continue
    if any(quantized):
      raise CheckpointError(f"{target}: some of its source tensors are FP8 and some are not "
                            f"(e.g. {sources[quantized.index(False)][0]!r} is not)")
    out = _read_plain(ckpt, sources, shape, dtype, block)
    if target in keep:
      keep[target] = out
    if target not in skip:
      yield target, out, None
  for name, e in copies:
    x = ckpt.read(name, block)
    x = (x.T if e.kind == "tied_linear" else x).astype(dtypes[e.target])
    if not np.array_equal(x, keep[e.target]):
      raise CheckpointError(f"{ckpt.file_of(name)}: {name!r} should be a copy of the main model's "
                            f"{e.target!r} (shared in this implementation) but differs")


def _read_plain(ckpt, sources, shape, dtype, block):
  """One target in our layout and `dtype` (FP8 sources other than e4m3 weights dequantised)."""
  def ours(name, e):
    x = ckpt.read(name, block)
    return x.T if e.kind in ("linear", "tied_linear", "expert") else x
  if sources[0][1].kind == "expert":
    out = np.empty(shape, dtype)
    for name, e in sources:
      out[e.expert] = ours(name, e)
    return out
  (name, e), = sources
  x = np.asarray(ours(name, e))
  return x if x.dtype == dtype else x.astype(dtype)


def _read_quantized(ckpt, sources, shape, block):
  """Stacks the e4m3 values and scales of one target in the checkpoint layout."""
  bm, bn = block
  e0 = sources[0][1]
  hf = hf_shape(e0, shape)
  sshape = (-(-hf[0] // bm), -(-hf[1] // bn))
  lead = (shape[0],) if e0.kind == "expert" else ()
  value = np.empty(lead + hf, _E4M3)
  scale = np.empty(lead + sshape, np.float32)
  for name, e in sources:
    w, s = ckpt.raw(name), ckpt.raw(name + SCALE_SUFFIX)
    if tuple(s.shape) != sshape:
      raise CheckpointError(f"{ckpt.file_of(name + SCALE_SUFFIX)}: {name + SCALE_SUFFIX!r} has "
                            f"shape {tuple(s.shape)}, weight {hf} with {bm}x{bn} blocks needs {sshape}")
    idx = (e.expert,) if e.kind == "expert" else ()
    value[idx] = w
    scale[idx] = s.astype(np.float32)
  if e0.kind == "expert" and len(sources) != shape[0]:
    raise CheckpointError(f"{e0.target}: {len(sources)} expert tensors for {shape[0]} experts")
  return value, scale


def _dequant_ours(value, scale, block):
  """FP8 [..., out, in] + block scales -> float32 in our [..., in, out] layout."""
  return np.swapaxes(dequantize_fp8(value, scale, block), -1, -2)
