"""One job end to end: validated input -> generation on the scheduler -> streamed chunks -> WAV in storage.

The runner is an async generator driven by the RunPod handler. The GPU work happens on the scheduler's
thread; this side only awaits what it produced, so the event loop stays free for other jobs, stream
posts and stop signals. Finished audio is never dropped: the WAV is written to the spool directory
before upload, and a failed upload falls back to inline audio or an error naming where it was written.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from . import audio
from .asr import VoicePrefixes, Words
from .engine import GenerationParamError, GenerationParams, GenerationPlan, GenerationRequest, PrefixSpeech, VoicePrefix
from .jobs import (FRAME_MS, JobInputError, JobMetrics, JobRequest, WorkerLimits, audio_item, parse_job,
                   progress_item, result_item, words_item)
from .scheduler import Emitted, JobTimeout, Scheduler
from .storage import LocalStorage, Storage, StorageError

log = logging.getLogger("dia2_worker.runner")

# Engine parameter -> the job field a user sets it with, so errors name what the user sent.
JOB_FIELDS = {"audio_temperature": "temperature", "audio_top_k": "top_k", "max_frames": "max_duration_s"}


@dataclass(frozen=True)
class RunnerSettings:
    inline_audio_max_bytes: int = 8 * 1024 * 1024
    """INLINE_AUDIO_MAX_BYTES: largest WAV returned inline (base64) when the upload fails for good."""
    spool_dir: Path = Path("output/spool")
    """Every finished WAV is written here before upload; removed once the upload is verified."""
    job_timeout_s: float | None = None
    """JOB_TIMEOUT_S: a job not finished this long after it reached the worker (waiting for a slot included)
    is stopped within one frame and fails."""


def to_generation_request(job: JobRequest, max_delay: int) -> GenerationRequest:
    """Job fields -> engine request. max_duration_s bounds the output: frames run = output frames + the
    delay tail (the last codebooks of a frame arrive max_delay - 1 steps after its first)."""
    params = GenerationParams(
        text_temperature=job.text_temperature, text_top_k=job.text_top_k, audio_temperature=job.temperature,
        audio_top_k=job.top_k, cfg_scale=job.cfg_scale, cfg_filter_k=job.cfg_filter_k, seed=job.seed,
        max_frames=math.ceil(job.max_duration_s * 1000 / FRAME_MS) + max_delay - 1,
    )
    prefix = None
    if job.prefix is not None:
        speeches = [None if p is None else PrefixSpeech(p.samples, p.sample_rate, p.words)
                    for p in (job.prefix.speaker_1, job.prefix.speaker_2)]
        prefix = VoicePrefix(speeches[0], speeches[1], job.include_prefix)
    return GenerationRequest(job.text, params, prefix)


@dataclass(frozen=True)
class PreparedJob:
    job: JobRequest
    """Every prefix speaker with words: given, or transcribed from the recording."""
    plan: GenerationPlan
    prefix_ms: float | None
    prefix_cached: bool | None


class JobRunner:
    def __init__(self, scheduler: Scheduler, storage: Storage, limits: WorkerLimits,
                 settings: RunnerSettings, voices: VoicePrefixes) -> None:
        self.scheduler, self.storage, self.limits, self.settings = scheduler, storage, limits, settings
        self.voices = voices
        self.sample_rate = scheduler.engine.codec.sample_rate

    async def run(self, job_id: str, raw_input: object, received_at: float | None = None) -> AsyncIterator[dict]:
        """Yield the job's stream items; a failed job ends with one {"error": ...} item."""
        received_at = time.monotonic() if received_at is None else received_at
        try:
            job = await asyncio.to_thread(parse_job, raw_input, self.limits)
            prepared = await asyncio.to_thread(self.prepare, job)
        except JobInputError as exc:
            yield {"error": str(exc)}
            return
        except GenerationParamError as exc:
            yield {"error": _job_error(exc)}
            return
        async for item in self._generate(job_id, prepared, received_at):
            yield item

    def prepare(self, job: JobRequest) -> PreparedJob:
        """Words for prefix speakers sent without them (transcription), then planning (tokenising, the prefix's
        Mimi encode): blocking work that runs here, off the event loop and the scheduler's thread."""
        started = time.monotonic()
        voices = self.voices.complete(job)
        engine = self.scheduler.engine
        plan = engine.prepare(to_generation_request(voices.job, engine.max_delay))
        if job.prefix is None:
            return PreparedJob(voices.job, plan, None, None)
        return PreparedJob(voices.job, plan, (time.monotonic() - started) * 1000, voices.cached)

    async def _generate(self, job_id: str, prepared: PreparedJob, received_at: float) -> AsyncIterator[dict]:
        job, plan = prepared.job, prepared.plan
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        deadline = None if self.settings.job_timeout_s is None else time.monotonic() + self.settings.job_timeout_s
        ticket = self.scheduler.submit(plan, lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out),
                                       deadline)
        stream = _AudioStream(job, self.sample_rate)
        ttfa_ms = None
        try:
            while True:
                out = await outputs.get()
                if isinstance(out, BaseException):
                    yield {"error": _failure(out)}
                    return
                items = stream.add(out)
                if ttfa_ms is None and stream.samples:
                    ttfa_ms = (time.monotonic() - received_at) * 1000
                for item in items:
                    yield item
                if out.finished:
                    break
        finally:
            ticket.cancel()  # no-op once finished; frees the slot if the job was cancelled or failed here
        generate_ms = (time.monotonic() - (ticket.started_at or received_at)) * 1000
        for item in stream.finish():
            yield item
        wav = audio.wav_bytes(bytes(stream.pcm), self.sample_rate)
        duration_s = stream.samples / self.sample_rate
        metrics = JobMetrics(
            queue_ms=((ticket.started_at or received_at) - received_at) * 1000, ttfa_ms=ttfa_ms,
            generate_ms=generate_ms, rtf=generate_ms / 1000 / duration_s if duration_s else 0.0,
            frames=stream.frames, prefix_ms=prepared.prefix_ms, prefix_cached=prepared.prefix_cached,
        )
        yield await asyncio.to_thread(self._store, job_id, job, wav, duration_s, stream.timestamps,
                                      plan.params.seed, metrics)

    def _store(self, job_id: str, job: JobRequest, wav: bytes, duration_s: float,
               timestamps: list[tuple[str, float]], seed: int, metrics: JobMetrics) -> dict:
        """Upload (after spooling to local disk when the storage is remote) and build the result, or the
        inline fallback, or the error that says where the audio is."""
        key = self.storage.key_for(job_id, job.output.key_prefix)
        spool = None if isinstance(self.storage, LocalStorage) else self.settings.spool_dir / key
        if spool is not None:
            spool.parent.mkdir(parents=True, exist_ok=True)
            spool.write_bytes(wav)
        fields = dict(duration_s=duration_s, timestamps=[[w, t] for w, t in timestamps], seed=seed, metrics=metrics,
                      prefix_words=prefix_words(job))
        try:
            stored = self.storage.put(key, wav, presign_expiry_s=job.output.presign_expiry_s)
        except StorageError as exc:
            log.error("%s", exc, extra={"job_id": job_id})
            if len(wav) <= self.settings.inline_audio_max_bytes:
                return result_item(audio_url=None, bucket=None, key=key, sha256=hashlib.sha256(wav).hexdigest(),
                                   audio_base64=base64.b64encode(wav).decode("ascii"), **fields)
            where = f"it was written to {spool} on the worker" if spool else "no copy could be written"
            return {"error": f"the audio could not be stored ({exc}) and at {len(wav)} bytes it is larger than "
                             f"the {self.settings.inline_audio_max_bytes}-byte inline limit "
                             f"(INLINE_AUDIO_MAX_BYTES); {where}"}
        if spool is not None:
            spool.unlink(missing_ok=True)
        return result_item(audio_url=stored.url, bucket=stored.bucket, key=stored.key, sha256=stored.sha256,
                           **fields)


