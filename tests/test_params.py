"""Parameter counts of the 671B preset from the abstract model (nothing allocated)."""
import jax

import dsv3_jax
from dsv3_jax.pretrained import flat_variables


def _closed_form(cfg):
  """Hand count of the DeepSeek-V3 architecture (main model, then the MTP layer)."""
  D, H, V = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size
  attn = (D * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim
          + D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
          + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim) + H * cfg.v_head_dim * D)
  dense = 3 * D * cfg.intermediate_size
  expert = 3 * D * cfg.moe_intermediate_size
  moe = cfg.n_routed_experts * expert + cfg.n_shared_experts * expert + D * cfg.n_routed_experts
  k, L = cfg.first_k_dense_replace, cfg.num_hidden_layers
  main = 2 * V * D + D + L * (attn + 2 * D) + k * dense + (L - k) * moe
  active = main - (L - k) * (cfg.n_routed_experts - cfg.num_experts_per_tok) * expert
  mtp = 3 * D + 2 * D * D + attn + 2 * D + moe
  return main, active, mtp


def test_deepseek_v3_counts_without_allocating():
  cfg = dsv3_jax.DEEPSEEK_V3
  abstract = dsv3_jax.abstract_model(cfg)
  leaves = [v.get_value() for v in flat_variables(abstract).values()]
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
  count = dsv3_jax.count_params(cfg)
  main, active, mtp = _closed_form(cfg)
  assert (count.total, count.activated, count.mtp) == (main, active, mtp)
  assert round(count.total / 1e9) == 671
  # With the checkpoint's stored copies of embedding and head, the MTP layer brings the total to
  # 684.5B, the "685B" DeepSeek publishes for the repository.
  with_copies = count.total_with_mtp + 2 * cfg.vocab_size * cfg.hidden_size
  assert 684.0e9 < with_copies < 685.5e9
  assert 37.0e9 < count.activated < 38.0e9
  # The rope head is shared: kv_a_proj_with_mqa is [7168, 512 + 64].
  shapes = dsv3_jax.param_shapes(abstract)
  assert shapes["layers.0.self_attn.kv_a_proj_with_mqa.kernel"] == (7168, 576)
  assert shapes["layers.3.mlp.experts.gate_proj"] == (256, 7168, 2048)
  assert "layers.2.mlp.gate_proj.kernel" in shapes and "layers.3.mlp.gate_proj.kernel" not in shapes
  assert shapes["mtp.0.eh_proj.kernel"] == (2 * 7168, 7168)
