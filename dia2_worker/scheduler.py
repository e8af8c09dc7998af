"""Many generations on one engine: a fixed set of slots stepped together, one frame per step.

`BatchRunner` is the synchronous core: jobs join free slots and leave between frames, each step advances
every occupied slot, and what a slot produced (finished frames with their PCM, words) is routed through
its `OutputWindow`. `Scheduler` runs a BatchRunner on its own thread (the one that owns the GPU), with a
waiting line in submission order, cancellation and deadlines. A single eager generation is a BatchRunner
with one slot, so every path produces tokens through the same code.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from .engine import NOT_SET, AudioFrame, Dia2Engine, GenerationPlan, GenerationRequest, OutputWindow, Word

log = logging.getLogger("dia2_worker.scheduler")


@dataclass
class Emitted:
    """What one generation produced in one step: frames (with PCM when decoding), words, and whether it ended."""

    frames: list[AudioFrame] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)
    finished: bool = False
    frames_run: int = 0


class RowDecoders:
    """One streaming Mimi decoder per slot, reset when a generation joins the slot."""

    def __init__(self, engine: Dia2Engine, slots: int) -> None:
        self.engine = engine
        self.decoders = [engine.codec.streaming_decoder(1) for _ in range(slots)]

    def reset(self, row: int) -> None:
        self.decoders[row].reset()

    def decode(self, row: int, frames: list[AudioFrame]) -> list[AudioFrame]:
        if not frames:
            return frames
        codes = torch.stack([f.tokens for f in frames], dim=1).unsqueeze(0).to(self.engine.device)
        with torch.inference_mode():
            pcm = self.decoders[row].decode(codes)[0, 0].float().cpu().numpy()
        size = self.engine.codec.frame_size
        return [replace(f, pcm=pcm[i * size: (i + 1) * size]) for i, f in enumerate(frames)]


class BatchRunner:
    """Steps `slots` generation rows of one preallocated state. Not thread-safe: one owner drives it."""

    def __init__(self, engine: Dia2Engine, slots: int, length: int, *, decode_audio: bool,
                 max_entries: int | None = None, max_tokens: int | None = None) -> None:
        self.engine = engine
        self.state = engine.new_state(slots, length, max_entries, max_tokens)
        self.windows: list[OutputWindow | None] = [None] * slots
        self.frames: list[int] = [0] * slots   # each row's next frame, mirrored on the host
        self.frames_run: list[int] = [0] * slots
        self.decoders = RowDecoders(engine, slots) if decode_audio else None

    @property
    def slots(self) -> int:
        return len(self.windows)

    def free_rows(self) -> list[int]:
        return [row for row, window in enumerate(self.windows) if window is None]

    @property
    def occupied(self) -> list[int]:
        return [row for row, window in enumerate(self.windows) if window is not None]

    def join(self, plan: GenerationPlan, row: int | None = None) -> tuple[int, Emitted]:
        """Start `plan` in a free row (its voice prefix is prefilled now); returns the row and first output."""
        if row is None:
            free = self.free_rows()
            if not free:
                raise RuntimeError("no free slot")
            row = free[0]
        engine, window = self.engine, OutputWindow(plan)
        self.windows[row] = window
        self.frames[row], self.frames_run[row] = plan.start_frame, 0
        if self.decoders is not None:
            self.decoders.reset(row)
        events = []
        for entry, frame in engine.start(self.state, row, plan):
            events += window.add_word(entry, frame)
        # With a prefix, its frames before the start frame are finished before anything runs.
        count = plan.start_frame + 1 - engine.max_delay
        if count > 0:
            indices = torch.arange(count, device=engine.device)
            rows = torch.full((count,), row, device=engine.device)
            tokens = engine.aligned_frames(self.state, rows, indices).cpu()
            for index in range(count):
                events += window.add_frame(index, tokens[index])
        emitted = self._emitted(row, events)
        if bool(engine.finished(self.state)[row]):
            emitted = self._finish(row, emitted)
        return row, emitted

    def leave(self, row: int) -> None:
        self.windows[row] = None

    def step(self) -> dict[int, Emitted]:
        """One frame for every row; returns the output of every occupied row."""
        rows = self.occupied
        if not rows:
            return {}
        engine = self.engine
        out = engine.step(self.state, kv_len=self.state.cache.length)
        packed = torch.cat([out.frame_tokens, torch.stack(
            [out.frame_index, out.word_entry, out.first_word_frame, out.done.long()], dim=1)], dim=1)
        table = packed[rows].tolist()
        C = self.engine.config.num_codebooks
        result = {}
        for row, values in zip(rows, table):
            window = self.windows[row]
            index, word, first_word, done = values[C:]
            events = []
            if word >= 0:
                events += window.add_word(word, self.frames[row])
            self.frames[row] += 1
            self.frames_run[row] += 1
            if first_word != NOT_SET:
                events += window.set_first_word_frame(first_word)
            if index >= 0:
                events += window.add_frame(index, torch.tensor(values[:C]))
            emitted = self._emitted(row, events)
            result[row] = self._finish(row, emitted) if done else emitted
        return result

    def _finish(self, row: int, emitted: Emitted) -> Emitted:
        tail = self._emitted(row, list(self.windows[row].finish()))
        self.leave(row)
        return Emitted(emitted.frames + tail.frames, emitted.words + tail.words, True, tail.frames_run)

    def _emitted(self, row: int, events: list) -> Emitted:
        frames = [e for e in events if isinstance(e, AudioFrame)]
        if self.decoders is not None:
            frames = self.decoders.decode(row, frames)
        return Emitted(frames, [e for e in events if isinstance(e, Word)], False, self.frames_run[row])


class GenerationStream:
    """One generation run eagerly in a batch of one, as an iterator of AudioFrame and Word events."""

    def __init__(self, engine: Dia2Engine, plan: GenerationPlan, decode_audio: bool) -> None:
        self.engine, self.plan, self.decode_audio = engine, plan, decode_audio
        self.timestamps: list[tuple[str, float]] = []
        self.frames_run = 0

    def __iter__(self):
        plan = self.plan
        runner = BatchRunner(self.engine, 1, plan.buffer_length, decode_audio=self.decode_audio,
                             max_entries=len(plan.entries), max_tokens=max(1, sum(len(e.tokens) for e in plan.entries)))
        row, emitted = runner.join(plan)
        self.timestamps = runner.windows[row].timestamps
        yield from emitted.frames
        yield from emitted.words
        while not emitted.finished:
            emitted = runner.step()[row]
            yield from emitted.frames
            yield from emitted.words
        self.frames_run = emitted.frames_run


Output = Emitted | BaseException


@dataclass
class Ticket:
    """A submitted generation. `on_output` is called on the scheduler thread with each step's Emitted, or
    with the exception that ended it; after a finished Emitted or an exception it is not called again."""

    request: GenerationRequest
    on_output: Callable[[Output], None]
    deadline: float | None = None
    plan: GenerationPlan | None = None
    row: int | None = None
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None

    def cancel(self) -> None:
        """Stop generating; the slot is freed before the next frame. Safe from any thread."""
        self.cancelled = True


class JobTimeout(TimeoutError):
    pass


class Scheduler:
    """Owns the engine on one thread: admits waiting generations into free slots between frames and steps
    all active ones together."""

    def __init__(self, engine: Dia2Engine, slots: int, length: int | None = None, *,
                 decode_audio: bool = True) -> None:
        length = length or engine.config.runtime.max_context_steps + 1
        self.runner = BatchRunner(engine, slots, length, decode_audio=decode_audio)
        self.engine = engine
        self._waiting: deque[Ticket] = deque()
        self._running: dict[int, Ticket] = {}
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="dia2-scheduler", daemon=True)
        self._thread.start()

    @property
    def slots(self) -> int:
        return self.runner.slots

    def submit(self, request: GenerationRequest, on_output: Callable[[Output], None],
               deadline: float | None = None) -> Ticket:
        ticket = Ticket(request, on_output, deadline)
        with self._wake:
            if self._closed:
                raise RuntimeError("scheduler is closed")
            self._waiting.append(ticket)
            self._wake.notify()
        return ticket

    def wake(self) -> None:
        """Make the loop look at cancellations now (it also does before every frame)."""
        with self._wake:
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._waiting and not self._running:
                    self._wake.wait()
                if self._closed:
                    return
            self._drop_ended()
            self._admit()
            if self._running:
                self._step()

    def _drop_ended(self) -> None:
        now = time.monotonic()
        for row, ticket in list(self._running.items()):
            if ticket.cancelled or (ticket.deadline is not None and now > ticket.deadline):
                self.runner.leave(row)
                del self._running[row]
                if not ticket.cancelled:
                    ticket.on_output(JobTimeout("the job ran past its time limit"))

    def _admit(self) -> None:
        while self.runner.free_rows():
            with self._wake:
                if not self._waiting:
                    return
                ticket = self._waiting.popleft()
            if ticket.cancelled:
                continue
            try:
                ticket.plan = self.engine.prepare(ticket.request)
                ticket.started_at = time.monotonic()
                ticket.row, emitted = self.runner.join(ticket.plan)
            except Exception as exc:  # a bad request fails its job only
                ticket.on_output(exc)
                continue
            if not emitted.finished:
                self._running[ticket.row] = ticket
            ticket.on_output(emitted)

    def _step(self) -> None:
        try:
            outputs = self.runner.step()
        except Exception as exc:  # the step itself failed: every running job fails, the worker stays up
            log.exception("generation step failed")
            for row, ticket in self._running.items():
                self.runner.leave(row)
                ticket.on_output(exc)
            self._running.clear()
            return
        for row, emitted in outputs.items():
            ticket = self._running[row]
            if emitted.finished:
                del self._running[row]
            if not ticket.cancelled:
                ticket.on_output(emitted)
