"""The worker process: settings from the environment, the model loaded and warmed once, jobs delegated.

`handler.py` calls `start_loading` before importing the RunPod SDK, so reading weights and warming up
overlap the SDK's slow import; `WorkerService.handle` is the async generator RunPod drives per job.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Mapping

from .env import Range, WorkerConfigError, env_auto_flag, env_flag, env_number
from .jobs import WorkerLimits
from .timing import PHASES, cpu_name

log = logging.getLogger("dia2_worker")

WARMUP_SCRIPT = "[S1] Warming up. [S2] Ready."
WARMUP_CPU_STEPS = 3
MAX_SLOTS = 1024


@dataclass(frozen=True)
class WorkerSettings:
    model_dir: Path
    """MODEL_DIR: the model directory (config.json, weights, tokenizer, mimi/)."""
    device: str
    """DEVICE: cuda when available, else cpu."""
    dtype: str
    """DTYPE: bfloat16 on CUDA, float32 on CPU."""
    slots: int | None
    """SLOTS: generations stepped together; default from free GPU memory (1 on CPU)."""
    max_concurrency: int | None
    """MAX_CONCURRENCY: jobs RunPod hands this worker at once (default: SLOTS); extra ones wait in order."""
    cuda_graphs: bool
    """CUDA_GRAPHS: capture each frame as one CUDA graph (default on for CUDA)."""
    torch_compile: bool | None
    """TORCH_COMPILE: fuse the frame's kernels with torch.compile. auto (None, the default): on when the model
    directory holds a compile cache made for this device and these settings (compile_cache.py), so the start
    compiles nothing; else off, since compiling at start takes minutes. true forces it, false turns it off."""
    job_timeout_s: float | None
    """JOB_TIMEOUT_S: stop a job not finished this long after it arrived, queueing included (default: none)."""
    inline_audio_max_bytes: int
    """INLINE_AUDIO_MAX_BYTES: largest WAV returned inline when the upload fails for good (8 MiB)."""
    upload_timeout_s: float
    """UPLOAD_TIMEOUT_S: most time one job's upload may take, retries included (60 s)."""
    spool_max_bytes: int
    """SPOOL_MAX_BYTES: most disk the spool of un-uploadable WAVs takes, oldest deleted first (2 GiB)."""
    log_level: str
    """LOG_LEVEL: DEBUG, INFO (default), WARNING, ERROR."""
    asr_model_dir: Path
    """ASR_MODEL_DIR: the speech recognition model that finds a voice prefix's words when a job sends none
    (default: <MODEL_DIR>/asr, where bake_weights.py --asr puts it)."""
    asr_preload: bool
    """ASR_PRELOAD: load it at start instead of on the first job that needs it (default off)."""
    voice_cache_entries: int
    """VOICE_CACHE_ENTRIES: recordings whose transcribed words and Mimi codes are kept (LRU, default 256)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "WorkerSettings":
        """The settings, each variable checked: a mistake raises WorkerConfigError naming the variable."""
        from . import cli

        device = env.get("DEVICE") or _default_device()
        model_dir = Path(env.get("MODEL_DIR") or "/models/dia2")
        try:
            cli.device(device, "DEVICE")
            cli.model_dir(model_dir, "MODEL_DIR")
        except cli.UsageError as exc:
            raise WorkerConfigError(str(exc)) from None
        dtype = env.get("DTYPE") or ("bfloat16" if device.startswith("cuda") else "float32")
        if dtype not in ("float32", "bfloat16"):
            raise WorkerConfigError(f"DTYPE: must be float32 or bfloat16, got {dtype!r}")
        log_level = (env.get("LOG_LEVEL") or "INFO").upper()
        if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise WorkerConfigError(f"LOG_LEVEL: must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
        model_dir = Path(env.get("MODEL_DIR") or "/models/dia2")
        return cls(
            model_dir=model_dir,
            device=device,
            dtype=dtype,
            slots=env_number(env, "SLOTS", int, Range(1, MAX_SLOTS), None),
            max_concurrency=env_number(env, "MAX_CONCURRENCY", int, Range(1, 4096), None),
            cuda_graphs=env_flag(env, "CUDA_GRAPHS", device.startswith("cuda")),
            torch_compile=env_auto_flag(env, "TORCH_COMPILE"),
            job_timeout_s=env_number(env, "JOB_TIMEOUT_S", float, Range(1.0, 86400.0), None),
            inline_audio_max_bytes=env_number(env, "INLINE_AUDIO_MAX_BYTES", int, Range(0, 64 * 1024 * 1024),
                                              8 * 1024 * 1024),
            upload_timeout_s=env_number(env, "UPLOAD_TIMEOUT_S", float, Range(1.0, 3600.0), 60.0),
            spool_max_bytes=env_number(env, "SPOOL_MAX_BYTES", int, Range(0), 2 * 1024**3),
            log_level=log_level,
            asr_model_dir=Path(env.get("ASR_MODEL_DIR") or model_dir / "asr"),
            asr_preload=env_flag(env, "ASR_PRELOAD", False),
            voice_cache_entries=env_number(env, "VOICE_CACHE_ENTRIES", int, Range(0, 1_000_000), 256),
        )


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _init_cuda(device: str) -> None:
    import torch

    with PHASES.phase("cuda context"):
        torch.empty(1, device=device)


class WorkerService:
    """A loaded, warmed model behind a scheduler, and the per-job entry point RunPod calls."""

    def __init__(self, settings: WorkerSettings, runner, scheduler, compiling: bool = False) -> None:
        self.settings, self.runner, self.scheduler = settings, runner, scheduler
        self.max_concurrency = settings.max_concurrency or scheduler.slots
        self.compiling = compiling
        """Whether frames run torch.compile'd code (TORCH_COMPILE, decided in `serving`)."""

    @classmethod
    def load(cls, env: Mapping[str, str]) -> "WorkerService":
        """Everything before the first job: settings, weights, codec, storage, scheduler, warm-up."""
        with PHASES.phase("import torch"):
            import torch

        with PHASES.phase("import dia2_worker"):  # the whole job path: later phases time work, not imports
            from . import runner, scheduler  # noqa: F401
            from .engine import Dia2Engine
            from .storage import StorageSettings, make_storage

        started = time.monotonic()
        settings = WorkerSettings.from_env(env)
        if settings.device.startswith("cuda"):  # the CUDA context, while files are read
            threading.Thread(target=_init_cuda, args=(settings.device,), name="dia2-cuda-init", daemon=True).start()
        logging.getLogger("dia2_worker").setLevel(settings.log_level)
        limits = WorkerLimits.from_env(env)
        storage_settings = StorageSettings.from_env(env)
        # The S3 client (boto3's import alone is ~0.3 s) is built beside the model load.
        storage_future = ThreadPoolExecutor(1, thread_name_prefix="dia2-storage").submit(make_storage, storage_settings)
        engine = Dia2Engine.load(settings.model_dir, device=settings.device, dtype=getattr(torch, settings.dtype))
        service = cls.serving(engine, env, settings, limits, storage_future.result, storage_settings.output_dir)
        before = service.compile_tally() if service.compiling else None
        with PHASES.phase("warm-up"):
            service.warm_up()
        compiled = "off" if before is None else f"on: {(service.compile_tally() - before).describe()}"
        log.info("ready %.2f s after the process started (loading took %.2f s): %s on %s (%s), %d slots, "
                 "concurrency %d, torch.compile %s", PHASES.now(), time.monotonic() - started,
                 settings.model_dir, settings.device, settings.dtype, service.scheduler.slots, service.max_concurrency,
                 compiled)
        return service

    @classmethod
    def serving(cls, engine, env: Mapping[str, str], settings: WorkerSettings, limits: WorkerLimits,
                storage: Callable[[], Any], output_dir: Path) -> "WorkerService":
        """A loaded engine behind a scheduler and the job runner, not yet warmed up; `storage()` gives the
        storage client (built beside the model load). The scheduler's thread is stopped at exit, before
        torch's thread pools are torn down (a thread still holding torch state then aborts the process)."""
        from .asr import AsrUnavailable, VoiceCache, VoicePrefixes, WhisperTranscriber
        from .runner import JobRunner, RunnerSettings
        from .scheduler import RunMode, Scheduler

        voices = VoiceCache(settings.voice_cache_entries)
        transcriber = WhisperTranscriber(settings.asr_model_dir, settings.device)
        if settings.asr_preload:
            with PHASES.phase("speech recognition model"):
                try:
                    transcriber.load()
                except AsrUnavailable as exc:
                    raise WorkerConfigError(f"ASR_PRELOAD: {exc}") from None

        frame_rate = engine.codec.frame_rate
        max_duration = engine.config.runtime.max_context_steps / frame_rate
        if limits.max_duration_s > max_duration:
            if env.get("MAX_DURATION_S"):
                raise WorkerConfigError(f"MAX_DURATION_S: the model's context holds at most {max_duration:g} s, "
                                        f"got {limits.max_duration_s:g}")
            limits = replace(limits, max_duration_s=max_duration)
        # Two prefix speakers of the longest allowed audio (a partial frame still takes a frame).
        length = engine.buffer_length(prefix_frames=2 * (math.ceil(limits.max_prefix_audio_s * frame_rate) + 1))
        slots = settings.slots or default_slots(engine, length)
        compiling, slots = choose_compile(settings, engine, slots, length)
        log.info("slots: %d generations of up to %d frames, %.1f MiB of cache each", slots, length,
                 slot_bytes(engine, length) / 2**20)
        with PHASES.phase("scheduler (caches, graphs)"):
            mode = RunMode(graphs=settings.cuda_graphs, compile=compiling, lag=2 if settings.cuda_graphs else 0)
            scheduler = Scheduler(engine, slots, length, decode_audio=True, mode=mode)
        atexit.register(scheduler.close)
        runner = JobRunner(scheduler, storage(), limits, RunnerSettings(
            inline_audio_max_bytes=settings.inline_audio_max_bytes,
            spool_dir=output_dir / "spool",
            job_timeout_s=settings.job_timeout_s,
            upload_timeout_s=settings.upload_timeout_s,
            spool_max_bytes=settings.spool_max_bytes,
        ), VoicePrefixes(voices, transcriber))
        return cls(settings, runner, scheduler, compiling)

    def warm_up(self) -> None:
        """A generation through the whole path before any job, then cancelled: on a GPU up to its first audio
        frame (graph replays, the decoder's graph, cuBLAS handles); on a CPU, which has nothing to capture,
        for a few frames (a frame of a 2B model takes seconds there). With torch.compile, up to its first audio
        frame on a CPU too (the decode is compiled as well), and with more than one slot a second generation
        joins the first: the frame is compiled (or loaded from the compile cache) for a batch of one and for
        larger batches before ready, not while jobs run."""
        from .engine import GenerationParams, GenerationRequest

        to_first_frame = self.compiling or self.scheduler.engine.device.type == "cuda"
        enough = math.inf if to_first_frame else WARMUP_CPU_STEPS
        plan = self.scheduler.engine.prepare(GenerationRequest(WARMUP_SCRIPT, GenerationParams(seed=0)))
        rows = 2 if self.compiling and self.scheduler.slots > 1 else 1
        tickets = []
        try:
            for _ in range(rows):  # the next joins while the ones before still run: a batch of them
                done = threading.Event()
                errors: list[BaseException] = []
                tickets.append(self.scheduler.submit(plan, _warm_up_receiver(done, errors, enough)))
                done.wait()
                if errors:
                    raise RuntimeError("warm-up generation failed") from errors[0]
        finally:
            for ticket in tickets:
                ticket.cancel()

    def compile_tally(self):
        """Inductor graphs this process compiled so far, and how many came from the compile cache."""
        from . import compile_cache

        return compile_cache.tally()

    async def handle(self, job: dict[str, Any]) -> AsyncIterator[dict]:
        received = time.monotonic()
        job_id = str(job.get("id", "local"))
        tag = {"job_id": job_id}
        log.info("started", extra=tag)
        async for item in self.runner.run(job_id, job.get("input"), received):
            if "error" in item:
                log.warning("failed: %s", item["error"], extra=tag)
            elif item.get("type") == "result":
                log.info("done in %.2f s: %.2f s of audio, time to first audio %s ms", time.monotonic() - received,
                         item["duration_s"], item["metrics"]["ttfa_ms"] and round(item["metrics"]["ttfa_ms"]),
                         extra=tag)
            yield item

    def write_startup_report(self, path: str) -> None:
        """Cold-start measurement (`DIA2_STARTUP_REPORT`): run one job up to its first audio chunk (then stop
        it), and write every start-up phase and that time as JSON."""
        import asyncio
        import json

        ready_s = PHASES.now()
        probe = {"text": "[S1] Hello there, how are you today? [S2] Fine, thanks.", "seed": 1, "chunk_ms": 80}

        async def first_audio() -> float:
            async for item in self.handle({"id": "startup-probe", "input": probe}):
                if "error" in item:
                    raise RuntimeError(f"startup probe failed: {item['error']}")
                if item.get("type") == "audio":
                    return PHASES.now()
            raise RuntimeError("startup probe produced no audio")

        first_audio_s = asyncio.run(first_audio())
        report = {"ready_s": ready_s, "phases": PHASES.records,
                  "first_job": {"submitted_s": ready_s, "first_audio_s": first_audio_s,
                                "ttfa_ms": (first_audio_s - ready_s) * 1000},
                  "settings": {"model_dir": str(self.settings.model_dir), "device": self.settings.device,
                               "dtype": self.settings.dtype, "cuda_graphs": self.settings.cuda_graphs,
                               "torch_compile": self.compiling},
                  "compiled": self.compile_tally().as_dict() if self.compiling else None}
        with open(path, "w") as f:
            json.dump(report, f, indent=1)

    def concurrency(self, current: int) -> int:
        """Constant on purpose: the SDK drains every running job before it acts on a change."""
        return self.max_concurrency


