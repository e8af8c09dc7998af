"""Loopback emulator of the RunPod control plane, to test the real worker loop end to end.

A worker started with `ControlPlane.env()` (or `ControlPlane.run_worker`) runs
`runpod.serverless.start` exactly as on the platform and talks to this server the way runpod
1.12.0 does (serverless/modules/rp_job.py, rp_http.py, rp_scale.py, rp_ping.py):

- GET  /v2/EP/job-take/W?gpu=..&job_in_progress=0|1: one job {"id", "input"}, or 204.
- GET  /v2/EP/job-take-batch/W?gpu=..&batch_size=N&job_in_progress=0|1: a JSON list, or 204.
  The worker asks this when it has N > 1 free slots (concurrency minus jobs held).
- GET  /v2/EP/job-stop/W?gpu=..: long poll; 204, or {"jobsToStop": [ids]}.
- POST /v2/EP/job-stream/W/JOB?gpu=..&isStream=false: body {"output": item}, once per yield.
- POST /v2/EP/job-done/W/JOB?gpu=..&isStream=true|false: the result ({"output": ...} or
  {"error": ...}); a body with "status": "IN_PROGRESS" is a progress_update, not a result.
- GET  /v2/EP/ping/W?gpu=..&job_id=A,B&runpod_version=..: heartbeat, only sent when
  RUNPOD_AI_API_KEY and RUNPOD_POD_ID are both set.

Posts are JSON text sent as application/x-www-form-urlencoded. The worker does not pause
between empty job-takes, so both GET channels are held open (long poll) as the platform does,
for at most `hold_s`: a SIGTERM'd worker exits only once its open polls have returned.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

# Query the platform puts on every URL; the SDK appends its own params with "&".
PLATFORM_QUERY = "gpu=NVIDIA+TEST"


@dataclass(frozen=True)
class Call:
    """One request from the worker, as received (for checks on the wire format)."""

    at: float  # time.monotonic() on arrival; the same clock in every process on the host
    method: str
    action: str  # job-take, job-take-batch, job-stop, job-stream, job-done, ping
    job_id: str | None  # the job in the path of job-stream / job-done
    query: dict[str, str]
    headers: dict[str, str]


@dataclass(frozen=True)
class TakeCall:
    """One job-take request and the jobs it handed out."""

    at: float
    job_in_progress: bool
    batch_size: int | None  # None for the single-job URL
    job_ids: tuple[str, ...]


@dataclass(frozen=True)
class Post:
    """A stream item or a result, with its arrival time (time.monotonic())."""

    at: float
    body: Any


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without RUNPOD_* variables, plus `extra`.

    Dropping inherited RUNPOD_* keeps a developer's real API key, endpoint id or webhook URLs
    from changing what the subprocess under test does.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("RUNPOD_")}
    return {**env, **(extra or {})}


class WorkerProcess:
    """`python -u SCRIPT ARGS` in its own process group, stdout and stderr in a log file.

    The log defaults to a temporary file that is kept, for reading after a failure.
    """

    def __init__(
        self,
        script: Path,
        args: Sequence[str],
        env: dict[str, str],
        cwd: Path | None,
        log_path: Path | None,
    ) -> None:
        if log_path is None:
            handle, name = tempfile.mkstemp(prefix=f"{script.stem}-", suffix=".log")
            os.close(handle)
            log_path = Path(name)
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-u", str(script), *args],
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # so stop() can reach the SDK's heartbeat child too
            )

    @property
    def returncode(self) -> int | None:
        """The exit status, or None while it runs."""
        return self.proc.poll()

    def log(self) -> str:
        """Everything the process printed so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, the SDK's graceful shutdown; SIGKILL the group after `timeout` or leftovers.

        On SIGTERM the worker stops taking jobs, lets running ones finish, and exits 0 once its
        held polls return. The group kill covers a worker that did not and an orphaned child.
        """
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.wait()


class ControlPlane:
    """The emulator: a threaded HTTP server on 127.0.0.1 plus the API tests drive it with."""

    def __init__(
        self, worker_id: str = "worker-1", endpoint_id: str = "endpoint-1", hold_s: float = 0.5
    ) -> None:
        self.worker_id = worker_id
        self.endpoint_id = endpoint_id
        self.hold_s = hold_s
        self.calls: list[Call] = []
        self.takes: list[TakeCall] = []
        self.results: dict[str, Post] = {}
        self.stops_delivered: dict[str, float] = {}  # job id -> when the worker was told
        self.rejected: list[str] = []  # requests that match no route: a protocol mismatch
        self._streams: dict[str, list[Post]] = {}
        self._queue: list[dict[str, Any]] = []
        self._stops: list[str] = []
        self._job_numbers = itertools.count(1)
        self._closing = False
        self._cond = threading.Condition()
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------------ test API
    @property
    def base_url(self) -> str:
        """http://127.0.0.1:PORT"""
        return f"http://127.0.0.1:{self._server.server_port}"

    def env(self) -> dict[str, str]:
        """The variables a worker needs to run against this emulator.

        URL templates have the platform's shapes: $ID becomes the worker id in the job-take
        URL and the job id in the others; $RUNPOD_POD_ID becomes the worker id.
        """
        prefix = f"{self.base_url}/v2/{self.endpoint_id}"
        query = PLATFORM_QUERY
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{prefix}/job-take/$ID?{query}",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{prefix}/job-done/$RUNPOD_POD_ID/$ID?{query}",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{prefix}/job-stream/$RUNPOD_POD_ID/$ID?{query}",
            "RUNPOD_WEBHOOK_PING": f"{prefix}/ping/$RUNPOD_POD_ID?{query}",
            "RUNPOD_POD_ID": self.worker_id,
            # Off the platform: no memory/disk/CUDA/network probes and no GPU burn-in at start.
            "RUNPOD_SKIP_AUTO_SYSTEM_CHECKS": "true",
            "RUNPOD_SKIP_GPU_CHECK": "true",
        }

    def submit(self, job_input: Any, job_id: str | None = None) -> str:
        """Queue a job; job-takes hand jobs out in submission order."""
        return self.submit_job({"id": job_id or f"job-{next(self._job_numbers)}", "input": job_input})

    def submit_job(self, job: dict[str, Any]) -> str:
        """Queue a job object as given, even one the platform's API would not build (no "input")."""
        with self._cond:
            self._queue.append(job)
            self._cond.notify_all()
        return job["id"]

    def stop(self, job_id: str) -> None:
        """Queue a stop signal for the job-stop channel (what a /cancel does on the platform)."""
        with self._cond:
            self._stops.append(job_id)
            self._cond.notify_all()

    def stream_items(self, job_id: str) -> list[Post]:
        """The stream posts received for a job so far, in arrival order."""
        with self._cond:
            return list(self._streams.get(job_id, []))

    @property
    def pings(self) -> list[Call]:
        """The heartbeats received so far."""
        with self._cond:
            return [call for call in self.calls if call.action == "ping"]

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Block until `predicate()` holds (checked on every change and every 0.1 s)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    rejected = f"; rejected requests: {self.rejected}" if self.rejected else ""
                    raise TimeoutError(f"no {what} within {timeout:g} s{rejected}")
                self._cond.wait(min(remaining, 0.1))

    def wait_result(self, job_id: str, timeout: float) -> Post:
        """The job's result, once posted."""
        self.wait_for(lambda: job_id in self.results, timeout, f"result for {job_id}")
        return self.results[job_id]

    def wait_stream_items(self, job_id: str, count: int, timeout: float) -> list[Post]:
        """The job's first `count` stream items, once received."""
        self.wait_for(
            lambda: len(self._streams.get(job_id, [])) >= count,
            timeout,
            f"{count} stream items for {job_id}",
        )
        return self.stream_items(job_id)[:count]

    @contextmanager
    def run_worker(
        self,
        script_path: Path,
        env_extra: dict[str, str] | None = None,
        cwd: Path | None = None,
        log_path: Path | None = None,
        ready_timeout: float = 30.0,
    ) -> Iterator[WorkerProcess]:
        """Run `python -u script_path` against this emulator until the block ends.

        Yields once the worker's loop has asked for a job, so timings in the block exclude the
        start-up (import runpod alone takes ~1.5 s).
        """
        takes_before = len(self.takes)
        worker = WorkerProcess(
            script_path, [], clean_env({**self.env(), **(env_extra or {})}), cwd, log_path
        )
        try:
            try:
                self.wait_for(
                    lambda: len(self.takes) > takes_before or worker.returncode is not None,
                    ready_timeout,
                    "job-take from the worker",
                )
            except TimeoutError as err:
                raise TimeoutError(f"{err}; worker log:\n{worker.log()}") from err
            if worker.returncode is not None:
                raise RuntimeError(
                    f"worker exited with {worker.returncode} before taking a job; "
                    f"log:\n{worker.log()}"
                )
            yield worker
        finally:
            worker.stop()

    def close(self) -> None:
        """Answer held polls at once and shut the server down."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ protocol
    def handle(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: bytes
    ) -> tuple[int, Any]:
        """Answer one request: (HTTP status, JSON payload or None)."""
        now = time.monotonic()
        parts = path.strip("/").split("/")
        if (
            len(parts) not in (4, 5)
            or parts[:2] != ["v2", self.endpoint_id]
            or parts[3] != self.worker_id
        ):
            return self._reject(method, path)
        action, job_id = parts[2], (parts[4] if len(parts) == 5 else None)
        with self._cond:
            self.calls.append(Call(now, method, action, job_id, query, headers))
        match (method, action, job_id):
            case ("GET", "job-take", None):
                jobs = self._take(now, query, 1)
                return (200, jobs[0]) if jobs else (204, None)
            case ("GET", "job-take-batch", None):
                jobs = self._take(now, query, int(query["batch_size"]))
                return (200, jobs) if jobs else (204, None)
            case ("GET", "job-stop", None):
                job_ids = self._take_stops()
                return (200, {"jobsToStop": job_ids}) if job_ids else (204, None)
            case ("POST", "job-stream", str(job)):
                self._record_stream(job, Post(now, json.loads(body)))
                return 200, None
            case ("POST", "job-done", str(job)):
                self._record_result(job, Post(now, json.loads(body)))
                return 200, None
            case ("GET", "ping", None):
                return 200, None
        return self._reject(method, path)

    def _reject(self, method: str, path: str) -> tuple[int, Any]:
        with self._cond:
            self.rejected.append(f"{method} {path}")
            self._cond.notify_all()
        return 404, {"error": f"no route for {method} {path}"}

    def _take(self, at: float, query: dict[str, str], count: int) -> list[dict[str, Any]]:
        """Hand out up to `count` queued jobs, holding the request up to hold_s for one."""
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._closing, self.hold_s)
            jobs, self._queue = self._queue[:count], self._queue[count:]
            self.takes.append(  # notified: run_worker waits for the first take
                TakeCall(
                    at=at,
                    job_in_progress=query["job_in_progress"] == "1",
                    batch_size=int(query["batch_size"]) if "batch_size" in query else None,
                    job_ids=tuple(job["id"] for job in jobs),
                )
            )
            self._cond.notify_all()
            return jobs

    def _take_stops(self) -> list[str]:
        """Hand out queued stop signals, holding the request up to hold_s for one."""
        with self._cond:
            self._cond.wait_for(lambda: self._stops or self._closing, self.hold_s)
            job_ids, self._stops = self._stops, []
            delivered = time.monotonic()
            self.stops_delivered.update((job_id, delivered) for job_id in job_ids)
            return job_ids

    def _record_stream(self, job_id: str, post: Post) -> None:
        with self._cond:
            self._streams.setdefault(job_id, []).append(post)
            self._cond.notify_all()

    def _record_result(self, job_id: str, post: Post) -> None:
        """Keep final results; progress updates stay in `calls` only."""
        if isinstance(post.body, dict) and post.body.get("status") == "IN_PROGRESS":
            return
        with self._cond:
            self.results[job_id] = post
            self._cond.notify_all()


class _Server(ThreadingHTTPServer):
    """Threaded, so long polls, stream posts and results are served at the same time."""

    def __init__(self, plane: ControlPlane) -> None:
        super().__init__(("127.0.0.1", 0), _RequestHandler)
        self.plane = plane


class _RequestHandler(BaseHTTPRequestHandler):
    """HTTP glue: parses the request and writes ControlPlane.handle's answer."""

    protocol_version = "HTTP/1.1"  # keep-alive, as aiohttp's pooled connections expect
    server: _Server

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, payload = self.server.plane.handle(
            self.command, url.path, dict(parse_qsl(url.query)), dict(self.headers), body
        )
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Silence per-request logging; `ControlPlane.calls` records requests."""
