"""The image as far as this machine can check it (no container engine here): every path the Dockerfile
copies exists and is in the build context, the runtime stage's files import on their own, the command is
the handler, and the environment the image sets is the one the worker reads."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions(name: str) -> list[str]:
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [line.strip()[len(name) + 1:] for line in text.splitlines() if line.strip().startswith(name + " ")]


def local_copies() -> list[str]:
    sources = []
    for args in instructions("COPY"):
        if "--from=" not in args:
            sources += args.split()[:-1]
    return sources


def test_copied_paths_exist_and_are_in_the_build_context():
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    sources = local_copies()
    assert {"requirements.txt", "handler.py", "dia2_worker", "bake_weights.py"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), source
        assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"


def test_runtime_stage_files_import_on_their_own(tmp_path):
    runtime = DOCKERFILE[DOCKERFILE.index("AS runtime"):]
    for args in re.findall(r"^COPY (?!--from)(.+)$", runtime, re.M):
        *sources, _ = args.split()
        for source in sources:
            target = tmp_path / source
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(ROOT / source, target)
    shutil.copy(ROOT / "bake_weights.py", tmp_path / "bake_weights.py")  # the weights stage's entry point
    subprocess.run([sys.executable, "-c", "import handler, bake_weights; handler.main"], cwd=tmp_path, check=True,
                   env={"PATH": "/usr/bin:/bin"})


def test_command_and_environment():
    assert instructions("CMD") == ['["python", "-u", "handler.py"]']
    env = " ".join(instructions("ENV"))
    for setting in ("MODEL_DIR=/models/dia2", "HF_HUB_OFFLINE=1", "RUNPOD_LOG_LEVEL=INFO"):
        assert setting in env
    assert {"MODEL", "MODEL_REVISION", "MIMI", "DTYPE", "DEMO", "ASR", "ASR_REVISION"} <= {
        a.split("=")[0] for a in instructions("ARG")}
    bake = " ".join(instructions("RUN"))
    assert '--model "$MODEL" --revision "$MODEL_REVISION"' in bake and "--verify /models/dia2" in bake
    assert '--asr "$ASR" --asr-revision "$ASR_REVISION"' in bake


def test_requirements_are_pinned():
    lines = [line for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines and all(re.fullmatch(r"[A-Za-z0-9_.\[\]-]+==[0-9][\w.+-]*", line) for line in lines), lines
