"""Job validation: every refusal names its field and the limit it broke.

Real parts only: WAV/FLAC/OGG files made with soundfile, and for `audio_url` a real HTTP(S)
server on loopback that serves audio, errors, redirects, oversize and slow bodies.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.server
import io
import ipaddress
import json
import math
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from dia2_worker.env import WorkerConfigError
from dia2_worker.jobs import (
    MAX_ERROR_CHARS,
    JobInputError,
    JobMetrics,
    OutputSpec,
    WorkerLimits,
    audio_item,
    error_item,
    fetch_audio,
    parse_job,
    progress_item,
    result_item,
    words_item,
)

TEXT = "[S1] Hi there. [S2] Hello!"
WORDS = [["hi", 0.1, 0.4], ["there", 0.5, 0.9]]
LOOPBACK = (ipaddress.ip_network("127.0.0.1/32"),)
DEFAULTS = WorkerLimits()
ALLOW_LOOPBACK = WorkerLimits(private_audio_networks=LOOPBACK, audio_url_timeout_s=1.0)


def audio_file(seconds: float = 1.0, rate: int = 24_000, channels: int = 1, file_format: str = "WAV") -> bytes:
    t = np.arange(round(seconds * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 220 * t)
    buffer = io.BytesIO()
    sf.write(buffer, np.repeat(tone[:, None], channels, axis=1).astype(np.float32), rate, format=file_format)
    return buffer.getvalue()


WAV = audio_file()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def with_prefix(speaker_1: dict[str, Any] | None = None) -> dict[str, Any]:
    """A job whose speaker 1 prefix is `speaker_1`, by default the test WAV sent as base64."""
    speaker = {"audio_base64": b64(WAV), "words": WORDS} if speaker_1 is None else speaker_1
    return {"text": TEXT, "prefix": {"speaker_1": speaker}}


def with_field(path: str, value: object) -> dict[str, Any]:
    """A minimal job with `value` at a dotted path such as output.presign_expiry_s."""
    *parents, leaf = path.split(".")
    job: dict[str, Any] = {"text": TEXT}
    node = job
    for name in parents:
        node = node.setdefault(name, {})
    node[leaf] = value
    return job


def refused(raw: object, field: str, *fragments: str, limits: WorkerLimits = DEFAULTS) -> str:
    with pytest.raises(JobInputError) as caught:
        parse_job(raw, limits)
    message = str(caught.value)
    assert caught.value.field == field, message
    assert message.startswith(f"{field}: ")
    for fragment in fragments:
        assert fragment in message
    return message


# Valid jobs


def test_minimal_job_gets_documented_defaults() -> None:
    request = parse_job({"text": f"  {TEXT}\n"}, DEFAULTS)
    assert request.text == TEXT
    assert (request.seed, request.temperature, request.top_k) == (None, 0.8, 50)
    assert (request.text_temperature, request.text_top_k) == (0.6, 50)
    assert (request.cfg_scale, request.cfg_filter_k) == (2.0, 50)
    assert (request.max_duration_s, request.stream, request.chunk_ms) == (120.0, True, 1000)
    assert (request.prefix, request.include_prefix, request.output) == (None, False, OutputSpec())


def test_null_fields_mean_defaults() -> None:
    nulls = {key: None for key in ("seed", "temperature", "top_k", "stream", "chunk_ms", "prefix", "output")}
    assert parse_job({"text": TEXT, **nulls}, DEFAULTS) == parse_job({"text": TEXT}, DEFAULTS)


def test_default_chunk_ms_respects_a_lower_max_chunk_ms() -> None:
    assert parse_job({"text": TEXT}, WorkerLimits(max_chunk_ms=400)).chunk_ms == 400


def test_full_job_round_trip_with_base64_prefixes() -> None:
    stereo_flac = audio_file(2.0, rate=16_000, channels=2, file_format="FLAC")
    raw = {
        "text": TEXT,
        "seed": 1234,
        "temperature": 0,
        "top_k": 1,
        "text_temperature": 0.0,
        "text_top_k": 10,
        "cfg_scale": 1,
        "cfg_filter_k": 100,
        "max_duration_s": 12.5,
        "stream": False,
        "chunk_ms": 160,
        "prefix": {
            "speaker_1": {"audio_base64": b64(WAV), "words": WORDS},
            "speaker_2": {"audio_base64": b64(stereo_flac), "words": [["hello", 0.0, 2.05]]},
        },
        "include_prefix": True,
        "output": {"format": "wav", "key_prefix": "runs/2025-01/job_1.a", "presign_expiry_s": 3600},
    }
    request = parse_job(json.loads(json.dumps(raw)), DEFAULTS)
    assert request.seed == 1234 and request.temperature == 0.0 and isinstance(request.temperature, float)
    assert (request.top_k, request.text_top_k, request.cfg_filter_k) == (1, 10, 100)
    assert request.cfg_scale == 1.0 and request.max_duration_s == 12.5
    assert (request.stream, request.chunk_ms, request.include_prefix) == (False, 160, True)
    assert request.output == OutputSpec("wav", "runs/2025-01/job_1.a", 3600)
    assert request.prefix is not None and request.prefix.speaker_2 is not None
    speaker_1, speaker_2 = request.prefix.speaker_1, request.prefix.speaker_2
    assert speaker_1.samples.dtype == np.float32 and speaker_1.samples.shape == (24_000, 1)
    assert (speaker_1.sample_rate, speaker_1.duration_s) == (24_000, 1.0)
    np.testing.assert_allclose(speaker_1.samples, sf.read(io.BytesIO(WAV), dtype="float32", always_2d=True)[0])
    assert speaker_1.words == (("hi", 0.1, 0.4), ("there", 0.5, 0.9))
    assert speaker_2.samples.shape == (32_000, 2) and speaker_2.sample_rate == 16_000
    assert speaker_2.words == (("hello", 0.0, 2.05),)


def test_ogg_prefix_is_decoded() -> None:
    request = parse_job(with_prefix({"audio_base64": b64(audio_file(file_format="OGG")), "words": WORDS}), DEFAULTS)
    assert request.prefix is not None
    assert request.prefix.speaker_1.sample_rate == 24_000
    assert request.prefix.speaker_1.duration_s == pytest.approx(1.0, abs=0.01)


# Structure and unknown fields


@pytest.mark.parametrize("raw", [None, [TEXT], TEXT, 1])
def test_input_must_be_an_object(raw: object) -> None:
    refused(raw, "input", "must be a JSON object")


@pytest.mark.parametrize(
    ("raw", "field", "names"),
    [
        ({"text": TEXT, "voice": "x"}, "voice", "unknown field voice (allowed here: cfg_filter_k, cfg_scale,"),
        ({"text": TEXT, "zeta": 1, "alpha": 2}, "alpha", "unknown fields alpha, zeta"),
        (with_field("output.bitrate", 1), "output.bitrate", "(allowed here: format, key_prefix, presign_expiry_s)"),
        ({"text": TEXT, "prefix": {"speaker_1": {}, "speaker_3": {}}}, "prefix.speaker_3", "speaker_1, speaker_2)"),
        (
            with_prefix({"audio_base64": b64(WAV), "words": WORDS, "volume": 2}),
            "prefix.speaker_1.volume",
            "(allowed here: audio_base64, audio_url, words)",
        ),
    ],
)
def test_unknown_fields_are_named(raw: dict[str, Any], field: str, names: str) -> None:
    refused(raw, field, names)


@pytest.mark.parametrize("name", ["x\nERROR | job-999 | forged line", "\x1b[31mred\x1b[0m", "tab\there\r"])
def test_unknown_field_names_are_escaped(name: str) -> None:
    with pytest.raises(JobInputError) as caught:
        parse_job({"text": TEXT, name: 1}, DEFAULTS)
    message = error_item(str(caught.value))["error"]
    assert json.dumps(name)[1:8] in message  # shown as a JSON string, escapes and all
    assert not any(ord(char) < 32 or 127 <= ord(char) < 160 for char in message)


def test_errors_stay_small_whatever_was_sent() -> None:
    junk = {f"{n:07d}" + "k" * 100: 1 for n in range(100_000)}  # about 11 MB of unknown names
    with pytest.raises(JobInputError) as caught:
        parse_job({"text": TEXT, **junk}, DEFAULTS)
    assert "and 99995 more" in str(caught.value) and len(str(caught.value)) < 1000
    long_name = error_item(str(JobInputError("x" * 10_000_000, "unknown field")))["error"]
    assert len(long_name) <= MAX_ERROR_CHARS and long_name.endswith("(10000015 characters)")


def test_error_item_escapes_every_control_character() -> None:
    assert error_item("a\nb\x1b[0m\r\x85") == {"error": "a\\nb\\u001b[0m\\r\\u0085"}


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (with_field("output", "wav"), "output"),
        ({"text": TEXT, "prefix": "voice.wav"}, "prefix"),
        ({"text": TEXT, "prefix": {"speaker_1": [WAV.hex()]}}, "prefix.speaker_1"),
    ],
)
def test_nested_values_must_be_objects(raw: dict[str, Any], field: str) -> None:
    refused(raw, field, "must be a JSON object")


# Numbers: bounds and types

BOUNDS: list[tuple[str, list[float], list[float], str]] = [
    # path, accepted, refused, the limit as the message states it
    ("temperature", [0, 5, 0.7], [-0.001, 5.001], "a number between 0 and 5"),
    ("text_temperature", [0, 5], [-0.001, 5.001], "a number between 0 and 5"),
    ("top_k", [1, 10_000], [0, 10_001], "an integer between 1 and 10000"),
    ("text_top_k", [1, 10_000], [0, 10_001], "an integer between 1 and 10000"),
    ("cfg_filter_k", [1, 10_000], [0, 10_001], "an integer between 1 and 10000"),
    ("cfg_scale", [1e-6, 20], [0, 20.001], "a number greater than 0 and at most 20"),
    ("seed", [0, 2**63 - 1], [-1, 2**63], "an integer between 0 and 9223372036854775807"),
    ("max_duration_s", [0.08, 120], [0, 120.001], "a number greater than 0 and at most 120"),
    ("chunk_ms", [80, 10_000], [79, 10_001], "an integer between 80 and 10000"),
    ("output.presign_expiry_s", [60, 604_800], [59, 604_801], "an integer between 60 and 604800"),
]


def read_path(request: object, path: str) -> object:
    for name in path.split("."):
        request = getattr(request, name)
    return request


@pytest.mark.parametrize(("path", "value"), [(path, v) for path, ok, _, _ in BOUNDS for v in ok])
def test_bounds_accept_values_just_inside(path: str, value: float) -> None:
    assert read_path(parse_job(with_field(path, value), DEFAULTS), path) == value


@pytest.mark.parametrize(("path", "value", "limit"), [(p, v, limit) for p, _, bad, limit in BOUNDS for v in bad])
def test_bounds_refuse_values_just_outside(path: str, value: float, limit: str) -> None:
    refused(with_field(path, value), path, f"must be {limit}, got {json.dumps(value)}")


WRONG_NUMBERS = [True, False, "1", [1], {"value": 1}, math.nan, math.inf, -math.inf]


@pytest.mark.parametrize(
    ("path", "value", "limit"), [(p, v, limit) for p, _, _, limit in BOUNDS for v in WRONG_NUMBERS]
)
def test_numbers_refuse_other_types(path: str, value: object, limit: str) -> None:
    refused(with_field(path, value), path, f"must be {limit}, got ")


@pytest.mark.parametrize("path", [p for p, _, _, limit in BOUNDS if limit.startswith("an integer")])
def test_integer_fields_refuse_integral_floats(path: str) -> None:
    refused(with_field(path, 100.0), path, "must be an integer", "got 100.0")


def test_number_too_large_for_a_float_is_refused() -> None:
    refused(with_field("temperature", 10**400), "temperature", "a number between 0 and 5")


def test_max_duration_follows_the_worker_limit() -> None:
    limits = WorkerLimits(max_duration_s=30)
    assert parse_job(with_field("max_duration_s", 30), limits).max_duration_s == 30
    refused(with_field("max_duration_s", 30.5), "max_duration_s", "at most 30, got 30.5", limits=limits)


def test_chunk_ms_follows_the_worker_limit() -> None:
    refused(with_field("chunk_ms", 2000), "chunk_ms", "between 80 and 1000", limits=WorkerLimits(max_chunk_ms=1000))


@pytest.mark.parametrize("path", ["stream", "include_prefix"])
@pytest.mark.parametrize("value", [1, 0, "true", "false", [True]])
def test_flags_must_be_booleans(path: str, value: object) -> None:
    refused({**with_prefix(), path: value}, path, "must be true or false")


def test_include_prefix_needs_a_prefix() -> None:
    assert parse_job({"text": TEXT, "include_prefix": False}, DEFAULTS).include_prefix is False
    refused({"text": TEXT, "include_prefix": True}, "include_prefix", "only be true when a prefix is given")


# Text


@pytest.mark.parametrize("value", ["", "   ", "\n\t \r\n"])
def test_text_must_not_be_empty(value: str) -> None:
    refused({"text": value}, "text", "must not be empty", "at most 4000 characters")


@pytest.mark.parametrize("raw", [{}, {"text": None}, {"seed": 1}])
def test_text_is_required(raw: dict[str, Any]) -> None:
    refused(raw, "text", "required", "at most 4000 characters")


@pytest.mark.parametrize("value", [5, ["[S1] hi"], {"S1": "hi"}, True])
def test_text_must_be_a_string(value: object) -> None:
    refused({"text": value}, "text", "must be a string")


def test_text_length_is_capped_after_stripping() -> None:
    limits = WorkerLimits(max_text_chars=10)
    assert parse_job({"text": "  [S1] hey!  "}, limits).text == "[S1] hey!"
    assert parse_job({"text": "[S1] hey!!"}, limits).text == "[S1] hey!!"
    refused({"text": "[S1] hey!!!"}, "text", "at most 10 characters, got 11", limits=limits)


@pytest.mark.parametrize("char", ["\x00", "\x07", "\x1b", "\x7f", "\x85", "\ud800"])
def test_text_refuses_control_characters(char: str) -> None:
    refused({"text": f"[S1] hi{char} there"}, "text", f"U+{ord(char):04X} at index 7", "only newline and tab")


@pytest.mark.parametrize("text", ['[S1] <break time="1s"/>', '<break time="0.5s"/> [S2] <break time="2s"/>',
                                  "[S1] \u200b\u200d\u2060", "\ufeff\u200e [S2] \u00ad"])
def test_text_must_hold_words_to_speak(text: str) -> None:
    refused({"text": text}, "text", "must contain words to speak")


@pytest.mark.parametrize("char", ["\u202e", "\u202a", "\u2066", "\u2069"])
def test_text_refuses_bidi_overrides(char: str) -> None:
    refused({"text": f"[S1] hi{char} there"}, "text", f"bidirectional", f"U+{ord(char):04X} at index 7")


def test_text_keeps_words_beside_tags_and_invisible_characters() -> None:
    text = '[S1] <break time="1s"/> caf\u00e9\u200b [S2] \u4f60\u597d'
    assert parse_job({"text": text}, DEFAULTS).text == text


def test_text_keeps_newlines_and_tabs() -> None:
    text = "[S1] Hi there.\r\n[S2]\tHello!"
    assert parse_job({"text": text}, DEFAULTS).text == text


# Output


@pytest.mark.parametrize("value", ["runs", "a/b/c-d_e.f", "x" * 200, "prefix/"])
def test_key_prefix_accepts_safe_keys(value: str) -> None:
    assert parse_job(with_field("output.key_prefix", value), DEFAULTS).output.key_prefix == value


@pytest.mark.parametrize("value", ["", "/abs", "a/../b", "..", "a b", "é", "a\\b", "x" * 201, "a?b", "a//b",
                                   "./x", "a/.", "a/./b"])
def test_key_prefix_refuses_unsafe_keys(value: str) -> None:
    refused(with_field("output.key_prefix", value), "output.key_prefix", "1 to 200 characters", '".." path segments')


@pytest.mark.parametrize("value", ["runs", "a/b/c-d_e.f", "prefix/", "x.y/z"])
def test_accepted_key_prefixes_make_valid_object_keys(value: str) -> None:
    from dia2_worker.storage import LocalStorage, StorageSettings

    storage = LocalStorage(StorageSettings())
    assert storage.key_for("job-1", parse_job(with_field("output.key_prefix", value), DEFAULTS).output.key_prefix)


def test_output_formats() -> None:
    for name in ("wav", "flac", "mp3", "opus"):
        assert parse_job(with_field("output.format", name), DEFAULTS).output.format == name
    refused(with_field("output.format", "pcm"), "output.format", "must be one of wav, flac, mp3, opus", '"pcm"')
    refused(with_field("output.format", 3), "output.format", "must be a string")


# Prefix structure and audio


def test_speaker_2_requires_speaker_1() -> None:
    speaker = {"audio_base64": b64(WAV), "words": WORDS}
    refused({"text": TEXT, "prefix": {"speaker_2": speaker}}, "prefix.speaker_1", "required")
    refused({"text": TEXT, "prefix": {}}, "prefix.speaker_1", "required")


@pytest.mark.parametrize(
    ("speaker", "got"),
    [
        ({"audio_base64": b64(WAV), "audio_url": "https://example.com/a.wav", "words": WORDS}, "got audio_base64 and"),
        ({"words": WORDS}, "got neither"),
        ({"audio_base64": None, "audio_url": None, "words": WORDS}, "got neither"),
    ],
)
def test_prefix_needs_exactly_one_audio_source(speaker: dict[str, Any], got: str) -> None:
    refused(with_prefix(speaker), "prefix.speaker_1", "exactly one of audio_base64 or audio_url", got)


@pytest.mark.parametrize(
    "value", ["not base64!", b64(WAV)[:100] + "\n" + b64(WAV)[100:], "UklGR", "é" * 8, "data:audio/wav;base64,UklG"]
)
def test_audio_base64_must_be_strict_base64(value: str) -> None:
    refused(with_prefix({"audio_base64": value, "words": WORDS}), "prefix.speaker_1.audio_base64", "standard base64")


@pytest.mark.parametrize("value", [b"", b"this is not audio at all", WAV[:30], b"RIFF\0\0\0\0WAVEfmt "])
def test_undecodable_audio_is_refused(value: bytes) -> None:
    refused(
        with_prefix({"audio_base64": b64(value), "words": WORDS}),
        "prefix.speaker_1.audio_base64",
        "not a readable audio file (WAV, FLAC, OGG or MP3)",
    )


def test_audio_base64_must_be_a_string() -> None:
    refused(with_prefix({"audio_base64": 12, "words": WORDS}), "prefix.speaker_1.audio_base64", "must be a string")


@pytest.mark.parametrize(
    ("max_bytes", "limit_text"), [(2000, "(2668 base64 characters), got 4000"), (2999, "got 3000")]
)
def test_audio_size_is_capped_before_and_after_decoding(max_bytes: int, limit_text: str) -> None:
    speaker = {"audio_base64": b64(bytes(3000)), "words": WORDS}
    refused(
        with_prefix(speaker),
        "prefix.speaker_1.audio_base64",
        f"at most {max_bytes} bytes",
        limit_text,
        limits=WorkerLimits(max_prefix_audio_bytes=max_bytes),
    )


def test_audio_duration_is_capped() -> None:
    limits = WorkerLimits(max_prefix_audio_s=1.0)
    assert parse_job(with_prefix(), limits).prefix is not None
    speaker = {"audio_base64": b64(audio_file(1.01)), "words": WORDS}
    refused(with_prefix(speaker), "prefix.speaker_1.audio_base64", "at most 1 s of audio, got 1.01 s", limits=limits)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (audio_file(0.0), "contains no audio samples"),
        (audio_file(channels=3), "at most 2 channels, got 3"),
        (audio_file(rate=4000), "sample rate must be between 8000 and 192000 Hz, got 4000"),
    ],
)
def test_unusable_audio_is_refused(data: bytes, fragment: str) -> None:
    refused(with_prefix({"audio_base64": b64(data), "words": WORDS}), "prefix.speaker_1.audio_base64", fragment)


def float_wav(samples: list[float]) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.array(samples * 2400, dtype=np.float32), 24_000, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def flac_without_length(seconds: float) -> bytes:
    """A FLAC whose STREAMINFO says "total samples unknown" (0), as streaming encoders write it."""
    data = bytearray(audio_file(seconds, file_format="FLAC"))
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO first
    data[21] &= 0xF0  # the 36-bit total starts in the low nibble of byte 8 + 13
    data[22:26] = bytes(4)
    return bytes(data)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_samples_that_are_not_finite_are_refused(value: float) -> None:
    speaker = {"audio_base64": b64(float_wav([0.1, value, 0.2])), "words": WORDS}
    refused(with_prefix(speaker), "prefix.speaker_1.audio_base64", "contains samples that are NaN or infinite")


def test_a_flac_without_a_stated_length_is_refused() -> None:
    message = refused(with_prefix({"audio_base64": b64(flac_without_length(1.0)), "words": WORDS}),
                      "prefix.speaker_1.audio_base64", "does not state its length")
    assert "1152921504606847" not in message


def test_a_truncated_wav_is_refused() -> None:
    wav = audio_file(3.12)
    cut = wav[: len(wav) - round((3.12 - 0.21) * 24_000) * 2]  # 16-bit mono: 2 bytes a frame
    refused(with_prefix({"audio_base64": b64(cut), "words": [["hi", 0.0, 0.1]]}), "prefix.speaker_1.audio_base64",
            "is a truncated WAV file: its header says 3.12 s but the file holds 0.21 s")


def test_undecodable_audio_errors_show_no_worker_internals() -> None:
    message = refused(with_prefix({"audio_base64": b64(b"this is not audio at all"), "words": WORDS}),
                      "prefix.speaker_1.audio_base64", "Format not recognised")
    assert "0x" not in message and "BytesIO" not in message


# Words


def test_words_may_be_left_to_speech_recognition() -> None:
    for speaker in ({"audio_base64": b64(WAV)}, {"audio_base64": b64(WAV), "words": None}):
        assert parse_job(with_prefix(speaker), DEFAULTS).prefix.speaker_1.words is None


@pytest.mark.parametrize(
    ("words", "field", "fragment"),
    [
        ("hi 0 1", "words", "list of 1 to 1000 [word, start_s, end_s] entries"),
        ([], "words", "list of 1 to 1000"),
        ([["a", 0.0, 0.1]] * 1001, "words", "list of 1 to 1000"),
        (["hi"], "words[0]", "must be [word, start_s, end_s]"),
        ([["hi", 0.1]], "words[0]", "must be [word, start_s, end_s]"),
        ([["hi", 0.1, 0.2, 0.3]], "words[0]", "must be [word, start_s, end_s]"),
        ([[5, 0.1, 0.2]], "words[0][0]", "must be a string"),
        ([["", 0.1, 0.2]], "words[0][0]", "one non-empty word without whitespace"),
        ([["hi there", 0.1, 0.2]], "words[0][0]", "one non-empty word without whitespace"),
        ([["hi\u00a0there", 0.1, 0.2]], "words[0][0]", "one non-empty word without whitespace"),
        ([["hi\x00", 0.1, 0.2]], "words[0][0]", "control characters"),
        ([["hi", -0.1, 0.2]], "words[0][1]", "a number at least 0, got -0.1"),
        ([["hi", "0.1", 0.2]], "words[0][1]", "a number at least 0"),
        ([["hi", math.nan, 0.2]], "words[0][1]", "got NaN"),
        ([["hi", True, 0.2]], "words[0][1]", "got true"),
        ([["hi", 0.5, 0.4]], "words[0][2]", "a number at least 0.5, got 0.4"),
        ([["hi", 0.5, math.inf]], "words[0][2]", "got Infinity"),
        (
            [["hi", 0.5, 0.6], ["there", 0.4, 0.7]],
            "words[1][1]",
            "at least 0.5, got 0.4 (word starts must be at least 0 and never decrease)",
        ),
        (
            [["hi", 0.1, 0.2], ["there", 0.3, 1.051]],
            "words[1][2]",
            "between 0 and 1.05, got 1.051 (the audio lasts 1.000 s)",
        ),
        ([["hi", 1.2, 1.3]], "words[0][2]", "between 0 and 1.05, got 1.3 (the audio lasts 1.000 s)"),
    ],
)
def test_words_are_checked(words: object, field: str, fragment: str) -> None:
    refused(with_prefix({"audio_base64": b64(WAV), "words": words}), f"prefix.speaker_1.{field}", fragment)


def test_words_may_touch_each_other_and_end_just_past_the_audio() -> None:
    words = [["a", 0.0, 0.0], ["b", 0.0, 0.5], ["c", 0.5, 1.05]]
    request = parse_job(with_prefix({"audio_base64": b64(WAV), "words": words}), DEFAULTS)
    assert request.prefix is not None and len(request.prefix.speaker_1.words) == 3


def test_speaker_2_errors_name_speaker_2() -> None:
    raw = with_prefix()
    raw["prefix"]["speaker_2"] = {"audio_base64": b64(WAV), "words": [["yo", 0.2, 2.0]]}
    refused(raw, "prefix.speaker_2.words[0][2]", "the audio lasts 1.000 s")


# audio_url against a real server on loopback


class AudioServer(http.server.ThreadingHTTPServer):
    """Serves AudioHandler's routes and records each request as (path, Host header)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), AudioHandler)
        self.requests: list[tuple[str, str]] = []


