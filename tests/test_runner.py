"""The job runner in process, on the tiny checkpoint's real scheduler: where finished audio goes when
storage fails, what JOB_TIMEOUT_S bounds, which pool each kind of blocking work waits in, and the seed a
job without one gets. Storage is moto's S3 server over HTTP behind the fault-injecting proxy."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dia2_worker.asr import VoiceCache, VoicePrefixes, WhisperTranscriber
from dia2_worker.jobs import JobMetrics, WorkerLimits, parse_job
from dia2_worker.runner import DOWNLOAD_THREADS, PLANNING_THREADS, JobRunner, Keeper, RunnerSettings, seed_for
from dia2_worker.scheduler import Scheduler
from dia2_worker.storage import LocalStorage, StorageSettings, make_storage
from s3_server import Fault, FaultProxy, MotoServer, bucket_env

ROOT = Path(__file__).resolve().parents[1]
JOB = {"text": "[S1] hello world", "seed": 1, "max_duration_s": 2.0}
FIELDS = dict(duration_s=1.0, timestamps=[], seed=1, metrics=JobMetrics(0, None, 0, 0, 0))
WAV = b"RIFF" + bytes(range(256)) * 40  # the keeper stores bytes; it never looks inside
DEFAULT_POOL = min(32, (os.cpu_count() or 1) + 4)
"""asyncio's default executor size: the pool everything shared before it got pools of its own."""


@pytest.fixture
def s3(moto: MotoServer, proxy: FaultProxy):
    bucket = moto.create_bucket()
    return lambda **env: make_storage(StorageSettings.from_env(bucket_env(proxy.url, bucket, **env)))


@pytest.fixture(scope="module")
def scheduler(engine) -> Iterator[Scheduler]:
    scheduler = Scheduler(engine, 1, engine.buffer_length(), decode_audio=True)
    yield scheduler
    scheduler.close()


def collect(runner: JobRunner, job_id: str, raw: object) -> list[dict]:
    async def items() -> list[dict]:
        return [item async for item in runner.run(job_id, raw)]

    return asyncio.run(items())


def keep(keeper: Keeper, wav: bytes = WAV, deadline: float | None = None) -> dict:
    return asyncio.run(keeper.keep("job-1", parse_job(JOB, WorkerLimits()), wav, FIELDS, deadline))


def spooled(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file())


# --- finished audio is never lost -------------------------------------------------------------------


