"""Linear probe: how linearly separable the classes are in (parts of) the SVG latent.

The SVG paper's claim (arXiv 2510.15301, Sec. 5) is that the latent keeps DINO's semantics:
ImageNet linear probe 81.80 for the SVG latent vs 81.71 for DINOv3. Here each image's latent
(C, h, w) is mean-pooled over the grid to (C,), then split into the DINO channels, the residual
channels and both; a multinomial logistic regression on standardised features is fitted on the
training images and scored on held-out ones.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from svg_ray.config import ConfigError

PARTS = ("dino", "residual", "both")


def latent_parts(pooled: np.ndarray, dino_channels: int) -> dict[str, np.ndarray]:
    """Pooled latents (n, C) -> {'dino': (n, C_d), 'residual': (n, C - C_d), 'both': (n, C)}."""
    return {
        "dino": pooled[:, :dino_channels],
        "residual": pooled[:, dino_channels:],
        "both": pooled,
    }


@dataclass
class ProbeResult:
    """Accuracies of one fitted probe."""

    train_accuracy: float
    test_accuracy: float
    converged: bool
    """False when the solver stopped at max_iter (the accuracy may still rise)."""


def fit_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    regularization: float = 1.0,
    max_iter: int = 1000,
) -> ProbeResult:
    """Standardise, fit a multinomial logistic regression (L2, inverse strength C), score."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(train_y)) < 2:
        raise ConfigError("the probe's training set has a single class: nothing to separate")
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=regularization, max_iter=max_iter))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(np.asarray(train_x, np.float64), train_y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return ProbeResult(
        train_accuracy=float(clf.score(np.asarray(train_x, np.float64), train_y)),
        test_accuracy=float(clf.score(np.asarray(test_x, np.float64), test_y)),
        converged=converged,
    )


def split_train_test(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, test) index arrays; every class needs two images."""
    from sklearn.model_selection import train_test_split

    classes, counts = np.unique(labels, return_counts=True)
    few = classes[counts < 2]
    if len(few):
        raise ConfigError(
            f"classes {few[:5].tolist()} have fewer than 2 images: a stratified hold-out needs "
            "2 per class; add images or give a separate --test-input"
        )
    n_test = max(len(classes), round(test_fraction * len(labels)))
    if len(labels) - n_test < len(classes):
        raise ConfigError(
            f"{len(labels)} images are too few to hold out {n_test} for testing and keep one per "
            f"class ({len(classes)}) for training; lower --test-fraction or add images"
        )
    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=n_test, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(test)


def majority_baseline(train_y: np.ndarray, test_y: np.ndarray) -> float:
    """Test accuracy of always predicting the most common training class (chance level)."""
    values, counts = np.unique(train_y, return_counts=True)
    return float(np.mean(test_y == values[np.argmax(counts)]))