class AudioHandler(http.server.BaseHTTPRequestHandler):
    """One route per download case, chosen by the request path."""

    server: AudioServer

    def do_GET(self) -> None:
        self.server.requests.append((self.path, self.headers["Host"]))
        route = getattr(self, "route_" + self.path.strip("/").replace("-", "_").replace(".", "_"), None)
        with contextlib.suppress(OSError):  # the client gave up first, as the slow cases intend
            route() if route else self.send_error(404)

    def route_voice_wav(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(WAV)))
        self.end_headers()
        self.wfile.write(WAV)

    def route_declares_huge(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(10**10))
        self.end_headers()
        self.wfile.write(WAV)

    def route_undeclared_big(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(WAV)  # HTTP/1.0: the body ends when the connection closes

    def route_slow_body(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(WAV)))
        self.end_headers()
        for start in range(0, len(WAV), 100):
            self.wfile.write(WAV[start : start + 100])
            time.sleep(0.05)

    def route_slow_headers(self) -> None:
        self.wfile.write(b"HTTP/1.0 200 OK\r\n")
        for _ in range(90):  # each header comes well within any per-read timeout
            self.wfile.write(b"X-Pad: 1\r\n")
            time.sleep(0.05)

    def route_redirect_ok(self) -> None:
        self.redirect("/voice.wav")

    def route_redirect_loopback(self) -> None:
        self.redirect(f"http://127.0.0.2:{self.server.socket.getsockname()[1]}/voice.wav")

    def route_redirect_ftp(self) -> None:
        self.redirect("ftp://example.com/voice.wav")

    def route_redirect_forever(self) -> None:
        self.redirect("/redirect-forever")

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def start_server(tls: ssl.SSLContext | None = None) -> AudioServer:
    server = AudioServer()
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def server() -> Iterator[AudioServer]:
    server = start_server()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def url(server: AudioServer) -> Callable[[str], str]:
    """URLs on the loopback server, whose request log starts empty for each test."""
    server.requests.clear()
    return lambda path: f"http://127.0.0.1:{server.server_port}{path}"


