"""The DiT job's data order and latent reader: mixed batches, an order that is a function of
(seed, epoch, rank) only, exact resume that re-reads no consumed rows outside one window, one
latent column read per sample, the in-memory mode, and the same batches from S3 as locally."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import torch
from latent_data import make_latent_dataset, write_precomputed

from svg_ray.config import ConfigError
from svg_ray.data.manifest import DatasetManifest, expected_classes, load_manifest
from svg_ray.data.order import EpochOrder
from svg_ray.testing.latents import CountingRead
from svg_ray.training.latent_reader import (
    LatentBatch,
    LatentReader,
    ShardIndex,
    index_shards,
    read_row_group,
)

BATCH = 10


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[DatasetManifest, ShardIndex]:
    """600 rows in 6 shards of 4 row groups (25 rows) each, with flips."""
    root = str(tmp_path_factory.mktemp("order") / "ds")
    m = make_latent_dataset(root, "ae", rows=600, shards=6, shape=(4, 2, 2), row_group_rows=25)
    return m, index_shards(m, root)


def _reader(data: tuple[DatasetManifest, ShardIndex], **kw: Any) -> LatentReader:
    m, index = data
    base: dict[str, Any] = dict(rank=0, world=2, batch_size=BATCH, seed=3, window_rows=100)
    base.update(kw)
    return LatentReader(index, m, **base)


def _same(a: list[LatentBatch], b: list[LatentBatch]) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x.rows, y.rows)
        and torch.equal(x.latents, y.latents)
        and torch.equal(x.labels, y.labels)
        and np.array_equal(x.flipped, y.flipped)
        for x, y in zip(a, b, strict=True)
    )


# --------------------------------------------------------------------------------------------
# The order itself (no I/O)
# --------------------------------------------------------------------------------------------


def test_order_is_a_function_of_seed_epoch_rank_only() -> None:
    units = [25] * 24
    a, b = EpochOrder(units, 4, 8, seed=5, window_rows=100), EpochOrder(units, 4, 8, 5, 100)
    spans = {(e, r): a.span(e, r) for e in range(3) for r in range(4)}
    assert a.steps_per_epoch == 600 // 4 // 8 and a.rows_per_rank == 144
    # A fresh instance, queried in another order, gives the same plan; windows too.
    for (e, r), span in reversed(spans.items()):
        assert b.span(e, r) == span
        wa, wb = a.windows(e, r), b.windows(e, r)
        assert [w.segments for w in wa] == [w.segments for w in wb]
        assert all(np.array_equal(x.order, y.order) for x, y in zip(wa, wb, strict=True))
    for e in range(3):
        rows = [
            (s.unit, k) for r in range(4) for s in spans[(e, r)] for k in range(s.start, s.stop)
        ]
        assert len(rows) == len(set(rows)) == 4 * 144  # ranks disjoint, equal, within an epoch
        assert all(sum(s.rows for s in spans[(e, r)]) == 144 for r in range(4))
    assert spans[(0, 0)] != spans[(1, 0)]  # a new order every epoch
    assert EpochOrder(units, 4, 8, seed=6, window_rows=100).span(0, 0) != spans[(0, 0)]
    for e in range(3):
        for r in range(4):
            ws = a.windows(e, r)
            assert all(w.rows <= 100 for w in ws) and sum(w.rows for w in ws) == 144
            assert all(sorted(w.order.tolist()) == list(range(w.rows)) for w in ws)
    single = EpochOrder([1] * 50, 3, 4, seed=1)
    got = np.concatenate([single.rank_units(0, r) for r in range(3)])
    assert len(set(got.tolist())) == 48 and single.steps_per_epoch == 4
    with pytest.raises(ConfigError, match="not enough data"):
        EpochOrder([5, 5], 2, 8, seed=0)


# --------------------------------------------------------------------------------------------
# The reader on real Parquet shards
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache_mb", [0, 64])
def test_ranks_split_each_epoch_and_resume_gives_the_same_batches(
    dataset: tuple[DatasetManifest, ShardIndex], cache_mb: int
) -> None:
    _, index = dataset
    readers = [_reader(dataset, rank=r, cache_mb=cache_mb) for r in range(2)]
    assert readers[0].in_memory == (cache_mb > 0)
    assert readers[0].steps_per_epoch == readers[1].steps_per_epoch == 30
    labels = np.concatenate([m_.column("label").to_numpy() for m_ in _tables(index)])
    epochs = [[list(r.epoch(e)) for r in readers] for e in range(2)]
    for per_rank in epochs:
        rows = np.concatenate([b.rows for batches in per_rank for b in batches])
        assert len(rows) == len(set(rows.tolist())) == 600  # every row once per epoch
        for batches in per_rank:
            assert len(batches) == 30 and all(b.latents.shape == (BATCH, 4, 2, 2) for b in batches)
            assert all(np.array_equal(b.labels.numpy(), labels[b.rows]) for b in batches)
            assert all(b.latents.dtype == torch.float16 for b in batches)
    assert not np.array_equal(epochs[0][0][0].rows, epochs[1][0][0].rows)
    # A fresh reader (a restarted worker) resumes at any step with exactly the same batches.
    for k in (0, 1, 9, 10, 17, 29, 30):
        again = _reader(dataset, rank=1, cache_mb=cache_mb)
        assert _same(list(again.epoch(1, start_step=k)), epochs[1][1][k:]), k


def _tables(index: ShardIndex) -> list[pa.Table]:
    fs = pafs.LocalFileSystem()
    return [
        read_row_group(fs, f, g, ["label"]) for f in index.files for g in range(len(f.row_groups))
    ]


def test_resume_reads_no_consumed_rows_outside_its_window(
    dataset: tuple[DatasetManifest, ShardIndex],
) -> None:
    _, index = dataset
    full = list(_reader(dataset).epoch(2))
    boundary_seen = False
    for k in range(1, 30):
        read = CountingRead()
        reader = _reader(dataset, read=read)
        pos = reader.position(2, k)
        resumed = list(reader.epoch(2, start_step=k))
        assert _same(resumed, full[k:])
        consumed = set(np.concatenate([b.rows for b in full[:k]]).tolist())
        reread = read.rows(index) & consumed
        # Only rows of the window holding batch k that came before it are read again.
        assert len(reread) == pos["row_in_window"] < reader.window_rows, (k, pos)
        boundary_seen |= pos["row_in_window"] == 0
        assert pos["file"] in {f.uri for f in index.files} and pos["plan"]["world"] == 2
    assert boundary_seen  # some resume point sits on a window boundary: nothing re-read at all


def test_flips_read_one_latent_column_per_sample(
    dataset: tuple[DatasetManifest, ShardIndex],
) -> None:
    _, index = dataset
    tables = [
        read_row_group(pafs.LocalFileSystem(), f, g, ["latent", "latent_flip"])
        for f in index.files
        for g in range(len(f.row_groups))
    ]
    plain = np.concatenate([t.column("latent").combine_chunks().to_numpy_ndarray() for t in tables])
    flip = np.concatenate(
        [t.column("latent_flip").combine_chunks().to_numpy_ndarray() for t in tables]
    )
    stored = [
        f.metadata.row_group(g).column(i)
        for f in index.files
        for g in range(len(f.row_groups))
        for i in range(f.metadata.num_columns)
    ]
    one_column = (
        sum(c.total_compressed_size for c in stored if c.path_in_schema.startswith("latent.")) / 600
    )
    reader = _reader(dataset, world=1)
    flipped = []
    for e in range(4):
        for b in reader.epoch(e):
            want = np.where(b.flipped[:, None, None, None], flip[b.rows], plain[b.rows])
            assert np.array_equal(b.latents.numpy(), want)
            flipped.append(b.flipped)
    share = np.concatenate(flipped).mean()
    assert 0.2 < share < 0.8, share  # a coin per row group and epoch
    per_row = reader.stats.latent_bytes / reader.stats.rows
    assert per_row < 1.1 * one_column, (per_row, one_column)  # never both columns
    off = _reader(dataset, world=1, use_flip=False)
    assert not any(b.flipped.any() for b in off.epoch(0))
    mem = _reader(dataset, world=1, cache_mb=64)
    per_sample = np.concatenate([b.flipped for b in mem.epoch(0)])
    assert 0.3 < per_sample.mean() < 0.7  # held in memory: a coin per sample


def test_class_sorted_dataset_warns_once_and_still_trains(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = str(tmp_path / "old")
    m = make_latent_dataset(root, "ae", rows=200, shards=4, shape=(4, 2, 2), class_sorted=True)
    index = index_shards(load_manifest(root), root)
    with caplog.at_level(logging.WARNING, logger="svg_ray.training.latent_reader"):
        for rank in (0, 0, 1):
            reader = LatentReader(index, m, rank=rank, world=2, batch_size=8, seed=0)
            assert len(list(reader.epoch(0))) == reader.steps_per_epoch == 12
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and root in warnings[0] and "svg-ray precompute" in warnings[0]
    caplog.clear()
    mixed = str(tmp_path / "new")
    m2 = make_latent_dataset(mixed, "ae", rows=200, shards=4, shape=(4, 2, 2))
    with caplog.at_level(logging.WARNING, logger="svg_ray.training.latent_reader"):
        LatentReader(index_shards(m2, mixed), m2, rank=0, world=2, batch_size=8, seed=0)
    assert not caplog.records


def test_new_precompute_gives_iid_like_global_batches(tmp_path: Path) -> None:
    """Class-sorted inputs (100 classes x 60), 4 ranks x 16: distinct classes per global batch."""
    labels = [c for c in range(100) for _ in range(60)]
    iid = expected_classes(np.bincount(labels), 64)
    diversity = {}
    for name, seed in (("mixed", 0), ("sorted", -1)):
        root = str(tmp_path / name)
        m = write_precomputed(
            root, labels, rows_per_shard=256, row_group_rows=40, shuffle_seed=seed
        )
        index = index_shards(m, root)
        readers = [LatentReader(index, m, rank=r, world=4, batch_size=16, seed=0) for r in range(4)]
        its = [r.epoch(0) for r in readers]
        counts = [len({int(y) for b in step for y in b.labels}) for step in zip(*its, strict=True)]
        diversity[name] = float(np.mean(counts)) / iid
    assert diversity["mixed"] >= 0.9, diversity
    assert diversity["sorted"] < 0.75 * diversity["mixed"], diversity


def test_s3_reads_the_same_batches(s3: Any, dataset: tuple[DatasetManifest, ShardIndex]) -> None:
    m, index = dataset
    root = s3.uri("reader-ds")
    from svg_ray import storage

    storage.write_json(storage.join(root, "manifest.json"), m.to_dict())
    for f, rel in zip(index.files, m.shards, strict=True):
        storage.write_bytes(storage.join(root, rel), Path(f.uri).read_bytes())
    remote = index_shards(load_manifest(root), root)
    assert [f.row_groups for f in remote.files] == [f.row_groups for f in index.files]
    a = list(_reader((m, remote), rank=1).epoch(0, start_step=7))
    b = list(_reader(dataset, rank=1).epoch(0, start_step=7))
    assert _same(a, b) and len(a) == 23


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_data_order_benchmark_smoke(tmp_path: Path) -> None:
    """The benchmark at tiny settings: every figure present, the new order iid-like."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    args = ["--classes", "50", "--per-class", "40", "--rows-per-shard", "128", "--ranks", "4"]
    args += ["--batch", "8", "--order-steps", "20", "--resume-points", "3", "--full-rows", "96"]
    args += ["--full-rows-per-shard", "48", "--passes", "1", "--no-s3", "--no-baseline"]
    out = tmp_path / "data_order.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.data_order", *args, "--out", str(out)],
        cwd=root, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["global_batch_diversity_vs_iid"] >= 0.9
    assert r["global_batch_diversity_vs_iid_sorted"] < r["global_batch_diversity_vs_iid"]
    assert r["bytes_read_per_sample_vs_one_latent"] <= 1.1
    assert 0 <= r["resume_rows_reread"] <= r["rows_per_file"]
    assert r["reader_latents_per_s"] > 0 and r["reader_mb_per_s"] > 0
    assert proc.stdout.strip().splitlines()[-1].startswith("bench data_order:")
