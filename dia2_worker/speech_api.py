"""OpenAI's speech API (`POST /v1/audio/speech`) over the worker's scheduler, for RunPod load-balancing endpoints.

A request is validated exactly as a queue job is (`JobRunner.plan`: the same field names, limits and
messages), then generated on the same scheduler and slots, and its audio streams out as it is decoded: the
first bytes leave with the first frame. The server admits as many requests as there are slots plus a short
wait line (MAX_WAITING); past that it answers 429 at once. A client that goes away cancels its generation,
which frees the slot before the next frame.

Starlette is imported here, and this module only in server mode (`python -m dia2_worker.serve`).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .encoders import FORMATS, StreamEncoder
from .env import Range, WorkerConfigError, env_number, env_text
from .jobs import FRAME_MS, JobInputError, WorkerLimits, check_fields, parse_job

if TYPE_CHECKING:  # the runner imports torch: imported at the first request, so the server listens before that
    from .runner import ScheduledGeneration

log = logging.getLogger("dia2_worker.serve")

MODEL_ALIAS = "dia2"
OPENAI_VOICES = ("alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx", "sage",
                 "shimmer", "verse")
"""OpenAI's built-in voice names: accepted, and mean "no voice prefix" (Dia2 picks a voice from the seed)."""
SPEECH_FIELDS = ("model", "input", "voice", "response_format", "speed", "stream_format")
DIA2_FIELDS = ("seed", "temperature", "top_k", "text_temperature", "text_top_k", "cfg_scale", "cfg_filter_k",
               "max_duration_s", "prefix")
"""Dia2's own settings, as extra body fields with the queue job's names."""
STREAM_FORMATS = ("audio", "sse")
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ServerSettings:
    port: int
    """PORT: where the API listens (8000 by default)."""
    health_port: int
    """PORT_HEALTH: where /ping is answered as well, when it differs from PORT (RunPod's load balancer)."""
    api_key: str | None
    """API_KEY: when set, every route but /ping needs `Authorization: Bearer <key>`."""
    max_waiting: int | None
    """MAX_WAITING: requests that may wait for a slot; more get 429 (default: as many as there are slots)."""
    voices_dir: Path | None
    """VOICES_DIR: registered voices, <name>.wav with <name>.json holding {"words": [[word, start_s, end_s], ...]}."""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ServerSettings:
        port = env_number(env, "PORT", int, Range(0, 65535), 8000)
        voices_dir = env_text(env, "VOICES_DIR")
        if voices_dir is not None and not Path(voices_dir).is_dir():
            raise WorkerConfigError(f"VOICES_DIR: {voices_dir} is not a directory")
        return cls(
            port=port,
            health_port=env_number(env, "PORT_HEALTH", int, Range(0, 65535), port),
            api_key=env_text(env, "API_KEY"),
            max_waiting=env_number(env, "MAX_WAITING", int, Range(0, 4096), None),
            voices_dir=None if voices_dir is None else Path(voices_dir),
        )


def load_voices(directory: Path | None, limits: WorkerLimits) -> dict[str, dict]:
    """name -> the prefix speaker a voice stands for, each checked as a job's prefix would be."""
    if directory is None:
        return {}
    voices = {}
    for wav in sorted(directory.glob("*.wav")):
        words_path = wav.with_suffix(".json")
        try:
            words = json.loads(words_path.read_text())["words"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise WorkerConfigError(f"VOICES_DIR: {words_path} must hold {{\"words\": [[word, start_s, end_s], "
                                    f"...]}} for {wav.name} ({type(exc).__name__}: {exc})") from None
        speaker = {"audio_base64": base64.b64encode(wav.read_bytes()).decode("ascii"), "words": words}
        try:
            parse_job({"text": "[S1] voice check", "prefix": {"speaker_1": speaker}}, limits)
        except JobInputError as exc:
            raise WorkerConfigError(f"VOICES_DIR: voice {wav.stem}: {exc}") from None
        if wav.stem in OPENAI_VOICES:
            raise WorkerConfigError(f"VOICES_DIR: {wav.name}: {wav.stem} is an OpenAI voice name, which means "
                                    "no prefix; rename the file")
        voices[wav.stem] = speaker
    return voices


def _is_one_of(value: object, names) -> bool:
    return isinstance(value, str) and value in names


class ApiError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.kind, self.code, self.headers = status, param, kind, code, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, self.status, headers=self.headers)


def _invalid(param: str, message: str) -> ApiError:
    """A 400 whose message reads as the queue worker's does: `param: message`."""
    return ApiError(400, f"{param}: {message}", param)


@dataclass
class ServerState:
    """Whether the model is loading, ready or failed (what /ping answers), and the loaded service."""

    service: Any = None
    failure: str | None = None
    model_id: str = MODEL_ALIAS
    voices: dict[str, dict] = field(default_factory=dict)


