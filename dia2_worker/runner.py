"""One job end to end: validated input -> generation on the scheduler -> streamed chunks -> WAV in storage.

The runner is an async generator driven by the RunPod handler. The GPU work happens on the scheduler's
thread; this side only awaits what it produced, so the event loop stays free for other jobs, stream
posts and stop signals. Blocking work runs on three bounded pools of its own, so one kind cannot hold up
the others: `audio_url` downloads, CPU planning (parsing, tokenising, the prefix's Mimi encode) and uploads.

JOB_TIMEOUT_S counts from the job's arrival and bounds every phase: download, planning, the wait for a
slot, generation and the upload. Finished audio is never dropped: a failed or late upload falls back to
the file inline in the result when it fits, else to a copy in the spool directory that the error names.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import AsyncIterator, Awaitable, TypeVar

from . import audio
from .asr import VoicePrefixes, Words
from .encoders import FORMATS, encode_file
from .engine import GenerationParamError, GenerationParams, GenerationPlan, GenerationRequest, PrefixSpeech, VoicePrefix
from .jobs import (FRAME_MS, JobInputError, JobMetrics, JobRequest, WorkerLimits, audio_item, check_all_but_prefix,
                   error_item, needs_download, parse_job, progress_item, result_item, words_item)
from .params import JOB_PARAMS, MAX_SEED, job_field
from .scheduler import Emitted, JobTimeout, Scheduler
from .storage import Storage, StorageError, StoredObject, write_atomically

log = logging.getLogger("dia2_worker.runner")

T = TypeVar("T")

DOWNLOAD_THREADS = 8
"""audio_url downloads at once; more wait their turn without holding up jobs that download nothing."""
PLANNING_THREADS = 2
"""Jobs parsed and planned at once (CPU work: base64 and audio decoding, tokenising, the Mimi encode)."""
UPLOAD_THREADS = 8
"""Uploads at once; each is bounded by UPLOAD_TIMEOUT_S and the job's deadline."""


@dataclass(frozen=True)
class RunnerSettings:
    inline_audio_max_bytes: int = 8 * 1024 * 1024
    """INLINE_AUDIO_MAX_BYTES: largest WAV returned inline (base64) when the upload fails for good."""
    spool_dir: Path = Path("output/spool")
    """Where a WAV too large to return inline is kept when the upload fails; the error names the file."""
    job_timeout_s: float | None = None
    """JOB_TIMEOUT_S: a job not finished this long after it reached the worker (download, planning, the
    wait for a slot, generation and upload included) fails; generation stops within one frame, and a
    late upload falls back like a failed one."""
    upload_timeout_s: float = 60.0
    """UPLOAD_TIMEOUT_S: most time one job's upload may take, every retry included."""
    spool_max_bytes: int = 2 * 1024**3
    """SPOOL_MAX_BYTES: most disk the spool takes; the oldest copies go first."""
    max_output_bytes: int = 10 * 1000 * 1000
    """A job's final output (return_aggregate_stream repeats every stream item in it, then the result) stays
    within this: RunPod documents 10 MB for a /run payload and 20 MB for /runsync. Streamed audio of the
    longest job (120 s, ~7.7 MB in base64) fits; an inline WAV that would not fit is spooled instead."""


def to_generation_request(job: JobRequest, max_delay: int, job_id: str) -> GenerationRequest:
    """Job fields -> engine request. max_duration_s bounds the output: frames run = output frames + the
    delay tail (the last codebooks of a frame arrive max_delay - 1 steps after its first). Without a seed
    the job id picks one, so a retried job reproduces the audio its earlier URLs point to."""
    params = GenerationParams(**{p.name: getattr(job, p.job_field) for p in JOB_PARAMS},
                              max_frames=math.ceil(job.max_duration_s * 1000 / FRAME_MS) + max_delay - 1)
    if job.seed is None:
        params = replace(params, seed=seed_for(job_id))
    prefix = None
    if job.prefix is not None:
        speeches = [None if p is None else PrefixSpeech(p.samples, p.sample_rate, p.words)
                    for p in (job.prefix.speaker_1, job.prefix.speaker_2)]
        prefix = VoicePrefix(speeches[0], speeches[1], job.include_prefix)
    return GenerationRequest(job.text, params, prefix)


