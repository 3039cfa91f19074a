"""Settings of the evaluation jobs: one dataclass per concern, each field a command-line flag."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from svg_ray import storage
from svg_ray.config import require
from svg_ray.data import schema

TASKS = ("generation", "reconstruction", "probe")
InputFormat = Literal["auto", "folder", "parquet"]


def _sha_ok(value: str | None) -> bool:
    return value is None or bool(re.fullmatch(r"[0-9a-fA-F]{64}", value))


@dataclass
class EvalRun:
    """Where an evaluation's results go and what computes them."""

    name: str = "eval"
    """Run name: results go to <out>/<name>/ and the MLflow run is tagged with it."""
    out: str = "outputs/eval"
    """Local folder or s3:// prefix for <name>/results.json, report.png and report.html."""
    experiment: str = "svg-ray-eval"
    """MLflow experiment name."""
    tracking_uri: str | None = None
    """MLflow tracking URI; default: MLFLOW_TRACKING_URI or a sqlite store in ./outputs."""
    mlflow: bool = True
    """Log metrics and the report to MLflow (--no-mlflow: only the files under --out)."""
    num_workers: int = 1
    """Ray actors computing images and features (one per GPU on a cluster)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker actor."""
    gpus_per_worker: float = 0.0
    """GPUs per worker actor (0: compute on CPU)."""
    decode_cpus: float = 0.5
    """CPUs per image-decoding actor (real-image inputs only; up to two of them)."""
    chunk_size: int = 64
    """Images per unit of work; results depend on it (batch numerics), never on --num-workers."""
    batch_size: int = 32
    """Images per forward pass inside a chunk."""
    torch_threads: int = 0
    """torch threads per worker (0: max(1, cpus_per_worker))."""

    def __post_init__(self) -> None:
        require(bool(self.name) and "/" not in self.name, "eval.name must be a non-empty name")
        require(bool(self.out), "eval.out must name a folder or s3:// prefix (--out)")
        require(self.num_workers >= 1, f"eval.num_workers must be >= 1, got {self.num_workers}")
        require(self.cpus_per_worker > 0, "eval.cpus_per_worker must be positive")
        require(self.gpus_per_worker >= 0, "eval.gpus_per_worker must be >= 0")
        require(self.decode_cpus > 0, "eval.decode_cpus must be positive")
        require(self.chunk_size >= 1, f"eval.chunk_size must be >= 1, got {self.chunk_size}")
        require(self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}")
        require(self.torch_threads >= 0, "eval.torch_threads must be >= 0")

    @property
    def results_uri(self) -> str:
        """Folder of this evaluation's files."""
        return storage.join(storage.absolute(self.out).rstrip("/"), self.name)

    @property
    def threads(self) -> int:
        """torch threads per worker."""
        return self.torch_threads or max(1, int(self.cpus_per_worker))

    @property
    def device(self) -> str:
        """Worker device."""
        return "cuda" if self.gpus_per_worker > 0 else "cpu"


@dataclass
class InceptionSettings:
    """The FID Inception network's weights (never downloaded)."""

    inception_weights: str | None = None
    """torch-fidelity's weights-inception-2015-12-05-6726825d.pth: local path or s3:// URI."""
    inception_sha256: str | None = None
    """Expected sha256 of --inception-weights; verified when set."""

    def __post_init__(self) -> None:
        require(
            _sha_ok(self.inception_sha256),
            f"eval.inception_sha256 must be 64 hex digits, got {self.inception_sha256!r}",
        )


