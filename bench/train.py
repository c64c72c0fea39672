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
  torch.compile  the same under torch.compile (a row of "err" if it fails; reason on stderr)
MFU = (6 * activated matmul params + causal attention FLOPs) * tokens/s / 790 TFLOP/s, with the
FLOP count of `dsv3_jax.train.train_flops_per_token` for each case's config (the MTP depth
counts only where it runs). Ratios are tokens/s against torch eager.

Each case runs in its own child process (`--case NAME`, same flags), so the GPU memory one
framework caches (JAX's allocator, torch's caching allocator) never starves the next, and a case
that exceeds --case-timeout seconds (e.g. a slow torch.compile) prints "timeout" and the others
still run.

Timing (bench/common.py `median_call`): --warmup steps (compilation included there), then the
median of --iters steps, each synchronised (the Trainer fetches its metrics; torch.cuda.
synchronize). Random tokens (the throughput does not depend on the text); the router bias update
runs in ours as in real training.

  python bench/train.py [--batch 2] [--seq 4096] [--remat full] [--skip-torch] [--quick]
  python bench/train.py --smoke   (CPU: tiny model, seq 64, the cases "jax" and "transformers
                                   eager" (torch on CPU; no torch.compile, whose tracing cost
                                   is most of a CPU run and whose code path is torch's); jax
                                   kernels "auto", i.e. the jnp references on CPU)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (H100_BF16_TFLOPS, Table, median_call, peak_fraction,  # noqa: E402
                    print_header, ratio, save_table, torch_sync, transformers_config)

__all__ = ["model_config", "bench_jax", "bench_torch", "run_case", "main"]

CASES = {"jax": "jax (MTP on)", "jax-nomtp": "jax (no MTP)", "torch": "transformers eager",
         "torch-compile": "transformers torch.compile"}
RESULT = "CASE-RESULT "


def model_config(size: str = "full", mtp: bool = True):
  """The bench model: "full" (~1B), "quick" (small, for a fast GPU check) or "smoke" (tiny)."""
  from dsv3_jax.config import ModelConfig
  nextn = 1 if mtp else 0
  if size == "smoke":
    return ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                       moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                       q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                       v_head_dim=16, n_routed_experts=8, n_shared_experts=1,
                       num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                       first_k_dense_replace=1, num_nextn_predict_layers=nextn,
                       max_position_embeddings=512)
  if size == "quick":
    return ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=512,
                       moe_intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                       q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=32,
                       qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
                       n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                       routed_scaling_factor=2.5, first_k_dense_replace=1,
                       num_nextn_predict_layers=nextn, max_position_embeddings=4096)
  return ModelConfig(
      vocab_size=32768, hidden_size=1280, intermediate_size=4096, moe_intermediate_size=320,
      num_hidden_layers=12, num_attention_heads=16, q_lora_rank=512, kv_lora_rank=512,
      qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
      n_shared_experts=2, num_experts_per_tok=6, n_group=8, topk_group=4,
      routed_scaling_factor=2.5, scoring_func="sigmoid", topk_method="noaux_tc",
      norm_topk_prob=True, first_k_dense_replace=1, num_nextn_predict_layers=nextn,
      max_position_embeddings=4096)


def bench_jax(cfg, args) -> float:
  """Median seconds per training step of our Trainer."""
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
  positions = np.broadcast_to(np.arange(args.seq, dtype=np.int32), tokens.shape).copy()
  batch = Batch(tokens, np.ones_like(tokens), positions)
  # train_step fetches the step's metrics to the host, so every step is synchronised.
  return median_call(lambda: tr.train_step(batch), warmup=args.warmup, iters=args.iters)


def bench_torch(cfg, args, compile_: bool) -> float:
  """Median seconds per training step of transformers' DeepseekV3ForCausalLM on args.device."""
  import torch
  from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

  hf = {k: v for k, v in transformers_config(cfg).items()
        if k not in ("architectures", "model_type")}
  config = DeepseekV3Config(**hf, attn_implementation="sdpa")
  torch.manual_seed(0)
  dev = args.device
  model = DeepseekV3ForCausalLM(config).to(dev).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                          fused=True)
  fwd = torch.compile(model, backend=args.compile_backend) if compile_ else model
  tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=dev)

  def step():
    with torch.autocast(dev, dtype=torch.bfloat16):
      loss = fwd(input_ids=tokens, labels=tokens).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch_sync(dev)

  try:
    return median_call(step, warmup=args.warmup, iters=args.iters)
  finally:
    del model, opt, fwd
    if dev == "cuda":
      torch.cuda.empty_cache()


