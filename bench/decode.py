"""Decode throughput on one GPU: ours (latent cache, fused on-device loop), ours + MTP
self-speculative decoding, and transformers' `generate` with the same weights.

A mid-size DeepSeek-V3-shaped model (random weights, bf16, ~1.8B parameters + an MTP layer):
hidden 2048, 8 layers (1 dense + 7 MoE), 16 heads with V3's MLA dims (q LoRA 768, kv LoRA 512,
nope 128, rope 64, v 128), 64 routed experts (top-6, 8 groups, 4 kept) + 1 shared.
Cases: batch 1 / 8 / 64, prompt 512 random tokens, 256 new tokens (EOS off), greedy.
tokens/s = generated tokens / wall time of prefill + decode (compilation and warm-up excluded,
for both). MTP acceptance is reported twice: with the random MTP head (drafts are almost never
right: the speculative overhead) and with the head forced to agree (`make_mtp_agree`, main
residual branches zeroed and the MTP block passing the next-token embedding to the shared head,
so drafts match greedy verification ~always: the upper bound). Forcing changes values, not
shapes, so every matmul is still done. "% HBM" estimates the weight bandwidth of plain decoding:
bf16 bytes of the non-embedding parameters a step must read (dense weights, plus the routed
experts that a batch of b tokens touches, E * (1 - (1 - k/E)^b) per MoE layer on uniform routing)
times steps/s (tokens/s / b, prefill time included), against 3.0 TB/s.

Run on the H100: python bench/decode.py [--batches 1,8,64] [--skip-hf] [--backend auto]
                 [--markdown bench/RESULTS.md]
CPU check of every path (tiny model, batch 2, transformers on CPU): python bench/decode.py --smoke
"""
from __future__ import annotations

import argparse
import os
import sys
import time

# Grow JAX's GPU memory on demand instead of reserving 75% of it at start-up: transformers'
# model runs in this process too, on the same GPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import dsv3_jax  # noqa: E402
from dsv3_jax.checkpoint import name_table, to_hf  # noqa: E402
from dsv3_jax.inference import (Generator, cache_bytes_per_token,  # noqa: E402
                                make_mtp_agree)
from dsv3_jax.pretrained import count_params, flat_variables, param_shapes  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (H100_HBM_TBS, Table, peak_fraction, print_header, ratio,  # noqa: E402
                    save_table, torch_sync, transformers_config)

__all__ = ["ours", "hf_model", "hf_generate", "weight_bytes_per_step", "main"]

CFG = dsv3_jax.ModelConfig(
    vocab_size=32768, hidden_size=2048, intermediate_size=8192, moe_intermediate_size=512,
    num_hidden_layers=8, num_attention_heads=16, q_lora_rank=768, kv_lora_rank=512,
    qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
    n_shared_experts=1, num_experts_per_tok=6, n_group=8, topk_group=4,
    routed_scaling_factor=2.5, first_k_dense_replace=1, num_nextn_predict_layers=1,
    max_position_embeddings=4096, eos_token_id=1, bos_token_id=0)
PROMPT, NEW = 512, 256
DEVICE = "cuda"  # torch device; --smoke runs everything small on CPU to check the script


def ours(gen: Generator, prompts, speculative: bool):
  """Generates NEW tokens per prompt twice (compile + warm-up, then timed); the second result."""
  kw = dict(max_new_tokens=NEW, eos_token_id=(), speculative=speculative)
  gen.run(prompts, **kw)  # compile + warm-up
  res = gen.run(prompts, **kw)
  assert all(len(t) == NEW for t in res.tokens)
  return res


