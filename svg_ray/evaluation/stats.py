"""Statistics behind the generation metrics, in float64: feature moments, the Fréchet distance
and a streaming Inception Score.

FID (Heusel et al. 2017, TTUR's fid.py) is the Fréchet distance of two Gaussians fitted to
Inception pool features:
    ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2}).
S1 S2 is not symmetric, so a general ``sqrtm`` can return complex values or lose accuracy when the
covariances are singular (always, with fewer images than feature dimensions). Its eigenvalues are
those of the symmetric PSD matrix S1^{1/2} S2 S1^{1/2}, so the trace term is computed with
symmetric eigendecompositions only: real, stable and exact for singular matrices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from svg_ray import storage
from svg_ray.config import ConfigError
from svg_ray.errors import SvgRayError

REFERENCE_OPTION = "--reference"


class ImageCountError(SvgRayError, RuntimeError):
    """Fewer (or other) images were evaluated than were asked for."""


def check_count(what: str, expected: int, got: int, hint: str = "") -> None:
    """Raise ImageCountError unless ``got == expected``: a metric over a short set is wrong."""
    if got != expected:
        raise ImageCountError(
            f"{what}: evaluated {got} images but expected {expected}"
            + (f"; {hint}" if hint else "")
        )


# --------------------------------------------------------------------------------------------
# Feature moments
# --------------------------------------------------------------------------------------------


@dataclass
class FeatureMoments:
    """Count, mean (d,) and centred sum of outer products (d, d) of feature vectors, float64.

    ``merge`` is Chan et al.'s parallel update, so chunks folded one at a time give the same
    mean and covariance as one pass over all features (up to rounding) without keeping them.
    """

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def zeros(cls, dim: int) -> FeatureMoments:
        """No features yet."""
        return cls(0, np.zeros(dim), np.zeros((dim, dim)))

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureMoments:
        """Moments of features (n, d)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be (n, d), got shape {x.shape}")
        if len(x) == 0:
            return cls.zeros(x.shape[1])
        mean = x.mean(axis=0)
        c = x - mean
        return cls(len(x), mean, c.T @ c)

    @property
    def dim(self) -> int:
        """Feature dimension d."""
        return int(self.mean.shape[0])

    def merge(self, other: FeatureMoments) -> FeatureMoments:
        """Moments of the union of both sets."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge {self.dim}-d and {other.dim}-d feature moments")
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.count * other.count / n)
        return FeatureMoments(n, mean, m2)

    def covariance(self) -> np.ndarray:
        """Unbiased covariance (d, d), as ``np.cov(features, rowvar=False)``."""
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 features, have {self.count}")
        return self.m2 / (self.count - 1)


# --------------------------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------------------------


def _clip_rounding(w: np.ndarray) -> np.ndarray:
    """Eigenvalues below d * eps * max (numpy's matrix_rank tolerance) set to 0.

    A covariance of n < d features is singular; rounding leaves its null-space eigenvalues at
    about +-1e-16 * max, and sqrt would turn each into ~1e-8 * sqrt(max): thousands of them bias
    the trace term (FID of a set against itself came out -2e-6 instead of 0).
    """
    tol = max(float(w.max(initial=0.0)), 0.0) * len(w) * np.finfo(np.float64).eps
    return np.where(w > tol, w, 0.0)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(_clip_rounding(w))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^{1/2}) = sum of sqrt(eigenvalues of S1^{1/2} S2 S1^{1/2}), float64."""
    r1 = _psd_sqrt(np.asarray(sigma1, np.float64))
    m = r1 @ np.asarray(sigma2, np.float64) @ r1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(_clip_rounding(ev)).sum())


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): mu (d,), sigma (d, d)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"shapes do not match: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}"
        )
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2))


# --------------------------------------------------------------------------------------------
# Reference statistics (.npz with mu and sigma, the format of TTUR / pytorch-fid / ADM)
# --------------------------------------------------------------------------------------------


