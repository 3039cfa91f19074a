"""One call per evaluation task: open the MLflow run, evaluate, publish; used by the CLI."""

from __future__ import annotations

from typing import Any

from svg_ray.evaluation import jobs, report
from svg_ray.evaluation.config import (
    EvalRun,
    GenerationEval,
    InceptionSettings,
    ProbeEval,
    ReconstructionEval,
)
from svg_ray.flow.samplers import SamplerConfig


def launch(
    task: str,
    run: EvalRun,
    *,
    generation: GenerationEval | None = None,
    reconstruction: ReconstructionEval | None = None,
    probe: ProbeEval | None = None,
    inception: InceptionSettings | None = None,
    sampler: SamplerConfig | None = None,
) -> dict[str, Any]:
    """Run ``task`` with its settings; returns metrics and where the results went."""
    tr: report.TrackingRun | None = None

    def validated() -> None:  # inputs are fine: a typo never leaves a failed run in MLflow
        nonlocal tr
        tr = report.open_tracking(run, task)

    try:
        if task == "generation":
            assert generation is not None and inception is not None and sampler is not None
            result = jobs.evaluate_generation(generation, inception, sampler, run, validated)
        elif task == "reconstruction":
            assert reconstruction is not None and inception is not None
            result = jobs.evaluate_reconstruction(reconstruction, inception, run, validated)
        elif task == "probe":
            assert probe is not None
            result = jobs.evaluate_probe(probe, run, validated)
        else:
            raise ValueError(f"unknown evaluation task {task!r}")
        where = report.publish(result, run, tr)
    except BaseException:
        report.mark_failed(tr)
        raise
    return {"task": task, "metrics": result.metrics, "seconds": result.seconds, **where}