def hf_model(model, workdir):
  """transformers' DeepseekV3ForCausalLM with our weights: written as a real-format checkpoint
  through the checkpoint name table (MTP layer left out, as transformers drops it) and loaded
  with from_pretrained, so transformers applies its own layout conversions (fused experts)."""
  import json

  import torch
  from transformers import DeepseekV3ForCausalLM

  from dsv3_jax.safetensors_io import save_file
  flat = {k: v.get_value() for k, v in flat_variables(model).items()}
  table = name_table(CFG, param_shapes(model))
  mtp_prefix = f"model.layers.{CFG.num_hidden_layers}."
  tensors = {}
  for name, e in table.items():
    if name.startswith(mtp_prefix):
      continue
    tensors[name] = np.ascontiguousarray(to_hf(e, np.asarray(jax.device_get(flat[e.target]))))
  save_file(tensors, os.path.join(workdir, "model.safetensors"))
  del tensors
  hf_cfg = {**transformers_config(CFG), "dtype": "bfloat16"}
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(hf_cfg, f)
  for impl in ("sdpa", "eager"):
    try:
      hf = DeepseekV3ForCausalLM.from_pretrained(workdir, dtype=torch.bfloat16,
                                                 attn_implementation=impl)
      return hf.to(DEVICE).eval(), impl
    except (ValueError, ImportError) as e:
      print(f"transformers attn_implementation={impl} unavailable: {e}")
  raise RuntimeError("could not build the transformers model")


def hf_generate(hf, prompts):
  """transformers' greedy generate of NEW tokens (after an 8-token warm-up): (new ids [B, NEW],
  seconds, cache bytes per token)."""
  import torch
  ids = torch.as_tensor(np.asarray(prompts), device=DEVICE)
  kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
            eos_token_id=None)
  with torch.no_grad():
    hf.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)  # warm-up
    torch_sync(DEVICE)
    t = time.perf_counter()
    out = hf.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, return_dict_in_generate=True,
                      **kw)
    torch_sync(DEVICE)
    dt = time.perf_counter() - t
  seqs = out.sequences[:, ids.shape[1]:].cpu().numpy()
  return seqs, dt, _hf_cache_bytes_per_token(out.past_key_values, ids.shape[0],
                                             out.sequences.shape[1])


def _hf_cache_bytes_per_token(cache, batch, length):
  """Bytes transformers' cache holds per token (all layers), measured from its tensors."""
  total = 0
  layers = getattr(cache, "layers", None)
  if layers is not None:
    for layer in layers:
      for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
        if t is not None:
          total += t.numel() * t.element_size()
  else:
    for k, v in cache:
      total += k.numel() * k.element_size() + v.numel() * v.element_size()
  return total / (batch * (length - 1))  # the last generated token is never fed back


