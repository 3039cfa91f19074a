"""SeaweedFS S3 server fixture (filled in by the precompute work)."""
