"""Where finished audio goes: an S3-compatible bucket (returned as a presigned GET URL) or a local directory.

`StorageSettings.from_env` reads the configuration, `make_storage` picks the backend and
`Storage.put` stores one object and says where it is, with its SHA-256.

S3 uploads are safe to repeat and checked end to end:

- Idempotent: each attempt first HEADs the key. An object with the same size, the same SHA-256
  (in our `x-amz-meta-sha256`) and matching checksums is kept and only presigned, so a retry after
  a lost response, or a retried job that regenerates identical bytes, does not upload twice.
  Different bytes overwrite.
- Verified in transit: every PUT / UploadPart carries Content-MD5 and x-amz-checksum-sha256, which
  S3, R2 and MinIO check against the bytes they receive (a mismatch is a BadDigest error).
- Verified at rest: after the upload a HEAD (checksum mode on) must show the size, our SHA-256
  metadata, the SHA-256 checksum the server stored (composite "<b64>-<parts>" after multipart),
  and, for single-request uploads, an ETag equal to the MD5 of the bytes. S3 documents that ETag
  for objects that are not SSE-KMS / SSE-C encrypted, so it is skipped for those; multipart ETags
  are opaque (MinIO and others compute them differently) and never compared. moto stores the
  checksum header without checking it, so against moto the ETag and the composite checksum are
  what catch corrupted bytes.
- Retried: throttling (429, SlowDown and friends), 5xx, corrupted-in-transit errors, failed
  verification, connection errors and timeouts are retried with full-jitter exponential backoff;
  any other client error (AccessDenied, NoSuchBucket, ...) fails at once. One attempt is the whole
  sequence HEAD, upload, HEAD; botocore's own retries are off so that `attempts` counts every try
  and the worst case is bounded by UPLOAD_MAX_ATTEMPTS x the request timeouts plus at most
  (UPLOAD_MAX_ATTEMPTS - 1) x UPLOAD_BACKOFF_MAX_S of sleep. A failed multipart attempt aborts its
  upload so no parts are left behind.

boto3 is imported by `S3Storage` only: it costs about 0.3 s of cold start, and local mode never
needs it.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import random
import re
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from .env import Range, WorkerConfigError, env_number, env_text

if TYPE_CHECKING:
    from botocore.exceptions import ClientError

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
MIN_PART_BYTES = 5 * MIB
"""S3's smallest part: every part of a multipart upload but the last must be at least this big."""
MAX_SINGLE_PUT_BYTES = 5 * 1024 * MIB
"""S3's largest single PUT, and largest part."""
MAX_PARTS = 10_000
MAX_PRESIGN_EXPIRY_S = 604_800
"""SigV4 presigned URLs live at most 7 days."""
MAX_KEY_BYTES = 1024
"""S3's limit on a key, in UTF-8 bytes."""
ADDRESSING_STYLES = ("path", "virtual", "auto")
SHA256_METADATA = "sha256"
"""User-metadata name (x-amz-meta-sha256) holding the hex SHA-256 of the object."""

_RETRYABLE_CODES = frozenset(
    {
        # Throttling, whatever status it comes with.
        "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
        "RequestThrottledException", "TooManyRequests", "TooManyRequestsException",
        "RequestLimitExceeded", "BandwidthLimitExceeded", "ProvisionedThroughputExceededException",
        # 400s that mean the request, not the caller, went wrong: slow or corrupted in transit.
        "RequestTimeout", "RequestTimeoutException", "IncompleteBody", "BadDigest",
        "XAmzContentSHA256Mismatch", "XAmzContentChecksumMismatch",
    }
)  # fmt: skip
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_BUCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]")
_REGION = re.compile(r"[A-Za-z0-9-]{1,64}")
_MD5_ETAG = re.compile(r"[0-9a-f]{32}")

N = TypeVar("N", int, float)


class StorageError(Exception):
    """Storing an object failed for good; `attempts` were made and `cause` is the last error."""

    def __init__(self, message: str, *, attempts: int, cause: BaseException) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.cause = cause


class _IntegrityError(Exception):
    """The stored object is not what was sent; retried like a transient error."""


@dataclass(frozen=True)
class StoredObject:
    """Where `put` stored the bytes, and proof of which bytes they are."""

    url: str
    """Presigned GET URL (S3) or absolute file:// URL (local)."""
    bucket: str | None
    """None for local storage."""
    key: str
    sha256: str
    """Hex SHA-256 of the bytes stored."""
    size: int
    attempts: int
    """Tries it took; 1 when nothing had to be retried."""
    location: str
    """s3://bucket/key, or the local file path."""