def url_job(address: str) -> dict[str, Any]:
    return with_prefix({"audio_url": address, "words": WORDS})


URL_FIELD = "prefix.speaker_1.audio_url"


def test_audio_url_is_fetched_from_loopback_when_allowed(server: AudioServer, url: Callable[[str], str]) -> None:
    request = parse_job(url_job(url("/voice.wav")), ALLOW_LOOPBACK)
    from_base64 = parse_job(with_prefix(), DEFAULTS)
    assert request.prefix is not None and from_base64.prefix is not None
    np.testing.assert_array_equal(request.prefix.speaker_1.samples, from_base64.prefix.speaker_1.samples)
    assert request.prefix.speaker_1.words == from_base64.prefix.speaker_1.words
    assert server.requests == [("/voice.wav", f"127.0.0.1:{server.server_port}")]


def test_fetch_audio_returns_the_body(url: Callable[[str], str]) -> None:
    assert fetch_audio(url("/voice.wav"), ALLOW_LOOPBACK) == WAV


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_loopback_is_refused_by_default(server: AudioServer, url: Callable[[str], str], host: str) -> None:
    address = url("/voice.wav").replace("127.0.0.1", host)
    refused(url_job(address), URL_FIELD, "not a public unicast address", "only public addresses may be fetched")
    assert server.requests == []


