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

import argparse
import sys

from svg_ray.config import add_arguments, parse_arguments
from svg_ray.losses import AELossConfig
from svg_ray.training.autoencoder import AETrainConfig, launch
from svg_ray.training.common import RunSettings


def main(argv: list[str] | None = None) -> int:
    """Parse flags, validate, train; prints the summary and the next command."""
    p = argparse.ArgumentParser(prog="svg-ray train-ae", description=__doc__.splitlines()[0])
    add_arguments(p, AETrainConfig)
    add_arguments(p.add_argument_group("loss"), AELossConfig)
    # Its own default run name: a diffusion run under the same storage path must not collide.
    add_arguments(p.add_argument_group("run"), RunSettings, defaults=RunSettings(name="svg-ae"))
    args = vars(p.parse_args(argv))
    cfg = parse_arguments(AETrainConfig, args, "train")
    loss = parse_arguments(AELossConfig, args, "ae")
    run = parse_arguments(RunSettings, args, "run")
    summary = launch(cfg, loss, run)
    print(
        f"[train-ae] done: step {summary['metrics'].get('step')} L1 "
        f"{summary['metrics'].get('l1')}; losses {summary['losses']}; "
        f"autoencoder: {summary['autoencoder']}"
    )
    print(
        f"[train-ae] MLflow: {summary['tracking_uri']} (run {summary['run_id']}); "
        f"UI: mlflow ui --backend-store-uri {summary['tracking_uri']}"
    )
    print(
        "[train-ae] next: svg-ray precompute --input <images> --out <latents> "
        f"--autoencoder {summary['autoencoder']}"
    )
    return 0


if __name__ == "__main__":
    from svg_ray.cli import main as cli_main

    sys.exit(cli_main(["train-ae", *sys.argv[1:]]))
