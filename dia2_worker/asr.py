"""Voice prefixes sent without word timings: speech recognition finds them, and a cache remembers each recording.

Conditioning on a voice prefix needs the words spoken in it with their start and end seconds. When a job
gives only the recording, `WhisperTranscriber` finds them with faster-whisper (Whisper on CTranslate2, with
word timestamps from cross-attention alignment), from a converted model directory baked into the image.
The library is imported and the model loaded on the first job that needs them (or at start with
ASR_PRELOAD), so jobs without such a prefix never pay for either.

`VoiceCache` keeps, per recording (the sha256 of its decoded samples and rate), the words transcribed from
it and its Mimi codes, in a bounded LRU: the same voice in later jobs costs neither a transcription nor an
encode.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .jobs import JobInputError, JobRequest, PrefixAudio

if TYPE_CHECKING:
    import numpy as np
    import torch

Words = tuple[tuple[str, float, float], ...]
"""(word, start_s, end_s), starts non-decreasing, each end within the audio."""

ASR_SAMPLE_RATE = 16_000
"""What Whisper listens at."""
BEAM_SIZE = 5
SAMPLING_SEED = 0
_NOT_IN_A_WORD = re.compile(r"[\s\x00-\x1f\x7f-\x9f]+")


class Transcriber(Protocol):
    def transcribe(self, samples: np.ndarray | torch.Tensor, sample_rate: int) -> Words:
        """The words spoken in mono or multichannel audio at any rate, with their timings; () if none."""


class AsrUnavailable(RuntimeError):
    """The worker has no speech recognition model to load."""


class WhisperTranscriber:
    """faster-whisper on a converted (CTranslate2) Whisper directory, loaded offline on first use.

    Thread-safe: the first caller loads the model while others wait; transcriptions run one at a time.
    """

    def __init__(self, model_dir: Path, device: str = "cpu", cpu_threads: int = 1) -> None:
        self.model_dir, self.device, self.cpu_threads = Path(model_dir), device, cpu_threads
        self._model: Any = None
        self._lock = threading.Lock()
        self._decoding = threading.Lock()  # the sampling seed is process-wide: one transcription at a time

    def load(self) -> None:
        """Import faster-whisper and load the model, once."""
        with self._lock:
            if self._model is not None:
                return
            if not (self.model_dir / "model.bin").is_file():
                raise AsrUnavailable(f"no speech recognition model in {self.model_dir} (ASR_MODEL_DIR): "
                                     "bake one with bake_weights.py --asr")
            from faster_whisper import WhisperModel

            kind, _, index = self.device.partition(":")
            self._model = WhisperModel(
                str(self.model_dir), device=kind, device_index=int(index or 0),
                compute_type="float16" if kind == "cuda" else "default", cpu_threads=self.cpu_threads,
                local_files_only=True,
            )

    def transcribe(self, samples: np.ndarray | torch.Tensor, sample_rate: int) -> Words:
        from . import audio

        self.load()
        wave = audio.resample(audio.to_mono(samples), sample_rate, ASR_SAMPLE_RATE).numpy()
        import ctranslate2

        # Whisper falls back to sampling at higher temperatures when a greedy pass looks wrong; a fixed seed
        # per recording makes that repeatable, so the same recording always gets the same words.
        with self._decoding:
            ctranslate2.set_random_seed(SAMPLING_SEED)
            segments, _ = self._model.transcribe(wave, word_timestamps=True, beam_size=BEAM_SIZE, vad_filter=False)
            timed = [(word.word, word.start, word.end) for segment in segments for word in segment.words]
        return clean_words(timed, len(wave) / ASR_SAMPLE_RATE)


def clean_words(timed: list[tuple[str, float, float]], duration_s: float) -> Words:
    """Recognised words as a job's words must be: no whitespace or control characters inside, none empty,
    starts never decreasing and every time within the audio (alignment can round past either end)."""
    words = []
    previous_start = 0.0
    for text, start, end in timed:
        word = _NOT_IN_A_WORD.sub("", text)
        if not word:
            continue
        start = min(max(float(start), previous_start), duration_s)
        words.append((word, start, min(max(float(end), start), duration_s)))
        previous_start = start
    return tuple(words)


def audio_key(samples: np.ndarray | torch.Tensor, sample_rate: int) -> str:
    """The sha256 of a recording as decoded (samples, shape and rate): the same voice sent as WAV or FLAC,
    inline or by URL, is one entry."""
    import numpy as np
    import torch

    array = samples.detach().cpu().numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples)
    digest = hashlib.sha256(f"{sample_rate}:{array.dtype.str}:{array.shape}".encode())
    digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


@dataclass
class _Entry:
    words: Words | None = None
    codes: torch.Tensor | None = None


class VoiceCache:
    """Bounded LRU from a recording's `audio_key` to the words transcribed from it and its Mimi codes."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> _Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: str, **fields: Any) -> None:
        with self._lock:
            entry = self._entries.setdefault(key, _Entry())
            for name, value in fields.items():
                setattr(entry, name, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

    def encoder(self, encode: Callable[[Any, int], torch.Tensor]) -> Callable[[Any, int], torch.Tensor]:
        """`encode` (samples, rate -> Mimi codes) answered from the cache when the recording is in it."""

        def cached_encode(samples: Any, sample_rate: int) -> torch.Tensor:
            key = audio_key(samples, sample_rate)
            entry = self.get(key)
            if entry is not None and entry.codes is not None:
                return entry.codes
            codes = encode(samples, sample_rate)
            self.put(key, codes=codes)
            return codes

        return cached_encode


@dataclass(frozen=True)
class PreparedPrefix:
    """A job whose prefix speakers all have words, and whether everything about them came from the cache."""

    job: JobRequest
    cached: bool


class VoicePrefixes:
    """Fills in the words of prefix speakers sent without them, through the cache, then the transcriber."""

    def __init__(self, cache: VoiceCache, transcriber: Transcriber) -> None:
        self.cache, self.transcriber = cache, transcriber

    def complete(self, job: JobRequest) -> PreparedPrefix:
        """The job with every prefix speaker's words (given ones kept). Blocks while transcribing: call it off
        the event loop and off the scheduler's thread. Raises JobInputError naming the speaker when a
        recording has no recognisable words or no model is available."""
        if job.prefix is None:
            return PreparedPrefix(job, cached=False)
        cached = True
        speakers = {}
        for name in ("speaker_1", "speaker_2"):
            speaker: PrefixAudio | None = getattr(job.prefix, name)
            if speaker is None:
                continue
            key = audio_key(speaker.samples, speaker.sample_rate)
            entry = self.cache.get(key)
            cached = cached and entry is not None and entry.codes is not None
            if speaker.words is None:
                if entry is not None and entry.words is not None:
                    words = entry.words
                else:
                    cached = False
                    words = self._transcribe(speaker, f"prefix.{name}")
                    self.cache.put(key, words=words)
                speakers[name] = replace(speaker, words=words)
        return PreparedPrefix(replace(job, prefix=replace(job.prefix, **speakers)), cached)

    def _transcribe(self, speaker: PrefixAudio, field: str) -> Words:
        try:
            words = self.transcriber.transcribe(speaker.samples, speaker.sample_rate)
        except AsrUnavailable as exc:
            raise JobInputError(f"{field}.words", f"required: {exc}") from None
        if not words:
            raise JobInputError(field, "no words recognised in the audio; pass words explicitly")
        return words
