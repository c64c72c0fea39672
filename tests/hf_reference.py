"""Builds tiny real-format checkpoints with transformers (the parity reference; tests only)."""
from __future__ import annotations

import numpy as np
import torch

from tests.utils import value_scale

TINY_V3 = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=40,
    kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8,
    n_shared_experts=1, num_experts_per_tok=3, n_group=4, topk_group=2, first_k_dense_replace=1,
    routed_scaling_factor=2.5, norm_topk_prob=True, rms_norm_eps=1e-6, max_position_embeddings=256,
    num_nextn_predict_layers=0,
)


def randomize_(model: torch.nn.Module, seed: int, *, std: float = 0.08, bias_std: float = 0.0):
  """Gives every parameter and the router bias random values (`tests.utils.value_scale`: norm
  weights around 1, weights std `std`, the bias std `bias_std`, a buffer here).

  The default init (std 0.02, norms 1, bias 0) makes activations tiny and routing bland; larger
  random values exercise every path, and a bias of the scale of the sigmoid scores changes
  which experts are selected.
  """
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      mean, s = value_scale(name, std, bias_std)
      p.copy_(mean + s * torch.randn(p.shape, generator=g))
    for name, b in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        mean, s = value_scale(name, std, bias_std)
        b.copy_(mean + s * torch.randn(b.shape, generator=g))


def make_v3(path, seed: int = 0, bias_std: float = 0.3, **overrides):
  """Saves a random DeepseekV3ForCausalLM to `path`; returns the (fp32, eval) torch model."""
  from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
  cfg = DeepseekV3Config(**{**TINY_V3, **overrides}, attn_implementation="eager")
  torch.manual_seed(seed)
  model = DeepseekV3ForCausalLM(cfg).eval()
  randomize_(model, seed, bias_std=bias_std)
  model.save_pretrained(path)
  return model


def make_v2(path, seed: int = 0, **overrides):
  """Saves a random DeepseekV2ForCausalLM (softmax scores, no bias, max group score)."""
  from transformers import DeepseekV2Config, DeepseekV2ForCausalLM
  base = {k: v for k, v in TINY_V3.items() if k != "num_nextn_predict_layers"}
  base.update(topk_method="group_limited_greedy", norm_topk_prob=False, routed_scaling_factor=1.5)
  cfg = DeepseekV2Config(**{**base, **overrides}, attn_implementation="eager")
  torch.manual_seed(seed)
  model = DeepseekV2ForCausalLM(cfg).eval()
  randomize_(model, seed)
  model.save_pretrained(path)
  return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
