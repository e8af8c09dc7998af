"""Audio helpers shared by the codec CLI, the engine and the worker: read, mono 24 kHz, 16-bit PCM.

`resample(to_mono(x))` is how Dia2's original runtime prepared voice prefixes (channel mean, then linear
interpolation with align_corners=False to round(N * 24000 / rate) samples), so prefixes encode to the
same codes. `pcm16` is the one float -> int16 rule, and WAV files are written from pcm_s16le bytes, so
streamed PCM chunks concatenate to exactly the WAV's samples.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SAMPLE_RATE = 24_000


def read_audio(source: str | Path | bytes) -> tuple[np.ndarray, int]:
    """An audio file (a path, or its bytes; whatever libsndfile reads) -> float32 [N, channels], sample rate.
    A WAV file cut short (its header promises more than it holds) raises ValueError."""
    import soundfile as sf

    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    shortfall = wav_shortfall(data)
    if shortfall is not None:
        name = "audio" if isinstance(source, bytes) else str(source)
        raise ValueError(f"{name} is a truncated WAV file: its header says {shortfall[0]:.2f} s but the file holds "
                         f"{shortfall[1]:.2f} s")
    samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return samples, rate


def wav_shortfall(data: bytes) -> tuple[float, float] | None:
    """For a PCM WAV file whose data chunk is cut short: (seconds its header states, seconds it holds);
    None for a complete WAV, a streamed one (size 0 or 0xFFFFFFFF) or anything that is not a WAV.
    libsndfile silently reads such a file as the shorter audio."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    position, frame_bytes, rate = 12, 0, 0
    while position + 8 <= len(data):
        chunk, size = data[position:position + 4], int.from_bytes(data[position + 4:position + 8], "little")
        body = position + 8
        if chunk == b"fmt " and size >= 16:
            rate = int.from_bytes(data[body + 4:body + 8], "little")
            frame_bytes = int.from_bytes(data[body + 12:body + 14], "little")  # block align
        elif chunk == b"data":
            held = len(data) - body
            if frame_bytes and rate and 0 < size < 0xFFFFFFFF and size > held:
                return size // frame_bytes / rate, held // frame_bytes / rate
            return None
        position = body + size + (size & 1)
    return None


def to_mono(samples: np.ndarray | torch.Tensor) -> torch.Tensor:
    """[N] or [N, channels] -> float32 [N], the mean of the channels."""
    wave = torch.as_tensor(samples, dtype=torch.float32)
    if wave.dim() == 2:
        return wave.mean(dim=1)
    if wave.dim() != 1:
        raise ValueError(f"audio must be [N] or [N, channels], got shape {list(wave.shape)}")
    return wave


def resample(wave: torch.Tensor, sample_rate: int, target_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """[N] at `sample_rate` -> [round(N * target / rate)] by linear interpolation (align_corners=False)."""
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if sample_rate == target_rate:
        return wave
    size = round(wave.shape[0] * target_rate / sample_rate)
    return F.interpolate(wave.view(1, 1, -1), size=size, mode="linear", align_corners=False).view(-1)


def pcm16(wave: np.ndarray | torch.Tensor) -> np.ndarray:
    """Float samples -> int16: clamp to [-1, 1], times 32767, truncated toward zero."""
    if isinstance(wave, torch.Tensor):
        wave = wave.detach().float().cpu().numpy()
    return (np.clip(np.asarray(wave, dtype=np.float32), -1.0, 1.0) * 32767).astype(np.int16)


def pcm16_bytes(wave: np.ndarray | torch.Tensor) -> bytes:
    """Float samples -> pcm_s16le bytes (the `pcm16` rule, little-endian)."""
    return pcm16(wave).astype("<i2").tobytes()


def write_wav(path: str | Path, wave: np.ndarray | torch.Tensor, sample_rate: int) -> None:
    """Mono float samples [N] -> a 16-bit PCM WAV file (the `pcm16` rule)."""
    from .encoders import encode_file

    Path(path).write_bytes(encode_file("wav", pcm16_bytes(wave), sample_rate))
