"""Job input schema and validation, plus the stream items and result the runner yields.

Every job input is checked here before any GPU work: a bad job fails with a `JobInputError` that
names the field and the limit it broke, and the worker stays up for the next job. Prefix audio
is fetched and decoded here too; what is left for the engine's planning to reject (text longer than the
model's context or max_duration_s) is still checked before any frame runs.

`parse_job` blocks while it downloads an `audio_url` (at most `AUDIO_URL_TIMEOUT_S`): call it
from a thread, not from the event loop.

Import cost counts toward the worker's cold start: numpy, soundfile, ipaddress, http.client and
ssl are imported inside the functions that need them.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import math
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .encoders import FILE_FORMATS
from .env import FALSE, TRUE, Range, WorkerConfigError, env_number
from .params import JOB_PARAMS

if TYPE_CHECKING:
    import http.client
    from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

    import numpy as np

T = TypeVar("T")

FRAME_MS = 80
"""One Mimi frame (1920 samples at 24 kHz, 12.5 frames/s): the finest step audio can stream in."""
DEFAULT_CHUNK_MS = 1000
"""Audio per stream item after the first: about 64 KB of base64, one stream post per second of audio."""
MAX_WORDS = 1000
"""Most word timings per prefix speaker; 30 s of speech holds far fewer."""
WORD_END_SLACK_S = 0.05
"""How far a word's end may pass the end of its audio (aligners round)."""
MAX_REDIRECTS = 3
MAX_URL_CHARS = 2048
MAX_KEY_PREFIX_CHARS = 200
MAX_PREFIX_CHANNELS = 2
UNKNOWN_FRAMES = 1 << 62
"""At least this many frames is libsndfile's way of saying a stream does not state its length (2**63 - 1)."""
MAX_ERROR_CHARS = 2000
"""Longest error message a job gets back (and the log repeats): one readable line, whatever was sent."""
MAX_NAMES_SHOWN = 5
"""Unknown field names an error lists."""

_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
"""Control characters (newline, carriage return and tab excepted) and lone surrogates."""
_BIDI_CONTROLS = re.compile(r"[\u202a-\u202e\u2066-\u2069]")
"""Bidirectional embeddings, overrides and isolates: they make a script display other than it reads."""
_TAGS = re.compile(r"\[S[12]\]|<break\b[^>]*>")
"""Speaker tags and pauses: markup, not speech."""
_URL_CHARS = re.compile(rf"[!-~]{{1,{MAX_URL_CHARS}}}")
_KEY_PREFIX_CHARS = re.compile(rf"[A-Za-z0-9/_.-]{{1,{MAX_KEY_PREFIX_CHARS}}}")
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


