"""Voice prefixes sent as a recording alone: the real speech recognition path (faster-whisper on the tiny
random-weight model bake_weights.py --demo bakes) through the worker process and the command line, words
injected through the same interface against the golden prefix case, the cache, and import discipline."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from control_plane import ControlPlane
from test_imports import imported_after
from test_worker import HANDLER, READY_TIMEOUT, ROOT, outputs, worker_env

from dia2_worker.asr import VoiceCache, VoicePrefixes, WhisperTranscriber, audio_key, clean_words
from dia2_worker.jobs import JobInputError, WorkerLimits, parse_job
from dia2_worker.random_asr import WORDS, write_random_asr

ASR_MODULES = {"faster_whisper", "ctranslate2"}


@pytest.fixture(scope="module")
def prefix_wav(tiny_dir: Path) -> bytes:
    return (tiny_dir / "prefix_s1.wav").read_bytes()


def wav_file(samples: np.ndarray, rate: int = 24_000) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class FixedWords:
    """A transcriber answering with given words, counting its calls and keeping what it heard."""

    def __init__(self, words: tuple[tuple[str, float, float], ...]) -> None:
        self.words, self.calls = words, []

    def transcribe(self, samples, sample_rate: int):
        self.calls.append((np.asarray(samples).copy(), sample_rate))
        return self.words


def test_a_repeated_voice_is_neither_transcribed_nor_encoded_again(engine, prefix_wav: bytes, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the job runner: the second job with the same recording takes its words and Mimi codes from the
    voice cache."""
    import asyncio

    from dia2_worker.runner import JobRunner, RunnerSettings
    from dia2_worker.scheduler import Scheduler
    from dia2_worker.storage import LocalStorage, StorageSettings

    encodes = []
    real_encode = engine.encode_audio
    monkeypatch.setattr(engine, "encode_audio",
                        lambda samples, rate: encodes.append(rate) or real_encode(samples, rate))
    transcriber = FixedWords((("hello", 0.1, 0.4),))
    scheduler = Scheduler(engine, 1, engine.buffer_length(prefix_frames=200), decode_audio=True)  # the prefix fits
    try:
        runner = JobRunner(scheduler, LocalStorage(StorageSettings(output_dir=tmp_path)), WorkerLimits(),
                           RunnerSettings(), VoicePrefixes(VoiceCache(4), transcriber))
        job = {"text": "[S1] Hi.", "seed": 1, "max_duration_s": 1,
               "prefix": {"speaker_1": {"audio_base64": b64(prefix_wav)}}}

        async def result(job_id: str) -> dict:
            return [item async for item in runner.run(job_id, job)][-1]

        first, second = asyncio.run(result("job-1")), asyncio.run(result("job-2"))
    finally:
        scheduler.close()
    assert "error" not in first, first
    assert first["metrics"]["prefix_cached"] is False and second["metrics"]["prefix_cached"] is True
    assert len(transcriber.calls) == 1 and len(encodes) == 1
    assert first["prefix_words"] == second["prefix_words"] == {"speaker_1": [["hello", 0.1, 0.4]]}


def test_the_tiny_model_hears_words_in_sound_and_none_in_silence(asr_dir: Path, prefix_wav: bytes) -> None:
    transcriber = WhisperTranscriber(asr_dir)
    samples, rate = sf.read(io.BytesIO(prefix_wav), dtype="float32", always_2d=True)
    words = transcriber.transcribe(samples, rate)
    assert [w for w, _, _ in words] == list(WORDS)
    duration = len(samples) / rate
    starts = [start for _, start, _ in words]
    assert starts == sorted(starts) and all(0 <= start <= end <= duration for _, start, end in words)
    assert words[-1][2] > words[0][1]  # the alignment spreads them over the recording
    assert transcriber.transcribe(samples, rate) == words
    assert transcriber.transcribe(np.zeros((rate, 1), np.float32), rate) == ()
    noise = np.random.default_rng(0).normal(0, 0.1, (3 * 44_100, 2)).astype(np.float32)
    assert [w for w, _, _ in transcriber.transcribe(noise, 44_100)] == list(WORDS)  # any rate, any channels


def test_recognised_words_are_made_valid_job_words() -> None:
    timed = [(" Hello,", -0.02, 0.3), (" ", 0.3, 0.4), ("wo\trld", 0.2, 0.1), ("end", 1.0, 1.3)]
    assert clean_words(timed, 1.2) == (("Hello,", 0.0, 0.3), ("world", 0.2, 0.2), ("end", 1.0, 1.2))


