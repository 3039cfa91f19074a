"""Data schema, latent statistics and small built-in datasets."""
