"""Precompute benchmark: the Ray Data job against a plain PyTorch loop on the same images.

    python -m benchmarks.precompute [--preset debug|svg] [--images 1797] [--batch-size 64]
        [--threads 1] [--decoders 1] [--repeat 2] [--out outputs/bench/precompute.json]

Both sides do the same work on the same files in the same run: read bytes, decode + ADM crop
(``prepare_image``), encode with the same autoencoder, same batch size and torch threads, cast
to fp16 and write Parquet shards of ``--rows-per-shard`` rows with the same writer options.
  - torch: ``DataLoader(num_workers=--decoders)`` decodes; the main process encodes and writes.
  - ray:   ``run_precompute`` with ``--decoders`` decode actors, one encode actor, one writer.
Images are the scikit-learn digits written as PNGs at ``--source-size`` (default 4x the crop),
so the crop really resizes. The autoencoder has random weights (nothing is downloaded): speed
is the architecture's real cost.

Reported: images/s end to end (model load / actor start included) and steady state (first to
last shard written), their ratio, bytes per row, and the busy time of decode, encode and write.
Each side runs ``--repeat`` times in ABBA order (the load of a shared machine drifts) and the
best run of each is compared. CPU seconds per image (this process plus its children: DataLoader
workers, or the raylet, GCS and Ray workers) measure the work whatever CPU share the machine
grants; one extra small run per side (one shard of images) splits it into a fixed cost (process
start, model load) and a marginal cost per image, the figure that matters for a million images.
Writes JSON and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import set_env

set_env()  # before ray is imported: loopback only, no usage reports, no hub downloads

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from svg_ray.data import schema  # noqa: E402
from svg_ray.data.images import prepare_image, to_model_input  # noqa: E402
from svg_ray.data.latents import latents_to_numpy  # noqa: E402
from svg_ray.data.precompute import (  # noqa: E402
    PrecomputeConfig,
    plan_inputs,
    record_name,
    run_precompute,
)


class _Images(Dataset):
    """The plain-PyTorch side: one file -> (uint8 crop or None, label, decode seconds)."""

    def __init__(self, files: list[str], labels: list[int], resolution: int) -> None:
        self.files, self.labels, self.resolution = files, labels, resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[np.ndarray | None, int, float]:
        t0 = time.perf_counter()
        with open(self.files[i], "rb") as f:
            res = prepare_image(f.read(), self.resolution)
        return (
            (res if isinstance(res, np.ndarray) else None),
            self.labels[i],
            (time.perf_counter() - t0),
        )


def _collate(items: list[tuple[np.ndarray | None, int, float]]) -> tuple[np.ndarray, list, float]:
    ok = [(x, y) for x, y, _ in items if x is not None]
    return np.stack([x for x, _ in ok]), [y for _, y in ok], sum(t for *_, t in items)


def _write(rows: dict[str, list], path: Path) -> int:
    """Same table layout and writer options as WriteChunk."""
    cols: dict[str, Any] = {
        schema.COL_ID: pa.array(rows["id"], pa.string()),
        schema.COL_LABEL: pa.array(rows["label"], pa.int64()),
    }
    for c in (schema.COL_LATENT, schema.COL_LATENT_FLIP):
        if rows.get(c):
            cols[c] = pa.FixedShapeTensorArray.from_numpy_ndarray(np.concatenate(rows[c]))
    table = pa.table(cols)
    comp = {c: ("zstd" if c == schema.COL_ID else "none") for c in table.column_names}
    pq.write_table(table, path, compression=comp, use_dictionary=False)
    return path.stat().st_size


def torch_loop(
    ae_path: str, files: list[str], labels: list[int], args: argparse.Namespace, out: Path
) -> dict[str, Any]:
    """DataLoader + the same encoder: the baseline."""
    from svg_ray.checkpoint import load_autoencoder

    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    ae = load_autoencoder(ae_path)
    res = ae.cfg.resolution
    loader = DataLoader(
        _Images(files, labels, res),
        batch_size=args.batch_size,
        num_workers=args.decoders,
        collate_fn=_collate,
    )
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {
        "id": [],
        "label": [],
        schema.COL_LATENT: [],
        schema.COL_LATENT_FLIP: [],
    }
    n_rows = n_bytes = shard = 0
    decode_s = encode_s = write_s = wait_s = 0.0
    shard_times: list[float] = []
    it = iter(loader)
    while True:
        tw = time.perf_counter()
        try:
            images, ys, dt = next(it)
        except StopIteration:
            break
        wait_s += time.perf_counter() - tw
        decode_s += dt
        te = time.perf_counter()
        with torch.inference_mode():
            x = to_model_input(images)
            rows[schema.COL_LATENT].append(latents_to_numpy(ae.encode(x), "float16"))
            if args.flip:
                rows[schema.COL_LATENT_FLIP].append(
                    latents_to_numpy(ae.encode(x.flip(-1)), "float16")
                )
        encode_s += time.perf_counter() - te
        rows["id"] += [f"{n_rows + k}" for k in range(len(ys))]
        rows["label"] += ys
        n_rows += len(ys)
        if len(rows["id"]) >= args.rows_per_shard:
            tw = time.perf_counter()
            n_bytes += _write(rows, out / f"part-{shard:06d}.parquet")
            write_s += time.perf_counter() - tw
            shard_times.append(time.perf_counter())
            shard += 1
            rows = {k: [] for k in rows}
    if rows["id"]:
        tw = time.perf_counter()
        n_bytes += _write(rows, out / f"part-{shard:06d}.parquet")
        write_s += time.perf_counter() - tw
        shard_times.append(time.perf_counter())
    seconds = time.perf_counter() - t0
    return {
        "images": len(files),
        "rows": n_rows,
        "seconds": seconds,
        "images_per_s": len(files) / seconds,
        "steady_images_per_s": _steady(shard_times, len(files), args.rows_per_shard),
        "decode_s": decode_s,
        "decode_wait_s": wait_s,
        "encode_s": encode_s,
        "write_s": write_s,
        "bytes_per_row": n_bytes / max(1, n_rows),
    }


def _cpu_seconds(children: bool = True) -> float:
    """User + system CPU of this process (and of the children it has reaped)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = me.ru_utime + me.ru_stime
    return own + (kids.ru_utime + kids.ru_stime if children else 0.0)


