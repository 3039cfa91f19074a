"""Training data order benchmark: how mixed the DiT job's batches are, what a resume re-reads,
the bytes read per trained sample, and the latent reader's throughput from local Parquet and S3.

    python -m benchmarks.data_order [--classes 1000] [--per-class 1281] [--ranks 8] [--batch 32]
        [--full-rows 2048] [--no-s3] [--no-baseline] [--out outputs/bench/data_order.json]

1. Order (small 4x2x2 fp16 latents with flips, written with the row-group size full-size
   latents with flips get, 83 rows): an ImageNet-shaped input listing (1,000 class folders x
   1,281 images, sorted as a folder tree lists them) written by the precompute job's own
   chunking, writer and manifest code twice: as an older precompute did (consecutive chunks of
   the sorted list, no label summary) and as it does now (seeded mixed chunks). Every rank's
   ``LatentReader`` (streaming, as ImageNet-size data is) runs the first ``--order-steps`` steps
   of an epoch; distinct classes per global batch (all ranks' batches of one step) over the
   expectation for iid draws of the same size. Also the in-memory mode on the old dataset.
2. Resume: fresh readers started at steps spread over the epoch, their storage reads counted by
   wrapping the real read function; rows re-read that the same rank had consumed before the
   resume step (the previous reader replayed every one of them: ``step * batch``).
3. Throughput (full-size 392x16x16 fp16 latents with flips, written by the precompute writer):
   one reader process (rank 0 of 1) from local Parquet and from a SeaweedFS S3 server started
   here on loopback; a warm-up epoch, then timed epochs; latents/s, MB/s of latents delivered,
   bytes read per trained sample over one stored latent, CPU seconds per latent (this process
   and the S3 server) and the rate that CPU cost projects to on all of this machine's cores.
   Baseline in the same run: the previous reader path (Ray Data ``read_parquet`` of label,
   latent and latent_flip, ``iter_batches``), local. A profile splits the per-latent CPU cost:
   Parquet decode of one latent column, of both, a raw read of the same bytes, the batch copy,
   and an fp16->fp32 conversion on the CPU (the reader leaves that to the GPU).

Writes JSON and prints a one-line summary.
"""

from __future__ import annotations

from benchmarks.common import machine, process_cpu_seconds, set_env, write_json

set_env()  # before anything imports ray

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow.fs as pafs  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from svg_ray import storage  # noqa: E402
from svg_ray.data import schema  # noqa: E402
from svg_ray.data.manifest import DatasetManifest, expected_classes, load_manifest  # noqa: E402
from svg_ray.data.order import EpochOrder  # noqa: E402
from svg_ray.testing.latents import CountingRead, write_precomputed  # noqa: E402
from svg_ray.testing.procs import start_local_ray  # noqa: E402
from svg_ray.testing.s3server import seaweedfs  # noqa: E402
from svg_ray.training.latent_reader import (  # noqa: E402
    LatentReader,
    ShardIndex,
    index_shards,
    read_row_group,
)

SMALL_SHAPE = (4, 2, 2)
REAL_SHAPE = (392, 16, 16)  # SVG latent at 256 px: 384 DINO + 8 residual channels, 16x16 grid
REAL_ROW_GROUP = 83  # rows per row group of full-size latents with flips (32 MB row groups)
H100_LATENTS_PER_S = 620.0  # one H100's SVG-XL consumption at ~45% MFU
TARGET_LATENTS_PER_S = 2 * H100_LATENTS_PER_S


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --------------------------------------------------------------------------------------------
# 1-2. Order and resume
# --------------------------------------------------------------------------------------------


def dataset_labels(index: ShardIndex) -> np.ndarray:
    """Every row's label, in dataset row order (shards in manifest order)."""
    fs = pafs.LocalFileSystem()
    return np.concatenate(
        [
            pq.read_table(f.uri, columns=[schema.COL_LABEL], filesystem=fs).column(0).to_numpy()
            for f in index.files
        ]
    )


def global_diversity(
    index: ShardIndex,
    manifest: DatasetManifest,
    labels: np.ndarray,
    ranks: int,
    batch: int,
    steps: int,
) -> dict[str, Any]:
    """Distinct classes per global batch over the first ``steps`` steps of epoch 0, streamed."""
    readers = [
        LatentReader(index, manifest, rank=r, world=ranks, batch_size=batch, seed=0)
        for r in range(ranks)
    ]
    counts = []
    for step in zip(*[r.epoch(0) for r in readers], strict=True):
        counts.append(len({int(y) for b in step for y in b.labels}))
        if len(counts) == steps:
            break
    for r in readers:
        r.close()
    iid = expected_classes(np.bincount(labels), ranks * batch)
    return {
        "classes_per_global_batch": float(np.mean(counts)),
        "iid_expected": iid,
        "vs_iid": float(np.mean(counts)) / iid,
        "steps": len(counts),
    }


