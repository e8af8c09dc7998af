"""RunPod Hub packaging: .runpod/hub.json and .runpod/tests.json carry the keys the Hub's publishing guide
requires, every variable they offer is one the worker reads and their defaults pass its checks, and the test
job passes the job validation and planning a real job goes through."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dia2_worker.jobs import WorkerLimits, parse_job
from dia2_worker.runner import to_generation_request
from dia2_worker.speech_api import ServerSettings
from dia2_worker.storage import StorageSettings
from dia2_worker.worker import WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
HUB = json.loads((ROOT / ".runpod" / "hub.json").read_text())
TESTS = json.loads((ROOT / ".runpod" / "tests.json").read_text())
SOURCES = "\n".join(p.read_text() for p in [ROOT / "handler.py", *(ROOT / "dia2_worker").glob("*.py")])


def test_hub_json_has_what_the_hub_requires() -> None:
    assert {"title", "description", "type", "category", "iconUrl", "config"} <= HUB.keys()
    assert HUB["type"] == "serverless" and HUB["category"] == "audio"
    assert HUB["iconUrl"].startswith("https://") and 0 < len(HUB["title"]) <= 50
    config = HUB["config"]
    assert config["runsOn"] == "GPU" and config["gpuCount"] == 1 and config["containerDiskInGb"] >= 20
    assert all(re.fullmatch(r"[A-Z]+_\d+(_PRO)?", pool) for pool in config["gpuIds"].split(","))
    assert all(re.fullmatch(r"\d+\.\d+", version) for version in config["allowedCudaVersions"])


def test_hub_env_entries_are_variables_the_worker_reads() -> None:
    entries = HUB["config"]["env"]
    keys = [entry["key"] for entry in entries]
    assert len(keys) == len(set(keys))
    for entry in entries:
        assert set(entry) == {"key", "input"}
        assert f'"{entry["key"]}"' in SOURCES, f"{entry['key']} is not read by the worker"
        spec = entry["input"]
        assert {"name", "type", "description", "default"} <= spec.keys(), entry["key"]
        assert spec["type"] in ("string", "number", "boolean")
        if spec["default"] != "":
            kind = {"string": str, "number": (int, float), "boolean": bool}[spec["type"]]
            assert isinstance(spec["default"], kind), entry["key"]


def test_hub_defaults_pass_the_workers_checks(tiny_dir: Path) -> None:
    env = {"DEVICE": "cpu", "MODEL_DIR": str(tiny_dir)}  # the image's baked model stands in for /models/dia2
    for entry in HUB["config"]["env"]:
        default = entry["input"]["default"]
        if default != "":
            env[entry["key"]] = str(default).lower() if isinstance(default, bool) else str(default)
    assert env["SERVE_MODE"] == "queue"
    WorkerSettings.from_env(env)
    WorkerLimits.from_env(env)
    StorageSettings.from_env(env)
    ServerSettings.from_env(env)


def test_tests_json_has_what_the_hub_requires() -> None:
    assert TESTS["tests"]
    for test in TESTS["tests"]:
        assert {"name", "input", "timeout"} <= test.keys() and test["timeout"] > 0
    config = TESTS["config"]
    assert {"gpuTypeId", "gpuCount", "env", "allowedCudaVersions"} <= config.keys()
    assert all(set(variable) == {"key", "value"} for variable in config["env"])
    assert set(config["allowedCudaVersions"]) <= set(HUB["config"]["allowedCudaVersions"])


@pytest.mark.parametrize("test", TESTS["tests"], ids=[t["name"] for t in TESTS["tests"]])
def test_the_test_job_passes_validation_and_planning(test: dict, engine) -> None:
    env = {variable["key"]: variable["value"] for variable in TESTS["config"]["env"]}
    job = parse_job(test["input"], WorkerLimits.from_env(env))
    plan = engine.prepare(to_generation_request(job, engine.max_delay, "hub-test"))
    assert job.text == test["input"]["text"] and plan.params.seed == test["input"]["seed"]
