"""dsv3-jax: DeepSeek-V3 (MLA, DeepSeekMoE, MTP) in JAX / Flax NNX."""
from dsv3_jax.config import (DEEPSEEK_V3, PRESETS, TINY, Fp8Quantization, ModelConfig, RuntimeConfig,
                             YarnScaling, get_preset)
from dsv3_jax.checkpoint import CheckpointError
from dsv3_jax.model import DeepseekV3, ModelOutput
from dsv3_jax.moe import RouterBias
from dsv3_jax.pretrained import (ParamCount, abstract_model, count_params, from_pretrained,
                                 model_from_arrays, param_shapes, save_pretrained)

__all__ = [
    "ModelConfig", "RuntimeConfig", "YarnScaling", "Fp8Quantization", "PRESETS", "TINY",
    "DEEPSEEK_V3", "get_preset", "DeepseekV3", "ModelOutput", "RouterBias", "CheckpointError",
    "from_pretrained", "abstract_model", "param_shapes", "model_from_arrays", "count_params",
    "ParamCount", "save_pretrained",
]
