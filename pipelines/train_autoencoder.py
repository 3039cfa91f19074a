"""Ray Train job: the SVG autoencoder (residual encoder + mask token + decoder; DINO frozen).

    svg-ray train-ae --input data/imagenet/train --dino-weights dinov3_vits16plus.pth \\
        --lpips-vgg-weights vgg16-397923af.pth --num-workers 8 --use-gpu
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
        python -m pipelines.train_autoencoder --input s3://bucket/imagenet/train \\
        --dino-weights s3://bucket/w/dinov3.pth --lpips-vgg-weights s3://bucket/w/vgg16.pth \\
        --storage-path s3://bucket/runs --num-workers 8 --use-gpu

Resubmitting with the same --name and --storage-path resumes the run (and its MLflow run).
"""

from __future__ import annotations

import sys

from svg_ray.command import Command, Section
from svg_ray.losses import AELossConfig
from svg_ray.training.autoencoder import AETrainConfig, launch
from svg_ray.training.common import RunSettings

COMMAND = Command(
    "svg-ray train-ae",
    __doc__,
    [
        Section("train", AETrainConfig),
        Section("loss", AELossConfig, group="loss"),
        # Its own default run name: a diffusion run under the same storage path must not collide.
        Section("run", RunSettings, group="run", defaults={"name": "svg-ae"}),
    ],
    recipe_job="train-ae",
)


def main(argv: list[str] | None = None) -> int:
    """Parse flags, validate, train; prints the summary and the next command."""
    cfg = COMMAND.parse(argv)
    result = launch(cfg["train"], cfg["loss"], cfg["run"])
    print(
        f"[train-ae] done: step {result.step} L1 {result.metrics.get('l1')}; "
        f"losses {result.losses}; autoencoder: {result.autoencoder}"
    )
    print(
        f"[train-ae] MLflow: {result.tracking_uri} (run {result.run_id}); "
        f"UI: mlflow ui --backend-store-uri {result.tracking_uri}"
    )
    print(
        "[train-ae] next: svg-ray precompute --input <images> --out <latents> "
        f"--autoencoder {result.autoencoder}"
    )
    return 0


if __name__ == "__main__":
    from svg_ray.cli import main as cli_main

    sys.exit(cli_main(["train-ae", *sys.argv[1:]]))
