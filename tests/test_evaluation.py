"""Evaluation jobs: FID/IS maths against hand computations and torch-fidelity, the image-count
checks, the linear probe, and the three jobs end to end on Ray with MLflow.

Networks are randomly initialised (seeded) and small: torch-fidelity's InceptionV3 with random
He-normal weights saved to a file and passed by path, the debug autoencoder and DiT, a random
VGG16 trunk for LPIPS. Real images are scikit-learn's digits (svg_ray/data/digits.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_losses import random_vgg_state

from svg_ray.checkpoint import BundleInfo, save_autoencoder, save_bundle
from svg_ray.cli import user_errors
from svg_ray.config import ConfigError
from svg_ray.data.digits import load_digits_tensor, write_image_folder
from svg_ray.data.latents import LatentStats
from svg_ray.evaluation import stages
from svg_ray.evaluation.image_metrics import PSNR_MAX_DB, SSIM_K1, psnr, ssim
from svg_ray.evaluation.inception import (
    INCEPTION_OPTION,
    InceptionFeatures,
    inception_weights,
    random_inception_state,
)
from svg_ray.evaluation.probe import fit_probe, latent_parts, split_train_test
from svg_ray.evaluation.stats import (
    FeatureMoments,
    ImageCountError,
    InceptionScoreAccumulator,
    ReferenceStats,
    check_count,
    frechet_distance,
    load_reference,
)
from svg_ray.generate import to_uint8
from svg_ray.models.autoencoder import SVGAutoencoder, ae_preset
from svg_ray.models.dit import DiT, dit_config
from svg_ray.weights import AssetError

NUM_CLASSES = 10


# --------------------------------------------------------------------------------------------
# Fixtures: random networks saved to files, digits on disk
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """torch-fidelity's InceptionV3 layout with seeded random weights."""
    path = tmp_path_factory.mktemp("inception") / "inception-random.pth"
    torch.save(random_inception_state(seed=0), path)
    return path


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 digits (about 20 per class) as a <root>/<class>/<id>.png tree at 64 px."""
    root = tmp_path_factory.mktemp("digits")
    write_image_folder(root, resolution=64, limit=200)
    return root


@pytest.fixture(scope="module")
def autoencoder_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random debug autoencoder (64 px, 4x4 grid, 192 DINO + 8 residual channels)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ae") / "ae.safetensors"
    save_autoencoder(SVGAutoencoder(ae_preset("debug")).eval(), str(path))
    return path


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random sampler bundle; DiT weights perturbed so that samples differ by label/seed."""
    torch.manual_seed(0)
    ae = SVGAutoencoder(ae_preset("debug")).eval()
    dcfg = dit_config("debug", in_channels=ae.latent_channels, grid=ae.grid, num_classes=10)
    dit = DiT(dcfg).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    c = ae.latent_channels
    stats = LatentStats(np.zeros(c), np.ones(c))
    path = tmp_path_factory.mktemp("bundle") / "bundle"
    save_bundle(str(path), dit, ae, BundleInfo(stats, [str(i) for i in range(NUM_CLASSES)]))
    return path


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vgg") / "vgg16-random.pth"
    torch.save(random_vgg_state(), path)
    return path


