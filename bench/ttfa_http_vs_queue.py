"""Time to first audio: the HTTP speech server's first response bytes against the queue worker's first
`/stream` item, on one checkpoint in one run, at each concurrency.

    python bench/ttfa_http_vs_queue.py [--model-dir DIR] [--concurrency 1,8] [--rounds 5] [--json OUT]

Queue: `python handler.py` behind the loopback job-protocol emulator (tests/control_plane.py); a round
submits N jobs at once (chunk_ms 80) and takes, per job, the time from submission to the arrival of its
first audio item at the emulator. That is what the platform receives; a client polling /stream adds its
poll interval on top. HTTP: `python -m dia2_worker.serve` on loopback; a round sends N requests at once
(response_format pcm) and takes, per request, the time from sending to its first body bytes. Both
processes run with SLOTS equal to the largest concurrency, so neither waits for a slot.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

from control_plane import ControlPlane  # noqa: E402  (the tests' emulator)
from dia2_worker.mimi.bench import machine  # noqa: E402

TEXT = "[S1] Hello there, how are you today? [S2] Fine, thanks. And you?"
MAX_DURATION_S = 6


def queue_round(plane: ControlPlane, concurrency: int, seed: int) -> list[float]:
    submitted = {}
    for i in range(concurrency):
        submitted[plane.submit({"text": TEXT, "seed": seed + i, "chunk_ms": 80, "max_duration_s": MAX_DURATION_S})] \
            = time.monotonic()
    ttfa = []
    for job_id, at in submitted.items():
        plane.wait_result(job_id, 300)
        first = next(post for post in plane.stream_items(job_id) if post.body["output"].get("type") == "audio")
        ttfa.append((first.at - at) * 1000)
    return ttfa


def http_round(url: str, concurrency: int, seed: int) -> list[float]:
    import httpx

    start = threading.Barrier(concurrency)

    def one(i: int) -> float:
        body = {"model": "dia2", "input": TEXT, "voice": "alloy", "response_format": "pcm", "seed": seed + i,
                "max_duration_s": MAX_DURATION_S}
        with httpx.Client(timeout=300) as client:
            start.wait()
            sent = time.monotonic()
            with client.stream("POST", f"{url}/v1/audio/speech", json=body) as response:
                response.raise_for_status()
                chunks = response.iter_bytes()
                next(chunks)
                first = time.monotonic()
                for _ in chunks:
                    pass
        return (first - sent) * 1000

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(concurrency)))


class HttpServer:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log = log_path.open("w+")
        self.process = subprocess.Popen([sys.executable, "-u", "-m", "dia2_worker.serve", "--host", "127.0.0.1",
                                         "--port", "0"], cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = None
        deadline = time.monotonic() + 120
        while self.url is None or not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start; log:\n{log_path.read_text()}")
            found = re.search(r"listening on (http://\S+)", log_path.read_text())
            self.url = found and found.group(1)
            time.sleep(0.1)

    def _ready(self) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.url}/ping").status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50_ms": statistics.median(ordered), "p90_ms": ordered[int(0.9 * (len(ordered) - 1))],
            "mean_ms": statistics.fmean(ordered), "min_ms": ordered[0], "max_ms": ordered[-1], "n": len(ordered)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default=str(ROOT / "tests" / "fixtures" / "dia2-tiny"))
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the results here (e.g. bench/results/ttfa-http-vs-queue-cpu-DATE.json)")
    args = parser.parse_args()
    levels = [int(level) for level in args.concurrency.split(",")]
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    env = {key: value for key, value in os.environ.items() if not key.startswith("RUNPOD_")}
    env.update(MODEL_DIR=args.model_dir, DEVICE=args.device, SLOTS=str(max(levels)), OUTPUT_DIR=str(logs / "ttfa-out"),
               LOG_LEVEL="WARNING", OMP_WAIT_POLICY="PASSIVE")
    results: dict[str, dict] = {"queue": {}, "http": {}}

    with ControlPlane() as plane, plane.run_worker(ROOT / "handler.py", {**env, "RUNPOD_LOG_LEVEL": "WARN"}, ROOT,
                                                   logs / "ttfa-queue.log", ready_timeout=120):
        queue_round(plane, 1, 0)  # the first job pays for lazy work; not counted
        for level in levels:
            values = [v for r in range(args.rounds) for v in queue_round(plane, level, 1000 * r)]
            results["queue"][str(level)] = summary(values)
            print(f"queue  concurrency {level}: TTFA p50 {results['queue'][str(level)]['p50_ms']:.0f} ms", flush=True)

    server = HttpServer(env, logs / "ttfa-http.log")
    try:
        http_round(server.url, 1, 0)
        for level in levels:
            values = [v for r in range(args.rounds) for v in http_round(server.url, level, 1000 * r)]
            results["http"][str(level)] = summary(values)
            print(f"http   concurrency {level}: TTFA p50 {results['http'][str(level)]['p50_ms']:.0f} ms", flush=True)
    finally:
        server.stop()

    report = {
        "benchmark": "ttfa-http-vs-queue",
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": {**machine(torch.device(args.device)), "device": args.device},
        "model_dir": args.model_dir, "text": TEXT, "max_duration_s": MAX_DURATION_S, "rounds": args.rounds,
        "slots": max(levels),
        "queue": "first audio stream item at the job-protocol emulator, from submission (chunk_ms 80)",
        "http": "first response bytes at the client, from sending (response_format pcm)",
        "results": results,
    }
    print(json.dumps(report["results"], indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