class JobInputError(ValueError):
    """A job input the worker refuses; `field` is its path, e.g. `prefix.speaker_1.words[2][1]`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


_PRESIGN_EXPIRY_S = Range(60, 604_800)  # S3 presigned URLs live at most 7 days
_SAMPLE_RATE = Range(8_000, 192_000)
_POSITIVE = Range(0, lo_open=True)


@dataclass(frozen=True)
class WorkerLimits:
    """Caps on what one job may ask for, set by the operator; see `from_env` for the variables."""

    max_text_chars: int = 4000
    """MAX_TEXT_CHARS: longest script, counted after stripping surrounding whitespace."""
    max_duration_s: float = 120.0
    """MAX_DURATION_S: longest generation; Dia2's context is 1500 frames at 12.5 frames/s."""
    max_prefix_audio_s: float = 30.0
    """MAX_PREFIX_AUDIO_S: longest voice prefix per speaker."""
    max_prefix_audio_bytes: int = 16 * 1024 * 1024
    """MAX_PREFIX_AUDIO_BYTES: largest prefix audio file per speaker, as sent or downloaded."""
    audio_url_timeout_s: float = 10.0
    """AUDIO_URL_TIMEOUT_S: total time for one audio_url download, redirects included."""
    private_audio_networks: tuple[IPv4Network | IPv6Network, ...] = ()
    """ALLOW_PRIVATE_AUDIO_URLS: non-public networks audio_url may reach (none by default)."""
    max_chunk_ms: int = 10_000
    """MAX_CHUNK_MS: largest chunk_ms a job may ask for."""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerLimits:
        """Read the limits from environment variables; unset or blank ones keep their defaults.

        ALLOW_PRIVATE_AUDIO_URLS takes true/false (all non-public addresses, or none) or a
        comma-separated list of networks such as `10.0.0.0/8,127.0.0.1`, so an operator can open
        one internal host without also opening, say, the cloud metadata address.
        """

        return cls(
            max_text_chars=env_number(env, "MAX_TEXT_CHARS", int, Range(1), cls.max_text_chars),
            max_duration_s=env_number(env, "MAX_DURATION_S", float, _POSITIVE, cls.max_duration_s),
            max_prefix_audio_s=env_number(env, "MAX_PREFIX_AUDIO_S", float, _POSITIVE, cls.max_prefix_audio_s),
            max_prefix_audio_bytes=env_number(env, "MAX_PREFIX_AUDIO_BYTES", int, Range(1),
                                              cls.max_prefix_audio_bytes),
            audio_url_timeout_s=env_number(env, "AUDIO_URL_TIMEOUT_S", float, _POSITIVE, cls.audio_url_timeout_s),
            private_audio_networks=_parse_networks(env.get("ALLOW_PRIVATE_AUDIO_URLS", "")),
            max_chunk_ms=env_number(env, "MAX_CHUNK_MS", int, Range(FRAME_MS), cls.max_chunk_ms),
        )


def _parse_networks(text: str) -> tuple[IPv4Network | IPv6Network, ...]:
    import ipaddress

    value = text.strip().lower()
    if not value or value in FALSE:
        return ()
    if value in TRUE:
        return (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
    try:
        return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in value.split(","))
    except ValueError:
        raise WorkerConfigError(
            "ALLOW_PRIVATE_AUDIO_URLS: must be true, false or comma-separated networks "
            f"such as 10.0.0.0/8,127.0.0.1, got {text!r}"
        ) from None


@dataclass(frozen=True, eq=False)
class PrefixAudio:
    """One speaker's voice prefix: decoded audio and the timings of the words spoken in it."""

    samples: np.ndarray
    """float32 [frames, channels], as decoded: the engine mixes to mono and resamples when it encodes."""
    sample_rate: int
    words: tuple[tuple[str, float, float], ...] | None
    """(word, start_s, end_s), starts non-decreasing, each end within the audio; None: not given, the worker
    transcribes the audio (asr.VoicePrefixes)."""
    duration_s: float


@dataclass(frozen=True)
class PrefixRequest:
    speaker_1: PrefixAudio
    speaker_2: PrefixAudio | None


@dataclass(frozen=True)
class OutputSpec:
    format: str = "wav"
    key_prefix: str | None = None
    """Object-key prefix for the stored WAV; None lets storage choose."""
    presign_expiry_s: int | None = None
    """Lifetime of the returned URL; None lets storage choose."""


@dataclass(frozen=True)
class JobRequest:
    """A validated job. Temperatures of 0 mean greedy; seed None means the runner picks one."""

    text: str
    seed: int | None
    temperature: float
    top_k: int
    text_temperature: float
    text_top_k: int
    cfg_scale: float
    cfg_filter_k: int
    max_duration_s: float
    stream: bool
    chunk_ms: int
    prefix: PrefixRequest | None
    include_prefix: bool
    output: OutputSpec


def _field_names(cls: type) -> frozenset[str]:
    return frozenset(field.name for field in dataclasses.fields(cls))


# These JSON objects carry exactly the fields of their dataclasses; a prefix speaker does not.
_JOB_FIELDS = _field_names(JobRequest)
_OUTPUT_FIELDS = _field_names(OutputSpec)
_PREFIX_FIELDS = _field_names(PrefixRequest)
_PREFIX_AUDIO_FIELDS = frozenset({"audio_base64", "audio_url", "words"})