def in_memory_diversity(labels: np.ndarray, ranks: int, batch: int, steps: int) -> dict[str, Any]:
    """The same figure for the in-memory mode (a dataset within ``cache_mb``): its order is
    ``EpochOrder`` over single rows, computed here without loading every rank's copy."""
    order = EpochOrder([1] * len(labels), ranks, batch, seed=0)
    rows = [order.rank_units(0, r) for r in range(ranks)]
    counts = [
        len(set(np.concatenate([labels[r[k * batch : (k + 1) * batch]] for r in rows]).tolist()))
        for k in range(min(steps, order.steps_per_epoch))
    ]
    iid = expected_classes(np.bincount(labels), ranks * batch)
    return {
        "classes_per_global_batch": float(np.mean(counts)),
        "vs_iid": float(np.mean(counts)) / iid,
    }


def resume_reread(
    index: ShardIndex, manifest: DatasetManifest, ranks: int, batch: int, points: int
) -> dict[str, Any]:
    """Rows a resumed rank-0 reader reads again that it had consumed before the resume step."""
    ref = LatentReader(index, manifest, rank=0, world=ranks, batch_size=batch, seed=0)
    steps = [int(k) for k in np.linspace(1, ref.steps_per_epoch - 1, points)]
    consumed_rows: list[np.ndarray] = []
    for k, b in enumerate(ref.epoch(0)):
        if k >= steps[-1]:
            break
        consumed_rows.append(b.rows)
    ref.close()
    first = {index.units[u]: int(index.unit_first_row[u]) for u in range(len(index.units))}
    by_uri = {f.uri: k for k, f in enumerate(index.files)}
    reread = []
    for k in steps:
        read = CountingRead()
        reader = LatentReader(
            index, manifest, rank=0, world=ranks, batch_size=batch, seed=0, read=read
        )
        next(iter(reader.epoch(0, start_step=k)))
        reader.close()  # waits for prefetched reads: they count too
        consumed = set(np.concatenate(consumed_rows[:k]).tolist())
        rows: set[int] = set()
        for uri, g in read.units:
            f = by_uri[uri]
            start = first[(f, g)]
            rows |= set(range(start, start + index.files[f].row_groups[g]))
        reread.append(len(rows & consumed))
    return {
        "resume_steps": steps,
        "rows_reread": reread,
        "max_rows_reread": max(reread),
        "mean_rows_reread": float(np.mean(reread)),
        "previous_reader_rows_replayed_mean": float(np.mean(steps)) * batch,
        "rows_per_file": max(f.rows for f in index.files),
        "window_rows": ref.window_rows,
    }


