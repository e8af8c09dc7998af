"""Audio formats: the pinned libsndfile encodes and decodes each one; streamed output decodes to the whole
file's samples (bit-exact for wav and flac, the same length for mp3 and opus); a streamed WAV says
"length unknown" in the layout the RIFF specification gives."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import soundfile as sf

from dia2_worker.encoders import FILE_FORMATS, FORMATS, StreamEncoder, encode_file

RATE = 24_000
FRAME = 1920  # samples of one 80 ms frame


def decode(data: bytes) -> np.ndarray:
    """Every int16 sample of an audio file, read until the decoder has no more. A stream's headers cannot
    state its length (soundfile's `read` trusts them and seeks past the end), so this reads block by block
    with libsndfile's own read call."""
    samples = []
    with sf.SoundFile(io.BytesIO(data)) as f:
        assert f.samplerate == RATE and f.channels == 1
        while True:
            block = np.empty(4096, dtype=np.int16)
            count = sf._snd.sf_readf_short(f._file, sf._ffi.cast("short *", block.ctypes.data), len(block))
            if count <= 0:
                break
            samples.append(block[:count])
    return np.concatenate(samples) if samples else np.empty(0, dtype=np.int16)


def speech_like(seconds: float = 1.5, seed: int = 0) -> bytes:
    """Noise under a moving tone, at speech-like levels, as pcm_s16le."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    wave = 0.3 * np.sin(2 * np.pi * (180 + 60 * t) * t) + 0.05 * rng.standard_normal(t.size)
    return (np.clip(wave, -1, 1) * 32767).astype("<i2").tobytes()


def stream(fmt: str, pcm: bytes, chunk_samples: int = FRAME) -> list[bytes]:
    encoder = StreamEncoder(fmt, RATE)
    parts = [encoder.write(pcm[i: i + 2 * chunk_samples]) for i in range(0, len(pcm), 2 * chunk_samples)]
    return parts + [encoder.close()]


@pytest.mark.parametrize("fmt", FILE_FORMATS)
def test_the_pinned_libsndfile_encodes_and_decodes_each_file_format(fmt: str) -> None:
    pcm = speech_like()
    original = np.frombuffer(pcm, dtype="<i2")
    data = encode_file(fmt, pcm, RATE)
    info = sf.info(io.BytesIO(data))
    assert info.samplerate == RATE and info.channels == 1
    samples = decode(data)
    if fmt in ("wav", "flac"):
        assert np.array_equal(samples, original)
        assert np.array_equal(sf.read(io.BytesIO(data), dtype="int16")[0], original)  # a complete header
    else:  # lossy: the shape of the signal survives, plus the encoder's delay and padding at most a few frames
        assert len(original) <= len(samples) <= len(original) + 2 * FRAME
        offset = int(np.argmax(np.correlate(samples[:4000].astype(float), original[:2000].astype(float), "valid")))
        aligned = samples[offset: offset + len(original)].astype(float)
        assert np.corrcoef(aligned, original.astype(float))[0, 1] > 0.9


@pytest.mark.parametrize("fmt", ["wav", "flac", "mp3", "opus"])
def test_a_stream_decodes_like_the_whole_file(fmt: str) -> None:
    pcm = speech_like()
    streamed = b"".join(stream(fmt, pcm))
    whole = decode(encode_file(fmt, pcm, RATE))
    samples = decode(streamed)
    if fmt in ("wav", "flac"):
        assert np.array_equal(samples, np.frombuffer(pcm, dtype="<i2"))
        assert np.array_equal(samples, whole)
    else:
        assert len(samples) == len(whole)
    if fmt == "mp3":
        assert streamed == encode_file(fmt, pcm, RATE)


@pytest.mark.parametrize("fmt", ["wav", "pcm", "flac", "mp3", "opus"])
def test_bytes_leave_as_audio_arrives(fmt: str) -> None:
    parts = stream(fmt, speech_like(2.0))
    first = next(i for i, part in enumerate(parts) if part)
    assert first <= 2  # within the first three frames (FLAC's block is 4096 samples)
    if fmt == "opus":  # Ogg's header pages leave at once; the first audio page follows within frames, not a second
        assert next(i for i, part in enumerate(parts) if part and i > 0) <= 2
    assert sum(1 for part in parts[:-1] if part) >= len(parts) // 4  # and keep coming, not all at the end


def test_a_streamed_wav_says_length_unknown() -> None:
    pcm = speech_like(0.2)
    data = b"".join(stream("wav", pcm))
    riff, riff_size, wave, fmt_id, fmt_size = struct.unpack_from("<4sI4s4sI", data)
    assert (riff, wave, fmt_id, fmt_size) == (b"RIFF", b"WAVE", b"fmt ", 16)
    assert struct.unpack_from("<HHIIHH", data, 20) == (1, 1, RATE, RATE * 2, 2, 16)
    assert struct.unpack_from("<4sI", data, 36) == (b"data", 0xFFFFFFFF) and riff_size == 0xFFFFFFFF
    assert data[44:] == pcm


def test_pcm_is_the_samples_as_they_come() -> None:
    pcm = speech_like(0.3)
    assert b"".join(stream("pcm", pcm)) == pcm
    with pytest.raises(ValueError):
        encode_file("pcm", pcm, RATE)
    with pytest.raises(ValueError):
        StreamEncoder("wav", RATE).write(b"\x00")


def test_content_types_and_extensions() -> None:
    assert {name: (f.content_type, f.extension) for name, f in FORMATS.items()} == {
        "wav": ("audio/wav", ".wav"), "pcm": ("audio/pcm", ".pcm"), "flac": ("audio/flac", ".flac"),
        "mp3": ("audio/mpeg", ".mp3"), "opus": ("audio/ogg", ".opus")}
