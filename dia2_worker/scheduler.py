"""Many generations on one engine: a fixed set of slots stepped together, one frame per step.

`BatchRunner` is the synchronous core: jobs join free slots and leave between frames, each step advances
every occupied slot, and what a slot produced (finished frames with their PCM, words) is routed through
its `OutputWindow`. `Scheduler` runs a BatchRunner on its own thread (the one that owns the GPU), with a
waiting line in submission order, cancellation and deadlines. A single eager generation is a BatchRunner
with one slot, so every path produces tokens through the same code.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from .engine import NOT_SET, AudioFrame, Dia2Engine, GenerationParamError, GenerationPlan, OutputWindow, Word
from .graphs import FrameGraphs, bucket_sizes, capture, cover, kv_buckets

log = logging.getLogger("dia2_worker.scheduler")
MAX_DECODE_FRAMES = 32  # a backlog (a kept voice prefix) is decoded this many frames per call


@dataclass
class Emitted:
    """What one generation produced in one step: frames (with PCM when decoding), words, and whether it ended."""

    frames: list[AudioFrame] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)
    finished: bool = False


class HostCopy:
    """A device tensor on its way to the host: a pinned buffer filled asynchronously, with an event to wait
    on (on the CPU, the tensor itself)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.event = None
        if tensor.is_cuda:
            self.tensor = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.tensor.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.tensor = tensor

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def get(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.tensor


def to_device(values: torch.Tensor, target: torch.Tensor) -> None:
    """Host values into a device tensor without waiting (pinned staging on CUDA)."""
    if target.is_cuda:
        values = values.pin_memory()
    target.copy_(values, non_blocking=True)


class PendingAudio:
    """Frames whose PCM the decoder is computing: each call decodes `count` consecutive frames of some rows,
    starting at each row's `first` frame."""

    def __init__(self, frames: dict[int, list[AudioFrame]], frame_size: int,
                 calls: list[tuple[dict[int, int], int, HostCopy]]) -> None:
        self.frames, self.frame_size, self.calls = frames, frame_size, calls

    def ready(self) -> bool:
        return all(pcm.ready() for _, _, pcm in self.calls)

    def result(self) -> dict[int, list[AudioFrame]]:
        out: dict[int, list[AudioFrame]] = {row: [] for row in self.frames}
        size = self.frame_size
        for first, count, pcm in self.calls:
            samples = pcm.get().numpy()
            for row, start in first.items():
                out[row] += [replace(self.frames[row][start + i], pcm=samples[row, i * size: (i + 1) * size].copy())
                             for i in range(count)]
        return out


class SlotDecoder:
    """One streaming Mimi decoder with a row per slot. A call decodes frames for the rows that have some
    while the other rows keep their state untouched, so every slot shares the same call (on a GPU, one frame
    per row is the captured graph; a backlog, like a kept voice prefix, goes in chunks). Codes go in and PCM
    comes out without the host waiting on the device."""

    def __init__(self, engine: Dia2Engine, slots: int, graphs: bool) -> None:
        codec = engine.codec
        self.frame_size = codec.frame_size
        self.decoder = codec.streaming_decoder(slots)
        self.codes = torch.zeros(slots, engine.config.num_codebooks, 1, dtype=torch.long, device=codec.device)
        self.active = torch.zeros(slots, dtype=torch.bool, device=codec.device)
        self._one_frame = self._call
        if graphs:  # warm-up and capture run with no row active, so they change no state
            replay, output = capture(lambda: self._call(self.codes, self.active))
            self._one_frame = lambda codes, active: (replay(), output)[1]

    def _call(self, codes: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        return self.decoder.step(codes, active).flatten(1).float()

    def reset(self, row: int) -> None:
        self.decoder.reset([row])

    def submit(self, frames: dict[int, list[AudioFrame]]) -> PendingAudio:
        """Queue the decode of each row's frames, in order."""
        done = {row: 0 for row in frames}
        calls = []
        while rows := [row for row in frames if done[row] < len(frames[row])]:
            count = min(MAX_DECODE_FRAMES, *(len(frames[row]) - done[row] for row in rows))
            codes = torch.zeros(self.codes.shape[:2] + (count,), dtype=torch.long)
            active = torch.zeros(self.active.shape, dtype=torch.bool)
            for row in rows:
                codes[row] = torch.stack([f.tokens for f in frames[row][done[row]: done[row] + count]], dim=1)
                active[row] = True
            with torch.inference_mode():
                if count == 1:
                    to_device(codes, self.codes)
                    to_device(active, self.active)
                    pcm = self._one_frame(self.codes, self.active)
                else:
                    device = self.codes.device
                    pcm = self._call(codes.to(device, non_blocking=True), active.to(device, non_blocking=True))
            calls.append(({row: done[row] for row in rows}, count, HostCopy(pcm)))
            for row in rows:
                done[row] += count
        return PendingAudio(frames, self.frame_size, calls)


@dataclass(eq=False)
class Slot:
    """One generation occupying a row of the batch, from join until it finishes or leaves."""

    row: int
    window: OutputWindow
    cache_slot: int  # the cache slot its next frame writes (kept on the host to pick the length attention reads)
    finished: bool = False


@dataclass
class _InFlight:
    """A launched step whose outputs are on their way to the host."""

    packed: HostCopy                # [B, C + 5]
    owners: list[Slot | None]       # who held each row when the step was launched


@dataclass
class _Delivery:
    """What collected steps produced, waiting for the PCM of their frames."""

    events: dict[Slot, list]
    audio: PendingAudio | None
    finished: dict[Slot, bool]  # as of these events

    def ready(self) -> bool:
        return self.audio is None or self.audio.ready()

    def emitted(self) -> dict[Slot, Emitted]:
        frames = self.audio.result() if self.audio is not None else {
            slot.row: [e for e in events if isinstance(e, AudioFrame)] for slot, events in self.events.items()}
        return {slot: Emitted(frames[slot.row], [e for e in events if isinstance(e, Word)], self.finished[slot])
                for slot, events in self.events.items()}


class BatchRunner:
    """Steps `slots` generation rows of one preallocated state. Not thread-safe: one owner drives it.

    Steps are launched ahead of reading their results: at most `lag` steps are in flight, their outputs
    copied to the host asynchronously, so the device never waits on the host; decoding to PCM is queued the
    same way, a step behind. A finished row keeps stepping (its outputs are ignored) until the host has seen
    it finish; rows are tagged with the slot that held them at launch, so a slot freed and reused in between
    cannot receive stale frames.
    """

    def __init__(self, engine: Dia2Engine, slots: int, length: int, *, decode_audio: bool,
                 max_entries: int | None = None, max_tokens: int | None = None, lag: int = 0,
                 graphs: bool = False, host_sync: bool = False, compile: bool = False) -> None:
        self.engine = engine
        self.host_sync = host_sync  # the reference-like baseline: every sampled token read back at once
        self.state = engine.new_state(slots, length, max_entries, max_tokens)
        self.slots: list[Slot | None] = [None] * slots
        self.lag = lag
        self.decoder = SlotDecoder(engine, slots, graphs) if decode_audio else None
        self._in_flight: deque[_InFlight] = deque()
        self._decoding: deque[_Delivery] = deque()
        self._ready: dict[Slot, Emitted] = {}
        self._graphs = None
        # Frames run for a few fixed shapes when they are captured or compiled (eagerly: exactly the rows up to
        # the last occupied one). Attention reads a few fixed cache lengths, except in compiled code, which
        # specialises on every shape: there it reads the whole cache rather than multiply compilations.
        self._batch_sizes = bucket_sizes(slots) if graphs or compile else list(range(1, slots + 1))
        self._kv_sizes = [length] if compile else kv_buckets(length)
        if compile:  # fuse the step's many small kernels; one compiled graph per shape
            import torch._dynamo.config

            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(self._batch_sizes))
            self._frame = torch.compile(self._frame, dynamic=False, fullgraph=True, mode="max-autotune-no-cudagraphs")
        if graphs:
            self._graphs = FrameGraphs(self._frame, self._batch_sizes, self._kv_sizes)

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
        self._check_fits(plan)
        engine, slot = self.engine, Slot(free[0], OutputWindow(plan), plan.start_frame + plan.slot_shift)
        self.slots[slot.row] = slot
        try:
            if self.decoder is not None:
                self.decoder.reset(slot.row)
            words = engine.start(self.state, slot.row, plan)
        except BaseException:
            self.slots[slot.row] = None  # the row is reset by the next join; never left to an orphan
            raise
        events = []
        for entry, frame in words:
            events += slot.window.add_word(entry, frame)
        # With a prefix, its frames before the start frame are finished before anything runs.
        count = plan.start_frame + 1 - engine.max_delay
        if count > 0:
            rows = torch.full((count,), slot.row, device=engine.device)
            tokens = engine.aligned_frames(self.state, rows, torch.arange(count, device=engine.device)).cpu()
            for index in range(count):
                events += slot.window.add_frame(index, tokens[index])
        if bool(engine.finished(self.state)[slot.row]):
            events += slot.window.finish()
            slot.finished = True
            self.leave(slot)
        self._emit({slot: events})
        self._deliver(wait=True)
        return slot, self._ready.pop(slot)

    def _check_fits(self, plan: GenerationPlan) -> None:
        """A generation larger than a slot fails as a bad request, before it takes one."""
        if plan.buffer_length > self.state.length:
            raise GenerationParamError(
                "prefix", f"the voice prefix needs {plan.buffer_length} frames of buffer; a slot holds "
                          f"{self.state.length} (MAX_PREFIX_AUDIO_S bounds it)")
        max_entries, max_tokens = self.state.text.capacity
        entries, tokens = plan.text.capacity
        if entries > max_entries or tokens > max_tokens:
            raise GenerationParamError(
                "text", f"the script and prefix words make {entries} words / {tokens} tokens; a slot holds "
                        f"{max_entries} / {max_tokens}")

    def leave(self, slot: Slot) -> None:
        """Free the slot's row now; its steps still in flight are dropped when they arrive."""
        if self.slots[slot.row] is slot:
            self.slots[slot.row] = None

    def step(self) -> dict[Slot, Emitted]:
        """Launch one frame for every row, collect the steps whose outputs have arrived (all but the last
        `lag`), and return what each slot produced that is complete with its PCM."""
        if self.active:
            self._launch()
        while self._in_flight and (len(self._in_flight) > self.lag or not self.active
                                   or self._in_flight[0].packed.ready()):
            self._emit(self._collect(self._in_flight.popleft()))
        self._deliver(wait=not self.active)
        ready, self._ready = self._ready, {}
        return ready

    def _frame(self, count: int, kv_len: int) -> torch.Tensor:
        """One frame for the first `count` rows, packed as the host reads it: [count, C + 5]."""
        out = self.engine.step(self.state.head(count), kv_len=kv_len, host_sync=self.host_sync)
        return torch.cat([out.frame_tokens, torch.stack(
            [out.frame_index, out.word_entry, out.first_word_frame, out.done.long(), out.frame], dim=1)], dim=1)

    def _launch(self) -> None:
        """Run the rows up to the last occupied one (new generations take the lowest free row), attention
        reading the shortest cache length that holds every occupied row's next slot."""
        active = self.active
        count = cover(self._batch_sizes, max(slot.row for slot in active) + 1)
        kv_len = cover(self._kv_sizes, max(slot.cache_slot for slot in active) + 1)
        for slot in active:
            slot.cache_slot = min(slot.cache_slot + 1, self.state.length - 1)
        packed = self._graphs.run(count, kv_len) if self._graphs else self._frame(count, kv_len)
        self._in_flight.append(_InFlight(HostCopy(packed), self.slots[: packed.shape[0]]))

    def _collect(self, launched: _InFlight) -> dict[Slot, list]:
        """A step's outputs -> each slot's new events; a finished slot leaves its row now."""
        C = self.engine.config.num_codebooks
        table = launched.packed.get().tolist()
        events: dict[Slot, list] = {}
        for row, slot in enumerate(launched.owners):
            if slot is None or slot.finished or self.slots[row] is not slot:
                continue
            index, word, first_word, done, frame = table[row][C:]
            window, slot_events = slot.window, []
            if word >= 0:
                slot_events += window.add_word(word, frame)
            if first_word != NOT_SET:
                slot_events += window.set_first_word_frame(first_word)
            if index >= 0:
                slot_events += window.add_frame(index, torch.tensor(table[row][:C]))
            if done:
                slot_events += window.finish()
                slot.finished = True
                self.leave(slot)
            events[slot] = slot_events
        return events

    def _emit(self, events: dict[Slot, list]) -> None:
        """Queue the decode of the new frames of every slot (one decoder call for all of them)."""
        frames = {slot.row: [e for e in slot_events if isinstance(e, AudioFrame)] for slot, slot_events in events.items()}
        audio = self.decoder.submit(frames) if self.decoder is not None else None
        self._decoding.append(_Delivery(events, audio, {slot: slot.finished for slot in events}))

    def _deliver(self, wait: bool) -> None:
        """Move decoded deliveries, in order, to the ready outputs (waiting for them all when `wait`, and for
        the oldest when more than `lag` are queued)."""
        while self._decoding and (wait or len(self._decoding) > self.lag or self._decoding[0].ready()):
            for slot, emitted in self._decoding.popleft().emitted().items():
                self._ready[slot] = _merge(self._ready[slot], emitted) if slot in self._ready else emitted


def _merge(first: Emitted, then: Emitted) -> Emitted:
    return Emitted(first.frames + then.frames, first.words + then.words, then.finished)


class GenerationStream:
    """One generation run eagerly in a batch of one, as an iterator of AudioFrame and Word events."""

    def __init__(self, engine: Dia2Engine, plan: GenerationPlan, decode_audio: bool) -> None:
        self.engine, self.plan, self.decode_audio = engine, plan, decode_audio
        self.timestamps: list[tuple[str, float]] = []

    def __iter__(self):
        plan = self.plan
        entries, tokens = plan.text.capacity
        runner = BatchRunner(self.engine, 1, plan.buffer_length, decode_audio=self.decode_audio,
                             max_entries=entries, max_tokens=tokens)
        slot, emitted = runner.join(plan)
        self.timestamps = slot.window.timestamps
        while True:
            yield from emitted.frames
            yield from emitted.words
            if emitted.finished:
                break
            emitted = runner.step().get(slot, Emitted())


Output = Emitted | BaseException


@dataclass(eq=False)
class Ticket:
    """A submitted generation. `on_output` is called on the scheduler thread with each step's Emitted, or
    with the exception that ended it; after a finished Emitted or an exception it is not called again."""

    plan: GenerationPlan
    on_output: Callable[[Output], None]
    deadline: float | None = None  # on time.monotonic(), counted from submission
    cancelled: bool = False
    started_at: float | None = None
    steps: int = 0  # frames stepped while it held a slot
    released: threading.Event = field(default_factory=threading.Event)
    """Set once the generation holds and awaits no slot any more (finished, failed, timed out or cancelled)."""

    def cancel(self) -> None:
        """Stop generating; the slot is freed before the next frame. Safe from any thread."""
        self.cancelled = True

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline

    def deliver(self, output: Output) -> None:
        """Hand over an output; a failing receiver is logged and never takes the scheduler thread down."""
        try:
            self.on_output(output)
        except Exception:
            log.exception("a job's output receiver failed")


class JobTimeout(TimeoutError):
    pass


class Scheduler:
    """Owns the engine on one thread: admits waiting generations into free slots between frames and steps
    all active ones together. Generations arrive planned (`engine.prepare`, on the submitter's thread)."""

    def __init__(self, engine: Dia2Engine, slots: int, length: int, *, decode_audio: bool = True,
                 lag: int = 0, graphs: bool = False, compile: bool = False) -> None:
        self.runner = BatchRunner(engine, slots, length, decode_audio=decode_audio, lag=lag, graphs=graphs,
                                  compile=compile)
        self.engine = engine
        self._waiting: deque[Ticket] = deque()
        self._running: dict[Slot, Ticket] = {}
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="dia2-scheduler", daemon=True)
        self._thread.start()
        # Stopped before the interpreter tears down: a thread still holding torch state while torch's own
        # thread pools are destroyed aborts the process.
        atexit.register(self.close)

    @property
    def slots(self) -> int:
        return len(self.runner.slots)

    def submit(self, plan: GenerationPlan, on_output: Callable[[Output], None],
               deadline: float | None = None) -> Ticket:
        ticket = Ticket(plan, on_output, deadline)
        with self._wake:
            if self._closed:
                raise RuntimeError("scheduler is closed")
            self._waiting.append(ticket)
            self._wake.notify()
        return ticket

    def close(self) -> None:
        """Stop the thread (after the step in progress); idempotent."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()
        atexit.unregister(self.close)

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
            if ticket.cancelled or ticket.expired(now):
                self.runner.leave(slot)
                del self._running[slot]
                ticket.released.set()
                if not ticket.cancelled:
                    ticket.deliver(JobTimeout("the job ran past its time limit"))

    def _admit(self) -> None:
        while self.runner.free_rows():
            with self._wake:
                if not self._waiting:
                    return
                ticket = self._waiting.popleft()
            if ticket.cancelled:
                ticket.released.set()
                continue
            if ticket.expired(time.monotonic()):
                ticket.released.set()
                ticket.deliver(JobTimeout("the job's time limit passed while it waited for a slot"))
                continue
            try:
                ticket.started_at = time.monotonic()
                slot, emitted = self.runner.join(ticket.plan)
            except Exception as exc:  # a bad request fails its own job only
                ticket.released.set()
                ticket.deliver(exc)
                continue
            if emitted.finished:
                ticket.released.set()
            else:
                self._running[slot] = ticket
            ticket.deliver(emitted)

    def _step(self) -> None:
        for ticket in self._running.values():
            ticket.steps += 1
        try:
            outputs = self.runner.step()
        except Exception as exc:  # the step itself failed: every running job fails, the worker stays up
            log.exception("generation step failed")
            for slot, ticket in self._running.items():
                self.runner.leave(slot)
                ticket.released.set()
                ticket.deliver(exc)
            self._running.clear()
            return
        for slot, emitted in outputs.items():
            ticket = self._running.get(slot)
            if ticket is None:
                continue
            if emitted.finished:
                del self._running[slot]
                ticket.released.set()
            if not ticket.cancelled:
                ticket.deliver(emitted)