@dataclass(frozen=True)
class StorageSettings:
    """Where and how to store outputs. Build it with `from_env`, which checks every value."""

    bucket: str | None = None
    """BUCKET_NAME (or the endpoint URL's path); None means local storage."""
    endpoint_url: str | None = None
    """BUCKET_ENDPOINT_URL without the bucket path; None means AWS S3's endpoint for the region."""
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    region: str = "us-east-1"
    key_prefix: str = "dia2"
    """Folder for job outputs, without surrounding slashes; "" puts them at the bucket root."""
    addressing_style: str = "path"
    presign_expiry_s: int = 3600
    max_attempts: int = 5
    backoff_base_s: float = 0.5
    backoff_max_s: float = 8.0
    multipart_threshold_bytes: int = 8 * MIB
    """Bodies larger than this are uploaded in parts of (at least) this size."""
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    output_dir: Path = Path("output")
    """Absolute after `from_env`."""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> StorageSettings:
        """Read the settings from environment variables; unset or blank ones keep their defaults.

        BUCKET_KEY_PREFIX=/ puts outputs at the bucket root (blank keeps the default).

        A bucket is used when BUCKET_ENDPOINT_URL or BUCKET_NAME is set. Without BUCKET_NAME the
        bucket is the endpoint URL's path (https://host/bucket); with both, they must agree.
        Without an endpoint the bucket is on AWS S3. The access key pair is all-or-nothing; with
        neither, boto3's default credential chain (AWS_* variables, instance role) applies.
        Raises `WorkerConfigError` naming the variable and what it accepts.
        """
        endpoint_url, path_bucket = _endpoint(env_text(env, "BUCKET_ENDPOINT_URL"))
        bucket = _bucket(env_text(env, "BUCKET_NAME"), path_bucket, endpoint_url)
        access_key_id = env_text(env, "BUCKET_ACCESS_KEY_ID")
        secret_access_key = env_text(env, "BUCKET_SECRET_ACCESS_KEY")
        if (access_key_id is None) != (secret_access_key is None):
            missing = "BUCKET_SECRET_ACCESS_KEY" if secret_access_key is None else "BUCKET_ACCESS_KEY_ID"
            raise WorkerConfigError(f"{missing}: required, as the other half of the bucket access key pair")
        if access_key_id is not None and bucket is None:
            raise WorkerConfigError(
                "BUCKET_NAME: required when bucket credentials are set (or set BUCKET_ENDPOINT_URL "
                "to https://host/bucket); without a bucket, outputs would silently go to OUTPUT_DIR"
            )
        backoff_base_s = _number(env, "UPLOAD_BACKOFF_BASE_S", cls.backoff_base_s, 0.0, 60.0)
        return cls(
            bucket=bucket,
            endpoint_url=endpoint_url,
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
            region=_region(env_text(env, "BUCKET_REGION") or cls.region),
            key_prefix=_key_prefix(env_text(env, "BUCKET_KEY_PREFIX") or cls.key_prefix),
            addressing_style=_addressing_style(env_text(env, "BUCKET_ADDRESSING_STYLE") or cls.addressing_style),
            presign_expiry_s=_number(env, "PRESIGN_EXPIRY_S", cls.presign_expiry_s, 1, MAX_PRESIGN_EXPIRY_S),
            max_attempts=_number(env, "UPLOAD_MAX_ATTEMPTS", cls.max_attempts, 1, 20),
            backoff_base_s=backoff_base_s,
            backoff_max_s=_number(
                env, "UPLOAD_BACKOFF_MAX_S", max(cls.backoff_max_s, backoff_base_s), backoff_base_s, 300.0,
                " (at least UPLOAD_BACKOFF_BASE_S)",
            ),
            multipart_threshold_bytes=_number(
                env, "MULTIPART_THRESHOLD_BYTES", cls.multipart_threshold_bytes, MIN_PART_BYTES,
                MAX_SINGLE_PUT_BYTES, " (5 MiB to 5 GiB: S3's smallest part and largest single PUT)",
            ),
            connect_timeout_s=_number(env, "BUCKET_CONNECT_TIMEOUT_S", cls.connect_timeout_s, 0.1, 300.0),
            read_timeout_s=_number(env, "BUCKET_READ_TIMEOUT_S", cls.read_timeout_s, 0.1, 900.0),
            output_dir=Path(env_text(env, "OUTPUT_DIR") or cls.output_dir).expanduser().absolute(),
        )  # fmt: skip

    def describe(self) -> str:
        """A one-line summary for logs: no credentials, only whether they are set."""
        prefix = f"key prefix {self.key_prefix + '/' if self.key_prefix else '(none)'}"
        if self.bucket is None:
            return f"local directory {self.output_dir}, {prefix}"
        credentials = "access key from BUCKET_ACCESS_KEY_ID" if self.access_key_id else "default AWS credentials"
        return (
            f"s3 bucket {self.bucket} at {self.endpoint_url or 'AWS S3'} (region {self.region}, "
            f"{self.addressing_style} addressing, {credentials}), {prefix}, "
            f"presigned URLs valid {self.presign_expiry_s} s, up to {self.max_attempts} attempts "
            f"(backoff {self.backoff_base_s:g}-{self.backoff_max_s:g} s), multipart above "
            f"{self.multipart_threshold_bytes} bytes, timeouts connect {self.connect_timeout_s:g} s "
            f"read {self.read_timeout_s:g} s"
        )