@dataclass(frozen=True)
class SpeechRequest:
    job: dict
    response_format: str
    stream_format: str


class SpeechApi:
    def __init__(self, state: ServerState, settings: ServerSettings) -> None:
        self.state, self.settings = state, settings
        self.admitted = 0
        self._releases: set[asyncio.Task] = set()

    # -- routes

    async def ping(self, request: Request) -> Response:
        if self.state.failure is not None:
            return JSONResponse({"status": "failed", "error": self.state.failure}, 503)
        if self.state.service is None:
            return Response(status_code=204)
        return JSONResponse({"status": "ready"})

    async def models(self, request: Request) -> Response:
        service = self._ready(request)
        created = int(service.settings.model_dir.stat().st_mtime)
        ids = dict.fromkeys([self.state.model_id, MODEL_ALIAS])
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": created, "owned_by": "nari-labs"} for model_id in ids]})

    async def speech(self, request: Request) -> Response:
        service = self._ready(request)
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "the request body must be a JSON object") from None
        speech = self._parse(body)
        capacity = service.scheduler.slots + self._max_waiting(service)
        if self.admitted >= capacity:
            raise ApiError(429, f"all {service.scheduler.slots} slots are busy and the wait line is full; "
                                f"retry after {RETRY_AFTER_S} s", kind="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)})
        self.admitted += 1
        try:
            return await self._start(service, speech)
        except BaseException:
            self.admitted -= 1
            raise

    # -- request handling

    def _ready(self, request: Request):
        if self.settings.api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.settings.api_key}".encode()):
                raise ApiError(401, "missing or wrong API key (send Authorization: Bearer <API_KEY>)",
                               kind="authentication_error", code="invalid_api_key")
        if self.state.failure is not None:
            raise ApiError(503, f"the model failed to load: {self.state.failure}", kind="server_error")
        if self.state.service is None:
            raise ApiError(503, "the model is still loading", kind="server_error",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        return self.state.service

    def _max_waiting(self, service) -> int:
        return service.scheduler.slots if self.settings.max_waiting is None else self.settings.max_waiting

    def _parse(self, body: object) -> SpeechRequest:
        """OpenAI's fields -> a queue job's input; Dia2's own fields pass through to the job's validation."""
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            check_fields(body, frozenset(SPEECH_FIELDS + DIA2_FIELDS))
        except JobInputError as exc:
            raise _invalid(exc.field, str(exc).removeprefix(f"{exc.field}: ")) from None
        models = dict.fromkeys([MODEL_ALIAS, self.state.model_id])
        if not _is_one_of(body.get("model"), models):
            raise _invalid("model", f"must be {' or '.join(json.dumps(m) for m in models)}, "
                                    f"got {json.dumps(body.get('model'))}")
        response_format = body.get("response_format", "mp3")
        if not _is_one_of(response_format, FORMATS):
            raise _invalid("response_format", f"must be one of {', '.join(FORMATS)}, got {json.dumps(response_format)}")
        stream_format = body.get("stream_format", "audio")
        if not _is_one_of(stream_format, STREAM_FORMATS):
            raise _invalid("stream_format", f"must be audio or sse, got {json.dumps(stream_format)}")
        speed = body.get("speed", 1.0)
        if speed != 1.0 or isinstance(speed, bool):
            raise _invalid("speed", f"must be 1.0: Dia2 speaks at its own pace, got {json.dumps(speed)}")
        job = {key: body[key] for key in DIA2_FIELDS if key in body}
        job.update(text=body.get("input"), stream=True, chunk_ms=FRAME_MS)
        voice = body.get("voice")
        if voice is not None and not _is_one_of(voice, OPENAI_VOICES):
            if not _is_one_of(voice, self.state.voices):
                registered = ", ".join(self.state.voices) or "none (VOICES_DIR)"
                raise _invalid("voice", f"unknown voice {json.dumps(voice)}; registered voices: {registered}; "
                                        f"OpenAI's names ({', '.join(OPENAI_VOICES)}) mean no voice prefix")
            if job.get("prefix") is not None:
                raise _invalid("voice", f"{json.dumps(voice)} is a voice prefix already; send either a registered "
                                        "voice or prefix, not both")
            job["prefix"] = {"speaker_1": self.state.voices[voice]}
        return SpeechRequest(job, response_format, stream_format)

    async def _start(self, service, speech: SpeechRequest) -> Response:
        """Plan (off the event loop), submit, and answer with the stream; a refused input is a 400."""
        from .runner import PhaseTimeout, ScheduledGeneration

        runner = service.runner
        request_id = uuid.uuid4().hex
        deadline = runner.deadline(time.monotonic())
        try:
            plan = (await runner.plan(request_id, speech.job, deadline)).plan
        except JobInputError as exc:
            param = "input" if exc.field == "text" else exc.field
            raise _invalid(param, str(exc).removeprefix(f"{exc.field}: ")) from None
        except PhaseTimeout as exc:
            raise ApiError(504, f"timeout: the request's time limit passed while {exc} (JOB_TIMEOUT_S)",
                           kind="server_error") from None
        generation = ScheduledGeneration(service.scheduler, plan, deadline)
        encoder = StreamEncoder(speech.response_format, runner.sample_rate)
        headers = {"X-Request-Id": request_id, "X-Seed": str(plan.params.seed)}
        log.info("request %s: %s, %s stream, seed %d", request_id, speech.response_format, speech.stream_format,
                 plan.params.seed)
        chunks = _audio(generation, encoder)
        if speech.stream_format == "sse":
            input_tokens = sum(len(entry.tokens) for entry in plan.entries)
            chunks, media_type = _sse(chunks, generation, input_tokens), "text/event-stream"
        else:
            media_type = FORMATS[speech.response_format].content_type
        return _GenerationResponse(chunks, lambda: self._end(request_id, generation), headers=headers,
                                   media_type=media_type)

    def _end(self, request_id: str, generation: ScheduledGeneration) -> None:
        """However the response ended: count the request out, at once if its generation is over, else once a
        cancel has freed its slot."""
        if generation.finished:
            self.admitted -= 1
            log.info("request %s: done, %d frames", request_id, generation.frames)
        else:
            self._release_later(request_id, generation)

    def _release_later(self, request_id: str, generation: ScheduledGeneration) -> None:
        """Cancel a generation the response no longer wants and count its request out once the scheduler has
        freed its slot (a task of its own: the response's task may be cancelled already)."""
        generation.ticket.cancel()
        steps = generation.ticket.steps

        async def release() -> None:
            await asyncio.to_thread(generation.ticket.released.wait)
            self.admitted -= 1
            log.info("request %s: stopped after %d frames sent; slot freed %d frames later", request_id,
                     generation.frames, generation.ticket.steps - steps)

        task = asyncio.get_running_loop().create_task(release())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)