def _warm_up_receiver(done: threading.Event, errors: list[BaseException], enough: float) -> Callable:
    """A warm-up generation's output receiver: `done` at its first audio frame, its end, an error, or after
    `enough` outputs."""
    outputs = [0]

    def on_output(out) -> None:
        if isinstance(out, BaseException):
            errors.append(out)
            done.set()
            return
        outputs[0] += 1
        if out.frames or out.finished or outputs[0] > enough:
            done.set()

    return on_output


def choose_compile(settings: WorkerSettings, engine, slots: int, length: int) -> tuple[bool, int]:
    """Whether frames run compiled (TORCH_COMPILE), and the slot count. The model directory's compile cache for
    this device is used when its compiled frames fit this start (dtype, buffer length, slots); with SLOTS unset
    the worker takes the slot count it was made for when memory holds that many. `auto` compiles only from such
    a cache, since compiling at start takes minutes; `true` compiles anyway."""
    from . import compile_cache

    forced = settings.torch_compile
    if forced is False:
        return False, slots
    missing = compile_cache.compiler_missing(engine.device)
    if missing is not None and forced:
        raise WorkerConfigError(f"TORCH_COMPILE: {missing}")
    cache = compile_cache.find(settings.model_dir, engine.device)
    if cache is None:
        why = (f"no compile cache for this device ({compile_cache.device_key(engine.device)}) in "
               f"{settings.model_dir / compile_cache.DIRECTORY}")
    elif (why := cache.mismatch(settings.dtype, length)) is None and cache.made.slots != slots:
        if settings.slots is not None:
            why = f"made for {cache.made.slots} slots, SLOTS is {slots}"
        elif cache.made.slots > slots:
            why = f"made for {cache.made.slots} slots, this device's free memory holds {slots}"
        else:
            slots = cache.made.slots
    why = why or missing
    if why is not None and not forced:
        log.info("torch.compile off (TORCH_COMPILE=auto): %s", why)
        return False, slots
    if why is not None:
        log.warning("torch.compile on (TORCH_COMPILE=true), compiling at start (minutes): %s", why)
    if cache is not None:
        directory = compile_cache.use(cache)
        log.info("torch.compile on: compile cache %s (%d graphs, %d slots)%s", cache.directory, cache.made.graphs,
                 cache.made.slots, "" if directory.parent == cache.directory else f", copied to {directory.parent}")
    return True, slots