def _random_cov(d: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.normal(size=(d, 2 * d))
    return a @ a.T / (2 * d)  # (d, d) full rank, well conditioned


# --------------------------------------------------------------------------------------------
# Fréchet distance and moments
# --------------------------------------------------------------------------------------------


def test_frechet_distance_matches_hand_computed_gaussians() -> None:
    # 2-D: the eigenvalues l1, l2 of S1 S2 are real and >= 0, so
    # tr sqrt(S1 S2) = sqrt(l1) + sqrt(l2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)).
    mu1, mu2 = np.array([1.0, -2.0]), np.array([0.5, 0.0])
    s1 = np.array([[2.0, 0.5], [0.5, 1.0]])
    s2 = np.array([[1.0, -0.3], [-0.3, 3.0]])
    tr_s1s2 = 2 * 1 + 0.5 * -0.3 + 0.5 * -0.3 + 1 * 3  # = 4.7
    det1, det2 = 2 * 1 - 0.25, 1 * 3 - 0.09  # = 1.75, 2.91
    by_hand = 0.25 + 4.0 + 3.0 + 4.0 - 2 * np.sqrt(tr_s1s2 + 2 * np.sqrt(det1 * det2))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(by_hand, abs=1e-12)
    assert by_hand == pytest.approx(5.1793119, abs=1e-7)  # 11.25 - 2 sqrt(9.2133), by hand
    # Diagonal (commuting) covariances: sum over dims of (sqrt a - sqrt b)^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expected = 3.0 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2
    got = frechet_distance(np.zeros(3), np.diag(a), np.array([1.0, 1.0, 1.0]), np.diag(b))
    assert got == pytest.approx(expected, abs=1e-12)


def test_frechet_distance_agrees_with_scipy_sqrtm_and_torch_fidelity() -> None:
    import scipy.linalg
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(0)
    d = 64
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_cov(d, rng), _random_cov(d, rng)
    ours = frechet_distance(mu1, s1, mu2, s2)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    diff = mu1 - mu2
    with_scipy = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    tf = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
    assert ours == pytest.approx(with_scipy, rel=1e-10)
    assert ours == pytest.approx(tf["frechet_inception_distance"], rel=1e-10)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_singular_covariances_give_zero_against_themselves() -> None:
    # 20 features in 256 dims: rank-19 covariance, as with any FID over fewer images than dims.
    x = np.random.default_rng(1).normal(size=(20, 256)) * 3.0
    m = FeatureMoments.of(x)
    s = m.covariance()
    assert np.trace(s) > 1000
    assert abs(frechet_distance(m.mean, s, m.mean, s)) < 1e-9


def test_moments_folded_in_pieces_equal_one_pass() -> None:
    x = np.random.default_rng(2).normal(loc=5.0, size=(103, 16))
    m = FeatureMoments.zeros(16)
    for part in np.split(x, [1, 7, 40, 41, 90]):
        m = m.merge(FeatureMoments.of(part))
    assert m.count == 103
    np.testing.assert_allclose(m.mean, x.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(m.covariance(), np.cov(x, rowvar=False), rtol=1e-11, atol=1e-13)


def test_inception_score_streamed_matches_torch_fidelity() -> None:
    from torch_fidelity.metric_isc import isc_features_to_metric

    rng = np.random.default_rng(3)
    logits = (rng.normal(size=(57, 1008)) * 3).astype(np.float32)
    ref = isc_features_to_metric(torch.from_numpy(logits), splits=5)  # shuffled, seed 2020
    acc = InceptionScoreAccumulator(57, 1008, splits=5)
    order = rng.permutation(57)  # samples arrive in any order and grouping
    for part in np.array_split(order, 4):
        acc.add(part, logits[part])
    mean, std = acc.result()
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-10)
    assert std == pytest.approx(ref["inception_score_std"], rel=1e-8, abs=1e-10)
    assert mean > 1.0


# --------------------------------------------------------------------------------------------
# Counting: every image evaluated, or a clear failure
# --------------------------------------------------------------------------------------------


def test_image_count_checks_fire() -> None:
    with pytest.raises(ImageCountError, match="evaluated 9 images but expected 10"):
        check_count("generated images", 10, 9)
    acc = InceptionScoreAccumulator(12, 1008, splits=3)
    acc.add(np.arange(11), np.zeros((11, 1008)))
    with pytest.raises(ImageCountError, match="evaluated 11 images but expected 12"):
        acc.result()
    rows = [{"chunk": np.array([c])} for c in (1, 0, 3)]  # chunk 2 never arrives
    with pytest.raises(ImageCountError, match="chunk 2 is missing"):
        list(stages.stream_in_order(iter(rows), 4))
    with pytest.raises(ImageCountError, match="arrived twice"):
        list(stages.stream_in_order(iter([{"chunk": np.array([0])}] * 2), 2))
    got = [int(r["chunk"][0]) for r in stages.stream_in_order(iter(rows[:2]), 2)]
    assert got == [0, 1]  # early arrivals are held back and released in order


# --------------------------------------------------------------------------------------------
# Reconstruction metrics
# --------------------------------------------------------------------------------------------


def test_psnr_and_ssim_exact_values() -> None:
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, size=(2, 24, 24, 3), dtype=np.uint8)
    np.testing.assert_allclose(psnr(img, img), PSNR_MAX_DB)
    np.testing.assert_allclose(ssim(img, img), 1.0, atol=1e-12)
    a = np.full((1, 16, 16, 3), 100, np.uint8)
    b = np.full((1, 16, 16, 3), 110, np.uint8)
    assert psnr(a, b)[0] == pytest.approx(20 * np.log10(255 / 10), abs=1e-10)
    # Constant images: no variance, so SSIM is its luminance term alone.
    ma, mb, c1 = 100 / 255, 110 / 255, SSIM_K1**2
    assert ssim(a, b)[0] == pytest.approx((2 * ma * mb + c1) / (ma**2 + mb**2 + c1), abs=1e-12)
    noisy = np.clip(img.astype(int) + rng.integers(-40, 41, img.shape), 0, 255).astype(np.uint8)
    assert (ssim(img, noisy) < 0.99).all() and (psnr(img, noisy) < 30).all()


