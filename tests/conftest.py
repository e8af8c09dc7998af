"""Shared fixtures: the tiny Dia2 checkpoint the repo ships (a copy of the original runtime's golden set)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

# Before torch loads: torch runs on several threads in these tests (loading, schedulers, servers), and
# OpenMP's default spin-waiting makes them fight over the cores (the worker sets the same).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "dia2-tiny"


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
