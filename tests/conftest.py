"""Shared fixtures: the tiny Dia2 checkpoint the repo ships (a copy of the original runtime's golden set)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

# Before torch loads: torch runs on several threads in these tests (loading, schedulers, servers), and
# OpenMP's default spin-waiting makes them fight over the cores (the worker sets the same).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
from s3_server import FaultProxy, MotoServer

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "dia2-tiny"


needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                    reason="torch.compile's CPU code needs a C++ compiler: install g++ "
                                           "(.ci/run does)")


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    return TINY


@pytest.fixture(scope="session")
def golden() -> dict:
    from safetensors.torch import load_file

    return load_file(str(TINY / "golden.safetensors"))


@pytest.fixture(scope="session")
def golden_cases() -> list[dict]:
    return json.loads((TINY / "golden.json").read_text())["cases"]


@pytest.fixture(scope="session")
def engine():
    from dia2_worker.engine import Dia2Engine

    return Dia2Engine.load(TINY)


@pytest.fixture(scope="session")
def asr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's tiny speech recognition model (it says "demo voice sample" for any sound but silence)."""
    from dia2_worker.random_asr import write_random_asr

    directory = tmp_path_factory.mktemp("asr") / "asr"
    write_random_asr(directory)
    return directory


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    """A real S3-compatible server (moto's standalone server) on loopback, one per test module."""
    with MotoServer() as server:
        yield server


@pytest.fixture
def proxy(moto: MotoServer) -> Iterator[FaultProxy]:
    """A proxy in front of `moto` that tests can make fail, stall or corrupt requests."""
    with FaultProxy(moto.endpoint_url) as fault_proxy:
        yield fault_proxy


@pytest.fixture(autouse=True)
def no_http_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's HTTP(S)_PROXY must not capture loopback traffic (botocore and urllib honour it)."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def plane() -> Iterator:
    """The loopback RunPod control-plane emulator; fails the test if the worker called a URL it does not serve."""
    from control_plane import ControlPlane

    with ControlPlane() as control_plane:
        yield control_plane
        assert not control_plane.rejected, "the worker called URLs the platform does not serve"


@pytest.fixture
def start_worker(plane, tmp_path: Path) -> Iterator:
    """start(script, env, cwd, ready_timeout) runs a worker process against `plane` until the test ends;
    teardown prints every worker's log (shown when the test failed) and checks SIGTERM stopped it cleanly."""
    from contextlib import ExitStack

    workers = []
    stack = ExitStack()

    def start(script: Path, env: dict[str, str], cwd: Path | None = None, ready_timeout: float = 30.0):
        log_path = tmp_path / f"worker-{len(workers)}.log"
        worker = stack.enter_context(plane.run_worker(script, env, cwd or tmp_path, log_path, ready_timeout))
        workers.append(worker)
        return worker

    try:
        yield start
    finally:
        stack.close()
        for worker in workers:
            print(f"--- {worker.log_path} (exit {worker.returncode})\n{worker.log()}")
    assert [worker.returncode for worker in workers] == [0] * len(workers)


def linked_long_model(tiny_dir: Path, directory: Path) -> dict:
    """Links the tiny checkpoint's files into `directory`, all but config.json, and returns its config with
    Dia2's real 1500-frame context (a generation long enough to be stopped halfway); the caller writes it."""
    for item in tiny_dir.iterdir():
        if item.name != "config.json":
            (directory / item.name).symlink_to(item)
    config = json.loads((tiny_dir / "config.json").read_text())
    config["runtime"]["max_context_steps"] = 1500
    return config
