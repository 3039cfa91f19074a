"""Quality against sampling steps on the demo's model, measured offline with a digit classifier.

    python -m benchmarks.quality [--bundle outputs/demo/bundle] [--per-class 40]
        [--steps 1 2 4 8 25] [--cfg 1 3] [--threads 0] [--out outputs/bench/quality.json]

The demo trains on scikit-learn's digits, so its samples can be judged without any download: a
small MLP (16x16 grey pixels -> 64 ReLU units -> 10 classes) is trained on 80% of the real digits,
prepared exactly as the demo writes them (bilinear upsampling to the bundle's resolution, uint8),
and scores

- accuracy: how often a sample is classified as the class it was asked for, and
- FD: the Frechet distance between the samples' and the real digits' hidden-layer features
  (fixed once trained; the same 64-d space for every setting).

The baseline, measured in the same run, is real digits the classifier never saw, as many per
class as each setting samples: their accuracy is the classifier's own, and their FD against the
training digits is the floor a set of that size reaches (FD is biased upward for small sets);
``fd_ratio`` is a setting's FD over that floor (1 = as close as real digits). Every setting
samples the same labels (``--per-class`` of each class) from the same seeds, Euler with the
bundle's time shift and constant CFG. Seconds are wall-clock on whatever else the machine runs.
Writes JSON, prints a markdown table and a one-line summary. Without a bundle it prints why
and exits with code 3 (``run_all`` reports a skip).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import machine, set_env, write_json

set_env()  # before timm is imported: no hub downloads

DEFAULT_BUNDLE = "outputs/demo/bundle"
SKIPPED = 3
"""Exit code when there is nothing to measure (no bundle); benchmarks.run_all reports a skip."""
POOLED = 16
"""Side of the grey thumbnails the classifier reads."""


def thumbnails(images_u8: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> (N, 16*16) grey thumbnails in [0, 1] (area averaging)."""
    x = torch.as_tensor(images_u8).float().mean(dim=3)[:, None] / 255.0  # (N, 1, H, W)
    return F.adaptive_avg_pool2d(x, POOLED).flatten(1).numpy()


