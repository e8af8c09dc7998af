"""The worker end to end: `python handler.py` on the tiny checkpoint, against the loopback control-plane
emulator (the SDK's real worker loop) and the SDK's local API, storing into moto's S3 server over HTTP."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import linked_long_model
from control_plane import ControlPlane
from local_api import serve_local_api
from s3_server import FaultProxy, MotoServer, bucket_env

ROOT = Path(__file__).resolve().parents[1]
HANDLER = ROOT / "handler.py"
TEST_INPUT = json.loads((ROOT / "test_input.json").read_text())["input"]
READY_TIMEOUT = 60.0
JOB_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def long_model(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with Dia2's real 1500-frame context, so a generation can run long enough to be
    stopped halfway."""
    model = tmp_path_factory.mktemp("long-model")
    (model / "config.json").write_text(json.dumps(linked_long_model(tiny_dir, model)))
    return model


def worker_env(model_dir: Path, output_dir: Path, storage: dict[str, str], **extra: str) -> dict[str, str]:
    return {"MODEL_DIR": str(model_dir), "DEVICE": "cpu", "OUTPUT_DIR": str(output_dir), "LOG_LEVEL": "INFO",
            "MAX_PREFIX_AUDIO_S": "5", **storage, **extra}


@pytest.fixture
def worker(start_worker):
    """Starts handler.py against the emulator with these settings."""
    return lambda env: start_worker(HANDLER, env, ROOT, READY_TIMEOUT)

def audio_items(items: list[dict]) -> list[dict]:
    return [item for item in items if item.get("type") == "audio"]


def streamed_pcm(items: list[dict]) -> bytes:
    chunks = audio_items(items)
    assert [c["seq"] for c in chunks] == list(range(len(chunks)))
    position = 0
    for chunk in chunks:
        assert chunk["start_sample"] == position and chunk["encoding"] == "pcm_s16le"
        position += chunk["num_samples"]
    return b"".join(base64.b64decode(c["audio_base64"]) for c in chunks)


def wav_samples(wav: bytes) -> bytes:
    data, rate = sf.read(io.BytesIO(wav), dtype="int16")
    assert rate == 24000 and data.ndim == 1
    return data.astype("<i2").tobytes()


def check_stored_result(result: dict, items: list[dict], moto: MotoServer) -> bytes:
    """The result's object is in the bucket with the stated sha256 and holds exactly the streamed PCM."""
    stored = moto.client().get_object(Bucket=result["bucket"], Key=result["key"])["Body"].read()
    assert hashlib.sha256(stored).hexdigest() == result["sha256"]
    assert wav_samples(stored) == streamed_pcm(items)
    assert result["duration_s"] == pytest.approx(len(streamed_pcm(items)) / 2 / 24000)
    return stored


def outputs(plane: ControlPlane, job_id: str) -> tuple[dict, list[dict]]:
    result = plane.wait_result(job_id, JOB_TIMEOUT).body
    return result, [post.body["output"] for post in plane.stream_items(job_id)]


def test_jobs_stream_upload_and_fail_cleanly(plane: ControlPlane, worker, moto: MotoServer,
                                              tiny_dir: Path, tmp_path: Path) -> None:
    bucket = moto.create_bucket()
    started = worker(worker_env(tiny_dir, tmp_path / "out", bucket_env(moto.endpoint_url, bucket), SLOTS="1"))
    good = plane.submit(TEST_INPUT)
    bad_type = plane.submit({**TEST_INPUT, "temperature": "hot"})
    unknown = plane.submit({**TEST_INPUT, "speed": 2})
    too_long = plane.submit({**TEST_INPUT, "text": "[S1] " + "hello world " * 60, "max_duration_s": 12.8})
    too_short = plane.submit({**TEST_INPUT, "max_duration_s": 1})
    quiet = plane.submit({**TEST_INPUT, "stream": False, "seed": 7})

    result, items = outputs(plane, good)
    final = result["output"][-1]
    assert result["output"] == items and final["type"] == "result" and final["seed"] == TEST_INPUT["seed"]
    first_audio = next(post for post in plane.stream_items(good) if post.body["output"].get("type") == "audio")
    result_post = plane.wait_result(good, 1)
    assert first_audio.at < plane.stream_items(good)[-1].at <= result_post.at
    check_stored_result(final, items, moto)
    with io.BytesIO() as fetched:  # the presigned URL serves the same object
        from urllib.request import urlopen
        fetched.write(urlopen(final["audio_url"], timeout=10).read())
        assert hashlib.sha256(fetched.getvalue()).hexdigest() == final["sha256"]
    assert final["key"] == f"examples/{good}.wav"
    metrics = final["metrics"]
    assert metrics["frames"] * 1920 == len(streamed_pcm(items)) // 2 and 0 < metrics["ttfa_ms"] <= metrics["queue_ms"] + metrics["generate_ms"] + 1000
    words = [w for item in items if item.get("type") == "words" for w in item["words"]]
    assert words == final["timestamps"] and words

    assert plane.wait_result(bad_type, JOB_TIMEOUT).body == {
        "error": 'temperature: must be a number between 0 and 5, got "hot"'}
    assert plane.wait_result(unknown, JOB_TIMEOUT).body["error"].startswith("speed: unknown field speed (allowed")
    error = plane.wait_result(too_long, JOB_TIMEOUT).body["error"]
    assert error.startswith("text: the text needs at least") and "the limit is 160 frames" in error
    error = plane.wait_result(too_short, JOB_TIMEOUT).body["error"]
    assert error.startswith("max_duration_s: the text needs at least") and "the limit is 16 frames (1.3 s)" in error

    # The ready line counts from the process's start, as the cold-start tool does: the interpreter and the
    # imports before loading began are in it.
    ready = re.search(r"ready (\d+\.\d+) s after the process started \(loading took (\d+\.\d+) s\)", started.log())
    assert ready and float(ready[1]) > float(ready[2]), started.log()

    quiet_result, quiet_items = outputs(plane, quiet)
    assert not audio_items(quiet_items) and {i["type"] for i in quiet_items} >= {"progress", "result"}
    stored = moto.client().get_object(Bucket=bucket, Key=quiet_items[-1]["key"])["Body"].read()
    assert hashlib.sha256(stored).hexdigest() == quiet_items[-1]["sha256"]


