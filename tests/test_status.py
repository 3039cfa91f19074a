"""`svg-ray status` on hand-made storage layouts (the full layout is checked in test_demo.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from svg_ray.status import render, scan_mlflow, scan_storage


def test_incomplete_dataset_and_unfinished_run_are_reported(tmp_path: Path) -> None:
    lat = tmp_path / "latents"
    (lat / "chunks").mkdir(parents=True)
    (lat / "job.json").write_text("{}")
    for i in range(3):
        (lat / "chunks" / f"chunk-{i:06d}.json").write_text("{}")
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    snapshot = {
        "checkpoint_results": [{"metrics": {"step": 10}}, {"metrics": {"step": 20}}],
        "latest_checkpoint_result": {
            "checkpoint_dir_name": "checkpoint_x",
            "metrics": {"step": 20, "loss": 0.5},
        },
    }
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))

    report = scan_storage(str(tmp_path))
    (ds,) = report.datasets
    assert ds["path"] == str(lat) and not ds["complete"]
    assert ds["committed_chunk_records"] == 3
    (r,) = report.runs
    assert r["name"] == "r1" and r["checkpoints"] == 2 and r["metrics"]["step"] == 20
    assert r["bundle"] is None and r["autoencoder"] is None
    text = render(report, None)
    assert "INCOMPLETE (3 chunks committed)" in text and "rerun the same precompute" in text
    assert "latest step 20, loss 0.5" in text


@pytest.mark.integration  # runs `svg-ray status` in a subprocess
def test_empty_storage_and_missing_store_are_not_created(tmp_path: Path) -> None:
    report = scan_storage(str(tmp_path / "nothing"))
    assert not (report.datasets or report.runs or report.bundles)
    db = tmp_path / "mlflow.db"
    ml = scan_mlflow(f"sqlite:///{db}")
    assert ml["missing"] and not db.exists()  # looking never creates a store
    assert "svg-ray demo" in render(report, ml)
    cmd = [sys.executable, "-m", "svg_ray.cli", "status", "--storage", str(tmp_path / "nothing")]
    proc = subprocess.run(
        [*cmd, "--tracking-uri", f"sqlite:///{db}"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "no store yet" in proc.stdout, proc.stderr
    assert not db.exists()
