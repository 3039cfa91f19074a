"""The Ray Data precompute job: real images, the debug autoencoder (random tiny DINO), real Ray.

Fast tests cover the manifest, planning and entrypoint validation. Slow tests run the job on the
session's in-process Ray cluster: bad-image accounting, statistics against numpy, a latent against
``ae.encode`` run directly, Parquet input, kill-and-resume in a subprocess, and S3 (SeaweedFS).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from latent_data import write_precomputed
from mlflow_registry import AE_NAME, Registry, registry_fixture  # noqa: F401
from test_images import BAD_SET_MAX_PIXELS, write_bad_images

from svg_ray import storage
from svg_ray.checkpoint import autoencoder_id, load_autoencoder
from svg_ray.cli import main as cli_main
from svg_ray.config import ConfigError
from svg_ray.data import schema
from svg_ray.data.digits import write_image_folder
from svg_ray.data.images import prepare_image, to_model_input
from svg_ray.data.inputs import DecodeChunk, InputPlan
from svg_ray.data.latents import LatentStats, latents_to_numpy, latents_to_torch
from svg_ray.data.manifest import (
    DatasetManifest,
    ManifestError,
    ShardLabelSummary,
    SkippedInput,
    expected_classes,
    load_manifest,
)
from svg_ray.data.precompute import (
    Chunk,
    EncodeChunk,
    PrecomputeConfig,
    PrecomputeError,
    WriteChunk,
    make_chunks,
    plan_inputs,
    record_name,
    run_precompute,
)
from svg_ray.errors import SvgRayError
from svg_ray.models.autoencoder import SVGAutoencoder

N_DIGITS = 120
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Shared inputs: a debug autoencoder checkpoint and an image tree with the bad-image set mixed in
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ae(ae_path: str) -> SVGAutoencoder:
    """The same autoencoder, loaded as users would."""
    return load_autoencoder(ae_path)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits/<class>/<id>.png (120 real images) plus the bad-image set inside class '3'."""
    root = tmp_path_factory.mktemp("digits")
    write_image_folder(root, resolution=64, limit=N_DIGITS)
    write_bad_images(root / "3")
    (root / "3" / ".DS_Store").write_bytes(b"hidden files are not inputs")
    (root / "README.txt").write_text("files outside class folders are ignored")
    return root


def _cfg(**kw: object) -> PrecomputeConfig:
    # One decode actor: each actor is a fresh Python process, the slowest part of a small run.
    base: dict[str, object] = {"max_pixels": BAD_SET_MAX_PIXELS, "batch_size": 16, "decoders": 1}
    base.update(kw)
    return PrecomputeConfig(**base)  # type: ignore[arg-type]


def _read_shards(out: str | Path) -> pa.Table:
    m = load_manifest(str(out))
    fs, _ = storage.filesystem(str(out))
    tables = []
    for uri in m.shard_uris(str(out)):
        _, path = storage.filesystem(uri)
        with fs.open_input_file(path) as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables)


def _latents(table: pa.Table, col: str, dtype: str) -> torch.Tensor:
    return latents_to_torch(table.column(col).combine_chunks().to_numpy_ndarray(), dtype)


def _direct_encode(ae: SVGAutoencoder, files: list[Path], flip: bool = False) -> torch.Tensor:
    """What the job should store: ADM crop -> [-1,1] -> ae.encode, outside Ray."""
    crops = [prepare_image(p.read_bytes(), ae.cfg.resolution) for p in files]
    assert all(isinstance(c, np.ndarray) for c in crops)
    x = to_model_input(np.stack(crops))  # type: ignore[arg-type]
    with torch.no_grad():
        return ae.encode(x.flip(-1) if flip else x)


# --------------------------------------------------------------------------------------------
# Fast: manifest, dtype helpers, planning, validation
# --------------------------------------------------------------------------------------------


