"""The Ray jobs under injected S3 faults: nothing lost, nothing skipped that could be read.

Every Ray worker and this driver reach SeaweedFS through ``tests/faultproxy.py``. Objects fail
six times in a row (three times the SDK's two attempts configured here), by 503 SlowDown, 500,
a dropped connection, a body cut in half, on GET, HEAD, listings and record PUTs. Under all of
it, precompute writes exactly one row per decodable input and skips only the corrupt files, the
autoencoder's reader flags only the corrupt files, and evaluation reads every image. A fault
that never stops fails the job with one line naming the object, instead of a skipped image.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faultproxy import FaultProxy, Rule
from fixtures_s3 import AWS_ENV_KEYS, S3Server

from svg_ray import storage
from svg_ray.data import schema
from svg_ray.data.digits import write_image_folder
from svg_ray.data.manifest import load_manifest
from svg_ray.data.precompute import PrecomputeConfig, run_precompute
from svg_ray.testing.procs import start_local_ray
from svg_ray.training.image_data import ImageInput, ImageStream, plan_images

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

RETRY_ENV = {
    storage.ENV_MAX_ATTEMPTS: "2",
    storage.ENV_RETRY_BASE_SECONDS: "0.05",
    storage.ENV_RETRY_SECONDS: "6",
}
BAD = {"3/truncated.png", "7/notes.txt"}


@pytest.fixture(scope="module")
def faulty(s3: S3Server, ray_session: None) -> Iterator[FaultProxy]:
    """The session's Ray restarted so that every worker (and this driver) goes through the proxy.

    Restored afterwards: the cluster is restarted with workers reaching S3 directly, as the
    other S3 tests expect.
    """
    import ray

    proxy = FaultProxy(s3.endpoint)
    env = {k: os.environ[k] for k in AWS_ENV_KEYS if k in os.environ}
    env.update(RETRY_ENV, AWS_ENDPOINT_URL=proxy.endpoint)
    patch = pytest.MonkeyPatch()
    for k, v in env.items():
        patch.setenv(k, v)
    ray.shutdown()
    start_local_ray(env)
    try:
        yield proxy
    finally:
        ray.shutdown()
        patch.undo()
        proxy.close()
        start_local_ray({k: os.environ[k] for k in AWS_ENV_KEYS if k in os.environ})


@pytest.fixture(scope="module")
def folder(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    """24 digits in class folders plus two corrupt files, uploaded straight to the server."""
    root = tmp_path_factory.mktemp("digits")
    write_image_folder(root, 64, limit=24)
    png = next((root / "3").glob("*.png")).read_bytes()
    (root / "3" / "truncated.png").write_bytes(png[:60])
    (root / "7" / "notes.txt").write_text("not an image")
    client = s3.client()
    ids = []
    for f in sorted(root.rglob("*")):
        if f.is_file():
            rel = str(f.relative_to(root))
            client.put_object(Bucket=s3.bucket, Key=f"faults/in/{rel}", Body=f.read_bytes())
            ids.append(rel)
    return s3.uri("faults/in"), ids


def _burst_rules(keys: list[str], bucket: str) -> list[Rule]:
    """Six faults in a row on each of ``keys`` (kinds rotating), plus listings and records."""
    kinds = [("slowdown", "GET"), ("drop", "GET"), ("truncate", "GET"), ("error500", "HEAD")]
    rules = [
        Rule(kind, key=f"/{k}$", method=method, times=6)
        for k, (kind, method) in zip(keys, kinds * len(keys), strict=False)
    ]
    rules.append(Rule("slowdown", key=f"/{bucket}$", times=3))  # ListObjectsV2
    return rules


def _faulted(proxy: FaultProxy, keys: list[str]) -> dict[str, int]:
    return {k: proxy.faults(key=k) for k in keys}


def test_precompute_keeps_every_decodable_input_under_faults(
    faulty: FaultProxy, s3: S3Server, folder: tuple[str, list[str]], ae_path: str
) -> None:
    uri, ids = folder
    good = [i for i in ids if i not in BAD]
    hit = [f"faults/in/{i}" for i in good[::3]]  # 8 objects, two of each fault kind
    out = s3.uri("faults/latents")
    faulty.set_rules(
        *_burst_rules(hit, s3.bucket),
        Rule("drop", key="chunks/chunk-000001.json", method="PUT", times=4),
    )
    cfg = PrecomputeConfig(
        input=uri, out=out, autoencoder=ae_path, rows_per_shard=13, batch_size=16, decoders=1
    )
    result = run_precompute(cfg)
    m = load_manifest(out)
    assert {s.id for s in m.skipped} == BAD  # the corrupt files, and nothing else
    assert not [s for s in m.skipped if "unreadable" in s.reason]
    assert m.num_rows == len(good) and result.inputs == len(ids)
    rows: list[str] = []
    for shard in m.shard_uris(out):
        fs, path = storage.filesystem(shard)
        with fs.open_input_file(path) as f:
            rows += pq.read_table(f, columns=[schema.COL_ID]).column(0).to_pylist()
    assert sorted(rows) == sorted(good)  # exactly one row per decodable input
    faults = _faulted(faulty, hit)
    assert all(n >= 6 for n in faults.values()), faults  # every burst really happened
    assert faulty.faults("drop", "chunk-000001.json") == 4


def test_precompute_stops_with_one_line_when_a_fault_never_stops(
    faulty: FaultProxy,
    s3: S3Server,
    folder: tuple[str, list[str]],
    ae_path: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from svg_ray.cli import main as cli_main  # what `python -m pipelines.precompute` runs

    uri, ids = folder
    victim = f"faults/in/{ids[11]}"
    out = s3.uri("faults/never")
    faulty.set_rules(Rule("slowdown", key=f"/{victim}$", method="GET", times=-1))
    args = ["--input", uri, "--out", out, "--autoencoder", ae_path, "--rows-per-shard", "13"]
    assert cli_main(["precompute", *args, "--decoders", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err[-2000:]
    err = err.splitlines()[-1]  # after the job's INFO log lines: the error, on one line
    assert err.startswith(f"svg-ray precompute: error: s3://{s3.bucket}/{victim}: S3 kept"), err
    assert not storage.exists(storage.join(out, schema.MANIFEST))
    records = [storage.read_json(r) for r in storage.list_files(storage.join(out, "chunks"))]
    skipped = {i for r in records for i, _ in r["skipped"]}
    assert ids[11] not in skipped  # never committed as a skip: a rerun will still encode it


def test_autoencoder_reader_flags_only_corrupt_files_under_faults(
    faulty: FaultProxy, s3: S3Server, folder: tuple[str, list[str]], tmp_path: Path
) -> None:
    uri, ids = folder
    good = [i for i in ids if i not in BAD]
    hit = [f"faults/in/{i}" for i in good[2::3]]
    src = ImageInput(uri, resolution=32)
    faulty.set_rules()
    plan = plan_images(src)
    faulty.set_rules(*_burst_rules(hit, s3.bucket))
    # One batch of every input on one rank: each is read once this epoch, in the job's order.
    stream = ImageStream(src, plan, rank=0, world=1, batch_size=len(ids), seed=0, decode_batch=8,
                         decode_cpus=0.5)  # fmt: skip
    [batch] = list(stream.epoch(0))
    assert batch.shape == (len(ids), 32, 32, 3)
    flagged = {p.split("/faults/in/", 1)[1] for p, _ in stream.skipped.skipped}
    assert flagged == BAD, stream.skipped.skipped
    assert all(n >= 6 for n in _faulted(faulty, hit).values())

    # Parquet input goes through Ray Data's reader with the same filesystem and retries.
    client = s3.client()
    pngs = [client.get_object(Bucket=s3.bucket, Key=f"faults/in/{i}")["Body"].read() for i in good]
    local = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"image": pngs[:12]}), local, row_group_size=4)
    client.put_object(Bucket=s3.bucket, Key="faults/pq/part-0.parquet", Body=local.read_bytes())
    src = ImageInput(s3.uri("faults/pq"), resolution=32)
    plan = plan_images(src)
    faulty.set_rules(Rule("slowdown", key="part-0.parquet", method="GET", times=6))
    stream = ImageStream(src, plan, rank=0, world=1, batch_size=4, seed=0, decode_cpus=0.5)
    assert len(list(stream.epoch(0))) == 3 and stream.skipped.count == 0  # 12 rows, none lost
    assert faulty.faults("slowdown", "part-0.parquet") == 6


def test_autoencoder_reader_fails_the_task_when_a_fault_never_stops(
    faulty: FaultProxy, s3: S3Server, folder: tuple[str, list[str]]
) -> None:
    uri, ids = folder
    victim = f"faults/in/{ids[5]}"
    src = ImageInput(uri, resolution=32)
    faulty.set_rules()
    plan = plan_images(src)
    faulty.set_rules(Rule("drop", key=f"/{victim}$", method="GET", times=-1))
    stream = ImageStream(src, plan, rank=0, world=1, batch_size=1, seed=0, decode_cpus=0.5)
    with pytest.raises(Exception) as e:  # Ray's wrapper around the worker's error
        list(stream.epoch(0))
    found = storage.storage_error_in(e.value)
    assert isinstance(found, storage.StorageUnavailableError), repr(e.value)[:2000]
    assert str(found).startswith(f"s3://{s3.bucket}/{victim}: S3 kept failing")


def test_evaluation_reads_every_image_under_faults(
    faulty: FaultProxy,
    s3: S3Server,
    folder: tuple[str, list[str]],
    ae_path: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The probe needs every listed image to decode: one fault-made skip would fail it."""
    from pipelines.evaluate import main as evaluate
    from svg_ray.cli import main as cli_main

    ids = folder[1]
    good = [i for i in ids if i not in BAD]
    client = s3.client()
    for i in good:  # the same images without the corrupt files
        client.copy_object(
            Bucket=s3.bucket, Key=f"faults/eval/{i}", CopySource=f"{s3.bucket}/faults/in/{i}"
        )
    hit = [f"faults/eval/{i}" for i in good[1::3]]
    faulty.set_rules(*_burst_rules(hit, s3.bucket))
    common = ["--autoencoder", ae_path, "--input", s3.uri("faults/eval"), "--chunk-size", "16"]
    common += ["--out", str(tmp_path / "eval"), "--no-mlflow", "--test-fraction", "0.25"]
    assert evaluate(["probe", *common]) == 0
    res = storage.read_json(str(tmp_path / "eval" / "probe" / "results.json"))
    assert res["details"]["num_train"] + res["details"]["num_test"] == len(good)
    assert all(n >= 6 for n in _faulted(faulty, hit).values())

    victim = hit[0]
    faulty.set_rules(Rule("error500", key=f"/{victim}$", times=-1))
    assert cli_main(["eval", "probe", *common, "--name", "never"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"svg-ray eval: error: s3://{s3.bucket}/{victim}: S3 kept"), err