class _GenerationResponse(StreamingResponse):
    """A streamed response that calls `on_end` however it ends: done, failed, or the client gone (even before
    the body started)."""

    def __init__(self, content: AsyncIterator[bytes], on_end, **kwargs) -> None:
        super().__init__(content, **kwargs)
        self.on_end = on_end

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_end()


async def _audio(generation: ScheduledGeneration, encoder: StreamEncoder) -> AsyncIterator[bytes]:
    """The encoded audio, sent as each step's frames are decoded."""
    from .audio import pcm16_bytes

    async for emitted in generation:
        if emitted.frames and (data := encoder.write(b"".join(pcm16_bytes(f.pcm) for f in emitted.frames))):
            yield data
    if data := encoder.close():
        yield data


async def _sse(chunks: AsyncIterator[bytes], generation: ScheduledGeneration,
               input_tokens: int) -> AsyncIterator[bytes]:
    """OpenAI's speech events: `speech.audio.delta` with base64 audio, then `speech.audio.done` with usage
    (input: text tokens, output: audio frames) and the word timestamps."""

    def event(payload: dict) -> bytes:
        return f"data: {json.dumps(payload)}\n\n".encode()

    try:
        async for data in chunks:
            yield event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode("ascii")})
    except Exception as exc:
        log.error("generation failed", exc_info=exc)
        yield event({"type": "error", "error": {"message": f"generation failed: {type(exc).__name__}: {exc}",
                                                "type": "server_error", "param": None, "code": None}})
        return
    usage = {"input_tokens": input_tokens, "output_tokens": generation.frames,
             "total_tokens": input_tokens + generation.frames}
    yield event({"type": "speech.audio.done", "usage": usage, "timestamps": generation.words})


def create_app(state: ServerState, settings: ServerSettings) -> Starlette:
    """The API; on PORT_HEALTH (when it differs from PORT) only /ping is served."""
    api = SpeechApi(state, settings)

    async def api_error(request: Request, exc: ApiError) -> Response:
        return exc.response()

    app = Starlette(routes=[
        Route("/ping", api.ping, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/audio/speech", api.speech, methods=["POST"]),
    ], exception_handlers={ApiError: api_error})
    app.state.api = api
    if settings.health_port == settings.port:
        return app

    async def by_port(scope, receive, send) -> None:
        if scope["type"] == "http" and scope.get("server", (None, None))[1] == settings.health_port \
                and scope["path"] != "/ping":
            await JSONResponse({"error": {"message": "only /ping is served on PORT_HEALTH", "type":
                                          "invalid_request_error", "param": None, "code": None}}, 404)(
                scope, receive, send)
            return
        await app(scope, receive, send)

    return by_port
