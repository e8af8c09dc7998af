"""The image as far as this machine can check it (no container engine here): every path the Dockerfile
copies exists and is in the build context, the runtime stage's files import on their own, the command is
the handler, and the environment the image sets is the one the worker reads."""

from __future__ import annotations

import ast
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
        parents = {Path(source).as_posix(), *(p.as_posix() for p in Path(source).parents)}
        assert parents & allowed, f"{source} is excluded by .dockerignore"


def import_closure(script: Path) -> set[str]:
    """Every dia2_worker file `script` can import, at module level or inside functions, transitively."""
    found: set[str] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        package = path.parent.relative_to(ROOT).parts
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name.split(".") for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = list(package[:len(package) - node.level + 1]) if node.level else []
                module = base + (node.module.split(".") if node.module else [])
                names = [module] + [module + [alias.name] for alias in node.names]
            else:
                continue
            for name in names:
                if not name or name[0] != "dia2_worker":
                    continue
                for depth in range(1, len(name) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
                    stem = ROOT.joinpath(*name[:depth])
                    for candidate in (stem / "__init__.py", stem.with_suffix(".py")):
                        relative = candidate.relative_to(ROOT).as_posix()
                        if candidate.is_file() and relative not in found:
                            found.add(relative)
                            todo.append(candidate)
    return found


def stage(name: str) -> str:
    start = DOCKERFILE.index(f" AS {name}\n")
    end = DOCKERFILE.find("\nFROM ", start)
    return re.sub(r"\\\n\s*", " ", DOCKERFILE[start:] if end < 0 else DOCKERFILE[start:end])


def test_the_weights_stage_copies_exactly_what_the_bake_imports():
    """A code change outside the bake's imports must not rerun the bake (and a rerun bake is byte-identical,
    see test_bake.py), so the 4 GB weights layer keeps its digest."""
    copied = set()
    for args in re.findall(r"^COPY (?!--from)(.+)$", stage("weights"), re.M):
        *sources, _ = args.split()
        for source in sources:
            assert (ROOT / source).is_file(), f"{source}: the weights stage copies files, not directories"
            copied.add(source)
    assert copied == {"bake_weights.py"} | import_closure(ROOT / "bake_weights.py")
    assert "dia2_worker/runner.py" not in copied and "dia2_worker/worker.py" not in copied


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