def _manifest(**kw: object) -> DatasetManifest:
    stats = LatentStats(np.arange(4, dtype=np.float32), np.ones(4, np.float32))
    base: dict[str, object] = dict(
        encoder="vit_tiny_patch16_dinov3_qkvb",
        encoder_sha256="random",
        autoencoder_id="0123456789abcdef",
        autoencoder_uri="s3://b/ae.safetensors",
        resolution=64,
        dtype="float16",
        latent_shape=(4, 4, 4),
        num_rows=10,
        has_flip=True,
        class_names=["a", "b"],
        latent_stats=stats,
        skipped=[SkippedInput("a/x.png", "empty file (0 bytes)")],
        shards=["shards/part-000000.parquet"],
    )
    base.update(kw)
    return DatasetManifest(**base)  # type: ignore[arg-type]


def test_manifest_json_round_trip_and_missing(tmp_path: Path) -> None:
    m = _manifest()
    m.save(str(tmp_path))
    back = load_manifest(str(tmp_path))
    assert back.to_dict() == m.to_dict()
    assert back.latent_shape == (4, 4, 4) and back.num_skipped == 1 and back.created
    assert back.columns == ["id", "label", "latent", "latent_flip"]
    assert load_manifest(str(tmp_path / schema.MANIFEST)).num_rows == 10
    with pytest.raises(ManifestError, match=r"manifest\.json is missing"):
        load_manifest(str(tmp_path / "nowhere"))
    with pytest.raises(ManifestError, match="channels"):
        _manifest(latent_shape=(5, 4, 4))
    with pytest.raises(ManifestError, match="dtype"):
        _manifest(dtype="float32")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_latent_storage_dtypes_round_trip(dtype: str) -> None:
    z = torch.randn(3, 8, 2, 2) * 5
    stored = latents_to_numpy(z, dtype)
    assert stored.dtype == (np.float16 if dtype == "float16" else np.uint16)
    back = latents_to_torch(stored, dtype)
    assert back.dtype == getattr(torch, dtype)
    assert torch.equal(back, z.to(getattr(torch, dtype)))  # bit-exact, no second rounding


def test_plan_is_sorted_and_deterministic(image_root: Path, ae_path: str) -> None:
    cfg = _cfg(input=str(image_root), out="unused", autoencoder=ae_path)
    plan = plan_inputs(cfg)
    assert plan.class_names == [str(i) for i in range(10)]
    assert plan.ids == sorted(plan.ids) and len(plan.ids) == N_DIGITS + 13
    assert not any(i.endswith((".DS_Store", "README.txt")) for i in plan.ids)
    assert all(plan.labels[k] == int(i.split("/")[0]) for k, i in enumerate(plan.ids))
    assert plan.fingerprint() == plan_inputs(cfg).fingerprint()
    chunks = make_chunks(plan, 32)  # no seed: consecutive slices (evaluation jobs)
    assert [len(c.ids) for c in chunks] == [32, 32, 32, 32, 5]
    assert [i for c in chunks for i in c.ids] == plan.ids
    mixed = make_chunks(plan, 32, seed=0)  # what precompute cuts
    assert [len(c.ids) for c in mixed] == [32, 32, 32, 32, 5]
    assert sorted(i for c in mixed for i in c.ids) == plan.ids  # each input exactly once
    for c in mixed:
        assert all(
            plan.labels[plan.ids.index(i)] == y for i, y in zip(c.ids, c.labels, strict=True)
        )
    again = make_chunks(plan_inputs(cfg), 32, seed=0)
    assert [c.ids for c in again] == [c.ids for c in mixed]  # a rerun cuts the same chunks
    assert [c.ids for c in make_chunks(plan, 32, seed=1)] != [c.ids for c in mixed]


def test_chunks_of_a_class_sorted_tree_are_mixed() -> None:
    """ImageNet-shaped listing (1,000 class folders x 100 images, sorted): every 1,024-row chunk
    of the seeded order holds about as many classes as a random sample; sorted slices hold 11."""
    labels = [c for c in range(1000) for _ in range(100)]
    ids = [f"n{y:08d}/{k:06d}.JPEG" for k, y in enumerate(labels)]
    plan = InputPlan("folder", ids, labels, ids, [f"n{y:08d}" for y in range(1000)])
    iid = expected_classes(np.bincount(labels), 1024)  # ~640 of 1,000
    full = lambda cs: [c for c in cs if len(c.ids) == 1024]  # noqa: E731
    mixed = [len(set(c.labels)) for c in full(make_chunks(plan, 1024, seed=0))]
    sorted_ = [len(set(c.labels)) for c in full(make_chunks(plan, 1024))]
    assert min(mixed) >= 0.9 * iid, (min(mixed), iid)
    assert max(sorted_) <= 12 < 0.05 * iid
    summary = ShardLabelSummary.of([dict(Counter(c.labels)) for c in make_chunks(plan, 1024, 0)])
    assert summary.mixed and summary.iid_classes == pytest.approx(iid, rel=1e-6)
    assert not ShardLabelSummary.of(
        [dict(Counter(c.labels)) for c in make_chunks(plan, 1024)]
    ).mixed


