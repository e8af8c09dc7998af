"""Storage against real HTTP: moto's S3 server on loopback, reached through a fault-injecting proxy.

Nothing in botocore is patched: retries, timeouts, checksums and multipart uploads run exactly as
against a real bucket, and the proxy's request log shows what went over the wire.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit
from urllib.request import urlopen

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from dia2_worker import storage as storage_module
from dia2_worker.env import WorkerConfigError
from dia2_worker.storage import (
    MIB,
    LocalStorage,
    S3Storage,
    Storage,
    StorageError,
    StorageSettings,
    StoredObject,
    make_storage,
)
from s3_server import Fault, FaultProxy, MotoServer, bucket_env

REPO = Path(__file__).resolve().parents[1]
LARGE = 11 * MIB  # three parts at the 5 MiB threshold the tests use


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch(url: str) -> bytes:
    with urlopen(url, timeout=10) as response:
        return response.read()


@pytest.fixture
def bucket(moto: MotoServer) -> str:
    return moto.create_bucket()


@pytest.fixture
def s3_storage(proxy: FaultProxy, bucket: str) -> Callable[..., Storage]:
    """Builds storage on `bucket` through the proxy; keywords override environment variables."""

    def build(**overrides: str) -> Storage:
        return make_storage(StorageSettings.from_env(bucket_env(proxy.url, bucket, **overrides)))

    return build


@pytest.fixture
def storage(s3_storage: Callable[..., Storage]) -> Storage:
    return s3_storage()


# --- S3: the happy paths -------------------------------------------------------------------------


def test_put_stores_the_bytes_and_returns_a_presigned_url_that_serves_them(
    storage: Storage, proxy: FaultProxy, moto: MotoServer, bucket: str
) -> None:
    data = payload(300_000)
    stored = storage.put("dia2/job-1.wav", data, presign_expiry_s=120)

    assert isinstance(storage, S3Storage)
    assert stored == StoredObject(
        url=stored.url, bucket=bucket, key="dia2/job-1.wav", sha256=sha256(data), size=len(data), attempts=1,
        location=f"s3://{bucket}/dia2/job-1.wav",
    )  # fmt: skip
    assert parse_qs(urlsplit(stored.url).query)["X-Amz-Expires"] == ["120"]
    with urlopen(stored.url, timeout=10) as response:
        assert response.read() == data
        assert response.headers["Content-Type"] == "audio/wav"
    head = moto.client().head_object(Bucket=bucket, Key="dia2/job-1.wav")
    assert head["Metadata"] == {"sha256": sha256(data)}
    # Look first (nothing there), upload, verify; then the client's GET.
    assert [request.operation for request in proxy.requests()] == ["HeadObject", "PutObject", "HeadObject", "GetObject"]


def test_presigned_urls_default_to_presign_expiry_s(s3_storage: Callable[..., Storage]) -> None:
    stored = s3_storage(PRESIGN_EXPIRY_S="900").put("a.wav", b"RIFF")
    assert parse_qs(urlsplit(stored.url).query)["X-Amz-Expires"] == ["900"]


def test_a_large_body_goes_up_in_parts_and_leaves_no_upload_open(
    storage: Storage, proxy: FaultProxy, moto: MotoServer, bucket: str
) -> None:
    data = payload(LARGE)
    stored = storage.put("big.wav", data)

    assert (stored.size, stored.sha256, stored.attempts) == (LARGE, sha256(data), 1)
    assert fetch(stored.url) == data
    assert [request.body_size for request in proxy.requests("UploadPart")] == [5 * MIB, 5 * MIB, 1 * MIB]
    assert [request.operation for request in proxy.requests() if request.operation != "UploadPart"] == [
        "HeadObject", "CreateMultipartUpload", "CompleteMultipartUpload", "HeadObject", "GetObject",
    ]  # fmt: skip
    client = moto.client()
    head = client.head_object(Bucket=bucket, Key="big.wav", ChecksumMode="ENABLED")
    # Composite (SHA-256 of the parts' SHA-256s), computed by moto from the parts it stored; S3
    # appends "-3", moto's HEAD does not.
    parts = [data[start : start + 5 * MIB] for start in range(0, LARGE, 5 * MIB)]
    composite = base64.b64encode(hashlib.sha256(b"".join(hashlib.sha256(part).digest() for part in parts)).digest())
    assert head["ChecksumSHA256"] in (composite.decode(), f"{composite.decode()}-3")
    assert "Uploads" not in client.list_multipart_uploads(Bucket=bucket)


@pytest.mark.parametrize("size", [300_000, LARGE], ids=["single", "multipart"])
def test_putting_the_same_bytes_again_uploads_nothing(storage: Storage, proxy: FaultProxy, size: int) -> None:
    data = payload(size)
    first = storage.put("again.wav", data)
    sent_before = len(proxy.requests())
    second = storage.put("again.wav", data)

    assert (second.sha256, second.size, second.attempts) == (first.sha256, first.size, 1)
    assert [request.operation for request in proxy.requests()[sent_before:]] == ["HeadObject"]
    assert fetch(second.url) == data


def test_different_bytes_overwrite_the_key(storage: Storage) -> None:
    storage.put("job.wav", payload(1000, seed=1))
    data = payload(1000, seed=2)
    stored = storage.put("job.wav", data)
    assert stored.sha256 == sha256(data)
    assert fetch(stored.url) == data


# --- S3: retries ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code"), [(503, "SlowDown"), (500, "InternalError"), (429, "TooManyRequests"), (400, "RequestTimeout")]
)
def test_throttling_and_server_errors_are_retried(
    storage: Storage, proxy: FaultProxy, status: int, code: str, caplog: pytest.LogCaptureFixture
) -> None:
    proxy.inject(Fault("error", "PutObject", times=2, status=status, code=code))
    data = payload(5000)
    stored = storage.put("retry.wav", data)

    assert stored.attempts == 3
    assert fetch(stored.url) == data
    assert [request.status for request in proxy.requests("PutObject")] == [status, status, 200]
    warnings = [
        record.getMessage()
        for record in caplog.records
        if record.name == "dia2_worker.storage" and record.levelno == logging.WARNING
    ]
    assert len(warnings) == 2
    for number, warning in enumerate(warnings, start=1):
        assert f"failed (attempt {number} of 3), retrying in" in warning
        assert code in warning


def test_throttled_heads_are_retried_too(storage: Storage, proxy: FaultProxy) -> None:
    proxy.inject(Fault("error", "HeadObject", status=503))  # HEAD errors have no body, only a status
    assert storage.put("head.wav", b"RIFF").attempts == 2


@pytest.mark.parametrize("action", ["drop", "lose_response"])
def test_lost_connections_are_retried_without_uploading_twice(storage: Storage, proxy: FaultProxy, action: str) -> None:
    proxy.inject(Fault(action, "PutObject"))  # type: ignore[arg-type]
    data = payload(5000)
    stored = storage.put("lost.wav", data)

    assert stored.attempts == 2
    assert fetch(stored.url) == data
    # A lost response means the first PUT landed: the second attempt finds the bytes and keeps them.
    assert len(proxy.requests("PutObject")) == (2 if action == "drop" else 1)


def test_read_timeouts_are_retried(s3_storage: Callable[..., Storage], proxy: FaultProxy) -> None:
    storage = s3_storage(BUCKET_READ_TIMEOUT_S="0.3")
    proxy.inject(Fault("stall", "PutObject", stall_s=2.0))
    stored = storage.put("slow.wav", b"RIFF")

    assert stored.attempts == 2  # gave up on the stalled request (answered after 2 s) after the read timeout


def test_a_multipart_attempt_that_fails_is_aborted_and_retried(
    storage: Storage, proxy: FaultProxy, moto: MotoServer, bucket: str
) -> None:
    proxy.inject(Fault("error", "UploadPart", skip=1, status=500, code="InternalError"))
    data = payload(LARGE)
    stored = storage.put("big.wav", data)

    assert stored.attempts == 2
    assert fetch(stored.url) == data
    assert len(proxy.requests("CreateMultipartUpload")) == 2
    assert len(proxy.requests("AbortMultipartUpload")) == 1
    assert "Uploads" not in moto.client().list_multipart_uploads(Bucket=bucket)


# --- S3: giving up -------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "code"), [(403, "AccessDenied"), (400, "InvalidArgument"), (404, "NoSuchKey")])
def test_client_errors_fail_at_once(storage: Storage, proxy: FaultProxy, bucket: str, status: int, code: str) -> None:
    proxy.inject(Fault("error", "PutObject", status=status, code=code))
    with pytest.raises(StorageError) as caught:
        storage.put("denied.wav", b"RIFF")

    assert caught.value.attempts == 1
    assert str(caught.value) == (
        f"upload of s3://{bucket}/denied.wav failed after 1 attempt: "
        f"PutObject returned HTTP {status} {code}: Injected by FaultProxy"
    )
    assert isinstance(caught.value.cause, ClientError)
    assert len(proxy.requests("PutObject")) == 1


def test_a_forbidden_look_before_the_upload_does_not_stop_it(storage: Storage, proxy: FaultProxy) -> None:
    """S3 answers 403 to a HEAD of a missing key when the credentials may not list the bucket."""
    proxy.inject(Fault("error", "HeadObject", status=403, code="AccessDenied"))
    stored = storage.put("new.wav", b"RIFF")
    assert stored.attempts == 1
    assert [request.status for request in proxy.requests()] == [403, 200, 200]


def test_a_forbidden_verification_fails_at_once(storage: Storage, proxy: FaultProxy, bucket: str) -> None:
    proxy.inject(Fault("error", "HeadObject", skip=1, status=403, code="AccessDenied"))
    with pytest.raises(StorageError) as caught:
        storage.put("new.wav", b"RIFF")
    assert str(caught.value) == (
        f"upload of s3://{bucket}/new.wav failed after 1 attempt: HeadObject returned HTTP 403: Forbidden"
    )
    assert caught.value.attempts == 1


def test_a_missing_bucket_fails_at_once(proxy: FaultProxy) -> None:
    storage = make_storage(StorageSettings.from_env(bucket_env(proxy.url, "no-such-bucket")))
    with pytest.raises(StorageError) as caught:
        storage.put("a.wav", b"RIFF")
    assert "failed after 1 attempt: PutObject returned HTTP 404 NoSuchBucket" in str(caught.value)
    assert caught.value.attempts == 1


def test_persistent_throttling_gives_up_after_max_attempts(storage: Storage, proxy: FaultProxy, bucket: str) -> None:
    proxy.inject(Fault("error", "PutObject", times=100))
    with pytest.raises(StorageError) as caught:
        storage.put("busy.wav", b"RIFF")

    assert caught.value.attempts == 3
    assert str(caught.value).startswith(
        f"upload of s3://{bucket}/busy.wav failed after 3 attempts: PutObject returned HTTP 503 SlowDown"
    )
    assert len(proxy.requests("PutObject")) == 3


def test_an_unreachable_server_fails_after_bounded_attempts_and_time(bucket: str, monkeypatch) -> None:
    with socket.socket() as probe:  # a port nothing listens on: connections are refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = bucket_env(f"http://127.0.0.1:{port}", bucket, UPLOAD_MAX_ATTEMPTS="4")
    storage = make_storage(StorageSettings.from_env(env))
    slept: list[float] = []  # refused connections fail at once: the backoff is all the time there is
    monkeypatch.setattr(storage_module, "time", SimpleNamespace(monotonic=time.monotonic, sleep=slept.append))
    with pytest.raises(StorageError, match="failed after 4 attempts: EndpointConnectionError") as caught:
        storage.put("a.wav", b"RIFF")

    assert len(slept) == 3 and all(0 <= s <= 0.01 for s in slept)  # UPLOAD_BACKOFF_MAX_S
    assert caught.value.attempts == 4
    assert isinstance(caught.value.cause, EndpointConnectionError)


def test_a_multipart_upload_that_fails_for_good_is_aborted(
    storage: Storage, proxy: FaultProxy, moto: MotoServer, bucket: str
) -> None:
    proxy.inject(Fault("error", "UploadPart", skip=1, status=403, code="AccessDenied"))
    with pytest.raises(StorageError, match="UploadPart returned HTTP 403 AccessDenied"):
        storage.put("big.wav", payload(LARGE))

    assert len(proxy.requests("AbortMultipartUpload")) == 1
    client = moto.client()
    assert "Uploads" not in client.list_multipart_uploads(Bucket=bucket)
    assert "Contents" not in client.list_objects_v2(Bucket=bucket)


# --- S3: integrity -------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "operation"), [(300_000, "PutObject"), (LARGE, "UploadPart")])
def test_bytes_corrupted_in_transit_are_caught_and_sent_again(
    storage: Storage, proxy: FaultProxy, size: int, operation: str
) -> None:
    """moto stores whatever arrives, so only verification after the upload can notice."""
    proxy.inject(Fault("corrupt", operation))
    data = payload(size)
    stored = storage.put("flipped.wav", data)

    assert stored.attempts == 2
    assert fetch(stored.url) == data


def test_persistent_corruption_fails_with_the_reason(storage: Storage, proxy: FaultProxy) -> None:
    proxy.inject(Fault("corrupt", "PutObject", times=100))
    data = payload(1000)
    with pytest.raises(StorageError) as caught:
        storage.put("flipped.wav", data)

    assert caught.value.attempts == 3
    assert "failed after 3 attempts: stored object does not match the upload: ETag" in str(caught.value)
    assert f"is not the MD5 of the bytes sent, {hashlib.md5(data).hexdigest()}" in str(caught.value)


def test_a_corrupt_object_is_deleted_when_verification_fails(
    storage: Storage, proxy: FaultProxy, moto: MotoServer, bucket: str
) -> None:
    """A store that does not check Content-MD5 keeps a flipped byte; no reader may get that object."""
    proxy.inject(Fault("corrupt", "PutObject", times=100))
    with pytest.raises(StorageError):
        storage.put("flipped.wav", payload(1000))
    assert len(proxy.requests("DeleteObject")) == 3  # after each failed verification
    with pytest.raises(ClientError) as caught:
        moto.client().head_object(Bucket=bucket, Key="flipped.wav")
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


def test_no_attempt_starts_after_the_deadline(storage: Storage, proxy: FaultProxy) -> None:
    proxy.inject(Fault("error", "PutObject", status=503, times=100))
    with pytest.raises(StorageError, match="failed after 1 attempt, out of time"):
        storage.put("late.wav", payload(1000), deadline=time.monotonic())
    assert len(proxy.requests("PutObject")) == 1


def test_an_object_claiming_our_sha256_but_holding_other_bytes_is_replaced(
    storage: Storage, proxy: FaultProxy, moto: MotoServer, bucket: str
) -> None:
    data = payload(1000)
    forged = bytearray(data)
    forged[500] ^= 1  # same size, same metadata: only the bytes differ
    moto.client().put_object(Bucket=bucket, Key="forged.wav", Body=bytes(forged), Metadata={"sha256": sha256(data)})
    stored = storage.put("forged.wav", data)

    assert len(proxy.requests("PutObject")) == 1
    assert fetch(stored.url) == data


# --- arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["", "/abs.wav", "a/../b.wav", "..", "a//b.wav", "./a.wav", "dir/", "bad\nkey.wav", "del\x7f.wav", "\ud800.wav",
     "k" * 1025, "é" * 513],
)  # fmt: skip
def test_bad_keys_are_refused(tmp_path: Path, key: str) -> None:
    storage = make_storage(StorageSettings.from_env({"OUTPUT_DIR": str(tmp_path)}))
    with pytest.raises(ValueError, match="invalid object key"):
        storage.put(key, b"RIFF")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("expiry", [0, 604_801, 1.5, True])
def test_bad_presign_expiries_are_refused(tmp_path: Path, expiry: object) -> None:
    storage = make_storage(StorageSettings.from_env({"OUTPUT_DIR": str(tmp_path)}))
    with pytest.raises(ValueError, match="presign_expiry_s: must be an integer between 1 and 604800"):
        storage.put("a.wav", b"RIFF", presign_expiry_s=expiry)  # type: ignore[arg-type]


def test_key_for_joins_the_prefix_and_the_job_id(tmp_path: Path) -> None:
    storage = make_storage(StorageSettings.from_env({"OUTPUT_DIR": str(tmp_path)}))
    assert storage.key_for("job-1") == "dia2/job-1.wav"
    assert storage.key_for("job-1", "customer/a/") == "customer/a/job-1.wav"
    assert storage.key_for("job-1", "") == "job-1.wav"
    with pytest.raises(ValueError, match="invalid object key"):
        storage.key_for("../job-1")


# --- local storage -------------------------------------------------------------------------------


def test_local_put_writes_the_file_and_returns_a_file_url(tmp_path: Path) -> None:
    storage = make_storage(StorageSettings.from_env({"OUTPUT_DIR": str(tmp_path / "out")}))
    data = payload(5000)
    stored = storage.put(storage.key_for("job-1"), data)

    path = tmp_path / "out" / "dia2" / "job-1.wav"
    assert isinstance(storage, LocalStorage)
    assert stored == StoredObject(
        url=path.as_uri(), bucket=None, key="dia2/job-1.wav", sha256=sha256(data), size=len(data), attempts=1,
        location=str(path),
    )  # fmt: skip
    assert fetch(stored.url) == data
    newer = payload(7000, seed=1)
    assert storage.put("dia2/job-1.wav", newer).sha256 == sha256(newer)
    assert path.read_bytes() == newer
    assert os.listdir(path.parent) == ["job-1.wav"]  # no temporary files left behind


def test_a_failed_local_write_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = make_storage(StorageSettings.from_env({"OUTPUT_DIR": str(tmp_path)}))
    storage.put("a.wav", b"old")

    def full_disk(descriptor: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(StorageError, match=r"write of .*a\.wav failed: \[Errno 28\] No space left") as caught:
        storage.put("a.wav", b"new")

    assert caught.value.attempts == 1
    assert (tmp_path / "a.wav").read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.wav"]


def test_local_mode_never_imports_boto3(tmp_path: Path) -> None:
    """boto3 costs about 0.3 s of cold start; only S3 mode may pay it."""
    code = (
        "import sys\n"
        "from dia2_worker.storage import StorageSettings, make_storage\n"
        "make_storage(StorageSettings.from_env({'OUTPUT_DIR': sys.argv[1]})).put('a.wav', b'RIFF')\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in ('boto3', 'botocore')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"
    assert (tmp_path / "a.wav").read_bytes() == b"RIFF"


# --- settings ------------------------------------------------------------------------------------


def test_no_bucket_means_local_storage_under_output_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    settings = StorageSettings.from_env({})
    assert settings.bucket is None
    assert settings.output_dir == tmp_path / "output"
    assert settings.key_prefix == "dia2"
    assert settings.describe() == f"local directory {tmp_path / 'output'}, key prefix dia2/"


def test_every_variable_is_read() -> None:
    settings = StorageSettings.from_env(
        {
            "BUCKET_ENDPOINT_URL": "https://r2.example.com/", "BUCKET_NAME": "outputs",
            "BUCKET_ACCESS_KEY_ID": "AKIDEXAMPLE", "BUCKET_SECRET_ACCESS_KEY": "s3cr3t/KEY",
            "BUCKET_REGION": "auto", "BUCKET_KEY_PREFIX": "/tts/dia2/", "BUCKET_ADDRESSING_STYLE": "Virtual",
            "PRESIGN_EXPIRY_S": "600", "UPLOAD_MAX_ATTEMPTS": "7", "UPLOAD_BACKOFF_BASE_S": "0.25",
            "UPLOAD_BACKOFF_MAX_S": "4", "MULTIPART_THRESHOLD_BYTES": str(16 * MIB),
            "BUCKET_CONNECT_TIMEOUT_S": "2.5", "BUCKET_READ_TIMEOUT_S": "45", "OUTPUT_DIR": "/data/out",
        }
    )  # fmt: skip
    assert settings == StorageSettings(
        bucket="outputs", endpoint_url="https://r2.example.com", access_key_id="AKIDEXAMPLE",
        secret_access_key="s3cr3t/KEY", region="auto", key_prefix="tts/dia2", addressing_style="virtual",
        presign_expiry_s=600, max_attempts=7, backoff_base_s=0.25, backoff_max_s=4.0,
        multipart_threshold_bytes=16 * MIB, connect_timeout_s=2.5, read_timeout_s=45.0, output_dir=Path("/data/out"),
    )  # fmt: skip
    summary = settings.describe()
    assert summary.startswith("s3 bucket outputs at https://r2.example.com (region auto, virtual addressing")
    for secret in ("AKIDEXAMPLE", "s3cr3t"):
        assert secret not in summary
        assert secret not in repr(settings)


def test_the_bucket_may_be_the_endpoint_path() -> None:
    settings = StorageSettings.from_env({"BUCKET_ENDPOINT_URL": "http://minio:9000/outputs"})
    assert (settings.endpoint_url, settings.bucket) == ("http://minio:9000", "outputs")
    assert settings.access_key_id is None  # boto3's default credential chain applies


def test_a_bucket_without_endpoint_is_on_aws() -> None:
    settings = StorageSettings.from_env({"BUCKET_NAME": "outputs", "BUCKET_REGION": "eu-west-1"})
    assert (settings.endpoint_url, settings.bucket, settings.region) == (None, "outputs", "eu-west-1")


def test_blank_values_keep_the_defaults_and_a_slash_prefix_means_the_root() -> None:
    settings = StorageSettings.from_env({"BUCKET_NAME": " ", "UPLOAD_MAX_ATTEMPTS": "", "BUCKET_KEY_PREFIX": "/"})
    assert (settings.bucket, settings.max_attempts, settings.key_prefix) == (None, 5, "")


VALID = {"BUCKET_NAME": "outputs"}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"UPLOAD_MAX_ATTEMPTS": "0"}, "UPLOAD_MAX_ATTEMPTS: must be an integer between 1 and 20, got '0'"),
        ({"UPLOAD_MAX_ATTEMPTS": "2.5"}, "UPLOAD_MAX_ATTEMPTS: must be an integer between 1 and 20, got '2.5'"),
        ({"PRESIGN_EXPIRY_S": "604801"}, "PRESIGN_EXPIRY_S: must be an integer between 1 and 604800, got '604801'"),
        ({"PRESIGN_EXPIRY_S": "1h"}, "PRESIGN_EXPIRY_S: must be an integer between 1 and 604800, got '1h'"),
        (
            {"MULTIPART_THRESHOLD_BYTES": "1048576"},
            "MULTIPART_THRESHOLD_BYTES: must be an integer between 5242880 and 5368709120 "
            "(5 MiB to 5 GiB: S3's smallest part and largest single PUT), got '1048576'",
        ),
        ({"BUCKET_READ_TIMEOUT_S": "nan"}, "BUCKET_READ_TIMEOUT_S: must be a number between 0.1 and 900, got 'nan'"),
        ({"BUCKET_CONNECT_TIMEOUT_S": "0"}, "BUCKET_CONNECT_TIMEOUT_S: must be a number between 0.1 and 300, got '0'"),
        (
            {"UPLOAD_BACKOFF_MAX_S": "0.1"},
            "UPLOAD_BACKOFF_MAX_S: must be a number between 0.5 and 300 (at least UPLOAD_BACKOFF_BASE_S), got '0.1'",
        ),
        ({"UPLOAD_BACKOFF_BASE_S": "-1"}, "UPLOAD_BACKOFF_BASE_S: must be a number between 0 and 60, got '-1'"),
        ({"BUCKET_ADDRESSING_STYLE": "sideways"}, "BUCKET_ADDRESSING_STYLE: must be one of path, virtual, auto"),
        ({"BUCKET_REGION": "us east"}, "BUCKET_REGION: must be a region name"),
        ({"BUCKET_KEY_PREFIX": "a/../b"}, "BUCKET_KEY_PREFIX: invalid object key 'a/../b'"),
        ({"BUCKET_NAME": "s3://outputs"}, "BUCKET_NAME: must be a bucket name"),
        ({"BUCKET_ENDPOINT_URL": "ftp://host"}, "BUCKET_ENDPOINT_URL: must be an http(s) URL"),
        ({"BUCKET_ENDPOINT_URL": "https://host/outputs/dir"}, "BUCKET_ENDPOINT_URL: must be an http(s) URL"),
        ({"BUCKET_ENDPOINT_URL": "https://host:99999"}, "BUCKET_ENDPOINT_URL: must be an http(s) URL"),
        ({"BUCKET_ENDPOINT_URL": "https://host/other"}, "BUCKET_NAME: 'outputs' differs from the bucket in"),
        ({"BUCKET_ACCESS_KEY_ID": "AKID"}, "BUCKET_SECRET_ACCESS_KEY: required"),
        ({"BUCKET_SECRET_ACCESS_KEY": "secret"}, "BUCKET_ACCESS_KEY_ID: required"),
    ],
)
def test_bad_values_name_the_variable_and_what_it_accepts(env: dict[str, str], message: str) -> None:
    with pytest.raises(WorkerConfigError) as caught:
        StorageSettings.from_env({**VALID, **env})
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BUCKET_ENDPOINT_URL": "https://host"}, "BUCKET_NAME: required when BUCKET_ENDPOINT_URL is set"),
        (
            {"BUCKET_ACCESS_KEY_ID": "AKID", "BUCKET_SECRET_ACCESS_KEY": "secret"},
            "BUCKET_NAME: required when bucket credentials are set",
        ),
    ],
)
def test_a_bucket_is_required_where_one_is_implied(env: dict[str, str], message: str) -> None:
    with pytest.raises(WorkerConfigError, match=f"^{message}"):
        StorageSettings.from_env(env)


def test_an_endpoint_with_credentials_is_refused_without_echoing_them() -> None:
    with pytest.raises(WorkerConfigError, match=r"^BUCKET_ENDPOINT_URL: must not contain credentials") as caught:
        StorageSettings.from_env({"BUCKET_ENDPOINT_URL": "https://key:hunter2@host/outputs"})
    assert "hunter2" not in str(caught.value)