# --------------------------------------------------------------------------------------------
# Reference statistics files
# --------------------------------------------------------------------------------------------


def test_reference_npz_round_trip_and_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    a = rng.normal(size=(2048, 8))
    s = a @ a.T + np.eye(2048)  # a 2048-d covariance, cheaply
    ReferenceStats(rng.normal(size=2048), s, 77).save(str(tmp_path / "ref.npz"))
    ref = load_reference(str(tmp_path / "ref.npz"), 2048)
    assert ref.count == 77 and np.array_equal(ref.sigma, s)
    np.savez(tmp_path / "nomu.npz", sigma=s)
    np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
    cases = [
        ("missing.npz", "not found"),
        ("nomu.npz", r"lacks \['mu'\]"),
        ("small.npz", r"expected \(2048,\)"),
    ]
    for name, msg in cases:
        with pytest.raises(ConfigError, match=msg) as e:
            load_reference(str(tmp_path / name), 2048)
        assert "--reference" in str(e.value)


# --------------------------------------------------------------------------------------------
# Inception network: by path only, validated, real features
# --------------------------------------------------------------------------------------------


def test_inception_weights_by_path_never_download(
    inception_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to download Inception weights")

    monkeypatch.setattr(fe, "load_state_dict_from_url", no_download)
    with pytest.raises(AssetError, match=INCEPTION_OPTION):
        inception_weights(None)
    with pytest.raises(AssetError, match="file not found"):
        inception_weights(str(tmp_path / "nope.pth"))
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(AssetError, match="is not torch-fidelity's InceptionV3"):
        inception_weights(str(tmp_path / "wrong.pth"))
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a pickled object, not tensors
    with pytest.raises(AssetError, match="weights_only=True refused it"):
        inception_weights(str(tmp_path / "module.pth"))
    sd = torch.load(inception_file, weights_only=True)
    torch.save({"state_dict": sd}, tmp_path / "wrapped.pth")
    with pytest.raises(AssetError, match="flat state dict"):
        inception_weights(str(tmp_path / "wrapped.pth"))
    # .safetensors is converted once into the asset cache, the .pth is used as it is
    from safetensors.torch import save_file

    monkeypatch.setenv("SVG_RAY_CACHE", str(tmp_path / "cache"))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "inc.safetensors"))
    converted, _ = inception_weights(str(tmp_path / "inc.safetensors"))
    assert converted.parent == tmp_path / "cache" / "inception"
    assert torch.equal(torch.load(converted, weights_only=True)["fc.weight"], sd["fc.weight"])
    path, sha = inception_weights(str(inception_file))
    assert path == inception_file
    feats = InceptionFeatures(path, torch.device("cpu"), batch_size=2)
    pool, logits = feats(np.zeros((3, 32, 32, 3), np.uint8))
    assert pool.shape == (3, 2048) and logits.shape == (3, 1008) and len(sha) == 64
    # every tensor of the file is in the network (strict load, nothing left random)
    own = feats.model.state_dict()
    assert set(sd) == set(own) and all(torch.equal(sd[k], own[k]) for k in sd)


