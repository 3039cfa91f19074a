"""Serving benchmark: HTTP throughput and latency with and without dynamic batching, and the
sampler's latency by step count with the decoder's share of it.

    python -m benchmarks.serve [--bundle DIR] [--requests 48] [--out outputs/bench/serve.json]

Part 1 deploys the app twice on a local Ray (``/batched``: max_batch_requests 8; ``/unbatched``:
1), each with ONE sampler replica of 1 CPU and 1 torch thread, so both get the same compute and
only batching differs, then sends a fixed number of requests at concurrency 1, 4 and 8 to each.
Part 2 runs the sampler in-process (same thread count) at 1, 2, 4, 8 and 25 Euler steps.
Without --bundle, a randomly initialised bundle of the demo's size is built (debug autoencoder at
64 px, DiT depth 4 / width 192): latencies are the real cost of that architecture, the pictures
are noise. Writes JSON and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import set_env

set_env()  # before ray is imported: loopback only, no usage reports, no hub downloads

CONCURRENCY = (1, 4, 8)
STEP_COUNTS = (1, 2, 4, 8, 25)


def random_bundle(path: Path) -> Path:
    """A demo-size bundle with random weights (the DiT perturbed off its zero init)."""
    from svg_ray.checkpoint import BundleInfo, save_bundle
    from svg_ray.data.latents import LatentStats
    from svg_ray.models.autoencoder import SVGAutoencoder, ae_preset
    from svg_ray.models.dit import DiT, dit_config

    torch.manual_seed(0)
    ae = SVGAutoencoder(ae_preset("debug")).eval()
    cfg = dit_config(
        "debug", depth=4, width=192, heads=4, in_channels=ae.latent_channels, grid=ae.grid,
        num_classes=10,
    )  # fmt: skip
    dit = DiT(cfg).eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    c = ae.latent_channels
    stats = LatentStats(np.zeros(c), np.ones(c))
    names = [str(i) for i in range(10)]
    save_bundle(str(path), dit, ae, BundleInfo(stats, names, 0, {"benchmark": "random"}))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post(url: str, body: dict[str, Any]) -> tuple[int, float]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    return status, time.perf_counter() - t0


def _load(url: str, body: dict[str, Any], n: int, concurrency: int) -> dict[str, Any]:
    """n requests, ``concurrency`` in flight; throughput and latency percentiles."""
    bodies = [{**body, "seed": i} for i in range(n)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        results = list(ex.map(lambda b: _post(url, b), bodies))
    wall = time.perf_counter() - t0
    lat = np.array([t for _, t in results])
    errors = sum(1 for s, _ in results if s != 200)
    images = len(body["labels"]) * (n - errors)
    return {
        "concurrency": concurrency,
        "requests": n,
        "errors": errors,
        "wall_s": round(wall, 3),
        "req_per_s": round(n / wall, 2),
        "img_per_s": round(images / wall, 2),
        **{f"p{q}_s": round(float(np.percentile(lat, q)), 4) for q in (50, 95, 99)},
    }


def bench_http(bundle: Path, n: int, body: dict[str, Any]) -> dict[str, Any]:
    """Part 1: both variants deployed side by side, measured one after the other."""
    import ray
    from ray import serve

    from serve.app import compose
    from svg_ray.serving import AppArgs

    port = _free_port()
    from svg_ray.testing.procs import start_local_ray

    start_local_ray()
    out: dict[str, Any] = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        fixed = {"num_replicas": 1, "max_ongoing_requests": 8, "ray_actor_options": {"num_cpus": 1}}
        for name, batch in (("batched", 8), ("unbatched", 1)):
            args = AppArgs.parse(
                {
                    "model_uri": str(bundle),
                    "server": {"max_batch_requests": batch, "torch_threads": 1, "device": "cpu"},
                }
            )
            app = compose(args, {"SVGSampler": fixed})
            serve.run(app, name=name, route_prefix=f"/{name}")
        for name in ("batched", "unbatched"):
            url = f"http://127.0.0.1:{port}/{name}/v1/generate"
            _load(url, body, 8, 4)  # warm-up: lazy inits, first batches
            out[name] = [_load(url, body, n, c) for c in CONCURRENCY]
            for row in out[name]:
                print(f"  {name:9s} {json.dumps(row)}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def bench_steps(bundle: Path, images: int, repeats: int) -> list[dict[str, Any]]:
    """Part 2: in-process sampler latency by step count and the decoder's share."""
    from svg_ray.serving import AppArgs, SamplerModel
    from svg_ray.serving.schema import parse_generate

    model = SamplerModel.load(
        AppArgs.parse({"model_uri": str(bundle), "server": {"torch_threads": 1, "device": "cpu"}})
    )
    rows = []
    for steps in STEP_COUNTS:
        raw = json.dumps({"label": 1, "count": images, "steps": steps, "seed": 0}).encode()
        job = parse_generate(raw, model.limits)
        model.run([job])  # warm-up
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            r = model.run([job])[0]
            runs.append((time.perf_counter() - t0, r.sample_s, r.decode_s, r.encode_s))
        total, sample, decode, encode = (statistics.median(x) for x in zip(*runs, strict=True))
        rows.append(
            {
                "steps": steps,
                "images": images,
                "total_s": round(total, 4),
                "sampler_s": round(sample, 4),
                "decoder_s": round(decode, 4),
                "png_s": round(encode, 4),
                "decoder_share": round(decode / total, 3),
            }
        )
        print(f"  steps {json.dumps(rows[-1])}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run both parts, write the JSON, print a one-line summary."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", default="", help="sampler bundle dir (default: random, demo size)")
    p.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    p.add_argument("--images", type=int, default=2, help="images per request")
    p.add_argument("--repeats", type=int, default=5, help="runs per step count (median)")
    p.add_argument("--out", default="outputs/bench/serve.json")
    a = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="svg-bench-") as tmp:
        bundle = Path(a.bundle) if a.bundle else random_bundle(Path(tmp) / "bundle")
        # The service's defaults (10 Euler steps, CFG 4) with a.images images of one class.
        body = {"labels": [3] * a.images}
        print("HTTP (1 sampler replica, 1 CPU, 1 thread each):", flush=True)
        http = bench_http(bundle, a.requests, body)
        torch.set_num_threads(1)
        print("sampler by step count (in-process, 1 thread, CFG 4):", flush=True)
        steps = bench_steps(bundle, a.images, a.repeats)

    result = {
        "bundle": a.bundle or "random demo-size (debug AE 64px, DiT depth 4 width 192)",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "request": {**body, "settings": "server defaults: 10 euler steps, cfg 4"},
        "http": http,
        "steps": steps,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    def at(name: str, c: int) -> dict[str, Any]:
        return next(r for r in http[name] if r["concurrency"] == c)

    b8, u8 = at("batched", 8), at("unbatched", 8)
    s25 = next(r for r in steps if r["steps"] == 25)
    print(
        f"serve bench: c=8 batched {b8['img_per_s']} img/s p50 {b8['p50_s']}s p99 {b8['p99_s']}s"
        f" vs unbatched {u8['img_per_s']} img/s p50 {u8['p50_s']}s p99 {u8['p99_s']}s; "
        f"25 steps {s25['total_s']}s/{a.images} img, decoder {s25['decoder_share']:.0%} "
        f"(1 step: {steps[0]['decoder_share']:.0%}) -> {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
