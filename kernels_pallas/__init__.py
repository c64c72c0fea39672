"""Pallas kernels (TPU Mosaic and GPU) with pure-jnp references and backend dispatch.

This package imports nothing from the model (see the README's dependency diagram).
"""
from dsv3_jax.kernels_pallas.backend import Backend, Impl, select

__all__ = ["Backend", "Impl", "select"]
