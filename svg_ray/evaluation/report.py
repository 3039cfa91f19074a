"""Publishing an evaluation: results.json, a PNG report with plots, an HTML page, MLflow.

The three files go to ``<out>/<name>/`` (local or s3://) and, as artifacts under ``evaluation/``,
to the MLflow run, which also gets every metric and the flattened config as params. A rerun with
the same name and output folder re-attaches to the same MLflow run (``find_or_create_run``).

Lineage: the run is tagged with the model it scored (``svg_ray.model_uri``, and for a registered
model ``svg_ray.model_version`` = ``<name>/<version>`` plus an MLflow model input) and with the
run that trained it (``svg_ray.training_run``); the model version gets the headline metrics
(``fid``, ``is``, ``rfid``, ...) and ``eval_run_id`` as tags.
"""

from __future__ import annotations

import base64
import html
import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from svg_ray import storage
from svg_ray.evaluation.config import EvalRun
from svg_ray.evaluation.jobs import EvalResult

RESULTS_FILE = "results.json"
REPORT_PNG = "report.png"
REPORT_HTML = "report.html"
ARTIFACT_DIR = "evaluation"


def _grid(images: np.ndarray, nrow: int) -> np.ndarray:
    """uint8 (n, H, W, 3) -> one grid image."""
    import torch

    from svg_ray.generate import image_grid

    return image_grid(torch.as_tensor(images), max(1, min(nrow, len(images)))).numpy()


def _metrics_title(result: EvalResult) -> str:
    """The headline numbers (no spreads, no training accuracies), wrapped to the figure."""
    import textwrap

    shown = {k: v for k, v in result.metrics.items() if not k.endswith("_std") and "train" not in k}
    text = f"{result.task}: " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items())
    return "\n".join(textwrap.wrap(text, 110))


def render_png(result: EvalResult) -> bytes:
    """The report figure of ``result`` as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = result.plots
    if result.task == "generation":
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
        if len(p["preview"]):
            axes[0].imshow(_grid(p["preview"], 4))
        axes[0].set_title(f"first {len(p['preview'])} samples")
        axes[0].axis("off")
        for name in ("reference", "generated"):
            ev = np.asarray(p[f"spectrum_{name}"])
            ev = ev[ev > ev[0] * 1e-10]  # the null space of a covariance of n < d features
            axes[1].semilogy(np.arange(1, len(ev) + 1), ev, label=name)
        axes[1].set(title="covariance spectrum (Inception pool)", xlabel="eigenvalue rank")
        axes[1].legend()
        axes[2].bar(np.arange(len(p["is_splits"])), p["is_splits"])
        axes[2].set_xticks(np.arange(len(p["is_splits"])))
        axes[2].set(title="Inception Score per split", xlabel="split")
    elif result.task == "reconstruction":
        fig = plt.figure(figsize=(15, 8))
        top = fig.add_subplot(2, 1, 1)
        pairs = np.concatenate([p["preview_real"], p["preview_recon"]])
        if len(pairs):
            top.imshow(_grid(pairs, max(1, len(p["preview_real"]))))
        top.set_title("top: held-out images, bottom: reconstructions")
        top.axis("off")
        for i, (name, unit) in enumerate((("psnr", "dB"), ("ssim", ""), ("lpips", ""))):
            ax = fig.add_subplot(2, 3, 4 + i)
            ax.hist(p[name], bins=min(50, max(5, len(p[name]) // 4)))
            ax.set(title=f"{name.upper()} per image", xlabel=unit)
    else:
        fig, ax = plt.subplots(figsize=(7, 4.8))
        names = list(p["accuracy"])
        bars = ax.bar(names, [p["accuracy"][n] for n in names], color=["C0", "C1", "C2"])
        ax.bar_label(bars, fmt="%.3f")
        ax.axhline(p["chance"], color="k", ls="--", label="majority class")
        ax.set(title="linear probe, test accuracy", ylim=(0, 1), ylabel="top-1 accuracy")
        ax.legend()
    fig.suptitle(_metrics_title(result), fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def render_html(result: EvalResult, png: bytes) -> str:
    """A self-contained page: metrics table, the figure (inline), details and config."""
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.6g}</td></tr>" for k, v in result.metrics.items()
    )
    img = base64.b64encode(png).decode()
    details = html.escape(json.dumps(result.details, indent=2, default=str))
    config = html.escape(json.dumps(result.config, indent=2, default=str))
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>svg-ray eval: {result.task}"
        "</title><style>body{font-family:sans-serif;margin:2em}td{padding:2px 12px}"
        "table{border-collapse:collapse}tr:nth-child(odd){background:#f3f3f3}</style></head>"
        f"<body><h1>svg-ray evaluation: {result.task}</h1><table>{rows}</table>"
        f"<p><img alt='report' src='data:image/png;base64,{img}' style='max-width:100%'></p>"
        f"<h2>details</h2><pre>{details}</pre><h2>config</h2><pre>{config}</pre></body></html>"
    )


TAG_MODEL_URI = "svg_ray.model_uri"
TAG_MODEL_VERSION = "svg_ray.model_version"
TAG_TRAINING_RUN = "svg_ray.training_run"
TAG_EVAL_TASK = "svg_ray.eval_task"
EVAL_RUN_TAG = "eval_run_id"
"""Model-version tag naming the evaluation run whose metrics the version carries."""
SHORT_NAMES = {"inception_score": "is"}


@dataclass
class ScoredModel:
    """What an evaluation scored: the URI as given, its registry version, its training run."""

    uri: str
    registry: Any = None
    """``serving.source.RegistryModel`` for a ``models:/`` URI, else None."""
    training_run: str | None = None
    """The MLflow run that trained it, when known."""


@dataclass
class TrackingRun:
    """The MLflow run an evaluation logs to."""

    tracking_uri: str
    run_id: str


def open_tracking(run: EvalRun, task: str) -> TrackingRun | None:
    """Create (or re-attach to) the MLflow run before any work, so a clash fails early."""
    if not run.mlflow:
        return None
    from svg_ray import tracking

    uri = run.tracking_uri or tracking.default_tracking_uri()
    run_id, _ = tracking.find_or_create_run(
        uri, run.experiment, run.name, run.results_uri, kind=f"eval-{task}"
    )
    return TrackingRun(uri, run_id)


def link_model(tr: TrackingRun | None, scored: ScoredModel) -> None:
    """Tag the evaluation run with the model it scores and the run that trained it; a logged
    model becomes the run's MLflow model input (the UI links the two)."""
    if tr is None:
        return
    from mlflow.entities import LoggedModelInput, RunTag

    from svg_ray.tracking import RunLogger

    tags = {TAG_MODEL_URI: scored.uri}
    if scored.training_run:
        tags[TAG_TRAINING_RUN] = scored.training_run
    model = scored.registry
    client = RunLogger(tr.tracking_uri, tr.run_id).client
    if model is not None:
        tags[TAG_MODEL_VERSION] = f"{model.name}/{model.version}"
        if model.model_id:
            client.log_inputs(tr.run_id, models=[LoggedModelInput(model.model_id)])
    client.log_batch(tr.run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def tag_model_version(tr: TrackingRun | None, scored: ScoredModel, result: EvalResult) -> None:
    """Put the headline metrics (no spreads) and this run's id on the scored model version."""
    model = scored.registry
    if tr is None or model is None:
        return
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tr.tracking_uri, registry_uri=model.tracking_uri)
    client.set_tag(tr.run_id, TAG_EVAL_TASK, result.task)
    tags = {
        SHORT_NAMES.get(k, k): f"{v:.6g}"
        for k, v in result.metrics.items()
        if not k.endswith("_std")
    }
    tags[EVAL_RUN_TAG] = tr.run_id
    for key, value in tags.items():
        client.set_model_version_tag(model.name, model.version, key, value)


