"""The SVG sampler as an HTTP service: config and bounds, request schema, the batched sampler,
model sources (bundle directory or MLflow registry), PNG encoding, the playground page, the
OpenAPI document and its docs page, and the checks ``svg-ray serve`` runs before Ray starts.

Ray Serve objects live in ``serve/app.py``; everything here runs without Ray.
"""

from svg_ray.serving.config import AppArgs, SamplerDefaults, ServerConfig
from svg_ray.serving.sampler import JobResult, SamplerModel
from svg_ray.serving.schema import GenerateRequest, GenerationJob, Limits, RequestError

__all__ = [
    "AppArgs",
    "GenerateRequest",
    "GenerationJob",
    "JobResult",
    "Limits",
    "RequestError",
    "SamplerDefaults",
    "SamplerModel",
    "ServerConfig",
]