def weight_bytes_per_step(cfg, batch: int, dtype_bytes: int = 2) -> float:
  """Estimated parameter bytes one plain decode step of `batch` tokens reads (see the module
  docstring): non-embedding dense parameters plus the routed experts the batch touches."""
  n = count_params(cfg)
  e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
  routed = (n.total - n.activated) * e / (e - k) if e > k else 0.0
  dense = n.total - routed - cfg.vocab_size * cfg.hidden_size  # embedding: only b rows are read
  touched = 1.0 - (1.0 - k / e) ** batch if e else 0.0
  return dtype_bytes * (dense + routed * touched)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batches", default="1,8,64")
  ap.add_argument("--skip-hf", action="store_true", help="ours only")
  ap.add_argument("--backend", default="reference",
                  help="attention/MoE kernel backend for ours (reference | auto | pallas)")
  ap.add_argument("--smoke", action="store_true",
                  help="tiny model, short prompt, CPU: checks the script, timings meaningless")
  ap.add_argument("--markdown", metavar="PATH", help="write the table as a section of PATH")
  args = ap.parse_args(argv)
  global CFG, PROMPT, NEW, DEVICE
  if args.smoke:
    CFG = dsv3_jax.TINY.replace(num_hidden_layers=2)
    PROMPT, NEW, DEVICE = 24, 8, "cpu"
    args.batches = "2"
  elif jax.default_backend() == "cpu":
    raise SystemExit("bench/decode.py needs a GPU (torch on cuda); use --smoke on CPU")
  batches = [int(b) for b in args.batches.split(",")]
  n = count_params(CFG)
  print_header(f"model: {n.total / 1e9:.2f}B params ({n.activated / 1e9:.2f}B activated) + MTP "
               f"{n.mtp / 1e6:.0f}M, bf16; prompt {PROMPT}, {NEW} new tokens, greedy; ours "
               f"with attention/MoE backend {args.backend}", args)
  rt = dsv3_jax.RuntimeConfig(param_dtype=jnp.bfloat16, dtype=jnp.bfloat16,
                              attention_backend=args.backend, moe_backend=args.backend,
                              linear_backend=args.backend)
  model = dsv3_jax.DeepseekV3(CFG, rt, rngs=nnx.Rngs(0))
  rng = np.random.RandomState(0)
  prompts = {b: rng.randint(2, CFG.vocab_size, (b, PROMPT)).tolist() for b in batches}

  gen = Generator(model)
  res = {}
  for b in batches:
    plain = ours(gen, prompts[b], False)
    spec = ours(gen, prompts[b], True)
    # Identical in fp32 (tests); in bf16 the 2-token verify and the 1-token step may round
    # differently, which can flip a near-tie, so this is reported, not asserted.
    same = float(np.mean(np.asarray(spec.tokens) == np.asarray(plain.tokens)))
    res[b] = dict(ours=plain, spec_random=spec)
    print(f"  ours batch {b}: {plain.tokens_per_second:.0f} tok/s; +MTP (random head, "
          f"acceptance {spec.acceptance_rate:.1%}): {spec.tokens_per_second:.0f} tok/s; "
          f"speculative tokens equal to plain: {same:.1%}", flush=True)

  hf_bpt = None
  if not args.skip_hf:
    import torch
    import tempfile
    with tempfile.TemporaryDirectory() as workdir:
      hf, impl = hf_model(model, workdir)
    print(f"transformers DeepseekV3ForCausalLM, attn_implementation={impl}")
    for b in batches:
      seqs, dt, hf_bpt = hf_generate(hf, prompts[b])
      res[b]["hf"] = b * NEW / dt
      same = float(np.mean(seqs[:, :16] == np.asarray([t[:16] for t in res[b]["ours"].tokens])))
      res[b]["agree16"] = same
      print(f"  transformers batch {b}: {res[b]['hf']:.0f} tok/s (first 16 greedy tokens equal "
            f"to ours: {same:.0%}; bf16 on both sides, near-ties can differ)", flush=True)
    del hf
    if DEVICE == "cuda":
      torch.cuda.empty_cache()

  make_mtp_agree(model, main_scale=0.0)
  gen = Generator(model)
  for b in batches:
    res[b]["spec_forced"] = ours(gen, prompts[b], True)

  ours_bpt = cache_bytes_per_token(CFG, jnp.bfloat16)
  per_head = CFG.num_hidden_layers * CFG.num_attention_heads * (CFG.qk_head_dim + CFG.v_head_dim) * 2
  print(f"\nKV cache per token (all {CFG.num_hidden_layers} layers, bf16): ours "
        f"{ours_bpt} B (+{cache_bytes_per_token(CFG, jnp.bfloat16, mtp=True) - ours_bpt} B for "
        f"the MTP layer when speculative)" + (
            f"; transformers {hf_bpt:.0f} B (measured from its cache tensors) = "
            f"{hf_bpt / ours_bpt:.1f}x ours" if hf_bpt else "")
        + f"; a per-head K/V cache would hold {per_head} B = {per_head / ours_bpt:.1f}x ours")
  print()
  table = Table([("batch", "batch", "d"), ("ours", "ours tok/s", ".0f"),
                 ("spec_random", "+MTP random head (acc)", "s"),
                 ("spec_forced", "+MTP forced head (acc)", "s"), ("hf", "transformers tok/s", ".0f"),
                 ("vs_hf", "ours / tf", "s"), ("forced_vs_hf", "+MTP forced / tf", "s"),
                 ("hbm", "ours % HBM (weights, est.)", "s")])
  for b in batches:
    r = res[b]
    o, sr, sf = r["ours"].tokens_per_second, r["spec_random"], r["spec_forced"]
    hf_s = r.get("hf")
    table.add({"batch": b, "ours": o, "hf": hf_s,
               "spec_random": f"{sr.tokens_per_second:.0f} ({sr.acceptance_rate:.0%})",
               "spec_forced": f"{sf.tokens_per_second:.0f} ({sf.acceptance_rate:.0%})",
               "vs_hf": ratio(o, hf_s), "forced_vs_hf": ratio(sf.tokens_per_second, hf_s),
               "hbm": peak_fraction(weight_bytes_per_step(CFG, b) * o / b / 1e12, H100_HBM_TBS)})
  save_table(args.markdown, f"Decode (bench/decode.py), prompt {PROMPT}, {NEW} new tokens", table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
