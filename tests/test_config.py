"""config.json parsing: official and transformers layouts, validation errors."""
import json

import pytest

import dsv3_jax
from dsv3_jax.config import ModelConfig, yarn_get_mscale

# The published DeepSeek-V3 config.json fields (old-style rope_scaling + top-level rope_theta).
OFFICIAL_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_nextn_predict_layers": 1, "num_attention_heads": 128,
    "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256, "ep_size": 1,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8,
    "topk_group": 4, "num_experts_per_tok": 8, "moe_layer_freq": 1, "first_k_dense_replace": 3,
    "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu",
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
    "tie_word_embeddings": False, "attention_bias": False, "bos_token_id": 0, "eos_token_id": 1,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}


def test_official_config_equals_preset():
  assert ModelConfig.from_hf_config(OFFICIAL_V3) == dsv3_jax.DEEPSEEK_V3


def test_roundtrip_through_config_json(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(dsv3_jax.DEEPSEEK_V3.to_hf_config()))
  assert ModelConfig.from_hf_config(tmp_path) == dsv3_jax.DEEPSEEK_V3


def test_softmax_scale_closed_form():
  # (128+64)^-0.5 * (0.1*1.0*ln 40 + 1)^2
  cfg = dsv3_jax.DEEPSEEK_V3
  assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * 3.6888794541139363 + 1) ** 2, rel=1e-12)
  assert cfg.rope_scaling.rope_mscale == 1.0
  assert yarn_get_mscale(1.0, 5.0) == 1.0


@pytest.mark.parametrize("field,value,message", [
    ("scoring_func", "sqrtsoftplus", "scoring_func 'sqrtsoftplus' is not one of"),
    ("topk_method", "random", "topk_method 'random' is not one of"),
    ("hidden_act", "gelu", "hidden_act 'gelu' is not supported"),
    ("rope_scaling", {"type": "dynamic", "factor": 2.0}, "rope type 'dynamic' is not supported"),
    ("quantization_config", {"quant_method": "gptq"}, "quant_method 'gptq' is not supported"),
    ("n_group", 3, "must be divisible by n_group=3"),
    ("topk_group", 9, "topk_group=9 must be in"),
    ("tie_word_embeddings", True, "tie_word_embeddings=true is not supported"),
    ("model_type", "llama", "model_type 'llama' is not a DeepSeek"),
    ("num_key_value_heads", 16, "num_key_value_heads=16 differs from num_attention_heads=128"),
])
def test_bad_values_are_errors(field, value, message, tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({**OFFICIAL_V3, field: value}))
  with pytest.raises(ValueError, match=message) as e:
    ModelConfig.from_hf_config(tmp_path)
  assert "config.json" in str(e.value)  # the error names the file


def test_transformers_rope_parameters_layout():
  raw = {**OFFICIAL_V3, "rope_parameters": {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 8.0,
                                            "original_max_position_embeddings": 1024,
                                            "mscale": 0.5, "mscale_all_dim": 0.7}}
  del raw["rope_scaling"], raw["rope_theta"]
  cfg = ModelConfig.from_hf_config(raw)
  assert cfg.rope_theta == 5000.0 and cfg.rope_scaling.factor == 8.0
  assert cfg.rope_scaling.rope_mscale == pytest.approx(yarn_get_mscale(8, 0.5) / yarn_get_mscale(8, 0.7))


def test_v2_defaults():
  raw = {k: v for k, v in OFFICIAL_V3.items() if k not in ("scoring_func", "topk_method", "norm_topk_prob")}
  cfg = ModelConfig.from_hf_config({**raw, "model_type": "deepseek_v2", "quantization_config": None})
  assert (cfg.scoring_func, cfg.topk_method, cfg.norm_topk_prob) == ("softmax", "greedy", False)


def test_moe_layer_freq_honoured():
  cfg = dsv3_jax.TINY.replace(num_hidden_layers=6, first_k_dense_replace=1, moe_layer_freq=2)
  assert [cfg.is_moe_layer(i) for i in range(6)] == [False, False, True, False, True, False]


def test_runtime_config_validates_kernel_choices(monkeypatch):
  """Backends and the GPU flavour are checked when the config is built (one-line UserError
  naming the field); DSV3_GPU_KERNELS is read then, once, as gpu_kernels' default."""
  from dsv3_jax.config import RuntimeConfig
  from dsv3_jax.errors import UserError
  for field in ("attention_backend", "moe_backend", "linear_backend"):
    with pytest.raises(UserError, match=f"RuntimeConfig.{field} must be one of .*'pallass'"):
      RuntimeConfig(**{field: "pallass"})
  with pytest.raises(UserError, match="gpu_kernels .*'cudnn'"):
    RuntimeConfig(gpu_kernels="cudnn")
  monkeypatch.delenv("DSV3_GPU_KERNELS", raising=False)
  assert RuntimeConfig().gpu_kernels == "auto"
  monkeypatch.setenv("DSV3_GPU_KERNELS", "triton")
  rt = RuntimeConfig(attention_backend="interpret")
  monkeypatch.setenv("DSV3_GPU_KERNELS", "mosaic")
  assert rt.gpu_kernels == "triton" and RuntimeConfig().gpu_kernels == "mosaic"
  monkeypatch.setenv("DSV3_GPU_KERNELS", "cuda")
  with pytest.raises(UserError, match="DSV3_GPU_KERNELS"):
    RuntimeConfig()