def test_allowing_one_network_keeps_others_closed() -> None:
    limits = WorkerLimits(private_audio_networks=(ipaddress.ip_network("10.0.0.0/8"),))
    refused(url_job("http://192.168.1.10/a.wav"), URL_FIELD, "only public addresses and 10.0.0.0/8", limits=limits)


@pytest.mark.parametrize(
    "host",
    [
        "10.1.2.3", "172.16.0.1", "192.168.1.1", "100.64.0.1", "169.254.169.254", "0.0.0.0", "224.0.0.1",
        "240.0.0.1", "255.255.255.255", "[::1]", "[::]", "[fe80::1]", "[fc00::1]", "[ff02::1]",
        "[::ffff:127.0.0.1]", "[::ffff:10.0.0.1]", "[64:ff9b::a00:1]", "[2002:c0a8:101::1]",
    ],
)  # fmt: skip
def test_private_and_special_addresses_are_refused(host: str) -> None:
    refused(url_job(f"http://{host}/voice.wav"), URL_FIELD, "is not a public unicast address")


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("ftp://example.com/voice.wav", 'http or https URL, got scheme "ftp"'),
        ("file:///etc/passwd", 'got scheme "file"'),
        ("//example.com/voice.wav", 'got scheme ""'),
        ("http:///voice.wav", "must name a host"),
        ("http://example.com:99999/voice.wav", "invalid port"),
        ("http://example.com/my voice.wav", "printable ASCII"),
        ("http://example.com/é.wav", "printable ASCII"),
        ("http://example.com/" + "a" * 2048, "1 to 2048 printable ASCII characters"),
    ],
)
def test_audio_url_must_be_a_plain_http_url(address: str, fragment: str) -> None:
    refused(url_job(address), URL_FIELD, fragment)