def test_records_and_manifest_summarise_shard_labels(tmp_path: Path) -> None:
    """The real writer and manifest builder: label histograms per commit record, summary and
    seed in the manifest; the reader's view of an older manifest (no summary) is 'not mixed'."""
    labels = [c for c in range(10) for _ in range(40)]
    m = write_precomputed(str(tmp_path / "new"), labels, rows_per_shard=32, shuffle_seed=7)
    assert m.shuffle_seed == 7 and m.shards_mixed and m.shard_labels is not None
    assert m.shard_labels.shards == 13 and m.shard_labels.classes_max == 10
    table = _read_shards(tmp_path / "new")
    for k, rel in enumerate(m.shards):
        record = json.loads((tmp_path / "new" / record_name(k)).read_text())
        shard = pq.read_table(tmp_path / "new" / rel, columns=["label"]).column(0).to_pylist()
        assert record["labels"] == {str(y): n for y, n in Counter(shard).items()}
    assert sorted(table.column("label").to_pylist()) == labels
    assert load_manifest(str(tmp_path / "new")).to_dict() == m.to_dict()
    old = write_precomputed(str(tmp_path / "old"), labels, rows_per_shard=32, shuffle_seed=-1)
    assert old.shuffle_seed is None and old.shard_labels is None and not old.shards_mixed
    old_dict = {k: v for k, v in old.to_dict().items() if k not in ("shuffle_seed", "shard_labels")}
    assert DatasetManifest.from_dict(old_dict).shard_labels is None  # older manifests still load


def test_stages_chain_without_ray_including_an_all_bad_chunk(
    tmp_path: Path, image_root: Path, ae_path: str, ae: SVGAutoencoder
) -> None:
    """The three stage callables, fed one-row batches exactly as Ray Data feeds them."""
    good = sorted(image_root.glob("0/*.png"))[:3]
    bad = [image_root / "3" / "notes.txt", image_root / "3" / "empty.png"]
    decode = DecodeChunk(resolution=64, max_pixels=BAD_SET_MAX_PIXELS)
    encode = EncodeChunk(ae_path, batch_size=2, dtype="float16", flip=True, device="cpu", threads=1)
    write = WriteChunk(str(tmp_path), dtype="float16", flip=True)
    for k, files in enumerate([[*good, *bad], bad]):
        ids = [str(p.relative_to(image_root)) for p in files]
        spec = Chunk(k, ids, [0] * len(files), [str(p) for p in files]).spec("folder", "image")
        summary = write(encode(decode({"spec": np.array([spec])})))
        record = json.loads((tmp_path / record_name(k)).read_text())
        assert int(summary["rows"][0]) == record["rows"] == (3 if k == 0 else 0)
        assert [i for i, _ in record["skipped"]] == ["3/notes.txt", "3/empty.png"]
        assert record["moments"]["count"] == record["rows"] * 2 * ae.grid**2  # flips included
        assert record["labels"] == ({"0": 3} if k == 0 else {})  # written rows only
    assert (tmp_path / "shards" / "part-000000.parquet").exists()
    assert not (tmp_path / "shards" / "part-000001.parquet").exists()  # no empty shard
    assert json.loads((tmp_path / record_name(1)).read_text())["shard"] is None


def precompute_main(argv: list[str]) -> int:
    """The user's entry point: `svg-ray precompute ...` (errors become one line and exit 2)."""
    return cli_main(["precompute", *argv])