def slot_bytes(engine, length: int) -> int:
    """Device memory one slot's caches take (two CFG rows of backbone and depformer K/V)."""
    cfg = engine.config.model
    element = engine.dtype.itemsize
    backbone = cfg.decoder.n_layer * 2 * 2 * cfg.decoder.kv_heads * length * cfg.decoder.gqa_head_dim
    stages = cfg.depformer.n_layer * 2 * 2 * cfg.depformer.kv_heads * engine.config.num_stages * cfg.depformer.gqa_head_dim
    return (backbone + stages) * element


def default_slots(engine, length: int) -> int:
    """As many slots as 80% of free GPU memory holds (frame graphs are captured as batch sizes are first
    used, so a large count costs nothing at start); one on CPU."""
    if engine.device.type != "cuda":
        return 1
    import torch

    free, _ = torch.cuda.mem_get_info(engine.device)
    return max(1, min(MAX_SLOTS, int(free * 0.8) // slot_bytes(engine, length)))


class Loading:
    """The service being loaded on a background thread, so the caller can import the SDK meanwhile."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._service: WorkerService | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._load, args=(dict(env),), name="dia2-load", daemon=True)
        self._thread.start()

    def _load(self, env: dict[str, str]) -> None:
        try:
            self._service = WorkerService.load(env)
        except BaseException as exc:  # reported to the main thread by result()
            self._error = exc

    def result(self) -> WorkerService:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._service


def start_loading(env: Mapping[str, str] | None = None) -> Loading:
    """Begin loading the service on a thread; the caller imports the RunPod SDK meanwhile."""
    set_up_process()
    return Loading(os.environ if env is None else env)


def set_up_process() -> None:
    """Every process-wide setting the worker makes, before torch or the SDK is imported (the scheduler's stop
    at exit is registered with the scheduler, in `WorkerService.serving`):
    - logging;
    - OMP_WAIT_POLICY=PASSIVE: torch runs on two threads here (loading, then the scheduler); with OpenMP's
      default spin-waiting the idle team of one burns the cores the other needs (measured 10x slower CPU
      steps); libgomp reads it when torch loads;
    - RUNPOD_LOG_LEVEL=INFO: the SDK's default, DEBUG, logs every yielded chunk;
    - the SDK's CPU probe answered from /proc/cpuinfo.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")
    _answer_sdk_cpu_probe()


def _answer_sdk_cpu_probe() -> None:
    """`import runpod` spends ~1.1 s in py-cpuinfo's full probe (a subprocess) only to print the processor's
    name in its debug output; answer that one question from /proc/cpuinfo instead."""
    try:
        import cpuinfo
    except ImportError:  # a future SDK without it
        return
    name = cpu_name()
    cpuinfo.get_cpu_info = lambda: {"brand_raw": name}


class SdkLogHandler(logging.Handler):
    """Our log records through the RunPod SDK's logger, with the job id: on the platform they become the
    JSON lines its log view files under each request."""

    LEVELS = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARN"}

    def __init__(self) -> None:
        super().__init__()
        from runpod.serverless.modules.rp_logger import RunPodLogger

        self.sdk = RunPodLogger()

    def emit(self, record: logging.LogRecord) -> None:
        level = self.LEVELS.get(record.levelno, "ERROR")
        self.sdk.log(f"{record.name}: {self.format(record)}", level, getattr(record, "job_id", None))


def use_sdk_logging() -> None:
    """Once the SDK is imported: route dia2_worker's records to its logger instead of stderr."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    logger = logging.getLogger("dia2_worker")
    logger.addHandler(SdkLogHandler())
    logger.propagate = False