def test_stopped_job_ends_early_and_the_next_job_runs(plane: ControlPlane, worker, moto: MotoServer,
                                                      long_model: Path, tmp_path: Path) -> None:
    bucket = moto.create_bucket()
    worker(worker_env(long_model, tmp_path / "out", bucket_env(moto.endpoint_url, bucket)))
    script = "[S1] " + " ".join(["one two three four five six seven eight"] * 12)
    long_job = plane.submit({"text": script, "seed": 3, "chunk_ms": 80})
    plane.wait_stream_items(long_job, 3, JOB_TIMEOUT)
    plane.stop(long_job)
    plane.wait_for(lambda: plane.stops_delivered and long_job in plane.stops_delivered, 10, "stop delivered")
    after = plane.submit(TEST_INPUT)
    result, items = outputs(plane, after)
    check_stored_result(result["output"][-1], items, moto)
    streamed = plane.stream_items(long_job)
    assert long_job not in plane.results, "a stopped job posts no result"
    assert sum(len(p.body["output"].get("audio_base64", "")) for p in streamed) < 1500 * 1920 * 2 * 4 / 3 / 4
    assert not any(o.get("type") == "result" for o in (p.body["output"] for p in streamed))


def test_storage_outage_falls_back_to_inline_audio_or_names_the_spool_file(
        plane: ControlPlane, worker, moto: MotoServer, tiny_dir: Path, tmp_path: Path) -> None:
    bucket = moto.create_bucket()
    proxy = FaultProxy(moto.endpoint_url).__enter__()
    storage = bucket_env(proxy.url, bucket, UPLOAD_MAX_ATTEMPTS="3")
    worker(worker_env(tiny_dir, tmp_path / "out", storage, INLINE_AUDIO_MAX_BYTES="200000"))
    small = plane.submit({**TEST_INPUT, "text": "[S1] hello world", "max_duration_s": 3})
    plane.wait_stream_items(small, 1, JOB_TIMEOUT)
    proxy.__exit__(None, None, None)  # the S3 endpoint goes away while the job is running
    large = plane.submit(TEST_INPUT)

    result, items = outputs(plane, small)
    final = result["output"][-1]
    assert final["audio_url"] is None and final["bucket"] is None
    wav = base64.b64decode(final["audio_base64"])
    assert hashlib.sha256(wav).hexdigest() == final["sha256"] and wav_samples(wav) == streamed_pcm(items)

    error = plane.wait_result(large, JOB_TIMEOUT).body["error"]
    assert "after 3 attempts" in error and "INLINE_AUDIO_MAX_BYTES" in error
    spool = Path(error.split("written to ")[1].split(" on the worker")[0])
    assert spool.is_file() and wav_samples(spool.read_bytes()) == streamed_pcm(
        [p.body["output"] for p in plane.stream_items(large)])


