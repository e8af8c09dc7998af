"""Generation parameters and their checks, with the original runtime's defaults. Free of torch, so the job
schema and the command line share them."""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_SEED = (1 << 63) - 1


class GenerationParamError(ValueError):
    """A generation parameter out of range; `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings. Temperatures of 0 mean greedy; cfg_scale 1 disables guidance."""

    text_temperature: float = 0.6
    text_top_k: int = 50
    audio_temperature: float = 0.8
    audio_top_k: int = 50
    cfg_scale: float = 2.0
    cfg_filter_k: int = 50
    initial_padding: int = 2
    seed: int | None = None
    max_frames: int | None = None

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
