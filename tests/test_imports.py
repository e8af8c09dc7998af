"""Import discipline: the handler starts on the standard library alone (so torch and the RunPod SDK can
import side by side), and a running worker never pulls in audio/ML stacks it does not use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("transformers", "whisper", "whisper_timestamped", "torchaudio", "librosa", "sphn", "scipy", "sklearn",
             "pandas", "matplotlib", "PIL", "cv2", "numba")


def imported_after(code: str, env: dict[str, str] | None = None) -> set[str]:
    script = f"import sys, json\n{code}\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True,
                         env=env).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_importing_the_handler_loads_only_the_standard_library():
    modules = imported_after("import handler")
    assert not modules & {"torch", "numpy", "runpod", "boto3", "safetensors", "tokenizers", "soundfile"}
    assert not modules & set(FORBIDDEN)


def test_a_loaded_worker_imports_nothing_forbidden(tiny_dir, tmp_path):
    import os

    env = {**os.environ, "MODEL_DIR": str(tiny_dir), "DEVICE": "cpu", "OUTPUT_DIR": str(tmp_path)}
    modules = imported_after(
        "import runpod\nfrom dia2_worker.worker import WorkerService\nWorkerService.load(__import__('os').environ)",
        env)
    assert {"torch", "runpod", "dia2_worker"} <= modules
    assert not modules & set(FORBIDDEN), sorted(modules & set(FORBIDDEN))
    assert "boto3" not in modules  # no bucket configured: storage stays local
