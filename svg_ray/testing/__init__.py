"""Support for the test suite and the benchmarks: a local S3 server, synthetic latent datasets in
the precompute job's on-disk format, and process helpers. No job imports this package."""
