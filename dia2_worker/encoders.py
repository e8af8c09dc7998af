"""Audio file formats, whole (stored by queue jobs) and incremental (streamed over HTTP as audio is generated).

Input is always mono pcm_s16le at the model's rate. wav and pcm are written here; flac, mp3 and opus (in Ogg)
go through libsndfile (the pinned soundfile wheel bundles it with FLAC, LAME, mpg123, Opus and Ogg), which
writes each block of output as soon as its encoder produces it. A stream cannot go back, so what libsndfile
rewrites on close (FLAC's STREAMINFO totals) is left as written at the start: "length unknown", as in any
streamed FLAC. Ogg Opus pages are cut every 80 ms instead of every second. MP3 uses constant bitrate and no LAME tag in both modes, so a stored file is byte for byte
what a stream sends, and decoders, which cannot size a tagless VBR stream, read all of it.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass


@dataclass(frozen=True)
class AudioFormat:
    name: str
    content_type: str
    extension: str
    soundfile: tuple[str, str] | None = None
    """libsndfile (format, subtype) of a file; pcm has none. A stream of wav or pcm is written here."""


FORMATS: dict[str, AudioFormat] = {f.name: f for f in (
    AudioFormat("wav", "audio/wav", ".wav", ("WAV", "PCM_16")),
    AudioFormat("pcm", "audio/pcm", ".pcm"),
    AudioFormat("flac", "audio/flac", ".flac", ("FLAC", "PCM_16")),
    AudioFormat("mp3", "audio/mpeg", ".mp3", ("MP3", "MPEG_LAYER_III")),
    AudioFormat("opus", "audio/ogg", ".opus", ("OGG", "OPUS")),
)}
FILE_FORMATS = ("wav", "flac", "mp3", "opus")
"""What a queue job can store (raw pcm has no header to say its rate)."""

STREAMED_WAV_SIZE = 0xFFFFFFFF
"""RIFF and data sizes of a streamed WAV: the largest value, which readers take as "to the end of the stream"."""


def wav_stream_header(sample_rate: int) -> bytes:
    """A 16-bit mono PCM WAV header whose sizes say "length unknown"."""
    fmt = struct.pack("<HHIIHH", 1, 1, sample_rate, sample_rate * 2, 2, 16)
    return (b"RIFF" + struct.pack("<I", STREAMED_WAV_SIZE) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
            + b"data" + struct.pack("<I", STREAMED_WAV_SIZE))


class _ForwardSink:
    """The file object libsndfile writes to: bytes appended at the end are collected to be sent; writes
    back into what was already sent (header rewrites on close) are dropped. With `reserved_first_write`, the
    first write is a placeholder that is only filled in on close (MP3's LAME tag frame): it is left out."""

    def __init__(self, reserved_first_write: bool = False) -> None:
        self.size = 0
        self.position = 0
        self.pending = bytearray()
        self.reserved = reserved_first_write

    def write(self, data) -> int:
        data = bytes(data)
        if self.position == self.size:
            if not self.reserved:
                self.pending += data
            self.reserved = False
            self.size += len(data)
        self.position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = base + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def read(self, size: int = -1) -> bytes:
        return b""

    def take(self) -> bytes:
        data, self.pending = bytes(self.pending), bytearray()
        return data


class StreamEncoder:
    """Encodes a stream chunk by chunk: `write` returns the bytes ready to send (maybe none yet), `close`
    the rest. The concatenation is a complete file of the format."""

    def __init__(self, fmt: str, sample_rate: int) -> None:
        import soundfile as sf

        self.format = FORMATS[fmt]
        self.sample_rate = sample_rate
        self._header = wav_stream_header(sample_rate) if fmt == "wav" else b""
        self._sink = self._file = None
        if fmt not in ("wav", "pcm"):
            self._sink = _ForwardSink(reserved_first_write=fmt == "mp3")
            file_format, subtype = self.format.soundfile
            self._file = sf.SoundFile(self._sink, "w", sample_rate, 1, subtype, format=file_format,
                                      **_ENCODER_OPTIONS.get(fmt, {}))
            if fmt == "opus":
                _set_ogg_page_latency(self._file, OGG_PAGE_LATENCY_MS)

    def write(self, pcm_s16le: bytes) -> bytes:
        import numpy as np

        if len(pcm_s16le) % 2:
            raise ValueError("pcm_s16le must hold whole 16-bit samples")
        head, self._header = self._header, b""
        if self._file is None:
            return head + pcm_s16le
        self._file.write(np.frombuffer(pcm_s16le, dtype="<i2"))
        return self._sink.take()

    def close(self) -> bytes:
        head, self._header = self._header, b""
        if self._file is None:
            return head
        self._file.close()
        return self._sink.take()


OGG_PAGE_LATENCY_MS = 80.0
"""An Ogg page leaves per frame or so (libsndfile's default holds a page for a second of audio)."""
_SFC_SET_OGG_PAGE_LATENCY_MS = 0x1302
"""libsndfile's command (sndfile.h, 1.1 and later) that the soundfile package does not name."""


def _set_ogg_page_latency(file, milliseconds: float) -> None:
    import soundfile as sf

    value = sf._ffi.new("double *", milliseconds)
    sf._snd.sf_command(file._file, _SFC_SET_OGG_PAGE_LATENCY_MS, value, sf._ffi.sizeof("double"))


_ENCODER_OPTIONS = {"mp3": {"bitrate_mode": "CONSTANT", "compression_level": 0.5}}
"""MP3 at constant bitrate (about 64 kbit/s at 24 kHz mono), so a reader can size a stream without a tag."""


def encode_file(fmt: str, pcm_s16le: bytes, sample_rate: int) -> bytes:
    """A complete file of mono pcm_s16le. WAV and FLAC carry their length; mp3 and opus are exactly the bytes
    a stream of the same samples sends."""
    import numpy as np
    import soundfile as sf

    audio_format = FORMATS[fmt]
    if fmt in ("mp3", "opus"):
        encoder = StreamEncoder(fmt, sample_rate)
        return encoder.write(pcm_s16le) + encoder.close()
    if audio_format.soundfile is None:
        raise ValueError(f"{fmt} is a stream format, not a file format (no header says its rate)")
    if len(pcm_s16le) % 2:
        raise ValueError("pcm_s16le must hold whole 16-bit samples")
    buffer = io.BytesIO()
    file_format, subtype = audio_format.soundfile
    sf.write(buffer, np.frombuffer(pcm_s16le, dtype="<i2"), sample_rate, format=file_format, subtype=subtype)
    return buffer.getvalue()
