"""Inference: prefill + latent-cache decode, sampling, MTP speculative decoding, tokenizer."""
from dsv3_jax.inference.cache import (LatentCache, cache_bytes_per_token, cache_values_per_token,
                                      init_cache)
from dsv3_jax.inference.decode import (absorb_weights, abstract_decode_step, decode_attention,
                                       decode_attention_steps, decode_forward, mtp_decode_forward,
                                       mtp_prefill, prefill)
from dsv3_jax.inference.generate import GenerationOutput, Generator, generate
from dsv3_jax.inference.sampling import SamplingParams, probabilities, sample
from dsv3_jax.inference.speculative import make_mtp_agree, rejection_sample
from dsv3_jax.inference.state import GenState
from dsv3_jax.inference.tokenizer import Tokenizer

__all__ = [
    "LatentCache", "init_cache", "cache_values_per_token", "cache_bytes_per_token",
    "absorb_weights", "abstract_decode_step", "decode_attention", "decode_attention_steps",
    "decode_forward",
    "mtp_decode_forward", "prefill",
    "mtp_prefill", "Generator", "GenerationOutput", "generate", "SamplingParams", "probabilities",
    "sample", "make_mtp_agree", "rejection_sample", "GenState", "Tokenizer",
]