@dataclass
class GenerationEval:
    """FID and Inception Score of a sampler bundle's images against reference statistics."""

    bundle: str = ""
    """Sampler bundle folder (local or s3://) with bundle.json, dit_ema and autoencoder, or a
    registered model: models:/<name>/<version>, models:/<name>/latest, models:/<name>@<alias>."""
    reference: str = ""
    """Reference: an .npz with mu/sigma (2048-d Inception pool), or real images (folder tree
    <root>/<class>/<image> or Parquet)."""
    num_images: int = 50_000
    """Images to generate."""
    seed: int = 0
    """Image i uses noise seed (seed << 32) + i: deterministic per image."""
    label_mode: Literal["cycle", "random"] = "cycle"
    """Class of image i: 'cycle' (i % classes, every class equally often) or 'random' (uniform
    draws fixed by --seed and i, as the reference's FID script samples labels)."""
    is_splits: int = 10
    """Inception Score splits (torch-fidelity's default)."""
    reference_format: InputFormat = "auto"
    """Real-image reference: 'auto', 'folder' or 'parquet'."""
    image_column: str = schema.COL_IMAGE
    """Parquet reference: column of encoded image bytes."""
    reference_limit: int = 0
    """Real-image reference: use only the first N images in sorted order (0: all)."""
    save_reference: str | None = None
    """Write the statistics computed from a real-image reference to this .npz for reuse."""
    preview: int = 16
    """Generated images shown in the report."""

    def __post_init__(self) -> None:
        require(bool(self.bundle), "eval.bundle must name a sampler bundle (--bundle)")
        require(
            bool(self.reference),
            "eval.reference must name reference statistics (.npz) or a folder of real images "
            "(--reference)",
        )
        require(self.num_images >= 2, f"eval.num_images must be >= 2, got {self.num_images}")
        require(0 <= self.seed < 2**31, f"eval.seed must be in [0, 2**31), got {self.seed}")
        require(
            self.label_mode in ("cycle", "random"),
            f"eval.label_mode must be 'cycle' or 'random', got {self.label_mode!r}",
        )
        require(self.is_splits >= 1, "eval.is_splits must be >= 1")
        require(
            self.num_images >= self.is_splits,
            f"eval.num_images {self.num_images} must be at least eval.is_splits "
            f"{self.is_splits} (one image per Inception Score split); lower --is-splits",
        )
        require(self.reference_limit >= 0, "eval.reference_limit must be >= 0")
        require(self.preview >= 0, "eval.preview must be >= 0")
        if not self.bundle.startswith("models:/"):  # a registry URI is resolved by launch
            self.bundle = storage.absolute(self.bundle)
        self.reference = storage.absolute(self.reference)


@dataclass
class AutoencoderOnImages:
    """What the autoencoder evaluations share: the autoencoder and the images it is fed."""

    autoencoder: str = ""
    """Autoencoder checkpoint (.safetensors), a sampler bundle folder holding one, or a registered
    model (models:/<name>/<version>, /latest or @<alias>)."""
    input: str = ""
    """The images: folder tree <root>/<class>/<image> or Parquet; local or s3://."""
    input_format: InputFormat = "auto"
    """'auto', 'folder' or 'parquet'."""
    image_column: str = schema.COL_IMAGE
    """Parquet input: column of encoded image bytes."""
    limit: int = 0
    """Use only the first N images of each input in sorted order (0: all)."""

    def __post_init__(self) -> None:
        require(bool(self.autoencoder), "eval.autoencoder must name a checkpoint (--autoencoder)")
        require(bool(self.input), "eval.input must name the images to evaluate on (--input)")
        require(self.limit >= 0, "eval.limit must be >= 0")
        if not self.autoencoder.startswith("models:/"):  # a registry URI is resolved by launch
            self.autoencoder = storage.absolute(self.autoencoder)
        self.input = storage.absolute(self.input)


@dataclass
class ReconstructionEval(AutoencoderOnImages):
    """rFID, PSNR, SSIM and LPIPS of the autoencoder on held-out images (--input)."""

    lpips_vgg_weights: str | None = None
    """torchvision's ImageNet VGG16 state dict (vgg16-397923af.pth) for LPIPS: path or s3://."""
    lpips_sha256: str | None = None
    """Expected sha256 of --lpips-vgg-weights; verified when set."""
    preview: int = 8
    """Original/reconstruction pairs shown in the report."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.preview >= 0, "eval.preview must be >= 0")
        require(
            _sha_ok(self.lpips_sha256),
            f"eval.lpips_sha256 must be 64 hex digits, got {self.lpips_sha256!r}",
        )


@dataclass
class ProbeEval(AutoencoderOnImages):
    """Linear probe on the pooled latent: DINO part, residual part, both (labelled --input)."""

    test_input: str = ""
    """Labelled test images with the same classes ('': hold out --test-fraction of --input)."""
    test_fraction: float = 0.2
    """Stratified share of --input held out for testing when --test-input is not given."""
    label_column: str = schema.COL_LABEL
    """Parquet input: label column (integers, or strings mapped by sorted name)."""
    seed: int = 0
    """Seed of the train/test split."""
    regularization: float = 1.0
    """Inverse L2 strength C of the logistic regression."""
    max_iter: int = 1000
    """Solver iterations (results say whether it converged)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            0.0 < self.test_fraction < 1.0,
            f"eval.test_fraction must be in (0, 1), got {self.test_fraction}",
        )
        require(self.regularization > 0, "eval.regularization must be positive")
        require(self.max_iter >= 1, "eval.max_iter must be >= 1")
        if self.test_input:
            self.test_input = storage.absolute(self.test_input)
