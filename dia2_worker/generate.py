"""Command line: one Dia2 generation from a model directory to a WAV file.

    python -m dia2_worker.generate --model-dir DIR --text "[S1] Hello. [S2] Hi!" --out out.wav --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import cli
from .params import PARAMS, GenerationParams, flag


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
    for param in PARAMS:
        parser.add_argument(param.flag, dest=param.name, type=param.type, default=param.default, help=param.help)
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
        samples, rate = _prefix_audio(wav, f"--prefix-speaker-{n}")
        if words is not None:
            timed = _words(words, f"--prefix-speaker-{n}-words")
        else:
            try:
                timed = transcriber.transcribe(samples, rate)
            except AsrUnavailable as exc:
                raise cli.UsageError(f"--prefix-speaker-{n}-words: not given, and {exc} (or pass --asr-model-dir)")
            if not timed:
                raise cli.UsageError(f"--prefix-speaker-{n}: no words recognised in the audio; "
                                     f"pass --prefix-speaker-{n}-words")
        speeches.append(PrefixSpeech(samples, rate, timed))
    return VoicePrefix(speeches[0], speeches[1], args.include_prefix)


def _prefix_audio(path: Path, flag: str):
    from soundfile import SoundFileError

    from . import audio

    cli.existing_file(path, flag)
    try:
        return audio.read_audio(path)
    except (SoundFileError, ValueError) as exc:
        raise cli.UsageError(f"{flag}: {path} is not usable audio: {getattr(exc, 'error_string', exc)}") from None


def _words(path: Path, flag: str) -> tuple[tuple[str, float, float], ...]:
    cli.existing_file(path, flag)
    try:
        return tuple((str(w), float(s), float(e)) for w, s, e in json.loads(path.read_text())["words"])
    except (ValueError, KeyError, TypeError) as exc:
        raise cli.UsageError(f'{flag}: {path} must hold {{"words": [[word, start_s, end_s], ...]}} '
                             f"({type(exc).__name__}: {exc})") from None


def _progress(frame_rate: float):
    """On a terminal, one line rewritten as frames come; nothing otherwise."""
    if not sys.stderr.isatty():
        return None

    def show(frames: int) -> None:
        print(f"\rgenerating: {frames} frames, {frames / frame_rate:.1f} s of audio", end="", file=sys.stderr,
              flush=True)

    return show


def main(argv: list[str] | None = None) -> int:
    return cli.run(_main, argv, "python -m dia2_worker.generate")


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Every mistake a user can make on this line is found before the model loads and the generation runs.
    cli.model_dir(args.model_dir, "--model-dir")
    cli.mimi_dir(args.mimi_dir or args.model_dir / "mimi", "--mimi-dir" if args.mimi_dir else "--model-dir")
    script = args.text if args.text is not None else cli.existing_file(args.text_file, "--text-file").read_text()
    cli.writable_parent(args.out, "--out")
    if args.tokens_out is not None:
        cli.writable_parent(args.tokens_out, "--tokens-out")
    cli.device(args.device, "--device")
    prefix = _prefix(args, parser)
    import numpy as np
    import torch

    from . import audio
    from .engine import Dia2Engine, GenerationParamError, GenerationRequest

    params = GenerationParams(**{param.name: getattr(args, param.name) for param in PARAMS})
    engine = Dia2Engine.load(args.model_dir, args.mimi_dir, args.device, getattr(torch, args.dtype))
    request = GenerationRequest(script, params, prefix)
    try:
        result = engine.generate(request, on_frame=_progress(engine.codec.frame_rate))
    except GenerationParamError as exc:
        parser.error(f"{flag(exc.param)}: {exc.message}")
    if sys.stderr.isatty():
        print(file=sys.stderr)  # end the progress line
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
