"""Precompute SVG latents with Ray Data: an image folder or Parquet -> latent Parquet shards.

Locally (starts an in-process Ray cluster):
    svg-ray precompute --input data/train --out outputs/latents --autoencoder ae.safetensors
On a cluster (the job's driver connects to it through RAY_ADDRESS):
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m pipelines.precompute --input s3://b/imagenet/train --out s3://b/latents \\
        --autoencoder s3://b/ae.safetensors --encode-gpus 1 --encoders 8 --flip
Rerunning the same command resumes a killed job; ``manifest.json`` appears when it is complete.
"""

from __future__ import annotations

import logging
import sys

from svg_ray.command import Command, Section
from svg_ray.data.precompute import PrecomputeConfig, run_precompute
from svg_ray.ray_cluster import RayConnection

COMMAND = Command(
    "svg-ray precompute",
    __doc__,
    [Section("precompute", PrecomputeConfig), Section("ray", RayConnection, group="ray")],
    recipe_job="precompute",
)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``svg-ray precompute`` / ``python -m pipelines.precompute``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = COMMAND.parse(argv)
    ray_cfg: RayConnection = cfg["ray"]
    started = False  # shut down only a cluster this call started, never a caller's

    def connect() -> None:
        nonlocal started
        started = ray_cfg.connect()

    try:
        # A cluster we joined may autoscale; the local one we start cannot.
        result = run_precompute(cfg["precompute"], connect, cluster_can_grow=ray_cfg.can_grow)
    finally:
        if started:
            import ray

            ray.shutdown()
    print(result.summary_line(), flush=True)
    print(f"[precompute] next: svg-ray train --data {result.out}", flush=True)
    return 0


if __name__ == "__main__":
    from svg_ray.cli import main as cli_main

    sys.exit(cli_main(["precompute", *sys.argv[1:]]))