def _number(env: Mapping[str, str], name: str, default: N, lo: N, hi: N, note: str = "") -> N:
    """The variable as a number of `default`'s type within [lo, hi]."""
    return env_number(env, name, type(default), Range(lo, hi), default, note)


def _endpoint(text: str | None) -> tuple[str | None, str | None]:
    """BUCKET_ENDPOINT_URL split into the endpoint and the bucket its path names, if any."""
    if text is None:
        return None, None
    parts = urlsplit(text)
    if parts.username is not None or parts.password is not None:  # never echo the URL: it holds a secret
        raise WorkerConfigError(
            "BUCKET_ENDPOINT_URL: must not contain credentials; use BUCKET_ACCESS_KEY_ID and BUCKET_SECRET_ACCESS_KEY"
        )
    try:
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a port that is not a number, or out of range
        valid = False
    bucket = parts.path.strip("/")
    if not valid or parts.query or parts.fragment or "/" in bucket:
        raise WorkerConfigError(
            f"BUCKET_ENDPOINT_URL: must be an http(s) URL such as https://host[:port] or "
            f"https://host[:port]/bucket, without query or fragment, got {text!r}"
        )
    return f"{parts.scheme}://{parts.netloc}", bucket or None


def _bucket(name: str | None, path_bucket: str | None, endpoint_url: str | None) -> str | None:
    if name is not None and path_bucket is not None and name != path_bucket:
        raise WorkerConfigError(
            f"BUCKET_NAME: {name!r} differs from the bucket in BUCKET_ENDPOINT_URL's path, {path_bucket!r}"
        )
    bucket = name or path_bucket
    if bucket is None and endpoint_url is not None:
        raise WorkerConfigError(
            "BUCKET_NAME: required when BUCKET_ENDPOINT_URL is set (or give the endpoint as https://host/bucket)"
        )
    if bucket is not None and not _BUCKET_NAME.fullmatch(bucket):
        raise WorkerConfigError(
            f"BUCKET_NAME: must be a bucket name, 3 to 255 letters, digits, '.', '-' or '_', "
            f"starting and ending with a letter or digit, got {bucket!r}"
        )
    return bucket


def _region(text: str) -> str:
    if not _REGION.fullmatch(text):
        raise WorkerConfigError(f"BUCKET_REGION: must be a region name such as us-east-1 or auto, got {text!r}")
    return text


def _addressing_style(text: str) -> str:
    if text.lower() not in ADDRESSING_STYLES:
        raise WorkerConfigError(f"BUCKET_ADDRESSING_STYLE: must be one of {', '.join(ADDRESSING_STYLES)}, got {text!r}")
    return text.lower()


def _key_prefix(text: str) -> str:
    prefix = text.strip("/")
    if prefix:
        try:
            validate_key(prefix)
        except ValueError as error:
            raise WorkerConfigError(f"BUCKET_KEY_PREFIX: {error}") from None
    return prefix


def validate_key(key: str) -> str:
    """Return `key` when both backends store it as is; otherwise raise ValueError saying why.

    Path segments may not be empty, "." or "..": the local backend turns keys into paths, and
    the same key must name the same object everywhere.
    """
    problem = _key_problem(key)
    if problem is not None:
        raise ValueError(f"invalid object key {key!r}: {problem}")
    return key


