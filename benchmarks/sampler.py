"""Sampler benchmark: our batched generate against the reference code's one-image, two-forward
style, and Euler against Heun.

    python -m benchmarks.sampler [--images 16] [--steps 25] [--cfg-scale 4] [--repeats 5]
        [--threads 1] [--smoke] [--out outputs/bench/sampler.json]

Demo size with random weights (DiT ``DIT_SIZES['demo']``, 10 classes, on the latents of
``ae_preset('debug')``: 200 channels x 4x4 tokens, decoded to 64 px), as ``svg-ray demo`` runs it;
the DiT is nudged off its zero init (benchmarks/serve.py does the same). Three ways to make the
same ``--images`` images (labels i % 10, seeds i), each ending in decoded pixels:

- ``batched``: ``svg_ray.generate.generate`` on all images at once; CFG's conditional and null
  passes share one 2N-batch forward per step (``flow.samplers.guided_velocity``).
- ``per_image``: the same call once per image (CFG still one 2-batch forward): isolates what
  batching images buys from what fusing CFG buys.
- ``reference``: the baseline, as reference codebases sample: one image at a time, a conditional
  and a null forward per step, the same time grid and Euler update, one decode per image.

The three must give the same pixels (max abs difference recorded). Repeats run the variants in a
rotating order and keep medians (the 2-core machine is shared and its load drifts). Then Euler
against Heun on the batched latents (no decode): Heun makes two model calls per step, so its
model calls per second should match Euler's (ratio ~1; anything well below 1 is sampler overhead).
Writes JSON and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from benchmarks.common import machine, set_env, write_json

set_env()  # before timm is imported: no hub downloads

from svg_ray.data.latents import LatentStats  # noqa: E402
from svg_ray.flow.samplers import SamplerConfig, time_grid  # noqa: E402
from svg_ray.generate import (  # noqa: E402
    decode_tokens,
    generate,
    generate_latents,
    initial_noise,
)
from svg_ray.models.autoencoder import SVGAutoencoder, ae_preset  # noqa: E402
from svg_ray.models.dit import DIT_SIZES, DiT, count_params, dit_config  # noqa: E402

NUM_CLASSES = 10  # the demo's digits


def build(seed: int = 0) -> tuple[DiT, SVGAutoencoder, LatentStats]:
    """Demo-size DiT (perturbed off zero init), debug autoencoder, identity latent stats."""
    torch.manual_seed(seed)
    ae = SVGAutoencoder(ae_preset("debug")).eval()
    cfg = dit_config("demo", in_channels=ae.latent_channels, grid=ae.grid, num_classes=NUM_CLASSES)
    dit = DiT(cfg).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    c = ae.latent_channels
    return dit, ae, LatentStats(np.zeros(c), np.ones(c))


@torch.no_grad()
def reference_generate(
    dit: DiT,
    ae: SVGAutoencoder,
    stats: LatentStats,
    labels: torch.Tensor,
    seeds: list[int],
    cfg: SamplerConfig,
) -> torch.Tensor:
    """The baseline: one image at a time, separate conditional and null forwards per step."""
    null = torch.tensor([dit.cfg.num_classes])
    ts = time_grid(cfg.steps, cfg.time_shift).tolist()
    out = []
    for label, seed in zip(labels.tolist(), seeds, strict=True):
        x = initial_noise([seed], dit.cfg.grid**2, dit.cfg.in_channels)  # (1, T, C)
        y = torch.tensor([label])
        for t0, t1 in itertools.pairwise(ts):
            tt = torch.full((1,), t0, dtype=x.dtype)
            v_c, v_u = dit(x, tt, y), dit(x, tt, null)
            x = x + (t1 - t0) * (v_u + cfg.cfg_scale * (v_c - v_u))
        out.append(decode_tokens(ae, stats, x, dit.cfg.grid))
    return torch.cat(out)  # (B, 3, H, W)


def rotating_medians(
    fns: dict[str, Callable[[], Any]], repeats: int
) -> tuple[dict[str, float], dict[str, list[float]], dict[str, Any]]:
    """Median seconds per variant over ``repeats`` rounds in rotating order (after one untimed
    warm-up round), every run's seconds, and each variant's last result."""
    names = list(fns)
    last = {n: fns[n]() for n in names}  # warm-up
    runs: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            last[n] = fns[n]()
            runs[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in runs.items()}, runs, last


def main(argv: list[str] | None = None) -> int:
    """Run both parts, write the JSON, print a one-line summary."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=16, help="images per variant and round")
    p.add_argument("--steps", type=int, default=25, help="sampler steps (the headline setting)")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="CFG weight (reference pictures)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (medians)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--smoke", action="store_true", help="tiny settings for tests: 2 images, 2 "
                   "steps, 1 round")  # fmt: skip
    p.add_argument("--out", default="outputs/bench/sampler.json")
    a = p.parse_args(argv)
    if a.smoke:
        a.images, a.steps, a.repeats = 2, 2, 1
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    machine_start = machine()

    dit, ae, stats = build()
    labels = torch.arange(a.images) % NUM_CLASSES
    seeds = list(range(a.images))
    euler = SamplerConfig(steps=a.steps, kind="euler", cfg_scale=a.cfg_scale)
    heun = SamplerConfig(steps=a.steps, kind="heun", cfg_scale=a.cfg_scale)

    def per_image() -> torch.Tensor:
        return torch.cat(
            [generate(dit, ae, stats, labels[i : i + 1], [s], euler) for i, s in enumerate(seeds)]
        )

    variants: dict[str, Callable[[], Any]] = {
        "batched": lambda: generate(dit, ae, stats, labels, seeds, euler),
        "per_image": per_image,
        "reference": lambda: reference_generate(dit, ae, stats, labels, seeds, euler),
    }
    print(f"sampler: {a.images} images, {a.steps} euler steps, cfg {a.cfg_scale}", flush=True)
    med, runs, images = rotating_medians(variants, a.repeats)
    # model calls per round: one per step for all images; per image; two per step per image
    forwards = {"batched": a.steps, "per_image": a.steps * a.images}
    forwards["reference"] = 2 * a.steps * a.images
    gen = {
        n: {
            "images_per_s": a.images / s,
            "ms_per_image": 1000 * s / a.images,
            "forwards_per_round": forwards[n],
            "runs_s": runs[n],
        }
        for n, s in med.items()
    }
    diff = {
        n: float((images[n] - images["batched"]).abs().max()) for n in ("per_image", "reference")
    }
    for n, r in gen.items():
        print(f"  {n:9s} {r['images_per_s']:.2f} img/s ({r['ms_per_image']:.1f} ms/img)")

    print("euler vs heun (batched latents, no decode):", flush=True)
    kinds = {
        "euler": lambda: generate_latents(dit, labels, seeds, euler),
        "heun": lambda: generate_latents(dit, labels, seeds, heun),
    }
    kmed, kruns, _ = rotating_medians(kinds, a.repeats)
    solver = {
        k: {
            "steps_per_s": a.steps / s,
            "model_calls_per_s": c.nfe / s,  # CFG's two passes share one call
            "images_per_s": a.images / s,
            "runs_s": kruns[k],
        }
        for (k, s), c in zip(kmed.items(), (euler, heun), strict=True)
    }
    parity = solver["heun"]["model_calls_per_s"] / solver["euler"]["model_calls_per_s"]
    for k, r in solver.items():
        print(f"  {k}: {r['steps_per_s']:.1f} steps/s, {r['model_calls_per_s']:.1f} calls/s")

    report = {
        "config": vars(a),
        "machine": {
            **machine_start,
            "load_avg_1m_5m_15m_end": [round(x, 2) for x in os.getloadavg()],
        },
        "model": {
            "dit": {**DIT_SIZES["demo"], "params_m": count_params(dit) / 1e6},
            "num_classes": NUM_CLASSES,
            "latent": list(ae.latent_shape),
            "autoencoder": "ae_preset('debug'), decode only",
            "image_px": ae.cfg.resolution,
            "weights": "random",
        },
        "generate": gen,
        "ratio_batched_over_reference": gen["batched"]["images_per_s"]
        / gen["reference"]["images_per_s"],
        "ratio_batched_over_per_image": gen["batched"]["images_per_s"]
        / gen["per_image"]["images_per_s"],
        "ratio_per_image_over_reference": gen["per_image"]["images_per_s"]
        / gen["reference"]["images_per_s"],
        "max_abs_pixel_diff_vs_batched": diff,
        "euler_vs_heun": {
            **solver,
            "heun_over_euler_model_calls_per_s": parity,
            "heun_over_euler_time": kmed["heun"] / kmed["euler"],
        },
        "total_s": time.perf_counter() - t_start,
    }
    out = write_json(a.out, report)
    ips = {n: r["images_per_s"] for n, r in gen.items()}
    print(
        f"bench sampler [demo DiT, {a.images} img, {a.steps} steps, cfg {a.cfg_scale}, "
        f"{a.threads} thread(s), load {machine_start['load_avg_1m_5m_15m'][0]:.1f}]: batched "
        f"{ips['batched']:.1f} img/s vs reference {ips['reference']:.1f} img/s "
        f"(x{report['ratio_batched_over_reference']:.2f}; per-image fused CFG "
        f"{ips['per_image']:.1f} img/s, x{report['ratio_per_image_over_reference']:.2f}); "
        f"same pixels (max diff {max(diff.values()):.1e}); heun/euler model calls/s "
        f"{parity:.2f} (time x{kmed['heun'] / kmed['euler']:.2f}) -> {out}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
