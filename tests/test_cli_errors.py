"""A user's everyday mistakes on every command line: one line on stderr that names the flag, file or
variable, a non-zero exit, and no traceback (LOG_LEVEL=DEBUG shows it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dia2_worker import client, coldstart, generate
from dia2_worker.mimi import __main__ as mimi_cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "dia2-tiny"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A damaged model directory (its weights cut short), a truncated WAV, a file that is not JSON."""
    root = tmp_path_factory.mktemp("mistakes")
    damaged = root / "damaged"
    damaged.mkdir()
    for item in TINY.iterdir():
        if item.name != "model.safetensors":
            (damaged / item.name).symlink_to(item)
    (damaged / "model.safetensors").write_bytes((TINY / "model.safetensors").read_bytes()[:1000])
    wav = (TINY / "prefix_s1.wav").read_bytes()
    (root / "cut.wav").write_bytes(wav[:len(wav) // 4])
    (root / "not.json").write_text("{text: hello")
    return {"damaged": damaged, "cut": root / "cut.wav", "not_json": root / "not.json", "root": root}


GEN = ["--model-dir", str(TINY), "--text", "[S1] hi"]
CUDA = "cuda:0" if not torch.cuda.is_available() else "cuda:99"

# (command's main, argv with {root}/{damaged}/{cut}/{not_json} filled in, fragments the one line must hold)
CASES = {
    "generate: no model dir": (generate.main, ["--model-dir", "/no/such/dir", "--text", "hi", "--out", "{root}/o.wav"],
                               ["--model-dir", "/no/such/dir", "not a directory"]),
    "generate: wrong model dir": (generate.main, ["--model-dir", "{root}", "--text", "hi", "--out", "{root}/o.wav"],
                                  ["--model-dir", "has no config.json"]),
    "generate: missing text file": (generate.main, ["--model-dir", str(TINY), "--text-file", "{root}/none.txt",
                                                    "--out", "{root}/o.wav"], ["--text-file", "none.txt", "not found"]),
    "generate: missing prefix WAV": (generate.main, GEN + ["--out", "{root}/o.wav", "--prefix-speaker-1",
                                                           "{root}/none.wav", "--prefix-speaker-1-words",
                                                           str(TINY / "prefix_s1.words.json")],
                                     ["--prefix-speaker-1", "none.wav", "not found"]),
    "generate: missing words file": (generate.main, GEN + ["--out", "{root}/o.wav", "--prefix-speaker-1",
                                                           str(TINY / "prefix_s1.wav"), "--prefix-speaker-1-words",
                                                           "{root}/none.json"],
                                     ["--prefix-speaker-1-words", "none.json", "not found"]),
    "generate: out in a missing directory": (generate.main, GEN + ["--out", "{root}/no/dir/o.wav"],
                                             ["--out", "does not exist"]),
    "generate: cuda without CUDA": (generate.main, GEN + ["--out", "{root}/o.wav", "--device", CUDA],
                                    ["--device", "cuda"]),
    "generate: unknown device": (generate.main, GEN + ["--out", "{root}/o.wav", "--device", "tpu"],
                                 ["--device", "unknown device 'tpu'"]),
    "generate: corrupted weights": (generate.main, ["--model-dir", "{damaged}", "--text", "hi", "--out",
                                                    "{root}/o.wav"],
                                    ["damaged/model.safetensors", "not a readable safetensors file"]),
    "generate: mimi dir is the model": (generate.main, GEN + ["--out", "{root}/o.wav", "--mimi-dir", str(TINY)],
                                        ["--mimi-dir", f"did you mean {TINY / 'mimi'}?"]),
    "mimi: truncated WAV": (mimi_cli.main, ["encode", "--mimi-dir", str(TINY / "mimi"), "--audio", "{cut}", "--out",
                                            "{root}/codes.npy"], ["cut.wav is a truncated WAV file"]),
    "mimi: mimi dir is the model": (mimi_cli.main, ["encode", "--mimi-dir", str(TINY), "--audio",
                                                    str(TINY / "prefix_s1.wav"), "--out", "{root}/codes.npy"],
                                    ["--mimi-dir", "did you mean"]),
    "client: missing input": (client.main, ["--url", "http://127.0.0.1:9", "--input", "{root}/none.json", "--out",
                                            "{root}/o.wav"], ["--input", "none.json", "not found"]),
    "client: invalid input": (client.main, ["--url", "http://127.0.0.1:9", "--input", "{not_json}", "--out",
                                            "{root}/o.wav"], ["--input", "not.json", "not valid JSON"]),
    "client: server not reachable": (client.main, ["--url", "http://127.0.0.1:9", "--text", "[S1] hi", "--out",
                                                   "{root}/o.wav"], ["http://127.0.0.1:9 is not reachable"]),
    "coldstart: no runs": (coldstart.main, ["--runs", "0", "--model-dir", str(TINY)], ["--runs", "at least 1"]),
}


@pytest.mark.parametrize("case", CASES)
def test_a_mistake_gets_one_line_and_a_failing_exit(case: str, files: dict[str, Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    main, argv, fragments = CASES[case]
    code = main([arg.format(**files) for arg in argv])
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and "job failed" not in err
    for fragment in fragments:
        assert fragment in err, err


@pytest.mark.parametrize(("env", "fragment"), [({"DEVICE": "tpu"}, "DEVICE: unknown device 'tpu'"),
                                               ({"MODEL_DIR": "/no/such/dir"}, "MODEL_DIR: /no/such/dir"),
                                               ({"JOB_TIMEOUT_S": "soon"}, "JOB_TIMEOUT_S: must be a number")])
def test_a_bad_worker_variable_is_named(env: dict[str, str], fragment: str, tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-u", "handler.py"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MODEL_DIR": str(TINY), "DEVICE": "cpu", "OUTPUT_DIR": str(tmp_path),
                              **env})
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert f"handler.py: error: {fragment}" in run.stderr


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "dia2_worker.generate", "--model-dir", str(tmp_path), "--text", "hi",
                          "--out", str(tmp_path / "o.wav")], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "LOG_LEVEL": "DEBUG"})
    assert run.returncode != 0 and "Traceback" in run.stderr and "has no config.json" in run.stderr


def test_handler_help_loads_nothing(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "handler.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "MODEL_DIR": str(tmp_path / "missing")})
    assert run.returncode == 0 and run.stdout.startswith("usage: python -u handler.py") and not run.stderr
