"""One storage abstraction for local paths and ``s3://`` URIs, behaving as S3 on AWS does.

S3 settings come from the standard AWS environment, resolved once per process into one
``S3Settings`` that builds both the pyarrow filesystem and the boto3 client:

- endpoint: ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL`` (S3-compatible servers such as
  SeaweedFS or MinIO; path-style addressing there). Unset: AWS itself.
- region: ``AWS_REGION``, ``AWS_DEFAULT_REGION``, the profile in ``AWS_CONFIG_FILE`` /
  ``AWS_PROFILE``, then instance metadata (the AWS SDK's own chain); never a hard-coded one. On AWS
  each bucket's own region is looked up once (pyarrow does not follow S3's cross-region
  redirect), falling back to that chain.
- credentials: the SDK's chain (environment, profile, instance profile / service account).

Requests fail in two ways. *Transient* errors (503 SlowDown and other throttling, 500/502/504,
timeouts, reset/refused/dropped connections, truncated bodies) are retried by the SDK
(``SVG_RAY_S3_MAX_ATTEMPTS`` attempts per request) and then by ``retrying`` with exponential
backoff and jitter for up to ``SVG_RAY_IO_RETRY_SECONDS`` (default 120 s); if they persist the
caller gets ``StorageUnavailableError``. Everything else (a missing object, access denied, a
wrong region or endpoint) is *permanent* and raised at once. Both are ``StorageError``: one line
naming the URI and the likely cause, never a pyarrow traceback.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.client
import json
import logging
import os
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import pyarrow.fs as pafs

from svg_ray.errors import SvgRayError

log = logging.getLogger(__name__)
T = TypeVar("T")

ENV_MAX_ATTEMPTS = "SVG_RAY_S3_MAX_ATTEMPTS"
"""Attempts per request inside the AWS SDK (pyarrow and boto3), before ``retrying`` steps in."""
ENV_RETRY_SECONDS = "SVG_RAY_IO_RETRY_SECONDS"
"""Total time ``retrying`` keeps retrying a transient error before it gives up."""
ENV_RETRY_BASE_SECONDS = "SVG_RAY_IO_RETRY_BASE_SECONDS"
"""First backoff delay of ``retrying``; it doubles per attempt (with jitter) up to 20 s."""
ENV_ADDRESSING = "SVG_RAY_S3_ADDRESSING_STYLE"
"""'path' or 'virtual' (default: path with a custom endpoint, virtual on AWS)."""
ENV_BUCKET_REGION = "SVG_RAY_S3_BUCKET_REGION"
"""'0' turns off the per-bucket region lookup on AWS (then the region chain alone decides)."""

_SETTINGS_ENV = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_EC2_METADATA_DISABLED",
    ENV_MAX_ATTEMPTS,
    ENV_ADDRESSING,
)
_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


# --------------------------------------------------------------------------------------------
# Errors: transient or permanent, always one line naming the URI
# --------------------------------------------------------------------------------------------


class StorageError(SvgRayError, OSError):
    """Storage refused a request or kept failing; the message names the URI and likely cause."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The object or file does not exist."""


class StorageUnavailableError(StorageError):
    """Transient errors (throttling, 5xx, dropped connections) persisted past every retry."""


class IncompleteReadError(OSError):
    """A read returned fewer bytes than the object holds (a connection cut mid-body)."""


_TRANSIENT_TEXT = re.compile(
    r"AWS Error (SLOW_DOWN|THROTTLING|NETWORK_CONNECTION|INTERNAL_FAILURE|SERVICE_UNAVAILABLE"
    r"|REQUEST_TIMEOUT)"
    r"|HTTP status (429|500|502|503|504)\b"
    r"|curlCode: (6|7|18|28|52|55|56)\b"
    r"|[Cc]onnection (was )?(reset|refused|aborted|closed)|[Tt]imed? ?out|Broken pipe"
    r"|Empty reply|SlowDown|Throttl|Service ?Unavailable"
)
_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "TooManyRequestsException", "RequestLimitExceeded", "ProvisionedThroughputExceededException",
    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
    "500", "502", "503", "504",
}  # fmt: skip
_TRANSIENT_TYPES = {
    # botocore / urllib3 / s3transfer, matched by name so this module never imports boto3.
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "ProxyConnectionError", "IncompleteReadError", "ResponseStreamingError",
    "RetriesExceededError", "ProtocolError", "HTTPClientError",
}  # fmt: skip
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}


