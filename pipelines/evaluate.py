"""Evaluation jobs on Ray: generation (FID, IS), reconstruction (rFID, PSNR, SSIM, LPIPS), probe.

    svg-ray eval generation --bundle outputs/runs/svg-run/bundle --num-images 50000 \\
        --reference VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth --sampler-cfg-scale 1.5
    svg-ray eval reconstruction --autoencoder ae.safetensors --data data/imagenet/val \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth \\
        --lpips-vgg-weights vgg16-397923af.pth
    svg-ray eval probe --autoencoder ae.safetensors --data data/train --test-data data/val
    ray job submit --working-dir . -- python -m pipelines.evaluate generation ... \\
        --workers 8 --gpus-per-worker 1 --out s3://bucket/eval

Results: <out>/<name>/results.json, report.png and report.html, and the same in MLflow.
"""

from __future__ import annotations

import argparse
import sys

from svg_ray.config import add_arguments, parse_arguments
from svg_ray.evaluation.config import (
    TASKS,
    EvalRun,
    GenerationEval,
    InceptionSettings,
    ProbeEval,
    ReconstructionEval,
)
from svg_ray.evaluation.launch import launch
from svg_ray.flow.samplers import SamplerConfig

_TASK_HELP = {
    "generation": "FID and Inception Score of a sampler bundle against reference statistics",
    "reconstruction": "rFID, PSNR, SSIM and LPIPS of an autoencoder on held-out images",
    "probe": "linear probe on the latent: DINO part, residual part, both",
}


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per task; flags come from the settings dataclasses."""
    p = argparse.ArgumentParser(prog="svg-ray eval", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="task", required=True, metavar="{" + ",".join(TASKS) + "}")
    for task in TASKS:
        sp = sub.add_parser(task, help=_TASK_HELP[task], description=_TASK_HELP[task])
        if task == "generation":
            add_arguments(sp, GenerationEval)
            add_arguments(sp.add_argument_group("sampler"), SamplerConfig, prefix="sampler_")
        elif task == "reconstruction":
            add_arguments(sp, ReconstructionEval)
        else:
            add_arguments(sp, ProbeEval)
        if task != "probe":
            add_arguments(sp.add_argument_group("inception"), InceptionSettings)
        add_arguments(sp.add_argument_group("run"), EvalRun, defaults=EvalRun(name=task))
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse flags, validate, evaluate; prints a one-line summary and where results went."""
    args = vars(build_parser().parse_args(argv))
    task = args["task"]
    run = parse_arguments(EvalRun, args, "eval")
    if task == "generation":
        summary = launch(
            task,
            run,
            generation=parse_arguments(GenerationEval, args, "eval"),
            inception=parse_arguments(InceptionSettings, args, "eval"),
            sampler=parse_arguments(SamplerConfig, args, "sampler", prefix="sampler_"),
        )
    elif task == "reconstruction":
        summary = launch(
            task,
            run,
            reconstruction=parse_arguments(ReconstructionEval, args, "eval"),
            inception=parse_arguments(InceptionSettings, args, "eval"),
        )
    else:
        summary = launch(task, run, probe=parse_arguments(ProbeEval, args, "eval"))
    shown = {k: v for k, v in summary["metrics"].items() if not k.endswith("_std")}
    print(
        f"[eval] {task}: "
        + ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
        + f" ({summary['seconds']:.1f} s)"
    )
    print(f"[eval] results: {summary['results']}; report: {summary['report']}")
    if summary.get("run_id"):
        print(
            f"[eval] MLflow: {summary['tracking_uri']} (run {summary['run_id']}); "
            f"UI: mlflow ui --backend-store-uri {summary['tracking_uri']}"
        )
    return 0


if __name__ == "__main__":
    from svg_ray.cli import main as cli_main

    sys.exit(cli_main(["eval", *sys.argv[1:]]))
