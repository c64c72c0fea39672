"""Serving: the continuous-batching engine over a paged latent cache (`engine`, no HTTP
dependencies) and the OpenAI-compatible HTTP server (`server`, FastAPI; imported on use)."""
from dsv3_jax.serving.engine import Engine, EngineClosed, Request, RequestError, RequestParams

__all__ = ["Engine", "EngineClosed", "Request", "RequestError", "RequestParams"]
