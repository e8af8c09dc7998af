"""Command line client: submit a job, follow its stream, write the audio as it arrives.

    python -m dia2_worker.client --endpoint-id ID --text "[S1] Hi! [S2] Hello." --out out.wav   # RUNPOD_API_KEY
    python -m dia2_worker.client --url http://127.0.0.1:8000 --input test_input.json --out out.wav

With --endpoint-id it talks to RunPod's API (/run, then /stream/{id} until the job ends); with --url to
the SDK's local API server (`python handler.py --rp_serve_api`), which runs the job inside the first
/stream call and answers with every item at once. Prints the time to first audio and the result as JSON;
exits 1 when the job fails.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
import urllib.error
import urllib.request
import wave
from pathlib import Path
from typing import Any

from . import cli

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}


class JobFailed(RuntimeError):
    pass


class Unreachable(JobFailed):
    """The server did not answer at all: nothing is known about the job."""


class Api:
    """RunPod's serverless API or the SDK's local one; they differ in base URL, auth and /stream's method."""

    def __init__(self, base_url: str, api_key: str | None, local: bool, timeout: float) -> None:
        self.base_url, self.api_key, self.local, self.timeout = base_url.rstrip("/"), api_key, local, timeout

    def call(self, method: str, path: str, body: Any = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise JobFailed(f"{method} {path} answered HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:  # refused, unknown host, timed out, cut off
            raise Unreachable(f"{self.base_url} is not reachable: {getattr(exc, 'reason', exc)}") from None
        except ValueError:
            raise JobFailed(f"{method} {path} answered with something that is not JSON") from None

    def run(self, job_input: dict) -> str:
        return self.call("POST", "/run", {"input": job_input})["id"]

    def stream(self, job_id: str) -> dict:
        return self.call("POST" if self.local else "GET", f"/stream/{job_id}")

    def status(self, job_id: str) -> dict:
        return self.call("POST" if self.local else "GET", f"/status/{job_id}")


class WavWriter:
    """A WAV file written chunk by chunk, so a listener can open it while the job is still running."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: wave.Wave_write | None = None
        self.samples = 0

    def write(self, item: dict) -> None:
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = wave.open(str(self.path), "wb")
            self.file.setnchannels(1)
            self.file.setsampwidth(2)
            self.file.setframerate(item["sample_rate"])
        if item["start_sample"] != self.samples:
            raise JobFailed(f"audio chunk {item['seq']} starts at sample {item['start_sample']}, expected {self.samples}")
        pcm = base64.b64decode(item["audio_base64"])
        self.file.writeframes(pcm)
        self.samples += len(pcm) // 2

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def submit(api: Api, job_input: dict, wait_s: float) -> str:
    """/run, retried while the endpoint does not accept connections yet (a worker still starting)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return api.run(job_input)
        except Unreachable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


def follow(api: Api, job_input: dict, out: Path, poll_s: float = 0.2, timeout_s: float = 3600.0,
           wait_s: float = 0.0) -> dict:
    """Submit, then write streamed audio as it comes; returns the result item with client-side timings."""
    job_id = submit(api, job_input, wait_s)
    started = time.monotonic()
    writer, result, first_audio_s = WavWriter(out), None, None
    try:
        while True:
            reply = api.stream(job_id)
            for entry in reply.get("stream", []):
                item = entry.get("output", entry)
                if not isinstance(item, dict):
                    continue
                if "error" in item:
                    raise JobFailed(item["error"])
                if item.get("type") == "audio":
                    writer.write(item)
                    if first_audio_s is None:
                        first_audio_s = time.monotonic() - started
                        print(f"first audio after {first_audio_s * 1000:.0f} ms", file=sys.stderr)
                elif item.get("type") == "result":
                    result = item
            status = reply.get("status")
            if status in TERMINAL or (api.local and status is None):
                break
            if time.monotonic() - started > timeout_s:
                raise JobFailed(f"job {job_id} still {status} after {timeout_s:g} s")
            time.sleep(poll_s)
    finally:
        writer.close()
    if status not in (None, "COMPLETED") or result is None:
        final = api.status(job_id) if not api.local else reply
        raise JobFailed(final.get("error") or f"job {job_id} ended {status} without a result")
    if result.get("audio_base64") and writer.samples == 0:
        out.write_bytes(base64.b64decode(result["audio_base64"]))
    return {**{k: v for k, v in result.items() if k != "audio_base64"}, "job_id": job_id,
            "client_ttfa_ms": None if first_audio_s is None else first_audio_s * 1000,
            "client_total_ms": (time.monotonic() - started) * 1000}


def read_input(path: Path) -> dict:
    """A job file: {"input": {...}} or the input object itself."""
    cli.existing_file(path, "--input")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise cli.UsageError(f"--input: {path} is not valid JSON ({exc})") from None
    job_input = raw.get("input", raw) if isinstance(raw, dict) else raw
    if not isinstance(job_input, dict):
        raise cli.UsageError(f'--input: {path} must hold a JSON object, {{"input": {{"text": ...}}}} '
                             f'or {{"text": ...}}')
    return job_input


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv, "python -m dia2_worker.client")


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dia2_worker.client", description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--endpoint-id", help="RunPod endpoint id (uses RUNPOD_API_KEY)")
    target.add_argument("--url", help="base URL of the SDK's local API server")
    job = parser.add_mutually_exclusive_group(required=True)
    job.add_argument("--text", help="dialogue script with [S1]/[S2] tags")
    job.add_argument("--input", type=Path, help='job JSON: {"input": {...}} or the input object itself')
    parser.add_argument("--out", type=Path, required=True, help="WAV file to write")
    parser.add_argument("--play", action="store_true", help="play the WAV when done (ffplay, aplay or afplay)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
    parser.add_argument("--wait", type=float, default=0.0,
                        help="keep retrying the submission this long while the endpoint is not up yet")
    args = parser.parse_args(argv)

    job_input = read_input(args.input) if args.input else {"text": args.text}
    cli.writable_parent(args.out, "--out")
    if args.endpoint_id:
        key = os.environ.get("RUNPOD_API_KEY")
        if not key:
            parser.error("--endpoint-id needs RUNPOD_API_KEY in the environment")
        api = Api(f"https://api.runpod.ai/v2/{args.endpoint_id}", key, local=False, timeout=60.0)
    else:
        api = Api(args.url, None, local=True, timeout=args.timeout)
    try:
        result = follow(api, job_input, args.out, timeout_s=args.timeout, wait_s=args.wait)
    except Unreachable as exc:
        hint = "is the worker running?" if args.url else "check the endpoint id and your network"
        print(f"python -m dia2_worker.client: error: {exc} ({hint})", file=sys.stderr)
        return 1
    except JobFailed as exc:
        print(f"job failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    if args.play:
        _play(args.out)
    return 0


def _play(path: Path) -> None:
    import shutil
    import subprocess

    for player in (["ffplay", "-nodisp", "-autoexit"], ["aplay"], ["afplay"]):
        if shutil.which(player[0]):
            subprocess.run([*player, str(path)], check=False)
            return
    print("no audio player found (ffplay, aplay, afplay)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