def seed_for(job_id: str) -> int:
    """A seed that depends on the job id only."""
    return int.from_bytes(hashlib.sha256(job_id.encode("utf-8", "surrogatepass")).digest()[:8], "big") & MAX_SEED


class PhaseTimeout(Exception):
    """The job's deadline passed before it reached the scheduler; the message names the phase."""


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
        self.encode_audio = voices.cache.encoder(scheduler.engine.encode_audio)  # a voice seen before: no encode
        self.sample_rate = scheduler.engine.codec.sample_rate
        self.downloads = ThreadPoolExecutor(DOWNLOAD_THREADS, thread_name_prefix="dia2-download")
        self.planning = ThreadPoolExecutor(PLANNING_THREADS, thread_name_prefix="dia2-plan")
        self.keeper = Keeper(storage, settings)

    async def run(self, job_id: str, raw_input: object, received_at: float | None = None) -> AsyncIterator[dict]:
        """Yield the job's stream items; a failed job ends with one {"error": ...} item."""
        received_at = time.monotonic() if received_at is None else received_at
        deadline = self.deadline(received_at)
        try:
            prepared = await self.plan(job_id, raw_input, deadline)
        except JobInputError as exc:
            yield error_item(str(exc))
            return
        except PhaseTimeout as exc:
            yield error_item(f"timeout: the job's time limit passed while {exc} (JOB_TIMEOUT_S)")
            return
        async for item in self._generate(job_id, prepared, received_at, deadline):
            yield item

    def deadline(self, received_at: float) -> float | None:
        """When a job that arrived at `received_at` (time.monotonic()) must be done (JOB_TIMEOUT_S)."""
        return None if self.settings.job_timeout_s is None else received_at + self.settings.job_timeout_s

    async def plan(self, job_id: str, raw_input: object, deadline: float | None) -> PreparedJob:
        """Validate a job input and plan its generation on the runner's pools. A refusal is a JobInputError
        naming the job's field; a deadline passed on the way is a PhaseTimeout. The HTTP server plans here too."""
        try:
            # A job that downloads nothing never waits behind downloads; one that does is checked first, then
            # waits for a download thread.
            pool = self.planning
            if needs_download(raw_input):
                await self._before(deadline, "reading the input", pool, check_all_but_prefix, raw_input, self.limits)
                pool = self.downloads
            job = await self._before(deadline, "reading the input", pool, parse_job, raw_input, self.limits)
            return await self._before(deadline, "planning", self.planning, self._prepare, job_id, job)
        except GenerationParamError as exc:
            raise JobInputError(job_field(exc.param), exc.message) from None

    def _prepare(self, job_id: str, job: JobRequest) -> PreparedJob:
        """Words for prefix speakers sent without them (transcription), then planning (tokenising, the prefix's
        Mimi encode): blocking work that runs here, off the event loop and the scheduler's thread."""
        started = time.monotonic()
        voices = self.voices.complete(job)
        engine = self.scheduler.engine
        plan = engine.prepare(to_generation_request(voices.job, engine.max_delay, job_id), self.encode_audio)
        if job.prefix is None:
            return PreparedJob(voices.job, plan, None, None)
        return PreparedJob(voices.job, plan, (time.monotonic() - started) * 1000, voices.cached)

    async def _before(self, deadline: float | None, phase: str, pool: Executor, call, *args) -> T:
        """`call(*args)` on `pool`, given up (left to finish on its own) once the job's deadline passes."""
        future = asyncio.wrap_future(pool.submit(call, *args))
        try:
            return await _until(deadline, future)
        except TimeoutError:
            raise PhaseTimeout(phase) from None

    async def _generate(self, job_id: str, prepared: PreparedJob, received_at: float,
                        deadline: float | None) -> AsyncIterator[dict]:
        job, plan = prepared.job, prepared.plan
        generation = ScheduledGeneration(self.scheduler, plan, deadline)
        ticket = generation.ticket
        stream = _AudioStream(job, self.sample_rate)
        ttfa_ms = None
        output_bytes = 0  # of the aggregated output so far
        try:
            async for out in generation:
                items = stream.add(out)
                if ttfa_ms is None and stream.samples:
                    ttfa_ms = (time.monotonic() - received_at) * 1000
                for item in items:
                    output_bytes += _json_size(item)
                    yield item
        except Exception as exc:  # what ended the generation: the client hears what, the log gets the rest
            yield error_item(_failure(exc, job_id))
            return
        finally:
            ticket.cancel()  # no-op once finished; frees the slot if the job was cancelled or failed here
        generate_ms = (time.monotonic() - (ticket.started_at or received_at)) * 1000
        for item in stream.finish():
            output_bytes += _json_size(item)
            yield item
        data = encode_file(job.output.format, bytes(stream.pcm), self.sample_rate)
        duration_s = stream.samples / self.sample_rate
        metrics = JobMetrics(
            queue_ms=((ticket.started_at or received_at) - received_at) * 1000, ttfa_ms=ttfa_ms,
            generate_ms=generate_ms, rtf=generate_ms / 1000 / duration_s if duration_s else 0.0,
            frames=stream.frames, prefix_ms=prepared.prefix_ms, prefix_cached=prepared.prefix_cached,
        )
        fields = dict(duration_s=duration_s, timestamps=[[w, t] for w, t in stream.timestamps],
                      seed=plan.params.seed, metrics=metrics, prefix_words=prefix_words(job))
        yield await self.keeper.keep(job_id, job, data, fields, deadline,
                                     room=self.settings.max_output_bytes - output_bytes)


