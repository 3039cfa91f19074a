"""Ray Train job: the SVG diffusion transformer on precomputed latents.

    svg-ray train --data outputs/latents --model SVG-XL --steps 400000 --num-workers 8 --use-gpu
    svg-ray train --config train.yaml --steps 1000     # flags override the file
    ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- \\
        python -m pipelines.train_diffusion --data s3://bucket/latents --storage-path s3://bucket/runs

Resubmitting with the same --name and --storage-path resumes the run (and its MLflow run).
"""

from __future__ import annotations

import sys

from svg_ray.command import Command, Section
from svg_ray.training.common import RunSettings
from svg_ray.training.diffusion import DiffusionTrainConfig, launch

COMMAND = Command(
    "svg-ray train",
    __doc__,
    [Section("train", DiffusionTrainConfig), Section("run", RunSettings, group="run")],
    recipe_job="train",
)


def main(argv: list[str] | None = None) -> int:
    """Parse flags, validate, train; prints the summary and the next command."""
    cfg = COMMAND.parse(argv)
    result = launch(cfg["train"], cfg["run"])
    print(
        f"[train] done: step {result.step} loss {result.metrics.get('loss')}; "
        f"sampler bundle: {result.bundle}"
    )
    print(
        f"[train] MLflow: {result.tracking_uri} (run {result.run_id}); "
        f"UI: mlflow ui --backend-store-uri {result.tracking_uri}"
    )
    print(f"[train] next: svg-ray serve --bundle {result.bundle}")
    return 0


if __name__ == "__main__":
    from svg_ray.cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