def _key_problem(key: str) -> str | None:
    if not isinstance(key, str) or not key:
        return "must be a non-empty string"
    if _CONTROL_CHARS.search(key):
        return "must not contain control characters"
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        return "must be valid Unicode (no lone surrogates)"
    if size > MAX_KEY_BYTES:
        return f"must be at most {MAX_KEY_BYTES} bytes in UTF-8, got {size}"
    if key.startswith("/"):
        return 'must not start with "/"'
    if any(segment in ("", ".", "..") for segment in key.split("/")):
        return 'must not contain empty, "." or ".." path segments'
    return None


class Storage(ABC):
    """A place for finished audio. `put` is thread-safe: concurrent jobs may share one instance."""

    def __init__(self, settings: StorageSettings) -> None:
        self.settings = settings

    def key_for(self, job_id: str, key_prefix: str | None = None, suffix: str = ".wav") -> str:
        """The key for a job's output: `<prefix>/<job_id><suffix>`, the prefix defaulting to BUCKET_KEY_PREFIX."""
        prefix = (self.settings.key_prefix if key_prefix is None else key_prefix).strip("/")
        return validate_key(f"{prefix}/{job_id}{suffix}" if prefix else f"{job_id}{suffix}")

    def put(
        self, key: str, data: bytes, *, content_type: str = "audio/wav", presign_expiry_s: int | None = None,
        deadline: float | None = None,
    ) -> StoredObject:
        """Store `data` under `key` (overwriting other bytes there) and say where it is.

        `presign_expiry_s` (default PRESIGN_EXPIRY_S) is the presigned URL's lifetime; local
        file URLs do not expire. No attempt starts after `deadline` (on time.monotonic()), and a
        backoff never sleeps past it. Raises ValueError for a bad key or expiry, StorageError when
        storing fails.
        """
        validate_key(key)
        expiry = self.settings.presign_expiry_s if presign_expiry_s is None else presign_expiry_s
        if isinstance(expiry, bool) or not isinstance(expiry, int) or not 1 <= expiry <= MAX_PRESIGN_EXPIRY_S:
            raise ValueError(
                f"presign_expiry_s: must be an integer between 1 and {MAX_PRESIGN_EXPIRY_S}, got {expiry!r}"
            )
        return self._store(key, data, hashlib.sha256(data).digest(), content_type, expiry, deadline)

    @abstractmethod
    def _store(self, key: str, data: bytes, sha256: bytes, content_type: str, presign_expiry_s: int,
               deadline: float | None) -> StoredObject:
        """Store checked arguments; `sha256` is the digest of `data`."""


def make_storage(settings: StorageSettings) -> Storage:
    """S3 storage when the settings name a bucket, else local storage under OUTPUT_DIR."""
    logger.info("storage: %s", settings.describe())
    return S3Storage(settings) if settings.bucket is not None else LocalStorage(settings)


class LocalStorage(Storage):
    """Files under OUTPUT_DIR, for local runs without a bucket. Writes are atomic: readers see
    the old file or the new one, never a partial one."""

    def __init__(self, settings: StorageSettings) -> None:
        super().__init__(settings)
        self.root = settings.output_dir.absolute()  # file URLs need an absolute path

    def _store(self, key: str, data: bytes, sha256: bytes, content_type: str, presign_expiry_s: int,
               deadline: float | None) -> StoredObject:
        path = self.root.joinpath(*key.split("/"))
        try:
            write_atomically(path, data)
        except OSError as error:
            raise StorageError(f"write of {path} failed: {error}", attempts=1, cause=error) from error
        logger.info("stored %s (%d bytes)", path, len(data))
        return StoredObject(
            url=path.as_uri(), bucket=None, key=key, sha256=sha256.hex(), size=len(data), attempts=1, location=str(path)
        )


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a unique temporary file beside `path`, fsync it, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # os.open rather than mkstemp: mode 0o666 lets the umask decide, as for any other output file.
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class _Part:
    start: int
    end: int
    md5: str
    """Base64, for Content-MD5."""
    sha256: str
    """Base64, for x-amz-checksum-sha256."""