class ScheduledGeneration:
    """A plan submitted to the scheduler, awaited on the event loop: iterating yields each step's Emitted until
    the finished one; what ended it otherwise (the scheduler's exception, or the deadline passing) is raised.
    The caller cancels the ticket when it stops early. The queue runner and the speech server both use it."""

    def __init__(self, scheduler: Scheduler, plan: GenerationPlan, deadline: float | None) -> None:
        loop = asyncio.get_running_loop()
        self.outputs: asyncio.Queue = asyncio.Queue()
        self.deadline = deadline
        self.finished = False  # the scheduler let go of it
        self.frames = 0
        self.words: list[list] = []  # [[word, seconds], ...] so far
        self.ticket = scheduler.submit(plan, lambda out: loop.call_soon_threadsafe(self.outputs.put_nowait, out),
                                       deadline)

    async def __aiter__(self) -> AsyncIterator[Emitted]:
        while not self.finished:
            try:
                out = await _until(self.deadline, self.outputs.get())
            except TimeoutError:  # the scheduler only looks at a waiting job's deadline when a slot frees
                phase = "generating" if self.ticket.started_at is not None else "it waited for a slot"
                raise JobTimeout(f"the job's time limit passed while {phase}") from None
            if isinstance(out, BaseException):
                self.finished = True
                raise out
            self.finished = out.finished
            self.frames += len(out.frames)
            self.words += [[word.text, word.time_s] for word in out.words]
            yield out