def _client_error(exc: BaseException) -> tuple[str, int]:
    """(error code, HTTP status) of a botocore ClientError; ('', 0) for anything else."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return "", 0
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def is_transient(exc: BaseException) -> bool:
    """Whether retrying ``exc`` later may succeed: throttling, 5xx, timeouts, cut connections."""
    if isinstance(exc, StorageError):
        return False  # already classified (and, if transient, already retried)
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout, http.client.IncompleteRead)):
        return True
    if isinstance(exc, IncompleteReadError):
        return True
    code, status = _client_error(exc)
    if code or status:
        return code in _TRANSIENT_CODES or status in (429, 500, 502, 503, 504)
    if {t.__name__ for t in type(exc).__mro__} & _TRANSIENT_TYPES:
        return True
    if isinstance(exc, FileNotFoundError):
        return False
    return isinstance(exc, OSError) and bool(_TRANSIENT_TEXT.search(str(exc)))


def is_missing(exc: BaseException) -> bool:
    """Whether ``exc`` says the object or file does not exist (404, NoSuchKey, no such file)."""
    if isinstance(exc, FileNotFoundError):
        return True
    code, status = _client_error(exc)
    return code in _MISSING_CODES or (status == 404 and code != "NoSuchBucket")


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = re.sub(r"\s+", " ", str(exc)).strip() or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def likely_cause(exc: BaseException) -> str:
    """A short, actionable guess at why a storage request failed."""
    text = f"{type(exc).__name__} {exc}"
    code, status = _client_error(exc)
    endpoint = s3_settings().endpoint or "AWS S3"
    if (
        re.search(
            r"ACCESS_DENIED|AccessDenied|InvalidAccessKeyId|INVALID_ACCESS_KEY|SignatureDoesNotMatch"
            r"|SIGNATURE_DOES_NOT_MATCH|ExpiredToken|security token|NoCredentials|Unable to locate "
            r"credentials|HTTP status 403|\(403\)",
            text,
        )
        or status == 403
    ):
        return (
            "access denied: check the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or the node's instance profile / service account) and the bucket policy"
        )
    if re.search(r"NoSuchBucket|NO_SUCH_BUCKET", text):
        return "the bucket does not exist: check the URI (and AWS_ENDPOINT_URL for S3-compatible)"
    if re.search(r"PermanentRedirect|AuthorizationHeaderMalformed|HTTP status 301|\(301\)", text):
        return "the bucket is in another region: set AWS_REGION to the bucket's region"
    if re.search(
        r"curlCode: (6|7)\b|Could not (resolve|connect)|Connection refused|EndpointConnection",
        text,
    ):
        return f"cannot reach the S3 endpoint {endpoint}: check AWS_ENDPOINT_URL and the network"
    if re.search(r"SLOW_DOWN|SlowDown|Throttl|HTTP status (429|503)", text) or status in (429, 503):
        return "S3 kept throttling the requests (503 SlowDown): lower the request rate"
    if is_transient(exc):
        return "S3 kept failing with server or network errors (5xx, timeouts, cut connections)"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return f"storage request failed ({code or type(exc).__name__})"


def storage_error(exc: BaseException, what: str) -> BaseException:
    """``exc`` as a one-line ``StorageError`` about ``what`` (a URI); other errors unchanged."""
    if isinstance(exc, StorageError):
        return exc
    if is_missing(exc):
        return StorageNotFoundError(f"{what}: not found")
    storage_like = isinstance(exc, OSError) or bool(_client_error(exc)[0])
    storage_like = storage_like or bool({t.__name__ for t in type(exc).__mro__} & _TRANSIENT_TYPES)
    if not storage_like:
        return exc  # a bug or a parse error: keep its type and traceback
    return StorageError(f"{what}: {likely_cause(exc)} ({_one_line(exc)})")


_REMOTE_ERROR = re.compile(
    r"svg_ray\.storage\.(StorageError|StorageNotFoundError|StorageUnavailableError): ([^\n]+)"
)


def storage_error_in(exc: BaseException) -> StorageError | None:
    """The ``StorageError`` a (Ray-wrapped) exception chain carries, if any.

    Ray re-raises a worker's exception wrapped (``RayTaskError``, Ray Data's
    ``UserCodeException``, Ray Train's failure) with a long remote traceback, and the original
    exception's own chain does not survive pickling; the traceback text does, and our messages
    are one line by construction.
    """
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, StorageError) and type(e).__module__ == __name__:
            return e
        for nxt in (getattr(e, "cause", None), e.__cause__, e.__context__):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    found = _REMOTE_ERROR.findall(str(exc))
    if not found:
        return None
    name, message = found[-1]
    cls: type[StorageError] = {
        "StorageNotFoundError": StorageNotFoundError,
        "StorageUnavailableError": StorageUnavailableError,
    }.get(name, StorageError)
    return cls(message.strip())


@contextlib.contextmanager
def unwrap_storage_errors() -> Iterator[None]:
    """Re-raise a StorageError that a Ray task raised as itself (one line), not Ray's wrapper."""
    try:
        yield
    except Exception as e:
        found = storage_error_in(e)
        if found is None or found is e:
            raise
        raise found from None


