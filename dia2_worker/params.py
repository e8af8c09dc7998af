"""Generation parameters: one table of every parameter (its engine name, job field, command-line flag, type,
the range a job may ask for, default and help), from which the job schema (jobs.py), the command line's flags
(generate.py) and README's table are built, plus the engine's own checks. Free of torch, so the job schema
and the command line share it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .env import Range

MAX_SEED = (1 << 63) - 1


class GenerationParamError(ValueError):
    """A generation parameter out of range: `param` names it (a GenerationParams field, or `text`/`prefix`),
    `message` says what is wrong; callers name the parameter the way their user spelled it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param, self.message = param, message


@dataclass(frozen=True)
class Param:
    """One generation parameter, everywhere it is spelled."""

    name: str                   # the GenerationParams field
    job_field: str | None       # the job input's field (None: not settable by a job)
    flag: str                   # the command line's flag
    type: type                  # int or float
    range: Range                # what a job may ask for (the engine checks GenerationParams.validate)
    default: int | float | None
    help: str


_TOP_K = Range(1, 10_000)  # the engine clamps k to the vocabulary
PARAMS = (
    Param("seed", "seed", "--seed", int, Range(0, MAX_SEED), None, "sampling seed"),
    Param("audio_temperature", "temperature", "--temperature", float, Range(0, 5), 0.8,
          "audio sampling temperature (0 = greedy)"),
    Param("audio_top_k", "top_k", "--top-k", int, _TOP_K, 50, "audio top-k"),
    Param("text_temperature", "text_temperature", "--text-temperature", float, Range(0, 5), 0.6,
          "text (word/pad) sampling temperature (0 = greedy)"),
    Param("text_top_k", "text_top_k", "--text-top-k", int, _TOP_K, 50, "text top-k"),
    Param("cfg_scale", "cfg_scale", "--cfg-scale", float, Range(0, 20, lo_open=True), 2.0,
          "classifier-free guidance scale (1 = off)"),
    Param("cfg_filter_k", "cfg_filter_k", "--cfg-filter-k", int, _TOP_K, 50, "classifier-free guidance top-k filter"),
    Param("initial_padding", None, "--initial-padding", int, Range(0), 2, "frames of padding before the first word"),
    Param("max_frames", None, "--max-frames", int, Range(1), None,
          "stop after this many frames, 12.5 per second (a job sets max_duration_s)"),
)
"""In the job schema's order: a job with several mistakes is told about the first."""
JOB_PARAMS = tuple(p for p in PARAMS if p.job_field is not None)
_DEFAULTS = {p.name: p.default for p in PARAMS}
_JOB_NAMES = {p.name: p.job_field for p in JOB_PARAMS} | {"max_frames": "max_duration_s"}
_FLAGS = {p.name: p.flag for p in PARAMS} | {"text": "--text"}


def job_field(param: str) -> str:
    """The job input's name for a GenerationParamError's `param`."""
    return _JOB_NAMES.get(param, param)


def flag(param: str) -> str:
    """The command line's name for a GenerationParamError's `param`."""
    return _FLAGS.get(param, param)


def readme_rows() -> list[str]:
    """README's job-input table rows for the generation parameters."""
    rows = []
    for p in JOB_PARAMS:
        # A job without a seed gets one derived from its id, so a retried job repeats its audio.
        default = "from the job id (reported in the result)" if p.default is None else f"{p.default:g}"
        rows.append(f"| `{p.job_field}` | {p.help} | {default}; {p.range.describe()} |")
    return rows


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings. Temperatures of 0 mean greedy; cfg_scale 1 disables guidance. `validate` checks
    what the engine can run, looser than what PARAMS lets a job or the command line ask for."""

    text_temperature: float = _DEFAULTS["text_temperature"]
    text_top_k: int = _DEFAULTS["text_top_k"]
    audio_temperature: float = _DEFAULTS["audio_temperature"]
    audio_top_k: int = _DEFAULTS["audio_top_k"]
    cfg_scale: float = _DEFAULTS["cfg_scale"]
    cfg_filter_k: int = _DEFAULTS["cfg_filter_k"]
    initial_padding: int = _DEFAULTS["initial_padding"]
    seed: int | None = _DEFAULTS["seed"]
    max_frames: int | None = _DEFAULTS["max_frames"]

    def validate(self) -> None:
        for name in ("text_temperature", "audio_temperature"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise GenerationParamError(name, f"must be a finite number >= 0 (0 = greedy), got {value}")
        for name in ("text_top_k", "audio_top_k"):
            if getattr(self, name) < 1:
                raise GenerationParamError(name, f"must be >= 1, got {getattr(self, name)}")
        if not math.isfinite(self.cfg_scale) or self.cfg_scale <= 0:
            raise GenerationParamError("cfg_scale", f"must be a finite number > 0, got {self.cfg_scale}")
        if self.cfg_filter_k < 1:
            raise GenerationParamError("cfg_filter_k", f"must be >= 1, got {self.cfg_filter_k}")
        if self.initial_padding < 0:
            raise GenerationParamError("initial_padding", f"must be >= 0, got {self.initial_padding}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise GenerationParamError("seed", f"must be between 0 and {MAX_SEED}, got {self.seed}")
        if self.max_frames is not None and self.max_frames < 1:
            raise GenerationParamError("max_frames", f"must be >= 1, got {self.max_frames}")