def real_digits(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """The demo's real images as uint8 (N, R, R, 3) (what write_image_folder saves), labels."""
    from svg_ray.data.digits import load_digits_tensor

    x, y = load_digits_tensor(resolution)
    u8 = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return u8.numpy(), y.numpy()


class DigitJudge:
    """An MLP on real digit thumbnails: class predictions and its 64-d hidden features."""

    def __init__(self, x: np.ndarray, y: np.ndarray, seed: int = 0) -> None:
        """Train on thumbnails ``x`` (N, 256) with labels ``y``."""
        from sklearn.neural_network import MLPClassifier

        self.mlp = MLPClassifier(hidden_layer_sizes=(64,), max_iter=2000, random_state=seed)
        self.mlp.fit(x, y)

    def features(self, x: np.ndarray) -> np.ndarray:
        """Hidden-layer activations (N, 64), float64."""
        w, b = self.mlp.coefs_[0], self.mlp.intercepts_[0]
        return np.maximum(x @ w + b, 0.0).astype(np.float64)

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        """Share of ``x`` classified as ``y``."""
        return float((self.mlp.predict(x) == y).mean())


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``a`` and ``b`` (N, D)."""
    from svg_ray.evaluation.stats import frechet_distance

    return float(
        frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    )


def sample_images(
    bundle: str, labels: np.ndarray, steps: int, cfg_scale: float, batch: int
) -> tuple[np.ndarray, float]:
    """uint8 samples (N, R, R, 3) for ``labels`` (image i from seed i) and the seconds taken."""
    from svg_ray.flow.samplers import SamplerConfig
    from svg_ray.generate import generate, to_uint8

    dit, ae, info = _bundle(bundle)
    shift = float(info.sampler_defaults.get("time_shift", 0.15))
    cfg = SamplerConfig(steps=steps, kind="euler", time_shift=shift, cfg_scale=cfg_scale)
    out = []
    t0 = time.perf_counter()
    for s in range(0, len(labels), batch):
        lab = torch.as_tensor(labels[s : s + batch])
        seeds = list(range(s, s + len(lab)))
        out.append(to_uint8(generate(dit, ae, info.latent_stats, lab, seeds, cfg)).numpy())
    return np.concatenate(out), time.perf_counter() - t0


_LOADED: dict[str, Any] = {}


def _bundle(uri: str) -> Any:
    """The bundle's (EMA DiT, autoencoder, info), loaded once."""
    if uri not in _LOADED:
        from svg_ray.checkpoint import load_bundle

        _LOADED[uri] = load_bundle(uri)
    return _LOADED[uri]


def markdown(rows: list[dict[str, Any]], base: dict[str, Any]) -> str:
    """The results as a markdown table (one row per steps x CFG, then the real-digit baseline)."""
    lines = [
        "| Euler steps | CFG | class accuracy | FD | FD / real floor | seconds |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['steps']} | {r['cfg_scale']:g} | {r['accuracy']:.3f} | {r['fd']:.2f} | "
            f"{r['fd_ratio']:.1f} | {r['seconds']:.1f} |"
        )
    lines.append(
        f"| real digits (held out) | - | {base['accuracy']:.3f} | {base['fd']:.2f} | 1.0 | - |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Train the judge, sample every setting, score, write JSON; exit 3 without a bundle."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__)
    p.add_argument("--bundle", default=DEFAULT_BUNDLE, help="sampler bundle of the demo's model")
    p.add_argument("--per-class", type=int, default=20, help="samples per class and setting")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 25])
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0])
    p.add_argument("--batch", type=int, default=100, help="images per sampling call")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the classifier and the split")
    p.add_argument("--out", default="outputs/bench/quality.json")
    a = p.parse_args(argv)
    from svg_ray.checkpoint import is_bundle

    if not is_bundle(a.bundle):
        print(
            f"skipped: no sampler bundle at {a.bundle}; run `make demo` first "
            "(or pass --bundle DIR)"
        )
        return SKIPPED
    if a.threads:
        torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    _, ae, info = _bundle(a.bundle)
    classes = len(info.class_names)
    if classes != 10:
        raise SystemExit(f"{a.bundle} has {classes} classes; this benchmark judges the digits")
    images, y = real_digits(ae.cfg.resolution)
    rng = np.random.default_rng(a.seed)
    order = rng.permutation(len(y))
    test, train = order[: len(y) // 5], order[len(y) // 5 :]
    thumbs = thumbnails(images)
    judge = DigitJudge(thumbs[train], y[train], a.seed)
    real_feats = judge.features(thumbs[train])
    # The floor: per_class held-out digits of each class (all of a class if it has fewer).
    held = np.concatenate([test[y[test] == c][: a.per_class] for c in range(classes)])
    base = {
        "images": len(held),
        "accuracy": judge.accuracy(thumbs[held], y[held]),
        "fd": frechet(judge.features(thumbs[held]), real_feats),
    }
    labels = np.repeat(np.arange(classes), a.per_class)
    rows = []
    for cfg_scale in a.cfg:
        for steps in a.steps:
            samples, seconds = sample_images(a.bundle, labels, steps, cfg_scale, a.batch)
            st = thumbnails(samples)
            fd = frechet(judge.features(st), real_feats)
            rows.append(
                {
                    "steps": steps,
                    "cfg_scale": cfg_scale,
                    "images": len(labels),
                    "accuracy": judge.accuracy(st, labels),
                    "fd": fd,
                    "fd_ratio": fd / base["fd"],
                    "seconds": round(seconds, 2),
                }
            )
            print(f"[quality] steps {steps} cfg {cfg_scale:g}: {rows[-1]}", flush=True)
    table = markdown(rows, base)
    report = {
        "benchmark": "quality",
        "bundle": str(Path(a.bundle).resolve()),
        "bundle_step": int(getattr(info, "step", 0) or 0),
        "sampler": "euler, constant CFG, time shift from the bundle",
        "classifier": "MLP 256-64-10 on 16x16 grey thumbnails of 80% of the real digits",
        "baseline_real_held_out": base,
        "results": rows,
        "table_markdown": table,
        "seconds": round(time.perf_counter() - t_start, 1),
        "machine": machine(),
    }
    write_json(a.out, report)
    print(table)
    best = min(rows, key=lambda r: r["fd"])
    by = {(r["steps"], r["cfg_scale"]): r for r in rows}
    few = by.get((min(a.steps), max(a.cfg)), rows[0])
    print(
        f"quality: best FD {best['fd']:.2f} ({best['fd_ratio']:.1f}x real floor, accuracy "
        f"{best['accuracy']:.2f}) at {best['steps']} steps CFG {best['cfg_scale']:g}; "
        f"{few['steps']} step(s) CFG {few['cfg_scale']:g}: FD {few['fd']:.2f}, accuracy "
        f"{few['accuracy']:.2f}; real held-out accuracy {base['accuracy']:.2f} -> {a.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