def mark_failed(tr: TrackingRun | None) -> None:
    """Record a failed evaluation in MLflow (best effort: the original error matters more)."""
    if tr is None:
        return
    try:
        from svg_ray.tracking import RunLogger

        RunLogger(tr.tracking_uri, tr.run_id).client.set_terminated(tr.run_id, "FAILED")
    except Exception as e:  # never mask the evaluation's own error
        print(f"[eval] could not mark MLflow run {tr.run_id} failed: {e}", flush=True)


def publish(result: EvalResult, run: EvalRun, tr: TrackingRun | None) -> dict[str, Any]:
    """Write results.json, report.png and report.html; log metrics, params and files to MLflow.

    Returns where things went: ``results``, ``report``, ``tracking_uri`` and ``run_id``.
    """
    from svg_ray import tracking

    where: dict[str, Any] = {
        "results": storage.join(run.results_uri, RESULTS_FILE),
        "report": storage.join(run.results_uri, REPORT_HTML),
        "tracking_uri": tr.tracking_uri if tr else None,
        "run_id": tr.run_id if tr else None,
    }
    doc = result.to_json()
    doc["mlflow"] = {"tracking_uri": where["tracking_uri"], "run_id": where["run_id"]}
    png = render_png(result)
    files = {
        RESULTS_FILE: json.dumps(doc, indent=2, sort_keys=True, default=str).encode(),
        REPORT_PNG: png,
        REPORT_HTML: render_html(result, png).encode(),
    }
    for name, data in files.items():
        storage.write_bytes(storage.join(run.results_uri, name), data)
    if tr is not None:
        tracking.log_params_or_refuse_changes(tr.tracking_uri, tr.run_id, result.config)
        logger = tracking.RunLogger(tr.tracking_uri, tr.run_id)
        logger.metrics(result.metrics, step=0)
        with tempfile.TemporaryDirectory() as d:
            for name, data in files.items():
                Path(d, name).write_bytes(data)
            logger.artifacts(d, ARTIFACT_DIR)
        logger.set_tag("svg_ray.results", where["results"])
        logger.finish()
    return where
