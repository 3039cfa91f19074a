"""Ray Train, stage 1: 2 CPU workers on gloo, real images on S3, real MLflow server, exact resume.

The autoencoder is the debug preset with a randomly initialised DINO (``--dino-allow-random``);
LPIPS is off (no VGG weights on this machine) but the PatchGAN starts at step 3, so the L1, GAN,
adaptive-weight and discriminator terms all run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from svg_ray import storage, tracking
from svg_ray.checkpoint import load_autoencoder, read_metadata
from svg_ray.config import ConfigError, from_dict
from svg_ray.data.digits import write_image_folder
from svg_ray.losses import AELossConfig
from svg_ray.training.autoencoder import AETrainConfig, launch
from svg_ray.training.common import RunSettings
from svg_ray.training.image_data import (
    ImageInput,
    ImageStream,
    decode_sources,
    fill_bad_rows,
    plan_images,
    probe_decodable,
)

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> str:
    """200 real 64px digit images in class folders, plus two inputs that cannot be decoded."""
    root = tmp_path_factory.mktemp("digits") / "images"
    write_image_folder(root, 64, limit=200)
    png = next((root / "3").glob("*.png")).read_bytes()
    (root / "3" / "truncated.png").write_bytes(png[:60])
    (root / "7" / "notes.txt").write_text("not an image")
    return str(root)


def _cfg(input_uri: str, **kw: Any) -> AETrainConfig:
    base: dict[str, Any] = dict(
        input=input_uri, preset="debug", dino_allow_random=True, steps=8, global_batch=8,
        lr=2e-3, disc_lr=2e-3, log_every=4, checkpoint_every=4, recon_every=0, recon_images=4,
        decode_batch=128, decode_cpus=0.5,
    )  # fmt: skip
    base.update(kw)
    return AETrainConfig(**base)


def _loss(**kw: Any) -> AELossConfig:
    return AELossConfig(perceptual_weight=0.0, gan_start_step=3, disc_ndf=16, **kw)


def _run(name: str, storage_path: str, tracking_uri: str, **kw: Any) -> RunSettings:
    return RunSettings(
        name=name, storage_path=storage_path, num_workers=2, cpus_per_worker=0.5,
        tracking_uri=tracking_uri, experiment=f"ae-{name}", **kw,
    )  # fmt: skip


def _mlflow_runs(tracking_uri: str, experiment: str) -> list[Any]:
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    return [] if exp is None else c.search_runs([exp.experiment_id])


def _final_state(run_uri: str) -> dict[str, Any]:
    ckpts = [u for u in storage.list_files(run_uri, "state.pt") if "/checkpoint_" in u]
    with tempfile.TemporaryDirectory() as d:
        local = Path(d) / "state.pt"
        states = [torch.load(storage.download(u, local), weights_only=True) for u in ckpts]
    return max(states, key=lambda s: s["step"])


def _write_parquet(uri: str, images: list[bytes]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(uri)
    table = pa.table({"img": pa.array(images, pa.binary()), "label": list(range(len(images)))})
    with fs.open_output_stream(path) as f:
        pq.write_table(table, f)


@pytest.fixture(scope="module")
def s3_digits(s3_ray: Any, digits: str) -> str:
    """The digits folder (bad files included) copied to the S3 server: the runs read it there."""
    client = s3_ray.client()
    for f in sorted(Path(digits).rglob("*")):
        if f.is_file():
            key = f"train-ae/images/{f.relative_to(digits)}"
            client.put_object(Bucket=s3_ray.bucket, Key=key, Body=f.read_bytes())
    return str(s3_ray.uri("train-ae/images"))


# The uninterrupted run both the end-to-end checks and the resume comparison use: 202 files read
# from S3, 100 per rank (2 sit out each epoch, different ones every epoch), 4 images per worker,
# so 25 steps are exactly one epoch; a bad file is replaced by a good image of its own batch.
E2E = dict(steps=25, log_every=5, checkpoint_every=10, recon_every=10)


@pytest.fixture(scope="module")
def e2e(
    s3_digits: str, mlflow_server: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """One 25-step run on the image folder, tracked on the MLflow server and registered."""
    store = str(tmp_path_factory.mktemp("e2e") / "runs")
    run = _run("e2e", store, mlflow_server, register_as="svg-ae-e2e")
    summary = launch(_cfg(s3_digits, **E2E), _loss(), run)
    return {"summary": summary, "store": store, "input": s3_digits}


@pytest.mark.timeout(420)
def test_trains_on_an_s3_image_folder_with_mlflow_and_registry(
    e2e: dict[str, Any], mlflow_server: str, tmp_path: Path
) -> None:
    from mlflow import MlflowClient
    from PIL import Image

    summary, store = e2e["summary"], e2e["store"]
    assert summary.metrics["step"] == 25 and not summary.resumed
    assert summary.losses == ["l1", "patchgan_hinge"]

    runs = _mlflow_runs(mlflow_server, "ae-e2e")
    assert len(runs) == 1
    r = runs[0]
    client = MlflowClient(tracking_uri=mlflow_server)
    hist = {
        k: [m.value for m in client.get_metric_history(r.info.run_id, k)]
        for k in ("l1", "gan_adaptive_weight", "d_loss", "skipped_images")
    }
    l1 = hist["l1"]
    assert len(l1) == 5  # every 5 steps to 25
    assert sum(l1[-2:]) / 2 < 0.85 * sum(l1[:2]) / 2, l1  # it learns (with the GAN on from 3)
    assert all(w > 0 for w in hist["gan_adaptive_weight"]) and hist["d_loss"][-1] > 0, hist
    # The bad files this epoch's order deals to the ranks (seed 0 deals both: the truncated
    # PNG and the text file), counted once each.
    plan = plan_images(ImageInput(e2e["input"]))
    order = plan.order(world=2, batch_size=4, seed=0)
    used = [plan.sources[int(u)] for r in (0, 1) for u in order.rank_units(0, r)]
    bad_used = [u for u in used if u.endswith(("truncated.png", "notes.txt"))]
    assert len(bad_used) == 2 and hist["skipped_images"][-1] == 2
    for key in ("gan_g", "grad_norm", "lr", "images_per_s", "data_wait_fraction", "align_mu_res"):
        assert key in r.data.metrics, key
    assert r.data.metrics["perceptual_on"] == 0 and r.data.metrics["gan_on"] == 1
    assert r.data.params["losses.enabled"] == "l1,patchgan_hinge"
    assert r.data.params["train.preset"] == "debug" and r.data.params["loss.gan_start_step"] == "3"
    assert r.data.tags["svg_ray.losses"] == "l1,patchgan_hinge"
    assert r.data.tags["svg_ray.run_name"] == "e2e"
    assert r.data.tags["svg_ray.storage_path"] == f"{store}/e2e"
    assert r.info.status == "FINISHED"
    # Reconstruction grids are step-indexed images (key "reconstructions").
    grids = sorted(
        (int(a.path.split("+step+")[1].split("+")[0]), a.path)
        for a in client.list_artifacts(r.info.run_id, "images")
        if a.path.startswith("images/reconstructions+") and a.path.endswith(".png")
    )
    assert [s for s, _ in grids] == [10, 20, 25]
    png = client.download_artifacts(r.info.run_id, grids[-1][1], str(tmp_path))
    assert Image.open(png).size == (4 * 64 + 3 * 2, 2 * 64 + 2)  # inputs over reconstructions
    versions = client.search_model_versions("name = 'svg-ae-e2e'")
    assert len(versions) == 1 and versions[0].source.startswith("models:/m-")
    assert versions[0].tags["svg_ray.model_kind"] == "autoencoder"

    # The exported autoencoder: eval mode, running alignment statistics tracked over all 25
    # steps (averaged over both ranks), then re-estimated in eval mode on centre crops of up to
    # calibrate_images images (recorded in the metadata); loadable on its own.
    uri = summary.autoencoder
    assert uri == f"{store}/e2e/autoencoder.safetensors"
    ae = load_autoencoder(uri)
    assert not ae.training and ae.cfg.resolution == 64
    assert int(ae.align.num_batches_tracked) == 25
    assert not torch.allclose(ae.align.running_stats, torch.tensor([0.0, 1.0, 0.0, 1.0]))
    assert '"step": 25' in read_metadata(uri)["extra"]
    calibration = json.loads(read_metadata(uri)["extra"])["align_calibration"]
    assert calibration["images"] == 200  # one pass over the 202 inputs in batches of 4
    assert ae.align.running_stats.tolist() == pytest.approx(calibration["after"], rel=1e-6)
    state = _final_state(f"{store}/e2e")
    before = state["ae"]["align.running_stats"].tolist()
    assert before == pytest.approx(calibration["before"], rel=1e-6)  # the training EMA
    with torch.no_grad():
        x = torch.zeros(2, 3, 64, 64)
        assert ae(x).shape == x.shape


@pytest.mark.timeout(420)
def test_resubmission_resumes_to_the_same_weights_with_checkpoints_on_s3(
    e2e: dict[str, Any], s3_ray: Any, s3_digits: str, tmp_path: Path
) -> None:
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = s3_ray.uri("train-ae/runs")
    # Stopped at the step-10 checkpoint (mid-epoch, GAN on), then resubmitted to 25.
    cfg10 = _cfg(s3_digits, **{**E2E, "steps": 10})
    first = launch(cfg10, _loss(), _run("re", store, tracking_uri))
    assert first.metrics["step"] == 10
    second = launch(_cfg(s3_digits, **E2E), _loss(), _run("re", store, tracking_uri))
    assert second.resumed and second.metrics["step"] == 25
    a = _final_state(f"{e2e['store']}/e2e")
    b = _final_state(f"{store}/re")
    assert a["step"] == b["step"] == 25 and b["kind"] == "autoencoder"
    assert (b["epoch"], b["step_in_epoch"]) == (0, 25)
    for part in ("ae", "disc"):
        for k, v in a[part].items():
            assert torch.allclose(v.float(), b[part][k].float(), atol=1e-5), (part, k)
    for opt in ("opt_g", "opt_d"):
        for k, v in a[opt]["state"].items():
            assert torch.allclose(v["exp_avg_sq"], b[opt]["state"][k]["exp_avg_sq"], atol=1e-6)
    assert a["ae"]["align.num_batches_tracked"] == 25
    assert len(_mlflow_runs(tracking_uri, "ae-re")) == 1
    # Checkpoints (10, 20, 25: three kept) and the exported autoencoder live in the bucket.
    keys = [o["Key"] for o in s3_ray.client().list_objects_v2(
        Bucket=s3_ray.bucket, Prefix="train-ae/runs/re/")["Contents"]]  # fmt: skip
    assert sum(k.endswith("state.pt") for k in keys) == 3
    assert second.autoencoder == f"{store}/re/autoencoder.safetensors"
    assert int(load_autoencoder(second.autoencoder).align.num_batches_tracked) == 25


@pytest.mark.timeout(120)
def test_parquet_input_streams_through_ray_data(
    ray_session: None, digits: str, tmp_path: Path
) -> None:
    pngs = [f.read_bytes() for f in sorted(Path(digits).glob("*/*.png"))[:20]]
    (tmp_path / "pq").mkdir()
    _write_parquet(str(tmp_path / "pq" / "part-0.parquet"), pngs[:10])
    _write_parquet(str(tmp_path / "pq" / "part-1.parquet"), [*pngs[10:], b"\x89PNG broken"])
    src = ImageInput(str(tmp_path / "pq"), "auto", "img", resolution=32)
    plan = plan_images(src)
    assert plan.source_format == "parquet" and plan.inputs == 21
    probe_decodable(src, plan)
    streams = [
        ImageStream(src, plan, rank=r, world=2, batch_size=4, seed=0, decode_cpus=0.5)
        for r in (0, 1)
    ]
    assert streams[0].steps_per_epoch == 2  # 21 rows: 2 steps of 4 on each of 2 ranks
    epochs = [[list(s.epoch(e)) for s in streams] for e in (0, 1)]
    for per_rank in epochs:
        assert all(len(b) == 2 and b[0].shape == (4, 32, 32, 3) for b in per_rank)
    # Resume: batch 1 alone equals batch 1 of the whole epoch (it decodes from its window on).
    [resumed] = list(streams[0].epoch(0, start=1))
    assert np.array_equal(resumed, epochs[0][0][1])
    assert not np.array_equal(epochs[0][0][0], epochs[1][0][0])  # a new order every epoch
    with pytest.raises(ConfigError, match="has no column 'image'"):
        plan_images(ImageInput(str(tmp_path / "pq")))


def test_bad_rows_are_replaced_within_their_batch() -> None:
    ok = np.array([True, False, True, False])
    images = np.arange(4, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    batch = {
        "image": images,
        "ok": ok,
        "path": np.array(list("abcd")),
        "reason": np.array(list("xyzw")),
    }
    out = fill_bad_rows(batch, "rank 0")
    assert out[:, 0, 0, 0].tolist() == [0, 2, 2, 0]  # each bad row takes the next good one
    assert np.array_equal(batch["image"], images)  # the input is left as it was
    with pytest.raises(ConfigError, match=r"rank 0: none of its 2 images .*a: x; b: y"):
        fill_bad_rows(
            {**{k: v[:2] for k, v in batch.items()}, "ok": np.array([False] * 2)}, "rank 0"
        )


def test_decode_flags_bad_inputs_instead_of_failing(digits: str, tmp_path: Path) -> None:
    from svg_ray.data import inputs

    files = sorted(Path(digits).glob("*/*.png"))[:2]
    good = files[0].read_bytes()
    raw = [good, {"bytes": good, "path": "x"}, b"junk", None]  # as Parquet cells hold them
    out = [inputs.decode(v, 32, 10**8) for v in raw]
    assert [isinstance(o, np.ndarray) and o.shape == (32, 32, 3) for o in out] == [
        True, True, False, False,
    ]  # fmt: skip
    assert "not an image" in str(out[2]) and "null" in str(out[3])
    _write_parquet(str(tmp_path / "p.parquet"), [good, b"junk"])
    src = ImageInput(str(tmp_path), resolution=32, image_column="img")
    rows = decode_sources([[str(tmp_path / "p.parquet"), r] for r in (0, 1)], "parquet", src)
    assert rows["ok"].tolist() == [True, False] and "not an image" in rows["reason"][1]
    folder = [str(files[1]), str(Path(digits) / "missing.png")]
    rows = decode_sources(folder, "folder", ImageInput(digits, resolution=64))
    assert rows["ok"].tolist() == [True, False] and "unreadable" in rows["reason"][1]
    assert rows["image"].shape == (2, 64, 64, 3) and rows["image"].dtype == np.uint8


def test_config_objects_reject_unknown_keys_and_wrong_types() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['stpes'\]"):
        from_dict(AETrainConfig, {"input": "x", "stpes": 3}, "train")
    with pytest.raises(ConfigError, match=r"train\.global_batch: expected an integer"):
        from_dict(AETrainConfig, {"input": "x", "global_batch": 8.5}, "train")
    with pytest.raises(ConfigError, match=r"train\.preset must be one of"):
        AETrainConfig(input="x", preset="huge")


def test_a_diffusion_run_of_the_same_name_is_refused(digits: str, tmp_path: Path) -> None:
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = _run("shared", str(tmp_path / "runs"), tracking_uri)
    tracking.find_or_create_run(tracking_uri, run.experiment, run.name, run.run_uri, "diffusion")
    with pytest.raises(ConfigError, match="belongs to a diffusion job, not this autoencoder job"):
        launch(_cfg(digits), _loss(), run)


@pytest.mark.timeout(300)
def test_bad_config_fails_before_any_worker(
    digits: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from svg_ray.cli import main as cli_main

    (tmp_path / "empty").mkdir()
    (tmp_path / "junk" / "a").mkdir(parents=True)
    for i in range(3):
        (tmp_path / "junk" / "a" / f"{i}.jpg").write_bytes(b"no image here")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = ["--preset", "debug", "--global-batch", "2", "--storage-path", str(tmp_path / "runs")]
    ok = [*base, "--dino-allow-random", "--perceptual-weight", "0"]
    # Real subprocesses (started together: each pays the torch import) for the failure kinds
    # with different exits: argparse's own, a ConfigError and an AssetError.
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    in_subprocess = [
        (["--input", digits, *ok, "--bogus", "1"], "unrecognized arguments: --bogus"),
        (["--input", str(tmp_path / "nothing"), *ok], "input not found"),
        # Perceptual loss on (the default) without VGG weights: the error names the option.
        (["--input", digits, *base, "--dino-allow-random"], "--lpips-vgg-weights"),
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pipelines.train_autoencoder", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=Path(__file__).parents[1],
        )
        for args, _ in in_subprocess
    ]
    # The rest through the same `svg-ray` entry point in this process (no import cost).
    in_process = [
        (["--input", str(tmp_path / "empty"), *ok], "no images found under"),
        (["--input", str(tmp_path / "junk"), *ok], "could be decoded as images"),
        (["--input", digits, *ok, "--steps", "ten"], "train.steps: expected an integer"),
        (["--input", digits, *ok, "--global-batch", "5", "--num-workers", "2"], "not divisible"),
        (["--input", digits, *ok, "--global-batch", "256"], "not enough data: 202 images"),
        (["--input", digits, *ok, "--resolution", "72"], "multiple of 16"),
        (["--input", digits, *base, "--perceptual-weight", "0"], "--dino-weights"),
    ]
    for args, message in in_process:
        rc = cli_main(["train-ae", *args, "--tracking-uri", tracking_uri])
        err = capsys.readouterr().err
        assert rc == 2 and message in err, (args, err[-1500:])
    for (args, message), proc in zip(in_subprocess, procs, strict=True):
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 2, (args, out[-500:], err[-1500:])
        assert message in err, (args, err[-1500:])
        assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written
    assert not (tmp_path / "mlflow.db").exists()  # not even an MLflow run