def parse_job(raw: object, limits: WorkerLimits) -> JobRequest:
    """Validate a job's `input` object and return it typed, or raise `JobInputError`.

    JSON null counts as an absent field. Prefix audio, which may need a download, comes last,
    so a job with a cheap mistake fails before any network traffic.
    """
    job = _object(raw, "", _JOB_FIELDS)
    text = job.required("text", f"the [S1]/[S2] dialogue script, at most {limits.max_text_chars} characters")
    include_prefix = job.optional("include_prefix", False, _boolean)
    if include_prefix and job.values.get("prefix") is None:
        raise JobInputError("include_prefix", "can only be true when a prefix is given")
    return JobRequest(
        text=_text(text, "text", limits.max_text_chars),
        **{p.job_field: job.optional(p.job_field, p.default, _integer if p.type is int else _real, p.range)
           for p in JOB_PARAMS},  # seed, sampling and guidance: params.PARAMS
        max_duration_s=job.optional(
            "max_duration_s", limits.max_duration_s, _real, Range(0, limits.max_duration_s, lo_open=True)
        ),
        stream=job.optional("stream", True, _boolean),
        chunk_ms=job.optional(
            "chunk_ms", min(DEFAULT_CHUNK_MS, limits.max_chunk_ms), _integer, Range(FRAME_MS, limits.max_chunk_ms)
        ),
        include_prefix=include_prefix,
        output=job.optional("output", OutputSpec(), _output),
        prefix=job.optional("prefix", None, _prefix, limits),
    )


@dataclass(frozen=True)
class _Object:
    """A JSON object already checked for unknown fields, with the path its errors report."""

    values: Mapping[str, object]
    path: str

    def field(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def required(self, key: str, what: str) -> object:
        value = self.values.get(key)
        if value is None:
            raise JobInputError(self.field(key), f"required: {what}")
        return value

    def optional(self, key: str, default: T, read: Callable[..., T], *args: Any) -> T:
        value = self.values.get(key)
        return default if value is None else read(value, self.field(key), *args)


def _object(value: object, path: str, allowed: frozenset[str]) -> _Object:
    if not isinstance(value, dict):
        raise JobInputError(path or "input", f"must be a JSON object, got {_show(value)}")
    found = _Object(value, path)
    unknown = sorted(_show_name(key) for key in value if key not in allowed)
    if unknown:
        more = f" and {len(unknown) - MAX_NAMES_SHOWN} more" if len(unknown) > MAX_NAMES_SHOWN else ""
        raise JobInputError(
            found.field(unknown[0]),
            f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown[:MAX_NAMES_SHOWN])}{more} "
            f"(allowed here: {', '.join(sorted(allowed))})",
        )
    return found


def check_fields(value: dict, allowed: frozenset[str]) -> None:
    """A JobInputError naming the first field of `value` outside `allowed` (names escaped, the list capped), as a
    job's own fields get; for request bodies that become jobs (the speech API)."""
    _object(value, "", allowed)


def _show_name(key: object) -> str:
    """A field name as sent, shown as is when it is plain, else as a short JSON string (escaped)."""
    name = str(key)
    return name if re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", name) else _show(name, 40)


def _integer(value: object, field: str, allowed: Range) -> int:
    """An integer in range; bools and floats (even 50.0) are refused, as JSON clients mean them."""
    if isinstance(value, int) and not isinstance(value, bool) and value in allowed:
        return value
    raise JobInputError(field, f"must be an integer {allowed.describe()}, got {_show(value)}")