# --------------------------------------------------------------------------------------------
# Retrying transient errors beyond the SDK's attempts
# --------------------------------------------------------------------------------------------


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        return float(raw) if raw else default
    except ValueError:
        raise StorageError(f"{name}={raw!r} is not a number") from None


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often ``retrying`` retries a transient storage error."""

    seconds: float = 120.0
    """Total time budget; past it the error is raised as StorageUnavailableError."""
    base_seconds: float = 1.0
    """First delay; doubles per attempt, with jitter, capped by ``max_delay_seconds``."""
    max_delay_seconds: float = 20.0
    """Longest single wait."""

    def __post_init__(self) -> None:
        if self.seconds < 0 or self.base_seconds <= 0 or self.max_delay_seconds <= 0:
            raise StorageError(
                f"bad retry settings {self}: {ENV_RETRY_SECONDS} must be >= 0 and "
                f"{ENV_RETRY_BASE_SECONDS} > 0"
            )

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """The policy set by SVG_RAY_IO_RETRY_SECONDS / SVG_RAY_IO_RETRY_BASE_SECONDS."""
        return cls(
            seconds=_env_float(ENV_RETRY_SECONDS, cls.seconds),
            base_seconds=_env_float(ENV_RETRY_BASE_SECONDS, cls.base_seconds),
        )

    def delay(self, attempt: int) -> float:
        """Wait before retry number ``attempt`` (1-based): "equal jitter" exponential backoff.

        Half the delay is fixed and half random, so workers throttled together spread out
        (AWS Architecture Blog, "Exponential Backoff and Jitter").
        """
        d = min(self.max_delay_seconds, self.base_seconds * 2 ** (attempt - 1))
        return d / 2 + random.uniform(0, d / 2)


def retrying(
    fn: Callable[..., T], *args: Any, what: str, policy: RetryPolicy | None = None, **kwargs: Any
) -> T:
    """``fn(*args, **kwargs)``, retrying transient storage errors with backoff and jitter.

    ``what`` (the URI) names the request in logs and errors. A transient error that persists
    for the policy's budget raises ``StorageUnavailableError``; a missing object raises
    ``StorageNotFoundError``; other storage errors raise ``StorageError`` at once. Exceptions
    that are not about storage (parse errors, bugs) pass through unchanged.
    """
    policy = policy or RetryPolicy.from_env()
    start = time.monotonic()
    attempt = 0
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not is_transient(e):
                err = storage_error(e, what)
                if err is e:
                    raise
                raise err from e
            attempt += 1
            elapsed = time.monotonic() - start
            wait = policy.delay(attempt)
            if elapsed + wait > policy.seconds:
                raise StorageUnavailableError(
                    f"{what}: {likely_cause(e)}; still failing after {attempt} tries over "
                    f"{elapsed:.0f} s (raise {ENV_RETRY_SECONDS} to wait longer, or rerun once "
                    f"storage recovers; last error: {_one_line(e, 200)})"
                ) from e
            log.warning(
                "%s: transient storage error, retry %d in %.1f s: %s",
                what,
                attempt,
                wait,
                _one_line(e, 200),
            )
            time.sleep(wait)


# --------------------------------------------------------------------------------------------
# One set of S3 settings for pyarrow and boto3; one filesystem per process
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Settings:
    """Everything that configures an S3 client, resolved from the standard AWS environment."""

    endpoint: str | None
    """Custom endpoint URL (``http://host:port``) or None for AWS."""
    region: str | None
    """Signing / routing region; None lets the SDK decide (it then assumes us-east-1)."""
    path_style: bool
    """Path-style addressing (``endpoint/bucket/key``) instead of virtual-hosted."""
    max_attempts: int
    """Attempts per request inside the SDK."""
    connect_timeout: float = 10.0
    """Seconds to open a connection."""
    request_timeout: float = 60.0
    """Seconds a request may wait for data (boto3; pyarrow honours it on some platforms)."""
    credentials: str = ""
    """Fingerprint of credentials set in the environment (never the keys): new keys, new client."""

    def pyarrow_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``pyarrow.fs.S3FileSystem``."""
        kwargs: dict[str, Any] = {
            "region": self.region,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=self.max_attempts),
            "connect_timeout": self.connect_timeout,
            "request_timeout": self.request_timeout,
        }
        if self.endpoint:
            scheme, _, host = self.endpoint.partition("://")
            kwargs.update(
                endpoint_override=host.rstrip("/") or scheme, scheme=scheme if host else "https"
            )
        # Without an endpoint pyarrow uses virtual-hosted addressing unless told otherwise.
        kwargs["force_virtual_addressing"] = bool(self.endpoint) and not self.path_style
        return kwargs

    def boto3_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``boto3.client("s3", ...)`` (the same endpoint, region, style)."""
        from botocore.config import Config

        return {
            "endpoint_url": self.endpoint,
            "region_name": self.region,
            "config": Config(
                s3={"addressing_style": "path" if self.path_style else "virtual"},
                retries={"max_attempts": self.max_attempts, "mode": "standard"},
                connect_timeout=self.connect_timeout,
                read_timeout=self.request_timeout,
            ),
        }


def _region_chain() -> str | None:
    """AWS_REGION, AWS_DEFAULT_REGION, the AWS_CONFIG_FILE profile, then instance metadata."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        return region
    try:
        import botocore.session

        # botocore's chain: the profile in AWS_CONFIG_FILE (AWS_PROFILE), then IMDS unless
        # AWS_EC2_METADATA_DISABLED; pyarrow's SDK walks the same chain, but the two must agree.
        found = botocore.session.get_session().get_config_variable("region")
    except Exception as e:  # a broken config file: let the SDK report it on first use
        log.warning("could not read the AWS region from the profile: %s", _one_line(e))
        return None
    return str(found) if found else None


@functools.lru_cache(maxsize=16)
def _resolve_settings(env: tuple[str | None, ...], credentials: str) -> S3Settings:
    values = dict(zip(_SETTINGS_ENV, env, strict=True))
    endpoint = (values["AWS_ENDPOINT_URL_S3"] or values["AWS_ENDPOINT_URL"] or "").strip()
    style = (values[ENV_ADDRESSING] or "").strip().lower()
    if style not in ("", "path", "virtual"):
        raise StorageError(f"{ENV_ADDRESSING}={style!r}: use 'path' or 'virtual'")
    raw_attempts = values[ENV_MAX_ATTEMPTS] or "5"
    if not raw_attempts.isdigit() or int(raw_attempts) < 1:
        raise StorageError(f"{ENV_MAX_ATTEMPTS}={raw_attempts!r} must be a positive integer")
    return S3Settings(
        endpoint=endpoint or None,
        region=_region_chain(),
        path_style=style == "path" or (not style and bool(endpoint)),
        max_attempts=int(raw_attempts),
        credentials=credentials,
    )


def s3_settings() -> S3Settings:
    """The S3 settings of this process's environment (resolved once per distinct environment)."""
    env = tuple(os.environ.get(k) for k in _SETTINGS_ENV)
    creds = "\0".join(os.environ.get(k, "") for k in _CREDENTIAL_ENV)
    fingerprint = hashlib.sha256(creds.encode()).hexdigest()[:16] if creds.strip("\0") else ""
    return _resolve_settings(env, fingerprint)


@functools.lru_cache(maxsize=256)
def _bucket_region(bucket: str) -> str | None:
    """The region AWS says ``bucket`` lives in (one HEAD per process), or None if unknown."""
    try:
        return str(pafs.resolve_s3_region(bucket))
    except Exception as e:  # no route to the global endpoint, odd bucket name, ...
        log.warning("could not look up the region of bucket %s: %s", bucket, _one_line(e))
        return None


class S3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem that travels to Ray workers as its settings.

    pyarrow pickles an S3FileSystem without its retry strategy; this one is rebuilt on the
    worker from the same ``S3Settings`` (and through that worker's filesystem cache).
    """

    def __init__(self, settings: S3Settings) -> None:
        super().__init__(**settings.pyarrow_kwargs())
        self.settings = settings

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray Data's own S3 wrapper calls __reduce__ directly; pickle calls __reduce_ex__.
        return (_cached_filesystem, (self.settings,))

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, ...]:
        return self.__reduce__()


_FILESYSTEMS: dict[S3Settings, S3FileSystem] = {}
_FS_LOCK = threading.Lock()


def _cached_filesystem(settings: S3Settings) -> S3FileSystem:
    """The process's one filesystem for ``settings`` (S3 clients are costly and thread-safe)."""
    with _FS_LOCK:
        fs = _FILESYSTEMS.get(settings)
        if fs is None:
            fs = _FILESYSTEMS[settings] = S3FileSystem(settings)
        return fs


def s3_filesystem(bucket: str = "") -> S3FileSystem:
    """This process's pyarrow S3 filesystem (for ``bucket``'s region on AWS when given)."""
    settings = s3_settings()
    if bucket and not settings.endpoint and os.environ.get(ENV_BUCKET_REGION, "1") != "0":
        region = _bucket_region(bucket)
        if region and region != settings.region:
            settings = replace(settings, region=region)
    return _cached_filesystem(settings)


class _RetryingReader:
    """A read-only, seekable file over an S3 object whose every read is ``retrying``.

    Readers such as Ray Data's Parquet reader fetch byte ranges long after the file was
    opened; the SDK retries each range a few times, this retries it for the whole budget.
    """

    def __init__(self, fs: pafs.FileSystem, path: str) -> None:
        self.uri = f"s3://{path}"
        self._file = retrying(fs.open_input_file, path, what=self.uri)
        self._size = int(self._file.size())
        self._pos = 0
        self.closed = False

    def _read_at(self, pos: int, n: int) -> bytes:
        data = self._file.read_at(n, pos)
        if len(data) != n:
            raise IncompleteReadError(f"read {len(data)} of {n} bytes at offset {pos}")
        return bytes(data)

    def read(self, n: int | None = -1) -> bytes:
        """Up to ``n`` bytes from the current position (all that is left if n < 0)."""
        left = self._size - self._pos
        n = left if n is None or n < 0 else min(n, left)
        data = retrying(self._read_at, self._pos, n, what=self.uri) if n > 0 else b""
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        """Move the position (whence as in ``io``)."""
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        """The current position."""
        return self._pos

    def readable(self) -> bool:
        """Always True."""
        return True

    def seekable(self) -> bool:
        """Always True."""
        return True

    def writable(self) -> bool:
        """Always False."""
        return False

    def close(self) -> None:
        """Close the underlying S3 file."""
        if not self.closed:
            self._file.close()
            self.closed = True


class RetryingS3Handler(pafs.FileSystemHandler):
    """pyarrow filesystem handler: S3 whose listings and reads retry transient errors.

    For readers that run inside Ray tasks (Ray Data's ``read_parquet``): wrapped in
    ``pyarrow.fs.PyFileSystem`` it pickles as its settings and rebuilds this process's cached
    S3 filesystem on the worker. Writes pass straight through.
    """

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings

    @property
    def fs(self) -> S3FileSystem:
        """This process's S3 filesystem for the settings."""
        return _cached_filesystem(self.settings)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RetryingS3Handler) and other.settings == self.settings

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(self.settings)

    def get_type_name(self) -> str:
        """Name pyarrow shows for this filesystem."""
        return "svg-ray-s3"

    def normalize_path(self, path: str) -> str:
        """As S3 normalises it."""
        return str(self.fs.normalize_path(path))

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        """File infos of ``paths`` (transient errors retried)."""
        return list(
            retrying(self.fs.get_file_info, paths, what=f"s3://{paths[0] if paths else ''}")
        )

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        """A listing (transient errors retried)."""
        return list(retrying(self.fs.get_file_info, selector, what=f"s3://{selector.base_dir}"))

    def open_input_file(self, path: str) -> Any:
        """A random-access file whose reads retry."""
        import pyarrow as pa

        return pa.PythonFile(_RetryingReader(self.fs, path), mode="r")

    def open_input_stream(self, path: str) -> Any:
        """A stream whose reads retry."""
        return self.open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any) -> Any:
        """Writes pass through to S3."""
        return self.fs.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata: Any) -> Any:
        """S3 cannot append (raises as pyarrow does)."""
        return self.fs.open_append_stream(path, metadata=metadata)

    def create_dir(self, path: str, recursive: bool) -> None:
        """As S3 does it."""
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        """As S3 does it."""
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        """As S3 does it."""
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        """Refused: that would empty every bucket."""
        raise OSError("refusing to delete the contents of every bucket")

    def delete_file(self, path: str) -> None:
        """As S3 does it."""
        self.fs.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        """As S3 does it."""
        self.fs.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        """As S3 does it."""
        self.fs.copy_file(src, dest)


