"""Storage as it behaves against S3: settings from the AWS chain, one client per process, and
transient faults (injected by a proxy in front of the SeaweedFS server) retried, never lost.

No Ray here: every test runs in this process against the session's SeaweedFS through
``tests/faultproxy.py``. The Ray jobs under the same faults are in test_storage_faults.py.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest
from faultproxy import FaultProxy, Rule
from fixtures_s3 import S3Server

from svg_ray import storage
from svg_ray.data import inputs
from svg_ray.errors import SvgRayError
from svg_ray.weights import AssetError, resolve_asset

# Fast retries for tests: the SDK tries twice, then storage.retrying backs off from 20 ms.
FAST_RETRY = {
    storage.ENV_MAX_ATTEMPTS: "2",
    storage.ENV_RETRY_BASE_SECONDS: "0.02",
    storage.ENV_RETRY_SECONDS: "8",
}


@pytest.fixture(scope="module")
def proxy(s3: S3Server) -> Iterator[FaultProxy]:
    """A fault proxy in front of the session's S3 server."""
    p = FaultProxy(s3.endpoint)
    yield p
    p.close()


@pytest.fixture
def via_proxy(proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch) -> FaultProxy:
    """This process talks to S3 through the proxy, with fast retries; no rules yet."""
    proxy.set_rules()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    for k, v in FAST_RETRY.items():
        monkeypatch.setenv(k, v)
    return proxy


def _put(s3: S3Server, key: str, data: bytes) -> str:
    """Write directly to the server (never through the proxy); returns the s3:// URI."""
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=data)
    return s3.uri(key)


# --------------------------------------------------------------------------------------------
# Settings: the AWS chain decides the region; one set of settings for pyarrow and boto3
# --------------------------------------------------------------------------------------------


