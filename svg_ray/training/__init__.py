"""Ray Train jobs: stage 1 (autoencoder) and stage 2 (diffusion), with shared plumbing."""