def order_part(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Part 1 and 2 on the two ImageNet-shaped small-latent datasets."""
    write = write_precomputed
    labels = [c for c in range(a.classes) for _ in range(a.per_class)]
    out: dict[str, Any] = {"inputs": len(labels), "classes": a.classes, "shape": SMALL_SHAPE}
    datasets = {}
    for name, seed in (("sorted", -1), ("mixed", 0)):
        t0 = time.perf_counter()
        root = str(work / f"order-{name}")
        m = write(root, labels, SMALL_SHAPE, True, a.rows_per_shard, seed, REAL_ROW_GROUP)
        index = index_shards(load_manifest(root), root)
        datasets[name] = (m, index)
        summary = m.shard_labels.to_dict() if m.shard_labels else None
        print(f"  {name}: {len(m.shards)} shards written in {time.perf_counter() - t0:.0f} s")
        out[name] = {
            "shards": len(m.shards),
            "shard_labels": summary,
            "streamed": global_diversity(
                index, m, dataset_labels(index), a.ranks, a.batch, a.order_steps
            ),
        }
    labels_sorted = dataset_labels(datasets["sorted"][1])
    bounds = np.cumsum([f.rows for f in datasets["sorted"][1].files])[:-1]
    per_shard = [len(set(x.tolist())) for x in np.split(labels_sorted, bounds)]
    out["sorted"]["classes_per_shard"] = {
        "min": int(np.min(per_shard)),
        "median": float(np.median(per_shard)),
        "max": int(np.max(per_shard)),
    }
    out["sorted"]["in_memory"] = in_memory_diversity(labels_sorted, a.ranks, a.batch, a.order_steps)
    print("  resume: fresh readers at steps across the epoch", flush=True)
    m, index = datasets["mixed"]
    out["resume"] = resume_reread(index, m, a.ranks, a.batch, a.resume_points)
    return out


# --------------------------------------------------------------------------------------------
# 3. Throughput
# --------------------------------------------------------------------------------------------


def reader_pass(
    reader: LatentReader, epoch: int, roots: dict[str, int], consumer_s: float = 0.0
) -> dict[str, Any]:
    """One epoch: latents/s, MB/s delivered, bytes read per sample, CPU seconds per latent."""
    cpu0, stats0 = process_cpu_seconds(roots), (reader.stats.latent_bytes, reader.stats.rows)
    t0 = time.perf_counter()
    n = delivered = 0
    wait = 0.0
    it = reader.epoch(epoch)
    while True:
        tw = time.perf_counter()
        b = next(it, None)
        wait += time.perf_counter() - tw
        if b is None:
            break
        n += len(b.rows)
        delivered += b.latents.numel() * b.latents.element_size()
        if consumer_s:
            time.sleep(consumer_s * len(b.rows))  # a training step that takes this long
    dt = time.perf_counter() - t0
    cpu = {k: v - cpu0[k] for k, v in process_cpu_seconds(roots).items()}
    one_latent = _stored_latent_bytes(reader.index)
    return {
        "latents": n,
        "seconds": dt,
        "latents_per_s": n / dt,
        "mb_per_s": delivered / 1e6 / dt,
        "bytes_read_per_sample_vs_one_latent": (reader.stats.latent_bytes - stats0[0])
        / (n * one_latent),
        "rows_decoded": reader.stats.rows - stats0[1],
        "cpu_ms_per_latent": {k: 1000 * v / n for k, v in cpu.items()},
        "data_wait_fraction": wait / dt,
        "load_1m": round(os.getloadavg()[0], 1),
    }


def _stored_latent_bytes(index: ShardIndex) -> float:
    """Stored bytes of one ``latent`` per row (the column chunks over the rows)."""
    total = rows = 0
    for f in index.files:
        md = f.metadata
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            rows += rg.num_rows
            total += sum(
                rg.column(i).total_compressed_size
                for i in range(rg.num_columns)
                if rg.column(i).path_in_schema.startswith(f"{schema.COL_LATENT}.")
            )
    return total / rows


def timed_reader(
    index: ShardIndex, m: DatasetManifest, threads: int, passes: int, roots: dict[str, int]
) -> dict[str, Any]:
    """A warm-up epoch, then ``passes`` timed epochs; medians."""
    reader = LatentReader(index, m, rank=0, world=1, batch_size=32, seed=0, threads=threads)
    warm = reader_pass(reader, 0, roots)
    runs = [reader_pass(reader, e + 1, roots) for e in range(passes)]
    reader.close()
    med = {
        k: statistics.median(r[k] for r in runs)
        for k in runs[0]
        if not isinstance(runs[0][k], dict)
    }
    cpu = {
        g: statistics.median(r["cpu_ms_per_latent"][g] for r in runs)
        for g in runs[0]["cpu_ms_per_latent"]
    }
    cores = os.cpu_count() or 1
    return {
        **med,
        "cpu_ms_per_latent": cpu,
        "projected_latents_per_s_all_cores": 1000 * cores / sum(cpu.values()),
        "threads": threads,
        "warmup": warm,
        "passes": runs,
    }


def ray_data_baseline(index: ShardIndex, passes: int, roots: dict[str, int]) -> dict[str, Any]:
    """The previous reader path: Ray Data reads label, latent and latent_flip of every row."""
    import ray

    start_local_ray()
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        fs, _ = storage.filesystem(index.root)
        paths = [storage.filesystem(f.uri)[1] for f in index.files]
        cols = [schema.COL_LABEL, schema.COL_LATENT, schema.COL_LATENT_FLIP]
        ds = ray.data.read_parquet(paths, filesystem=fs).select_columns(cols)
        runs = []
        for i in range(passes + 1):
            cpu0 = process_cpu_seconds(roots)
            t0 = time.perf_counter()
            n = 0
            for b in ds.iter_batches(batch_size=32, batch_format="numpy", drop_last=True):
                n += len(b[schema.COL_LABEL])
            dt = time.perf_counter() - t0
            cpu = sum(v - cpu0[k] for k, v in process_cpu_seconds(roots).items())
            if i:  # the first pass warms Ray Data up
                runs.append({"latents_per_s": n / dt, "cpu_ms_per_latent": 1000 * cpu / n})
        return {
            "latents_per_s": statistics.median(r["latents_per_s"] for r in runs),
            "cpu_ms_per_latent": statistics.median(r["cpu_ms_per_latent"] for r in runs),
            "bytes_read_per_sample_vs_one_latent": 2.0,  # both latent columns, every row
            "passes": runs,
        }
    finally:
        ray.shutdown()


def profile(index: ShardIndex) -> dict[str, float]:
    """CPU microseconds per latent of each step, single-threaded in this process."""
    fs = pafs.LocalFileSystem()
    units = [(f, g) for f in index.files[:2] for g in range(len(f.row_groups))]
    n = sum(f.row_groups[g] for f, g in units)

    def cost(fn: Any, count: int = n) -> float:
        c0 = _cpu_self()
        fn()
        return 1e6 * (_cpu_self() - c0) / count

    one = cost(lambda: [read_row_group(fs, f, g, [schema.COL_LATENT]) for f, g in units])
    both = cost(
        lambda: [
            read_row_group(fs, f, g, [schema.COL_LATENT, schema.COL_LATENT_FLIP]) for f, g in units
        ]
    )

    def raw() -> None:
        for f in index.files[:2]:
            with open(f.uri, "rb") as fh:
                fh.read()

    raw_us = cost(raw) / 2  # the files hold two latent columns
    t = read_row_group(fs, *units[0], [schema.COL_LATENT])
    arr = t.column(0).chunk(0).to_numpy_ndarray()
    out = np.empty((32, *arr.shape[1:]), arr.dtype)
    reps = 20

    def gather() -> None:
        for _ in range(reps):
            for j in range(32):
                out[j] = arr[j % len(arr)]

    def to_float() -> None:
        for _ in range(reps):
            torch.from_numpy(out).float()

    return {
        "decode_one_column_us": one,
        "decode_both_columns_us": both,
        "raw_read_us": raw_us,
        "batch_copy_us": cost(gather, 32 * reps),
        "fp16_to_fp32_on_cpu_us": cost(to_float, 32 * reps),
    }


def throughput_part(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Part 3: full-size latents, local and S3, the Ray Data baseline, the profile."""
    write = write_precomputed
    rng = np.random.default_rng(0)
    labels = sorted(rng.integers(0, 1000, a.full_rows).tolist())
    local = str(work / "full")
    t0 = time.perf_counter()
    m = write(local, labels, REAL_SHAPE, True, a.full_rows_per_shard, 0)
    print(f"  {a.full_rows} full-size latents written in {time.perf_counter() - t0:.0f} s")
    index = index_shards(m, local)
    out: dict[str, Any] = {"rows": a.full_rows, "rows_per_file": a.full_rows_per_shard}
    out["profile"] = profile(index)
    print(f"  profile: {out['profile']}", flush=True)
    out["local"] = timed_reader(index, m, a.threads, a.passes, {})
    print(f"  local: {out['local']['latents_per_s']:.0f} latents/s", flush=True)
    reader = LatentReader(index, m, rank=0, world=1, batch_size=32, seed=0, threads=a.threads)
    reader_pass(reader, 0, {})  # warm
    out["consumer_at_target"] = {
        "latents_per_s": TARGET_LATENTS_PER_S,
        **{
            f"prefetch_{p}": reader_pass(
                _with_prefetch(reader, p), 1 + p, {}, 1 / TARGET_LATENTS_PER_S
            )["data_wait_fraction"]
            for p in (0, 1)
        },
    }
    reader.close()
    if a.baseline:
        out["ray_data_baseline"] = ray_data_baseline(index, a.passes, {})
        out["vs_ray_data_baseline"] = (
            out["local"]["latents_per_s"] / out["ray_data_baseline"]["latents_per_s"]
        )
    if a.s3:
        with seaweedfs(work / "s3", "bench-data-order") as s3:
            root = f"s3://{s3.bucket}/full"
            t0 = time.perf_counter()
            storage.write_json(storage.join(root, schema.MANIFEST), m.to_dict())
            for f, rel in zip(index.files, m.shards, strict=True):
                storage.write_bytes(storage.join(root, rel), Path(f.uri).read_bytes())
            print(f"  uploaded to S3 in {time.perf_counter() - t0:.0f} s", flush=True)
            remote = index_shards(load_manifest(root), root)
            out["s3"] = timed_reader(remote, m, a.s3_threads, a.passes, {"s3_server": s3.pid})
            print(f"  s3: {out['s3']['latents_per_s']:.0f} latents/s", flush=True)
    return out


def _with_prefetch(reader: LatentReader, prefetch: int) -> LatentReader:
    reader.prefetch = prefetch
    return reader


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def summary_line(r: dict[str, Any]) -> str:
    """One line: diversity new/old, bytes per sample, resume re-read, reader rates."""
    s3 = f", S3 {r['reader_latents_per_s_s3']:.0f}/s" if r.get("reader_latents_per_s_s3") else ""
    return (
        "bench data_order: classes per global batch vs iid "
        f"{r['global_batch_diversity_vs_iid']:.2f} "
        f"(old class-sorted shards {r['global_batch_diversity_vs_iid_sorted']:.2f}); "
        f"bytes read per sample {r['bytes_read_per_sample_vs_one_latent']:.2f}x one latent; "
        f"resume re-reads <= {r['resume_rows_reread']} rows (file {r['rows_per_file']}); "
        f"reader {r['reader_latents_per_s']:.0f} latents/s {r['reader_mb_per_s']:.0f} MB/s local"
        f"{s3} (target {TARGET_LATENTS_PER_S:.0f}/s, load {r['load_1m']})"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the parts, write the JSON, print the summary line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=1281)
    p.add_argument("--rows-per-shard", type=int, default=1024)
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--batch", type=int, default=32, help="per-rank batch")
    p.add_argument("--order-steps", type=int, default=100, help="steps measured per dataset")
    p.add_argument("--resume-points", type=int, default=8)
    p.add_argument("--full-rows", type=int, default=2048, help="full-size latents to read")
    p.add_argument("--full-rows-per-shard", type=int, default=512)
    p.add_argument("--threads", type=int, default=4, help="reader threads, local (its default)")
    p.add_argument("--s3-threads", type=int, default=8, help="reader threads, S3 (its default)")
    p.add_argument("--passes", type=int, default=2, help="timed epochs per source")
    p.add_argument("--s3", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--work-dir", default="", help="scratch folder (default: a temp dir)")
    p.add_argument("--out", default="outputs/bench/data_order.json")
    a = p.parse_args(argv)
    logging.getLogger("svg_ray.training.latent_reader").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    scratch = nullcontext(a.work_dir) if a.work_dir else tempfile.TemporaryDirectory()
    with scratch as d:
        work = Path(d)
        print("part 1-2: order and resume (small latents)", flush=True)
        order = order_part(a, work)
        print("part 3: throughput (392x16x16 fp16 latents with flips)", flush=True)
        thr = throughput_part(a, work)
    loc = thr["local"]
    report: dict[str, Any] = {
        "global_batch_diversity_vs_iid": order["mixed"]["streamed"]["vs_iid"],
        "global_batch_diversity_vs_iid_sorted": order["sorted"]["streamed"]["vs_iid"],
        "global_batch_diversity_vs_iid_sorted_in_memory": order["sorted"]["in_memory"]["vs_iid"],
        "bytes_read_per_sample_vs_one_latent": loc["bytes_read_per_sample_vs_one_latent"],
        "resume_rows_reread": order["resume"]["max_rows_reread"],
        "rows_per_file": order["resume"]["rows_per_file"],
        "reader_latents_per_s": loc["latents_per_s"],
        "reader_mb_per_s": loc["mb_per_s"],
        "reader_latents_per_s_projected_all_cores": loc["projected_latents_per_s_all_cores"],
        "reader_latents_per_s_s3": thr["s3"]["latents_per_s"] if "s3" in thr else None,
        "reader_mb_per_s_s3": thr["s3"]["mb_per_s"] if "s3" in thr else None,
        "targets": {
            "global_batch_diversity_vs_iid": 0.9,
            "bytes_read_per_sample_vs_one_latent": 1.1,
            "resume_rows_reread": order["resume"]["rows_per_file"],
            "reader_latents_per_s": TARGET_LATENTS_PER_S,
        },
        "load_1m": round(os.getloadavg()[0], 1),
        "order": order,
        "throughput": thr,
        "machine": machine(),
        "settings": vars(a),
        "seconds": time.perf_counter() - t0,
    }
    write_json(a.out, report)
    print(summary_line(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