def test_audio_url_must_be_a_string() -> None:
    refused(url_job(["http://example.com/a.wav"]), URL_FIELD, "must be a string")  # type: ignore[arg-type]


def test_http_errors_name_the_status(url: Callable[[str], str]) -> None:
    refused(url_job(url("/missing.wav")), URL_FIELD, "127.0.0.1 answered HTTP 404", "(need 2xx)", limits=ALLOW_LOOPBACK)


def test_unreachable_host_is_reported(url: Callable[[str], str]) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago has no listener
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    refused(
        url_job(f"http://127.0.0.1:{port}/a.wav"),
        URL_FIELD,
        f"cannot connect to 127.0.0.1 port {port}",
        limits=ALLOW_LOOPBACK,
    )


SMALL = WorkerLimits(private_audio_networks=LOOPBACK, audio_url_timeout_s=1.0, max_prefix_audio_bytes=10_000)


def test_declared_oversize_body_is_refused_before_reading(url: Callable[[str], str]) -> None:
    refused(  # on the declared size alone: the body is never read
        url_job(url("/declares-huge")),
        URL_FIELD,
        "10000000000 bytes (Content-Length)",
        "10000 byte limit",
        limits=SMALL,
    )


def test_undeclared_oversize_body_is_cut_off(url: Callable[[str], str]) -> None:
    message = refused(url_job(url("/undeclared-big")), URL_FIELD, "more than the 10000 byte limit", limits=SMALL)
    assert "Content-Length" not in message


