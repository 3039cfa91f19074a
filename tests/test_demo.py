"""End to end: the `svg-ray demo` command (the README's main job) on the real digits, at reduced
step counts, and the `svg-ray` command line's error handling."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from procs import free_port

from svg_ray.checkpoint import load_bundle


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_runs_every_stage_then_resumes(tmp_path: Path) -> None:
    """The README's main command at reduced step counts: every stage on a local Ray, one HTTP
    request answered, where everything is printed; a second run finds it all done."""
    from mlflow import MlflowClient

    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "svg_ray.cli", "demo", "--out-dir", str(out)]
    cmd += ["--ae-steps", "4", "--ae-batch", "8", "--dit-model", "debug", "--dit-steps", "8"]
    cmd += ["--dit-batch", "16", "--sample-steps", "2", "--port", str(free_port())]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    # cwd: the embedded default MLflow store is ./outputs/mlflow.db
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=800, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    for k in range(1, 7):
        assert f"stage {k}/6" in text
    assert "fresh start" in text and "[train-ae] starting run 'demo-ae'" in text
    assert "answered POST /v1/generate" in text and "HTTP 200" in text
    for where in ("storage folder", "MLflow store", "MLflow UI", "sample grid", "endpoint"):
        assert where in text

    summary = json.loads((out / "summary.json").read_text())
    assert summary["latent_rows"] == 1797
    assert summary["autoencoder_run"]["state"] == summary["diffusion_run"]["state"] == "started"
    grid = Image.open(out / "samples.png")
    # 10 classes x 8 samples of 64px with 2px gaps
    assert grid.size == (8 * 66 - 2, 10 * 66 - 2) and grid.mode == "RGB"
    pixels = np.asarray(grid)
    assert len(np.unique(pixels)) > 10 and pixels.std() > 5  # not a blank image
    served = Image.open(out / "served.png")
    assert served.size == (2 * 66 - 2, 2 * 66 - 2)  # 4 images of class 7, a 2 x 2 grid
    dit, ae, info = load_bundle(str(out / "bundle"))
    assert info.class_names == [str(i) for i in range(10)] and info.step == 8
    assert dit.cfg.in_channels == ae.latent_channels == 200

    store = f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    assert summary["tracking_uri"] == store
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("svg-ray").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["demo-ae", f"demo-dit-{dit_name(summary)}"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert {m.name for m in client.search_registered_models()} == {
        "svg-demo",
        "svg-demo-autoencoder",
    }

    # `svg-ray status` finds all of it, in storage and in MLflow.
    st = subprocess.run(
        [sys.executable, "-m", "svg_ray.cli", "status", "--storage", str(out), "--json"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert st.returncode == 0, st.stderr[-2000:]
    status = json.loads(st.stdout)
    (dataset,) = status["storage"]["datasets"]
    assert dataset["complete"] and dataset["rows"] == 1797 and dataset["path"] == summary["latents"]
    runs_found = {r["name"]: r for r in status["storage"]["runs"]}
    assert set(runs_found) == {"demo-ae", f"demo-dit-{dit_name(summary)}"}
    assert runs_found["demo-ae"]["metrics"]["step"] == 4
    assert runs_found["demo-ae"]["autoencoder"] == summary["autoencoder"]
    assert runs_found[f"demo-dit-{dit_name(summary)}"]["bundle"] is not None
    assert str(out / "bundle") in status["storage"]["bundles"]
    models = {m["name"]: m["versions"] for m in status["mlflow"]["registered_models"]}
    assert [v["version"] for v in models["svg-demo"]] == [1]
    (exp,) = [e for e in status["mlflow"]["experiments"] if e["name"] == "svg-ray"]
    assert {r["kind"] for r in exp["runs"]} == {"autoencoder", "diffusion"}

    # Again, unchanged: nothing is retrained or re-encoded, and it says so.
    again = subprocess.run(
        [*cmd, "--no-serve"], capture_output=True, text=True, timeout=400, cwd=tmp_path, env=env
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "found an earlier demo: resuming" in again.stdout
    assert again.stdout.count("already finished at step") == 2
    assert "(6 of 6 chunks already done)" in again.stdout  # 1,797 rows, 300 per shard
    assert json.loads((out / "summary.json").read_text())["diffusion_run"]["state"] == (
        "already finished"
    )
    assert len(client.search_runs([runs[0].info.experiment_id])) == 2


def dit_name(summary: dict) -> str:
    """The diffusion run is named after the latent dataset's autoencoder id."""
    return Path(summary["latents"]).name[:8]


def test_cli_rejects_unknown_command_and_bad_option() -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "svg_ray.cli", "frobnicate"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "unknown command 'frobnicate'" in bad.stderr
    assert "demo" in bad.stdout
    opt = subprocess.run(
        [sys.executable, "-m", "svg_ray.cli", "demo", "--ae-steps", "many"],
        capture_output=True,
        text=True,
    )
    assert opt.returncode == 2 and "ae_steps: expected an integer" in opt.stderr
    assert "Traceback" not in opt.stderr


@pytest.mark.unit  # in process, nothing started
@pytest.mark.parametrize(
    "argv",
    [[c] for c in ("demo", "precompute", "train", "train-ae", "serve", "import", "status")]
    + [["eval", task] for task in ("generation", "reconstruction", "probe")],
)
def test_every_command_prints_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """--help of every command renders (argparse %-formats help text taken from docstrings)."""
    from svg_ray.cli import COMMANDS, main

    assert argv[0] in COMMANDS
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    assert "usage: svg-ray" in capsys.readouterr().out
