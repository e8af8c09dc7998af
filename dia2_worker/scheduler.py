"""The scheduler thread: generations wait in submission order, join a BatchRunner's free slots between frames,
and are stepped together on the one thread that owns the device; tickets carry cancellation and deadlines."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .batch import BatchRunner, Emitted, RunMode, Slot
from .engine import Dia2Engine
from .generation import GenerationPlan

__all__ = ["BatchRunner", "Emitted", "JobTimeout", "Output", "RunMode", "Scheduler", "Slot", "Ticket"]

log = logging.getLogger("dia2_worker.scheduler")


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
                 mode: RunMode = RunMode()) -> None:
        self.runner = BatchRunner(engine, slots, length, decode_audio=decode_audio, mode=mode)
        self.engine = engine
        self._waiting: deque[Ticket] = deque()
        self._running: dict[Slot, Ticket] = {}
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="dia2-scheduler", daemon=True)
        self._thread.start()

    @property
    def slots(self) -> int:
        return self.runner.slots

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