@pytest.mark.parametrize("path", ["/slow-body", "/slow-headers"])
def test_slow_download_hits_the_total_time_cap(url: Callable[[str], str], path: str) -> None:
    # Each read arrives well within any per-read timeout: only the total cap can end it (the routes take 4.5 s
    # or more).
    refused(url_job(url(path)), URL_FIELD, "did not finish within the 1 s limit", limits=ALLOW_LOOPBACK)


def test_worker_recovers_after_a_slow_download(url: Callable[[str], str]) -> None:
    with pytest.raises(JobInputError):
        fetch_audio(url("/slow-body"), ALLOW_LOOPBACK)
    assert fetch_audio(url("/voice.wav"), ALLOW_LOOPBACK) == WAV
    assert not [thread for thread in threading.enumerate() if isinstance(thread, threading.Timer)]


def test_redirects_are_followed(server: AudioServer, url: Callable[[str], str]) -> None:
    assert fetch_audio(url("/redirect-ok"), ALLOW_LOOPBACK) == WAV
    assert [path for path, _ in server.requests] == ["/redirect-ok", "/voice.wav"]


def test_redirect_to_loopback_is_refused(server: AudioServer, url: Callable[[str], str]) -> None:
    refused(
        url_job(url("/redirect-loopback")),
        URL_FIELD,
        "127.0.0.2 resolves to 127.0.0.2",
        "127.0.0.1/32",
        limits=ALLOW_LOOPBACK,
    )
    assert [path for path, _ in server.requests] == ["/redirect-loopback"]