@pytest.mark.slow
def test_fid_is_zero_on_itself_and_grows_with_noise(inception_file: Path) -> None:
    torch.set_num_threads(1)
    feats = InceptionFeatures(inception_weights(str(inception_file))[0], torch.device("cpu"), 16)
    images, _ = load_digits_tensor(32)
    x = images[:10]
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=gen)

    def stats(imgs: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        m = FeatureMoments.of(feats(to_uint8(imgs))[0])
        return m.mean, m.covariance()

    clean = stats(x)
    fids = [frechet_distance(*clean, *stats((x + s * noise).clamp(-1, 1))) for s in (0.15, 0.5)]
    itself = frechet_distance(*clean, *clean)
    print(f"FID itself {itself:.3g}, noise 0.15 {fids[0]:.4g}, noise 0.5 {fids[1]:.4g}")
    assert abs(itself) < 1e-9 * np.trace(clean[1])
    assert 1e-3 < fids[0] < fids[1]


# --------------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------------


def test_linear_probe_separates_a_separable_set() -> None:
    rng = np.random.default_rng(6)
    centers = rng.normal(size=(3, 20)) * 4
    y = np.repeat(np.arange(3), 40)
    x = centers[y] + rng.normal(size=(120, 20))
    train, test = split_train_test(y, 0.25, seed=0)
    assert len(test) == 30 and set(np.bincount(y[test])) == {10}  # stratified
    res = fit_probe(x[train], y[train], x[test], y[test])
    assert res.test_accuracy == 1.0 and res.train_accuracy == 1.0 and res.converged
    shuffled = rng.permutation(y)  # labels unrelated to the features
    noise = fit_probe(x[train], shuffled[train], x[test], shuffled[test])
    assert noise.test_accuracy < 0.6
    parts = latent_parts(np.ones((5, 200)), dino_channels=192)
    assert {k: v.shape[1] for k, v in parts.items()} == {"dino": 192, "residual": 8, "both": 200}
    with pytest.raises(ConfigError, match="fewer than 2 images"):
        split_train_test(np.array([0, 0, 1]), 0.3, 0)


# --------------------------------------------------------------------------------------------
# The jobs end to end: Ray workers, JSON, report, MLflow
# --------------------------------------------------------------------------------------------


def _evaluate(*args: str) -> int:
    from pipelines.evaluate import main

    return main(list(args))


def _results(out: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / name / "results.json").read_text())
    return data


def _mlflow_run(tracking: str, experiment: str, name: str) -> Any:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], f"tags.`svg_ray.run_name` = '{name}'")
    assert len(runs) == 1
    return client, runs[0]


def test_cli_input_errors_are_one_line_user_errors(
    bundle_dir: Path, inception_file: Path, tmp_path: Path
) -> None:
    common = ["--out", str(tmp_path), "--no-mlflow"]
    cases = [
        (["generation", "--bundle", str(tmp_path / "nope"), "--reference", "x.npz"], "bundle"),
        (
            ["generation", "--bundle", str(bundle_dir), "--reference", str(tmp_path)],
            INCEPTION_OPTION,
        ),
        (["generation", "--bundle", "b", "--reference", "r", "--num-images", "5"], "is_splits"),
        (["reconstruction", "--autoencoder", "ae", "--input", "d", "--chunk-size", "0"], "chunk"),
        (
            [
                "generation", "--bundle", str(bundle_dir), "--reference", str(tmp_path / "no.npz"),
                "--inception-weights", str(inception_file),
            ],
            "--reference: not found",
        ),
    ]  # fmt: skip
    for argv, msg in cases:
        with pytest.raises(user_errors()) as e:
            _evaluate(*argv, *common)
        assert msg in str(e.value), str(e.value)
    assert not (tmp_path / "generation").exists()  # nothing was written for failed inputs