@dataclass(frozen=True)
class _Expected:
    """The digests an upload sends and the stored object must match."""

    size: int
    sha256_hex: str
    sha256_b64: str
    md5_hex: str
    md5_b64: str
    parts: tuple[_Part, ...]
    """Empty for a single PUT."""

    @classmethod
    def of(cls, data: bytes, sha256: bytes, threshold: int) -> _Expected:
        md5 = hashlib.md5(data, usedforsecurity=False).digest()
        parts: tuple[_Part, ...] = ()
        if len(data) > threshold:
            part_size = max(threshold, -(-len(data) // MAX_PARTS))
            view = memoryview(data)  # hash the parts without copying them
            parts = tuple(
                _Part(
                    start,
                    min(start + part_size, len(data)),
                    _b64(hashlib.md5(view[start : start + part_size], usedforsecurity=False).digest()),
                    _b64(hashlib.sha256(view[start : start + part_size]).digest()),
                )
                for start in range(0, len(data), part_size)
            )
        return cls(len(data), sha256.hex(), _b64(sha256), md5.hex(), _b64(md5), parts)

    @property
    def checksums(self) -> frozenset[str]:
        """ChecksumSHA256 values a server may report for these bytes: the full-object one, and the
        composite one (SHA-256 of the parts' digests) when uploaded in these parts. S3 appends
        "-<parts>" to a composite; moto 5.2.5's HEAD leaves that out."""
        if not self.parts:
            return frozenset({self.sha256_b64})
        composite = _b64(hashlib.sha256(b"".join(base64.b64decode(part.sha256) for part in self.parts)).digest())
        return frozenset({self.sha256_b64, composite, f"{composite}-{len(self.parts)}"})

    def mismatch(self, head: Mapping[str, Any]) -> str | None:
        """Why the object a HEAD response describes does not hold these bytes, or None if it does."""
        size = head.get("ContentLength")
        if size != self.size:
            return f"size is {size} bytes, expected {self.size}"
        stored_sha256 = head.get("Metadata", {}).get(SHA256_METADATA)
        if stored_sha256 != self.sha256_hex:
            return f"sha256 metadata is {stored_sha256}, expected {self.sha256_hex}"
        checksum = head.get("ChecksumSHA256")
        if checksum is not None and checksum not in self.checksums:
            return f"SHA-256 checksum is {checksum}, expected one of {sorted(self.checksums)}"
        etag = head.get("ETag", "").strip('"')
        encryption = head.get("ServerSideEncryption", "")
        encrypted_with_key = encryption.startswith("aws:kms") or "SSECustomerAlgorithm" in head
        if _MD5_ETAG.fullmatch(etag) and not encrypted_with_key and etag != self.md5_hex:
            return f"ETag {etag} is not the MD5 of the bytes sent, {self.md5_hex}"
        return None


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


class S3Storage(Storage):
    """An S3-compatible bucket: verified, idempotent, retried uploads; presigned GET URLs."""

    def __init__(self, settings: StorageSettings) -> None:
        if settings.bucket is None:
            raise ValueError("S3Storage needs settings that name a bucket")
        super().__init__(settings)
        self.bucket: str = settings.bucket
        import boto3.session
        from botocore.config import Config

        config = Config(
            region_name=settings.region,
            signature_version="s3v4",
            s3={"addressing_style": settings.addressing_style},
            connect_timeout=settings.connect_timeout_s,
            read_timeout=settings.read_timeout_s,
            retries={"mode": "standard", "total_max_attempts": 1},  # put() retries whole attempts
            # Only the checksums put() computes: botocore's own default (CRC32 in an aws-chunked
            # trailer) is not understood by every S3-compatible server.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # A session of its own: boto3's default session is not thread-safe to create clients from.
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=settings.endpoint_url,
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_access_key,
            config=config,
        )

    def _store(self, key: str, data: bytes, sha256: bytes, content_type: str, presign_expiry_s: int,
               deadline: float | None) -> StoredObject:
        location = f"s3://{self.bucket}/{key}"
        expected = _Expected.of(data, sha256, self.settings.multipart_threshold_bytes)
        started = time.monotonic()
        attempt = 1
        while True:
            try:
                uploaded = self._attempt(key, data, expected, content_type)
                break
            except Exception as error:
                cap = min(self.settings.backoff_max_s, self.settings.backoff_base_s * 2 ** (attempt - 1))
                delay = random.uniform(0, cap)
                late = deadline is not None and time.monotonic() + delay >= deadline
                if attempt >= self.settings.max_attempts or not _retryable(error) or late:
                    tries = f"{attempt} attempt{'s' if attempt > 1 else ''}"
                    stopped = ", out of time" if late and attempt < self.settings.max_attempts else ""
                    message = f"upload of {location} failed after {tries}{stopped}: {_describe(error)}"
                    raise StorageError(message, attempts=attempt, cause=error) from error
                logger.warning(
                    "upload of %s failed (attempt %d of %d), retrying in %.2f s: %s",
                    location, attempt, self.settings.max_attempts, delay, _describe(error),
                )  # fmt: skip
                time.sleep(delay)
                attempt += 1
        url = self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=presign_expiry_s
        )
        logger.info(
            "%s %s (%d bytes, %d attempt(s), %.2f s)",
            "uploaded" if uploaded else "kept identical", location, len(data), attempt, time.monotonic() - started,
        )  # fmt: skip
        return StoredObject(
            url=url, bucket=self.bucket, key=key, sha256=expected.sha256_hex, size=len(data), attempts=attempt,
            location=location,
        )  # fmt: skip

    def _attempt(self, key: str, data: bytes, expected: _Expected, content_type: str) -> bool:
        """One try: skip if the key already holds these bytes, else upload and verify. True if uploaded."""
        # S3 answers 403, not 404, for a missing key when the credentials may not list the bucket.
        existing = self._head(key, absent=(403, 404))
        if existing is not None and expected.mismatch(existing) is None:
            return False
        if expected.parts:
            self._put_multipart(key, data, expected, content_type)
        else:
            self._client.put_object(
                Bucket=self.bucket, Key=key, Body=data, ContentType=content_type,
                Metadata={SHA256_METADATA: expected.sha256_hex}, ContentMD5=expected.md5_b64,
                ChecksumAlgorithm="SHA256", ChecksumSHA256=expected.sha256_b64,
            )  # fmt: skip
        stored = self._head(key)
        problem = "object not found" if stored is None else expected.mismatch(stored)
        if problem is not None:
            self._delete(key)
            raise _IntegrityError(f"stored object does not match the upload: {problem}")
        return True

    def _delete(self, key: str) -> None:
        """Remove an object that failed verification, so no URL or later reader can get its bytes."""
        try:
            self._client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as error:
            logger.error("could not delete the corrupt object s3://%s/%s: %s", self.bucket, key, _describe(error))

    def _put_multipart(self, key: str, data: bytes, expected: _Expected, content_type: str) -> None:
        """Upload the parts in order; on any failure abort, so the bucket keeps no orphan parts."""
        upload_id = self._client.create_multipart_upload(
            Bucket=self.bucket, Key=key, ContentType=content_type,
            Metadata={SHA256_METADATA: expected.sha256_hex}, ChecksumAlgorithm="SHA256",
        )["UploadId"]  # fmt: skip
        try:
            completed = []
            for number, part in enumerate(expected.parts, start=1):
                response = self._client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number,
                    Body=data[part.start : part.end], ContentMD5=part.md5,
                    ChecksumAlgorithm="SHA256", ChecksumSHA256=part.sha256,
                )  # fmt: skip
                completed.append({"PartNumber": number, "ETag": response["ETag"], "ChecksumSHA256": part.sha256})
            self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": completed}
            )
        except Exception:
            self._abort(key, upload_id)
            raise

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except Exception as error:
            logger.warning(
                "could not abort multipart upload %s of s3://%s/%s; its parts stay until a lifecycle "
                "rule (AbortIncompleteMultipartUpload) removes them: %s",
                upload_id, self.bucket, key, _describe(error),
            )  # fmt: skip

    def _head(self, key: str, absent: tuple[int, ...] = (404,)) -> dict[str, Any] | None:
        """The object's HEAD response with its checksum, or None if the answer's status is in `absent`."""
        from botocore.exceptions import ClientError

        try:
            return self._client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except ClientError as error:
            if _status(error) in absent:
                return None
            raise


def _status(error: ClientError) -> int:
    return error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)


def _retryable(error: Exception) -> bool:
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(error, _IntegrityError | BotoConnectionError | HTTPClientError):
        return True
    if isinstance(error, ClientError):
        status = _status(error)
        return status >= 500 or status == 429 or error.response.get("Error", {}).get("Code") in _RETRYABLE_CODES
    return False


def _describe(error: Exception) -> str:
    """The error for a log line or StorageError message; botocore's own text would mention its
    own retry count, which is always 0 here and misleading."""
    from botocore.exceptions import ClientError

    if isinstance(error, _IntegrityError):
        return str(error)
    if isinstance(error, ClientError):
        status = str(_status(error))
        details = error.response.get("Error", {})
        code = details.get("Code", "")  # HEAD errors have no body: their code is the status again
        message = details.get("Message", "")
        return (
            f"{error.operation_name} returned HTTP {status}"
            f"{f' {code}' if code != status else ''}{f': {message}' if message else ''}"
        )
    return f"{type(error).__name__}: {error}"