def test_redirect_to_another_scheme_is_refused(url: Callable[[str], str]) -> None:
    refused(url_job(url("/redirect-ftp")), URL_FIELD, 'got scheme "ftp"', limits=ALLOW_LOOPBACK)


def test_redirects_are_capped(server: AudioServer, url: Callable[[str], str]) -> None:
    refused(url_job(url("/redirect-forever")), URL_FIELD, "more than 3 redirects", limits=ALLOW_LOOPBACK)
    assert len(server.requests) == 4


# HTTPS: the certificate is verified against the URL's host while the socket goes to the checked IP


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AudioServer, Path]]:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "dia2-worker test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
    server = start_server(context)
    yield server, folder / "cert.pem"
    server.shutdown()
    server.server_close()


def test_https_fetch_verifies_the_certificate(
    tls_server: tuple[AudioServer, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, cert = tls_server
    address = f"https://127.0.0.1:{server.server_port}/voice.wav"
    refused(url_job(address), URL_FIELD, "CERTIFICATE_VERIFY_FAILED", limits=ALLOW_LOOPBACK)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust the test certificate, and only it
    assert fetch_audio(address, ALLOW_LOOPBACK) == WAV


# WorkerLimits.from_env


def test_from_env_defaults_and_blank_values() -> None:
    assert WorkerLimits.from_env({}) == WorkerLimits()
    assert WorkerLimits.from_env({"MAX_TEXT_CHARS": "", "ALLOW_PRIVATE_AUDIO_URLS": " "}) == WorkerLimits()
    defaults = WorkerLimits()
    assert (defaults.max_text_chars, defaults.max_duration_s, defaults.max_prefix_audio_s) == (4000, 120.0, 30.0)
    assert (defaults.max_prefix_audio_bytes, defaults.audio_url_timeout_s) == (16 * 1024 * 1024, 10.0)
    assert (defaults.private_audio_networks, defaults.max_chunk_ms) == ((), 10_000)


def test_from_env_reads_every_variable() -> None:
    env = {
        "MAX_TEXT_CHARS": "500",
        "MAX_DURATION_S": "60.5",
        "MAX_PREFIX_AUDIO_S": "10",
        "MAX_PREFIX_AUDIO_BYTES": "1048576",
        "AUDIO_URL_TIMEOUT_S": " 2.5 ",
        "ALLOW_PRIVATE_AUDIO_URLS": "10.0.0.0/8, 127.0.0.1",
        "MAX_CHUNK_MS": "2000",
        "UNRELATED": "ignored",
    }
    assert WorkerLimits.from_env(env) == WorkerLimits(
        max_text_chars=500,
        max_duration_s=60.5,
        max_prefix_audio_s=10.0,
        max_prefix_audio_bytes=1_048_576,
        audio_url_timeout_s=2.5,
        private_audio_networks=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32")),
        max_chunk_ms=2000,
    )


@pytest.mark.parametrize(("value", "count"), [("true", 2), ("YES", 2), ("1", 2), ("false", 0), ("off", 0)])
def test_allow_private_audio_urls_as_a_flag(value: str, count: int) -> None:
    assert len(WorkerLimits.from_env({"ALLOW_PRIVATE_AUDIO_URLS": value}).private_audio_networks) == count


def test_allow_all_private_addresses_opens_loopback(url: Callable[[str], str]) -> None:
    limits = WorkerLimits.from_env({"ALLOW_PRIVATE_AUDIO_URLS": "true"})
    assert fetch_audio(url("/voice.wav"), limits) == WAV


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("MAX_TEXT_CHARS", "lots", "must be an integer at least 1, got 'lots'"),
        ("MAX_TEXT_CHARS", "0", "at least 1, got '0'"),
        ("MAX_TEXT_CHARS", "4000.5", "must be an integer"),
        ("MAX_DURATION_S", "0", "must be a number greater than 0, got '0'"),
        ("MAX_DURATION_S", "nan", "got 'nan'"),
        ("MAX_PREFIX_AUDIO_S", "-1", "greater than 0"),
        ("MAX_PREFIX_AUDIO_BYTES", "16MiB", "must be an integer at least 1"),
        ("AUDIO_URL_TIMEOUT_S", "inf", "got 'inf'"),
        ("MAX_CHUNK_MS", "79", "must be an integer at least 80, got '79'"),
        ("ALLOW_PRIVATE_AUDIO_URLS", "maybe", "true, false or comma-separated networks"),
        ("ALLOW_PRIVATE_AUDIO_URLS", "10.0.0.0/8,intranet", "got '10.0.0.0/8,intranet'"),
    ],
)
def test_from_env_names_the_bad_variable(name: str, value: str, fragment: str) -> None:
    with pytest.raises(WorkerConfigError) as caught:
        WorkerLimits.from_env({name: value})
    assert str(caught.value).startswith(f"{name}: ")
    assert fragment in str(caught.value)