def test_an_unwritable_output_dir_does_not_stop_a_healthy_upload(s3, moto: MotoServer, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    result = keep(Keeper(s3(), RunnerSettings(spool_dir=not_a_dir / "spool")))
    assert result["type"] == "result" and result["audio_url"] and "storage_error" not in result
    assert moto.client().get_object(Bucket=result["bucket"], Key=result["key"])["Body"].read() == WAV


def test_a_failed_upload_returns_small_audio_inline_and_leaves_no_spool_copy(s3, proxy: FaultProxy,
                                                                             tmp_path: Path) -> None:
    proxy.inject(Fault("error", status=403, code="AccessDenied", times=100))
    result = keep(Keeper(s3(), RunnerSettings(spool_dir=tmp_path / "spool")))
    assert base64.b64decode(result["audio_base64"]) == WAV and result["audio_url"] is None
    assert result["sha256"] == hashlib.sha256(WAV).hexdigest()
    assert result["storage_error"] == "the upload failed after 1 attempt"
    assert spooled(tmp_path) == []


def test_large_audio_goes_to_a_bounded_spool_that_the_error_names(s3, proxy: FaultProxy, tmp_path: Path) -> None:
    proxy.inject(Fault("error", status=403, code="AccessDenied", times=100))
    keeper = Keeper(s3(), RunnerSettings(spool_dir=tmp_path / "spool", inline_audio_max_bytes=100,
                                         spool_max_bytes=2 * len(WAV)))
    errors = []
    for n in range(3):
        result = asyncio.run(keeper.keep(f"job-{n}", parse_job(JOB, WorkerLimits()), WAV, FIELDS, None))
        errors.append(result["error"])
    path = Path(errors[-1].split("written to ")[1].split(" on the worker")[0])
    assert path.read_bytes() == WAV and "INLINE_AUDIO_MAX_BYTES" in errors[-1]
    assert proxy.url.split("//")[1] not in errors[-1], "the bucket's endpoint is a worker detail"
    assert [p.name for p in spooled(tmp_path)] == ["job-1.wav", "job-2.wav"], "the oldest copy made room"


RLIMIT_SCRIPT = """
import asyncio, resource, sys
from pathlib import Path
from dia2_worker.jobs import JobMetrics, WorkerLimits, parse_job
from dia2_worker.runner import Keeper, RunnerSettings
from dia2_worker.storage import StorageSettings, make_storage
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))  # a full disk: writes past 1000 bytes fail (EFBIG)
out, inline = Path(sys.argv[1]), int(sys.argv[2])
env = {"OUTPUT_DIR": str(out), **dict(arg.split("=", 1) for arg in sys.argv[3:])}
keeper = Keeper(make_storage(StorageSettings.from_env(env)), RunnerSettings(spool_dir=out / "spool",
                                                                             inline_audio_max_bytes=inline))
job = parse_job({"text": "[S1] hi"}, WorkerLimits())
result = asyncio.run(keeper.keep("job-1", job, bytes(5000), dict(duration_s=1.0, timestamps=[], seed=1,
                                                                  metrics=JobMetrics(0, None, 0, 0, 0)), None))
print(sorted(result))
print(result.get("error", result.get("storage_error")))
"""


@pytest.mark.parametrize("bucket", [False, True])
@pytest.mark.parametrize("inline", [10_000, 100])
def test_a_full_disk_falls_back_without_a_traceback(bucket: bool, inline: int, tmp_path: Path) -> None:
    """Local storage or a dead bucket, and no room on disk: inline when it fits, else an error saying the
    audio is lost; never a traceback."""
    env = ["BUCKET_ENDPOINT_URL=http://127.0.0.1:9", "BUCKET_NAME=outputs", "UPLOAD_MAX_ATTEMPTS=1",
           "BUCKET_ACCESS_KEY_ID=k", "BUCKET_SECRET_ACCESS_KEY=s"] if bucket else []
    run = subprocess.run([sys.executable, "-c", RLIMIT_SCRIPT, str(tmp_path / "out"), str(inline), *env],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    keys, message = run.stdout.splitlines()[-2:]
    if inline > 5000:
        assert "'audio_base64'" in keys and ("the upload failed after 1 attempt" == message)
    else:
        assert keys == "['error']" and message.endswith("is lost") and "no copy could be kept" in message
    assert "Traceback" not in message


def test_a_full_disk_does_not_stop_a_healthy_upload(moto: MotoServer, tmp_path: Path) -> None:
    env = [f"{name}={value}" for name, value in bucket_env(moto.endpoint_url, moto.create_bucket()).items()]
    run = subprocess.run([sys.executable, "-c", RLIMIT_SCRIPT, str(tmp_path / "out"), "100", *env],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    keys, _ = run.stdout.splitlines()[-2:]
    assert "'audio_url'" in keys and "'error'" not in keys and "'storage_error'" not in keys


# --- JOB_TIMEOUT_S counts from arrival and covers every phase ---------------------------------------


class HeldAudio(ThreadingHTTPServer):
    """Serves a WAV only once `release` is set: a download that hangs for as long as a test needs."""

    def __init__(self, wav: bytes) -> None:
        self.release, self.arrived = threading.Event(), threading.Semaphore(0)
        self.wav = wav
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.arrived.release()
                server.release.wait()
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.wav)))
                self.end_headers()
                self.wfile.write(server.wav)

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.daemon_threads = True
        threading.Thread(target=self.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server_port}/voice.wav"

    def close(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


@pytest.fixture
def held(tiny_dir: Path) -> Iterator[HeldAudio]:
    server = HeldAudio((tiny_dir / "prefix_s1.wav").read_bytes())
    yield server
    server.close()


def url_job(tiny_dir: Path, url: str) -> dict:
    words = json.loads((tiny_dir / "prefix_s1.words.json").read_text())["words"]
    return {**JOB, "prefix": {"speaker_1": {"audio_url": url, "words": words}}}


VOICES = VoicePrefixes(VoiceCache(0), WhisperTranscriber(Path("/nonexistent")))
"""No speech recognition: these jobs send words with any prefix."""
LOOPBACK = WorkerLimits(private_audio_networks=WorkerLimits.from_env(
    {"ALLOW_PRIVATE_AUDIO_URLS": "127.0.0.1"}).private_audio_networks, audio_url_timeout_s=60)


def test_the_time_limit_covers_the_download(scheduler: Scheduler, held: HeldAudio, tiny_dir: Path,
                                            tmp_path: Path) -> None:
    runner = JobRunner(scheduler, LocalStorage(StorageSettings(output_dir=tmp_path)), LOOPBACK,
                       RunnerSettings(job_timeout_s=0.5), VOICES)
    assert collect(runner, "slow", url_job(tiny_dir, held.url)) == [
        {"error": "timeout: the job's time limit passed while reading the input (JOB_TIMEOUT_S)"}]


def test_the_time_limit_covers_waiting_for_planning(scheduler: Scheduler, tmp_path: Path) -> None:
    """Planning threads all busy (long prefix encodes, say): the job's clock runs while it waits for one."""
    runner = JobRunner(scheduler, LocalStorage(StorageSettings(output_dir=tmp_path)), WorkerLimits(),
                       RunnerSettings(job_timeout_s=0.3), VOICES)
    busy = threading.Event()
    blockers = [runner.planning.submit(busy.wait) for _ in range(PLANNING_THREADS)]
    try:
        assert collect(runner, "queued", JOB) == [
            {"error": "timeout: the job's time limit passed while reading the input (JOB_TIMEOUT_S)"}]
    finally:
        busy.set()
    assert all(blocker.result() for blocker in blockers)


def test_the_time_limit_covers_the_wait_for_a_slot_and_generation(scheduler: Scheduler, tmp_path: Path) -> None:
    storage = LocalStorage(StorageSettings(output_dir=tmp_path))
    free = JobRunner(scheduler, storage, WorkerLimits(), RunnerSettings(), VOICES)
    timed = JobRunner(scheduler, storage, WorkerLimits(), RunnerSettings(job_timeout_s=0.3), VOICES)
    long_job = {"text": "[S1] " + "one two three four " * 6, "seed": 1, "chunk_ms": 80}

    async def both() -> tuple[list[dict], list[dict]]:
        occupying = free.run("occupying", long_job)
        first = await anext(occupying)  # the one slot is taken
        waiting = [item async for item in timed.run("waiting", JOB)]
        rest = [first] + [item async for item in occupying]
        return waiting, rest

    waiting, occupying = asyncio.run(both())
    assert waiting == [{"error": "timeout: the job's time limit passed while it waited for a slot (JOB_TIMEOUT_S)"}]
    assert occupying[-1]["type"] == "result"
    alone = collect(timed, "alone", long_job)
    assert alone[-1]["error"].startswith("timeout: the job") and alone[-1]["error"].endswith("(JOB_TIMEOUT_S)")
    assert "result" not in [item.get("type") for item in alone]


def test_the_time_limit_covers_the_upload(s3, proxy: FaultProxy, tmp_path: Path) -> None:
    """A bucket that never answers: the upload is given up at the job's deadline and the audio comes inline."""
    import time

    proxy.inject(Fault("stall", stall_s=30, times=100))
    keeper = Keeper(s3(BUCKET_READ_TIMEOUT_S="60"), RunnerSettings(spool_dir=tmp_path, upload_timeout_s=600))
    result = keep(keeper, deadline=time.monotonic() + 0.5)
    assert result["storage_error"] == "the upload did not finish in time (JOB_TIMEOUT_S)"
    assert base64.b64decode(result["audio_base64"]) == WAV


def test_upload_timeout_bounds_all_the_retries(s3, proxy: FaultProxy, tmp_path: Path) -> None:
    proxy.inject(Fault("stall", stall_s=30, times=100))
    keeper = Keeper(s3(BUCKET_READ_TIMEOUT_S="60"), RunnerSettings(spool_dir=tmp_path, upload_timeout_s=0.5))
    assert keep(keeper)["storage_error"] == "the upload did not finish in time (UPLOAD_TIMEOUT_S)"


# --- separate pools: no job waits behind another kind of work -----------------------------------------


def test_a_job_without_downloads_runs_while_downloads_hang(scheduler: Scheduler, held: HeldAudio, tiny_dir: Path,
                                                           tmp_path: Path) -> None:
    runner = JobRunner(scheduler, LocalStorage(StorageSettings(output_dir=tmp_path)), LOOPBACK, RunnerSettings(), VOICES)

    async def run() -> tuple[list[dict], bool]:
        downloads = [asyncio.ensure_future(anext(runner.run(f"url-{n}", url_job(tiny_dir, held.url))))
                     for n in range(DEFAULT_POOL + 1)]
        for _ in downloads:  # every download is in flight, held by the server
            await asyncio.to_thread(held.arrived.acquire)
        good = [item async for item in runner.run("good", JOB)]
        still_held = not any(d.done() for d in downloads)
        held.release.set()
        await asyncio.gather(*downloads)
        return good, still_held

    good, still_held = asyncio.run(run())
    assert good[-1]["type"] == "result" and still_held


def test_a_cheap_mistake_beside_an_audio_url_is_answered_while_downloads_hang(
        scheduler: Scheduler, held: HeldAudio, tiny_dir: Path, tmp_path: Path) -> None:
    runner = JobRunner(scheduler, LocalStorage(StorageSettings(output_dir=tmp_path)), LOOPBACK, RunnerSettings(), VOICES)

    async def run() -> tuple[list[dict], bool]:
        downloads = [asyncio.ensure_future(anext(runner.run(f"url-{n}", url_job(tiny_dir, held.url))))
                     for n in range(DOWNLOAD_THREADS)]
        for _ in downloads:  # every download thread is busy
            await asyncio.to_thread(held.arrived.acquire)
        bad = [item async for item in runner.run("bad", {**url_job(tiny_dir, held.url), "top_k": 0})]
        still_held = not any(d.done() for d in downloads)
        held.release.set()
        await asyncio.gather(*downloads)
        return bad, still_held

    bad, still_held = asyncio.run(run())
    assert bad == [{"error": "top_k: must be an integer between 1 and 10000, got 0"}] and still_held


def test_bad_input_is_answered_while_uploads_hang(scheduler: Scheduler, s3, proxy: FaultProxy,
                                                  tmp_path: Path) -> None:
    proxy.inject(Fault("stall", stall_s=30, times=1000))
    storage = s3(BUCKET_READ_TIMEOUT_S="60", UPLOAD_MAX_ATTEMPTS="1")  # once the proxy closes, they give up
    runner = JobRunner(scheduler, storage, WorkerLimits(), RunnerSettings(spool_dir=tmp_path, upload_timeout_s=60), VOICES)
    finished: list[str] = []

    async def job(job_id: str, raw: dict) -> None:
        async for item in runner.run(job_id, raw):
            if "error" in item or item.get("type") == "result":
                finished.append(job_id)

    async def run() -> None:
        uploads = [asyncio.ensure_future(job(f"upload-{n}", JOB)) for n in range(DEFAULT_POOL + 1)]
        while len(proxy.requests("HeadObject")) < len(uploads):  # every upload hangs on its first request
            await asyncio.sleep(0.05)
        await job("bad", {**JOB, "temperature": "hot"})
        for upload in uploads:
            upload.cancel()

    asyncio.run(run())
    assert finished == ["bad"]


# --- a job without a seed --------------------------------------------------------------------------


def test_a_retried_job_without_a_seed_repeats_its_audio(scheduler: Scheduler, tmp_path: Path) -> None:
    runner = JobRunner(scheduler, LocalStorage(StorageSettings(output_dir=tmp_path)), WorkerLimits(),
                       RunnerSettings(), VOICES)
    unseeded = {"text": "[S1] hello world", "max_duration_s": 2.0}
    first, retry, other = (collect(runner, job_id, unseeded)[-1] for job_id in ("job-a", "job-a", "job-b"))
    assert first["seed"] == retry["seed"] == seed_for("job-a") and first["sha256"] == retry["sha256"]
    assert other["seed"] == seed_for("job-b") != first["seed"]
    assert seed_for("job-a") == int(hashlib.sha256(b"job-a").hexdigest()[:16], 16) & (2**63 - 1)


# --- the aggregated output stays within RunPod's payload limit ---------------------------------------


@pytest.mark.parametrize("stream", [True, False])
def test_inline_audio_only_when_the_whole_output_fits(scheduler: Scheduler, s3, proxy: FaultProxy, tmp_path: Path,
                                                      stream: bool) -> None:
    """return_aggregate_stream repeats every stream item in the final output: streamed audio plus the same
    audio inline would pass the limit, so it is spooled; without streamed audio it goes inline."""
    proxy.inject(Fault("error", status=403, code="AccessDenied", times=100))
    limit = 150_000  # this job streams ~90 kB of JSON; its WAV inline adds ~87 kB
    runner = JobRunner(scheduler, s3(), WorkerLimits(), RunnerSettings(spool_dir=tmp_path, max_output_bytes=limit), VOICES)
    items = collect(runner, "job-1", {**JOB, "stream": stream, "chunk_ms": 80})
    assert sum(len(json.dumps(item)) for item in items) <= limit
    if stream:
        assert "the room left in the job's output (at most 150000 bytes" in items[-1]["error"]
        assert [p.name for p in spooled(tmp_path)] == ["job-1.wav"]
    else:
        assert items[-1]["type"] == "result" and items[-1]["audio_base64"]
