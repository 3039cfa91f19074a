"""What exists in a storage location and an MLflow store, and the command that uses it next.

    svg-ray status                                   # ./outputs and the default sqlite store
    svg-ray status --storage s3://bucket/svg --tracking-uri http://mlflow:5000 --json
    svg-ray status --model svg-xl@prod               # one model version's lineage

Storage is scanned for latent datasets (``manifest.json``: complete; ``job.json`` without a
manifest: a precompute in progress or killed, with its committed chunks), training runs (Ray
Train's ``checkpoint_manager_snapshot.json``: latest step and metrics, an exported bundle or
autoencoder) and sampler bundles. MLflow is asked for experiments, runs and registered models
(kind, versions, aliases, evaluation tags). ``--model`` follows one version back and forth:
evaluations <- model version <- training run (commit, versions) <- dataset <- autoencoder.
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
                    "skipped": len(m.get("skipped") or []),
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
    models = [_registered_model(client, rm) for rm in client.search_registered_models()]
    return {"tracking_uri": tracking_uri, "experiments": experiments, "registered_models": models}


def _registered_model(client: Any, rm: Any) -> dict[str, Any]:
    """One registered model: kind, versions (with evaluation tags) and aliases."""
    from svg_ray.mlflow_model import MODEL_KIND_TAG
    from svg_ray.tracking import TAG_STORAGE

    versions = []
    for v in client.search_model_versions(f"name = '{rm.name}'"):
        tags = dict(v.tags or {})
        versions.append(
            {
                "version": int(v.version),
                "run_id": v.run_id,
                "source": v.source,
                "kind": tags.get(MODEL_KIND_TAG) or _kind_from_source(str(v.source)),
                "evaluation": {k: tags[k] for k in EVAL_TAGS if k in tags},
            }
        )
    versions.sort(key=lambda v: int(v["version"]))
    latest = versions[-1] if versions else None
    storage_path = None
    if latest is not None and latest["kind"] == "autoencoder" and latest["run_id"]:
        from mlflow.exceptions import MlflowException

        try:  # precompute takes the exported file from the run's storage folder
            storage_path = client.get_run(latest["run_id"]).data.tags.get(TAG_STORAGE)
        except MlflowException:  # the run was deleted; the version outlives it
            storage_path = None
    return {
        "name": rm.name,
        "kind": latest["kind"] if latest else None,
        "versions": versions,
        "aliases": {a: int(v) for a, v in sorted((rm.aliases or {}).items())},
        "run_storage": storage_path,
    }


EVAL_TAGS = ("fid", "is", "rfid", "psnr", "ssim", "lpips", "eval_run_id")
"""Model-version tags an evaluation sets (svg_ray.evaluation.report.tag_model_version)."""


def _kind_from_source(source: str) -> str | None:
    """Kind of a version registered as a plain folder (before models were MLflow models)."""
    name = source.rstrip("/").rsplit("/", 1)[-1]
    return {"bundle": "sampler", "autoencoder": "autoencoder"}.get(name)


def _next_for_model(m: dict[str, Any]) -> str:
    """What to do with a registered model, by kind."""
    if not m["versions"]:
        return ""
    ref = f"models:/{m['name']}/{m['versions'][-1]['version']}"
    if "prod" in m["aliases"]:
        ref = f"models:/{m['name']}@prod"
    if m["kind"] == "sampler":
        return f"; serve: svg-ray serve --model-uri {ref}"
    if m["kind"] == "autoencoder":
        ae = f"{m['run_storage']}/autoencoder.safetensors" if m["run_storage"] else "<file>"
        return (
            f"; encode a dataset: svg-ray precompute --input <images> --out <latents> "
            f"--autoencoder {ae}; score it: svg-ray eval reconstruction --autoencoder {ref}"
        )
    return ""


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
            aliases = ", ".join(f"@{a} -> {v}" for a, v in m["aliases"].items())
            evals = [v for v in m["versions"] if v["evaluation"]]
            scores = ""
            if evals:
                shown = {k: x for k, x in evals[-1]["evaluation"].items() if k != "eval_run_id"}
                scores = f"; v{evals[-1]['version']}: " + ", ".join(
                    f"{k} {x}" for k, x in shown.items()
                )
            out.append(
                f"  model    {m['name']} [{m['kind'] or '-'}]: {len(m['versions'])} version(s)"
                + (f" ({aliases})" if aliases else "")
                + scores
                + _next_for_model(m)
            )
        if mlflow["tracking_uri"].startswith("sqlite:"):
            out.append(f"  UI: mlflow ui --backend-store-uri {mlflow['tracking_uri']}")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# One model version's lineage
# --------------------------------------------------------------------------------------------


def model_uri(spec: str) -> str:
    """``NAME``, ``NAME/VERSION``, ``NAME@ALIAS`` or a ``models:/`` URI -> a ``models:/`` URI."""
    if spec.startswith("models:/"):
        return spec
    return f"models:/{spec}" if ("/" in spec or "@" in spec) else f"models:/{spec}/latest"


def _run_summary(client: Any, run_id: str) -> dict[str, Any]:
    from svg_ray.tracking import (
        TAG_GIT_COMMIT,
        TAG_KIND,
        TAG_REGISTERED,
        TAG_STORAGE,
        VERSION_TAG_PREFIX,
    )

    run = client.get_run(run_id)
    tags = run.data.tags
    exp = client.get_experiment(run.info.experiment_id)
    datasets = [
        {
            "name": d.dataset.name,
            "digest": d.dataset.digest,
            "source": json.loads(d.dataset.source or "{}").get("uri"),
            "profile": json.loads(d.dataset.profile or "{}"),
        }
        for d in (run.inputs.dataset_inputs if run.inputs else [])
    ]
    return {
        "run_id": run_id,
        "name": run.info.run_name,
        "experiment": exp.name if exp else run.info.experiment_id,
        "status": run.info.status,
        "kind": tags.get(TAG_KIND),
        "storage": tags.get(TAG_STORAGE),
        "registered": tags.get(TAG_REGISTERED),
        "git_commit": tags.get(TAG_GIT_COMMIT),
        "versions": {
            k[len(VERSION_TAG_PREFIX) :]: v
            for k, v in tags.items()
            if k.startswith(VERSION_TAG_PREFIX)
        },
        "metrics": {k: round(v, 6) for k, v in sorted(run.data.metrics.items())},
        "datasets": datasets,
    }


def lineage(tracking_uri: str, spec: str) -> dict[str, Any]:
    """The chain of one model version: dataset -> autoencoder -> training run -> version ->
    evaluations (and, for an autoencoder, the diffusion runs trained on its latents)."""
    from mlflow import MlflowClient

    from svg_ray.evaluation.report import TAG_MODEL_VERSION
    from svg_ray.serving.source import resolve
    from svg_ray.tracking import TAG_AUTOENCODER_ID, TAG_DATASET, TAG_DATASET_DIGEST

    model = resolve(model_uri(spec), tracking_uri, option="--tracking-uri")
    client = MlflowClient(tracking_uri=model.tracking_uri, registry_uri=model.tracking_uri)
    out: dict[str, Any] = {
        "model": {
            **model.describe(),
            "uri": model.pinned_uri,
            "kind": model.kind,
            "evaluation": {k: model.tags[k] for k in EVAL_TAGS if k in model.tags},
        }
    }
    run = _run_summary(client, model.run_id) if model.run_id else None
    out["training_run"] = run
    # Versions registered before lineage tags existed: fall back to the run's own tags.
    run_tags = client.get_run(model.run_id).data.tags if model.run_id else {}
    tags = {**run_tags, **model.tags}
    out["dataset"] = {
        "uri": tags.get(TAG_DATASET),
        "digest": tags.get(TAG_DATASET_DIGEST),
        **(run["datasets"][0]["profile"] if run and run["datasets"] else {}),
    }
    experiments = [e.experiment_id for e in client.search_experiments()]
    ae_id = tags.get(TAG_AUTOENCODER_ID)
    out["autoencoder"] = {"id": ae_id, "registered": []}
    if ae_id:
        for mv in client.search_model_versions(f"tags.`{TAG_AUTOENCODER_ID}` = '{ae_id}'"):
            if (mv.name, str(mv.version)) == (model.name, model.version):
                continue
            if _kind_from_tags(mv) == "autoencoder":
                out["autoencoder"]["registered"].append(
                    {"name": mv.name, "version": int(mv.version), "run_id": mv.run_id}
                )
    if model.kind == "autoencoder" and ae_id:
        flt = f"tags.`{TAG_AUTOENCODER_ID}` = '{ae_id}' and tags.`svg_ray.kind` = 'diffusion'"
        out["used_by"] = [
            {"run_id": r.info.run_id, "name": r.info.run_name, "status": r.info.status}
            for r in client.search_runs(experiments, filter_string=flt)
        ]
    flt = f"tags.`{TAG_MODEL_VERSION}` = '{model.name}/{model.version}'"
    out["evaluations"] = [
        {
            "run_id": r.info.run_id,
            "name": r.info.run_name,
            "task": r.data.tags.get("svg_ray.eval_task"),
            "status": r.info.status,
            "metrics": {
                k: round(v, 6) for k, v in sorted(r.data.metrics.items()) if not k.endswith("_std")
            },
        }
        for r in client.search_runs(experiments, filter_string=flt)
    ]
    return out


def _kind_from_tags(mv: Any) -> str | None:
    from svg_ray.mlflow_model import MODEL_KIND_TAG

    return (mv.tags or {}).get(MODEL_KIND_TAG) or _kind_from_source(str(mv.source))


def render_lineage(chain: dict[str, Any]) -> str:
    """The lineage as text, newest link first."""
    m = chain["model"]
    aliases = " ".join(f"@{a}" for a in m["aliases"])
    out = [
        f"model      {m['uri']} [{m['kind']}]" + (f" {aliases}" if aliases else "")
        + (f"; logged model {m['model_id']}" if m["model_id"] else "")
    ]  # fmt: skip
    for e in chain["evaluations"]:
        scores = ", ".join(f"{k} {v:.4g}" for k, v in e["metrics"].items())
        what = f"{e['task'] or 'eval'} run {e['name']} ({e['run_id']}), {e['status']}"
        out.append(f"  scored   {what}: {scores}")
    if not chain["evaluations"]:
        out.append(f"  scored   (no evaluation yet: svg-ray eval ... --bundle {m['uri']})")
    r = chain["training_run"]
    if r:
        step = r["metrics"].get("step")
        versions = ", ".join(f"{k} {v}" for k, v in r["versions"].items())
        out.append(
            f"  trained  by run {r['name']} ({r['run_id']}) in {r['experiment']!r}, {r['status']}"
            + (f" at step {int(step)}" if step is not None else "")
            + f"; commit {r['git_commit'] or 'unknown'}"
            + (f"; {versions}" if versions else "")
        )
    d = chain["dataset"]
    if d.get("uri"):
        facts = [f"digest {d.get('digest')}"]
        for key, label in (
            ("num_rows", "rows"),
            ("num_inputs", "inputs"),
            ("num_classes", "classes"),
        ):
            if key in d:
                facts.append(f"{d[key]} {label}")
        out.append(f"  on data  {d['uri']} ({', '.join(facts)})")
    ae = chain["autoencoder"]
    if ae["id"] and m["kind"] == "sampler":
        regs = ", ".join(
            f"models:/{a['name']}/{a['version']} (run {a['run_id']})" for a in ae["registered"]
        )
        out.append(
            f"  encoded  by autoencoder {ae['id']}"
            + (f" = {regs}" if regs else " (not registered)")
        )
    for u in chain.get("used_by", []):
        out.append(f"  used by  diffusion run {u['name']} ({u['run_id']}), {u['status']}")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``svg-ray status``."""
    p = argparse.ArgumentParser(prog="svg-ray status", description=__doc__.splitlines()[0])
    p.add_argument("--storage", default="outputs", help="local folder or s3:// prefix to scan")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or the sqlite store in ./outputs)",
    )
    p.add_argument("--no-mlflow", action="store_true", help="skip the MLflow query")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument(
        "--model",
        default=None,
        help="show one model version's lineage: NAME (latest), NAME/VERSION, NAME@ALIAS",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``svg-ray status``."""
    from svg_ray.tracking import default_tracking_uri

    a = build_parser().parse_args(argv)
    if a.model:
        chain = lineage(a.tracking_uri or default_tracking_uri(create=False), a.model)
        print(json.dumps(chain, indent=2) if a.json else render_lineage(chain))
        return 0
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
