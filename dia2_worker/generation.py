"""What one generation is, before and after it runs: its request, the plan computed from it, the events it
yields and its result. Plain data with no engine behind it, so the engine, the batch runner and the
output window all read the same types without importing each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .params import GenerationParams
from .text import Entry, TextState


@dataclass(frozen=True)
class PrefixSpeech:
    """Earlier speech of one speaker: audio (float samples [N] or [N, channels]) and its word timings."""

    samples: np.ndarray | torch.Tensor
    sample_rate: int
    words: tuple[tuple[str, float, float], ...]


@dataclass(frozen=True)
class VoicePrefix:
    speaker_1: PrefixSpeech
    speaker_2: PrefixSpeech | None = None
    include_audio: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    script: str | Sequence[str]
    params: GenerationParams = GenerationParams()
    prefix: VoicePrefix | None = None


@dataclass(frozen=True)
class PrefixPlan:
    """A voice prefix ready to prefill: its codes and the text inputs of its frames."""

    codes: torch.Tensor               # aligned prefix codes [C, T], on the engine's device
    text_inputs: torch.Tensor         # [T, 2] conditional (main, second) input of each prefix frame, on the CPU
    words: tuple[tuple[int, int], ...]  # (entry, frame) of the prefix words consumed by the warm-up
    entry_count: int


@dataclass(frozen=True)
class GenerationPlan:
    """Everything a generation needs before it joins a batch, computed off the step loop: validated
    parameters, the script's entries, the text state machine's row ready to copy (already run through the
    voice prefix's frames, which need no model), and the prefix's codes."""

    entries: tuple[Entry, ...]
    params: GenerationParams          # seed resolved
    text: TextState                   # one row, on the CPU
    text_tokens: tuple[int, int]      # conditional (main, second) input of the start frame
    prefix: PrefixPlan | None
    include_prefix: bool
    start_frame: int
    max_frames: int
    buffer_length: int
    main_carries_new_word: bool       # if not, the crop is known before the first frame

    @property
    def prefix_entry_count(self) -> int:
        return 0 if self.prefix is None else self.prefix.entry_count

    @property
    def slot_shift(self) -> int:
        """Cache slot minus frame: 1 after a voice prefix (its last frame is run twice), else 0."""
        return 0 if self.prefix is None else 1


@dataclass(frozen=True)
class AudioFrame:
    """One finished frame of the output (after the crop): all codebooks, delays undone."""

    index: int
    tokens: torch.Tensor  # [C] int64, CPU
    pcm: np.ndarray | None = None  # [frame_size] float32 from the streaming decoder, when decoding


@dataclass(frozen=True)
class Word:
    text: str
    time_s: float


Event = AudioFrame | Word


@dataclass
class GenerationResult:
    tokens: torch.Tensor          # [C, T] int64 aligned, cropped
    waveform: torch.Tensor        # [T * 1920] float32 in [-1, 1]
    sample_rate: int
    timestamps: list[tuple[str, float]]
    seed: int

    @property
    def frames(self) -> int:
        return self.tokens.shape[1]
