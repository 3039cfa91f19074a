"""End to end: the `svg-ray demo` command on the real digits, at reduced step counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from svg_ray.checkpoint import load_bundle


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_writes_grid_and_bundle(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "svg_ray.cli", "demo", "--out-dir", str(out)]
    cmd += ["--ae-steps", "10", "--dit-steps", "40", "--sample-steps", "4", "--ae-batch", "8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sample grid:" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 1797
    assert summary["latent_shape"] == [200, 4, 4]
    grid = Image.open(out / "samples.png")
    # 10 classes x 8 samples of 64px with 2px gaps
    assert grid.size == (8 * 66 - 2, 10 * 66 - 2) and grid.mode == "RGB"
    pixels = np.asarray(grid)
    assert len(np.unique(pixels)) > 10 and pixels.std() > 5  # not a blank image
    dit, ae, info = load_bundle(str(out / "bundle"))
    assert info.class_names == [str(i) for i in range(10)] and info.step == 40
    assert dit.cfg.in_channels == ae.latent_channels == 200


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