def _real(value: object, field: str, allowed: Range, note: str = "") -> float:
    """A finite number in range (integers accepted); `note` explains a bound that depends on data."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError):  # an integer too large for a float
            number = float(value)
            if math.isfinite(number) and number in allowed:
                return number
    raise JobInputError(field, f"must be a number {allowed.describe()}, got {_show(value)}{note}")


def _boolean(value: object, field: str) -> bool:
    if isinstance(value, bool):
        return value
    raise JobInputError(field, f"must be true or false, got {_show(value)}")


def _string(value: object, field: str) -> str:
    if isinstance(value, str):
        return value
    raise JobInputError(field, f"must be a string, got {_show(value)}")


def _text(value: object, field: str, max_chars: int) -> str:
    text = _string(value, field).strip()
    if not text:
        raise JobInputError(field, f"must not be empty or only whitespace (at most {max_chars} characters)")
    if len(text) > max_chars:
        raise JobInputError(field, f"must be at most {max_chars} characters, got {len(text)}")
    _refuse_control_chars(text, field)
    bidi = _BIDI_CONTROLS.search(text)
    if bidi:
        raise JobInputError(
            field, f"must not contain bidirectional override or isolate characters, got U+{ord(bidi.group()):04X} "
                   f"at index {bidi.start()}")
    if not any(_spoken(char) for char in _TAGS.sub(" ", text)):
        raise JobInputError(field, "must contain words to speak, not only [S1]/[S2] tags, <break/> pauses, "
                                   "whitespace or invisible formatting characters")
    return text


def _spoken(char: str) -> bool:
    """A character that can be part of a word: not whitespace, not a control or format character (Cc, Cf)."""
    import unicodedata

    return not char.isspace() and unicodedata.category(char) not in ("Cc", "Cf")


def _refuse_control_chars(text: str, field: str) -> None:
    """Refuse characters that tokenizers and JSON logs mangle: controls and lone surrogates."""
    found = _CONTROL_CHARS.search(text)
    if found:
        raise JobInputError(
            field,
            f"must not contain control characters (only newline and tab are allowed), "
            f"got U+{ord(found.group()):04X} at index {found.start()}",
        )


def _output(value: object, field: str) -> OutputSpec:
    output = _object(value, field, _OUTPUT_FIELDS)
    file_format = output.optional("format", "wav", _string)
    if file_format not in FILE_FORMATS:
        raise JobInputError(output.field("format"), f"must be one of {', '.join(FILE_FORMATS)}, got {_show(file_format)}")
    return OutputSpec(
        format=file_format,
        key_prefix=output.optional("key_prefix", None, _key_prefix),
        presign_expiry_s=output.optional("presign_expiry_s", None, _integer, _PRESIGN_EXPIRY_S),
    )


def _key_prefix(value: object, field: str) -> str:
    """An object-key prefix that cannot climb out of, or start above, the worker's key space."""
    key_prefix = _string(value, field)
    segments = key_prefix.rstrip("/").split("/")
    if not _KEY_PREFIX_CHARS.fullmatch(key_prefix) or key_prefix.startswith("/") or any(
            segment in ("", ".", "..") for segment in segments):
        raise JobInputError(
            field,
            f"must be 1 to {MAX_KEY_PREFIX_CHARS} characters of A-Z a-z 0-9 / _ . -, "
            f'without a leading "/" or empty, "." or ".." path segments, got {_show(key_prefix)}',
        )
    return key_prefix


def _prefix(value: object, field: str, limits: WorkerLimits) -> PrefixRequest:
    prefix = _object(value, field, _PREFIX_FIELDS)
    speaker_1 = prefix.required("speaker_1", "speaker 1's voice whenever a prefix is given (speaker_2 is optional)")
    return PrefixRequest(
        speaker_1=_prefix_audio(speaker_1, prefix.field("speaker_1"), limits),
        speaker_2=prefix.optional("speaker_2", None, _prefix_audio, limits),
    )


def _prefix_audio(value: object, field: str, limits: WorkerLimits) -> PrefixAudio:
    """One speaker's prefix: source and words checked first (cheap), then the audio fetched and decoded."""
    spec = _object(value, field, _PREFIX_AUDIO_FIELDS)
    sources = [key for key in ("audio_base64", "audio_url") if spec.values.get(key) is not None]
    if len(sources) != 1:
        raise JobInputError(
            field, f"must give exactly one of audio_base64 or audio_url, got {' and '.join(sources) or 'neither'}"
        )
    words = spec.optional("words", None, _words)
    source = spec.field(sources[0])
    if sources[0] == "audio_base64":
        data = _base64_audio(spec.values["audio_base64"], source, limits.max_prefix_audio_bytes)
    else:
        data = fetch_audio(_string(spec.values["audio_url"], source), limits, source)
    samples, sample_rate = _decode_audio(data, source, limits.max_prefix_audio_s)
    duration_s = samples.shape[0] / sample_rate
    if words is not None:
        _check_words_fit(words, spec.field("words"), duration_s)
    return PrefixAudio(samples=samples, sample_rate=sample_rate, words=words, duration_s=duration_s)