@pytest.mark.slow
@pytest.mark.timeout(600)  # three evaluations: from images, from the npz, paper settings
def test_generation_fid_and_is_on_ray_workers_to_mlflow(
    ray_session: None,
    mlflow_server: str,
    bundle_dir: Path,
    digits_folder: Path,
    inception_file: Path,
    tmp_path: Path,
) -> None:
    out, ref_npz = tmp_path / "eval", tmp_path / "ref.npz"
    common = [
        "--bundle", str(bundle_dir), "--num-images", "6", "--is-splits", "2",
        "--sampler-steps", "2", "--inception-weights", str(inception_file), "--chunk-size", "4",
        "--batch-size", "4", "--preview", "6", "--out", str(out), "--tracking-uri", mlflow_server,
    ]  # fmt: skip
    # Reference from real images on 2 workers; its statistics are saved for the second run.
    rc = _evaluate(
        "generation", *common, "--reference", str(digits_folder), "--reference-limit", "4",
        "--save-reference", str(ref_npz), "--num-workers", "2", "--name", "from-images",
    )  # fmt: skip
    assert rc == 0
    first = _results(out, "from-images")
    m = first["metrics"]
    assert m["num_images"] == 6 and first["details"]["reference"]["images"] == 4
    assert np.isfinite(m["fid"]) and m["fid"] > 0 and m["inception_score"] > 1.0
    assert len(first["details"]["inception_score_splits"]) == 2
    assert first["details"]["inception"]["standard"] is False  # random test weights
    # The same samples on 1 worker against the saved .npz: identical numbers (seeded per image,
    # folded in chunk order), so results never depend on the number of workers.
    rc = _evaluate("generation", *common, "--reference", str(ref_npz), "--name", "from-npz")
    assert rc == 0
    second = _results(out, "from-npz")
    assert second["details"]["reference"]["from"] == "npz"
    for k in ("fid", "inception_score", "inception_score_std"):
        assert second["metrics"][k] == pytest.approx(m[k], rel=1e-9, abs=1e-12), k
    client, run = _mlflow_run(mlflow_server, "svg-ray-eval", "from-images")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["fid"] == pytest.approx(m["fid"])
    assert run.data.params["sampler.steps"] == "2"
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert arts == {f"evaluation/{f}" for f in ("results.json", "report.png", "report.html")}
    logged = json.loads(
        Path(client.download_artifacts(run.info.run_id, "evaluation/results.json")).read_text()
    )
    assert logged["metrics"] == m and logged["mlflow"]["run_id"] == run.info.run_id
    assert (out / "from-images" / "report.png").read_bytes()[:4] == b"\x89PNG"
    # The paper's FID settings by flag: random labels, the reference's cfg_star-1-0 mode.
    paper = ["--label-mode", "random", "--sampler-cfg-mode", "cfg_star-1-0"]
    rc = _evaluate(
        "generation", *common, *paper, "--sampler-cfg-scale", "1.5", "--reference", str(ref_npz),
        "--name", "paper",
    )  # fmt: skip
    assert rc == 0
    third = _results(out, "paper")
    assert third["details"]["labels"] == "random (seed 0)"
    assert third["config"]["sampler"]["cfg_mode"] == "cfg_star-1-0"
    assert third["metrics"]["fid"] != pytest.approx(m["fid"], rel=1e-6)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_reference_with_an_undecodable_image_fails_the_count(
    ray_session: None, bundle_dir: Path, inception_file: Path, tmp_path: Path
) -> None:
    ref = tmp_path / "ref"
    write_image_folder(ref, resolution=64, limit=2)
    (ref / "3" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ConfigError, match=r"1 image\(s\).*broken.png"):
        _evaluate(
            "generation", "--bundle", str(bundle_dir), "--reference", str(ref),
            "--num-images", "4", "--is-splits", "2", "--inception-weights", str(inception_file),
            "--out", str(tmp_path / "eval"), "--no-mlflow",
        )  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_reconstruction_metrics_on_held_out_images(
    ray_session: None,
    mlflow_server: str,
    autoencoder_file: Path,
    digits_folder: Path,
    inception_file: Path,
    vgg_file: Path,
    tmp_path: Path,
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Held-out images as Parquet of PNG bytes without a label column (none is needed here).
    pngs = sorted(digits_folder.rglob("*.png"))[:7]
    data = tmp_path / "heldout.parquet"
    pq.write_table(pa.table({"image": [p.read_bytes() for p in pngs]}), data)
    out = tmp_path / "eval"
    rc = _evaluate(
        "reconstruction", "--autoencoder", str(autoencoder_file), "--input", str(data),
        "--limit", "6", "--inception-weights", str(inception_file), "--lpips-vgg-weights",
        str(vgg_file), "--chunk-size", "4", "--preview", "3", "--out", str(out),
        "--tracking-uri", mlflow_server,
    )  # fmt: skip
    assert rc == 0
    res = _results(out, "reconstruction")
    m = res["metrics"]
    assert m["num_images"] == 6 and res["details"]["num_images"] == 6
    assert 0 < m["psnr"] < PSNR_MAX_DB and -1 < m["ssim"] < 1 and m["lpips"] > 0
    assert np.isfinite(m["rfid"]) and m["rfid"] > 0  # a random decoder reconstructs badly
    _, run = _mlflow_run(mlflow_server, "svg-ray-eval", "reconstruction")
    assert {"rfid", "psnr", "ssim", "lpips"} <= set(run.data.metrics)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_probe_on_latent_parts(
    ray_session: None, autoencoder_file: Path, digits_folder: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    rc = _evaluate(
        "probe", "--autoencoder", str(autoencoder_file), "--input", str(digits_folder),
        "--test-fraction", "0.25", "--chunk-size", "64", "--num-workers", "2", "--out", str(out),
        "--no-mlflow",
    )  # fmt: skip
    assert rc == 0
    res = _results(out, "probe")
    m, d = res["metrics"], res["details"]
    assert d["num_train"] + d["num_test"] == 200 and d["num_test"] == 50
    assert d["channels"] == {"dino": 192, "residual": 8}
    print({k: round(v, 3) for k, v in m.items()})
    # Even a random ViT's pooled patch features separate the digits far above chance.
    assert m["probe_dino_test_accuracy"] > m["probe_chance_accuracy"] + 0.3
    assert m["probe_both_test_accuracy"] > m["probe_chance_accuracy"] + 0.3