def test_entrypoint_validates_inputs(
    ray_session: None, tmp_path: Path, ae_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    common = ["--out", str(tmp_path / "o")]
    assert precompute_main(["--input", str(tmp_path / "nope"), "--autoencoder", ae_path, *common])
    assert "input not found" in capsys.readouterr().err
    assert precompute_main(["--input", str(tmp_path), "--autoencoder", "/no/ae.st", *common])
    assert "autoencoder checkpoint not found" in capsys.readouterr().err
    assert precompute_main(["--input", str(tmp_path), "--autoencoder", ae_path, *common]) == 2
    assert "no images found" in capsys.readouterr().err
    args = ["--input", str(tmp_path), "--autoencoder", ae_path, *common, "--rows-per-shard", "0"]
    assert precompute_main(args) == 2
    assert "rows_per_shard" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: unknown flag / bad choice -> usage + exit 2
        precompute_main(["--input", "x", "--out", "y", "--autoencoder", "z", "--dtype", "fp8"])
    with pytest.raises(ConfigError):
        PrecomputeConfig(input="a", out="a", autoencoder="m")
    # A caller's Ray (here the test session's) is left running: main stops only what it started.
    assert ray.is_initialized()


# --------------------------------------------------------------------------------------------
# Slow: the job on Ray
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_run(ray_session: None, image_root: Path, ae_path: str, tmp_path_factory):  # type: ignore[no-untyped-def]
    """One fp16 + flip run over the digits and the bad-image set (5 chunks of <= 32)."""
    out = tmp_path_factory.mktemp("latents") / "ds"
    cfg = _cfg(
        input=str(image_root), out=str(out), autoencoder=ae_path, flip=True, rows_per_shard=32
    )
    return cfg, run_precompute(cfg)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bad_images_counted_listed_good_kept(local_run, image_root: Path) -> None:  # type: ignore[no-untyped-def]
    cfg, result = local_run
    m = load_manifest(cfg.out)
    bad = write_bad_images(image_root / "3")  # same set (idempotent), to know what to expect
    expect_skipped = {f"3/{n}": reason for n, (kept, reason) in bad.items() if not kept}
    got = {s.id: s.reason for s in m.skipped}
    assert set(got) == set(expect_skipped)
    assert all(got[i].startswith(r) for i, r in expect_skipped.items()), got
    n_kept = N_DIGITS + sum(kept for kept, _ in bad.values())
    assert m.num_rows == n_kept and result.inputs == n_kept + len(expect_skipped)
    table = _read_shards(cfg.out)
    ids = table.column(schema.COL_ID).to_pylist()
    assert len(ids) == len(set(ids)) == n_kept
    assert {f"3/{n}" for n, (k, _) in bad.items() if k} <= set(ids)
    assert m.class_names == [str(i) for i in range(10)] and m.has_flip and m.dtype == "float16"
    assert table.column(schema.COL_LABEL).to_pylist() == [int(i.split("/")[0]) for i in ids]
    # Shards are random samples of the class-sorted tree, not runs of two or three classes.
    assert m.shuffle_seed == 0 and m.shard_labels is not None and m.shards_mixed
    assert m.shard_labels.classes_median >= 9, m.shard_labels
    assert result.summary_line().startswith(f"precompute: {result.inputs} images, {n_kept}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_latent_round_trip_equals_direct_encode(local_run, image_root: Path, ae) -> None:  # type: ignore[no-untyped-def]
    cfg, _ = local_run
    table = _read_shards(cfg.out)
    ids = table.column(schema.COL_ID).to_pylist()
    pick = [0, 17, len(ids) // 2, len(ids) - 1]
    files = [image_root / ids[k] for k in pick]
    stored = _latents(table, schema.COL_LATENT, "float16")[pick]
    stored_flip = _latents(table, schema.COL_LATENT_FLIP, "float16")[pick]
    assert stored.shape == (len(pick), *ae.latent_shape) and stored.dtype == torch.float16
    direct = _direct_encode(ae, files)
    torch.testing.assert_close(stored.float(), direct.half().float(), rtol=2e-3, atol=5e-3)
    direct_flip = _direct_encode(ae, files, flip=True)
    torch.testing.assert_close(
        stored_flip.float(), direct_flip.half().float(), rtol=2e-3, atol=5e-3
    )
    assert not torch.allclose(stored.float(), stored_flip.float())  # the flip is really flipped


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_manifest_stats_and_storage_size(local_run, ae) -> None:  # type: ignore[no-untyped-def]
    cfg, _ = local_run
    m = load_manifest(cfg.out)
    table = _read_shards(cfg.out)
    z = torch.cat(
        [_latents(table, c, "float16") for c in (schema.COL_LATENT, schema.COL_LATENT_FLIP)]
    )
    x = z.double().numpy().transpose(1, 0, 2, 3).reshape(z.shape[1], -1)  # (C, 2N*h*w)
    np.testing.assert_allclose(m.latent_stats.mean, x.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m.latent_stats.std, x.std(1), rtol=1e-5, atol=1e-6)
    assert m.latent_stats.channels == ae.latent_channels == m.latent_shape[0]
    raw = 2 * int(np.prod(m.latent_shape)) * 2  # two fp16 latents per row
    assert raw <= m.bytes_per_row <= raw * 1.05, (m.bytes_per_row, raw)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_rerun_is_idempotent_and_foreign_settings_refused(local_run) -> None:  # type: ignore[no-untyped-def]
    cfg, _ = local_run
    shards = sorted((Path(cfg.out) / schema.SHARDS_DIR).glob("*.parquet"))
    before = {p.name: p.stat().st_mtime_ns for p in shards}
    again = run_precompute(cfg)  # nothing pending: Ray is not even used
    assert again.chunks_run == 0 and again.images_run == 0
    assert {p.name: p.stat().st_mtime_ns for p in shards} == before
    assert again.manifest.num_rows == load_manifest(cfg.out).num_rows
    other = PrecomputeConfig(**{**cfg.__dict__, "dtype": "bfloat16"})
    with pytest.raises(PrecomputeError, match="dtype"):
        run_precompute(other)
    reshuffled = PrecomputeConfig(**{**cfg.__dict__, "shuffle_seed": 1})  # other chunks
    with pytest.raises(PrecomputeError, match="shuffle_seed"):
        run_precompute(reshuffled)


def _parquet_input(root: Path, image_root: Path) -> list[tuple[str, str]]:
    """Two Parquet files (HF-style struct image column, string labels), a null and a bad row."""
    files = sorted(image_root.glob("[0-9]/*.png"))[:30]
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    rows = [({"bytes": p.read_bytes(), "path": p.name}, names[int(p.parent.name)]) for p in files]
    rows.insert(5, ({"bytes": None, "path": "missing.png"}, "one"))
    rows.insert(20, ({"bytes": b"GIF89a-but-not-really", "path": "bad.gif"}, "two"))
    root.mkdir(parents=True)
    img_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for name, part in (("a.parquet", rows[:19]), ("b.parquet", rows[19:])):
        t = pa.table(
            {
                "image": pa.array([r[0] for r in part], img_t),
                "label": pa.array([r[1] for r in part]),
            }
        )
        pq.write_table(t, root / name, row_group_size=7)  # several row groups per file
    return [(str(r[0]["path"]), r[1]) for r in rows]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_parquet_input_bf16(
    ray_session: None, tmp_path: Path, image_root: Path, ae_path: str, ae
) -> None:  # type: ignore[no-untyped-def]
    rows = _parquet_input(tmp_path / "in", image_root)
    out = tmp_path / "out"
    cfg = _cfg(
        input=str(tmp_path / "in"),
        out=str(out),
        autoencoder=ae_path,
        dtype="bfloat16",
        rows_per_shard=12,
    )
    result = run_precompute(cfg)
    m = result.manifest
    assert m.source_format == "parquet" and m.dtype == "bfloat16" and not m.has_flip
    assert m.class_names == sorted({label for _, label in rows})
    assert {s.id for s in m.skipped} == {"a.parquet:5", "b.parquet:1"}
    assert m.num_rows == len(rows) - 2 and result.chunks_total == 3  # chunks span both files
    table = _read_shards(out)
    ids = table.column(schema.COL_ID).to_pylist()
    # Shards are mixed, so rows are found by id: "<file>:<row>" for both input files.
    flat = [
        (f"{name}:{r}", row)
        for name, part in (("a.parquet", rows[:19]), ("b.parquet", rows[19:]))
        for r, row in enumerate(part)
    ]
    good = {i: label for i, (_, label) in flat if i not in ("a.parquet:5", "b.parquet:1")}
    assert sorted(ids) == sorted(good)
    labels = table.column(schema.COL_LABEL).to_pylist()
    assert [m.class_names[y] for y in labels] == [good[i] for i in ids]
    z = _latents(table, schema.COL_LATENT, "bfloat16")
    assert z.dtype == torch.bfloat16
    # Row 6 of a.parquet is the 6th good image (files[5]): compare with the AE run directly.
    src = sorted(image_root.glob("[0-9]/*.png"))[5]
    direct = _direct_encode(ae, [src]).bfloat16().float()
    k = ids.index("a.parquet:6")
    torch.testing.assert_close(z[k : k + 1].float(), direct, rtol=1e-2, atol=2e-2)


# --------------------------------------------------------------------------------------------
# Kill and resume
# --------------------------------------------------------------------------------------------


def _session_pids(sid: int) -> list[int]:
    """Processes still in session ``sid`` (the killed job's Ray processes, if any survived)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) == sid:
                    pids.append(int(d.name))
            except (ProcessLookupError, PermissionError):
                continue
    return pids


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_kill_midway_and_resume(
    ray_session: None, tmp_path: Path, image_root: Path, ae_path: str
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "ds"
    args = [
        "--input",
        str(image_root),
        "--out",
        str(out),
        "--autoencoder",
        ae_path,
        "--rows-per-shard",
        "8",
        "--batch-size",
        "8",
        "--max-pixels",
        str(BAD_SET_MAX_PIXELS),
        "--limit",
        "80",
        "--num-cpus",
        "4",
    ]
    env = {**os.environ, "SVG_RAY_TEST_WRITE_DELAY_S": "0.5", "PYTHONPATH": str(ROOT)}
    log = (tmp_path / "job.log").open("wb")
    # Own session: the kill takes the driver and every Ray process it started, nothing else.
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.precompute", *args],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    records = out / schema.CHUNKS_DIR
    try:
        deadline = time.monotonic() + 240
        while len(list(records.glob("*.json"))) < 3:
            assert proc.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "job made no progress"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for pid in _session_pids(proc.pid):  # anything that escaped the group kill
            os.kill(pid, signal.SIGKILL)
        log.close()
    assert not (out / schema.MANIFEST).exists(), "killed job must not look complete"
    committed = {p.stem for p in records.glob("*.json")}
    assert 3 <= len(committed) < 10, f"kill landed too late: {len(committed)} of 10 committed"
    done_shards = {
        p.name: p.stat().st_mtime_ns
        for p in (out / schema.SHARDS_DIR).glob("*.parquet")
        if p.stem.replace("part", "chunk") in committed
    }
    lost = sorted(done_shards)[0]  # a committed shard that vanished must be recomputed
    (out / schema.SHARDS_DIR / lost).unlink()
    done_shards.pop(lost)

    cfg = _cfg(
        input=str(image_root),
        out=str(out),
        autoencoder=ae_path,
        rows_per_shard=8,
        limit=80,
        batch_size=8,
    )
    result = run_precompute(cfg)
    assert result.chunks_total == 10 and result.chunks_run == 10 - len(committed) + 1
    for name, mtime in done_shards.items():  # finished shards were not redone
        assert (out / schema.SHARDS_DIR / name).stat().st_mtime_ns == mtime
    ids = _read_shards(out).column(schema.COL_ID).to_pylist()
    m = load_manifest(str(out))
    expected = plan_inputs(cfg).ids
    assert len(ids) == len(set(ids)) == m.num_rows  # no duplicates
    assert sorted(ids + [s.id for s in m.skipped]) == sorted(expected)  # none missing
    assert m.shards_mixed  # the chunks the killed run and the rerun cut were the same mix
    assert not (out / "_tmp").exists()


# --------------------------------------------------------------------------------------------
# Object storage (SeaweedFS S3 started by the session)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_s3_input_and_output(s3_ray, image_root: Path, ae_path: str, local_run) -> None:  # type: ignore[no-untyped-def]
    import ray

    files = [*sorted(image_root.glob("[17]/*.png"))[:20], image_root / "3" / "notes.txt"]
    for p in files:
        storage.write_bytes(s3_ray.uri("imgs", p.parent.name, p.name), p.read_bytes())
    ae_uri = s3_ray.uri("models", "ae.safetensors")
    storage.write_bytes(ae_uri, Path(ae_path).read_bytes())
    out = s3_ray.uri("latents", "digits")
    cfg = _cfg(input=s3_ray.uri("imgs"), out=out, autoencoder=ae_uri, flip=True, rows_per_shard=8)
    result = run_precompute(cfg)
    m = load_manifest(out)
    assert m.num_rows == 20 and [s.id for s in m.skipped] == ["3/notes.txt"]
    assert m.class_names == ["1", "3", "7"] and m.autoencoder_uri == ae_uri
    keys = {o["Key"] for o in s3_ray.client().list_objects_v2(Bucket=s3_ray.bucket)["Contents"]}
    assert "latents/digits/manifest.json" in keys and "latents/digits/job.json" in keys
    assert sum(k.startswith("latents/digits/shards/") for k in keys) == result.chunks_total == 3
    # Read back through Ray Data on s3:// as training does (column pruning, file shuffle, torch
    # batches), and compare with the latents of the same images from the local run.
    ds = ray.data.read_parquet(
        storage.join(out, schema.SHARDS_DIR), filesystem=storage.s3_filesystem(), shuffle="files"
    ).select_columns([schema.COL_ID, schema.COL_LATENT])
    rows: dict[str, torch.Tensor] = {}
    for batch in ds.iter_batches(batch_size=8, batch_format="numpy"):
        for rid, z in zip(batch[schema.COL_ID], batch[schema.COL_LATENT], strict=True):
            rows[str(rid)] = torch.from_numpy(np.array(z))
    assert len(rows) == 20 and next(iter(rows.values())).shape == m.latent_shape
    local = _read_shards(local_run[0].out)
    local_ids = local.column(schema.COL_ID).to_pylist()
    z_local = _latents(local, schema.COL_LATENT, "float16")
    for rid in list(rows)[:3]:
        want = z_local[local_ids.index(rid)].float()
        torch.testing.assert_close(rows[rid].float(), want, rtol=2e-3, atol=5e-3)
    latents = next(iter(ds.select_columns([schema.COL_LATENT]).iter_torch_batches(batch_size=4)))
    assert latents[schema.COL_LATENT].shape == (4, *m.latent_shape)
    assert latents[schema.COL_LATENT].dtype == torch.float16
    assert run_precompute(cfg).chunks_run == 0  # resume logic works on S3 too


def test_fixture_exports_aws_env(s3) -> None:  # type: ignore[no-untyped-def]
    assert os.environ["AWS_ENDPOINT_URL"] == s3.endpoint
    storage.write_json(s3.uri("probe.json"), {"ok": True})
    assert storage.read_json(s3.uri("probe.json")) == {"ok": True}
    assert json.loads(s3.client().get_object(Bucket=s3.bucket, Key="probe.json")["Body"].read())


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_unschedulable_pipeline_is_refused(
    ray_session: None, tmp_path: Path, image_root: Path, ae_path: str
) -> None:
    cfg = _cfg(input=str(image_root), out=str(tmp_path / "o"), autoencoder=ae_path, encode_gpus=1)
    with pytest.raises(SvgRayError, match="GPUs but the Ray cluster has 0"):
        run_precompute(cfg)  # would otherwise wait forever for a GPU


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_autoencoder_from_the_model_registry(
    ray_session: None, registry: Registry, image_root: Path, tmp_path: Path
) -> None:
    """--autoencoder takes models:/ URIs too: the registered file is read where it lives."""
    out = tmp_path / "ds"
    cfg = _cfg(
        input=str(image_root), out=str(out), autoencoder=f"models:/{AE_NAME}/latest",
        tracking_uri=registry.tracking_uri, limit=16, rows_per_shard=16,
    )  # fmt: skip
    m = run_precompute(cfg).manifest
    assert m.num_rows == 16 and m.autoencoder_id == autoencoder_id(str(registry.ae_file))
    assert m.autoencoder_uri.endswith("autoencoder.safetensors")
    assert storage.read_bytes(m.autoencoder_uri) == registry.ae_file.read_bytes()
    with pytest.raises(SvgRayError, match="has no version 9"):
        run_precompute(dataclasses.replace(cfg, autoencoder=f"models:/{AE_NAME}/9"))
