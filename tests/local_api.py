"""Harness for the SDK's local API mode: `python -u handler.py --rp_serve_api ...`.

What that mode is in runpod 1.12.0 (serverless/modules/rp_fastapi.py): a FastAPI app under
uvicorn that calls the handler inside HTTP requests. There is no job-take, stream, result or
job-stop traffic and no concurrency_modifier. All routes are POST (GET answers 405):
- /runsync {"input": ...}: runs the job within the request; {"id", "status": "COMPLETED",
  "output": [every yielded item]} (always aggregated, whatever return_aggregate_stream says).
- /run {"input": ...}: only stores the job; {"id": "test-<uuid>", "status": "IN_PROGRESS"}.
- /status/{id}: runs the stored job start to finish within this call, then forgets it; a
  second call answers {"status": "FAILED", "error": "Job ID not found"}.
- /stream/{id}: the same, but {"status": "COMPLETED", "stream": [{"output": item}, ...]}, all
  at the end.
What it does not show: items arriving over time, stopping a job, how failures are reported.
A yielded {"error": ...} is just another item of a COMPLETED job, and a raised exception makes
/runsync, /status and /stream answer HTTP 500 (the SDK reads the missing "output" key).
So: a smoke test that the script starts and its handler runs; the control-plane emulator
(control_plane.py) is the test of streaming, errors and cancellation.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control_plane import WorkerProcess, clean_env


@dataclass(frozen=True)
class Response:
    """An HTTP answer: status and JSON body (the raw text when it is not JSON)."""

    status: int
    body: Any


class LocalApi:
    """Client of a running local API server."""

    def __init__(self, base_url: str, process: WorkerProcess) -> None:
        self.base_url = base_url
        self.process = process

    def request(
        self, method: str, path: str, payload: Any = None, timeout: float = 30.0
    ) -> Response:
        """One HTTP call; error statuses are returned, not raised, since tests check them."""
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            self.base_url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                return Response(answer.status, _decode(answer.read()))
        except urllib.error.HTTPError as error:
            return Response(error.code, _decode(error.read()))

    def runsync(self, job_input: Any) -> Response:
        """POST /runsync: run a job and wait for its aggregated output."""
        return self.request("POST", "/runsync", {"input": job_input})

    def run(self, job_input: Any) -> str:
        """POST /run: store a job (nothing runs yet); its id."""
        response = self.request("POST", "/run", {"input": job_input})
        if response.status != 200:
            raise AssertionError(f"/run answered {response}")
        return response.body["id"]

    def status(self, job_id: str) -> Response:
        """POST /status/{id}: run the stored job now and return its aggregated output."""
        return self.request("POST", f"/status/{job_id}")

    def stream(self, job_id: str) -> Response:
        """POST /stream/{id}: run the stored job now and return every item at once."""
        return self.request("POST", f"/stream/{job_id}")


@contextmanager
def serve_local_api(
    script_path: Path,
    cwd: Path | None = None,
    env_extra: dict[str, str] | None = None,
    log_path: Path | None = None,
    ready_timeout: float = 30.0,
) -> Iterator[LocalApi]:
    """Run `python -u script_path --rp_serve_api` on a free loopback port until the block ends."""
    port = _free_port()
    process = WorkerProcess(
        script_path,
        ["--rp_serve_api", "--rp_api_host", "127.0.0.1", "--rp_api_port", str(port)],
        clean_env(env_extra),  # no RUNPOD_WEBHOOK_GET_JOB: the SDK would see a platform
        cwd,
        log_path,
    )
    try:
        api = LocalApi(f"http://127.0.0.1:{port}", process)
        _wait_ready(api, ready_timeout)
        yield api
    finally:
        process.stop()


def _wait_ready(api: LocalApi, timeout: float) -> None:
    """Poll the OpenAPI schema, the cheapest route, until uvicorn answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if api.process.returncode is not None:
            raise RuntimeError(
                f"local API exited with {api.process.returncode}; log:\n{api.process.log()}"
            )
        try:
            if api.request("GET", "/openapi.json", timeout=1.0).status == 200:
                return
        except OSError:  # not listening yet
            pass
        time.sleep(0.1)
    raise TimeoutError(f"local API not ready within {timeout:g} s; log:\n{api.process.log()}")


def _free_port() -> int:
    """A port free right now; uvicorn fails loudly in the unlikely case it is taken meanwhile."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")
