"""Cold start on the demo checkpoint: bake it offline, then measure fresh worker processes (fast and naive)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "model"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "bake_weights.py", "--demo", "--out", str(out)], cwd=ROOT, check=True, env=env)
    return out


def test_coldstart_accounts_for_every_phase_and_the_baseline(demo_model: Path, tmp_path: Path):
    report_path = tmp_path / "coldstart.json"
    result = subprocess.run(
        [sys.executable, "-m", "dia2_worker.coldstart", "--model-dir", str(demo_model), "--runs", "1",
         "--device", "cpu", "--baseline", "--json", str(report_path)],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "speed-up over the naive start" in result.stdout
    assert "run 1 of 1: fast start..." in result.stderr  # progress while each worker process runs
    report = json.loads(report_path.read_text())
    fast, naive = report["runs"]["fast"][0], report["runs"]["baseline"][0]
    phases = {p["phase"]: p for p in fast["phases"]}
    for name in ("interpreter", "import torch", "import runpod", "import dia2_worker", "weights read + to device",
                 "tokenizer", "mimi", "scheduler (caches, graphs)", "warm-up"):
        assert name in phases, name
    # Loading overlaps the SDK import: different threads, intervals that intersect.
    assert phases["import torch"]["thread"] != phases["import runpod"]["thread"]
    assert phases["import torch"]["start"] < phases["import runpod"]["end"]
    naive_phases = {p["phase"] for p in naive["phases"]}
    assert {"weights read (fp32, host)", "weights to device + cast"} <= naive_phases and "warm-up" not in naive_phases
    for run in (fast, naive):
        assert 0 < run["ready_s"] < run["first_job"]["first_audio_s"] < run["process_wall_s"]
        assert run["first_job"]["ttfa_ms"] > 0
    assert report["summary"]["speedup"]["process start -> first audio"] > 0


def test_worker_serves_a_job_from_the_baked_demo_offline(demo_model: Path, tmp_path: Path):
    from control_plane import ControlPlane

    env = {"MODEL_DIR": str(demo_model), "DEVICE": "cpu", "OUTPUT_DIR": str(tmp_path / "out"), "HF_HUB_OFFLINE": "1",
           "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing may be downloaded
    job = json.loads((ROOT / "test_input.json").read_text())["input"]
    with ControlPlane() as plane, plane.run_worker(ROOT / "handler.py", env, ROOT, tmp_path / "worker.log",
                                                   ready_timeout=60):
        result = plane.wait_result(plane.submit(job), 60).body
    final = result["output"][-1]
    assert final["type"] == "result" and final["bucket"] is None
    assert Path(final["audio_url"].removeprefix("file://")).is_file()
