"""Model configuration: one flat frozen dataclass with the HF/DeepSeek field names.

`ModelConfig.from_hf_config` reads a checkpoint's `config.json` (both the official DeepSeek layout,
with `rope_theta` + `rope_scaling`, and transformers' newer `rope_parameters`). Values the
architecture cannot honour are errors, never silent defaults. Runtime choices (dtypes, kernel
backends, remat) live in `RuntimeConfig`; the mesh lives in neither.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax.numpy as jnp

from dsv3_jax.errors import ConfigError, UserError
from dsv3_jax.kernels_pallas.backend import GPU_FLAVORS, Backend, KernelRequestError

__all__ = ["YarnScaling", "Fp8Quantization", "ModelConfig", "RuntimeConfig", "PRESETS", "TINY",
           "DEEPSEEK_V3", "get_preset", "ConfigError", "ConfigNotFoundError"]

SCORING_FUNCS = ("sigmoid", "softmax")
# greedy: plain top-k; group_limited_greedy: V2 groups scored by their max;
# noaux_tc: V3 groups scored by the sum of their top-2, with the selection bias.
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")

# Field types checked before any comparison, so a config.json with "hidden_size": "7168" says so
# instead of failing inside a comparison. (None is allowed where the field is Optional.)
_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
               "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
               "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts",
               "num_experts_per_tok", "n_group", "topk_group", "first_k_dense_replace",
               "moe_layer_freq", "max_position_embeddings", "num_nextn_predict_layers")
_OPTIONAL_INT_FIELDS = ("q_lora_rank", "bos_token_id")
_FLOAT_FIELDS = ("routed_scaling_factor", "rms_norm_eps", "rope_theta")
_STR_FIELDS = ("scoring_func", "topk_method", "model_type", "hidden_act")
_BOOL_FIELDS = ("norm_topk_prob", "tie_word_embeddings", "attention_bias")


class ConfigNotFoundError(UserError, FileNotFoundError):
  """No config.json where one was expected (a FileNotFoundError too, for existing callers)."""


def _type_name(v) -> str:
  return "null" if v is None else type(v).__name__


def _check_types(values: dict[str, Any]) -> None:
  """Raises ConfigError naming the field, the expected type and the value found."""
  def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)

  for name, v in values.items():
    if name in _INT_FIELDS or name in _OPTIONAL_INT_FIELDS:
      ok, want = is_int(v) or (v is None and name in _OPTIONAL_INT_FIELDS), "an integer"
    elif name in _FLOAT_FIELDS:
      ok, want = is_int(v) or isinstance(v, float), "a number"
    elif name in _STR_FIELDS:
      ok, want = isinstance(v, str), "a string"
    elif name in _BOOL_FIELDS:
      ok, want = isinstance(v, bool), "true or false"
    elif name == "eos_token_id":
      ok, want = (v is None or is_int(v) or (isinstance(v, (list, tuple)) and all(map(is_int, v))),
                  "an integer or a list of integers")
    else:
      continue
    if not ok:
      raise ConfigError(f"field {name!r} must be {want}, got {v!r} ({_type_name(v)})")


@dataclasses.dataclass(frozen=True)
class YarnScaling:
  """YaRN rope scaling (the only rope scaling DeepSeek models use)."""

  factor: float
  original_max_position_embeddings: int
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float | None = None
  mscale_all_dim: float | None = None
  attention_factor: float | None = None
  truncate: bool = True

  @property
  def rope_mscale(self) -> float:
    """The factor cos/sin are multiplied by (1.0 for DeepSeek-V3, whose mscale == mscale_all_dim)."""
    if self.attention_factor is not None:
      return float(self.attention_factor)
    if self.mscale and self.mscale_all_dim:
      return yarn_get_mscale(self.factor, self.mscale) / yarn_get_mscale(self.factor, self.mscale_all_dim)
    return yarn_get_mscale(self.factor)


@dataclasses.dataclass(frozen=True)
class Fp8Quantization:
  """`quantization_config` of the official FP8 checkpoints."""

  fmt: str = "e4m3"
  weight_block_size: tuple[int, int] = (128, 128)
  scale_fmt: str | None = None  # "ue8m0" (power-of-two scales) for V3.1


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyper-parameters, named as in HF `DeepseekV3Config`."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  moe_intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  q_lora_rank: int | None
  kv_lora_rank: int
  qk_nope_head_dim: int
  qk_rope_head_dim: int
  v_head_dim: int
  n_routed_experts: int
  n_shared_experts: int
  num_experts_per_tok: int
  n_group: int = 1
  topk_group: int = 1
  routed_scaling_factor: float = 1.0
  scoring_func: str = "sigmoid"
  topk_method: str = "noaux_tc"
  norm_topk_prob: bool = True
  first_k_dense_replace: int = 0
  moe_layer_freq: int = 1
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: YarnScaling | None = None
  max_position_embeddings: int = 4096
  num_nextn_predict_layers: int = 0
  tie_word_embeddings: bool = False
  quantization_config: Fp8Quantization | None = None
  bos_token_id: int | None = 0
  eos_token_id: int | tuple[int, ...] | None = 1

  def __post_init__(self):
    def need(cond, msg):
      if not cond:
        raise ConfigError(f"invalid ModelConfig: {msg}")

    _check_types({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
      need(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
    need(self.qk_rope_head_dim % 2 == 0,
         f"qk_rope_head_dim must be even (rope rotates pairs), got {self.qk_rope_head_dim}")
    need(self.q_lora_rank is None or self.q_lora_rank > 0,
         f"q_lora_rank must be null or > 0, got {self.q_lora_rank}")
    need(self.scoring_func in SCORING_FUNCS,
         f"scoring_func {self.scoring_func!r} is not one of {SCORING_FUNCS}")
    need(self.topk_method in TOPK_METHODS,
         f"topk_method {self.topk_method!r} is not one of {TOPK_METHODS}")
    need(self.moe_layer_freq >= 1, f"moe_layer_freq must be >= 1, got {self.moe_layer_freq}")
    need(0 <= self.first_k_dense_replace, "first_k_dense_replace must be >= 0")
    need(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers must be >= 0")
    if self.n_routed_experts:
      need(self.moe_intermediate_size > 0, "moe_intermediate_size must be > 0")
      need(0 < self.num_experts_per_tok <= self.n_routed_experts,
           f"num_experts_per_tok={self.num_experts_per_tok} must be in "
           f"[1, n_routed_experts={self.n_routed_experts}]")
      need(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0,
           f"n_routed_experts={self.n_routed_experts} must be divisible by n_group={self.n_group}")
      need(1 <= self.topk_group <= self.n_group,
           f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
      if self.topk_method != "greedy":
        per_group = self.n_routed_experts // self.n_group
        need(self.topk_group * per_group >= self.num_experts_per_tok,
             f"topk_group={self.topk_group} groups of {per_group} experts cannot hold "
             f"num_experts_per_tok={self.num_experts_per_tok} experts")
        if self.topk_method == "noaux_tc":
          need(per_group >= 2, "noaux_tc scores a group by its top-2 experts: need >= 2 per group")
    if self.tie_word_embeddings:
      raise ConfigError("tie_word_embeddings=true is not supported: DeepSeek-V3 has an untied "
                       "lm_head (the architecture reads lm_head.weight)")

  # Derived quantities -------------------------------------------------------------------------
  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def uses_router_bias(self) -> bool:
    """The aux-loss-free selection bias (`e_score_correction_bias`) exists for noaux_tc."""
    return self.topk_method == "noaux_tc"

  def is_moe_layer(self, layer: int) -> bool:
    """Whether decoder layer `layer` (MTP blocks included, index >= num_hidden_layers) is MoE."""
    return (self.n_routed_experts > 0 and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0)

  @property
  def softmax_scale(self) -> float:
    scale = self.qk_head_dim ** -0.5
    y = self.rope_scaling
    if y is not None and y.mscale_all_dim:
      m = yarn_get_mscale(y.factor, y.mscale_all_dim)
      scale = scale * m * m
    return scale

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  # HF config.json ------------------------------------------------------------------------------
  @classmethod
  def from_hf_config(cls, source: str | os.PathLike | dict[str, Any]) -> "ModelConfig":
    """Builds a config from a `config.json` path, a checkpoint directory or a parsed dict."""
    if isinstance(source, dict):
      raw, where = dict(source), "config dict"
    else:
      path = os.fspath(source)
      if os.path.isdir(path):
        path = os.path.join(path, "config.json")
      if not os.path.exists(path):
        raise ConfigNotFoundError(f"no config.json at {path}")
      with open(path) as f:
        text = f.read()
      try:
        raw = json.loads(text)
      except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: "
                          f"{e.msg}") from None
      if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {_type_name(raw)}")
      where = path
    try:
      return cls._from_dict(raw)
    except KeyError as e:
      raise ConfigError(f"{where}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
      msg = str(e).removeprefix("invalid ModelConfig: ")
      raise ConfigError(f"{where}: {msg}") from e

  @classmethod
  def _from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
    _check_types({k: v for k, v in raw.items() if v is not None})  # null: see __post_init__
    model_type = raw.get("model_type", "deepseek_v3")
    if model_type not in ("deepseek_v3", "deepseek_v2", "deepseek_v32", "kimi_k2"):
      raise ValueError(f"model_type {model_type!r} is not a DeepSeek-V2/V3-architecture model")
    v2 = model_type == "deepseek_v2"
    act = raw.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"hidden_act {act!r} is not supported (DeepSeek uses 'silu')")
    if raw.get("attention_bias", False):
      raise ValueError("attention_bias=true is not supported (DeepSeek projections have no bias)")
    if raw.get("n_routed_experts") is None:
      raise ValueError("n_routed_experts is missing: a dense-only config is not a DeepSeek MoE model")
    kv_heads = raw.get("num_key_value_heads")
    if kv_heads is not None and kv_heads != raw.get("num_attention_heads"):
      raise ValueError(f"num_key_value_heads={kv_heads} differs from num_attention_heads="
                       f"{raw.get('num_attention_heads')}: MLA has one key/value per query head")
    rope_theta, rope_scaling = _parse_rope(raw)
    eos = raw.get("eos_token_id", 1)
    return cls(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        moe_intermediate_size=raw["moe_intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=raw["num_attention_heads"],
        q_lora_rank=raw.get("q_lora_rank"),
        kv_lora_rank=raw["kv_lora_rank"],
        qk_nope_head_dim=raw["qk_nope_head_dim"],
        qk_rope_head_dim=raw["qk_rope_head_dim"],
        v_head_dim=raw["v_head_dim"],
        n_routed_experts=raw["n_routed_experts"],
        n_shared_experts=raw.get("n_shared_experts") or 0,
        num_experts_per_tok=raw["num_experts_per_tok"],
        n_group=raw.get("n_group") or 1,
        topk_group=raw.get("topk_group") or 1,
        routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
        scoring_func=raw.get("scoring_func", "softmax" if v2 else "sigmoid"),
        topk_method=raw.get("topk_method", "greedy" if v2 else "noaux_tc"),
        norm_topk_prob=bool(raw.get("norm_topk_prob", not v2)),
        first_k_dense_replace=raw.get("first_k_dense_replace") or 0,
        moe_layer_freq=raw.get("moe_layer_freq") or 1,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        num_nextn_predict_layers=raw.get("num_nextn_predict_layers", raw.get("num_mtp_layers", 0)) or 0,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        quantization_config=_parse_quant(raw.get("quantization_config")),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
    )

  def to_hf_config(self) -> dict[str, Any]:
    """The `config.json` dict (official field names) that `from_hf_config` reads back."""
    out: dict[str, Any] = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
                           "hidden_act": "silu", "attention_bias": False,
                           "num_key_value_heads": self.num_attention_heads}
    for f in dataclasses.fields(self):
      if f.name in ("rope_scaling", "quantization_config"):
        continue
      v = getattr(self, f.name)
      out[f.name] = list(v) if isinstance(v, tuple) else v
    if self.rope_scaling is not None:
      d = {k: v for k, v in dataclasses.asdict(self.rope_scaling).items() if v is not None}
      out["rope_scaling"] = {"type": "yarn", **d}
    if self.quantization_config is not None:
      q = self.quantization_config
      out["quantization_config"] = {"quant_method": "fp8", "fmt": q.fmt, "activation_scheme": "dynamic",
                                    "weight_block_size": list(q.weight_block_size)}
      if q.scale_fmt:
        out["quantization_config"]["scale_fmt"] = q.scale_fmt
    return out


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
  if scale <= 1:
    return 1.0
  return 0.1 * mscale * math.log(scale) + 1.0


def _parse_rope(raw: dict[str, Any]) -> tuple[float, YarnScaling | None]:
  params = raw.get("rope_parameters")
  scaling = raw.get("rope_scaling")
  if params and any(isinstance(v, dict) for v in params.values()):
    raise ValueError("per-layer-type rope_parameters are not supported by this architecture")
  spec = dict(scaling or params or {})
  theta = float(spec.get("rope_theta", raw.get("rope_theta", 10000.0)))
  rope_type = spec.get("rope_type", spec.get("type", "default"))
  if rope_type == "default" or not spec or rope_type is None:
    return theta, None
  if rope_type != "yarn":
    raise ValueError(f"rope type {rope_type!r} is not supported (DeepSeek uses 'yarn' or none)")
  orig = spec.get("original_max_position_embeddings", raw.get("original_max_position_embeddings"))
  if orig is None:
    orig = raw.get("max_position_embeddings", 4096)
  factor = spec.get("factor")
  if factor is None:
    factor = raw["max_position_embeddings"] / orig
  return theta, YarnScaling(
      factor=float(factor), original_max_position_embeddings=int(orig),
      beta_fast=float(spec.get("beta_fast") or 32), beta_slow=float(spec.get("beta_slow") or 1),
      mscale=_opt_float(spec.get("mscale")), mscale_all_dim=_opt_float(spec.get("mscale_all_dim")),
      attention_factor=spec.get("attention_factor"), truncate=bool(spec.get("truncate", True)))


def _opt_float(v) -> float | None:
  return None if v is None else float(v)


def _parse_quant(q: dict[str, Any] | None) -> Fp8Quantization | None:
  if not q:
    return None
  method = q.get("quant_method")
  if method != "fp8":
    raise ValueError(f"quantization_config.quant_method {method!r} is not supported (only 'fp8')")
  fmt = q.get("fmt", "e4m3")
  if fmt != "e4m3":
    raise ValueError(f"quantization_config.fmt {fmt!r} is not supported (only 'e4m3')")
  block = tuple(q.get("weight_block_size", (128, 128)))
  if len(block) != 2:
    raise ValueError(f"quantization_config.weight_block_size must have 2 entries, got {block}")
  return Fp8Quantization(fmt=fmt, weight_block_size=block, scale_fmt=q.get("scale_fmt"))


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
  """How to run the model (not what it is).

  param_dtype: storage dtype of the parameters. dtype: compute dtype of activations and matmuls
  (softmax, norms and the router always run in float32). attention_backend (MLA attention and
  decode), moe_backend (routed experts' grouped matmuls, FP8 included), linear_backend (FP8
  dense linears, `fp8_weight_matmul`; other linears are XLA einsums): kernel choice ("auto",
  "reference", "pallas", "interpret"), see `dsv3_jax.kernels_pallas.Backend`.
  gpu_kernels: the GPU kernel flavour, "auto" (Mosaic GPU on Hopper, else Triton), "triton" or
  "mosaic" (then inputs Mosaic GPU cannot take raise); default: the DSV3_GPU_KERNELS environment
  variable, read once when the config is built, else "auto".
  remat: activation rematerialisation policy per decoder block ("none", "full", "dots",
  "offload": full remat with the saved block inputs in pinned host memory, TPU/GPU only).
  kernel_platform: which Pallas kernel the "interpret" backend runs ("tpu" or "gpu"; default
  "tpu"), or the platform "pallas"/"auto" lower for when it is not the current one (None: the
  current platform).
  ep_capacity_factor: expert parallelism's receive buffer per exchange round, as a multiple of
  the average load (tokens per shard x K); rows beyond it go in further rounds (counted in the
  MoE stats as "ep_overflow", never dropped; with few expert shards one worst-case round is
  smaller and is used instead). None: the dropless worst case in one round (S x min(K, E/S)
  times the average; much more memory on large expert axes).
  """

  param_dtype: Any = jnp.float32
  dtype: Any = jnp.float32
  attention_backend: str = "reference"
  moe_backend: str = "reference"
  linear_backend: str = "reference"
  remat: str = "none"
  kernel_platform: str | None = None
  ep_capacity_factor: float | None = 1.5
  gpu_kernels: str = dataclasses.field(
      default_factory=lambda: os.environ.get("DSV3_GPU_KERNELS") or "auto")

  def __post_init__(self):
    backends = [b.value for b in Backend]
    for name in ("attention_backend", "moe_backend", "linear_backend"):
      value = getattr(self, name)
      if (value.value if isinstance(value, Backend) else value) not in backends:
        raise KernelRequestError(f"RuntimeConfig.{name} must be one of {backends}, got {value!r}")
    if self.gpu_kernels not in ("auto",) + GPU_FLAVORS:
      raise KernelRequestError(f"RuntimeConfig.gpu_kernels (default: env DSV3_GPU_KERNELS) must "
                               f"be one of {['auto', *GPU_FLAVORS]}, got {self.gpu_kernels!r}")
    if self.remat not in ("none", "full", "dots", "offload"):
      raise ValueError(f"remat must be 'none', 'full', 'dots' or 'offload', got {self.remat!r}")
    if self.kernel_platform not in (None, "tpu", "gpu"):
      raise ValueError(f"kernel_platform must be None, 'tpu' or 'gpu', got {self.kernel_platform!r}")
    if self.ep_capacity_factor is not None and not (
        isinstance(self.ep_capacity_factor, (int, float)) and self.ep_capacity_factor > 0):
      raise ValueError(f"ep_capacity_factor must be None or a number > 0, got "
                       f"{self.ep_capacity_factor!r}")


TINY = ModelConfig(
    vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, q_lora_rank=48, kv_lora_rank=32,
    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
    n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
    routed_scaling_factor=2.5, first_k_dense_replace=1, num_nextn_predict_layers=1,
    max_position_embeddings=512)

# The published DeepSeek-V3 / R1 config.json (671B main model + one MTP layer).
DEEPSEEK_V3 = ModelConfig(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
    num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
    n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
    routed_scaling_factor=2.5, scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
    first_k_dense_replace=3, moe_layer_freq=1, rms_norm_eps=1e-6, rope_theta=10000.0,
    rope_scaling=YarnScaling(factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0,
                             beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
    max_position_embeddings=163840, num_nextn_predict_layers=1,
    quantization_config=Fp8Quantization(), bos_token_id=0, eos_token_id=1)

PRESETS = {"tiny": TINY, "deepseek-v3": DEEPSEEK_V3}


def get_preset(name: str) -> ModelConfig:
  try:
    return PRESETS[name]
  except KeyError:
    raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
