"""The speech server end to end: `python -m dia2_worker.serve` on loopback with the tiny checkpoint, driven by
the official `openai` client, checked against the queue worker's audio for the same seed (the worker service
in this process, storing into a local directory)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from conftest import linked_long_model
from dia2_worker.asr import WhisperTranscriber
from dia2_worker.audio import read_audio
from dia2_worker.random_asr import WORDS
from test_encoders import decode

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key"
TEXT = "[S1] Hello there, how are you? [S2] Fine, thanks."
DIA2 = {"seed": 7, "max_duration_s": 5}
LONG = {"seed": 3, "max_duration_s": 60}  # long enough to be stopped halfway, never awaited to the end
LONG_TEXT = " ".join(["[S1] Tell me the whole story from the very beginning. [S2] It was a long day."] * 4)
TIMEOUT = 60.0


class Server:
    """A running `python -m dia2_worker.serve`: its base URL, and its log, read as it is written."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        """As the image starts it: `python -u handler.py` with SERVE_MODE=http (PORT=0: any free port)."""
        self.log_path = log_path
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.process = subprocess.Popen([sys.executable, "-u", "handler.py"], cwd=ROOT,
                                        env={**env, "SERVE_MODE": "http", "PORT": "0"}, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()
        port = self.wait_line(r"listening on http://0\.0\.0\.0:(\d+)").group(1)
        self.url = f"http://127.0.0.1:{port}"

    def _read(self) -> None:
        with self.log_path.open("w") as log:
            for line in self.process.stdout:
                log.write(line)
                log.flush()
                with self.changed:
                    self.lines.append(line)
                    self.changed.notify_all()
        with self.changed:
            self.lines.append("<exited>")
            self.changed.notify_all()

    def wait_line(self, pattern: str, start: int = 0) -> re.Match:
        """The first log line from `start` on that matches; fails if the process ends or TIMEOUT passes."""
        found = None

        def seen() -> bool:
            nonlocal found
            found = next((m for line in self.lines[start:] if (m := re.search(pattern, line))), None)
            return found is not None or "<exited>" in self.lines

        with self.changed:
            assert self.changed.wait_for(seen, TIMEOUT), f"no log line matching {pattern!r}"
        assert found is not None, f"server exited before logging {pattern!r}:\n{''.join(self.lines)}"
        return found

    def stop(self) -> int:
        self.process.terminate()
        return self.process.wait(30)


@pytest.fixture(scope="module")
def voices(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("voices")
    shutil.copy(tiny_dir / "prefix_s1.wav", directory / "narrator.wav")
    shutil.copy(tiny_dir / "prefix_s1.words.json", directory / "narrator.json")
    return directory


@pytest.fixture(scope="module")
def server(tiny_dir: Path, voices: Path, asr_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, list]]:
    """One slot and one waiting place. config.json is a pipe the test writes only after the first /ping, so
    that ping is answered while the model is still loading; the context is Dia2's full 1500 frames."""
    model = tmp_path_factory.mktemp("model")
    config = linked_long_model(tiny_dir, model)
    os.mkfifo(model / "config.json")
    env = {**os.environ, "MODEL_DIR": str(model), "DEVICE": "cpu", "SLOTS": "1", "MAX_WAITING": "1",
           "OUTPUT_DIR": str(tmp_path_factory.mktemp("out")), "VOICES_DIR": str(voices), "API_KEY": API_KEY,
           "MAX_PREFIX_AUDIO_S": "5", "LOG_LEVEL": "INFO", "ASR_MODEL_DIR": str(asr_dir)}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        env.pop(name, None)
    running = Server(env, tmp_path_factory.mktemp("log") / "server.log")
    pings = [httpx.get(f"{running.url}/ping", timeout=TIMEOUT).status_code]
    (model / "config.json").write_text(json.dumps(config))  # blocks until the loader opens the pipe
    running.wait_line(r"ready [0-9.]+ s after the process started")
    pings.append(httpx.get(f"{running.url}/ping", timeout=TIMEOUT).status_code)
    try:
        yield running, pings
    finally:
        code = running.stop()
        print("".join(running.lines))
    assert code == 0


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0].url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def queue_job(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """run(input) -> (streamed pcm, stored file): the queue worker's service in this process, storing into
    moto's S3 server; the stored object's key extension and Content-Type follow output.format."""
    from s3_server import MotoServer, bucket_env

    from dia2_worker.encoders import FORMATS
    from dia2_worker.worker import WorkerService

    done: dict[str, tuple[bytes, bytes]] = {}
    with MotoServer() as moto:
        env = {"MODEL_DIR": str(tiny_dir), "DEVICE": "cpu", "OUTPUT_DIR": str(tmp_path_factory.mktemp("queue")),
               **bucket_env(moto.endpoint_url, moto.create_bucket())}
        service = WorkerService.load(env)

        def generate(job_input: dict) -> tuple[bytes, bytes]:
            async def items() -> list[dict]:
                return [item async for item in service.handle({"id": f"job-{len(done)}", "input": job_input})]

            collected = asyncio.run(items())
            result = collected[-1]
            assert result.get("type") == "result", result
            pcm = b"".join(base64.b64decode(i["audio_base64"]) for i in collected if i["type"] == "audio")
            stored = moto.client().get_object(Bucket=result["bucket"], Key=result["key"])
            audio_format = FORMATS[job_input.get("output", {}).get("format", "wav")]
            assert result["key"].endswith(audio_format.extension)
            assert stored["ContentType"] == audio_format.content_type
            return pcm, stored["Body"].read()

        def run(job_input: dict) -> tuple[bytes, bytes]:
            key = json.dumps(job_input, sort_keys=True)
            if key not in done:
                done[key] = generate(job_input)
            return done[key]

        yield run
        service.scheduler.close()


def speak(client: openai.OpenAI, path: Path, **fields) -> dict[str, str]:
    """Stream one request to a file with the openai client; returns the response headers."""
    extra = {key: fields.pop(key) for key in list(fields) if key not in ("input", "voice", "response_format",
                                                                        "stream_format", "model", "speed")}
    request = {"model": "dia2", "input": TEXT, "voice": "alloy", **fields}
    with client.audio.speech.with_streaming_response.create(**request, extra_body=extra) as response:
        response.stream_to_file(path)
        return dict(response.headers)


def test_ping_answers_204_while_loading_then_200(server) -> None:
    assert server[1] == [204, 200]


def test_models_lists_the_loaded_model(client: openai.OpenAI) -> None:
    ids = [model.id for model in client.models.list()]
    assert ids[0] != "dia2" and "dia2" in ids  # the loaded model's id (its directory's name), then the alias


@pytest.mark.parametrize("fmt", ["wav", "pcm", "flac", "mp3", "opus"])
def test_each_format_streams_the_queue_workers_audio(fmt: str, client: openai.OpenAI, queue_job,
                                                     tmp_path: Path) -> None:
    headers = speak(client, tmp_path / f"out.{fmt}", response_format=fmt, **DIA2)
    assert headers["x-seed"] == str(DIA2["seed"]) and re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"])
    streamed = (tmp_path / f"out.{fmt}").read_bytes()
    queue_pcm, _ = queue_job({"text": TEXT, **DIA2})
    reference = np.frombuffer(queue_pcm, dtype="<i2")
    assert len(reference) > 0
    if fmt == "pcm":
        assert headers["content-type"] == "audio/pcm"
        assert streamed == queue_pcm
        return
    samples = decode(streamed)
    if fmt in ("wav", "flac"):
        assert np.array_equal(samples, reference)
    if fmt != "wav":  # the queue's stored file of the same format: same samples (lossy: same length)
        _, stored = queue_job({"text": TEXT, **DIA2, "output": {"format": fmt}})
        stored_samples = decode(stored)
        assert len(samples) == len(stored_samples)
        if fmt == "flac":
            assert np.array_equal(samples, stored_samples)
        else:
            assert len(samples) >= len(reference)


def test_sse_events_carry_the_audio_then_usage_and_words(client: openai.OpenAI, queue_job, tmp_path: Path) -> None:
    speak(client, tmp_path / "out.sse", response_format="pcm", stream_format="sse", **DIA2)
    events = []
    for block in (tmp_path / "out.sse").read_text().split("\n\n"):
        if block.strip():
            assert block.startswith("data: ")
            events.append(json.loads(block.removeprefix("data: ")))
    deltas, done = events[:-1], events[-1]
    assert len(deltas) > 1 and {e["type"] for e in deltas} == {"speech.audio.delta"}
    assert len(base64.b64decode(deltas[0]["audio"])) == 1920 * 2  # the first frame leaves on its own
    queue_pcm, _ = queue_job({"text": TEXT, **DIA2})
    assert b"".join(base64.b64decode(e["audio"]) for e in deltas) == queue_pcm
    assert done["type"] == "speech.audio.done"
    usage = done["usage"]
    assert usage["output_tokens"] * 1920 * 2 == len(queue_pcm)  # one output token per 80 ms frame
    assert usage["input_tokens"] > 0 and usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert [w for w, _ in done["timestamps"]][:2] == ["Hello", "there,"]


BAD_FIELDS = [
    ({"model": "tts-1"}, "model", '"dia2" or'),
    ({"input": None}, "input", "required: the [S1]/[S2] dialogue script"),
    ({"input": ""}, "input", "must not be empty"),
    ({"input": 5}, "input", "must be a string"),
    ({"model": ["dia2"]}, "model", '"dia2" or'),
    ({"voice": "nobody"}, "voice", "registered voices: narrator"),
    ({"voice": {"name": "narrator"}}, "voice", "registered voices: narrator"),
    ({"response_format": "aac"}, "response_format", "wav, pcm, flac, mp3, opus"),
    ({"response_format": ["wav"]}, "response_format", "wav, pcm, flac, mp3, opus"),
    ({"speed": 1.25}, "speed", "Dia2 speaks at its own pace"),
    ({"stream_format": "chunks"}, "stream_format", "audio or sse"),
    ({"seed": -1}, "seed", "must be an integer between 0 and"),
    ({"temperature": 7.5}, "temperature", "temperature: must be a number between 0 and 5, got 7.5"),
    ({"top_k": 0}, "top_k", "must be an integer between 1 and 10000"),
    ({"text_temperature": "hot"}, "text_temperature", "must be a number"),
    ({"text_top_k": 1.5}, "text_top_k", "must be an integer"),
    ({"cfg_scale": 0}, "cfg_scale", "greater than 0"),
    ({"cfg_filter_k": 0}, "cfg_filter_k", "must be an integer"),
    ({"max_duration_s": 500}, "max_duration_s", "at most"),
    ({"prefix": {"speaker_1": {"words": []}}}, "prefix.speaker_1", "audio_base64 or audio_url"),
    ({"chunk_ms": 80}, "chunk_ms", "unknown field chunk_ms"),
    ({"x\nERROR | forged": 1}, '"x\\nERROR | forged"', 'unknown field "x\\nERROR | forged"'),  # escaped
    ({"voice": "narrator", "prefix": {}}, "voice", "not both"),
]


@pytest.mark.parametrize(("fields", "param", "fragment"), BAD_FIELDS, ids=[p for _, p, _ in BAD_FIELDS])
def test_every_bad_field_is_a_400_naming_it(fields: dict, param: str, fragment: str, server) -> None:
    body = {"model": "dia2", "input": TEXT, "voice": "alloy", **fields}
    response = httpx.post(f"{server[0].url}/v1/audio/speech", json=body, timeout=TIMEOUT,
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"].startswith(f"{param}: ") and fragment in error["message"], error["message"]


@pytest.mark.parametrize("body", [b"[1, 2]", b"{not json"])
def test_a_body_that_is_not_a_json_object_is_a_400(body: bytes, server) -> None:
    response = httpx.post(f"{server[0].url}/v1/audio/speech", content=body, timeout=TIMEOUT,
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "the request body must be a JSON object"


def test_the_openai_client_sees_the_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.speech.create(model="dia2", input=TEXT, voice="alloy", extra_body={"temperature": 7.5})
    assert caught.value.param == "temperature"
    assert caught.value.body["message"] == "temperature: must be a number between 0 and 5, got 7.5"


def test_a_registered_voice_is_its_prefix(client: openai.OpenAI, tiny_dir: Path, tmp_path: Path) -> None:
    speak(client, tmp_path / "voice.pcm", voice="narrator", response_format="pcm", **DIA2)
    prefix = {"speaker_1": {"audio_base64": base64.b64encode((tiny_dir / "prefix_s1.wav").read_bytes()).decode(),
                            "words": json.loads((tiny_dir / "prefix_s1.words.json").read_text())["words"]}}
    speak(client, tmp_path / "prefix.pcm", response_format="pcm", prefix=prefix, **DIA2)
    speak(client, tmp_path / "none.pcm", voice="echo", response_format="pcm", **DIA2)
    voiced = (tmp_path / "voice.pcm").read_bytes()
    assert voiced == (tmp_path / "prefix.pcm").read_bytes()
    assert voiced != (tmp_path / "none.pcm").read_bytes()


def test_a_recording_alone_is_transcribed_for_its_prefix(client: openai.OpenAI, tiny_dir: Path, asr_dir: Path,
                                                         tmp_path: Path) -> None:
    """A prefix sent without words speaks as if the words faster-whisper hears in it had been sent."""
    recording = (tiny_dir / "prefix_s1.wav").read_bytes()
    heard = WhisperTranscriber(asr_dir).transcribe(*read_audio(recording))
    assert [word for word, _, _ in heard] == list(WORDS)
    audio_only = {"speaker_1": {"audio_base64": base64.b64encode(recording).decode()}}
    with_words = {"speaker_1": {**audio_only["speaker_1"], "words": [list(word) for word in heard]}}
    speak(client, tmp_path / "heard.pcm", response_format="pcm", prefix=audio_only, **DIA2)
    speak(client, tmp_path / "given.pcm", response_format="pcm", prefix=with_words, **DIA2)
    assert (tmp_path / "heard.pcm").read_bytes() == (tmp_path / "given.pcm").read_bytes()
    assert (tmp_path / "heard.pcm").stat().st_size > 0


def test_api_key_is_required_except_for_ping(server) -> None:
    url = server[0].url
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.get(f"{url}/v1/models", headers=headers)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/ping").status_code == 200


def long_request(url: str) -> dict:
    return dict(method="POST", url=f"{url}/v1/audio/speech", headers={"Authorization": f"Bearer {API_KEY}"},
                json={"model": "dia2", "input": LONG_TEXT, "voice": "alloy", "response_format": "pcm", **LONG},
                timeout=TIMEOUT)


def wait_freed(server: Server, request_id: str, start: int) -> int:
    """Frames the scheduler stepped for a stopped request after it was cancelled."""
    pattern = rf"request {request_id}: stopped after (\d+) frames sent; slot freed (\d+) frames later"
    return int(server.wait_line(pattern, start).group(2))


def test_a_client_that_disconnects_frees_its_slot_within_a_frame(server, client: openai.OpenAI,
                                                               tmp_path: Path) -> None:
    running = server[0]
    start = len(running.lines)
    with httpx.Client() as http, http.stream(**long_request(running.url)) as response:
        assert response.status_code == 200
        next(response.iter_bytes())  # audio is flowing: the request holds the only slot
        request_id = response.headers["x-request-id"]
    assert wait_freed(running, request_id, start) <= 1
    speak(client, tmp_path / "after.pcm", response_format="pcm", **DIA2)  # the slot serves the next request
    assert (tmp_path / "after.pcm").stat().st_size > 0


def test_overload_is_a_429_with_retry_after(server) -> None:
    running = server[0]
    start = len(running.lines)
    with httpx.Client() as http:
        with http.stream(**long_request(running.url)) as first:
            next(first.iter_bytes())  # holds the slot
            with http.stream(**long_request(running.url)) as second:
                assert second.status_code == 200  # admitted, waiting for the slot
                third = http.request(**long_request(running.url))
                assert third.status_code == 429 and third.headers["retry-after"] == "1"
                assert third.json()["error"]["code"] == "rate_limit_exceeded"
                ids = [first.headers["x-request-id"], second.headers["x-request-id"]]
    for request_id in ids:
        wait_freed(running, request_id, start)


def test_the_queue_worker_never_imports_the_web_stack(tiny_dir: Path, tmp_path: Path) -> None:
    from test_imports import imported_after

    env = {**os.environ, "MODEL_DIR": str(tiny_dir), "DEVICE": "cpu", "OUTPUT_DIR": str(tmp_path)}
    modules = imported_after("import handler, runpod\nfrom dia2_worker.worker import WorkerService\n"
                             "WorkerService.load(__import__('os').environ)", env)
    assert "dia2_worker" in modules
    assert not modules & {"starlette", "uvicorn", "fastapi", "openai", "anyio", "h11"}


@pytest.mark.parametrize(("command", "env", "message"), [
    (["handler.py"], {"SERVE_MODE": "grpc"}, "handler.py: error: SERVE_MODE: must be queue (the default) or http, got 'grpc'"),
    (["-m", "dia2_worker.serve"], {"PORT": "http"}, "error: PORT: must be an integer between 0 and 65535"),
    (["-m", "dia2_worker.serve"], {"VOICES_DIR": "/nonexistent"}, "error: VOICES_DIR: /nonexistent is not a"),
    (["-m", "dia2_worker.serve"], {"MAX_WAITING": "-1"}, "error: MAX_WAITING: must be an integer"),
])
def test_a_bad_setting_is_one_line_and_a_nonzero_exit(command: list[str], env: dict, message: str) -> None:
    done = subprocess.run([sys.executable, *command], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode != 0
    assert done.stderr.strip().startswith(message) and "Traceback" not in done.stderr, done.stderr


def test_a_voice_without_its_words_is_refused_at_start(tiny_dir: Path, tmp_path: Path) -> None:
    shutil.copy(tiny_dir / "prefix_s1.wav", tmp_path / "narrator.wav")
    done = subprocess.run([sys.executable, "-m", "dia2_worker.serve"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "VOICES_DIR": str(tmp_path)}, timeout=TIMEOUT)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"error: VOICES_DIR: {tmp_path / 'narrator.json'} must hold"), done.stderr


def test_a_failed_load_is_503_on_both_ports(tmp_path: Path) -> None:
    """PORT_HEALTH apart from PORT: /ping on both, the API on PORT only; a model that cannot load is a 503."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        health_port = probe.getsockname()[1]
    env = {**os.environ, "MODEL_DIR": str(tmp_path / "missing"), "DEVICE": "cpu", "OUTPUT_DIR": str(tmp_path),
           "PORT_HEALTH": str(health_port)}
    running = Server(env, tmp_path / "server.log")
    try:
        assert running.wait_line(r"\(health: (\d+)\)").group(1) == str(health_port)
        running.wait_line(r"loading failed")
        health = f"http://127.0.0.1:{health_port}"
        for url in (running.url, health):
            ping = httpx.get(f"{url}/ping")
            assert ping.status_code == 503 and ping.json()["status"] == "failed"
        assert httpx.get(f"{health}/v1/models").status_code == 404
        models = httpx.get(f"{running.url}/v1/models")
        assert models.status_code == 503 and "failed to load" in models.json()["error"]["message"]
    finally:
        assert running.stop() == 0
