"""``svg-ray status``: what exists in a storage location and an MLflow store.

    svg-ray status                                   # ./outputs and the default sqlite store
    svg-ray status --storage s3://bucket/svg --tracking-uri http://mlflow:5000 --json

Storage is scanned for latent datasets (``manifest.json``: complete; ``job.json`` without a
manifest: a precompute in progress or killed, with its committed chunks), training runs (Ray
Train's ``checkpoint_manager_snapshot.json``: latest step and metrics, an exported bundle or
autoencoder) and sampler bundles. MLflow is asked for experiments, runs and registered models.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from svg_ray import storage
from svg_ray.data import schema

RUN_SNAPSHOT = "checkpoint_manager_snapshot.json"


@dataclass
class StorageReport:
    """Artifacts found under one storage root."""

    root: str
    datasets: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    bundles: list[str] = field(default_factory=list)
    autoencoders: list[str] = field(default_factory=list)


def _parent(uri: str) -> str:
    return uri.rsplit("/", 1)[0]


def scan_storage(root: str) -> StorageReport:
    """Find datasets, runs, bundles and autoencoder checkpoints below ``root`` (one listing)."""
    root = storage.absolute(root).rstrip("/")
    report = StorageReport(root=root)
    if not storage.exists(root):
        return report
    files = storage.list_files(root)
    names = set(files)
    for f in files:
        base = f.rsplit("/", 1)[-1]
        folder = _parent(f)
        if base == schema.MANIFEST:
            m = storage.read_json(f)
            report.datasets.append(
                {
                    "path": folder,
                    "complete": True,
                    "rows": m.get("num_rows"),
                    "skipped": m.get("num_skipped"),
                    "latent_shape": m.get("latent_shape"),
                    "autoencoder_id": m.get("autoencoder_id"),
                    "classes": len(m.get("class_names") or []),
                }
            )
        elif base == schema.JOB_FILE and f"{folder}/{schema.MANIFEST}" not in names:
            chunks = [g for g in files if g.startswith(f"{folder}/") and g.endswith(".json")]
            report.datasets.append(
                {
                    "path": folder,
                    "complete": False,
                    "committed_chunk_records": len(chunks) - 1,
                    "hint": "rerun the same precompute command to resume it",
                }
            )
        elif base == RUN_SNAPSHOT:
            snap = storage.read_json(f)
            latest = snap.get("latest_checkpoint_result") or {}
            bundle = f"{folder}/bundle/bundle.json"
            ae = f"{folder}/autoencoder.safetensors"
            report.runs.append(
                {
                    "path": folder,
                    "name": folder.rsplit("/", 1)[-1],
                    "checkpoints": len(snap.get("checkpoint_results") or []),
                    "latest_checkpoint": latest.get("checkpoint_dir_name"),
                    "metrics": latest.get("metrics") or {},
                    "bundle": _parent(bundle) if bundle in names else None,
                    "autoencoder": ae if ae in names else None,
                }
            )
        elif base == "bundle.json":
            report.bundles.append(folder)
        elif base.endswith(".safetensors") and "autoencoder" in base:
            report.autoencoders.append(f)
    return report


def scan_mlflow(tracking_uri: str, max_runs: int = 50) -> dict[str, Any]:
    """Experiments with their latest runs, and registered models with their versions."""
    import os
    from pathlib import Path

    from mlflow import MlflowClient

    from svg_ray.tracking import TAG_KIND, TAG_STORAGE

    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        if not db.exists():  # never create an empty store just by looking
            return {"tracking_uri": tracking_uri, "missing": True}
    # A status query should fail fast, not retry an unreachable server for minutes.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiments = []
    for exp in client.search_experiments():
        runs = client.search_runs(
            [exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=max_runs
        )
        experiments.append(
            {
                "name": exp.name,
                "id": exp.experiment_id,
                "runs": [
                    {
                        "run_id": r.info.run_id,
                        "name": r.info.run_name,
                        "status": r.info.status,
                        "kind": r.data.tags.get(TAG_KIND),
                        "storage": r.data.tags.get(TAG_STORAGE),
                        "metrics": {k: round(v, 6) for k, v in sorted(r.data.metrics.items())},
                    }
                    for r in runs
                ],
            }
        )
    models = []
    for rm in client.search_registered_models():
        versions = [
            {"version": int(v.version), "run_id": v.run_id, "source": v.source}
            for v in client.search_model_versions(f"name = '{rm.name}'")
        ]
        versions.sort(key=lambda v: int(v["version"]))  # type: ignore[arg-type]
        models.append({"name": rm.name, "versions": versions})
    return {"tracking_uri": tracking_uri, "experiments": experiments, "registered_models": models}


def render(report: StorageReport, mlflow: dict[str, Any] | None) -> str:
    """A human-readable summary with the next commands to run."""
    out = [f"storage {report.root}"]
    if not (report.datasets or report.runs or report.bundles or report.autoencoders):
        out.append("  (nothing yet: `svg-ray demo` runs every stage)")
    for d in report.datasets:
        if d["complete"]:
            out.append(
                f"  dataset  {d['path']}: {d['rows']} rows, latent {d['latent_shape']}, "
                f"{d['classes']} classes, {d['skipped']} skipped, autoencoder {d['autoencoder_id']}"
                f"\n           next: svg-ray train --data {d['path']}"
            )
        else:
            out.append(
                f"  dataset  {d['path']}: INCOMPLETE ({d['committed_chunk_records']} chunks "
                f"committed); {d['hint']}"
            )
    for r in report.runs:
        metrics = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in r["metrics"].items())  # fmt: skip
        line = f"  run      {r['path']}: {r['checkpoints']} checkpoint(s); latest {metrics or '-'}"
        if r["bundle"]:
            line += (
                f"\n           bundle: {r['bundle']}; next: svg-ray serve --model-uri {r['bundle']}"
            )
        if r["autoencoder"]:
            line += f"\n           autoencoder: {r['autoencoder']}; next: svg-ray precompute "
            line += f"--input <images> --out <latents> --autoencoder {r['autoencoder']}"
        out.append(line)
    run_bundles = {r["bundle"] for r in report.runs}
    for b in report.bundles:
        if b not in run_bundles:
            out.append(f"  bundle   {b}")
    if mlflow is not None:
        out.append(f"MLflow {mlflow['tracking_uri']}")
        if mlflow.get("missing"):
            out.append("  (no store yet: the first training run creates it)")
            return "\n".join(out)
        for exp in mlflow["experiments"]:
            if not exp["runs"]:
                continue
            out.append(f"  experiment {exp['name']!r}: {len(exp['runs'])} run(s)")
            for r in exp["runs"]:
                step = r["metrics"].get("step")
                out.append(
                    f"    {r['name']} [{r['kind'] or '-'}] {r['status']}"
                    + (f" at step {int(step)}" if step is not None else "")
                    + f" (run {r['run_id']})"
                )
        for m in mlflow["registered_models"]:
            latest = m["versions"][-1]["version"] if m["versions"] else None
            out.append(
                f"  model    {m['name']}: {len(m['versions'])} version(s)"
                + (
                    f"; serve: svg-ray serve --model-uri models:/{m['name']}/{latest}"
                    if latest
                    else ""
                )
            )
        if mlflow["tracking_uri"].startswith("sqlite:"):
            out.append(f"  UI: mlflow ui --backend-store-uri {mlflow['tracking_uri']}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``svg-ray status``."""
    from svg_ray.tracking import default_tracking_uri

    p = argparse.ArgumentParser(prog="svg-ray status", description=__doc__.splitlines()[0])
    p.add_argument("--storage", default="outputs", help="local folder or s3:// prefix to scan")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or the sqlite store in ./outputs)",
    )
    p.add_argument("--no-mlflow", action="store_true", help="skip the MLflow query")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    a = p.parse_args(argv)
    report = scan_storage(a.storage)
    mlflow = None if a.no_mlflow else scan_mlflow(a.tracking_uri or default_tracking_uri())
    if a.json:
        print(json.dumps({"storage": asdict(report), "mlflow": mlflow}, indent=2))
    else:
        print(render(report, mlflow))
    return 0


if __name__ == "__main__":
    from svg_ray.cli import main as cli_main

    sys.exit(cli_main(["status", *sys.argv[1:]]))