# Stream items and the result


def test_audio_item_carries_pcm_as_base64() -> None:
    pcm = np.array([0, 1, -1, 32767], dtype="<i2").tobytes()
    item = audio_item(seq=3, start_sample=48_000, pcm_s16le=pcm, sample_rate=24_000)
    assert item == {
        "type": "audio",
        "seq": 3,
        "start_sample": 48_000,
        "num_samples": 4,
        "sample_rate": 24_000,
        "encoding": "pcm_s16le",
        "audio_base64": base64.b64encode(pcm).decode(),
    }
    with pytest.raises(ValueError, match="whole 16-bit samples"):
        audio_item(0, 0, b"\x00\x01\x02", 24_000)


def test_words_and_progress_items() -> None:
    assert words_item([("hi", 0.0), ("there", 0.4)]) == {"type": "words", "words": [["hi", 0.0], ["there", 0.4]]}
    assert progress_item(frames=25, audio_s=2.0) == {"type": "progress", "frames": 25, "audio_s": 2.0}


def test_result_item_with_storage_and_inline_fallback() -> None:
    metrics = JobMetrics(queue_ms=5.0, ttfa_ms=180.0, generate_ms=900.0, rtf=0.45, frames=25)
    fields: dict[str, Any] = dict(sha256="ab" * 32, duration_s=2.0, timestamps=[("hi", 0.0)], seed=7, metrics=metrics)
    stored = result_item(audio_url="https://s3/x.wav", bucket="b", key="runs/x.wav", **fields)
    assert stored == {
        "type": "result",
        "audio_url": "https://s3/x.wav",
        "bucket": "b",
        "key": "runs/x.wav",
        "sha256": "ab" * 32,
        "duration_s": 2.0,
        "timestamps": [["hi", 0.0]],
        "seed": 7,
        "metrics": {"queue_ms": 5.0, "ttfa_ms": 180.0, "generate_ms": 900.0, "rtf": 0.45, "frames": 25,
                    "prefix_ms": None, "prefix_cached": None},
    }
    voiced = result_item(audio_url=None, bucket=None, key=None, prefix_words={"speaker_1": (("hi", 0.1, 0.4),)},
                         **fields)
    assert voiced["prefix_words"] == {"speaker_1": [["hi", 0.1, 0.4]]}
    inline = result_item(audio_url=None, bucket=None, key=None, audio_base64="UklGRg==", **fields)
    assert inline["audio_base64"] == "UklGRg==" and inline["audio_url"] is None
    json.dumps(inline)