def test_sixteen_concurrent_jobs_complete_like_jobs_run_alone(plane: ControlPlane, worker, moto: MotoServer,
                                                              tiny_dir: Path, tmp_path: Path) -> None:
    bucket = moto.create_bucket()
    worker(worker_env(tiny_dir, tmp_path / "out", bucket_env(moto.endpoint_url, bucket),
                            SLOTS="8", MAX_CONCURRENCY="16"))
    scripts = ["[S1] hello world", "[S2] how are you today", "[S1] the quick brown fox [S2] jumps",
               "[S1] fine thanks"]
    # A job without "input" reaches the worker, which answers it, when the SDK takes it in a batch: it is queued
    # first, so the worker's first take (16 free places: the batch URL) holds it. The SDK's single-job take (one
    # free place) drops it unanswered (README, "Job input").
    no_input = plane.submit_job({"id": "no-input"})
    jobs = {}
    for n in range(16):
        job_input = {"text": scripts[n % 4], "seed": n, "temperature": [0.0, 0.8][n % 2], "top_k": 10 + n,
                     "cfg_scale": [1.0, 2.0, 3.0][n % 3], "chunk_ms": 160 * (1 + n % 3), "max_duration_s": 8}
        jobs[plane.submit(job_input)] = job_input
    concurrent = {job_id: outputs(plane, job_id) for job_id in jobs}
    assert plane.wait_result(no_input, JOB_TIMEOUT).body == {"error": "input: must be a JSON object, got null"}
    for job_id, (result, items) in concurrent.items():
        assert "error" not in result, result
        check_stored_result(items[-1], items, moto)
    takes = [t for t in plane.takes if t.job_ids]
    assert max(len(t.job_ids) for t in takes) > 1, "the worker took jobs in batches"
    # Each job alone gives the same audio: the batch does not change a generation.
    for job_id in list(jobs)[:4]:
        alone = plane.submit(jobs[job_id])
        assert outputs(plane, alone)[1][-1]["sha256"] == concurrent[job_id][1][-1]["sha256"]


def test_local_api_and_client(moto: MotoServer, tiny_dir: Path, tmp_path: Path) -> None:
    from dia2_worker.client import Api, follow

    bucket = moto.create_bucket()
    env = worker_env(tiny_dir, tmp_path / "out", bucket_env(moto.endpoint_url, bucket))
    with serve_local_api(HANDLER, ROOT, env, tmp_path / "api.log", ready_timeout=READY_TIMEOUT) as api:
        response = api.runsync(TEST_INPUT)
        assert response.status == 200 and response.body["status"] == "COMPLETED", response.body
        items = response.body["output"]
        check_stored_result(items[-1], items, moto)

        job_id = api.run(TEST_INPUT)
        status = api.status(job_id).body
        assert status["status"] == "COMPLETED"
        check_stored_result(status["output"][-1], status["output"], moto)

        out = tmp_path / "client.wav"
        result = follow(Api(api.base_url, None, local=True, timeout=JOB_TIMEOUT), TEST_INPUT, out)
        stored = moto.client().get_object(Bucket=bucket, Key=result["key"])["Body"].read()
        assert wav_samples(out.read_bytes()) == wav_samples(stored)
        assert result["sha256"] == items[-1]["sha256"]  # same seed, same audio


def test_voice_prefix_jobs_reproduce_the_golden_case(plane: ControlPlane, worker, moto: MotoServer, tiny_dir: Path,
                                                     golden, golden_cases, tmp_path: Path) -> None:
    """A prefix sent inline and the same prefix fetched from a URL both give the original runtime's output."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    wav = (tiny_dir / "prefix_s1.wav").read_bytes()

    class Audio(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "audio/wav")
            self.send_header("Content-Length", str(len(wav)))
            self.end_headers()
            self.wfile.write(wav)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Audio)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        bucket = moto.create_bucket()
        worker(worker_env(tiny_dir, tmp_path / "out", bucket_env(moto.endpoint_url, bucket),
                          ALLOW_PRIVATE_AUDIO_URLS="127.0.0.1"))
        case = next(c for c in golden_cases if c["name"] == "prefix_include1")
        words = json.loads((tiny_dir / "prefix_s1.words.json").read_text())["words"]
        job = {"text": case["script"], "temperature": 0, "text_temperature": 0, "cfg_scale": case["cfg_scale"],
               "cfg_filter_k": case["cfg_filter_k"], "include_prefix": True}
        sources = [{"audio_base64": base64.b64encode(wav).decode()},
                   {"audio_url": f"http://127.0.0.1:{server.server_port}/alice.wav"}]
        jobs = [plane.submit({**job, "prefix": {"speaker_1": {**source, "words": words}}}) for source in sources]
        expected = (np.clip(golden[f"{case['name']}.waveform"].numpy(), -1, 1) * 32767).astype(np.int16)
        for job_id in jobs:
            result, items = outputs(plane, job_id)
            final = result["output"][-1]
            assert final["timestamps"] == case["timestamps"], final
            pcm = np.frombuffer(check_stored_result(final, items, moto)[44:], dtype="<i2")
            assert pcm.shape == expected.shape and np.abs(pcm.astype(np.int32) - expected).max() <= 4
    finally:
        server.shutdown()