def read_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for readers that run in Ray tasks (``ray.data.read_parquet``).

    On S3 every listing and byte-range read retries transient errors for the whole budget
    (``SVG_RAY_IO_RETRY_SECONDS``), on whichever worker it runs; local paths are unchanged.
    """
    fs, path = filesystem(uri)
    if isinstance(fs, S3FileSystem):
        return pafs.PyFileSystem(RetryingS3Handler(fs.settings)), path
    return fs, path


_BOTO3_CLIENTS: dict[S3Settings, Any] = {}


def s3_client() -> Any:
    """This process's boto3 S3 client, built from the same settings as ``s3_filesystem``."""
    settings = s3_settings()
    with _FS_LOCK:
        if settings not in _BOTO3_CLIENTS:
            import boto3

            # A fresh session reads AWS_CONFIG_FILE / AWS_PROFILE as they are now; boto3's
            # default session keeps whatever it saw first.
            session = boto3.session.Session()
            _BOTO3_CLIENTS[settings] = session.client("s3", **settings.boto3_kwargs())
        return _BOTO3_CLIENTS[settings]


# --------------------------------------------------------------------------------------------
# Paths and files
# --------------------------------------------------------------------------------------------


def is_s3(uri: str) -> bool:
    """True for ``s3://`` URIs."""
    return uri.startswith("s3://")


