"""Driver side of the evaluation jobs: validate, run the Ray Data stages, fold features, score.

Every input is checked before a worker starts (files, weights, shapes, counts), and each job
returns an ``EvalResult``; ``report.publish`` writes it to JSON, a PNG/HTML report and MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from svg_ray import storage
from svg_ray.checkpoint import (
    AE_FORMAT,
    BUNDLE_AE,
    CheckpointError,
    is_bundle,
    read_bundle_json,
    read_metadata,
)
from svg_ray.config import ConfigError, require, to_dict
from svg_ray.data import inputs, schema
from svg_ray.data.images import DEFAULT_MAX_PIXELS
from svg_ray.data.inputs import InputPlan
from svg_ray.data.precompute import Chunk, make_chunks
from svg_ray.evaluation import stages
from svg_ray.evaluation.config import (
    EvalRun,
    GenerationEval,
    InceptionSettings,
    ProbeEval,
    ReconstructionEval,
)
from svg_ray.evaluation.inception import (
    INCEPTION_SHA256,
    LOGIT_DIM,
    POOL_DIM,
    inception_weights,
)
from svg_ray.evaluation.probe import (
    PARTS,
    fit_probe,
    latent_parts,
    majority_baseline,
    split_train_test,
)
from svg_ray.evaluation.stats import (
    FeatureMoments,
    ImageCountError,
    InceptionScoreAccumulator,
    ReferenceStats,
    check_count,
    frechet_distance,
    load_reference,
)
from svg_ray.flow.samplers import SamplerConfig
from svg_ray.models.autoencoder import AutoencoderConfig
from svg_ray.weights import resolve_asset

RESULTS_FORMAT = "svg-ray-eval/1"


def _nothing() -> None:
    """Default ``validated`` hook."""


@dataclass
class EvalResult:
    """What an evaluation measured, for the JSON file, the report and MLflow."""

    task: str
    metrics: dict[str, float]
    """Scalar results, logged to MLflow."""
    details: dict[str, Any]
    """Counts, provenance and per-part numbers (JSON-able)."""
    config: dict[str, Any]
    """The settings that produced it."""
    seconds: float = 0.0
    plots: dict[str, Any] = field(default_factory=dict)
    """Arrays for the report's figures (not written to JSON)."""

    def to_json(self) -> dict[str, Any]:
        """The results file's content."""
        return {
            "format": RESULTS_FORMAT,
            "task": self.task,
            "metrics": self.metrics,
            "details": self.details,
            "config": self.config,
            "seconds": round(self.seconds, 3),
        }


# --------------------------------------------------------------------------------------------
# Shared: inputs, checkpoints, the cluster, the pipeline
# --------------------------------------------------------------------------------------------


def plan_images(
    uri: str,
    input_format: str,
    image_column: str,
    label_column: str | None,
    limit: int,
    option: str,
) -> InputPlan:
    """Sorted list of the images under ``uri`` (first ``limit`` if set); labels from the class
    folders or ``label_column`` (None: unlabelled, every label 0)."""
    return inputs.plan_inputs(uri, input_format, image_column, label_column, "", limit, option)


def autoencoder_file(uri: str) -> str:
    """An autoencoder checkpoint: the file itself, or the one inside a sampler bundle folder."""
    return storage.join(uri, BUNDLE_AE) if is_bundle(uri) else uri


def autoencoder_config(uri: str, option: str = "--autoencoder") -> AutoencoderConfig:
    """The config in an autoencoder checkpoint's header (the weights are not read)."""
    try:
        meta = read_metadata(uri)
    except CheckpointError as e:
        raise CheckpointError(f"{option}: {e}") from None
    if meta.get("format") != AE_FORMAT:
        raise CheckpointError(
            f"{option}: {uri} has format {meta.get('format')!r}, not an autoencoder checkpoint "
            f"({AE_FORMAT}); pass the file written by `svg-ray train-ae` or a sampler bundle"
        )
    return AutoencoderConfig.from_dict(json.loads(meta["config"]))