def run_case(case: str, args) -> float:
  """Seconds per step of one case ("jax", "jax-nomtp", "torch", "torch-compile")."""
  size = "smoke" if args.smoke else ("quick" if args.quick else "full")
  cfg = model_config(size, mtp=case == "jax")
  if case.startswith("jax"):
    return bench_jax(cfg, args)
  return bench_torch(cfg, args, compile_=case == "torch-compile")


def _child(case: str, argv: list[str], timeout: float, env: dict) -> float | str:
  """Runs one case in a child process; its seconds per step, or "err (...)" / "timeout"."""
  cmd = [sys.executable, os.path.abspath(__file__), *argv, "--case", case]
  try:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, env=env)
  except subprocess.TimeoutExpired:
    print(f"[err] {case}: no result within --case-timeout {timeout:g} s", file=sys.stderr)
    return "timeout"
  for line in proc.stdout.splitlines():
    if line.startswith(RESULT):
      return json.loads(line[len(RESULT):])["sec"]
  print(f"[err] {case}: child exited {proc.returncode} without a result (its stderr is above)",
        file=sys.stderr)
  return f"err (exit {proc.returncode})"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument("--remat", default="full", choices=("none", "full", "dots"))
  p.add_argument("--attention-backend", default="auto")
  p.add_argument("--moe-backend", default="auto")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--skip-torch", action="store_true")
  p.add_argument("--compile-backend", default="inductor", help="torch.compile backend")
  p.add_argument("--quick", action="store_true", help="small model and seq 512")
  p.add_argument("--smoke", action="store_true",
                 help="CPU check of every path: tiny model, seq 64, torch on CPU")
  p.add_argument("--markdown", metavar="PATH", help="write the table as a section of PATH")
  p.add_argument("--case-timeout", type=float, default=420.0,
                 help="seconds one case (child process, compilation included) may take")
  p.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)  # child processes
  argv = sys.argv[1:] if argv is None else list(argv)
  args = p.parse_args(argv)
  size = "smoke" if args.smoke else ("quick" if args.quick else "full")
  args.device = "cpu" if args.smoke else "cuda"
  if args.quick:
    args.seq = min(args.seq, 512)
  if args.smoke:
    args.seq, args.batch, args.warmup, args.iters = 64, 2, 1, 1
    args.compile_backend = "eager"
  if args.case:  # a child: one case, its result as one JSON line
    sec = run_case(args.case, args)
    print(RESULT + json.dumps({"case": args.case, "sec": sec}), flush=True)
    return 0

  child_env = dict(os.environ)
  # This parent only reads the device name: it must not reserve GPU memory the children need.
  os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  import jax

  from dsv3_jax.pretrained import count_params
  from dsv3_jax.train.trainer import train_flops_per_token

  pc = count_params(model_config(size, True))
  print_header(f"model: {pc.total / 1e9:.3f}B params ({pc.activated / 1e9:.3f}B activated) + "
               f"MTP {pc.mtp / 1e9:.3f}B; batch {args.batch} x seq {args.seq}; remat "
               f"{args.remat}; attention {args.attention_backend}, moe {args.moe_backend}; "
               f"torch on {args.device}, torch.compile backend {args.compile_backend}", args)
  if jax.default_backend() == "cpu" and not args.smoke:
    raise SystemExit("bench/train.py needs a GPU; use --smoke on CPU")
  tokens = args.batch * args.seq
  # --smoke leaves out "jax (no MTP)" (the same code as "jax" with another config; a CPU compile
  # of the train step is the slowest part of the smoke run) and torch.compile (torch's code).
  cases = ["jax"] + ([] if args.smoke else ["jax-nomtp"])
  cases += [] if args.skip_torch else ["torch"] + ([] if args.smoke else ["torch-compile"])
  results = []
  for case in cases:
    c = model_config(size, mtp=case == "jax")
    sec = _child(case, argv, args.case_timeout, child_env)
    tps = tokens / sec if isinstance(sec, float) else sec
    tflops = (train_flops_per_token(c, args.seq) * tps / 1e12 if isinstance(tps, float)
              else None)
    results.append({"case": CASES[case], "sec": sec, "tps": tps,
                    "mfu": peak_fraction(tflops, H100_BF16_TFLOPS)})
    print(f"  {CASES[case]}: {sec if isinstance(sec, str) else f'{sec:.3f} s/step'}", flush=True)
  base = next((r["tps"] for r in results if r["case"] == "transformers eager"), None)
  print()
  table = Table([("case", "case", "s"), ("sec", "step s", ".3f"), ("tps", "tokens/s", ",.0f"),
                 ("mfu", "MFU", "s"), ("vs", "vs transformers eager", "s")])
  for r in results:
    table.add({**r, "vs": ratio(r["tps"], base)})
  save_table(args.markdown, f"Training step (bench/train.py), batch {args.batch} x seq "
             f"{args.seq}", table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