def test_injected_words_reproduce_the_golden_prefix_case(engine, golden, golden_cases, tiny_dir: Path,
                                                          prefix_wav: bytes) -> None:
    """The golden words given through the transcription interface condition exactly as when sent in the job."""
    import torch

    from dia2_worker.runner import to_generation_request

    case = next(c for c in golden_cases if c["name"] == "prefix_include1")
    words = tuple(tuple(w) for w in json.loads((tiny_dir / case["prefix_speaker_1_words"]).read_text())["words"])
    job = parse_job({"text": case["script"], "temperature": 0, "text_temperature": 0,
                     "cfg_scale": case["cfg_scale"], "cfg_filter_k": case["cfg_filter_k"], "include_prefix": True,
                     "prefix": {"speaker_1": {"audio_base64": b64(prefix_wav)}}}, WorkerLimits())
    assert job.prefix.speaker_1.words is None
    transcriber = FixedWords(words)
    prepared = VoicePrefixes(VoiceCache(4), transcriber).complete(job)
    assert prepared.job.prefix.speaker_1.words == words and not prepared.cached
    heard, rate = transcriber.calls[0]
    assert rate == 24_000 and np.array_equal(heard, job.prefix.speaker_1.samples)
    assert case["initial_padding"] == 2  # the job default
    result = engine.generate(to_generation_request(prepared.job, engine.max_delay, "job-1"))
    assert torch.equal(result.tokens, golden[f"{case['name']}.audio_tokens"][0])
    assert result.timestamps == [tuple(t) for t in case["timestamps"]]


def test_the_cache_skips_transcription_and_encoding_for_a_voice_seen_before(prefix_wav: bytes) -> None:
    limits = WorkerLimits()
    job = parse_job({"text": "[S1] Hi.", "prefix": {"speaker_1": {"audio_base64": b64(prefix_wav)}}}, limits)
    transcriber = FixedWords((("hello", 0.1, 0.4),))
    cache = VoiceCache(2)
    voices = VoicePrefixes(cache, transcriber)
    encodes = []
    encode = cache.encoder(lambda samples, rate: encodes.append(rate) or f"codes-{len(encodes)}")

    first = voices.complete(job)
    assert encode(job.prefix.speaker_1.samples, 24_000) == "codes-1"
    again = parse_job({"text": "[S1] Bye.", "prefix": {"speaker_1": {"audio_base64": b64(prefix_wav)}}}, limits)
    second = voices.complete(again)
    assert encode(again.prefix.speaker_1.samples, 24_000) == "codes-1"
    assert (first.cached, second.cached) == (False, True)
    assert len(transcriber.calls) == 1 and len(encodes) == 1
    assert second.job.prefix.speaker_1.words == first.job.prefix.speaker_1.words

    given = parse_job({"text": "[S1] Hi.", "prefix": {"speaker_1": {"audio_base64": b64(prefix_wav),
                                                                    "words": [["own", 0.0, 0.5]]}}}, limits)
    assert voices.complete(given).job.prefix.speaker_1.words == (("own", 0.0, 0.5),)  # given words win
    assert len(transcriber.calls) == 1

    # Bounded: two other voices push the first one out, so it is transcribed and encoded again.
    for seconds in (0.5, 0.7):
        other = parse_job({"text": "[S1] Hi.", "prefix": {"speaker_1": {
            "audio_base64": b64(wav_file(np.full(int(24_000 * seconds), 0.1, np.float32)))}}}, limits)
        voices.complete(other)
        encode(other.prefix.speaker_1.samples, 24_000)
    assert len(cache) == 2 and len(transcriber.calls) == 3
    assert not voices.complete(job).cached and len(transcriber.calls) == 4
    assert audio_key(job.prefix.speaker_1.samples, 24_000) != audio_key(job.prefix.speaker_1.samples, 16_000)


def test_no_words_and_no_model_are_job_errors(asr_dir: Path, tmp_path: Path) -> None:
    silent = parse_job({"text": "[S1] Hi.", "prefix": {
        "speaker_1": {"audio_base64": b64(wav_file(np.full(24_000, 0.1, np.float32))), "words": [["a", 0, 0.5]]},
        "speaker_2": {"audio_base64": b64(wav_file(np.zeros(24_000, np.float32)))}}}, WorkerLimits())
    with pytest.raises(JobInputError) as error:
        VoicePrefixes(VoiceCache(2), WhisperTranscriber(asr_dir)).complete(silent)
    assert str(error.value) == "prefix.speaker_2: no words recognised in the audio; pass words explicitly"
    with pytest.raises(JobInputError, match=r"^prefix.speaker_2.words: required: no speech recognition model in"):
        VoicePrefixes(VoiceCache(2), WhisperTranscriber(tmp_path / "none")).complete(silent)


