"""What a generation outputs, and when: the step's per-row results packed for one readback, and the window
that crops the aligned frames and releases frames and words as soon as they are final.

The output drops the first `crop` frames (the first-word frame, or the start frame; nothing when the
prefix audio is kept, and nothing if the crop would remove everything). Until the crop is final, frames
that might be dropped and words whose times depend on it are held back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .generation import AudioFrame, Event, GenerationPlan, Word
from .text import FRAME_RATE

NOT_SET = -(1 << 40)        # first-word frame not seen yet

PACKED = ("frame_index", "word_entry", "first_word_frame", "done", "frame")
"""The columns after the C tokens of a packed step output [B, C + 5], in order."""


@dataclass
class StepOutput:
    """What one step produced for every row (device tensors; a row that was already finished produced nothing
    meaningful, and its owner has stopped reading it)."""

    frame: torch.Tensor           # [B] the frame this step ran
    frame_index: torch.Tensor     # [B] index of the aligned frame finished by this step (< 0: none)
    frame_tokens: torch.Tensor    # [B, C]
    word_entry: torch.Tensor      # [B] entry consumed as a word this step (-1: none)
    first_word_frame: torch.Tensor  # [B] (NOT_SET: not seen yet)
    done: torch.Tensor            # [B] the row has no frame left to run

    def pack(self) -> torch.Tensor:
        """One tensor [B, C + 5] for one readback: the frame's tokens, then the PACKED columns."""
        columns = [getattr(self, name).long() for name in PACKED]
        return torch.cat([self.frame_tokens, torch.stack(columns, dim=1)], dim=1)


@dataclass(frozen=True)
class RowOutput:
    """One row of a packed step output, on the host."""

    tokens: list[int]
    frame_index: int
    word_entry: int
    first_word_frame: int
    done: int
    frame: int

    @classmethod
    def unpack(cls, row: Sequence[int], codebooks: int) -> "RowOutput":
        return cls(list(row[:codebooks]), **dict(zip(PACKED, row[codebooks:])))


@dataclass
class OutputWindow:
    """Decides which frames and words of one generation are output, and emits them as soon as that is final."""

    plan: GenerationPlan
    crop: int | None = field(init=False)
    held_frames: list[AudioFrame] = field(default_factory=list)
    held_words: list[tuple[str, int]] = field(default_factory=list)
    timestamps: list[tuple[str, float]] = field(default_factory=list)
    frames_seen: int = 0
    words_seen: int = 0
    final: bool = False

    def __post_init__(self) -> None:
        plan = self.plan
        self.crop = 0 if plan.include_prefix else None if plan.main_carries_new_word else plan.start_frame

    def start(self, words: Sequence[tuple[int, int]], frames: torch.Tensor) -> list[Event]:
        """What is known when the generation joins: the (entry, frame) words its voice prefix consumed and the
        aligned prefix frames [N, C] finished before its start frame."""
        events = []
        for entry, frame in words:
            events += self.add_word(entry, frame)
        for index, tokens in enumerate(frames):
            events += self.add_frame(index, tokens)
        return events

    def add_step(self, out: RowOutput) -> list[Event]:
        """One step's output for this generation."""
        events = []
        if out.word_entry >= 0:
            events += self.add_word(out.word_entry, out.frame)
        if out.first_word_frame != NOT_SET:
            events += self.set_first_word_frame(out.first_word_frame)
        if out.frame_index >= 0:
            events += self.add_frame(out.frame_index, torch.tensor(out.tokens))
        if out.done:
            events += self.finish()
        return events

    def add_frame(self, index: int, tokens: torch.Tensor) -> Iterator[Event]:
        self.frames_seen = index + 1
        self.held_frames.append(AudioFrame(index, tokens))
        yield from self._release()

    def add_word(self, entry: int, frame: int) -> Iterator[Event]:
        self.words_seen += 1
        if self.plan.include_prefix or self.words_seen > self.plan.prefix_entry_count:
            self.held_words.append((self.plan.entries[entry].text, frame))
        yield from self._release()

    def set_first_word_frame(self, frame: int) -> Iterator[Event]:
        if self.crop is None:
            self.crop = max(frame, 0)
        yield from self._release()

    def finish(self) -> Iterator[Event]:
        if self.crop is None:
            self.crop = self.plan.start_frame
        if self.crop >= self.frames_seen:
            self.crop = 0
        self.final = True
        yield from self._release()

    def _release(self) -> Iterator[Event]:
        if not self.final:
            if self.crop is None or self.frames_seen <= self.crop:
                return
            self.final = True
        crop = self.crop
        for frame in self.held_frames:
            if frame.index >= crop:
                yield AudioFrame(frame.index - crop, frame.tokens)
        self.held_frames.clear()
        for text, frame in self.held_words:
            if frame >= crop:
                word = Word(text, (frame - crop) / FRAME_RATE)
                self.timestamps.append((word.text, word.time_s))
                yield word
        self.held_words.clear()