class _AudioStream:
    """Turns a job's generated frames into stream items: the first chunk as soon as it exists, then chunks
    of at least chunk_ms; words once their audio has gone out; progress items when not streaming audio."""

    def __init__(self, job: JobRequest, sample_rate: int) -> None:
        self.job, self.sample_rate = job, sample_rate
        self.pcm = bytearray()          # every sample of the job, pcm_s16le: the WAV's data
        self.sent = 0                   # bytes of pcm already streamed
        self.seq = 0
        self.frames = 0
        self.timestamps: list[tuple[str, float]] = []
        self.words_sent = 0
        self.min_chunk = job.chunk_ms * sample_rate // 1000 * 2

    @property
    def samples(self) -> int:
        return len(self.pcm) // 2

    def add(self, out: Emitted) -> list[dict]:
        for frame in out.frames:
            self.pcm += audio.pcm16_bytes(frame.pcm)
        self.frames += len(out.frames)
        self.timestamps += [(w.text, w.time_s) for w in out.words]
        pending = len(self.pcm) - self.sent
        return self._flush() if pending and (self.seq == 0 or pending >= self.min_chunk) else []

    def finish(self) -> list[dict]:
        return self._flush(final=True)

    def _flush(self, final: bool = False) -> list[dict]:
        items = []
        if len(self.pcm) > self.sent:
            if self.job.stream:
                items.append(audio_item(self.seq, self.sent // 2, bytes(self.pcm[self.sent:]), self.sample_rate))
            else:
                items.append(progress_item(self.frames, self.samples / self.sample_rate))
            self.seq += 1
            self.sent = len(self.pcm)
        end_s = self.samples / self.sample_rate
        spoken = [w for w in self.timestamps[self.words_sent:] if final or w[1] < end_s]
        if spoken:
            items.append(words_item(spoken))
            self.words_sent += len(spoken)
        return items


def prefix_words(job: JobRequest) -> dict[str, Words] | None:
    """The words each prefix speaker was conditioned on (given or transcribed), so a user can pass them next time."""
    if job.prefix is None:
        return None
    speakers = {"speaker_1": job.prefix.speaker_1, "speaker_2": job.prefix.speaker_2}
    return {name: speaker.words for name, speaker in speakers.items() if speaker is not None}


def _job_error(exc: GenerationParamError) -> str:
    field = JOB_FIELDS.get(exc.param, exc.param)
    return f"{field}: {str(exc).split(': ', 1)[1]}"


def _failure(exc: BaseException) -> str:
    if isinstance(exc, GenerationParamError):
        return _job_error(exc)
    if isinstance(exc, JobTimeout):
        return f"timeout: {exc} (JOB_TIMEOUT_S)"
    log.error("generation failed", exc_info=exc)
    return f"generation failed: {type(exc).__name__}: {exc}"