def test_a_recording_alone_clones_a_voice_through_the_worker(plane: ControlPlane, start_worker, tiny_dir: Path,
                                                             asr_dir: Path, prefix_wav: bytes,
                                                             tmp_path: Path) -> None:
    start_worker(HANDLER, worker_env(tiny_dir, tmp_path / "out", {}, ASR_MODEL_DIR=str(asr_dir)), ROOT,
                 READY_TIMEOUT)
    job = {"text": "[S1] Nice to meet you.", "seed": 5, "stream": False}
    recording = {"speaker_1": {"audio_base64": b64(prefix_wav)}}
    first = plane.submit({**job, "prefix": recording})
    second = plane.submit({**job, "prefix": recording})
    silence = plane.submit({**job, "prefix": {"speaker_1": {"audio_base64": b64(wav_file(np.zeros(12_000)))}}})
    given = [["hello", 0.1, 0.4], ["there", 0.5, 0.9]]
    with_words = plane.submit({**job, "prefix": {"speaker_1": {**recording["speaker_1"], "words": given}}})
    plain = plane.submit(job)

    results = [outputs(plane, job_id)[0]["output"][-1] for job_id in (first, second)]
    for result in results:
        assert result["type"] == "result" and result["duration_s"] > 0, result
        assert [w for w, _, _ in result["prefix_words"]["speaker_1"]] == list(WORDS)
        assert result["metrics"]["prefix_ms"] > 0
    assert results[0]["prefix_words"] == results[1]["prefix_words"]
    assert [r["metrics"]["prefix_cached"] for r in results] == [False, True]
    assert results[0]["sha256"] == results[1]["sha256"]  # same voice, seed and text: the same audio
    assert plane.wait_result(silence, 60).body == {
        "error": "prefix.speaker_1: no words recognised in the audio; pass words explicitly"}
    result = outputs(plane, with_words)[0]["output"][-1]
    assert result["prefix_words"] == {"speaker_1": given}
    assert result["metrics"]["prefix_cached"] is True  # words given, codes encoded by the jobs before
    result = outputs(plane, plain)[0]["output"][-1]
    assert "prefix_words" not in result
    assert (result["metrics"]["prefix_ms"], result["metrics"]["prefix_cached"]) == (None, None)


