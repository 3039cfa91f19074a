"""Sampler benchmark: our batched generate against the reference code's one-image, two-forward
style, Euler against Heun, and where the served sampler's time goes at few steps.

    python -m benchmarks.sampler [--images 16] [--steps 25] [--cfg-scale 4] [--repeats 5]
        [--threads 1] [--few-steps 1 2 4 8] [--compile] [--smoke] [--out outputs/bench/sampler.json]

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

Last, ``few_step``: the serving code (``svg_ray.serving.SamplerModel.sample_images``, fp32 on CPU
as served there) on the same ``--images`` at each of ``--few-steps``, with its own split of the
time into the ODE solver (DiT) and the decoder. With ``--compile`` the same again with
``server.compile: 'on'`` (copies of the models; the load-time warm-up, i.e. compiling, is timed
apart) and the largest pixel difference against eager. Writes JSON and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import copy
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

from svg_ray.checkpoint import BundleInfo  # noqa: E402
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
from svg_ray.serving import GenerationJob, SamplerModel, ServerConfig  # noqa: E402
from svg_ray.serving.source import ModelSource  # noqa: E402

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


def serving_model(
    dit: DiT, ae: SVGAutoencoder, stats: LatentStats, images: int, compile: str
) -> SamplerModel:
    """The models as a CPU replica serves them (one chunk of ``images``); compiling happens in
    the constructor's warm-up (``SamplerModel.warmup_s``)."""
    info = BundleInfo(stats, [str(i) for i in range(NUM_CLASSES)])
    server = ServerConfig(device="cpu", max_batch_images=images, compile=compile)
    return SamplerModel(dit, ae, info, ModelSource("random weights", "memory"), server)


def few_step(
    models: dict[str, SamplerModel],
    labels: torch.Tensor,
    seeds: list[int],
    steps: list[int],
    cfg_scale: float,
    repeats: int,
) -> dict[str, Any]:
    """Per model and step count: median ms in the ODE solver (DiT) and the decoder, the decoder's
    share, ms per image; one untimed round first, then ``repeats`` rounds in rotating order."""
    cases = [(name, n) for name in models for n in steps]
    runs: dict[tuple[str, int], list[tuple[float, float]]] = {c: [] for c in cases}
    pixels: dict[tuple[str, int], np.ndarray] = {}
    for r in range(repeats + 1):
        for name, n in cases[r % len(cases) :] + cases[: r % len(cases)]:
            model = models[name]
            cfg = model.server.sampler_config(steps=n, cfg_scale=cfg_scale)
            job = GenerationJob(tuple(labels.tolist()), tuple(seeds), cfg, "json")
            images, stats = model.sample_images([job])
            pixels[(name, n)] = np.stack(images[0]).astype(np.int16)
            if r:  # round 0 is the warm-up
                runs[(name, n)].append((stats[0]["sample_s"], stats[0]["decode_s"]))
    out: dict[str, Any] = {}
    for name, n in cases:
        dit_s = statistics.median(x[0] for x in runs[(name, n)])
        dec_s = statistics.median(x[1] for x in runs[(name, n)])
        out.setdefault(name, {})[str(n)] = {
            "dit_ms": round(1000 * dit_s, 3),
            "decode_ms": round(1000 * dec_s, 3),
            "decoder_share": round(dec_s / (dit_s + dec_s), 4),
            "ms_per_image": round(1000 * (dit_s + dec_s) / len(seeds), 3),
            "runs_s": runs[(name, n)],
        }
    if "compiled" in models:
        out["max_abs_pixel_diff_compiled_vs_eager"] = max(
            int(np.abs(pixels[("compiled", n)] - pixels[("eager", n)]).max()) for n in steps
        )
    return out


def main(argv: list[str] | None = None) -> int:
    """Run both parts, write the JSON, print a one-line summary."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=16, help="images per variant and round")
    p.add_argument("--steps", type=int, default=25, help="sampler steps (the headline setting)")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="CFG weight (reference pictures)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (medians)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--few-steps", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="step counts for the serving code's DiT/decoder split")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="also time the serving code with "
                   "server.compile 'on' (CPU: minutes of compiling, unless cached)")  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="tiny settings for tests: 2 images, 2 "
                   "steps, 1 round, few steps 1 2")  # fmt: skip
    p.add_argument("--out", default="outputs/bench/sampler.json")
    a = p.parse_args(argv)
    if a.smoke:
        a.images, a.steps, a.repeats, a.few_steps = 2, 2, 1, [1, 2]
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

    print(f"serving code, {a.few_steps} steps (DiT / decoder):", flush=True)
    models = {"eager": serving_model(dit, ae, stats, a.images, "off")}
    warmup_s = None
    if a.compile:  # copies: compiling works in place, and the eager rows need the eager models
        models["compiled"] = serving_model(
            copy.deepcopy(dit), copy.deepcopy(ae), stats, a.images, "on"
        )
        warmup_s = models["compiled"].warmup_s
        print(f"  compiled in the load-time warm-up: {warmup_s:.1f} s", flush=True)
    fs = few_step(models, labels, seeds, a.few_steps, a.cfg_scale, a.repeats)
    fs["compile_warmup_s"] = warmup_s
    for name in models:
        for n, r in fs[name].items():
            print(
                f"  {name:8s} {n:>2s} steps: DiT {r['dit_ms']:.1f} ms, decoder "
                f"{r['decode_ms']:.1f} ms ({r['decoder_share']:.0%})"
            )

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
        "few_step": fs,
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
        f"{parity:.2f} (time x{kmed['heun'] / kmed['euler']:.2f}); decoder share at "
        + "/".join(map(str, a.few_steps))
        + " steps "
        + "/".join(f"{r['decoder_share']:.0%}" for r in fs["eager"].values())
        + f" -> {out}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
