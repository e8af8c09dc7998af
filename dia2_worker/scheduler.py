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


@dataclass(eq=False)
class Slot:
    """One generation occupying a row of the batch, from join until it finishes or leaves."""

    row: int
    window: OutputWindow
    frames_run: int = 0
    finished: bool = False


@dataclass
class _InFlight:
    """A launched step whose outputs are on their way to the host."""

    packed: torch.Tensor            # [B, C + 5] host copy (pinned on CUDA)
    ready: torch.cuda.Event | None  # None on CPU: the copy is already complete
    owners: list[Slot | None]       # who held each row when the step was launched


class BatchRunner:
    """Steps `slots` generation rows of one preallocated state. Not thread-safe: one owner drives it.

    Steps are launched ahead of reading their results: at most `lag` steps are in flight, their outputs
    copied to the host asynchronously, so the device never waits on the host. A finished row keeps
    stepping (its outputs are ignored) until the host has seen it finish; rows are tagged with the slot
    that held them at launch, so a slot freed and reused in between cannot receive stale frames.
    """

    def __init__(self, engine: Dia2Engine, slots: int, length: int, *, decode_audio: bool,
                 max_entries: int | None = None, max_tokens: int | None = None, lag: int = 0,
                 graphs: bool = False, host_sync: bool = False) -> None:
        self.engine = engine
        self.host_sync = host_sync  # the reference-like baseline: every sampled token read back at once
        self.state = engine.new_state(slots, length, max_entries, max_tokens)
        self.slots: list[Slot | None] = [None] * slots
        self.lag = lag
        self.decoders = RowDecoders(engine, slots) if decode_audio else None
        self._in_flight: deque[_InFlight] = deque()
        self._graph = None
        if graphs:
            from .graphs import StepGraph

            self._graph = StepGraph(engine, self.state, self.state.cache.length)

    def free_rows(self) -> list[int]:
        return [row for row, slot in enumerate(self.slots) if slot is None]

    @property
    def active(self) -> list[Slot]:
        return [slot for slot in self.slots if slot is not None]

    def join(self, plan: GenerationPlan) -> tuple[Slot, Emitted]:
        """Start `plan` in a free row (its voice prefix is prefilled now); returns its slot and first output."""
        free = self.free_rows()
        if not free:
            raise RuntimeError("no free slot")
        engine, slot = self.engine, Slot(free[0], OutputWindow(plan))
        self.slots[slot.row] = slot
        if self.decoders is not None:
            self.decoders.reset(slot.row)
        events = []
        for entry, frame in engine.start(self.state, slot.row, plan):
            events += slot.window.add_word(entry, frame)
        # With a prefix, its frames before the start frame are finished before anything runs.
        count = plan.start_frame + 1 - engine.max_delay
        if count > 0:
            rows = torch.full((count,), slot.row, device=engine.device)
            tokens = engine.aligned_frames(self.state, rows, torch.arange(count, device=engine.device)).cpu()
            for index in range(count):
                events += slot.window.add_frame(index, tokens[index])
        emitted = self._emitted(slot, events)
        if bool(engine.finished(self.state)[slot.row]):
            emitted = self._finish(slot, emitted)
        return slot, emitted

    def leave(self, slot: Slot) -> None:
        """Free the slot's row now; its steps still in flight are dropped when they arrive."""
        if self.slots[slot.row] is slot:
            self.slots[slot.row] = None

    def step(self) -> dict[Slot, Emitted]:
        """Launch one frame for every row, then collect every step whose outputs have arrived (all but the
        last `lag`). Returns what each slot produced in the collected steps."""
        if self.active:
            self._launch()
        results: dict[Slot, Emitted] = {}
        while self._in_flight and (len(self._in_flight) > self.lag or not self.active
                                   or _arrived(self._in_flight[0])):
            for slot, emitted in self._collect(self._in_flight.popleft()).items():
                results[slot] = _merge(results[slot], emitted) if slot in results else emitted
        return results

    def _launch(self) -> None:
        engine = self.engine
        out = (self._graph.replay() if self._graph
               else engine.step(self.state, kv_len=self.state.cache.length, host_sync=self.host_sync))
        packed = torch.cat([out.frame_tokens, torch.stack(
            [out.frame_index, out.word_entry, out.first_word_frame, out.done.long(), out.frame], dim=1)], dim=1)
        ready = None
        if packed.is_cuda:
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            packed = host
        self._in_flight.append(_InFlight(packed, ready, list(self.slots)))

    def _collect(self, launched: _InFlight) -> dict[Slot, Emitted]:
        if launched.ready is not None:
            launched.ready.synchronize()
        C = self.engine.config.num_codebooks
        table = launched.packed.tolist()
        results = {}
        for row, slot in enumerate(launched.owners):
            if slot is None or slot.finished or self.slots[row] is not slot:
                continue
            values = table[row]
            index, word, first_word, done, frame = values[C:]
            window, events = slot.window, []
            slot.frames_run += 1
            if word >= 0:
                events += window.add_word(word, frame)
            if first_word != NOT_SET:
                events += window.set_first_word_frame(first_word)
            if index >= 0:
                events += window.add_frame(index, torch.tensor(values[:C]))
            emitted = self._emitted(slot, events)
            results[slot] = self._finish(slot, emitted) if done else emitted
        return results

    def _finish(self, slot: Slot, emitted: Emitted) -> Emitted:
        tail = self._emitted(slot, list(slot.window.finish()))
        slot.finished = True
        self.leave(slot)
        return Emitted(emitted.frames + tail.frames, emitted.words + tail.words, True, slot.frames_run)

    def _emitted(self, slot: Slot, events: list) -> Emitted:
        frames = [e for e in events if isinstance(e, AudioFrame)]
        if self.decoders is not None:
            frames = self.decoders.decode(slot.row, frames)
        return Emitted(frames, [e for e in events if isinstance(e, Word)], False, slot.frames_run)


