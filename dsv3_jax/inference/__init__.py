"""Inference: prefill + latent-cache decode, sampling, MTP speculative decoding."""
