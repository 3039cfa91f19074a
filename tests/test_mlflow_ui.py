"""The MLflow UI (3.17) of the fixture server in headless Chromium, on what training logs.

MLflow 3.17's UI picks its GenAI or model-training layout from a switch at the top of the page
(remembered by the browser; ``?workflowType=machine_learning`` selects training), and the
experiments we create also carry ``mlflow.experimentKind = custom_model_development`` for the
UIs that read it. Checked here: the training layout lists our runs and registered models; a
run's "Model metrics" tab has the step-indexed sample grid (the slider loads the image of the
chosen step); its overview shows the dataset input, the logged and registered model. Every
request the pages make stays on the server (no external assets).
"""

from __future__ import annotations

import pytest
from browser import DevTools, chromium_fixture  # noqa: F401
from mlflow_registry import EXPERIMENT, SAMPLER_NAME, Registry, registry_fixture  # noqa: F401

from svg_ray import tracking

pytestmark = [pytest.mark.slow]
TRAINING = "?workflowType=machine_learning"


def _text(chromium: DevTools) -> str:
    return str(chromium.eval("document.body.innerText"))


def _wait_text(chromium: DevTools, *needles: str, timeout_s: float = 90) -> str:
    cond = " && ".join(f"document.body.innerText.includes({n!r})" for n in needles)
    try:
        chromium.wait_for(cond, timeout_s)
    except AssertionError:
        raise AssertionError(f"page lacks {needles}: {_text(chromium)[:3000]}") from None
    return _text(chromium)


@pytest.mark.timeout(300)
def test_mlflow_ui_shows_runs_images_datasets_and_models(
    registry: Registry, chromium: DevTools
) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(registry.tracking_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    base = f"{registry.tracking_uri}/#/experiments/{exp.experiment_id}"
    chromium.call("Network.enable")
    chromium.call("Runtime.enable")
    chromium.call("Page.enable")
    # A desktop-sized window: the runs table shows its models column only when it fits.
    chromium.call(
        "Emulation.setDeviceMetricsOverride",
        width=1400,
        height=1000,
        deviceScaleFactor=1,
        mobile=False,
    )

    # The experiment in the training layout: both runs, their registered models.
    chromium.call("Page.navigate", url=base + TRAINING)
    text = _wait_text(chromium, "Model training", "dit", "ae", SAMPLER_NAME)
    assert "Runs" in text and "Models" in text

    # A run's model metrics: the loss curve and the sample grids on a step slider. The slider
    # opens at step 0 (nothing logged there); its right end is the last step, 2.
    chromium.call("Page.navigate", url=f"{base}/runs/{registry.dit_run}/model-metrics{TRAINING}")
    _wait_text(chromium, "samples", "loss", "No image logged at this step")
    rail = chromium.eval(
        "(() => { const r = document.querySelector('[role=slider]').parentElement.parentElement"
        ".getBoundingClientRect(); return [r.right - 2, r.top + r.height / 2]; })()"
    )
    for kind in ("mousePressed", "mouseReleased"):
        chromium.call(
            "Input.dispatchMouseEvent", type=kind, x=rail[0], y=rail[1], button="left", clickCount=1
        )
    chromium.wait_for(
        "[...document.images].some(i => i.src.includes('images%2Fsamples%2Bstep%2B2%2B')"
        " && i.complete && i.naturalWidth > 0)",
        60,
    )
    assert (
        chromium.eval("document.querySelector('[role=slider]').getAttribute('aria-valuenow')")
        == "2"
    )

    # The run's overview: its source commit, dataset input (digest, training context), the
    # logged model and its registered version.
    digest = tracking.manifest_digest(registry.manifest)
    commit = client.get_run(registry.dit_run).data.tags[tracking.TAG_GIT_COMMIT]
    chromium.call("Page.navigate", url=f"{base}/runs/{registry.dit_run}{TRAINING}")
    text = _wait_text(chromium, f"latents ({digest})", "Logged models", "bundle", SAMPLER_NAME)
    assert "Training" in text and "v1" in text and commit[:7] in text

    urls = [
        e["params"]["request"]["url"]
        for e in chromium.events
        if e.get("method") == "Network.requestWillBeSent"
    ]
    outside = [u for u in urls if not u.startswith((registry.tracking_uri, "data:", "blob:"))]
    assert urls and not outside, outside