def _arrived(launched: _InFlight) -> bool:
    return launched.ready is None or launched.ready.query()


def _merge(first: Emitted, then: Emitted) -> Emitted:
    return Emitted(first.frames + then.frames, first.words + then.words, then.finished, then.frames_run)


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
        slot, emitted = runner.join(plan)
        self.timestamps = slot.window.timestamps
        while True:
            yield from emitted.frames
            yield from emitted.words
            if emitted.finished:
                break
            emitted = runner.step().get(slot, Emitted())
        self.frames_run = slot.frames_run


Output = Emitted | BaseException


@dataclass(eq=False)
class Ticket:
    """A submitted generation. `on_output` is called on the scheduler thread with each step's Emitted, or
    with the exception that ended it; after a finished Emitted or an exception it is not called again."""

    request: GenerationRequest
    on_output: Callable[[Output], None]
    deadline: float | None = None
    plan: GenerationPlan | None = None
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

    def __init__(self, engine: Dia2Engine, slots: int, length: int, *, decode_audio: bool = True,
                 lag: int = 0, graphs: bool = False) -> None:
        self.runner = BatchRunner(engine, slots, length, decode_audio=decode_audio, lag=lag, graphs=graphs)
        self.engine = engine
        self._waiting: deque[Ticket] = deque()
        self._running: dict[Slot, Ticket] = {}
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="dia2-scheduler", daemon=True)
        self._thread.start()

    @property
    def slots(self) -> int:
        return len(self.runner.slots)

    def submit(self, request: GenerationRequest, on_output: Callable[[Output], None],
               deadline: float | None = None) -> Ticket:
        ticket = Ticket(request, on_output, deadline)
        with self._wake:
            if self._closed:
                raise RuntimeError("scheduler is closed")
            self._waiting.append(ticket)
            self._wake.notify()
        return ticket

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
        for slot, ticket in list(self._running.items()):
            if ticket.cancelled or (ticket.deadline is not None and now > ticket.deadline):
                self.runner.leave(slot)
                del self._running[slot]
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
                slot, emitted = self.runner.join(ticket.plan)
            except Exception as exc:  # a bad request fails its own job only
                ticket.on_output(exc)
                continue
            if not emitted.finished:
                self._running[slot] = ticket
            ticket.on_output(emitted)

    def _step(self) -> None:
        try:
            outputs = self.runner.step()
        except Exception as exc:  # the step itself failed: every running job fails, the worker stays up
            log.exception("generation step failed")
            for slot, ticket in self._running.items():
                self.runner.leave(slot)
                ticket.on_output(exc)
            self._running.clear()
            return
        for slot, emitted in outputs.items():
            ticket = self._running.get(slot)
            if ticket is None:
                continue
            if emitted.finished:
                del self._running[slot]
            if not ticket.cancelled:
                ticket.on_output(emitted)
