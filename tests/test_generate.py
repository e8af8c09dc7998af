"""The generate command line: WAV, tokens and JSON out, voice prefixes in, errors naming the flag."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]


def generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dia2_worker.generate", *args], cwd=ROOT, capture_output=True,
                          text=True)


def test_prefix_generation_matches_the_golden_case(tiny_dir, golden, golden_cases, tmp_path):
    case = next(c for c in golden_cases if c["name"] == "prefix_include1")
    words = tmp_path / "words.json"
    words.write_text((tiny_dir / case["prefix_speaker_1_words"]).read_text())
    out, tokens = tmp_path / "out.wav", tmp_path / "tokens.npy"
    result = generate("--model-dir", str(tiny_dir), "--text", case["script"], "--out", str(out),
                      "--tokens-out", str(tokens), "--json", "--temperature", "0", "--text-temperature", "0",
                      "--cfg-scale", str(case["cfg_scale"]), "--cfg-filter-k", str(case["cfg_filter_k"]),
                      "--prefix-speaker-1", str(tiny_dir / case["prefix_speaker_1"]),
                      "--prefix-speaker-1-words", str(words), "--include-prefix")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["timestamps"] == case["timestamps"]
    assert (summary["frames"], summary["samples"], summary["sample_rate"]) == (case["frames"], case["samples"], 24000)
    assert summary["duration_s"] == case["samples"] / 24000
    saved = np.load(tokens)
    assert saved.dtype == np.int64 and np.array_equal(saved, golden[f"{case['name']}.audio_tokens"][0].numpy())
    audio, rate = sf.read(out, dtype="int16")
    expected = (np.clip(golden[f"{case['name']}.waveform"].numpy(), -1, 1) * 32767).astype(np.int16)
    assert rate == 24000 and audio.shape == expected.shape
    # the golden waveform in 16 bits: within 1e-4 (3.3 steps) plus one step of truncation
    assert np.abs(audio.astype(np.int32) - expected).max() <= 4


def test_text_file_seed_and_human_summary(tiny_dir, tmp_path):
    script = tmp_path / "script.txt"
    script.write_text("[S1] hello world\n[S2] how are you\n")
    outs = [tmp_path / f"{n}.wav" for n in range(2)]
    for out in outs:
        result = generate("--model-dir", str(tiny_dir), "--text-file", str(script), "--out", str(out), "--seed", "7")
        assert result.returncode == 0 and "seed 7" in result.stderr and not result.stdout
        assert "generating:" not in result.stderr  # progress only on a terminal
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_bad_values_name_the_flag(tiny_dir, tmp_path):
    out = str(tmp_path / "x.wav")
    for args, message in [
        (["--temperature", "-1"], "--temperature: must be a finite number >= 0"),
        (["--top-k", "0"], "--top-k: must be >= 1"),
        (["--cfg-scale", "0"], "--cfg-scale: must be a finite number > 0"),
        (["--max-frames", "5"], "--max-frames: the text needs at least"),
        (["--prefix-speaker-2", out], "--prefix-speaker-2 needs --prefix-speaker-1"),
        (["--prefix-speaker-1-words", out], "--prefix-speaker-1-words needs --prefix-speaker-1"),
        (["--prefix-speaker-1", out], f"--prefix-speaker-1: {out} not found; give a file"),
        (["--include-prefix"], "--include-prefix needs --prefix-speaker-1"),
    ]:
        result = generate("--model-dir", str(tiny_dir), "--text", "[S1] hello world", "--out", out, *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
    result = generate("--model-dir", str(tiny_dir), "--text", "  ", "--out", out)
    assert result.returncode == 2 and "--text: must not be empty" in result.stderr
    assert not Path(out).exists()


def test_progress_shows_on_a_terminal(tiny_dir, tmp_path):
    import pty

    args = ["--model-dir", str(tiny_dir), "--text", "[S1] Hello there.", "--seed", "1",
            "--out", str(tmp_path / "o.wav")]
    primary, secondary = pty.openpty()
    with subprocess.Popen([sys.executable, "-m", "dia2_worker.generate", *args], cwd=ROOT, stderr=secondary,
                          stdout=subprocess.DEVNULL) as process:
        os.close(secondary)
        shown = b""
        while chunk := _read(primary):
            shown += chunk
    os.close(primary)
    assert process.returncode == 0
    assert b"\rgenerating: 1 frames, 0.1 s of audio\rgenerating: 2 frames" in shown


def _read(fd: int) -> bytes:
    try:
        return os.read(fd, 4096)
    except OSError:  # the terminal closed with the process
        return b""
