"""Many generations in one batch: jobs joining and leaving between frames give exactly the tokens each job
gives alone; cancelled and timed-out jobs free their slot without disturbing the others."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch

from dia2_worker.engine import (AudioFrame, GenerationParamError, GenerationParams, GenerationRequest, PrefixSpeech,
                                VoicePrefix)
from dia2_worker.batch import BatchRunner, Emitted, RunMode
from dia2_worker.scheduler import JobTimeout, Scheduler

REQUESTS = [
    GenerationRequest("[S1] hello world this is a test [S2] how are you",
                      GenerationParams(text_temperature=0, audio_temperature=0, cfg_scale=3.0)),
    GenerationRequest("[S2] I am fine today, thanks world", GenerationParams(seed=5)),
    GenerationRequest('[S1] hello. [S2] fine thanks! <break time="0.5s"/> [S1] good: the quick brown fox',
                      GenerationParams(seed=11, cfg_scale=1.0, audio_top_k=5, text_top_k=1)),
    GenerationRequest("[S1] the lazy dog", GenerationParams(seed=12, max_frames=40, audio_temperature=1.2)),
    GenerationRequest("[S2] go", GenerationParams(text_temperature=0, audio_temperature=0, cfg_filter_k=3,
                                                  initial_padding=0)),
]


def alone(engine, request: GenerationRequest) -> torch.Tensor:
    return engine.generate(request).tokens


@pytest.fixture(scope="module")
def solo(engine) -> list[torch.Tensor]:
    return [alone(engine, request) for request in REQUESTS]


@pytest.mark.parametrize("lag", [0, 2])
def test_jobs_joining_and_leaving_match_jobs_run_alone(engine, solo, lag):
    plans = [engine.prepare(request) for request in REQUESTS]
    runner = BatchRunner(engine, 3, max(p.buffer_length for p in plans), decode_audio=False, mode=RunMode(lag=lag))
    join_at = [0, 3, 7, 8, 9]  # more jobs than slots: later ones wait for a slot to free up
    frames: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(plans))}
    job_of, waiting, finished, step = {}, list(range(len(plans))), set(), 0
    while len(finished) < len(plans):
        for i in list(waiting):
            if join_at[i] <= step and runner.free_rows():
                slot, emitted = runner.join(plans[i])
                job_of[slot] = i
                waiting.remove(i)
                frames[i] += [f.tokens for f in emitted.frames]
        for slot, emitted in runner.step().items():
            frames[job_of[slot]] += [f.tokens for f in emitted.frames]
            if emitted.finished:
                finished.add(job_of[slot])
        step += 1
    for i, expected in enumerate(solo):
        assert torch.equal(torch.stack(frames[i], dim=1), expected), f"job {i}"


class Collector:
    """What the scheduler thread delivered to one job. `at_first_frames` runs on the scheduler thread when the
    first frames arrive (before the next frame runs); `log` records (collector, frames so far) per delivery, in
    the order the scheduler thread made them."""

    def __init__(self, log: list | None = None, at_first_frames: Callable[[], None] | None = None) -> None:
        self.frames: list[AudioFrame] = []
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.log, self.at_first_frames = log, at_first_frames

    def __call__(self, out: Emitted | BaseException) -> None:
        if isinstance(out, BaseException):
            self.error = out
            self.done.set()
            return
        first = out.frames and not self.frames
        self.frames += out.frames
        if self.log is not None:
            self.log.append((self, len(self.frames)))
        if first and self.at_first_frames is not None:
            self.at_first_frames()
        if out.finished:
            self.done.set()

    @property
    def tokens(self) -> torch.Tensor:
        return torch.stack([f.tokens for f in self.frames], dim=1)


def test_scheduler_runs_queued_jobs_and_a_cancelled_job_frees_its_slot(engine, solo):
    scheduler = Scheduler(engine, 2, engine.buffer_length(), decode_audio=True)
    try:
        log: list = []
        tickets, submitted = [], threading.Event()

        def cancel_job_1() -> None:  # at its first frames, so it cannot finish first
            submitted.wait()
            tickets[1].cancel()  # job 1 is running: its slot must go to the next job in line

        collectors = [Collector(log, cancel_job_1 if i == 1 else None) for i in range(len(REQUESTS))]
        tickets += [scheduler.submit(engine.prepare(r), c) for r, c in zip(REQUESTS, collectors)]
        submitted.set()
        for i, collector in enumerate(collectors):
            if i != 1:
                assert collector.done.wait(60), f"job {i} did not finish"
                assert collector.error is None
                assert torch.equal(collector.tokens, solo[i]), f"job {i}"
                assert all(f.pcm is not None and f.pcm.shape == (1920,) for f in collector.frames)
        assert not collectors[1].done.is_set()
        assert len(collectors[1].frames) < solo[1].shape[1]
        assert all(t.started_at is not None for t in tickets)
        # Job 2 waited for a slot; it got job 1's before the next frame (job 0 gets at most the rest of the
        # frame job 1 was cancelled in), while job 0 was still running.
        jobs = [collectors.index(collector) for collector, _ in log]
        cancelled, joined = len(jobs) - 1 - jobs[::-1].index(1), jobs.index(2)  # job 1's last delivery cancelled it
        assert cancelled < joined and jobs[cancelled + 1: joined].count(0) <= 1
        assert 0 in jobs[joined:]
        assert tickets[2].started_at < tickets[3].started_at
    finally:
        scheduler.close()


def test_streamed_pcm_matches_the_offline_decode(engine):
    scheduler = Scheduler(engine, 1, engine.buffer_length(), decode_audio=True)
    try:
        collector = Collector()
        scheduler.submit(engine.prepare(REQUESTS[0]), collector)
        assert collector.done.wait(60)
    finally:
        scheduler.close()
    pcm = torch.cat([torch.from_numpy(f.pcm) for f in collector.frames])
    offline = engine.codec.decode(collector.tokens.unsqueeze(0))[0, 0]
    assert (pcm - offline).abs().max() < 1e-4


def test_failures_and_timeouts_fail_only_their_job_and_free_the_slot(engine, solo, monkeypatch):
    scheduler = Scheduler(engine, 1, engine.buffer_length(), decode_audio=False)  # one slot: a leak would hang
    try:
        tickets, submitted = [], threading.Event()

        def run_past_the_limit() -> None:  # at its first frames, on the scheduler thread: stopped within a frame
            submitted.wait()
            tickets[0].deadline = time.monotonic() - 1

        too_big, broken, queued, good = (Collector() for _ in range(4))
        running = Collector(at_first_frames=run_past_the_limit)
        long_script = GenerationRequest("[S1] " + " ".join(["hi"] * 3000), GenerationParams(max_frames=None))
        huge = engine.check  # planning skips the context check here, to build a plan larger than a slot
        monkeypatch.setattr(engine, "check", lambda r: (r.params, huge(REQUESTS[4])[1] * 600, 160))
        scheduler.submit(engine.prepare(long_script), too_big)
        monkeypatch.undo()
        failing = engine.prepare(REQUESTS[3])
        start = engine.start
        monkeypatch.setattr(engine, "start", lambda state, row, plan: (_ for _ in ()).throw(RuntimeError("oom"))
                            if plan is failing else start(state, row, plan))
        scheduler.submit(failing, broken)
        scheduler.submit(engine.prepare(REQUESTS[1]), queued, deadline=time.monotonic() - 1)
        tickets.append(scheduler.submit(engine.prepare(REQUESTS[2]), running))
        submitted.set()
        scheduler.submit(engine.prepare(REQUESTS[4]), good)
        for collector in (too_big, broken, queued, running, good):
            assert collector.done.wait(60)
        assert isinstance(too_big.error, GenerationParamError) and too_big.error.param == "text"
        assert str(broken.error) == "oom"
        assert isinstance(queued.error, JobTimeout) and "waited" in str(queued.error) and not queued.frames
        assert isinstance(running.error, JobTimeout) and "ran past" in str(running.error)
        assert good.error is None and torch.equal(good.tokens, solo[4])
    finally:
        scheduler.close()


def test_a_step_runs_only_the_rows_up_to_the_last_occupied_one(engine):
    from dia2_worker.graphs import bucket_sizes

    assert bucket_sizes(1) == [1] and bucket_sizes(8) == [1, 2, 4, 8] and bucket_sizes(6) == [1, 2, 4, 6]
    plan = engine.prepare(REQUESTS[0])
    runner = BatchRunner(engine, 4, plan.buffer_length, decode_audio=False)
    first, _ = runner.join(plan)
    second, _ = runner.join(plan)
    runner.leave(first)  # row 0 free again, row 1 still running: rows 0 and 1 step, rows 2 and 3 do not
    before = runner.state.frame.clone()
    cache_before = runner.state.cache.keys[:, 4:].clone()
    runner.step()
    assert runner.state.frame.tolist() == [before[0] + 1, before[1] + 1, before[2], before[3]]
    assert torch.equal(runner.state.cache.keys[:, 4:], cache_before)
    assert second.row == 1 and runner.free_rows() == [0, 2, 3]


def test_late_pcm_keeps_every_slots_output_in_order(engine, solo, monkeypatch):
    """As on a GPU, where decoded audio arrives a few steps late: deliveries wait for their PCM in order."""
    from dia2_worker import batch

    monkeypatch.setattr(batch.PendingAudio, "ready", lambda self: False)  # never early: only when forced
    plans = [engine.prepare(request) for request in REQUESTS[:3]]
    runner = BatchRunner(engine, 2, max(p.buffer_length for p in plans), decode_audio=True, mode=RunMode(lag=2))
    outputs: dict[int, list[Emitted]] = {i: [] for i in range(3)}
    job_of, waiting = {}, [0, 1, 2]
    while waiting or any(not out or not out[-1].finished for out in outputs.values()):
        while waiting and runner.free_rows():
            slot, emitted = runner.join(plans[waiting[0]])
            job_of[slot] = waiting.pop(0)
            outputs[job_of[slot]].append(emitted)
        for slot, emitted in runner.step().items():
            assert not outputs[job_of[slot]][-1].finished, "nothing may follow a finished output"
            outputs[job_of[slot]].append(emitted)
    for i, emitted in outputs.items():
        frames = [f for e in emitted for f in e.frames]
        assert torch.equal(torch.stack([f.tokens for f in frames], dim=1), solo[i])
        assert all(f.pcm is not None for f in frames)
        assert [e.finished for e in emitted] == [False] * (len(emitted) - 1) + [True]


def test_attention_reads_the_cache_in_whole_blocks_with_unchanged_tokens(engine, tiny_dir, monkeypatch):
    """A 40 s voice prefix starts a generation near the end of the first 512-slot block, beside a short one at
    slot 0: attention reads 512 slots, the whole cache once the long one crosses, 512 again once it has
    left, and both generations get the tokens of always reading the whole cache."""
    import soundfile

    from dia2_worker import batch, graphs

    assert graphs.kv_buckets(161) == [161] and graphs.kv_buckets(1501) == [512, 1024, 1501]
    samples, rate = soundfile.read(tiny_dir / "prefix_s1.wav", dtype="float32")
    words = json.loads((tiny_dir / "prefix_s1.words.json").read_text())["words"]
    seconds = len(samples) / rate
    speech = PrefixSpeech(np.tile(samples, 20), rate, tuple((w, a + i * seconds, b + i * seconds)
                                                            for i in range(20) for w, a, b in words))
    plans = [engine.prepare(GenerationRequest("[S2] and then what happened next?", GenerationParams(seed=3),
                                              VoicePrefix(speech))),
             engine.prepare(REQUESTS[0])]
    assert 480 < plans[0].start_frame < 505
    length = max(p.buffer_length for p in plans)
    read: list[int] = []
    step = engine.step

    def recording_step(state, kv_len):
        read.append(kv_len)
        return step(state, kv_len)

    def run() -> list[torch.Tensor]:
        runner = BatchRunner(engine, 2, length, decode_audio=False)
        slots = [runner.join(plan)[0] for plan in plans]
        frames = {slot: [] for slot in slots}
        while not all(slot.finished for slot in slots):
            for slot, emitted in runner.step().items():
                frames[slot] += [f.tokens for f in emitted.frames]
        return [torch.stack(frames[slot], dim=1) for slot in slots]

    monkeypatch.setattr(engine, "step", recording_step)
    blocks = run()
    assert 512 < length < 1024 and read[0] == 512 and read[-1] == 512 and length in read
    monkeypatch.setattr(batch, "kv_buckets", lambda length: [length])
    read.clear()
    whole = run()
    assert set(read) == {length}
    assert all(torch.equal(a, b) for a, b in zip(blocks, whole))


def test_random_jobs_joining_at_random_frames_match_jobs_run_alone(engine):
    """Twelve jobs of random scripts and parameters (greedy and sampled, several CFG scales) join four slots
    at random frames: rows are reused and batch sizes change all the time, and every job still gets its tokens
    alone."""
    import random

    rng = random.Random(7)
    words = "hello world this is a test how are you fine thanks the quick brown fox jumps over lazy dog".split()
    plans = []
    for _ in range(12):
        script = " ".join(f"[S{rng.randint(1, 2)}] " + " ".join(rng.choices(words, k=rng.randint(1, 5)))
                          for _ in range(rng.randint(1, 3)))
        greedy = rng.random() < 0.4
        params = GenerationParams(seed=rng.randint(0, 10**6), cfg_scale=rng.choice([1.0, 2.0, 3.0]),
                                  text_temperature=0 if greedy else 0.7, audio_temperature=0 if greedy else 1.0)
        plans.append(engine.prepare(GenerationRequest(script, params)))
    runner = BatchRunner(engine, 4, max(p.buffer_length for p in plans), decode_audio=False)
    frames: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(plans))}
    job_of, waiting, finished, sizes = {}, list(range(len(plans))), set(), set()
    while len(finished) < len(plans):
        if waiting and runner.free_rows() and rng.random() < 0.3:
            slot, emitted = runner.join(plans[waiting[0]])
            job_of[slot] = waiting.pop(0)
            frames[job_of[slot]] += [f.tokens for f in emitted.frames]
        sizes.add(len(runner.active))
        for slot, emitted in runner.step().items():
            frames[job_of[slot]] += [f.tokens for f in emitted.frames]
            if emitted.finished:
                finished.add(job_of[slot])
    assert {1, 2, 3, 4} <= sizes
    for i, plan in enumerate(plans):
        assert torch.equal(torch.stack(frames[i], dim=1), engine.generate(plan).tokens), f"job {i}"
