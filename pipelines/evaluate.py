"""Evaluation jobs on Ray: generation (FID, IS), reconstruction (rFID, PSNR, SSIM, LPIPS), probe.

    svg-ray eval generation --bundle outputs/runs/svg-run/bundle --num-images 50000 \\
        --reference VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth --sampler-cfg-scale 1.5
    svg-ray eval reconstruction --autoencoder ae.safetensors --input data/imagenet/val \\
        --inception-weights weights-inception-2015-12-05-6726825d.pth \\
        --lpips-vgg-weights vgg16-397923af.pth
    svg-ray eval probe --autoencoder ae.safetensors --input data/train --test-input data/val
    ray job submit --working-dir . -- python -m pipelines.evaluate generation ... \\
        --num-workers 8 --gpus-per-worker 1 --out s3://bucket/eval

Results: <out>/<name>/results.json, report.png and report.html, and the same in MLflow.
"""

from __future__ import annotations

import argparse
import sys

from svg_ray.command import Command, Section
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


def _sections(task: str) -> list[Section]:
    """The settings of one task: its own, the sampler's or Inception's, and the run's."""
    own = {"generation": GenerationEval, "reconstruction": ReconstructionEval, "probe": ProbeEval}
    # The flags of an earlier vocabulary still work, with a deprecation warning.
    renamed = {"data": "input", "test_data": "test_input"} if task != "generation" else {}
    sections = [Section("eval", own[task], aliases=renamed)]
    if task == "generation":
        sections.append(Section("sampler", SamplerConfig, prefix="sampler_", group="sampler"))
    if task != "probe":
        sections.append(Section("inception", InceptionSettings, group="inception"))
    sections.append(
        Section(
            "run", EvalRun, group="run", defaults={"name": task}, aliases={"workers": "num_workers"}
        )
    )
    return sections


COMMANDS = {
    task: Command(
        f"svg-ray eval {task}",
        _TASK_HELP[task],
        _sections(task),
        recipe_job="eval-generation" if task == "generation" else None,
    )
    for task in TASKS
}


def build_parser() -> argparse.ArgumentParser:
    """One subcommand per task; flags come from the settings dataclasses."""
    p = argparse.ArgumentParser(prog="svg-ray eval", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="task", required=True, metavar="{" + ",".join(TASKS) + "}")
    for task in TASKS:
        COMMANDS[task].add_to(
            sub.add_parser(task, help=_TASK_HELP[task], description=_TASK_HELP[task])
        )
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse flags, validate, evaluate; prints a one-line summary and where results went."""
    args = vars(build_parser().parse_args(argv))
    task = args.pop("task")
    cfg = COMMANDS[task].build(args)
    summary = launch(
        task,
        cfg["run"],
        **{task: cfg["eval"]},
        inception=cfg.get("inception"),
        sampler=cfg.get("sampler"),
    )
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
