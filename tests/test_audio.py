"""Audio helpers: reading, mono mixing, the voice-prefix resampling rule, the one float -> int16 rule."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from dia2_worker import audio
from dia2_worker.encoders import encode_file


def reference_linear_resample(x: np.ndarray, size: int) -> np.ndarray:
    """Linear interpolation, align_corners=False, written out: output i reads input position
    (i + 0.5) * N / M - 0.5, with N / M in float32 and the position rounded once to float32 (torch's fused
    multiply-add), then blends its two neighbours."""
    n = len(x)
    scale = np.float64(np.float32(n / size))
    position = np.maximum(((np.arange(size) + 0.5) * scale - 0.5).astype(np.float32), np.float32(0))
    left = position.astype(np.int64)
    right = np.minimum(left + 1, n - 1)
    weight = position - left.astype(np.float32)
    return x[left] * (np.float32(1) - weight) + x[right] * weight


def reference_pcm16(wave: np.ndarray) -> np.ndarray:
    """The int16 rule written out: clamp to [-1, 1], times 32767 in float32, truncated toward zero."""
    return np.trunc(np.clip(wave.astype(np.float32), -1, 1) * np.float32(32767)).astype(np.int16)


def test_to_mono_averages_channels() -> None:
    stereo = np.array([[1.0, 0.0], [0.5, -0.5], [-1.0, 0.25]], dtype=np.float32)
    assert audio.to_mono(stereo).tolist() == [0.5, 0.0, -0.375]
    assert audio.to_mono(torch.tensor([0.1, 0.2])).dtype == torch.float32
    assert torch.equal(audio.to_mono(np.array([0.25, -0.5])), torch.tensor([0.25, -0.5]))
    with pytest.raises(ValueError, match=r"\[N\] or \[N, channels\]"):
        audio.to_mono(np.zeros((2, 2, 2)))


@pytest.mark.parametrize("rate, n", [(44_100, 44_101), (16_000, 333), (48_000, 4_801), (22_050, 1_000), (8_000, 7)])
def test_resample_length_and_values(rate: int, n: int) -> None:
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    out = audio.resample(torch.from_numpy(x), rate)
    assert out.shape == (round(n * 24_000 / rate),)
    np.testing.assert_allclose(out.numpy(), reference_linear_resample(x, out.shape[0]), rtol=0, atol=1e-6)


def test_resample_keeps_24k_and_composes_with_to_mono() -> None:
    x = torch.randn(100)
    assert audio.resample(x, 24_000) is x
    stereo = torch.randn(441, 2)
    out = audio.resample(audio.to_mono(stereo), 44_100)
    assert out.shape == (240,)
    expected = reference_linear_resample(stereo.numpy().mean(axis=1, dtype=np.float32), 240)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="sample_rate must be positive"):
        audio.resample(x, 0)


def test_pcm16_rule() -> None:
    """Clamp to [-1, 1], times 32767, truncated toward zero."""
    wave = np.array([-2.0, -1.0, -0.5, -1e-6, 0.0, 0.49999, 1.5 / 32767, 0.999, 1.0, 3.0], dtype=np.float32)
    expected = [-32767, -32767, -16383, 0, 0, 16383, 1, 32734, 32767, 32767]
    assert audio.pcm16(wave).tolist() == expected
    assert audio.pcm16(torch.from_numpy(wave).to(torch.bfloat16)).dtype == np.int16


def test_pcm16_bytes_chunks_concatenate_to_the_whole() -> None:
    wave = np.random.default_rng(0).uniform(-1.2, 1.2, 5_000).astype(np.float32)
    whole = audio.pcm16_bytes(wave)
    assert whole == reference_pcm16(wave).astype("<i2").tobytes() and len(whole) == 10_000
    assert b"".join(audio.pcm16_bytes(wave[i: i + 1920]) for i in range(0, 5_000, 1920)) == whole


def test_wav_round_trip(tmp_path: Path) -> None:
    wave = np.random.default_rng(1).uniform(-1.1, 1.1, 2_400).astype(np.float32)
    path = tmp_path / "out.wav"
    audio.write_wav(path, torch.from_numpy(wave), 24_000)
    info = sf.info(str(path))
    assert (info.samplerate, info.channels, info.subtype) == (24_000, 1, "PCM_16")
    pcm, _ = sf.read(str(path), dtype="int16")
    assert np.array_equal(pcm, reference_pcm16(wave))

    samples, rate = audio.read_audio(path)
    assert rate == 24_000 and samples.dtype == np.float32 and samples.shape == (2_400, 1)
    np.testing.assert_array_equal(samples[:, 0], pcm / 32768.0)
    from_bytes, rate_b = audio.read_audio(path.read_bytes())
    assert rate_b == 24_000 and np.array_equal(from_bytes, samples)


def test_a_wav_file_from_streamed_chunks() -> None:
    """The worker's streamed pcm_s16le chunks, joined, make a WAV with exactly those samples."""
    wave = np.random.default_rng(2).uniform(-1.0, 1.0, 4_000).astype(np.float32)
    pcm = b"".join(audio.pcm16_bytes(wave[i: i + 1920]) for i in range(0, 4_000, 1920))
    samples, rate = sf.read(io.BytesIO(encode_file("wav", pcm, 16_000)), dtype="int16")
    assert rate == 16_000 and np.array_equal(samples, reference_pcm16(wave))
    assert sf.read(io.BytesIO(encode_file("wav", b"", 24_000)))[0].shape == (0,)
    with pytest.raises(ValueError, match="whole 16-bit samples"):
        encode_file("wav", b"\x00\x01\x02", 24_000)


def test_read_audio_keeps_channels(tmp_path: Path) -> None:
    stereo = np.stack([np.linspace(-0.5, 0.5, 100), np.zeros(100)], axis=1)
    path = tmp_path / "stereo.flac"
    sf.write(str(path), stereo, 16_000, subtype="PCM_16")
    samples, rate = audio.read_audio(path)
    assert rate == 16_000 and samples.shape == (100, 2)
    with pytest.raises(sf.SoundFileError):
        audio.read_audio(b"not audio")
