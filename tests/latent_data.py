"""Synthetic latent datasets for the tests (they live in ``svg_ray.testing.latents``)."""

from svg_ray.testing.latents import make_latent_dataset, write_precomputed

__all__ = ["make_latent_dataset", "write_precomputed"]