def _descendant_cpu_seconds() -> float:
    """CPU of all live descendants (+ what they reaped), read from /proc: the Ray processes
    must be counted before shutdown, as workers are not always reaped by their parent."""
    stats: dict[int, tuple[int, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # after "(comm)": [1] ppid, [11:15] utime stime cutime cstime (clock ticks)
            stats[int(d)] = (int(fields[1]), sum(int(x) for x in fields[11:15]) / tick)
    me, total = os.getpid(), 0.0
    for pid, (_, cpu) in stats.items():
        p = pid
        while p in stats and p not in (0, 1, me):
            p = stats[p][0]
        if p == me and pid != me:
            total += cpu
    return total


def _steady(times: list[float], images: int, per_shard: int) -> float | None:
    """Images/s between the first and the last shard (startup excluded)."""
    if len(times) < 2:
        return None
    return (images - per_shard) / (times[-1] - times[0])


def ray_job(ae_path: str, root: Path, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The Ray Data job on an in-process cluster (cluster start timed separately)."""
    import ray

    t0 = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=max(4, os.cpu_count() or 1),
        include_dashboard=False,
        log_to_driver=False,
    )
    init_s = time.perf_counter() - t0
    cfg = PrecomputeConfig(
        input=str(root),
        out=str(out),
        autoencoder=ae_path,
        flip=args.flip,
        rows_per_shard=args.rows_per_shard,
        batch_size=args.batch_size,
        decoders=args.decoders,
        torch_threads=args.threads,
        encode_cpus=float(args.threads),
    )
    try:
        result = run_precompute(cfg)
        children_cpu = _descendant_cpu_seconds()
    finally:
        ray.shutdown()
    times = sorted(
        (out / record_name(c)).stat().st_mtime for c in range(result.chunks_total)
    )  # commit times of the chunks, in order
    return {
        "images": result.inputs,
        "rows": result.manifest.num_rows,
        "ray_init_s": init_s,
        "seconds": result.seconds,
        "images_per_s": result.images_per_s,
        "steady_images_per_s": _steady(times, result.inputs, args.rows_per_shard),
        "decode_s": result.stage_seconds["decode"],
        "encode_s": result.stage_seconds["encode"],
        "write_s": result.stage_seconds["write"],
        "bytes_per_row": result.manifest.bytes_per_row,
        "summary": result.summary_line(),
        "children_cpu_s": children_cpu,
    }


def main(argv: list[str] | None = None) -> int:
    """Run both sides and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--preset",
        choices=["debug", "svg"],
        default="debug",
        help="autoencoder size: debug (64 px, tiny DINO) or svg (256 px, ViT-S/16+)",
    )
    p.add_argument("--images", type=int, default=1797, help="digits to use (at most 1797)")
    p.add_argument("--source-size", type=int, default=0, help="stored image size (0 = 4x crop)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the encoder")
    p.add_argument("--decoders", type=int, default=1, help="DataLoader workers = decode actors")
    p.add_argument("--rows-per-shard", type=int, default=256)
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--repeat", type=int, default=2, help="runs per side (ABBA order, best kept)")
    p.add_argument("--out", default="outputs/bench/precompute.json")
    args = p.parse_args(argv)

    from svg_ray.checkpoint import save_autoencoder
    from svg_ray.data.digits import write_image_folder
    from svg_ray.models.autoencoder import SVGAutoencoder, ae_preset
    from svg_ray.models.dino import DinoConfig

    torch.manual_seed(0)
    ae_cfg = ae_preset(args.preset)
    if args.preset == "svg":  # random weights: the benchmark measures speed, not quality
        ae_cfg.dino = DinoConfig(arch=ae_cfg.dino.arch, allow_random=True)
    ae = SVGAutoencoder(ae_cfg).eval()
    with tempfile.TemporaryDirectory(prefix="bench-precompute-") as tmp:
        work = Path(tmp)
        ae_path = str(work / "ae.safetensors")
        save_autoencoder(ae, ae_path)
        src = args.source_size or 4 * ae_cfg.resolution
        write_image_folder(work / "images", resolution=src, limit=args.images)
        plan = plan_inputs(PrecomputeConfig(input=str(work / "images"), out="-", autoencoder="-"))
        small = work / "images-small"  # one shard's worth: fixed costs + few images
        write_image_folder(small, resolution=src, limit=args.rows_per_shard)
        small_plan = plan_inputs(PrecomputeConfig(input=str(small), out="-", autoencoder="-"))
        runs: dict[str, list[dict[str, Any]]] = {"torch": [], "ray": []}
        # ABBA order: on a shared machine the load drifts; alternating cancels a linear drift,
        # and the best run of each side is compared. Then one small run per side, so the
        # fixed cost (model load, process start) separates from the per-image cost.
        order = [s for i in range(args.repeat) for s in (("torch", "ray"), ("ray", "torch"))[i % 2]]
        order += ["torch-small", "ray-small"]
        for k, side in enumerate(order):
            dest = work / f"{side}-{k}"
            srcs = small if side.endswith("small") else work / "images"
            pl = small_plan if side.endswith("small") else plan
            load0, cpu0, own0 = os.getloadavg()[0], _cpu_seconds(), _cpu_seconds(children=False)
            # CPU seconds of this process and its children (DataLoader workers; the raylet,
            # GCS and Ray workers): the work per image, whatever CPU share the OS gave us.
            if side.startswith("torch"):
                r = torch_loop(ae_path, pl.sources, pl.labels, args, dest)
                r["cpu_s"] = _cpu_seconds() - cpu0
            else:
                r = ray_job(ae_path, srcs, args, dest)
                r["cpu_s"] = _cpu_seconds(children=False) - own0 + r.pop("children_cpu_s")
            r["cpu_ms_per_image"] = 1000 * r["cpu_s"] / r["images"]
            r["load_avg_1m"] = [load0, os.getloadavg()[0]]
            runs.setdefault(side, []).append(r)
            print(
                f"  run {k + 1}/{len(order)} {side}: {r['images_per_s']:.1f} img/s, "
                f"{r['cpu_ms_per_image']:.1f} CPU ms/image, load {load0:.1f}",
                flush=True,
            )
    marginal = {  # CPU ms per additional image, fixed costs removed
        side: 1000
        * (min(r["cpu_s"] for r in runs[side]) - runs[f"{side}-small"][0]["cpu_s"])
        / (len(plan.ids) - len(small_plan.ids))
        for side in ("torch", "ray")
    }
    fixed = {  # CPU s of a run with no images, extrapolated
        side: runs[f"{side}-small"][0]["cpu_s"] - marginal[side] / 1000 * len(small_plan.ids)
        for side in ("torch", "ray")
    }
    base = max(runs["torch"], key=lambda r: r["images_per_s"])
    rayr = max(runs["ray"], key=lambda r: r["images_per_s"])
    cpu_ratio = min(r["cpu_ms_per_image"] for r in runs["ray"]) / min(
        r["cpu_ms_per_image"] for r in runs["torch"]
    )
    raw = int(np.prod(ae.latent_shape)) * 2 * (2 if args.flip else 1)
    ratio = rayr["images_per_s"] / base["images_per_s"]
    steady = (
        rayr["steady_images_per_s"] / base["steady_images_per_s"]
        if rayr["steady_images_per_s"] and base["steady_images_per_s"]
        else None
    )
    report = {
        "config": {
            **vars(args),
            "resolution": ae_cfg.resolution,
            "source_size": src,
            "latent_shape": list(ae.latent_shape),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
        },
        "torch": base,
        "ray": rayr,
        "all_runs": runs,
        "ratio_ray_over_torch": ratio,
        "ratio_steady": steady,
        "ray_overhead_pct": (1 - ratio) * 100,
        "cpu_ratio_ray_over_torch": cpu_ratio,
        "marginal_cpu_ms_per_image": marginal,
        "fixed_cpu_s": fixed,
        "marginal_cpu_ratio_ray_over_torch": marginal["ray"] / marginal["torch"],
        "ray_cpu_overhead_pct": (cpu_ratio - 1) * 100,
        "raw_bytes_per_row": raw,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    steady_txt = f"{steady:.2f}" if steady else "n/a"
    print(
        f"bench precompute [{args.preset} {ae_cfg.resolution}px from {src}px, "
        f"{args.images} images, bs {args.batch_size}, {args.threads} thread(s), "
        f"{args.decoders} decoder(s), flip={args.flip}]: torch {base['images_per_s']:.1f} "
        f"img/s, ray {rayr['images_per_s']:.1f} img/s (ratio {ratio:.2f}, steady-state "
        f"{steady_txt}; CPU/image x{cpu_ratio:.2f}, marginal CPU/image "
        f"x{marginal['ray'] / marginal['torch']:.2f}, fixed CPU s torch {fixed['torch']:.1f} "
        f"ray {fixed['ray']:.1f}); {rayr['bytes_per_row']:.0f} B/row "
        f"vs raw {raw}; ray busy s decode/encode/write {rayr['decode_s']:.1f}/"
        f"{rayr['encode_s']:.1f}/{rayr['write_s']:.1f}, torch {base['decode_s']:.1f}/"
        f"{base['encode_s']:.1f}/{base['write_s']:.1f} -> {args.out}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
