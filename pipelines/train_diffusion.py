"""Ray Train job: the SVG diffusion transformer on precomputed latents.

    svg-ray train --data outputs/latents --model SVG-XL --steps 400000 --num-workers 8 --use-gpu
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
        python -m pipelines.train_diffusion --data s3://bucket/latents --storage-path s3://bucket/runs

Resubmitting with the same --name and --storage-path resumes the run (and its MLflow run).
"""

from __future__ import annotations

import argparse
import sys

from svg_ray.config import add_arguments, parse_arguments
from svg_ray.training.common import RunSettings
from svg_ray.training.diffusion import DiffusionTrainConfig, launch


def main(argv: list[str] | None = None) -> int:
    """Parse flags, validate, train; prints the summary and the next command."""
    p = argparse.ArgumentParser(prog="svg-ray train", description=__doc__.splitlines()[0])
    add_arguments(p, DiffusionTrainConfig)
    add_arguments(p.add_argument_group("run"), RunSettings)
    args = vars(p.parse_args(argv))
    cfg = parse_arguments(DiffusionTrainConfig, args, "train")
    run = parse_arguments(RunSettings, args, "run")
    summary = launch(cfg, run)
    print(
        f"[train] done: step {summary['metrics'].get('step')} loss "
        f"{summary['metrics'].get('loss')}; sampler bundle: {summary['bundle']}"
    )
    print(
        f"[train] MLflow: {summary['tracking_uri']} (run {summary['run_id']}); "
        f"UI: mlflow ui --backend-store-uri {summary['tracking_uri']}"
    )
    print(f"[train] next: svg-ray serve --bundle {summary['bundle']}")
    return 0


if __name__ == "__main__":
    from svg_ray.cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