class Keeper:
    """Puts finished audio where the client can get it: the storage, else inline in the result, else the
    spool directory, named in the error. Uploads run on a bounded pool of their own."""

    def __init__(self, storage: Storage, settings: RunnerSettings) -> None:
        self.storage, self.settings = storage, settings
        self.uploads = ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="dia2-upload")

    async def keep(self, job_id: str, job: JobRequest, data: bytes, fields: dict, deadline: float | None,
                   room: int | None = None) -> dict:
        """The result with the stored file's URL; when the upload fails or runs out of time, the result with
        the file inline if it fits (INLINE_AUDIO_MAX_BYTES, and `room`: bytes the job's output may still
        grow by), else an error naming the spool file that holds it. Never raises."""
        tag = {"job_id": job_id}
        audio_format = FORMATS[job.output.format]
        try:
            key = self.storage.key_for(job_id, job.output.key_prefix, audio_format.extension)
        except ValueError:
            log.exception("no object key for this job", extra=tag)
            key, why = None, "no object key could be made"
        else:
            stored, why = await self._upload(key, data, audio_format.content_type, job.output.presign_expiry_s,
                                             deadline, tag)
            if stored is not None:
                return result_item(audio_url=stored.url, bucket=stored.bucket, key=stored.key, sha256=stored.sha256,
                                   **fields)
        sha256 = hashlib.sha256(data).hexdigest()
        inline = result_item(audio_url=None, bucket=None, key=None, sha256=sha256, storage_error=why,
                             audio_base64=base64.b64encode(data).decode("ascii"), **fields)
        fits = room is None or _json_size(inline) <= room
        if len(data) <= self.settings.inline_audio_max_bytes and fits:
            log.warning("%s; the audio is returned inline", why, extra=tag)
            return inline
        ceiling = (f"the {self.settings.inline_audio_max_bytes}-byte inline limit (INLINE_AUDIO_MAX_BYTES)" if fits
                   else f"the room left in the job's output (at most {self.settings.max_output_bytes} bytes, "
                        "RunPod's payload limit, and the streamed audio is already in it)")
        too_large = f"{why}, and at {len(data)} bytes the audio is larger than {ceiling}"
        spool = self.settings.spool_dir.joinpath(*(key or f"{sha256}{audio_format.extension}").split("/"))
        try:
            await asyncio.to_thread(self._spool, spool, data)
        except Exception:
            log.exception("spool copy %s could not be written", spool, extra=tag)
            return error_item(f"{too_large}; no copy could be kept on the worker either, so the audio "
                              f"(sha256 {sha256}) is lost")
        log.warning("%s; the audio was written to %s", too_large, spool, extra=tag)
        return error_item(f"{too_large}; it was written to {spool} on the worker (sha256 {sha256})")

    async def _upload(self, key: str, data: bytes, content_type: str, presign_expiry_s: int | None,
                      deadline: float | None, tag: dict) -> tuple[StoredObject | None, str]:
        """The stored object, or None and why not (for the client: no worker details; those are logged)."""
        budget, limit = self.settings.upload_timeout_s, "UPLOAD_TIMEOUT_S"
        if deadline is not None and deadline - time.monotonic() < budget:
            budget, limit = deadline - time.monotonic(), "JOB_TIMEOUT_S"
        if budget <= 0:
            return None, "the job's time limit passed before the upload (JOB_TIMEOUT_S)"
        put = self.uploads.submit(self.storage.put, key, data, content_type=content_type,
                                  presign_expiry_s=presign_expiry_s,
                                  deadline=time.monotonic() + budget)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(put), budget), ""
        except StorageError as exc:
            log.error("%s", exc, extra=tag)
            return None, f"the upload failed after {exc.attempts} attempt{'s' * (exc.attempts > 1)}"
        except TimeoutError:
            log.error("upload of %s not finished within %g s (%s)", key, budget, limit, extra=tag)
            return None, f"the upload did not finish in time ({limit})"
        except Exception:
            log.exception("upload of %s failed", key, extra=tag)
            return None, "the upload failed"

    def _spool(self, path: Path, data: bytes) -> None:
        """Write the spool copy, first deleting the oldest ones so the spool stays within SPOOL_MAX_BYTES."""
        root = self.settings.spool_dir
        kept = [(f.stat(), f) for f in root.rglob("*") if f.is_file()] if root.is_dir() else []
        total = len(data) + sum(stat.st_size for stat, _ in kept)
        for stat, old in sorted(kept, key=lambda item: item[0].st_mtime):
            if total <= self.settings.spool_max_bytes:
                break
            old.unlink(missing_ok=True)
            log.warning("spool over SPOOL_MAX_BYTES: deleted its oldest copy, %s", old)
            total -= stat.st_size
        if total > self.settings.spool_max_bytes:
            raise OSError(f"{len(data)} bytes do not fit the {self.settings.spool_max_bytes}-byte spool")
        write_atomically(path, data)


def _json_size(item: dict) -> int:
    return len(json.dumps(item))


async def _until(deadline: float | None, awaitable: Awaitable[T]) -> T:
    """Await, raising TimeoutError once `deadline` (time.monotonic()) has passed."""
    if deadline is None:
        return await awaitable
    return await asyncio.wait_for(awaitable, max(0.0, deadline - time.monotonic()))


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
    return str(JobInputError(job_field(exc.param), exc.message))


def _failure(exc: BaseException, job_id: str) -> str:
    """What the client is told about a failed generation; the details go to the worker's log."""
    if isinstance(exc, GenerationParamError):
        return _job_error(exc)
    if isinstance(exc, JobTimeout):
        return f"timeout: {exc} (JOB_TIMEOUT_S)"
    log.error("generation failed", exc_info=exc, extra={"job_id": job_id})
    return f"generation failed on the worker (logged under job id {job_id})"
