"""Stand-in for the worker's handler.py: same runpod.serverless.start options, no model.

Job input (every key optional):
- items (3), interval (0.05 s): yield {"index": i} `items` times, sleeping `interval` before each.
- fail: "yield" then yields {"error": message}; "raise" then raises RuntimeError(message).
- marker: a path; if the job is stopped, the handler writes there as JSON which exception it
  saw ("CancelledError" or "GeneratorExit"), when (time.monotonic()) and the last index yielded.
FAKE_WORKER_CONCURRENCY (default 1) is what the concurrency modifier returns.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import runpod

CONCURRENCY = int(os.environ.get("FAKE_WORKER_CONCURRENCY", "1"))


async def handler(job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """Async generator: the SDK streams each item and, with return_aggregate_stream, returns all."""
    job_input = job["input"]
    last_index = -1
    try:
        for index in range(job_input.get("items", 3)):
            await asyncio.sleep(job_input.get("interval", 0.05))
            yield {"index": index}
            last_index = index
        if job_input.get("fail") == "yield":
            yield {"error": job_input["message"]}
        elif job_input.get("fail") == "raise":
            raise RuntimeError(job_input["message"])
    except (asyncio.CancelledError, GeneratorExit) as stopped:
        if marker := job_input.get("marker"):
            seen = {"exception": type(stopped).__name__, "at": time.monotonic()}
            _write_atomically(Path(marker), {**seen, "last_index": last_index})
        raise


def concurrency(current: int) -> int:
    """How many jobs the worker holds at once; the SDK asks again before every job-take."""
    return CONCURRENCY


def _write_atomically(path: Path, payload: dict[str, Any]) -> None:
    """Write then rename, so a test polling for the file never reads half of it."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(payload))
    partial.replace(path)


if __name__ == "__main__":
    runpod.serverless.start(
        {"handler": handler, "return_aggregate_stream": True, "concurrency_modifier": concurrency}
    )