def test_the_command_line_transcribes_a_prefix_given_alone(tiny_dir: Path, asr_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from dia2_worker import generate

    out = tmp_path / "out.wav"
    base = [sys.executable, "-m", "dia2_worker.generate", "--model-dir", str(tiny_dir), "--text",
            "[S1] Nice to meet you.", "--out", str(out), "--seed", "3", "--json"]
    done = subprocess.run([*base, "--prefix-speaker-1", str(tiny_dir / "prefix_s1.wav"), "--asr-model-dir",
                           str(asr_dir)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert [w for w, _, _ in summary["prefix_words"]["speaker_1"]] == list(WORDS)
    assert summary["frames"] > 0 and out.is_file()

    silent = tmp_path / "silent.wav"
    silent.write_bytes(wav_file(np.zeros(12_000)))
    for args, message in [
        (["--prefix-speaker-1", str(silent), "--asr-model-dir", str(asr_dir)],
         "--prefix-speaker-1: no words recognised in the audio; pass --prefix-speaker-1-words"),
        (["--prefix-speaker-1", str(silent)], "--prefix-speaker-1-words: not given, and no speech recognition "
                                              f"model in {tiny_dir / 'asr'}"),
    ]:
        assert generate.main([*base[3:], *args]) == 2
        assert message in capsys.readouterr().err


def test_jobs_without_a_recording_to_transcribe_never_import_the_asr_library(tiny_dir: Path, asr_dir: Path,
                                                                              prefix_wav: bytes,
                                                                              tmp_path: Path) -> None:
    env = {**os.environ, "MODEL_DIR": str(tiny_dir), "DEVICE": "cpu", "OUTPUT_DIR": str(tmp_path),
           "ASR_MODEL_DIR": str(asr_dir)}
    given = {"audio_base64": b64(prefix_wav), "words": [["hello", 0.1, 0.4]]}
    jobs = [{"text": "[S1] Hi.", "seed": 1}, {"text": "[S1] Hi.", "seed": 1, "prefix": {"speaker_1": given}},
            {"text": "[S1] Hi.", "seed": 1, "prefix": {"speaker_1": {"audio_base64": given["audio_base64"]}}}]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    code = f"""
import asyncio, json, os, sys
from dia2_worker.worker import WorkerService
service = WorkerService.load(os.environ)
async def run(job):
    async for item in service.handle({{"id": "j", "input": job}}):
        assert "error" not in item, item
for job in json.loads(open(os.environ["JOBS"]).read()):
    asyncio.run(run(job))
    print(json.dumps(sorted(set({sorted(ASR_MODULES)!r}) & {{m.split(".")[0] for m in sys.modules}})))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                          env={**env, "JOBS": str(tmp_path / "jobs.json")})
    after_each_job = [json.loads(line) for line in done.stdout.splitlines()[-3:]]
    assert after_each_job == [[], [], sorted(ASR_MODULES)]
    assert imported_after("import os\nfrom dia2_worker.worker import WorkerService\nWorkerService.load(os.environ)",
                          {**env, "ASR_PRELOAD": "true"}) >= ASR_MODULES


def test_the_demo_bake_holds_the_speech_recognition_model_the_worker_checks(tmp_path: Path) -> None:
    """bake_weights.py --demo bakes the tiny model into DIR/asr (the worker's default ASR_MODEL_DIR), byte for
    byte the same every time, listed in the manifest the worker checks at start."""
    import bake_weights
    from dia2_worker.checkpoint import CheckpointError, read_manifest

    out = tmp_path / "demo"
    assert bake_weights.main(["--demo", "--out", str(out)]) == 0
    again = tmp_path / "again"
    write_random_asr(again)
    manifest = read_manifest(out)
    for name in ("config.json", "model.bin", "tokenizer.json", "vocabulary.json", "preprocessor_config.json"):
        assert (out / "asr" / name).read_bytes() == (again / name).read_bytes()
        assert f"asr/{name}" in manifest["files"]
    samples = np.random.default_rng(0).normal(0, 0.1, (24_000, 1)).astype(np.float32)
    assert [w for w, _, _ in WhisperTranscriber(out / "asr").transcribe(samples, 24_000)] == list(WORDS)
    model = out / "asr" / "model.bin"
    model.write_bytes(model.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match=r"asr/model.bin: .*\(truncated\)"):
        read_manifest(out)


def test_a_converted_whisper_is_baked_from_the_hub_at_a_pinned_commit(asr_dir: Path, tiny_dir: Path,
                                                                      tmp_path: Path) -> None:
    from hf_hub_server import HubServer
    from test_bake import hub_env, run_bake

    repo, sha = "Systran/faster-whisper-tiny-test", "a5b4c3d2" * 5
    with HubServer({repo: (asr_dir, sha)}, token="hf_token") as hub:
        out = tmp_path / "baked"
        done = run_bake("--model", str(tiny_dir), "--asr", repo, "--asr-revision", sha, "--out", str(out),
                        env=hub_env(hub, tmp_path / "hf", "hf_token"))
        assert done.returncode == 0, done.stderr
        wrong = run_bake("--model", str(tiny_dir), "--asr", str(tiny_dir), "--out", str(tmp_path / "wrong"),
                         env=hub_env(hub, tmp_path / "hf", "hf_token"))
    assert wrong.returncode == 1 and "not a CTranslate2 Whisper conversion (missing model.bin" in wrong.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["asr"] == {"repo": repo, "revision": sha, "path": None}
    for name in ("config.json", "model.bin", "tokenizer.json", "vocabulary.json", "preprocessor_config.json"):
        assert (out / "asr" / name).read_bytes() == (asr_dir / name).read_bytes()
        assert manifest["files"][f"asr/{name}"]["size"] == (asr_dir / name).stat().st_size


def test_the_frame_gap_bench_writes_its_numbers(tmp_path: Path) -> None:
    from dia2_worker import asr_bench

    path = asr_bench.main(["--streams", "1", "--frames", "6", "--warmup-frames", "1", "--audio-s", "1",
                           "--json", str(tmp_path / "gap.json")])
    report = json.loads(path.read_text())
    assert report["quiet"]["frames"] == 5 and 1 <= report["transcribing"]["frames"] <= 5
    for condition in ("quiet", "transcribing"):
        assert report[condition]["max_ms"] >= report[condition]["p50_ms"] > 0
    assert report["transcriptions"]["count"] >= 1 and report["transcriptions"]["audio_s"] == 1.0
