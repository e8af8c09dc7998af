"""Command line: one Dia2 generation from a model directory to a WAV file.

    python -m dia2_worker.generate --model-dir DIR --text "[S1] Hello. [S2] Hi!" --out out.wav --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .params import GenerationParams

# Generation parameters by the flag that sets them, so errors name what the user typed.
FLAGS = {
    "text_temperature": "--text-temperature", "text_top_k": "--text-top-k",
    "audio_temperature": "--temperature", "audio_top_k": "--top-k",
    "cfg_scale": "--cfg-scale", "cfg_filter_k": "--cfg-filter-k",
    "initial_padding": "--initial-padding", "seed": "--seed", "max_frames": "--max-frames", "text": "--text",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dia2_worker.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True,
                        help="published Dia2 directory: config.json, model.safetensors, tokenizer.json")
    parser.add_argument("--mimi-dir", type=Path, help="Mimi codec directory (default: <model-dir>/mimi)")
    text = parser.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="dialogue script with [S1]/[S2] tags")
    text.add_argument("--text-file", type=Path, help="file holding the script")
    parser.add_argument("--out", type=Path, required=True, help="output WAV path")
    parser.add_argument("--tokens-out", type=Path, help="write the aligned audio tokens, int64 [C, T], as .npy")
    parser.add_argument("--json", action="store_true", help="print one JSON object with the result")
    parser.add_argument("--seed", type=int)
    defaults = GenerationParams()
    parser.add_argument("--temperature", type=float, default=defaults.audio_temperature,
                        help="audio temperature (0 = greedy)")
    parser.add_argument("--top-k", type=int, default=defaults.audio_top_k, help="audio top-k")
    parser.add_argument("--text-temperature", type=float, default=defaults.text_temperature,
                        help="text temperature (0 = greedy)")
    parser.add_argument("--text-top-k", type=int, default=defaults.text_top_k)
    parser.add_argument("--cfg-scale", type=float, default=defaults.cfg_scale)
    parser.add_argument("--cfg-filter-k", type=int, default=defaults.cfg_filter_k)
    parser.add_argument("--initial-padding", type=int, default=defaults.initial_padding)
    parser.add_argument("--max-frames", type=int, help="stop after this many frames (12.5 per second)")
    for n in (1, 2):
        parser.add_argument(f"--prefix-speaker-{n}", type=Path, help=f"voice prefix audio of speaker {n}")
        parser.add_argument(f"--prefix-speaker-{n}-words", type=Path,
                            help='its word timings: {"words": [[word, start_s, end_s], ...]} '
                                 "(default: transcribed from the audio)")
    parser.add_argument("--include-prefix", action="store_true", help="keep the prefix audio in the output")
    parser.add_argument("--asr-model-dir", type=Path,
                        help="speech recognition model that transcribes prefixes given without words "
                             "(default: <model-dir>/asr)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    return parser


def _prefix(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The voice prefix the flags give; a speaker's words are transcribed from the audio when not given."""
    from . import audio
    from .asr import AsrUnavailable, WhisperTranscriber
    from .engine import PrefixSpeech, VoicePrefix

    for n in (1, 2):
        if getattr(args, f"prefix_speaker_{n}_words") is not None and getattr(args, f"prefix_speaker_{n}") is None:
            parser.error(f"--prefix-speaker-{n}-words needs --prefix-speaker-{n}")
    if args.prefix_speaker_1 is None:
        if args.prefix_speaker_2 is not None:
            parser.error("--prefix-speaker-2 needs --prefix-speaker-1")
        if args.include_prefix:
            parser.error("--include-prefix needs --prefix-speaker-1")
        return None
    transcriber = WhisperTranscriber(args.asr_model_dir or args.model_dir / "asr", args.device)
    speeches = []
    for n in (1, 2):
        wav, words = getattr(args, f"prefix_speaker_{n}"), getattr(args, f"prefix_speaker_{n}_words")
        if wav is None:
            speeches.append(None)
            continue
        try:
            samples, rate = audio.read_audio(wav)
        except Exception as exc:  # soundfile's errors for missing, unreadable and undecodable files
            parser.error(f"--prefix-speaker-{n}: cannot read {wav}: {exc}")
        if words is not None:
            timed = tuple((str(w), float(s), float(e)) for w, s, e in json.loads(words.read_text())["words"])
        else:
            try:
                timed = transcriber.transcribe(samples, rate)
            except AsrUnavailable as exc:
                parser.error(f"--prefix-speaker-{n}-words: not given, and {exc} (or pass --asr-model-dir)")
            if not timed:
                parser.error(f"--prefix-speaker-{n}: no words recognised in the audio; "
                             f"pass --prefix-speaker-{n}-words")
        speeches.append(PrefixSpeech(samples, rate, timed))
    return VoicePrefix(speeches[0], speeches[1], args.include_prefix)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import numpy as np
    import torch

    from . import audio
    from .engine import Dia2Engine, GenerationParamError, GenerationRequest

    script = args.text if args.text is not None else args.text_file.read_text()
    params = GenerationParams(
        text_temperature=args.text_temperature, text_top_k=args.text_top_k, audio_temperature=args.temperature,
        audio_top_k=args.top_k, cfg_scale=args.cfg_scale, cfg_filter_k=args.cfg_filter_k,
        initial_padding=args.initial_padding, seed=args.seed, max_frames=args.max_frames,
    )
    engine = Dia2Engine.load(args.model_dir, args.mimi_dir, args.device, getattr(torch, args.dtype))
    request = GenerationRequest(script, params, _prefix(args, parser))
    try:
        result = engine.generate(request)
    except GenerationParamError as exc:
        flag = FLAGS.get(exc.param, exc.param)
        parser.error(f"{flag}: {str(exc).split(': ', 1)[1]}")
    audio.write_wav(args.out, result.waveform.numpy(), result.sample_rate)
    if args.tokens_out:
        np.save(args.tokens_out, result.tokens.numpy().astype(np.int64))
    summary = {
        "timestamps": [[word, time] for word, time in result.timestamps],
        "frames": result.frames,
        "samples": int(result.waveform.numel()),
        "sample_rate": result.sample_rate,
        "duration_s": result.waveform.numel() / result.sample_rate,
        "seed": result.seed,
        "out": str(args.out),
    }
    if request.prefix is not None:
        speeches = {"speaker_1": request.prefix.speaker_1, "speaker_2": request.prefix.speaker_2}
        summary["prefix_words"] = {name: [list(word) for word in speech.words]
                                   for name, speech in speeches.items() if speech is not None}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {args.out}: {summary['duration_s']:.2f} s, {result.frames} frames, seed {result.seed}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
