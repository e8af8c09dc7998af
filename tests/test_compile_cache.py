"""torch.compile's artifacts made at bake time (compile_cache.py, precompile.py, bake_weights.py --compile-cache)
and the worker's TORCH_COMPILE=auto: a worker start with a baked compile cache compiles nothing.

The end-to-end test bakes the demo checkpoint with its compile cache on the CPU (one compile of the frame, a
minute or two on two cores) and starts the real worker process once. A `g++` on PATH that logs each call and
runs the real compiler sees every C++ build (the bake's and the start's: the same compiler for both, since its
version output is part of Inductor's keys)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dia2_worker import compile_cache
from dia2_worker.env import WorkerConfigError
from dia2_worker.worker import WorkerSettings, choose_compile

from conftest import needs_compiler

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "fixtures" / "dia2-tiny"
GXX = shutil.which("g++")
VERSION_PROBES = {"--version", "-v"}
"""How Inductor asks the compiler who it is; anything else the compiler is called with is a build."""


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def baked(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A demo bake with its compile cache, and the environment (a logging g++ first on PATH) it was made in."""
    if GXX is None:
        pytest.skip("torch.compile's CPU code needs a C++ compiler: install g++ (.ci/run does)")
    root = tmp_path_factory.mktemp("compile-cache")
    shim = root / "bin"
    shim.mkdir()
    (shim / "g++").write_text(f'#!/bin/sh\necho "$*" >> "$DIA2_TEST_GXX_LOG"\nexec {GXX} "$@"\n')
    (shim / "g++").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "DIA2_TEST_GXX_LOG": str(root / "bake-g++.log")}
    for name in ("TORCH_COMPILE", "SLOTS", "DTYPE", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "bake_weights.py", "--demo", "--out", str(root / "model"),
                           "--compile-cache", "--device", "cpu"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stderr[-6000:]
    return root / "model", env


def builds(log: Path) -> list[str]:
    calls = log.read_text().splitlines() if log.is_file() else []
    return [call for call in calls if call.strip() not in VERSION_PROBES]


@needs_compiler
def test_a_second_process_start_compiles_nothing(baked: tuple[Path, dict[str, str]], tmp_path: Path):
    model, env = baked
    [cache] = (model / compile_cache.DIRECTORY).iterdir()
    assert cache.name == compile_cache.device_key("cpu")
    made = json.loads((cache / compile_cache.MADE).read_text())
    assert made["graphs"] >= 1 and made["slots"] == 1 and made["dtype"] == "float32"
    assert (cache / compile_cache.ARTIFACTS).stat().st_size > 0
    assert builds(Path(env["DIA2_TEST_GXX_LOG"])), "the bake compiled C++ kernels through the logging g++"
    files_before = {p for p in (cache / compile_cache.INDUCTOR).rglob("*")}

    # The real start: handler.py, TORCH_COMPILE unset (auto), then one job up to its first audio.
    log = tmp_path / "start-g++.log"
    report_path = tmp_path / "report.json"
    start = subprocess.run([sys.executable, "-u", "handler.py"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env={**env, "MODEL_DIR": str(model), "DEVICE": "cpu", "OUTPUT_DIR": str(tmp_path / "out"),
                                "DIA2_STARTUP_REPORT": str(report_path), "DIA2_TEST_GXX_LOG": str(log)})
    assert start.returncode == 0, start.stderr[-6000:]
    report = json.loads(report_path.read_text())

    assert report["settings"]["torch_compile"] is True
    # Every graph the start and its first job ran came from the cache: no FX-graph cache miss.
    assert report["compiled"] == {"graphs": made["graphs"], "from_cache": made["graphs"]}
    assert builds(log) == [], builds(log)  # and no C++ compiler run
    new = {p for p in (cache / compile_cache.INDUCTOR).rglob("*")} - files_before
    assert not [p for p in new if p.suffix in (".so", ".o", ".gch") or p.name.endswith("_CxxBuild")], sorted(new)
    graphs = made["graphs"]
    assert (f"torch.compile on: {graphs} graph{'s' * (graphs != 1)} compiled, {graphs} from the compile cache"
            in start.stderr)


@needs_compiler
def test_the_compile_cache_is_left_out_of_the_bake_manifest(baked: tuple[Path, dict[str, str]]):
    model, env = baked
    manifest = json.loads((model / "manifest.json").read_text())
    assert not [name for name in manifest["files"] if name.startswith(compile_cache.DIRECTORY)]
    assert "--compile-cache" not in manifest["bake"]["command"]  # a bake with or without it: the same manifest
    done = subprocess.run([sys.executable, "bake_weights.py", "--verify", str(model)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------- TORCH_COMPILE and the choice


def settings(**env: str) -> WorkerSettings:
    return WorkerSettings.from_env({"MODEL_DIR": str(TINY), "DEVICE": "cpu", **env})


@pytest.mark.parametrize(("value", "expected"), [("", None), ("auto", None), ("AUTO", None), ("1", True),
                                                 ("on", True), ("true", True), ("0", False), ("off", False)])
def test_torch_compile_is_auto_by_default(value: str, expected: bool | None):
    assert settings(TORCH_COMPILE=value).torch_compile is expected


def test_a_bad_torch_compile_is_one_line_naming_it():
    with pytest.raises(WorkerConfigError, match=r"^TORCH_COMPILE: must be auto, true or false, got 'sometimes'$"):
        settings(TORCH_COMPILE="sometimes")


CPU = SimpleNamespace(device=torch.device("cpu"))
LENGTH = 2257


@pytest.fixture
def model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A model directory to hold hand-made compile caches; Inductor's settings restored after the test."""
    from torch._inductor import config

    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", compile_cache.HEADERS_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    headers = config._config["cpp_cache_precompile_headers"]
    monkeypatch.setattr(headers, "default", headers.default)
    shutil.copy(TINY / "config.json", tmp_path / "config.json")
    return tmp_path


def make_cache(model_dir: Path, slots: int = 1, dtype: str = "float32", length: int = LENGTH,
               key: str | None = None) -> Path:
    directory = compile_cache.location(model_dir, "cpu")
    (directory / compile_cache.INDUCTOR).mkdir(parents=True)
    made = compile_cache.Made(key=key or compile_cache.device_key("cpu"), dtype=dtype, slots=slots, length=length,
                              graphs=1)
    (directory / compile_cache.MADE).write_text(json.dumps(made.__dict__))
    return directory


def choose(model_dir: Path, slots: int, **env: str) -> tuple[bool, int]:
    return choose_compile(WorkerSettings.from_env({"MODEL_DIR": str(model_dir), "DEVICE": "cpu", **env}), CPU, slots,
                          LENGTH)


def test_auto_is_off_without_a_compile_cache_and_true_forces_it(model_dir: Path):
    assert choose(model_dir, 1) == (False, 1)
    assert choose(model_dir, 1, TORCH_COMPILE="true") == (True, 1)
    assert choose(model_dir, 1, TORCH_COMPILE="false") == (False, 1)


def test_auto_compiles_from_a_cache_made_for_this_start(model_dir: Path):
    directory = make_cache(model_dir)
    assert choose(model_dir, 1) == (True, 1)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(directory / compile_cache.INDUCTOR)
    assert os.environ["TRITON_CACHE_DIR"] == str(directory / compile_cache.INDUCTOR / "triton")
    from torch._inductor import config

    # As at bake, in every thread (the scheduler's compiles): with them, every start would run the compiler.
    assert os.environ[compile_cache.HEADERS_VARIABLE] == "0"
    seen = []
    thread = threading.Thread(target=lambda: seen.append(config.cpp_cache_precompile_headers))
    thread.start()
    thread.join()
    assert seen == [False]


def test_the_slot_count_follows_the_cache_when_slots_is_unset_and_memory_holds_it(model_dir: Path):
    make_cache(model_dir, slots=4)
    assert choose(model_dir, 8) == (True, 4)           # free memory holds 8: the cache's 4
    assert choose(model_dir, 2) == (False, 2)          # memory holds only 2
    assert choose(model_dir, 2, SLOTS="2") == (False, 2)
    assert choose(model_dir, 2, SLOTS="2", TORCH_COMPILE="1") == (True, 2)  # forced: compiles at start


@pytest.mark.parametrize("made", [{"dtype": "bfloat16"}, {"length": LENGTH + 1}, {"key": "another-device"}])
def test_a_cache_made_for_other_settings_or_another_device_is_not_used(model_dir: Path, made: dict):
    make_cache(model_dir, **made)
    assert choose(model_dir, 1) == (False, 1)


def test_an_unfinished_cache_is_ignored(model_dir: Path):
    directory = make_cache(model_dir)
    (directory / compile_cache.MADE).unlink()  # the bake writes it last
    assert compile_cache.find(model_dir, "cpu") is None
    assert choose(model_dir, 1) == (False, 1)


def test_without_a_cpu_compiler_auto_is_off_and_true_is_an_error(model_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    make_cache(model_dir)
    assert choose(model_dir, 1) == (False, 1)
    with pytest.raises(WorkerConfigError, match="^TORCH_COMPILE: no C.. compiler"):
        choose(model_dir, 1, TORCH_COMPILE="true")


def test_a_read_only_cache_is_used_from_a_copy(model_dir: Path, monkeypatch: pytest.MonkeyPatch):
    directory = make_cache(model_dir)
    (directory / compile_cache.INDUCTOR / "entry").write_text("x")
    monkeypatch.setattr(compile_cache.os, "access", lambda path, mode: False)
    used = compile_cache.use(compile_cache.find(model_dir, "cpu"))
    assert used != directory / compile_cache.INDUCTOR and (used / "entry").read_text() == "x"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(used)
    shutil.rmtree(used.parent)


def test_the_device_key_names_python_torch_and_the_device_in_a_file_name():
    key = compile_cache.device_key("cpu")
    assert key == compile_cache.device_key(torch.device("cpu"))
    assert torch.__version__.lower() in key and f"py{sys.version_info.major}.{sys.version_info.minor}" in key
    assert "/" not in key and " " not in key


def test_bake_weights_knows_where_the_compile_cache_goes():
    import bake_weights

    assert bake_weights.COMPILE_CACHE_DIR == compile_cache.DIRECTORY
    with pytest.raises(SystemExit):
        bake_weights.parse_args(["--demo", "--out", "x", "--device", "cpu"])  # --device needs --compile-cache


@pytest.mark.parametrize(("argv", "fragments"), [
    (["--model-dir", "/no/such/dir"], ["--model-dir", "/no/such/dir", "not a directory"]),
    (["--model-dir", str(TINY), "--device", "tpu"], ["--device", "'tpu'"]),
])
def test_precompile_answers_a_mistake_with_one_line(argv: list[str], fragments: list[str],
                                                    capsys: pytest.CaptureFixture[str]):
    from dia2_worker import cli, precompile

    assert cli.run(precompile.main, argv, "python -m dia2_worker.precompile") == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("python -m dia2_worker.precompile: error: ") and all(f in line for f in fragments), line
