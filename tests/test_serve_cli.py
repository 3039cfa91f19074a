"""``svg-ray serve`` catches mistakes before Ray starts: one line, within seconds, no traceback.

A missing or broken config, a missing bundle, a bad registry URI, a model, version or alias that
is not in the registry, an unreachable tracking server, a CUDA device that is not there. The
registry cases run against the real ``mlflow server`` fixture (registry built by
``mlflow_registry``). Ray is never started: ``ray.init`` fails the test if anything calls it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow_registry import AE_NAME, SAMPLER_NAME, Registry, registry_fixture  # noqa: F401
from procs import free_port

from svg_ray.cli import main
from svg_ray.serving import AppArgs
from svg_ray.serving.deploy import check_model, load_serve_config, place_device

REPO = Path(__file__).resolve().parents[1]
CPU_CONFIG = REPO / "serve" / "config_cpu.yaml"


@pytest.fixture()
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the command gets as far as starting Ray."""
    import ray

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("svg-ray serve started Ray before finding the mistake")

    monkeypatch.setattr(ray, "init", refuse)


def _serve(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, float]:
    """Run ``svg-ray serve ARGS`` in-process: (exit code, stderr, seconds)."""
    capsys.readouterr()
    t0 = time.monotonic()
    code = main(["serve", *args])
    return code, capsys.readouterr().err, time.monotonic() - t0


def _one_line_error(code: int, err: str, message: str) -> None:
    assert code == 2, err
    assert err.startswith("svg-ray serve: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_missing_or_broken_files_are_one_line(
    no_ray: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err, _ = _serve(capsys, "--config", str(tmp_path / "missing.yaml"))
    _one_line_error(code, err, f"Serve config not found: {tmp_path / 'missing.yaml'} (--config)")
    broken = tmp_path / "broken.yaml"
    broken.write_text("applications: [\n  - name: svg\n    import_path: {")
    code, err, _ = _serve(capsys, "--config", str(broken))
    _one_line_error(code, err, "is not valid YAML")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("applications:\n  - name: svg\n    bogus_key: 1\n")
    code, err, _ = _serve(capsys, "--config", str(wrong))
    _one_line_error(code, err, "is not a valid Serve config")
    code, err, _ = _serve(capsys, "--model-uri", str(tmp_path / "no-bundle"))
    _one_line_error(code, err, f"no sampler bundle at {tmp_path / 'no-bundle'}")


def test_device_is_checked_and_placed(no_ray: None, capsys: pytest.CaptureFixture[str]) -> None:
    code, err, _ = _serve(capsys, "--device", "gpu")
    _one_line_error(code, err, "server.device must be 'auto', 'cpu' or 'cuda[:i]'")
    cfg = load_serve_config(CPU_CONFIG)
    args = AppArgs.parse(cfg.args)
    if torch.cuda.is_available():
        placed, deps = place_device(args, cfg.deployments, "auto")
        assert placed.server.device == "cuda"
        assert deps["SVGSampler"]["ray_actor_options"]["num_gpus"] > 0
    else:
        code, err, _ = _serve(capsys, "--device", "cuda")
        _one_line_error(code, err, "--device cuda: this machine has no CUDA device")
        placed, deps = place_device(args, cfg.deployments, "auto")
        assert placed.server.device == "cpu"
        assert "num_gpus" not in deps["SVGSampler"]["ray_actor_options"]
    assert "num_gpus" not in cfg.deployments["SVGSampler"]["ray_actor_options"]  # not mutated
    placed, _ = place_device(args, cfg.deployments, "cpu")
    assert placed.server.device == "cpu"


def test_registry_mistakes_are_one_line_within_seconds(
    no_ray: None, registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    server = ["--tracking-uri", registry.tracking_uri]
    cases = [
        (f"models:/{SAMPLER_NAME}/99", "has no version 99"),
        (f"models:/{SAMPLER_NAME}@canary", "has no alias 'canary'"),
        ("models:/no-such-model/latest", "no registered model 'no-such-model'"),
        (f"models:/{AE_NAME}/latest", "is an autoencoder, not a sampler bundle"),
        (f"models:/{SAMPLER_NAME}", "bad model registry URI"),
    ]
    for uri, message in cases:
        code, err, seconds = _serve(capsys, "--model-uri", uri, *server)
        _one_line_error(code, err, message)
        assert seconds < 20, (uri, seconds)
    down = f"http://127.0.0.1:{free_port()}"
    code, err, seconds = _serve(
        capsys,
        "--model-uri",
        f"models:/{SAMPLER_NAME}/1",
        "--mlflow-tracking-uri",
        down,  # the old flag still works
    )
    _one_line_error(code, err, f"cannot reach the MLflow tracking server at {down}")
    assert seconds < 20


def test_registry_uri_resolves_before_ray(registry: Registry) -> None:
    """What passes the check: every replica is told the server the CLI resolved against."""
    for uri in (f"models:/{SAMPLER_NAME}/latest", f"models:/{SAMPLER_NAME}@prod"):
        args, what = check_model(
            AppArgs.parse({"model_uri": uri, "mlflow_tracking_uri": registry.tracking_uri})
        )
        assert args.mlflow_tracking_uri == registry.tracking_uri
        assert f"of '{SAMPLER_NAME}', run {registry.dit_run}" in what
    os.environ.pop("SVG_RAY_MODEL_URI", None)
    args, what = check_model(AppArgs.parse({"model_uri": str(registry.bundle)}))
    assert what == f"bundle {registry.bundle}"


@pytest.mark.timeout(180)
def test_the_command_fails_fast_for_a_model_that_does_not_exist(registry: Registry) -> None:
    """The reported case, as a user runs it: one line and exit 2, Ray never started."""
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "svg_ray.cli", "serve", "--model-uri", "models:/x/latest"],
        capture_output=True, text=True, timeout=150, cwd=REPO,
        env={**os.environ, "MLFLOW_TRACKING_URI": registry.tracking_uri},
    )  # fmt: skip
    seconds = time.monotonic() - t0
    print(f"\nserve --model-uri models:/x/latest: exit {proc.returncode} in {seconds:.1f} s")
    _one_line_error(proc.returncode, proc.stderr, "no registered model 'x'")
    assert "Ray" not in proc.stdout + proc.stderr  # nothing started


def test_the_shipped_config_serves_prod_after_one_promote(
    registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    """serve/config.yaml (and the RayService) deploy models:/svg-xl@prod: it resolves once
    `svg-ray promote svg-xl <version> prod` has run, and says which command is missing before."""
    from svg_ray import tracking
    from svg_ray.errors import SvgRayError
    from svg_ray.serving.source import parse_registry_uri

    cfg = load_serve_config(REPO / "serve" / "config.yaml")
    name, _, alias = parse_registry_uri(cfg.args["model_uri"])
    assert (name, alias) == ("svg-xl", "prod")
    tracking.register_model(
        registry.tracking_uri, registry.dit_run, registry.sampler["model_id"], name, 1234
    )
    args = AppArgs.parse({**cfg.args, "mlflow_tracking_uri": registry.tracking_uri})
    with pytest.raises(SvgRayError, match=f"set it with `svg-ray promote {name} <version> prod`"):
        check_model(args)
    assert main(["promote", name, "1", alias, "--tracking-uri", registry.tracking_uri]) == 0
    _, what = check_model(args)
    assert what.startswith(f"models:/{name}@prod: version 1 of '{name}'")
