"""Many generations stepped together on one engine, one frame per step, synchronously.

`BatchRunner` is three parts around the engine's one-frame step:
- a slot table: which generation holds which row; generations join free rows and leave between frames;
- a frame executor, chosen once from a `RunMode`: frames run eagerly, captured as CUDA graphs, or compiled;
- a frame pipeline: step outputs read back asynchronously (at most `lag` steps in flight), frames decoded to
  PCM a step behind, and each generation's frames and words delivered in order through its `OutputWindow`.

A single generation is a runner with one row (`GenerationStream`, behind `Dia2Engine.stream`), so every path
produces tokens through the same code. The scheduler (scheduler.py) drives a runner from its own thread.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Protocol

import torch

from .generation import AudioFrame, Event, GenerationPlan, Word
from .graphs import FrameGraphs, bucket_sizes, capture, cover, kv_buckets
from .output import OutputWindow, RowOutput, StepOutput
from .params import GenerationParamError

MAX_DECODE_FRAMES = 32  # a backlog (a kept voice prefix) is decoded this many frames per call


class FrameEngine(Protocol):
    """What a runner needs of the engine (engine.Dia2Engine): its state, start and one-frame step."""

    config: Any
    codec: Any
    device: torch.device

    def new_state(self, batch: int, length: int, max_entries: int | None, max_tokens: int | None): ...

    def start(self, state, row: int, plan: GenerationPlan) -> tuple[list[tuple[int, int]], torch.Tensor]: ...

    def step(self, state, kv_len: int) -> StepOutput: ...

    def finished(self, state) -> torch.Tensor: ...


@dataclass(frozen=True)
class RunMode:
    """How a runner's frames run, chosen once: captured as CUDA graphs, compiled (fused kernels; captured too
    when `graphs`), or eagerly; and how many steps may be in flight before their outputs are read."""

    graphs: bool = False
    compile: bool = False
    lag: int = 0


@dataclass
class Emitted:
    """What one generation produced in one step: frames (with PCM when decoding), words, and whether it ended."""

    frames: list[AudioFrame] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)
    finished: bool = False

    def then(self, later: "Emitted") -> "Emitted":
        return Emitted(self.frames + later.frames, self.words + later.words, later.finished)


# ----------------------------------------------------------------------------------------- slot table

@dataclass(eq=False)
class Slot:
    """One generation occupying a row of the batch, from join until it finishes or leaves."""

    row: int
    window: OutputWindow
    cache_slot: int  # the cache slot its next frame writes (kept on the host to pick the length attention reads)
    finished: bool = False


class SlotTable:
    """Which generation holds which row. A reused row gets a new Slot, so outputs of steps launched for its
    previous holder are recognised by identity and dropped."""

    def __init__(self, rows: int) -> None:
        self.slots: list[Slot | None] = [None] * rows

    def free_rows(self) -> list[int]:
        return [row for row, slot in enumerate(self.slots) if slot is None]

    @property
    def active(self) -> list[Slot]:
        return [slot for slot in self.slots if slot is not None]

    def claim(self, plan: GenerationPlan) -> Slot:
        """The lowest free row, for `plan`."""
        free = self.free_rows()
        if not free:
            raise RuntimeError("no free slot")
        slot = Slot(free[0], OutputWindow(plan), plan.start_frame + plan.slot_shift)
        self.slots[slot.row] = slot
        return slot

    def holds(self, slot: Slot) -> bool:
        return self.slots[slot.row] is slot

    def leave(self, slot: Slot) -> None:
        if self.holds(slot):
            self.slots[slot.row] = None

    def owners(self, count: int) -> list[Slot | None]:
        return self.slots[:count]


# ----------------------------------------------------------------------------------------- frame executors

class EagerFrames:
    """Frames run as they are called (ordinary kernels, or compiled ones), for the given batch sizes (all of
    them when eager: exactly the rows up to the last occupied one) and cache lengths."""

    def __init__(self, frame: Callable[[int, int], torch.Tensor], batch_sizes: list[int], kv_sizes: list[int]) -> None:
        self.frame, self.batch_sizes, self.kv_sizes = frame, batch_sizes, kv_sizes

    def run(self, count: int, kv_len: int) -> torch.Tensor:
        return self.frame(count, kv_len)


def frame_executor(frame: Callable[[int, int], torch.Tensor], mode: RunMode, slots: int,
                   length: int) -> EagerFrames | FrameGraphs:
    """The executor for `mode`. Captured and compiled frames run for a few fixed batch sizes; attention reads
    a few fixed cache lengths, except in compiled code, which specialises on every shape: there it reads the
    whole cache rather than multiply compilations."""
    batch_sizes = bucket_sizes(slots) if mode.graphs or mode.compile else list(range(1, slots + 1))
    kv_sizes = [length] if mode.compile else kv_buckets(length)
    if mode.compile:
        frame = compiled(frame, len(batch_sizes) * len(kv_sizes))
    if mode.graphs:
        return FrameGraphs(frame, batch_sizes, kv_sizes)
    return EagerFrames(frame, batch_sizes, kv_sizes)


def compiled(call: Callable[..., torch.Tensor], shapes: int) -> Callable[..., torch.Tensor]:
    """`call` with its many small kernels fused by torch.compile into one graph. The first batch size gets a
    graph of its own, the second a graph with a symbolic batch that then serves every other size, so a bake
    that runs batches 1 and 2 compiles all the serving path needs. The recompile limit is raised for these
    calls only, not for the process."""
    import torch._dynamo.config

    fused = torch.compile(call, fullgraph=True)

    def run(*args: Any) -> torch.Tensor:
        with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, shapes)):
            return fused(*args)

    return run


# ----------------------------------------------------------------------------------------- frame pipeline

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
    per row is the captured graph, compiled first with `compile`; a backlog, like a kept voice prefix, goes in
    chunks). Codes go in and PCM comes out without the host waiting on the device."""

    def __init__(self, engine: FrameEngine, slots: int, graphs: bool, compile: bool = False) -> None:
        codec = engine.codec
        self.frame_size = codec.frame_size
        self.decoder = codec.streaming_decoder(slots)
        self.codes = torch.zeros(slots, engine.config.num_codebooks, 1, dtype=torch.long, device=codec.device)
        self.active = torch.zeros(slots, dtype=torch.bool, device=codec.device)
        one_frame = self._one_frame = compiled(self._call, 1) if compile else self._call
        if graphs:  # warm-up and capture run with no row active, so they change no state
            def decode() -> torch.Tensor:
                with torch.inference_mode():
                    return one_frame(self.codes, self.active)

            replay, output = capture(decode)
            self._one_frame = lambda codes, active: (replay(), output)[1]

    def _call(self, codes: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Callers are in inference mode: compiled code cannot enter it around the decoder's state updates."""
        return self.decoder.decode_step(codes, active).flatten(1).float()

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


@dataclass
class _InFlight:
    """A launched step whose outputs are on their way to the host."""

    packed: HostCopy                # [B, C + 5], see output.StepOutput.pack
    owners: list[Slot | None]       # who held each row when the step was launched


@dataclass
class _Delivery:
    """What collected steps produced, waiting for the PCM of their frames."""

    events: dict[Slot, list[Event]]
    audio: PendingAudio | None
    finished: dict[Slot, bool]  # as of these events

    def ready(self) -> bool:
        return self.audio is None or self.audio.ready()

    def emitted(self) -> dict[Slot, Emitted]:
        frames = self.audio.result() if self.audio is not None else {
            slot.row: [e for e in events if isinstance(e, AudioFrame)] for slot, events in self.events.items()}
        return {slot: Emitted(frames[slot.row], [e for e in events if isinstance(e, Word)], self.finished[slot])
                for slot, events in self.events.items()}


class FramePipeline:
    """Launched steps on their way to the generations that own their rows, in order.

    At most `lag` steps stay in flight, their outputs copied to the host asynchronously, so the device never
    waits on the host; decoding to PCM is queued the same way, a step behind. Rows are tagged with the slot
    that held them at launch, so a slot freed and reused in between cannot receive stale frames; a finished
    slot leaves the table as soon as its last step is read.
    """

    def __init__(self, table: SlotTable, decoder: SlotDecoder | None, lag: int, codebooks: int) -> None:
        self.table, self.decoder, self.lag, self.codebooks = table, decoder, lag, codebooks
        self._in_flight: deque[_InFlight] = deque()
        self._decoding: deque[_Delivery] = deque()
        self._ready: dict[Slot, Emitted] = {}

    def launched(self, packed: torch.Tensor) -> None:
        self._in_flight.append(_InFlight(HostCopy(packed), self.table.owners(packed.shape[0])))

    def advance(self, busy: bool) -> dict[Slot, Emitted]:
        """Read the steps that are due (all but the last `lag`, or every one when nothing runs any more), queue
        their decode, and hand over what is complete with its PCM."""
        while self._in_flight and (len(self._in_flight) > self.lag or not busy or self._in_flight[0].packed.ready()):
            self.emit(self._collect(self._in_flight.popleft()))
        self.deliver(wait=not busy)
        ready, self._ready = self._ready, {}
        return ready

    def take(self, slot: Slot) -> Emitted:
        return self._ready.pop(slot)

    def _collect(self, launched: _InFlight) -> dict[Slot, list[Event]]:
        """A step's outputs -> each slot's new events; a finished slot leaves its row now."""
        table = launched.packed.get().tolist()
        events: dict[Slot, list[Event]] = {}
        for row, slot in enumerate(launched.owners):
            if slot is None or slot.finished or not self.table.holds(slot):
                continue
            out = RowOutput.unpack(table[row], self.codebooks)
            events[slot] = slot.window.add_step(out)
            if out.done:
                slot.finished = True
                self.table.leave(slot)
        return events

    def emit(self, events: dict[Slot, list[Event]]) -> None:
        """Queue the decode of the new frames of every slot (one decoder call for all of them)."""
        frames = {slot.row: [e for e in evs if isinstance(e, AudioFrame)] for slot, evs in events.items()}
        audio = self.decoder.submit(frames) if self.decoder is not None else None
        self._decoding.append(_Delivery(events, audio, {slot: slot.finished for slot in events}))

    def deliver(self, wait: bool) -> None:
        """Move decoded deliveries, in order, to the ready outputs (waiting for them all when `wait`, and for
        the oldest when more than `lag` are queued)."""
        while self._decoding and (wait or len(self._decoding) > self.lag or self._decoding[0].ready()):
            for slot, emitted in self._decoding.popleft().emitted().items():
                self._ready[slot] = self._ready[slot].then(emitted) if slot in self._ready else emitted


# ----------------------------------------------------------------------------------------- the runner

class BatchRunner:
    """Steps `slots` generation rows of one preallocated state. Not thread-safe: one owner drives it.

    A finished row keeps stepping (its outputs are ignored) until the host has seen it finish.
    """

    def __init__(self, engine: FrameEngine, slots: int, length: int, *, decode_audio: bool,
                 mode: RunMode = RunMode(), max_entries: int | None = None, max_tokens: int | None = None) -> None:
        self.engine = engine
        self.state = engine.new_state(slots, length, max_entries, max_tokens)
        self.table = SlotTable(slots)
        self.decoder = SlotDecoder(engine, slots, mode.graphs, mode.compile) if decode_audio else None
        self.pipeline = FramePipeline(self.table, self.decoder, mode.lag, engine.config.num_codebooks)
        self.executor = frame_executor(self._frame, mode, slots, length)

    @property
    def slots(self) -> int:
        return len(self.table.slots)

    @property
    def active(self) -> list[Slot]:
        return self.table.active

    def free_rows(self) -> list[int]:
        return self.table.free_rows()

    def leave(self, slot: Slot) -> None:
        """Free the slot's row now; its steps still in flight are dropped when they arrive."""
        self.table.leave(slot)

    def join(self, plan: GenerationPlan) -> tuple[Slot, Emitted]:
        """Start `plan` in a free row (its voice prefix is prefilled now); returns its slot and first output."""
        self._check_fits(plan)
        slot = self.table.claim(plan)
        try:
            if self.decoder is not None:
                self.decoder.reset(slot.row)
            words, frames = self.engine.start(self.state, slot.row, plan)
        except BaseException:
            self.table.leave(slot)  # the row is reset by the next join; never left to an orphan
            raise
        events = slot.window.start(words, frames)
        if bool(self.engine.finished(self.state)[slot.row]):
            events += slot.window.finish()
            slot.finished = True
            self.table.leave(slot)
        self.pipeline.emit({slot: events})
        self.pipeline.deliver(wait=True)
        return slot, self.pipeline.take(slot)

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

    def step(self) -> dict[Slot, Emitted]:
        """Launch one frame for every row, and return what each slot produced that is complete with its PCM."""
        if self.active:
            self._launch()
        return self.pipeline.advance(busy=bool(self.active))

    def _frame(self, count: int, kv_len: int) -> torch.Tensor:
        """One frame for the first `count` rows, packed for one readback."""
        return self.engine.step(self.state.head(count), kv_len=kv_len).pack()

    def _launch(self) -> None:
        """Run the rows up to the last occupied one (new generations take the lowest free row), attention
        reading the shortest cache length that holds every occupied row's next slot."""
        active, executor = self.active, self.executor
        count = cover(executor.batch_sizes, max(slot.row for slot in active) + 1)
        kv_len = cover(executor.kv_sizes, max(slot.cache_slot for slot in active) + 1)
        for slot in active:
            slot.cache_slot = min(slot.cache_slot + 1, self.state.length - 1)
        self.pipeline.launched(executor.run(count, kv_len))


class GenerationStream:
    """One generation run eagerly in a batch of one, as an iterator of AudioFrame and Word events; its
    `timestamps` are complete once it is exhausted."""

    def __init__(self, engine: FrameEngine, plan: GenerationPlan, decode_audio: bool) -> None:
        self.engine, self.plan, self.decode_audio = engine, plan, decode_audio
        self.timestamps: list[tuple[str, float]] = []

    def __iter__(self) -> Iterator[Event]:
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