_LOCAL = pafs.LocalFileSystem()


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path or ``s3://bucket/key``."""
    if is_s3(uri):
        path = uri[len("s3://") :].rstrip("/")
        return s3_filesystem(path.split("/", 1)[0]), path
    return _LOCAL, str(Path(uri).expanduser().resolve())


def absolute(uri: str) -> str:
    """``s3://`` URIs unchanged; local paths made absolute (Ray workers run in other folders)."""
    return uri if is_s3(uri) or not uri else str(Path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with '/'."""
    out = uri.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def exists(uri: str) -> bool:
    """Whether a file or directory exists at ``uri``."""
    fs, path = filesystem(uri)
    info = retrying(fs.get_file_info, path, what=uri)
    return bool(info.type != pafs.FileType.NotFound)


def _read_all(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_file(path) as f:
        size = f.size()
        data = f.read()
    if len(data) != size:  # a body cut short must never pass for a (corrupt) file
        raise IncompleteReadError(f"read {len(data)} of {size} bytes")
    return bytes(data)


def read_bytes(uri: str) -> bytes:
    """Whole file as bytes (transient errors retried; a missing file: StorageNotFoundError)."""
    fs, path = filesystem(uri)
    return retrying(_read_all, fs, path, what=uri)


def _write_all(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:  # S3 PUT is atomic: a retry rewrites the object
        f.write(data)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file; on a local path via a temp file + rename, so readers never see half."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    retrying(_write_all, fs, path, data, what=uri)


def read_json(uri: str) -> Any:
    """Parse a JSON file."""
    return json.loads(read_bytes(uri))


def write_json(uri: str, obj: Any) -> None:
    """Write ``obj`` as indented JSON."""
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True).encode())


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files below ``uri`` (recursive) ending with ``suffix``, as full URIs/paths, sorted."""
    fs, path = filesystem(uri)
    if retrying(fs.get_file_info, path, what=uri).type == pafs.FileType.NotFound:
        return []
    selector = pafs.FileSelector(path, recursive=True)
    infos = retrying(fs.get_file_info, selector, what=uri)
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(
        prefix + i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)
    )


def download(uri: str, local: str | Path) -> Path:
    """Copy a remote file (or a local one) to ``local``; returns the local path."""
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(read_bytes(uri))
    return local
