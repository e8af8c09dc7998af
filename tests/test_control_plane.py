"""End-to-end proof of the two worker harnesses, with a model-free handler (fake_worker/handler.py).

The control-plane tests run the real SDK worker loop (`python handler.py`) against the loopback
emulator; the local API tests run `handler.py --rp_serve_api`. Both pin runpod 1.12.0 behaviour
the real handler relies on, so an SDK upgrade that changes it fails here first.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from control_plane import ControlPlane, WorkerProcess
from local_api import LocalApi, serve_local_api

FAKE_HANDLER = Path(__file__).parent / "fake_worker" / "handler.py"
RESULT_TIMEOUT = 10.0  # s; a job here takes < 3 s, plus up to 1 s before the worker takes it


@pytest.fixture
def fake_worker(start_worker: Callable[..., WorkerProcess], tmp_path: Path) -> Callable[..., WorkerProcess]:
    """Starts the fake handler against the emulator (env vars as keywords)."""
    return lambda **env: start_worker(FAKE_HANDLER, env, tmp_path)

def test_stream_items_arrive_one_by_one_before_the_aggregated_result(
    plane: ControlPlane, fake_worker: Callable[..., WorkerProcess]
) -> None:
    fake_worker()
    job_id = plane.submit({"items": 4, "interval": 0.2})

    result = plane.wait_result(job_id, RESULT_TIMEOUT)
    items = plane.stream_items(job_id)

    assert [item.body for item in items] == [{"output": {"index": i}} for i in range(4)]
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(items)]
    assert min(gaps) > 0.1, f"items were not posted as they were yielded: gaps {gaps}"
    assert items[-1].at <= result.at
    assert result.body == {"output": [{"index": i} for i in range(4)]}
    # Wire format: JSON text sent as a form post; isStream is false on stream posts and true on
    # a generator's result, so only the URL tells them apart.
    posts = [call for call in plane.calls if call.job_id == job_id]
    assert {(call.action, call.query["isStream"]) for call in posts} == {
        ("job-stream", "false"),
        ("job-done", "true"),
    }
    assert {call.headers["Content-Type"] for call in posts} == {"application/x-www-form-urlencoded"}
    assert not plane.pings, "no RUNPOD_AI_API_KEY, so no heartbeats"


def test_failed_jobs_report_their_error_and_the_worker_keeps_taking_jobs(
    plane: ControlPlane, fake_worker: Callable[..., WorkerProcess]
) -> None:
    worker = fake_worker()
    good = plane.submit({"items": 2})
    yielded = plane.submit({"items": 2, "fail": "yield", "message": "speaker tag missing"})
    raised = plane.submit({"items": 1, "fail": "raise", "message": "CUDA out of memory"})
    after = plane.submit({"items": 2})

    results = {
        job_id: plane.wait_result(job_id, RESULT_TIMEOUT).body
        for job_id in (good, yielded, raised, after)
    }

    assert results[good] == results[after] == {"output": [{"index": 0}, {"index": 1}]}
    # A yielded error ends the job with exactly its text; the items streamed before it are not
    # in the result, and the error item itself is not streamed.
    assert results[yielded] == {"error": "speaker tag missing"}
    assert len(plane.stream_items(yielded)) == 2
    # A raised exception: "handler: <message> \ntraceback: <traceback>".
    assert list(results[raised]) == ["error"]
    assert results[raised]["error"].startswith("handler: CUDA out of memory \ntraceback: Traceback")
    assert "RuntimeError: CUDA out of memory" in results[raised]["error"]
    assert worker.returncode is None


def test_stop_signal_cancels_the_running_job_and_the_next_job_runs(
    plane: ControlPlane, fake_worker: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    fake_worker()
    marker = tmp_path / "stopped.json"
    long_job = plane.submit({"items": 100, "interval": 0.3, "marker": str(marker)})
    plane.wait_stream_items(long_job, 2, RESULT_TIMEOUT)

    plane.stop(long_job)
    plane.wait_for(marker.exists, 5.0, "marker from the stopped handler")
    seen = json.loads(marker.read_text())
    next_job = plane.submit({"items": 1})
    next_result = plane.wait_result(next_job, RESULT_TIMEOUT)

    # A stop that lands while the handler sleeps cancels it; one that lands while the SDK awaits a stream
    # post cancels that post instead, and the handler then sees GeneratorExit.
    assert seen["exception"] in ("CancelledError", "GeneratorExit")
    assert plane.stops_delivered[long_job] <= seen["at"], "the handler stopped before the worker was told"
    items = plane.stream_items(long_job)
    assert len(items) == seen["last_index"] + 1 < 100
    assert all(item.at < seen["at"] for item in items), "stream items after the cancel"
    assert long_job not in plane.results, "a stopped job gets no result post"
    assert next_result.body == {"output": [{"index": 0}]}


def test_concurrency_above_one_takes_a_batch_and_runs_jobs_side_by_side(
    plane: ControlPlane, fake_worker: Callable[..., WorkerProcess]
) -> None:
    long_job = plane.submit({"items": 10, "interval": 0.2})
    short_job = plane.submit({"items": 3, "interval": 0.2})
    fake_worker(FAKE_WORKER_CONCURRENCY="2")

    long_result = plane.wait_result(long_job, RESULT_TIMEOUT)
    short_result = plane.wait_result(short_job, RESULT_TIMEOUT)

    first_take = plane.takes[0]
    assert (first_take.batch_size, first_take.job_in_progress) == (2, False)
    assert first_take.job_ids == (long_job, short_job)
    long_times = [item.at for item in plane.stream_items(long_job)]
    short_times = [item.at for item in plane.stream_items(short_job)]
    # Taken together and run side by side: the short job, taken second, ends first.
    assert short_times[-1] < long_times[-1]
    # With one of two slots busy the worker asks the single-job URL: batch_size is the number of
    # free slots, not the concurrency.
    refills = [take for take in plane.takes if short_result.at < take.at < long_result.at]
    assert refills
    assert all(take.batch_size is None and take.job_in_progress for take in refills)


def test_heartbeats_carry_the_running_job_once_an_api_key_is_set(
    plane: ControlPlane, fake_worker: Callable[..., WorkerProcess]
) -> None:
    fake_worker(RUNPOD_AI_API_KEY="test-key", RUNPOD_PING_INTERVAL="1000")
    job_id = plane.submit({"items": 6, "interval": 0.25})

    plane.wait_result(job_id, RESULT_TIMEOUT)

    pings = plane.pings
    assert any(ping.query.get("job_id") == job_id for ping in pings), [p.query for p in pings]
    assert {ping.query["runpod_version"] for ping in pings} == {"1.12.0"}
    # The key is sent raw (no "Bearer") on heartbeats and on every job request.
    assert {call.headers["Authorization"] for call in plane.calls} == {"test-key"}


# ---------------------------------------------------------------------------- local API mode
@pytest.fixture(scope="module")
def local_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalApi]:
    log_path = tmp_path_factory.mktemp("local_api") / "server.log"
    try:
        with serve_local_api(FAKE_HANDLER, cwd=log_path.parent, log_path=log_path) as api:
            yield api
    finally:
        print(f"--- {log_path}\n{log_path.read_text()}")


def test_local_api_runsync_returns_the_aggregated_output(local_api: LocalApi) -> None:
    response = local_api.runsync({"items": 3, "interval": 0.01})

    assert response.status == 200
    assert response.body["status"] == "COMPLETED"
    assert response.body["output"] == [{"index": 0}, {"index": 1}, {"index": 2}]


def test_local_api_run_then_status_runs_the_job_once(local_api: LocalApi) -> None:
    job_id = local_api.run({"items": 2, "interval": 0.01})

    first, second = local_api.status(job_id), local_api.status(job_id)

    assert first.status == 200
    assert first.body == {
        "id": job_id,
        "status": "COMPLETED",
        "output": [{"index": 0}, {"index": 1}],
    }
    assert second.body == {"id": job_id, "status": "FAILED", "error": "Job ID not found"}
    assert local_api.request("GET", f"/status/{job_id}").status == 405


def test_local_api_stream_returns_every_item_at_the_end(local_api: LocalApi) -> None:
    job_id = local_api.run({"items": 2, "interval": 0.01})

    response = local_api.stream(job_id)

    assert response.status == 200
    assert response.body == {
        "id": job_id,
        "status": "COMPLETED",
        "stream": [{"output": {"index": 0}}, {"output": {"index": 1}}],
    }


def test_local_api_does_not_report_failures_like_the_platform(local_api: LocalApi) -> None:
    """runpod 1.12.0 quirks: why failures are tested against the emulator, not here."""
    yielded = local_api.runsync({"items": 1, "fail": "yield", "message": "bad input"})
    raised = local_api.runsync({"items": 1, "fail": "raise", "message": "boom"})

    assert yielded.status == 200
    assert yielded.body["status"] == "COMPLETED"
    assert yielded.body["output"] == [{"index": 0}, {"error": "bad input"}]
    assert raised.status == 500
