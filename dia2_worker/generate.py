"""Command line: one Dia2 generation from a model directory to a WAV file.

    python -m dia2_worker.generate --model-dir DIR --text "[S1] Hello. [S2] Hi!" --out out.wav --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

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
                            help='its word timings: {"words": [[word, start_s, end_s], ...]}')
    parser.add_argument("--include-prefix", action="store_true", help="keep the prefix audio in the output")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    return parser


def _prefix(args: argparse.Namespace, parser: argparse.ArgumentParser):
    from . import audio
    from .engine import PrefixSpeech, VoicePrefix

    speeches = []
    for n in (1, 2):
        wav, words = getattr(args, f"prefix_speaker_{n}"), getattr(args, f"prefix_speaker_{n}_words")
        if (wav is None) != (words is None):
            parser.error(f"--prefix-speaker-{n} and --prefix-speaker-{n}-words go together")
        if wav is None:
            speeches.append(None)
            continue
        samples, rate = audio.read_audio(wav)
        timed = json.loads(words.read_text())["words"]
        speeches.append(PrefixSpeech(samples, rate, tuple((str(w), float(s), float(e)) for w, s, e in timed)))
    if speeches[0] is None:
        if speeches[1] is not None:
            parser.error("--prefix-speaker-2 needs --prefix-speaker-1")
        if args.include_prefix:
            parser.error("--include-prefix needs --prefix-speaker-1")
        return None
    return VoicePrefix(speeches[0], speeches[1], args.include_prefix)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import numpy as np
    import torch

    from . import audio
    from .engine import Dia2Engine, GenerationParamError, GenerationRequest

    script = args.text if args.text is not None else args.text_file.read_text()
    params = GenerationParams(**{param.name: getattr(args, param.name) for param in PARAMS})
    engine = Dia2Engine.load(args.model_dir, args.mimi_dir, args.device, getattr(torch, args.dtype))
    try:
        result = engine.generate(GenerationRequest(script, params, _prefix(args, parser)))
    except GenerationParamError as exc:
        parser.error(f"{flag(exc.param)}: {exc.message}")
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
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {args.out}: {summary['duration_s']:.2f} s, {result.frames} frames, seed {result.seed}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
