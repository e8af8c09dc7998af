"""./dev demo on a worker that cannot start: it stops as soon as the worker exits and shows why, instead of
waiting out the client's retries. Run in a copy of the repository whose .venv borrows this interpreter's
packages, so nothing is installed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_fails_fast_with_the_worker_log_when_the_worker_dies(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dev", "handler.py", "test_input.json", "requirements.txt", "requirements-dev.txt"):
        shutil.copy2(ROOT / name, repo / name)
    (repo / "dia2_worker").symlink_to(ROOT / "dia2_worker")
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "python").symlink_to(sys.executable)
    if sys.prefix != sys.base_prefix:  # a virtualenv: the interpreter finds its packages beside pyvenv.cfg
        (repo / ".venv" / "lib").symlink_to(Path(sys.prefix) / "lib")
        shutil.copy(Path(sys.prefix) / "pyvenv.cfg", repo / ".venv" / "pyvenv.cfg")
    (repo / ".venv" / ".installed").touch()  # newer than the requirements: nothing to install
    (repo / "build" / "demo-model").mkdir(parents=True)
    (repo / "build" / "demo-model" / "manifest.json").write_text("{}")  # no bake: the worker dies first

    run = subprocess.run(["bash", "dev", "demo"], cwd=repo, capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "DEVICE": "tpu"})
    assert run.returncode == 1
    assert "the worker exited before it was ready" in run.stderr
    assert "DEVICE: unknown device 'tpu'" in run.stderr  # the log's tail says why
    assert "not reachable" not in run.stderr
