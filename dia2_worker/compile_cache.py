"""Where torch.compile's artifacts live, how a bake makes them and how a start loads them, so a cold start with
TORCH_COMPILE on compiles nothing.

A compile cache is made for one device kind and one torch (its key), in `<model dir>/compile-cache/<key>/`:
- `inductor/`: the Inductor cache directory the bake compiled into (FX graphs, AOTAutograd entries, the built
  kernels: C++ shared objects on a CPU, Triton binaries on a GPU); a start points TORCHINDUCTOR_CACHE_DIR and
  TRITON_CACHE_DIR at it, so nothing is built again;
- `artifacts.bin`: PyTorch's portable compile-cache artifacts (`torch.compiler.save_cache_artifacts`), loaded
  at start with `torch.compiler.load_cache_artifacts`;
- `made.json`, written last (a cache without it is unfinished and ignored): what the cache was made for (the
  dtype, slots and buffer length the compiled frames are specialised to) and how many graphs it holds.

Precompiled C++ headers are off at bake and at start alike: Inductor keeps them outside its cache directory
and preprocesses their sources again in every process, so with them on every start would run the compiler.

Making one runs the worker's own start with compile forced on (`python -m dia2_worker.precompile`, which
`bake_weights.py --compile-cache` calls); this module only says where and how the artifacts are kept.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

DIRECTORY = "compile-cache"
"""Beside the weights in a model directory; not listed in its manifest (device-specific, not byte-identical)."""
MADE = "made.json"
ARTIFACTS = "artifacts.bin"
INDUCTOR = "inductor"


def device_key(device: torch.device | str) -> str:
    """What compiled code depends on besides the model: Python, torch and the device kind (GPU name and compute
    capability with the CUDA version, or the CPU architecture and the vector instructions torch uses)."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        kind = f"cuda{torch.version.cuda}-{torch.cuda.get_device_name(device)}-sm{major}{minor}"
    else:
        kind = f"{device.type}-{platform.machine()}-{torch.backends.cpu.get_cpu_capability()}"
    raw = f"py{sys.version_info.major}.{sys.version_info.minor}-torch{torch.__version__}-{kind}"
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", raw).lower()


def location(model_dir: Path, device: torch.device | str) -> Path:
    """This device's compile cache directory in `model_dir` (whether or not it exists)."""
    return Path(model_dir) / DIRECTORY / device_key(device)


@dataclass(frozen=True)
class Made:
    """What a compile cache was made for (the compiled frames are specialised to these) and what it holds."""

    key: str
    dtype: str
    slots: int
    length: int
    graphs: int
    torch: str = torch.__version__


@dataclass(frozen=True)
class CompileCache:
    directory: Path
    made: Made

    def mismatch(self, dtype: str, length: int) -> str | None:
        """Why this cache cannot serve a start with this dtype and buffer length (None when it can)."""
        if self.made.dtype != dtype:
            return f"made for {self.made.dtype}, this start runs {dtype} (DTYPE)"
        if self.made.length != length:
            return (f"made for slots of {self.made.length} frames, this start's are {length} "
                    "(MAX_PREFIX_AUDIO_S decides it)")
        return None


def find(model_dir: Path, device: torch.device | str) -> CompileCache | None:
    """The finished compile cache for this device in `model_dir`, or None."""
    directory = location(model_dir, device)
    try:
        made = Made(**json.loads((directory / MADE).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return CompileCache(directory, made) if made.key == device_key(device) else None


def begin(directory: Path) -> None:
    """Start a new cache in `directory` (an old one there is deleted): compiling from here on writes into it."""
    shutil.rmtree(directory, ignore_errors=True)
    (directory / INDUCTOR).mkdir(parents=True)
    _point_at(directory / INDUCTOR)


def use(cache: CompileCache) -> Path:
    """Before anything compiles: compile from `cache` (its Inductor directory, and its artifacts loaded). A cache
    on a read-only file system is copied to a temporary directory first (Inductor writes locks beside its
    entries). Returns the Inductor directory in use."""
    inductor = cache.directory / INDUCTOR
    if not os.access(inductor, os.W_OK):
        copy = Path(tempfile.mkdtemp(prefix="dia2-compile-cache-")) / INDUCTOR
        shutil.copytree(inductor, copy)
        inductor = copy
    _point_at(inductor)
    artifacts = cache.directory / ARTIFACTS
    if artifacts.is_file():
        torch.compiler.load_cache_artifacts(artifacts.read_bytes())
    return inductor


def _point_at(inductor: Path) -> None:
    """Inductor's cache in `inductor`, precompiled headers off: for every thread (a setting made through
    torch._inductor.config holds only for the thread that makes it, and the scheduler's thread compiles)."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor)
    os.environ["TRITON_CACHE_DIR"] = str(inductor / "triton")
    os.environ[HEADERS_VARIABLE] = "0"  # read when torch._inductor.config is first imported
    config = sys.modules.get("torch._inductor.config")
    if config is not None:  # imported already: change the default every thread reads
        config._config["cpp_cache_precompile_headers"].default = False


HEADERS_VARIABLE = "TORCHINDUCTOR_CPP_CACHE_PRECOMPILE_HEADERS"


def save(directory: Path, made: Made) -> None:
    """After the bake's compiles: the portable artifacts, then `made.json`, which marks the cache finished."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is not None:
        (directory / ARTIFACTS).write_bytes(saved[0])
    (directory / MADE).write_text(json.dumps(asdict(made), indent=1) + "\n")


def compiler_missing(device: torch.device | str) -> str | None:
    """On a CPU, Inductor needs its C++ compiler even when every kernel comes from the cache (it checks the
    compiler's version); the reason it is unusable, or None."""
    if torch.device(device).type != "cpu":
        return None
    name = os.environ.get("CXX", "g++")  # Inductor's choice (torch._inductor.config.cpp.cxx), read without it
    if shutil.which(name):
        return None
    return f"no C++ compiler ({name}) on PATH, which torch.compile needs on a CPU"


@dataclass(frozen=True)
class Tally:
    """Inductor graphs compiled in this process so far, and how many of them came from the compile cache."""

    graphs: int = 0
    from_cache: int = 0

    def __sub__(self, other: "Tally") -> "Tally":
        return Tally(self.graphs - other.graphs, self.from_cache - other.from_cache)

    def describe(self) -> str:
        return f"{self.graphs} graph{'s' * (self.graphs != 1)} compiled, {self.from_cache} from the compile cache"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def tally() -> Tally:
    """From torch's counters: each Inductor graph is an FX-graph cache hit, miss or bypass."""
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    hits = inductor["fxgraph_cache_hit"]
    return Tally(hits + inductor["fxgraph_cache_miss"] + inductor["fxgraph_cache_bypass"], hits)
