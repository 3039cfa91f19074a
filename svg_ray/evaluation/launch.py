"""One call per evaluation task: resolve the model, open the MLflow run, evaluate, publish.

``--bundle`` and ``--autoencoder`` also take registered models (``models:/<name>/<version>``,
``/latest``, ``@<alias>``): resolved here before any work, so a wrong name, version or alias is a
one-line error. The evaluation run is linked to what it scored (tags, an MLflow model input) and
the model version gets the headline metrics as tags (``report.tag_model_version``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

from svg_ray import storage
from svg_ray.evaluation import jobs, report
from svg_ray.evaluation.config import (
    EvalRun,
    GenerationEval,
    InceptionSettings,
    ProbeEval,
    ReconstructionEval,
)
from svg_ray.flow.samplers import SamplerConfig

STAGED = "model"
"""Folder under the results where a registry model served only by the tracking server is copied
for the evaluation (workers on other nodes cannot read the driver's temporary download)."""


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
    settings = generation or reconstruction or probe
    if settings is None:
        raise ValueError(f"no settings for evaluation task {task!r}")
    attr = "bundle" if isinstance(settings, GenerationEval) else "autoencoder"

    with _model_path(getattr(settings, attr), run, task) as (path, scored):
        settings = copy.copy(settings)  # the caller's settings keep the URI as given
        setattr(settings, attr, path)

        def validated() -> None:  # inputs are fine: a typo never leaves a failed run in MLflow
            nonlocal tr
            tr = report.open_tracking(run, task)
            report.link_model(tr, scored)

        try:
            if task == "generation":
                assert isinstance(settings, GenerationEval)
                assert inception is not None and sampler is not None
                result = jobs.evaluate_generation(settings, inception, sampler, run, validated)
            elif task == "reconstruction":
                assert isinstance(settings, ReconstructionEval) and inception is not None
                result = jobs.evaluate_reconstruction(settings, inception, run, validated)
            elif task == "probe":
                assert isinstance(settings, ProbeEval)
                result = jobs.evaluate_probe(settings, run, validated)
            else:
                raise ValueError(f"unknown evaluation task {task!r}")
            where = report.publish(result, run, tr)
            report.tag_model_version(tr, scored, result)
        except BaseException:
            report.mark_failed(tr)
            raise
    return {"task": task, "metrics": result.metrics, "seconds": result.seconds, **where}


@contextlib.contextmanager
def _model_path(uri: str, run: EvalRun, task: str) -> Iterator[tuple[str, report.ScoredModel]]:
    """(a path the jobs read, what is scored) for a bundle/autoencoder path or registry URI."""
    from svg_ray.mlflow_model import AE_FILE, AUTOENCODER, SAMPLER
    from svg_ray.serving import source

    if not source.is_registry_uri(uri):
        yield uri, report.ScoredModel(uri=uri, training_run=_bundle_run(uri))
        return
    option = "--tracking-uri"
    kind = SAMPLER if task == "generation" else None  # a bundle also holds an autoencoder
    model = source.resolve(uri, run.tracking_uri, kind, option=option)
    scored = report.ScoredModel(uri=uri, registry=model, training_run=model.run_id)
    with _readable_everywhere(model, run) as folder:
        yield (storage.join(folder, AE_FILE) if model.kind == AUTOENCODER else folder), scored


@contextlib.contextmanager
def _readable_everywhere(model: Any, run: EvalRun) -> Iterator[str]:
    """The version's weights folder as a path every worker reads: in place on S3 or local disk;
    a download through the tracking server is copied under the results when those are on S3."""
    import pyarrow.fs as pafs

    from svg_ray.serving import source

    direct = source.reads_in_place(model.weights)
    if direct is not None:
        yield direct
        return
    with source.local_files(model) as local:
        if not storage.is_s3(run.results_uri):
            yield local
            return
        staged = storage.join(run.results_uri, STAGED)
        fs, path = storage.filesystem(staged)
        pafs.copy_files(
            local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
        )
        try:
            yield staged
        finally:
            fs.delete_dir(path)


def _bundle_run(uri: str) -> str | None:
    """The MLflow run that trained a sampler bundle folder (from its bundle.json), if known."""
    meta = storage.join(uri, "bundle.json")
    try:
        if storage.exists(meta):
            return storage.read_json(meta).get("source", {}).get("mlflow_run_id") or None
    except (OSError, ValueError):
        pass  # the job's own validation reports an unreadable bundle
    return None
