"""Pallas kernels (TPU Mosaic and GPU) with pure-jnp references and backend dispatch.

This package imports nothing from the model (see the README's dependency diagram; only the
leaf `dsv3_jax.errors`, tests/test_import_direction.py checks).
"""
from dsv3_jax.kernels_pallas.backend import Backend, Impl, KernelRequestError, select
from dsv3_jax.kernels_pallas.fp8 import fp8_matmul, fp8_weight_matmul, quantize_activations
from dsv3_jax.kernels_pallas.grouped_matmul import (grouped_matmul, grouped_matmul_dlhs,
                                                    grouped_matmul_fp8, transposed_grouped_matmul)
from dsv3_jax.kernels_pallas.mla_attention import mla_attention, mla_attention_reference
from dsv3_jax.kernels_pallas.mla_decode import mla_decode, mla_decode_reference

__all__ = ["Backend", "Impl", "KernelRequestError", "select", "mla_attention",
           "mla_attention_reference", "mla_decode",
           "mla_decode_reference", "quantize_activations", "fp8_matmul", "fp8_weight_matmul",
           "grouped_matmul", "grouped_matmul_dlhs", "grouped_matmul_fp8",
           "transposed_grouped_matmul"]