@dataclass
class ReferenceStats:
    """Gaussian statistics of the reference (real) images' features."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int = 0
    """Images they were computed from (0 when the file does not say)."""
    source: str = ""
    """Where they came from (an .npz URI or an image folder)."""

    @classmethod
    def from_moments(cls, m: FeatureMoments, source: str) -> ReferenceStats:
        """Mean and unbiased covariance of computed features."""
        return cls(m.mean, m.covariance(), m.count, source)

    def save(self, uri: str) -> None:
        """Write an .npz with ``mu``, ``sigma`` and ``count`` (local path or s3://)."""
        import io

        buf = io.BytesIO()
        np.savez(buf, mu=self.mu, sigma=self.sigma, count=np.int64(self.count))
        storage.write_bytes(uri, buf.getvalue())


def load_reference(uri: str, dim: int, option: str = REFERENCE_OPTION) -> ReferenceStats:
    """Read and validate reference statistics from an .npz holding ``mu`` (d,) and ``sigma``."""
    import io

    if not storage.exists(uri):
        raise ConfigError(f"{option}: reference statistics not found: {uri}")
    try:
        with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as z:
            arrays: dict[str, Any] = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ConfigError(f"{option}: {uri} is not a readable .npz file: {e}") from e
    missing = [k for k in ("mu", "sigma") if k not in arrays]
    if missing:
        raise ConfigError(
            f"{option}: {uri} lacks {missing} (has {sorted(arrays)}); reference statistics are an "
            "npz with 'mu' (d,) and 'sigma' (d, d), as written by --save-reference, pytorch-fid "
            "or ADM's evaluation suite; or give a folder of real images instead"
        )
    mu = np.asarray(arrays["mu"], np.float64)
    sigma = np.asarray(arrays["sigma"], np.float64)
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ConfigError(
            f"{option}: {uri} has mu {mu.shape} and sigma {sigma.shape}, expected ({dim},) and "
            f"({dim}, {dim}) for Inception pool features"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ConfigError(f"{option}: {uri} holds non-finite values")
    scale = max(1.0, float(np.abs(sigma).max()))
    if float(np.abs(sigma - sigma.T).max()) > 1e-6 * scale:
        raise ConfigError(f"{option}: sigma in {uri} is not symmetric: not a covariance matrix")
    count = int(arrays["count"]) if "count" in arrays and np.ndim(arrays["count"]) == 0 else 0
    return ReferenceStats(mu, sigma, count, uri)


# --------------------------------------------------------------------------------------------
# Inception Score, streamed
# --------------------------------------------------------------------------------------------


class InceptionScoreAccumulator:
    """Inception Score (Salimans et al. 2016) over N samples folded in any number of pieces.

    Matches torch-fidelity's ``isc_features_to_metric(logits, splits, shuffle, rng_seed)``: the
    samples are permuted with ``RandomState(rng_seed)`` and cut into ``splits`` contiguous
    groups; a group's score is exp(mean_i KL(p_i || q)) with q the group's mean p. Because
    KL(p_i || q) = sum p_i log p_i - sum p_i log q, each group needs only its count, the sum of
    its p_i and the sum of its sum p_i log p_i, which are accumulated as samples arrive.
    """

    def __init__(
        self,
        num_samples: int,
        classes: int,
        splits: int = 10,
        shuffle: bool = True,
        seed: int = 2020,
    ) -> None:
        """Groups are fixed by ``num_samples`` up front, so the order of arrival is irrelevant."""
        if num_samples < splits:
            raise ConfigError(
                f"the Inception Score uses {splits} splits, so it needs at least {splits} images "
                f"(have {num_samples}); lower --is-splits or raise --num-images"
            )
        perm = np.random.RandomState(seed).permutation(num_samples) if shuffle else None
        position = np.arange(num_samples)
        if perm is not None:
            position[perm] = np.arange(num_samples)  # sample perm[k] sits at position k
        bounds = np.array([i * num_samples // splits for i in range(splits + 1)])
        self.group = np.searchsorted(bounds, position, side="right") - 1  # (N,)
        self.num_samples = num_samples
        self.splits = splits
        self.count = np.zeros(splits, np.int64)
        self.sum_p = np.zeros((splits, classes))
        self.sum_plogp = np.zeros(splits)

    def add(self, indices: np.ndarray, logits: np.ndarray) -> None:
        """Fold samples ``indices`` (n,) with classifier logits (n, classes)."""
        import torch

        idx = np.asarray(indices, np.int64)
        lg = torch.from_numpy(np.array(logits, dtype=np.float64))  # a copy: Ray's are read-only
        log_p = lg.log_softmax(dim=1)
        p = log_p.exp()
        plogp = (p * log_p).sum(dim=1).numpy()  # (n,)
        g = self.group[idx]
        np.add.at(self.count, g, 1)
        np.add.at(self.sum_p, g, p.numpy())
        np.add.at(self.sum_plogp, g, plogp)

    def scores(self) -> np.ndarray:
        """Per-split scores (splits,)."""
        n = self.count.astype(np.float64)
        q = self.sum_p / n[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            qlogq = np.where(q > 0, q * np.log(q), 0.0).sum(axis=1)
        return np.exp(self.sum_plogp / n - qlogq)  # type: ignore[no-any-return]

    def result(self) -> tuple[float, float]:
        """(mean, std) over splits; every sample must have arrived."""
        check_count("Inception Score", self.num_samples, int(self.count.sum()))
        s = self.scores()
        return float(np.mean(s)), float(np.std(s))