def _words(value: object, field: str) -> tuple[tuple[str, float, float], ...]:
    """Word timings in order; whether they fit the audio is checked once its duration is known."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_WORDS:
        raise JobInputError(
            field, f"must be a list of 1 to {MAX_WORDS} [word, start_s, end_s] entries, got {_show(value)}"
        )
    words = []
    previous_start = 0.0
    for index, entry in enumerate(value):
        path = f"{field}[{index}]"
        if not isinstance(entry, list) or len(entry) != 3:
            raise JobInputError(path, f"must be [word, start_s, end_s], got {_show(entry)}")
        word = _string(entry[0], f"{path}[0]")
        if not word or any(char.isspace() for char in word):
            raise JobInputError(f"{path}[0]", f"must be one non-empty word without whitespace, got {_show(word)}")
        _refuse_control_chars(word, f"{path}[0]")
        start = _real(
            entry[1], f"{path}[1]", Range(previous_start), " (word starts must be at least 0 and never decrease)"
        )
        end = _real(entry[2], f"{path}[2]", Range(start), " (a word cannot end before it starts)")
        words.append((word, start, end))
        previous_start = start
    return tuple(words)


def _check_words_fit(words: Sequence[tuple[str, float, float]], field: str, duration_s: float) -> None:
    within = Range(0, duration_s + WORD_END_SLACK_S)
    for index, (_, _, end) in enumerate(words):
        _real(end, f"{field}[{index}][2]", within, f" (the audio lasts {duration_s:.3f} s)")


def _base64_audio(value: object, field: str, max_bytes: int) -> bytes:
    """Strict base64 (no whitespace, no data: URL), capped by length before and after decoding."""
    text = _string(value, field)
    max_chars = 4 * -(-max_bytes // 3)
    if len(text) > max_chars:
        raise JobInputError(
            field, f"must encode at most {max_bytes} bytes ({max_chars} base64 characters), got {len(text)} characters"
        )
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        raise JobInputError(field, "must be standard base64 (A-Z a-z 0-9 + / with = padding, no whitespace)") from None
    if len(data) > max_bytes:
        raise JobInputError(field, f"must encode at most {max_bytes} bytes, got {len(data)}")
    return data


def _decode_audio(data: bytes, field: str, max_duration_s: float) -> tuple[np.ndarray, int]:
    """Decode an audio file (WAV, FLAC, OGG, MP3: what libsndfile reads) to float32 [frames, channels].

    The length, rate and channels are checked from the header before the samples are read, so
    a small compressed file cannot expand into gigabytes.
    """
    import numpy as np
    import soundfile as sf

    from .audio import wav_shortfall

    try:
        with sf.SoundFile(io.BytesIO(data)) as audio:
            frames, sample_rate, channels = audio.frames, audio.samplerate, audio.channels
            if sample_rate not in _SAMPLE_RATE:
                raise JobInputError(field, f"sample rate must be {_SAMPLE_RATE.describe()} Hz, got {sample_rate}")
            if channels > MAX_PREFIX_CHANNELS:
                raise JobInputError(field, f"must have at most {MAX_PREFIX_CHANNELS} channels, got {channels}")
            if frames >= UNKNOWN_FRAMES:
                raise JobInputError(field, "does not state its length (a streamed FLAC?), which libsndfile cannot "
                                           "read reliably; re-encode it as a complete file")
            if frames > max_duration_s * sample_rate:
                raise JobInputError(
                    field, f"must be at most {max_duration_s:g} s of audio, got {frames / sample_rate:.2f} s"
                )
            samples = audio.read(dtype="float32", always_2d=True)
    except sf.SoundFileError as error:
        reason = getattr(error, "error_string", "") or "unknown format"
        raise JobInputError(field, f"is not a readable audio file (WAV, FLAC, OGG or MP3): {reason}") from None
    if samples.shape[0] == 0:
        raise JobInputError(field, "contains no audio samples")
    shortfall = wav_shortfall(data)
    if shortfall is not None:
        raise JobInputError(field, f"is a truncated WAV file: its header says {shortfall[0]:.2f} s "
                                   f"but the file holds {shortfall[1]:.2f} s")
    if not np.isfinite(samples).all():
        raise JobInputError(field, "contains samples that are NaN or infinite")
    return samples, sample_rate


def fetch_audio(url: str, limits: WorkerLimits, field: str = "audio_url") -> bytes:
    """Download prefix audio over http(s) within the worker's size and total-time caps.

    Each hop (at most MAX_REDIRECTS redirects) is resolved once, every address it resolves to
    must pass the network policy, and the connection goes to that checked address, so a DNS
    answer that changes between check and connect (rebinding) cannot reach a private host.
    DNS resolution itself is bounded by the system resolver's timeout, not by the deadline.
    """
    deadline = time.monotonic() + limits.audio_url_timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        location, body = _get(url, limits, field, deadline)
        if location is None:
            return body
        url = urllib.parse.urljoin(url, location)
    raise JobInputError(field, f"more than {MAX_REDIRECTS} redirects")


def _get(url: str, limits: WorkerLimits, field: str, deadline: float) -> tuple[str | None, bytes]:
    """One GET pinned to a checked address; returns (redirect location, b"") or (None, body)."""
    import http.client
    import ssl

    parts, port = _split_url(url, field)
    host = parts.hostname or ""
    addresses = _resolve(host, port, limits, field)
    sock = _connect(addresses, host, port, deadline, limits, field)
    connection = http.client.HTTPConnection(host, port)
    with sock, contextlib.closing(connection), _deadline_guard(sock, deadline) as expired:
        try:
            tls = ssl.create_default_context() if parts.scheme == "https" else None
            connection.sock = tls.wrap_socket(sock, server_hostname=host) if tls else sock
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            host_header = parts.netloc.rpartition("@")[2]
            connection.request("GET", target, headers={"Host": host_header, "User-Agent": "dia2-worker"})
            with connection.getresponse() as response:
                location, body = _answer(response, host, limits.max_prefix_audio_bytes, field)
        except (OSError, http.client.HTTPException) as error:
            if expired.is_set():
                raise _too_slow(limits, field) from None
            raise JobInputError(field, f"request to {host} failed: {error!r}") from None
        if expired.is_set():  # a shutdown can look like the clean end of a body without Content-Length
            raise _too_slow(limits, field)
    return location, body


def _answer(response: http.client.HTTPResponse, host: str, max_bytes: int, field: str) -> tuple[str | None, bytes]:
    """A redirect's location, or a 2xx body refused as soon as its declared or received size passes the cap."""
    if response.status in _REDIRECT_STATUSES:
        location = response.getheader("Location")
        if not location:
            raise JobInputError(field, f"{host} answered HTTP {response.status} without a Location header")
        return location, b""
    if not 200 <= response.status < 300:
        raise JobInputError(field, f"{host} answered HTTP {response.status} {response.reason} (need 2xx)")
    if response.length is not None and response.length > max_bytes:
        raise JobInputError(field, f"is {response.length} bytes (Content-Length), more than the {max_bytes} byte limit")
    body = bytearray()
    while chunk := response.read(min(1 << 16, max_bytes + 1 - len(body))):
        body += chunk
        if len(body) > max_bytes:
            raise JobInputError(field, f"is more than the {max_bytes} byte limit")
    return None, bytes(body)


