"""Training throughput: dsv3-jax `Trainer` step vs transformers `DeepseekV3ForCausalLM` (PyTorch).

Model: a ~1B-parameter DeepSeek-V3-shaped config (MLA with q/kv LoRA, 64 routed experts top-6 in
8 groups, 2 shared experts, first layer dense, one MTP depth), seq 4096, --batch sequences.
One full training step each: forward, backward, AdamW update, with fp32 master weights and bf16
compute (ours: RuntimeConfig(param_dtype=float32, dtype=bfloat16); PyTorch: fp32 parameters
under torch.autocast(bfloat16), torch.optim.AdamW(fused=True)).

Cases (one table row each):
  jax            ours, MTP on (next-token + MTP + balance loss, router-bias update)
  jax (no MTP)   ours with num_nextn_predict_layers=0, the same work as transformers
  torch eager    transformers DeepseekV3ForCausalLM (it has no MTP module), eager
  torch.compile  the same under torch.compile (skipped with "err" if it fails to compile)
MFU = (6 * activated matmul params + causal attention FLOPs) * tokens/s / 790 TFLOP/s, with the
FLOP count of `dsv3_jax.train.train_flops_per_token` for each case's config (the MTP depth
counts only where it runs). Ratios are tokens/s against torch eager.

Timing: --warmup steps (compilation included there), then the median of --iters steps, each
synchronised (block_until_ready / torch.cuda.synchronize). Random tokens (the throughput does not
depend on the text); the router bias update runs in ours as in real training.

  python bench/train.py [--batch 2] [--seq 4096] [--remat full] [--skip-torch] [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

PEAK = 790e12


def model_config(quick: bool = False, mtp: bool = True):
  from dsv3_jax.config import ModelConfig
  if quick:  # a small shape to smoke-test the script
    return ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=64,
                       num_hidden_layers=3, num_attention_heads=4, q_lora_rank=128, kv_lora_rank=128,
                       qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
                       n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                       routed_scaling_factor=2.5, first_k_dense_replace=1,
                       num_nextn_predict_layers=1 if mtp else 0, max_position_embeddings=4096)
  return ModelConfig(
      vocab_size=32768, hidden_size=1280, intermediate_size=4096, moe_intermediate_size=320,
      num_hidden_layers=12, num_attention_heads=16, q_lora_rank=512, kv_lora_rank=512,
      qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
      n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=4, routed_scaling_factor=2.5,
      scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, first_k_dense_replace=1,
      num_nextn_predict_layers=1 if mtp else 0, max_position_embeddings=4096)


def _median_step(step, warmup: int, iters: int) -> float:
  for _ in range(warmup):
    step()
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def bench_jax(cfg, args) -> float:
  """Seconds per training step of our Trainer."""
  import jax.numpy as jnp

  from dsv3_jax.config import RuntimeConfig
  from dsv3_jax.train.data import Batch, DataState
  from dsv3_jax.train.optim import OptimConfig
  from dsv3_jax.train.trainer import TrainConfig, Trainer

  class _Data:  # the Trainer only reads these attributes when batches are passed in
    seq_len, batch_size, vocab_size, seed, state = args.seq, args.batch, None, 0, DataState()

  rt = RuntimeConfig(param_dtype=jnp.float32, dtype=jnp.bfloat16, remat=args.remat,
                     attention_backend=args.attention_backend, moe_backend=args.moe_backend)
  tr = Trainer(cfg, rt, TrainConfig(steps=10 ** 6, optim=OptimConfig(lr=1e-4, warmup_steps=10)),
               _Data())
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
  ones = np.ones_like(tokens)
  batch = Batch(tokens, ones, np.broadcast_to(np.arange(args.seq, dtype=np.int32), tokens.shape).copy())
  return _median_step(lambda: tr.train_step(batch), args.warmup, args.iters)  # syncs each step


def bench_torch(cfg, args, compile_: bool) -> float:
  import torch
  from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

  hf = cfg.to_hf_config()
  hf.pop("quantization_config", None)
  hf["num_nextn_predict_layers"] = 0
  config = DeepseekV3Config(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
  config._attn_implementation = "sdpa"
  torch.manual_seed(0)
  model = DeepseekV3ForCausalLM(config).cuda().train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
  fwd = torch.compile(model) if compile_ else model
  tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device="cuda")

  def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
      loss = fwd(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()

  try:
    return _median_step(step, args.warmup, args.iters)
  finally:
    del model, opt
    torch.cuda.empty_cache()


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument("--remat", default="full", choices=("none", "full", "dots"))
  p.add_argument("--attention-backend", default="auto")
  p.add_argument("--moe-backend", default="auto")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--skip-torch", action="store_true")
  p.add_argument("--quick", action="store_true", help="small model and seq 512 (smoke test)")
  args = p.parse_args()
  if args.quick:
    args.seq = min(args.seq, 512)

  import jax

  from dsv3_jax.pretrained import count_params
  from dsv3_jax.train.trainer import train_flops_per_token

  cfg, cfg_nomtp = model_config(args.quick, True), model_config(args.quick, False)
  pc = count_params(cfg)
  print(f"device: {jax.devices()[0].device_kind}; jax {jax.__version__}")
  print(f"model: {pc.total / 1e9:.2f}B params ({pc.activated / 1e9:.2f}B activated) + MTP "
        f"{pc.mtp / 1e9:.2f}B; batch {args.batch} x seq {args.seq}; remat {args.remat}; "
        f"attention {args.attention_backend}, moe {args.moe_backend}")
  tokens = args.batch * args.seq
  rows = []

  def record(name, fn, c):
    try:
      sec = fn()
      rows.append((name, tokens / sec, train_flops_per_token(c, args.seq) * tokens / sec / PEAK, sec))
    except Exception as e:  # a failing case prints "err" and the reason, the others still run
      print(f"{name}: {type(e).__name__}: {str(e)[:300]}")
      rows.append((name, None, None, None))

  record("jax (MTP on)", lambda: bench_jax(cfg, args), cfg)
  record("jax (no MTP)", lambda: bench_jax(cfg_nomtp, args), cfg_nomtp)
  if not args.skip_torch:
    record("transformers eager", lambda: bench_torch(cfg_nomtp, args, False), cfg_nomtp)
    record("transformers torch.compile", lambda: bench_torch(cfg_nomtp, args, True), cfg_nomtp)
  base = next((r[1] for r in rows if r[0] == "transformers eager" and r[1]), None)
  print("\n| case | step s | tokens/s | MFU | vs transformers eager |")
  print("|---|---:|---:|---:|---:|")
  for name, tps, mfu, sec in rows:
    if tps is None:
      print(f"| {name} | err | err | err | - |")
      continue
    ratio = f"{tps / base:.2f}x" if base else "-"
    print(f"| {name} | {sec:.3f} | {tps:,.0f} | {100 * mfu:.1f}% | {ratio} |")


if __name__ == "__main__":
  main()