def test_region_comes_from_the_aws_config_file(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With AWS_REGION/AWS_DEFAULT_REGION unset, the profile in AWS_CONFIG_FILE sets the region,
    for pyarrow and boto3 alike (the old code forced us-east-1)."""
    config = tmp_path / "aws-config"
    config.write_text("[default]\nregion = eu-west-3\n\n[profile other]\nregion = ap-south-1\n")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    assert storage.s3_settings().region == "eu-west-3"
    assert storage.s3_filesystem().region == "eu-west-3"
    assert storage.s3_client().meta.region_name == "eu-west-3"
    # The request is signed for eu-west-3 and still served: a real round trip.
    uri = s3.uri("region", "probe.json")
    storage.write_json(uri, {"region": "eu-west-3"})
    assert storage.read_json(uri) == {"region": "eu-west-3"}
    monkeypatch.setenv("AWS_PROFILE", "other")
    assert storage.s3_filesystem().region == "ap-south-1"
    assert storage.s3_client().meta.region_name == "ap-south-1"
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ca-central-1")
    assert storage.s3_filesystem().region == "ca-central-1"  # the environment wins
    monkeypatch.setenv("AWS_REGION", "sa-east-1")
    assert storage.s3_settings().region == "sa-east-1"  # AWS_REGION over AWS_DEFAULT_REGION


def test_pyarrow_and_boto3_share_the_endpoint_settings(
    s3: S3Server, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS_ENDPOINT_URL_S3 overrides AWS_ENDPOINT_URL for both clients; path-style there."""
    proxy.set_rules()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: unused
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
    settings = storage.s3_settings()
    assert settings.endpoint == proxy.endpoint and settings.path_style
    assert storage.s3_client().meta.endpoint_url == proxy.endpoint
    before = proxy.requests
    uri = _put(s3, "endpoint/a.bin", b"abc")
    assert storage.read_bytes(uri) == b"abc"
    assert storage.s3_client().get_object(Bucket=s3.bucket, Key="endpoint/a.bin")["Body"].read()
    assert proxy.requests > before  # both went through the proxy, not the unused endpoint


def test_storage_calls_reuse_one_filesystem(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hundreds of calls (from threads, as the chunk check does) build one S3 client."""
    built: list[storage.S3Settings] = []
    real = storage.S3FileSystem

    def counting(settings: storage.S3Settings) -> storage.S3FileSystem:
        built.append(settings)
        return real(settings)

    monkeypatch.setattr(storage, "_FILESYSTEMS", {})
    monkeypatch.setattr(storage, "S3FileSystem", counting)
    uris = [s3.uri("reuse", f"{i}.json") for i in range(20)]
    for i, u in enumerate(uris):
        storage.write_json(u, {"i": i})

    def work() -> None:
        for i, u in enumerate(uris):
            assert storage.exists(u) and storage.read_json(u) == {"i": i}
        assert len(storage.list_files(s3.uri("reuse"), ".json")) == 20

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1, built
    fs = storage.filesystem(uris[0])[0]
    assert fs is storage.s3_filesystem(s3.bucket)
    # Pickled (as Ray ships it to workers) it comes back with its settings, retries included.
    back = pickle.loads(pickle.dumps(fs))
    assert back is fs and back.settings.max_attempts == storage.s3_settings().max_attempts
    assert len(built) == 1


# --------------------------------------------------------------------------------------------
# Transient vs permanent, from real failures through the proxy
# --------------------------------------------------------------------------------------------


def _first_error(fn: Any) -> BaseException:
    try:
        fn()
    except BaseException as e:  # the test inspects whatever was raised
        return e
    raise AssertionError("no error raised")


@pytest.mark.parametrize("fault", ["slowdown", "error500", "drop", "truncate"])
def test_real_faults_are_transient(
    s3: S3Server, via_proxy: FaultProxy, fault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What pyarrow and boto3 really raise under each fault is classified transient."""
    monkeypatch.setenv(storage.ENV_MAX_ATTEMPTS, "1")
    key = f"classify/{fault}.bin"
    _put(s3, key, os.urandom(50_000))
    via_proxy.set_rules(Rule(fault, key=key, method="GET", times=-1))
    fs = storage.s3_filesystem()
    errors = [
        _first_error(lambda: fs.open_input_stream(f"{s3.bucket}/{key}").read()),
        _first_error(
            lambda: storage.s3_client().get_object(Bucket=s3.bucket, Key=key)["Body"].read()
        ),
    ]
    for e in errors:
        assert storage.is_transient(e), f"{type(e).__name__}: {e}"
        assert not storage.is_missing(e)
    assert via_proxy.faults(fault) >= 2


def test_missing_and_denied_are_permanent(
    s3: S3Server, via_proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing key is 'not found' (skippable); bad credentials fail at once with the cause."""
    missing = s3.uri("nowhere", "x.png")
    e = _first_error(lambda: storage.read_bytes(missing))
    assert isinstance(e, storage.StorageNotFoundError) and isinstance(e, FileNotFoundError)
    assert str(e) == f"{missing}: not found"
    assert inputs.read_file(missing) == f"unreadable: {missing}: not found"
    uri = _put(s3, "denied/a.bin", b"secret")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    t0 = time.monotonic()
    e = _first_error(lambda: storage.read_bytes(uri))
    assert time.monotonic() - t0 < 2, "a permanent error must not be retried"
    assert isinstance(e, storage.StorageError) and isinstance(e, SvgRayError)
    assert not isinstance(e, storage.StorageNotFoundError)
    msg = str(e)
    assert "\n" not in msg and msg.startswith(uri) and "access denied" in msg
    assert "AWS_ACCESS_KEY_ID" in msg  # the fix is named
    e = _first_error(lambda: inputs.read_file(uri))  # never a skip: the job must stop
    assert isinstance(e, storage.StorageError)


# --------------------------------------------------------------------------------------------
# Retrying beyond the SDK, and giving up with one line
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["slowdown", "error500", "drop", "truncate"])
def test_a_burst_of_faults_is_outlasted(s3: S3Server, via_proxy: FaultProxy, fault: str) -> None:
    """Six faults in a row on one object (three times the SDK's attempts): the bytes arrive."""
    data = os.urandom(200_000)
    key = f"burst/{fault}.bin"
    uri = _put(s3, key, data)
    via_proxy.set_rules(Rule(fault, key=key, times=6))
    assert storage.read_bytes(uri) == data
    assert via_proxy.faults(fault, key) == 6
    assert inputs.read_file(uri) == data


def test_listing_manifests_and_parquet_reads_are_retried(
    s3: S3Server, via_proxy: FaultProxy, tmp_path: Path
) -> None:
    """Listing, JSON records, Parquet footers and row groups all survive bursts of faults."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = [os.urandom(100) for _ in range(30)]
    local = tmp_path / "p.parquet"
    pq.write_table(pa.table({"image": images, "label": [i % 3 for i in range(30)]}), local,
                   row_group_size=7)  # fmt: skip
    pq_uri = _put(s3, "pq/in/p.parquet", local.read_bytes())
    record = s3.uri("pq/records/r.json")
    via_proxy.set_rules(
        Rule("slowdown", key=f"/{s3.bucket}$", times=5),  # ListObjectsV2
        Rule("drop", key="r.json", times=5),  # PUT, then GET
        Rule("error500", key="p.parquet", times=5),
    )
    storage.write_json(record, {"chunk": 3})
    assert storage.read_json(record) == {"chunk": 3}
    assert storage.list_files(s3.uri("pq"), ".parquet") == [pq_uri]
    plan = inputs.plan_inputs(s3.uri("pq/in"), option="--data")
    assert plan.source_format == "parquet" and len(plan.ids) == 30
    assert plan.class_names == ["0", "1", "2"]
    assert inputs.read_parquet_rows(pq_uri, [0, 8, 29], "image") == [images[k] for k in (0, 8, 29)]
    assert via_proxy.faults("slowdown") == 5 and via_proxy.faults("drop") == 5
    assert via_proxy.faults("error500") == 5


def test_a_fault_that_never_stops_raises_one_line_naming_the_uri(
    s3: S3Server, via_proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(storage.ENV_RETRY_SECONDS, "1.5")
    uri = _put(s3, "forever/a.png", b"x" * 100)
    via_proxy.set_rules(Rule("slowdown", key="forever/a.png", times=-1))
    t0 = time.monotonic()
    e = _first_error(lambda: inputs.read_file(uri))
    elapsed = time.monotonic() - t0
    assert isinstance(e, storage.StorageUnavailableError), repr(e)
    msg = str(e)
    assert "\n" not in msg and msg.startswith(f"{uri}: S3 kept throttling"), msg
    assert storage.ENV_RETRY_SECONDS in msg
    assert 0.5 < elapsed < 6
    assert via_proxy.faults("slowdown") >= 4  # SDK attempts x several retrying() rounds


def test_weights_download_retries_and_reports_one_line(
    s3: S3Server, via_proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """boto3 (weights) runs under the same settings and retry policy as pyarrow."""
    monkeypatch.setenv("SVG_RAY_CACHE", str(tmp_path / "cache"))
    data = os.urandom(300_000)
    uri = _put(s3, "weights/w.pth", data)
    via_proxy.set_rules(Rule("drop", key="weights/w.pth", method="GET", times=5))
    path = resolve_asset(uri, "--dino-weights", hashlib.sha256(data).hexdigest())
    assert path.read_bytes() == data and via_proxy.faults("drop") == 5
    monkeypatch.setenv(storage.ENV_RETRY_SECONDS, "1")
    via_proxy.set_rules(Rule("error500", key="weights/v.pth", times=-1))
    with pytest.raises(AssetError) as err:
        resolve_asset(_put(s3, "weights/v.pth", data), "--dino-weights")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("--dino-weights: could not download s3://")
    assert "kept failing" in msg


def test_local_paths_keep_working(tmp_path: Path) -> None:
    """Local files: the same functions, missing files are 'not found', nothing retried."""
    storage.write_json(str(tmp_path / "a" / "b.json"), {"x": 1})
    assert storage.read_json(str(tmp_path / "a" / "b.json")) == {"x": 1}
    assert storage.list_files(str(tmp_path), ".json") == [str(tmp_path / "a" / "b.json")]
    assert isinstance(storage.filesystem(str(tmp_path))[0], pafs.LocalFileSystem)
    e = _first_error(lambda: storage.read_bytes(str(tmp_path / "nope")))
    assert isinstance(e, storage.StorageNotFoundError)
    assert inputs.read_file(str(tmp_path / "nope")).startswith("unreadable: ")
