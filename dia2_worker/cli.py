"""What every command line does with a user's mistake: one line that names the flag, file or variable and
says what to do, and a non-zero exit. The traceback is shown only with LOG_LEVEL=DEBUG."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

MAX_MESSAGE_CHARS = 400
"""A mismatch can list hundreds of tensor names; the line stays readable."""


class UsageError(Exception):
    """A mistake in how a command was called; the message names the flag, file or variable."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that describe the user's input (files, flags, variables), not a bug: shown as one line."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .env import WorkerConfigError
    from .params import GenerationParamError

    return UsageError, ConfigError, CheckpointError, WorkerConfigError, GenerationParamError


def debugging() -> bool:
    return os.environ.get("LOG_LEVEL", "").strip().upper() == "DEBUG"


def run(main: Callable[[list[str] | None], int], argv: list[str] | None, prog: str) -> int:
    """`main(argv)`, with a user's mistake answered by `prog: error: ...` on stderr and exit status 2."""
    try:
        return main(argv)
    except user_errors() as exc:
        if debugging():
            raise
        message = " ".join(str(exc).split())
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS - 3] + "..."
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


def existing_file(path: Path, flag: str) -> Path:
    if not path.is_file():
        raise UsageError(f"{flag}: {path} {'is a directory' if path.is_dir() else 'not found'}; give a file")
    return path


def writable_parent(path: Path, flag: str) -> Path:
    """Checked before any work, so a long generation is not lost to a typo in the output path."""
    if not path.parent.is_dir():
        raise UsageError(f"{flag}: the directory {path.parent} does not exist; create it or choose another path")
    if path.is_dir():
        raise UsageError(f"{flag}: {path} is a directory; give a file name")
    return path


def model_dir(path: Path, flag: str) -> Path:
    """A Dia2 model directory (published or baked): config.json and readable safetensors headers."""
    if not path.is_dir():
        raise UsageError(f"{flag}: {path} is not a directory; give a Dia2 model directory (bake_weights.py "
                         "writes one, or the published checkpoint: config.json, model.safetensors, tokenizer.json)")
    if not (path / "config.json").exists() or (path / "config.json").is_dir():
        raise UsageError(f"{flag}: {path} has no config.json; give a Dia2 model directory (config.json, "
                         "model.safetensors, tokenizer.json)")
    for weights in sorted(path.glob("*.safetensors")):
        readable_safetensors(weights)
    return path


def mimi_dir(path: Path, flag: str) -> Path:
    if (path / "mimi").is_dir():
        raise UsageError(f"{flag}: {path} is a Dia2 model directory, not a Mimi one; did you mean {path / 'mimi'}?")
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise UsageError(f"{flag}: {path} needs config.json and model.safetensors (a Mimi codec directory)")
    readable_safetensors(path / "model.safetensors")
    return path


def readable_safetensors(path: Path) -> None:
    """The header of a weights file parses: a truncated or damaged download is named here, not deep in torch."""
    from .checkpoint import safetensors_shapes

    try:
        safetensors_shapes(path)
    except Exception as exc:
        raise UsageError(f"{path}: not a readable safetensors file ({exc}); download or bake it again") from None


def device(name: str, flag: str) -> str:
    """A torch device that exists on this machine."""
    import torch

    try:
        chosen = torch.device(name)
    except RuntimeError:
        raise UsageError(f"{flag}: unknown device {name!r}; use cpu or cuda (cuda:N for one GPU)") from None
    kind = chosen.type
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{flag}: {name!r} but CUDA is not available on this machine; use cpu")
    if kind == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"{flag}: {name!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    if kind not in ("cpu", "cuda"):
        raise UsageError(f"{flag}: {name!r} is not supported; use cpu or cuda")
    return name
