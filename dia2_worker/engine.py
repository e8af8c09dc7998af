"""Dia2 generation: requests become plans, plans become rows of a batched state, and one step advances every
row by one 80 ms frame.

The state of a generation (cache rows, frame counter, delayed audio buffer, text machine, sampling
parameters) lives in `GenerationState`, whose tensors all have a batch dimension, so a BatchRunner
(batch.py) can run many generations in one step and the whole step can be captured as one CUDA graph.
`Dia2Engine.stream` runs a single generation as a runner of one row and yields audio frames (delays undone)
and words as soon as they are final; `generate` is exactly the concatenation of what `stream` yields,
decoded by Mimi. The request, plan and event types live in generation.py and are re-exported here.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .batch import GenerationStream
from .checkpoint import build_model, load_weights
from .config import Dia2Config
from .generation import (AudioFrame, Event, GenerationPlan, GenerationRequest, GenerationResult, PrefixPlan,
                         PrefixSpeech, VoicePrefix, Word)
from .model import Dia2Model, KVCache, rope_tables
from .output import NOT_SET, StepOutput
from .params import GenerationParamError, GenerationParams
from .sampling import FrameDraws, SamplingParams
from .text import (FRAME_RATE, MAX_PADDING, Dia2Tokenizer, Entry, TextState, normalize_script, parse_script,
                   prefix_entries, text_step)

AudioEncoder = Callable[[np.ndarray | torch.Tensor, int], torch.Tensor]
"""Audio samples at a rate -> Mimi codes [C, T]."""

__all__ = ["AudioFrame", "Dia2Engine", "Event", "GenerationParamError", "GenerationParams", "GenerationPlan",
           "GenerationRequest", "GenerationResult", "GenerationState", "PrefixSpeech", "VoicePrefix", "Word"]

UNGENERATED = -2            # buffer cells no frame has written yet
NEVER = 1 << 40             # EOS cutoff not known yet


@dataclass
class GenerationState:
    """B generations: cache rows (generation b's conditional branch in row 2b, unconditional in 2b + 1, so the
    first b generations are a contiguous view) and per-row state."""

    cache: KVCache
    stage_cache: KVCache
    text: TextState
    sampling: SamplingParams
    audio: torch.Tensor           # [B, C, L] delayed audio tokens
    text_tokens: torch.Tensor     # [B, 2] conditional (main, second) input of the next frame
    frame: torch.Tensor           # [B] next frame to run
    slot_shift: torch.Tensor      # [B] 1 after a voice prefix (its last frame is run twice), else 0
    stop_frame: torch.Tensor      # [B] frame budget end
    eos_cutoff: torch.Tensor      # [B] stop before this frame once the script has ended
    first_word_frame: torch.Tensor  # [B]
    initial_padding: torch.Tensor   # [B]

    @property
    def batch(self) -> int:
        return self.frame.shape[0]

    @property
    def length(self) -> int:
        return self.audio.shape[2]

    def head(self, count: int) -> "GenerationState":
        """The first `count` generations, as views: stepping them updates those rows and no others."""
        def cache(kv: KVCache) -> KVCache:
            return KVCache(kv.keys[:, : 2 * count], kv.values[:, : 2 * count])

        fields = {name: value[:count] for name, value in vars(self).items() if isinstance(value, torch.Tensor)}
        return GenerationState(cache=cache(self.cache), stage_cache=cache(self.stage_cache),
                               text=self.text.rows(slice(0, count)), sampling=self.sampling.rows(slice(0, count)),
                               **fields)


class Dia2Engine:
    """A loaded Dia2 model with its tokenizer and Mimi codec.

    `batch_invariant` is the numerics policy (see Dia2Model.set_batch_invariant), set here once: on for the
    CPU, off for a GPU, unless given.
    """

    def __init__(self, config: Dia2Config, model: Dia2Model, tokenizer: Dia2Tokenizer, codec,
                 device: torch.device, batch_invariant: bool | None = None) -> None:
        self.config, self.model, self.tokenizer, self.codec = config, model, tokenizer, codec
        self.device = device
        self.batch_invariant = device.type == "cpu" if batch_invariant is None else batch_invariant
        model.set_batch_invariant(self.batch_invariant)
        self.dtype = next(model.parameters()).dtype
        data = config.data
        self.ids = tokenizer.token_ids(data.text_new_word_token_id, data.text_pad_token_id, data.text_zero_token_id)
        self.ahead = data.second_stream_ahead
        self.delays = torch.tensor(data.delay_pattern, device=device)
        self.uncond_text = torch.tensor([[self.ids.zero, self.ids.pad]], device=device)  # the unconditional branch's text
        self.banned_cb0 = torch.tensor([data.audio_pad_token_id, data.audio_bos_token_id], device=device)
        self.max_delay = data.max_delay
        self.flush_frames = self.max_delay + MAX_PADDING
        dep = config.model.depformer
        stage_rope = rope_tables(dep.gqa_head_dim, config.model.rope_min_timescale, config.model.rope_max_timescale,
                                 max(config.num_stages, 1), device)
        # Per stage: q's and k's norm weights and RoPE at that stage, as matrices (see Depformer.rotations).
        self.stage_ropes = [model.depformer.rotations(stage_rope[:, s]) if dep.apply_rope else None
                            for s in range(config.num_stages)]
        self._ropes: dict[int, torch.Tensor] = {}

    @classmethod
    def load(cls, model_dir: str | Path, mimi_dir: str | Path | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> "Dia2Engine":
        """A baked or published model directory (config.json, model.safetensors, tokenizer.json; Mimi in `mimi/`)."""
        from .mimi import load_mimi
        from .timing import PHASES

        model_dir, device = Path(model_dir), torch.device(device)
        with PHASES.phase("config"):
            config = Dia2Config.load(model_dir / "config.json")
        with PHASES.phase("tokenizer"):
            tokenizer = Dia2Tokenizer.from_dir(model_dir)
        tensors = load_weights(model_dir, config, device, dtype)
        with PHASES.phase("model"):
            model = build_model(config, tensors)
        with PHASES.phase("mimi"):
            codec = load_mimi(Path(mimi_dir) if mimi_dir else model_dir / "mimi", device=device, dtype=dtype)
        if codec.num_codebooks < config.num_codebooks:
            raise ValueError(f"Mimi has {codec.num_codebooks} codebooks but the model needs {config.num_codebooks}")
        return cls(config, model, tokenizer, codec, device)

    # ----------------------------------------------------------------- planning (host side)

    def check(self, request: GenerationRequest) -> tuple[GenerationParams, list[Entry], int]:
        """Validate a request without touching the device (safe from any thread): its parameters (seed
        resolved), its script's entries, and the frame budget. Raises GenerationParamError."""
        params = request.params
        params.validate()
        if params.seed is None:
            params = replace(params, seed=secrets.randbits(63))
        script = normalize_script(request.script)
        if not script:
            raise GenerationParamError("text", "must not be empty or whitespace only")
        entries = parse_script(script, self.tokenizer, self.ids)
        if not entries:
            raise GenerationParamError("text", "contains no words")
        max_context = self.config.runtime.max_context_steps
        max_frames = min(params.max_frames or max_context, max_context)
        needed = self._frames_needed(entries, 0 if request.prefix else params.initial_padding)
        if needed > max_frames:
            limit = f"the limit is {max_frames} frames ({max_frames / FRAME_RATE:.1f} s"
            raise GenerationParamError(
                "max_frames" if max_frames < max_context else "text",
                f"the text needs at least {needed} frames ({needed / FRAME_RATE:.1f} s) to be spoken; {limit}"
                + (")" if max_frames < max_context else ", the model's context)"))
        return params, entries, max_frames

    def prepare(self, request: GenerationRequest, encode_audio: AudioEncoder | None = None) -> GenerationPlan:
        """`check`, encode the voice prefix and run the text machine through its frames. Safe from any thread:
        the device work is the prefix's Mimi encode, by `encode_audio` when given (the worker's voice cache)."""
        params, entries, max_frames = self.check(request)
        prefix_entries_, steps, codes = (self._prefix(request.prefix, encode_audio or self.encode_audio)
                                         if request.prefix else ([], [], None))
        all_entries = tuple(prefix_entries_ + entries)
        cpu = torch.device("cpu")
        text = TextState.allocate(1, len(all_entries), max(1, sum(len(e.tokens) for e in all_entries)), cpu)
        text.load_row(0, all_entries, params.initial_padding, self.ahead)
        text_tokens, prefix = (self.ids.bos, self.ids.pad), None
        if codes is not None:
            inputs = [text_tokens]
            forced = torch.ones(1, dtype=torch.bool)
            new_word_steps = set(steps)
            for t in range(codes.shape[1]):
                token = self.ids.new_word if t in new_word_steps else self.ids.pad
                main, second, _ = text_step(text, torch.tensor([t]), torch.tensor([token]), forced, self.ids,
                                            self.ahead)
                inputs.append((int(main), int(second)))
            text_tokens = inputs.pop()
            consumed = text.word_step[0, : int(text.next_entry[0])].tolist()
            prefix = PrefixPlan(codes, torch.tensor(inputs), tuple((e, f) for e, f in enumerate(consumed) if f >= 0),
                                len(prefix_entries_))
        frames_prefix = 0 if codes is None else codes.shape[1]
        return GenerationPlan(
            entries=all_entries,
            params=params,
            text=text,
            text_tokens=text_tokens,
            prefix=prefix,
            include_prefix=bool(request.prefix and request.prefix.include_audio),
            start_frame=max(frames_prefix - 1, 0),
            max_frames=max_frames,
            buffer_length=self.buffer_length(frames_prefix),
            main_carries_new_word=self.ahead == 0 or any(self.ids.new_word in e.tokens for e in all_entries),
        )

    def buffer_length(self, prefix_frames: int = 0) -> int:
        """Frames of delayed-audio buffer (and cache slots) a generation with this much prefix needs."""
        extra = prefix_frames + self.max_delay if prefix_frames else 0
        return self.config.runtime.max_context_steps + 1 + extra

    def _frames_needed(self, entries: Sequence[Entry], initial_padding: int) -> int:
        """Fewest frames that speak every entry: a word takes its tokens + 1, a pause its padding + 1, then
        the end of script and the flush of the delayed codebooks."""
        return initial_padding + sum(max(len(e.tokens), e.padding) + 1 for e in entries) + self.flush_frames

    def _prefix(self, prefix: VoicePrefix, encode_audio: AudioEncoder) -> tuple[list[Entry], list[int], torch.Tensor]:
        """Prefix speakers -> word entries, forced new-word steps and the aligned Mimi codes [C, T]."""
        entries, steps, codes = [], [], []
        offset = 3  # speaker 1's steps are shifted by 3 frames, as the original runtime does
        for tag, speech in (("[S1]", prefix.speaker_1), ("[S2]", prefix.speaker_2)):
            if speech is None:
                continue
            speaker_entries, speaker_steps = prefix_entries(speech.words, self.tokenizer, tag)
            entries += speaker_entries
            steps += [s + offset for s in speaker_steps]
            codes.append(encode_audio(speech.samples, speech.sample_rate))
            offset = codes[0].shape[1]
        return entries, steps, torch.cat(codes, dim=1)

    def encode_audio(self, samples: np.ndarray | torch.Tensor, sample_rate: int) -> torch.Tensor:
        """Any-rate, any-channel audio -> Mimi codes [C, T] with all of the model's codebooks."""
        from . import audio

        wave = audio.resample(audio.to_mono(samples), sample_rate, self.codec.sample_rate).to(self.device, self.dtype)
        with torch.inference_mode():
            codes = self.codec.encode(wave.view(1, 1, -1), num_codebooks=self.config.num_codebooks)
        return codes[0].to(self.device)

    # ----------------------------------------------------------------- batched state (device side)

    def new_state(self, batch: int, length: int, max_entries: int | None = None,
                  max_tokens: int | None = None) -> GenerationState:
        """Preallocated state for `batch` generations of up to `length` buffer frames."""
        cfg, dev = self.config, self.device
        dec, dep = cfg.model.decoder, cfg.model.depformer
        C, B = cfg.num_codebooks, batch
        long = dict(dtype=torch.long, device=dev)
        self.rope(length)  # built now, not inside a step torch.compile traces (its guard would then recompile)
        return GenerationState(
            cache=KVCache.allocate(dec.n_layer, 2 * B, dec.kv_heads, length, dec.gqa_head_dim, dev, self.dtype),
            stage_cache=KVCache.allocate(dep.n_layer, 2 * B, dep.kv_heads, max(cfg.num_stages, 1),
                                         dep.gqa_head_dim, dev, self.dtype),
            text=TextState.allocate(B, max_entries or length, max_tokens or length, dev),
            sampling=SamplingParams.allocate(B, dev),
            audio=torch.full((B, C, length), UNGENERATED, **long),
            text_tokens=torch.zeros(B, 2, **long),
            frame=torch.zeros(B, **long),
            slot_shift=torch.zeros(B, **long),
            stop_frame=torch.zeros(B, **long),
            eos_cutoff=torch.full((B,), NEVER, **long),
            first_word_frame=torch.full((B,), NOT_SET, **long),
            initial_padding=torch.zeros(B, **long),
        )

    def start(self, state: GenerationState, row: int,
              plan: GenerationPlan) -> tuple[list[tuple[int, int]], torch.Tensor]:
        """Put a planned generation in `row`: reset its state and prefill its voice prefix through the backbone.

        Returns the (entry, frame) words the prefix consumed and the aligned frames [N, C] (on the CPU) that
        its prefix finished before the start frame.
        """
        if plan.buffer_length > state.length:
            raise ValueError(f"plan needs {plan.buffer_length} buffer frames, the state holds {state.length}")
        p = plan.params
        state.text.copy_row(row, plan.text)
        state.sampling.load_row(row, p)
        state.audio[row] = UNGENERATED
        state.text_tokens[row] = torch.tensor(plan.text_tokens)
        state.frame[row] = plan.start_frame
        state.slot_shift[row] = plan.slot_shift
        state.stop_frame[row] = min(plan.start_frame + plan.max_frames, plan.buffer_length - 1)
        state.eos_cutoff[row] = NEVER
        state.first_word_frame[row] = NOT_SET
        state.initial_padding[row] = p.initial_padding
        if plan.prefix is None:
            return [], torch.zeros(0, self.config.num_codebooks, dtype=torch.long)
        self._prefill(state, row, plan.prefix)
        count = max(plan.start_frame + 1 - self.max_delay, 0)
        rows = torch.full((count,), row, device=self.device)
        frames = self.aligned_frames(state, rows, torch.arange(count, device=self.device)).cpu()
        return list(plan.prefix.words), frames

    def _prefill(self, state: GenerationState, row: int, prefix: PrefixPlan) -> None:
        """Prefix frames 0..T-1 through the backbone in one pass (their text inputs are known: the state
        machine was forced through them while planning), writing the cache and the delayed audio buffer."""
        codes, dev = prefix.codes, self.device
        T = codes.shape[1]
        delayed = torch.full((codes.shape[0], T + self.max_delay), self.config.data.audio_pad_token_id,
                             dtype=torch.long, device=dev)
        for c, delay in enumerate(self.config.data.delay_pattern):
            delayed[c, delay: delay + T] = codes[c]
        state.audio[row, :, : delayed.shape[1]] = delayed
        frames = torch.arange(T, device=dev)
        audio_in = torch.where(self.delays.unsqueeze(0) > frames.unsqueeze(1), self.config.data.audio_bos_token_id,
                               delayed[:, :T].T)
        cond = torch.cat([prefix.text_inputs.to(dev), audio_in], dim=1)
        uncond = torch.cat([self.uncond_text.expand(T, 2), audio_in], dim=1)
        rows = torch.tensor([2 * row, 2 * row + 1], device=dev)
        positions = frames.expand(2, T)
        with torch.inference_mode():
            self.model.transformer(torch.stack([cond, uncond]), self.rope(state.length)[:, positions].unsqueeze(-2),
                                   state.cache, positions, T, rows=rows)

    def rope(self, length: int) -> torch.Tensor:
        """Backbone cos/sin tables [2, length, D], cached per buffer length."""
        if length not in self._ropes:
            m, dec = self.config.model, self.config.model.decoder
            self._ropes[length] = rope_tables(dec.gqa_head_dim, m.rope_min_timescale, m.rope_max_timescale,
                                              length, self.device, self.dtype)
        return self._ropes[length]

    @torch.no_grad()
    def step(self, state: GenerationState, kv_len: int) -> StepOutput:
        """Advance every row by one frame. Pure tensor work: no host syncs, so it can be graph-captured.
        Rows that are finished run too (their results are ignored), which keeps shapes static.

        Attention reads cache slots [0, kv_len): at least every active row's slot + 1 (the runner picks it from
        a few fixed lengths, so each length can be one graph); rows whose slot is beyond it compute garbage.        """
        cfg, ids, sp = self.config, self.ids, state.sampling
        B, C, L = state.batch, cfg.num_codebooks, state.length
        data = cfg.data
        t = state.frame.clone()
        # Audio inputs of frame t: the buffer's column t, BOS for codebooks whose delay has not passed.
        column = state.audio.gather(2, t.clamp(max=L - 1).view(B, 1, 1).expand(B, C, 1))[..., 0]
        audio_in = torch.where(self.delays.unsqueeze(0) > t.unsqueeze(1), data.audio_bos_token_id, column)
        tokens = torch.stack([torch.cat([state.text_tokens, audio_in], 1),
                              torch.cat([self.uncond_text.expand(B, 2), audio_in], 1)], dim=1).flatten(0, 1)
        positions = t.clamp(max=L - 1).repeat_interleave(2).unsqueeze(1)
        slots = (t + state.slot_shift).clamp(max=state.cache.length - 1).repeat_interleave(2).unsqueeze(1)
        hidden, action_logits, cb0_logits = self.model.transformer(
            tokens.unsqueeze(1), self.rope(L)[:, positions].unsqueeze(-2), state.cache, slots, kv_len)
        hidden = hidden[:, 0]

        draws = FrameDraws(sp, t, 1 + C, max(action_logits.shape[-1], cb0_logits.shape[-1]))
        text_token = draws.text(action_logits[:, 0])
        main, second, word_entry = text_step(state.text, t, text_token, torch.zeros_like(t, dtype=torch.bool), ids,
                                             self.ahead)
        first_seen = (state.first_word_frame == NOT_SET) & (main == ids.new_word)
        state.first_word_frame.copy_(torch.where(first_seen, t - state.initial_padding, state.first_word_frame))
        state.text_tokens.copy_(torch.stack([main, second], dim=1))

        token = draws.audio(cb0_logits[:, 0], 0, banned=self.banned_cb0)
        drawn = [token]
        for s in range(cfg.num_stages):
            logits = self.model.depformer(s, hidden, token, main, second, self.stage_ropes[s], state.stage_cache)
            token = draws.audio(logits, s + 1)
            drawn.append(token)
        write_at = (t + 1).clamp(max=L - 1).view(B, 1, 1).expand(B, C, 1)
        state.audio.scatter_(2, write_at, torch.stack(drawn, dim=1).unsqueeze(2))

        end_step = state.text.end_step
        state.eos_cutoff.copy_(torch.where((state.eos_cutoff == NEVER) & (end_step >= 0),
                                           end_step + self.flush_frames, state.eos_cutoff))
        frame_index = t + 1 - self.max_delay
        state.frame.add_(1)
        frame_tokens = self.aligned_frames(state, torch.arange(B, device=self.device), frame_index)
        return StepOutput(frame=t, frame_index=frame_index, frame_tokens=frame_tokens, word_entry=word_entry,
                          first_word_frame=state.first_word_frame,  # a view: the runner copies it at once
                          done=self.finished(state))

    def aligned_frames(self, state: GenerationState, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Tokens [N, C] of aligned frame index[n] of row rows[n]: codebook c is read `delay_c` columns later."""
        columns = (index.unsqueeze(1) + self.delays.unsqueeze(0)).clamp(0, state.length - 1)
        codebooks = torch.arange(self.config.num_codebooks, device=state.audio.device)
        tokens = state.audio[rows.unsqueeze(1), codebooks.unsqueeze(0), columns]  # only the N x C values
        return torch.where(tokens == UNGENERATED, self.config.data.audio_pad_token_id, tokens)

    @staticmethod
    def finished(state: GenerationState) -> torch.Tensor:
        """[B] rows with no frame left to run."""
        t = state.frame
        return (t >= state.eos_cutoff) | (t + 1 >= state.length) | (t >= state.stop_frame)

    # ----------------------------------------------------------------- single generation, eager

    def stream(self, request: GenerationRequest | GenerationPlan, decode_audio: bool = False):
        """One generation, eagerly, as an iterator of AudioFrame and Word events (frames carry PCM from the
        streaming decoder when `decode_audio`); its `timestamps` are complete once it is exhausted."""
        plan = request if isinstance(request, GenerationPlan) else self.prepare(request)
        return GenerationStream(self, plan, decode_audio)

    def generate(self, request: GenerationRequest | GenerationPlan,
                 on_frame: Callable[[int], None] | None = None) -> GenerationResult:
        """Run to the end; the tokens are exactly the concatenation of what `stream` yields. `on_frame` gets
        the count of output frames so far after each one (progress for command lines)."""
        stream = self.stream(request)
        frames = []
        for event in stream:
            if isinstance(event, AudioFrame):
                frames.append(event.tokens)
                if on_frame is not None:
                    on_frame(len(frames))
        C = self.config.num_codebooks
        tokens = torch.stack(frames, dim=1) if frames else torch.zeros(C, 0, dtype=torch.long)
        return GenerationResult(tokens=tokens, waveform=self.decode(tokens), sample_rate=self.codec.sample_rate,
                                timestamps=stream.timestamps, seed=stream.plan.params.seed)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Aligned tokens [C, T] -> waveform [T * frame_size] clamped to [-1, 1] (offline Mimi decode)."""
        if tokens.shape[1] == 0:
            return torch.zeros(0)
        with torch.inference_mode():
            wave = self.codec.decode(tokens.to(self.device).unsqueeze(0))
        return wave[0, 0].float().clamp(-1.0, 1.0).cpu()