def _split_url(url: str, field: str) -> tuple[urllib.parse.SplitResult, int]:
    if not _URL_CHARS.fullmatch(url):
        raise JobInputError(
            field, f"must be a URL of 1 to {MAX_URL_CHARS} printable ASCII characters (percent-encode the rest)"
        )
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise JobInputError(field, f"must be an http or https URL, got scheme {_show(parts.scheme)}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise JobInputError(field, "has an invalid port (need 1 to 65535)") from None
    if not parts.hostname:
        raise JobInputError(field, "must name a host")
    return parts, port


def _resolve(host: str, port: int, limits: WorkerLimits, field: str) -> list[tuple[Any, ...]]:
    """All addresses of `host`; every one must be allowed, so no answer order can sneak one in."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as error:
        raise JobInputError(field, f"cannot resolve host {host}: {error}") from None
    for *_, sockaddr in addresses:
        if not _address_allowed(str(sockaddr[0]), limits):
            allowed = " and ".join(["public addresses", *map(str, limits.private_audio_networks)])
            raise JobInputError(
                field,
                f"{host} resolves to {sockaddr[0]}, which is not a public unicast address; only {allowed} "
                "may be fetched (ALLOW_PRIVATE_AUDIO_URLS opens private networks)",
            )
    return addresses


def _address_allowed(address: str, limits: WorkerLimits) -> bool:
    """Public unicast, or inside a network the operator opened; IPv4 carried in IPv6 counts as IPv4."""
    import ipaddress

    ip = _unwrap_ipv4(ipaddress.ip_address(address.partition("%")[0]))
    public = ip.is_global and not ip.is_multicast
    return public or any(ip in network for network in limits.private_audio_networks)


def _unwrap_ipv4(ip: IPv4Address | IPv6Address) -> IPv4Address | IPv6Address:
    """The IPv4 address inside IPv4-mapped, 6to4 and NAT64 (64:ff9b::/96) IPv6 addresses."""
    import ipaddress

    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    embedded = ip.ipv4_mapped or ip.sixtofour
    if embedded is not None:
        return embedded
    if ip in ipaddress.ip_network("64:ff9b::/96"):
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return ip


def _connect(
    addresses: list[tuple[Any, ...]], host: str, port: int, deadline: float, limits: WorkerLimits, field: str
) -> socket.socket:
    """A TCP connection to the first checked address that answers before the deadline."""
    failure: OSError | None = None
    for family, kind, proto, _, sockaddr in addresses:
        timeout = _time_left(deadline, limits, field)
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)
            return sock
        except OSError as error:
            sock.close()
            failure = error
    raise JobInputError(field, f"cannot connect to {host} port {port}: {failure}")


@contextlib.contextmanager
def _deadline_guard(sock: socket.socket, deadline: float) -> Iterator[threading.Event]:
    """Shut the connection down at the deadline, whichever call is blocked on it then.

    Socket timeouts bound each call, not the whole download: a server trickling a byte at a
    time would never trip them. shutdown() acts on the connection rather than the descriptor,
    so a duplicate descriptor still reaches it after TLS wrapping takes `sock` over.
    """
    expired = threading.Event()
    watcher = sock.dup()

    def expire() -> None:
        expired.set()
        with contextlib.suppress(OSError):
            watcher.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(max(0.0, deadline - time.monotonic()), expire)
    timer.start()
    try:
        yield expired
    finally:
        timer.cancel()
        timer.join()
        watcher.close()


def _time_left(deadline: float, limits: WorkerLimits, field: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _too_slow(limits, field)
    return left


def _too_slow(limits: WorkerLimits, field: str) -> JobInputError:
    return JobInputError(field, f"download did not finish within the {limits.audio_url_timeout_s:g} s limit")


def _show(value: object, limit: int = 60) -> str:
    """The offending value as JSON (control characters escaped), cut short so an error stays one line."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = f"a {type(value).__name__}"
    return text if len(text) <= limit else f"{text[:limit - 3]}..."


def check_all_but_prefix(raw: object, limits: WorkerLimits) -> None:
    """Every check of `parse_job` but the prefix's, without I/O: a job that will wait its turn to download
    prefix audio learns of a cheap mistake at once."""
    if isinstance(raw, dict):
        raw = {key: value for key, value in raw.items() if key not in ("prefix", "include_prefix")}
    parse_job(raw, limits)


def needs_download(raw: object) -> bool:
    """Whether a job input asks for prefix audio by URL (its parse then waits on the network)."""
    prefix = raw.get("prefix") if isinstance(raw, dict) else None
    speakers = prefix.values() if isinstance(prefix, dict) else ()
    return any(isinstance(speaker, dict) and speaker.get("audio_url") is not None for speaker in speakers)


def error_item(message: str) -> dict[str, str]:
    """A job's final error: one line, control characters escaped, at most MAX_ERROR_CHARS."""
    text = re.sub(r"[\x00-\x1f\x7f-\x9f]", lambda m: json.dumps(m.group())[1:-1], message)
    if len(text) > MAX_ERROR_CHARS:
        text = f"{text[:MAX_ERROR_CHARS - 30]}... ({len(text)} characters)"
    return {"error": text}


# Stream items and the result, as the handler yields them (field names are the public protocol).


@dataclass(frozen=True)
class JobMetrics:
    queue_ms: float
    ttfa_ms: float | None
    """Time to first audio; None when no audio was generated."""
    generate_ms: float
    rtf: float
    """Generation time over audio duration: below 1 is faster than real time."""
    frames: int
    prefix_ms: float | None = None
    """Time to make the voice prefix ready (transcription when words were not given, Mimi encode); None
    without a prefix."""
    prefix_cached: bool | None = None
    """Every prefix speaker's words (when not given) and Mimi codes came from the cache; None without a prefix."""


def audio_item(seq: int, start_sample: int, pcm_s16le: bytes, sample_rate: int) -> dict[str, Any]:
    """A chunk of mono 16-bit little-endian PCM; start_sample places it in the whole output."""
    if len(pcm_s16le) % 2:
        raise ValueError("pcm_s16le must hold whole 16-bit samples")
    return {
        "type": "audio",
        "seq": seq,
        "start_sample": start_sample,
        "num_samples": len(pcm_s16le) // 2,
        "sample_rate": sample_rate,
        "encoding": "pcm_s16le",
        "audio_base64": base64.b64encode(pcm_s16le).decode("ascii"),
    }


def words_item(words: Sequence[tuple[str, float]]) -> dict[str, Any]:
    """Words as they are consumed, with their start in seconds of the output audio."""
    return {"type": "words", "words": [[word, seconds] for word, seconds in words]}


def progress_item(frames: int, audio_s: float) -> dict[str, Any]:
    return {"type": "progress", "frames": frames, "audio_s": audio_s}


def result_item(
    *,
    audio_url: str | None,
    bucket: str | None,
    key: str | None,
    sha256: str,
    duration_s: float,
    timestamps: Sequence[tuple[str, float]],
    seed: int,
    metrics: JobMetrics,
    audio_base64: str | None = None,
    storage_error: str | None = None,
    prefix_words: Mapping[str, Sequence[tuple[str, float, float]]] | None = None,
) -> dict[str, Any]:
    """The final item. When the upload failed, audio_url/bucket/key are None, audio_base64 holds the file
    and storage_error says why it is inline. prefix_words: the words each prefix speaker was conditioned on
    (given or transcribed), by speaker."""
    result = {
        "type": "result",
        "audio_url": audio_url,
        "bucket": bucket,
        "key": key,
        "sha256": sha256,
        "duration_s": duration_s,
        "timestamps": [[word, seconds] for word, seconds in timestamps],
        "seed": seed,
        "metrics": dataclasses.asdict(metrics),
    }
    if prefix_words is not None:
        result["prefix_words"] = {speaker: [list(word) for word in words] for speaker, words in prefix_words.items()}
    if audio_base64 is not None:
        result["audio_base64"] = audio_base64
    if storage_error is not None:
        result["storage_error"] = storage_error
    return result