def start_ray(run: EvalRun) -> None:
    """Connect (RAY_ADDRESS) or start a local cluster, and refuse work it can never schedule."""
    from svg_ray.ray_cluster import check_resources, ensure_ray

    ensure_ray()
    check_resources(
        run.num_workers * run.cpus_per_worker + run.decode_cpus,
        run.num_workers * run.gpus_per_worker,
        f"{run.num_workers} worker(s) x {run.cpus_per_worker:g} CPUs and {run.gpus_per_worker:g} "
        f"GPUs + a decoder x {run.decode_cpus:g} CPUs",
        "lower --num-workers, --cpus-per-worker or --gpus-per-worker",
    )


def run_stage(
    specs: list[str],
    stage: type,
    kwargs: dict[str, Any],
    run: EvalRun,
    decode_resolution: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Rows of ``stage`` over ``specs`` (one chunk each), in chunk order.

    With ``decode_resolution`` the specs are image chunks decoded and centre-cropped first by
    the input layer's CPU stage.
    """
    import ray

    if decode_resolution:
        ds = inputs.decoded_chunks(specs, decode_resolution, DEFAULT_MAX_PIXELS, run.decode_cpus, 2)
    else:
        ds = ray.data.from_items(
            [{schema.ROW_SPEC: s} for s in specs], override_num_blocks=len(specs)
        )
    ds = ds.map_batches(
        stage,
        fn_constructor_kwargs={
            **kwargs,
            "batch_size": run.batch_size,
            "device": run.device,
            "threads": run.threads,
        },
        batch_size=1,
        num_cpus=run.cpus_per_worker,
        num_gpus=run.gpus_per_worker,
        compute=ray.data.ActorPoolStrategy(size=run.num_workers),
    )
    rows = ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=1)
    with storage.unwrap_storage_errors():  # storage that kept failing: one line, not a trace
        yield from stages.stream_in_order(rows, len(specs))


def image_chunk_specs(plans: list[InputPlan], image_column: str, chunk_size: int) -> list[str]:
    """Chunk specs of one or more image lists, numbered consecutively."""
    specs: list[str] = []
    for plan in plans:
        for c in make_chunks(plan, chunk_size):
            numbered = Chunk(len(specs), c.ids, c.labels, c.sources)
            specs.append(numbered.spec(plan.source_format, image_column))
    return specs


def require_decoded(row: dict[str, np.ndarray], option: str) -> None:
    """Every listed image must decode: a metric over a silently smaller set is wrong."""
    skipped = json.loads(stages.one(row, schema.ROW_SKIPPED))
    if skipped:
        shown = "; ".join(f"{i}: {why}" for i, why in skipped[:5])
        raise ConfigError(
            f"{option}: {len(skipped)} image(s) in chunk {int(stages.one(row, 'chunk'))} could "
            f"not be decoded ({shown}); every image counts in an evaluation: fix or remove them"
        )


def inception_details(settings: InceptionSettings, sha256: str) -> dict[str, Any]:
    """Provenance of the Inception weights for the results file."""
    return {
        "weights": settings.inception_weights,
        "sha256": sha256,
        "standard": sha256 == INCEPTION_SHA256,
    }


def _warn_nonstandard(sha256: str) -> None:
    if sha256 != INCEPTION_SHA256:
        print(
            f"[eval] warning: the Inception weights (sha256 {sha256[:12]}...) are not "
            "torch-fidelity's weights-inception-2015-12-05-6726825d.pth: FID and IS are not "
            "comparable with published numbers",
            flush=True,
        )


# --------------------------------------------------------------------------------------------
# Generation: FID and Inception Score
# --------------------------------------------------------------------------------------------


def _reference_is_npz(uri: str) -> bool:
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(uri)
    info = storage.retrying(fs.get_file_info, path, what=uri)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"--reference: not found: {uri}")
    if info.type == pafs.FileType.File and not uri.endswith((".npz", ".parquet")):
        raise ConfigError(
            f"--reference: {uri} is neither an .npz of statistics nor Parquet; give an .npz "
            "with mu/sigma, an image folder tree or Parquet of encoded images"
        )
    return info.type == pafs.FileType.File and uri.endswith(".npz")


def reference_from_images(
    plan: InputPlan, cfg: GenerationEval, incep: InceptionSettings, run: EvalRun, res: int
) -> ReferenceStats:
    """Inception statistics of real images, computed on the workers."""
    specs = image_chunk_specs([plan], cfg.image_column, run.chunk_size)
    kwargs = {
        "inception_weights": incep.inception_weights,
        "inception_sha256": incep.inception_sha256,
    }
    moments = FeatureMoments.zeros(POOL_DIM)
    for row in run_stage(specs, stages.ImageFeatures, kwargs, run, decode_resolution=res):
        require_decoded(row, "--reference")
        moments = moments.merge(FeatureMoments.of(np.asarray(stages.one(row, "pool"))))
    check_count(f"reference images under {cfg.reference}", len(plan.ids), moments.count)
    return ReferenceStats.from_moments(moments, cfg.reference)


@dataclass
class _Generated:
    """What the generation pass accumulated over every chunk."""

    moments: FeatureMoments
    scores: InceptionScoreAccumulator
    previews: list[np.ndarray]


def _generate_features(
    cfg: GenerationEval, incep: InceptionSettings, sampler: SamplerConfig, run: EvalRun
) -> _Generated:
    """Sample ``num_images`` images on the workers; fold their Inception features and logits,
    checking every chunk returns exactly its images."""
    n, size = cfg.num_images, run.chunk_size
    specs = [
        stages.generation_spec(c, s, min(size, n - s)) for c, s in enumerate(range(0, n, size))
    ]
    kwargs = {
        "bundle": cfg.bundle,
        "sampler": to_dict(sampler),
        "inception_weights": incep.inception_weights,
        "inception_sha256": incep.inception_sha256,
        "seed": cfg.seed,
        "preview": cfg.preview,
        "label_mode": cfg.label_mode,
    }
    out = _Generated(
        FeatureMoments.zeros(POOL_DIM), InceptionScoreAccumulator(n, LOGIT_DIM, cfg.is_splits), []
    )
    for c, row in enumerate(run_stage(specs, stages.GenerateFeatures, kwargs, run)):
        start, count = c * size, min(size, n - c * size)
        idx = np.asarray(stages.one(row, "indices"))
        if not np.array_equal(idx, np.arange(start, start + count)):
            raise ImageCountError(
                f"generation chunk {c} returned {len(idx)} images {idx[:4].tolist()}... instead "
                f"of images {start}..{start + count - 1}"
            )
        pool = np.asarray(stages.one(row, "pool"))
        logits = np.asarray(stages.one(row, "logits"))
        check_count(f"generation chunk {c}", count, min(len(pool), len(logits)))
        out.moments = out.moments.merge(FeatureMoments.of(pool))
        out.scores.add(idx, logits)
        out.previews.append(np.asarray(stages.one(row, "preview")))
    check_count("generated images", n, out.moments.count, "a worker dropped images")
    return out


def evaluate_generation(
    cfg: GenerationEval,
    incep: InceptionSettings,
    sampler: SamplerConfig,
    run: EvalRun,
    validated: Callable[[], None] = _nothing,
) -> EvalResult:
    """FID and IS of ``num_images`` bundle samples against the reference."""
    t0 = time.perf_counter()
    meta = read_bundle_json(cfg.bundle)
    res = int(meta["autoencoder_config"]["resolution"])
    _, sha = inception_weights(incep.inception_weights, incep.inception_sha256)
    _warn_nonstandard(sha)
    ref_plan = None
    if _reference_is_npz(cfg.reference):
        reference = load_reference(cfg.reference, POOL_DIM)
    else:
        ref_plan = plan_images(
            cfg.reference, cfg.reference_format, cfg.image_column, None,
            cfg.reference_limit, "--reference",
        )  # fmt: skip
        require(len(ref_plan.ids) >= 2, f"--reference: {cfg.reference} holds fewer than 2 images")
    validated()  # every input checked: only now open the MLflow run
    start_ray(run)
    if ref_plan is not None:
        reference = reference_from_images(ref_plan, cfg, incep, run, res)
        if cfg.save_reference:
            reference.save(cfg.save_reference)
    t_ref = time.perf_counter() - t0
    gen = _generate_features(cfg, incep, sampler, run)
    gen_sigma = gen.moments.covariance()
    is_mean, is_std = gen.scores.result()
    labels = "index % classes" if cfg.label_mode == "cycle" else f"random (seed {cfg.seed})"
    return EvalResult(
        task="generation",
        metrics={
            "fid": frechet_distance(reference.mu, reference.sigma, gen.moments.mean, gen_sigma),
            "inception_score": is_mean,
            "inception_score_std": is_std,
            "num_images": float(cfg.num_images),
        },
        details={
            "num_images": cfg.num_images,
            "reference": {
                "source": reference.source,
                "images": reference.count,
                "from": "npz" if ref_plan is None else "images",
                "saved_to": cfg.save_reference,
            },
            "inception": inception_details(incep, sha),
            "inception_score_splits": gen.scores.scores().tolist(),
            "classes": len(meta["class_names"]),
            "labels": labels,
            "bundle_step": int(meta.get("step", 0)),
            "seconds_reference": round(t_ref, 3),
            "workers": run.num_workers,
        },
        config={
            "generation": dataclasses.asdict(cfg),
            "sampler": to_dict(sampler),
            "run": dataclasses.asdict(run),
        },
        seconds=time.perf_counter() - t0,
        plots={
            "preview": np.concatenate(gen.previews)[: cfg.preview],
            "spectrum_generated": np.linalg.eigvalsh(gen_sigma)[::-1],
            "spectrum_reference": np.linalg.eigvalsh(reference.sigma)[::-1],
            "is_splits": gen.scores.scores(),
        },
    )


# --------------------------------------------------------------------------------------------
# Reconstruction: rFID, PSNR, SSIM, LPIPS
# --------------------------------------------------------------------------------------------


def evaluate_reconstruction(
    cfg: ReconstructionEval,
    incep: InceptionSettings,
    run: EvalRun,
    validated: Callable[[], None] = _nothing,
) -> EvalResult:
    """Reconstruct every held-out image; per-image metrics and the rFID of the set."""
    t0 = time.perf_counter()
    ae_uri = autoencoder_file(cfg.autoencoder)
    ae_cfg = autoencoder_config(ae_uri)
    _, sha = inception_weights(incep.inception_weights, incep.inception_sha256)
    _warn_nonstandard(sha)
    resolve_asset(cfg.lpips_vgg_weights, "--lpips-vgg-weights (torchvision's vgg16-397923af.pth)")
    plan = plan_images(cfg.input, cfg.input_format, cfg.image_column, None, cfg.limit, "--input")
    require(len(plan.ids) >= 2, f"--input: {cfg.input} holds fewer than 2 images (rFID needs 2)")
    validated()  # every input checked: only now open the MLflow run
    start_ray(run)
    specs = image_chunk_specs([plan], cfg.image_column, run.chunk_size)
    kwargs = {
        "autoencoder": ae_uri,
        "lpips_vgg_weights": cfg.lpips_vgg_weights,
        "lpips_sha256": cfg.lpips_sha256,
        "inception_weights": incep.inception_weights,
        "inception_sha256": incep.inception_sha256,
        "preview": cfg.preview,
    }
    real, recon = FeatureMoments.zeros(POOL_DIM), FeatureMoments.zeros(POOL_DIM)
    per_image: dict[str, list[np.ndarray]] = {"psnr": [], "ssim": [], "lpips": []}
    preview_real, preview_recon = [], []
    decode = ae_cfg.resolution
    for row in run_stage(specs, stages.ReconstructFeatures, kwargs, run, decode_resolution=decode):
        require_decoded(row, "--input")
        real = real.merge(FeatureMoments.of(np.asarray(stages.one(row, "pool_real"))))
        recon = recon.merge(FeatureMoments.of(np.asarray(stages.one(row, "pool_recon"))))
        for k in per_image:
            per_image[k].append(np.asarray(stages.one(row, k), np.float64))
        preview_real.append(np.asarray(stages.one(row, "preview_real")))
        preview_recon.append(np.asarray(stages.one(row, "preview_recon")))
    values = {k: np.concatenate(v) for k, v in per_image.items()}
    n = len(plan.ids)
    check_count(f"held-out images under {cfg.input}", n, real.count)
    for k, v in values.items():
        check_count(f"per-image {k}", n, len(v))
    rfid = frechet_distance(real.mean, real.covariance(), recon.mean, recon.covariance())
    metrics = {"rfid": rfid, "num_images": float(n)}
    for k, v in values.items():
        metrics[k] = float(v.mean())
        metrics[f"{k}_std"] = float(v.std())
    return EvalResult(
        task="reconstruction",
        metrics=metrics,
        details={
            "num_images": n,
            "input": cfg.input,
            "autoencoder": ae_uri,
            "resolution": ae_cfg.resolution,
            "inception": inception_details(incep, sha),
            "lpips": {"vgg_weights": cfg.lpips_vgg_weights},
            "psnr_max_db": 100.0,
            "workers": run.num_workers,
        },
        config={"reconstruction": dataclasses.asdict(cfg), "run": dataclasses.asdict(run)},
        seconds=time.perf_counter() - t0,
        plots={
            **values,
            "preview_real": np.concatenate(preview_real)[: cfg.preview],
            "preview_recon": np.concatenate(preview_recon)[: cfg.preview],
        },
    )


# --------------------------------------------------------------------------------------------
# Semantics: linear probe on the latent
# --------------------------------------------------------------------------------------------


def evaluate_probe(
    cfg: ProbeEval, run: EvalRun, validated: Callable[[], None] = _nothing
) -> EvalResult:
    """Linear-probe accuracy of the pooled latent's DINO part, residual part and both."""
    t0 = time.perf_counter()
    ae_uri = autoencoder_file(cfg.autoencoder)
    ae_cfg = autoencoder_config(ae_uri)
    train_plan = plan_images(
        cfg.input, cfg.input_format, cfg.image_column, cfg.label_column, cfg.limit, "--input"
    )
    plans = [train_plan]
    if cfg.test_input:
        test_plan = plan_images(
            cfg.test_input, cfg.input_format, cfg.image_column, cfg.label_column, cfg.limit,
            "--test-input",
        )  # fmt: skip
        if test_plan.class_names != train_plan.class_names:
            raise ConfigError(
                f"--test-input has classes {test_plan.class_names[:5]}... but --input has "
                f"{train_plan.class_names[:5]}...: both need the same class names"
            )
        plans.append(test_plan)
    validated()  # every input checked: only now open the MLflow run
    start_ray(run)
    specs = image_chunk_specs(plans, cfg.image_column, run.chunk_size)
    kwargs = {"autoencoder": ae_uri}
    pooled, labels = [], []
    for row in run_stage(specs, stages.EncodePooled, kwargs, run, ae_cfg.resolution):
        require_decoded(row, "--input/--test-input")
        pooled.append(np.asarray(stages.one(row, "pooled"), np.float64))
        labels.append(np.asarray(stages.one(row, schema.ROW_LABELS), np.int64))
    x, y = np.concatenate(pooled), np.concatenate(labels)
    n_listed = sum(len(p.ids) for p in plans)
    check_count("probe images", n_listed, len(x))
    if cfg.test_input:
        train = np.arange(len(train_plan.ids))
        test = np.arange(len(train_plan.ids), n_listed)
    else:
        train, test = split_train_test(y, cfg.test_fraction, cfg.seed)
    dino_channels = x.shape[1] - ae_cfg.residual.out_dim
    parts = latent_parts(x, dino_channels)
    results = {
        p: fit_probe(
            parts[p][train], y[train], parts[p][test], y[test], cfg.regularization, cfg.max_iter
        )
        for p in PARTS
    }
    chance = majority_baseline(y[train], y[test])
    metrics = {f"probe_{p}_test_accuracy": r.test_accuracy for p, r in results.items()}
    metrics.update({f"probe_{p}_train_accuracy": r.train_accuracy for p, r in results.items()})
    metrics["probe_chance_accuracy"] = chance
    metrics["probe_both_minus_dino"] = results["both"].test_accuracy - results["dino"].test_accuracy
    return EvalResult(
        task="probe",
        metrics=metrics,
        details={
            "num_train": len(train),
            "num_test": len(test),
            "classes": len(train_plan.class_names),
            "channels": {"dino": dino_channels, "residual": ae_cfg.residual.out_dim},
            "converged": {p: r.converged for p, r in results.items()},
            "autoencoder": ae_uri,
            "pooling": "mean over the latent grid",
            "workers": run.num_workers,
        },
        config={"probe": dataclasses.asdict(cfg), "run": dataclasses.asdict(run)},
        seconds=time.perf_counter() - t0,
        plots={
            "accuracy": {p: r.test_accuracy for p, r in results.items()},
            "chance": chance,
        },
    )
