"""Loopback S3 for tests: moto's server in a thread, and a fault-injecting proxy in front of it.

Both speak real HTTP on 127.0.0.1 with OS-chosen ports, so code under test runs its whole
botocore stack (signing, checksums, timeouts, connection pool) as against a real bucket, and a
worker started as a subprocess can reach them too. The proxy logs each request with its S3
operation, so a test can count what the client really sent, and answers chosen requests with
an error, a dropped connection, a stall or a corrupted body.

Both assume path-style addressing (http://127.0.0.1:PORT/bucket/key), the storage default.
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
import uuid
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

import boto3
from botocore.config import Config
from moto.server import ThreadedMotoServer

from dia2_worker.storage import MIB

ACCESS_KEY_ID = "testing"  # moto accepts any credentials
SECRET_ACCESS_KEY = "testing"
REGION = "us-east-1"

_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "transfer-encoding", "upgrade", "expect"}
)  # fmt: skip
"""Headers about one connection, not the request; "expect" too, since the proxy has the whole body."""


class MotoServer:
    """moto's S3 in a thread of this process, on 127.0.0.1 at a free port."""

    def __init__(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._client: Any = None
        self.endpoint_url = ""

    def __enter__(self) -> MotoServer:
        # werkzeug logs every request to stderr at INFO unless its logger is set up.
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._server.stop()

    def client(self) -> Any:
        """A boto3 S3 client straight to moto (no proxy), for setting up and inspecting buckets.

        Made once (a client takes ~0.1 s to build) and shared: boto3 clients are thread-safe.
        """
        if self._client is None:
            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.endpoint_url,
                aws_access_key_id=ACCESS_KEY_ID,
                aws_secret_access_key=SECRET_ACCESS_KEY,
                config=Config(region_name=REGION, s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
            )
        return self._client

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name unless given) and return its name."""
        bucket = name or f"test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=bucket)
        return bucket


def s3_operation(method: str, path: str, query: dict[str, str]) -> str:
    """The S3 API operation a path-style request is, e.g. PutObject or UploadPart."""
    has_key = "/" in path.strip("/")
    if "uploadId" in query:
        return {"PUT": "UploadPart", "POST": "CompleteMultipartUpload", "DELETE": "AbortMultipartUpload"}.get(
            method, "ListParts"
        )
    if "uploads" in query:
        return "CreateMultipartUpload" if method == "POST" else "ListMultipartUploads"
    object_operations = {"HEAD": "HeadObject", "GET": "GetObject", "PUT": "PutObject", "DELETE": "DeleteObject"}
    bucket_operations = {"HEAD": "HeadBucket", "GET": "ListObjects", "PUT": "CreateBucket", "DELETE": "DeleteBucket"}
    return (object_operations if has_key else bucket_operations).get(method, method)


@dataclass
class Fault:
    """What the proxy does to the requests it matches.

    - forward: pass the request on untouched (what happens without a fault).
    - error: answer `status` with an S3 XML error `code`, without forwarding.
    - drop: close the connection without answering, without forwarding.
    - stall: wait `stall_s`, then drop (for client read timeouts).
    - lose_response: forward, then drop: the server did the work but the client never hears.
    - corrupt: flip one byte in the middle of the request body, then forward.
    """

    action: Literal["forward", "error", "drop", "stall", "lose_response", "corrupt"]
    operation: str | None = None
    """S3 operation to match, e.g. "PutObject"; None matches every request."""
    times: int = 1
    """How many matching requests it applies to."""
    skip: int = 0
    """Matching requests let through untouched before it applies."""
    status: int = 503
    code: str = "SlowDown"
    stall_s: float = 1.0


@dataclass(frozen=True)
class ProxiedRequest:
    method: str
    path: str
    query: dict[str, str]
    operation: str
    body_size: int
    fault: str | None
    """The fault applied to it, if any."""
    status: int | None
    """The status the client got; None if the connection was dropped."""


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of `upstream_url` that injects faults on request."""

    def __init__(self, upstream_url: str) -> None:
        upstream = urlsplit(upstream_url)
        self.upstream = (upstream.hostname or "127.0.0.1", upstream.port or 80)
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._requests: list[ProxiedRequest] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]  # read by the handler
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def inject(self, fault: Fault) -> None:
        """Queue a fault (a copy: counting it down leaves `fault` as given).

        The first queued fault whose operation matches a request decides its fate, `skip` included.
        """
        with self._lock:
            self._faults.append(replace(fault))

    def requests(self, operation: str | None = None) -> list[ProxiedRequest]:
        """The requests seen so far, in arrival order; only those of `operation` if given."""
        with self._lock:
            return [request for request in self._requests if operation in (None, request.operation)]

    def _take_fault(self, operation: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.operation not in (None, operation):
                    continue
                if fault.skip:
                    fault.skip -= 1
                    return None
                fault.times -= 1
                if fault.times == 0:
                    self._faults.remove(fault)
                return fault
            return None

    def _log(self, request: ProxiedRequest) -> None:
        with self._lock:
            self._requests.append(request)


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as botocore's pool expects; answers Expect: 100-continue

    def do_GET(self) -> None:
        self._proxy()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the request log is `FaultProxy.requests`."""

    def _proxy(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = urlsplit(self.path)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        operation = s3_operation(self.command, parts.path, query)
        fault = proxy._take_fault(operation) or Fault("forward")
        if fault.action == "corrupt" and body:
            middle = len(body) // 2
            body = body[:middle] + bytes([body[middle] ^ 0xFF]) + body[middle + 1 :]
        answer = None
        if fault.action in ("forward", "corrupt", "lose_response"):
            answer = self._forward(proxy, body)
        if fault.action == "lose_response":
            answer = None  # the server did the work; the client never hears of it
        status = fault.status if fault.action == "error" else answer[0] if answer else None
        # Logged before answering: once the client has its answer, the log shows its request.
        applied = None if fault.action == "forward" else fault.action
        proxy._log(ProxiedRequest(self.command, parts.path, query, operation, len(body), applied, status))
        if fault.action == "error":
            self._answer_error(fault)
        elif answer is not None:
            self._relay(*answer)
        else:
            if fault.action == "stall":
                time.sleep(fault.stall_s)
            self.close_connection = True  # no answer: the client sees the connection close

    def _forward(self, proxy: FaultProxy, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(*proxy.upstream, timeout=60)
        try:
            headers = {name: value for name, value in self.headers.items() if name.lower() not in _HOP_BY_HOP}
            connection.request(self.command, self.path, body=body or None, headers=headers)
            response = connection.getresponse()
            return response.status, response.reason, response.getheaders(), response.read()
        finally:
            connection.close()

    def _relay(self, status: int, reason: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response_only(status, reason)
        length = str(len(body))
        for name, value in headers:
            if name.lower() == "content-length":
                length = value if self.command == "HEAD" else length  # a HEAD answer has the object's length
            elif name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _answer_error(self, fault: Fault) -> None:
        body = (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{fault.code}</Code>'
            f"<Message>Injected by FaultProxy</Message><RequestId>fault</RequestId></Error>"
        ).encode()
        self.send_response_only(fault.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def bucket_env(endpoint_url: str, bucket: str, **overrides: str) -> dict[str, str]:
    """Settings for tests: tiny backoff, 3 attempts, the smallest multipart threshold."""
    return {
        "BUCKET_ENDPOINT_URL": endpoint_url,
        "BUCKET_NAME": bucket,
        "BUCKET_ACCESS_KEY_ID": ACCESS_KEY_ID,
        "BUCKET_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        "UPLOAD_MAX_ATTEMPTS": "3",
        "UPLOAD_BACKOFF_BASE_S": "0.001",
        "UPLOAD_BACKOFF_MAX_S": "0.01",
        "MULTIPART_THRESHOLD_BYTES": str(5 * MIB),
        "BUCKET_CONNECT_TIMEOUT_S": "1",
        "BUCKET_READ_TIMEOUT_S": "5",
        **overrides,
    }
