"""Command line: decode codes to audio, encode audio to codes, benchmark decoding.

  python -m dia2_worker.mimi decode --mimi-dir DIR --codes CODES.npy --out OUT.wav|OUT.npy
  python -m dia2_worker.mimi encode --mimi-dir DIR --audio IN.wav --out CODES.npy [--num-codebooks K]
  python -m dia2_worker.mimi bench [--device cpu|cuda] [--dtype float32|bfloat16] [--frames N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .. import cli

DTYPES = ("float32", "bfloat16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dia2_worker.mimi", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name: str, summary: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=summary)
        command.add_argument("--device", default="cpu")
        command.add_argument("--dtype", choices=DTYPES, default="float32")
        return command

    decode = add("decode", "codes (int [K, T] or [1, K, T] .npy) -> OUT.wav (16-bit) or OUT.npy (float32, unclamped)")
    decode.add_argument("--mimi-dir", type=Path, required=True, help="config.json + model.safetensors")
    decode.add_argument("--codes", type=Path, required=True)
    decode.add_argument("--out", type=Path, required=True)

    encode = add("encode", "audio file (any rate and channels) -> codes int64 [K, T] .npy")
    encode.add_argument("--mimi-dir", type=Path, required=True, help="config.json + model.safetensors")
    encode.add_argument("--audio", type=Path, required=True)
    encode.add_argument("--out", type=Path, required=True)
    encode.add_argument("--num-codebooks", type=int, help="the first K codebooks (default: all)")

    bench = add("bench", "decode cost per frame of the real Mimi shape, random weights")
    bench.add_argument("--frames", type=int, default=50)
    bench.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="streaming batch sizes")
    bench.add_argument("--json", type=Path, help="also write the results here")
    return parser


def _decode(args: argparse.Namespace) -> str:
    import numpy as np
    import torch

    from .. import audio
    from .codec import load_mimi

    suffix = args.out.suffix.lower()
    if suffix not in (".wav", ".npy"):
        raise ValueError(f"--out must end in .wav or .npy, got {args.out}")
    codes = np.load(args.codes)
    if codes.ndim == 2:
        codes = codes[None]
    if codes.ndim != 3 or codes.shape[0] != 1 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"{args.codes}: expected integer codes [K, T] or [1, K, T], got {codes.dtype} "
                         f"{list(codes.shape)}")
    codec = load_mimi(cli.mimi_dir(args.mimi_dir, "--mimi-dir"), cli.device(args.device, "--device"),
                      getattr(torch, args.dtype))
    wave = codec.decode(torch.from_numpy(codes.astype(np.int64)))[0, 0].float().cpu().numpy()
    if suffix == ".npy":
        np.save(args.out, wave)
    else:
        audio.write_wav(args.out, wave, codec.sample_rate)
    return f"{args.out}: {wave.shape[0]} samples ({wave.shape[0] / codec.sample_rate:.2f} s at {codec.sample_rate} Hz)"


def _encode(args: argparse.Namespace) -> str:
    import numpy as np
    import torch

    from .. import audio
    from .codec import load_mimi

    samples, rate = audio.read_audio(cli.existing_file(args.audio, "--audio"))  # a truncated WAV is refused
    codec = load_mimi(cli.mimi_dir(args.mimi_dir, "--mimi-dir"), cli.device(args.device, "--device"),
                      getattr(torch, args.dtype))
    wave = audio.resample(audio.to_mono(samples), rate, codec.sample_rate)
    codes = codec.encode(wave.view(1, 1, -1), args.num_codebooks)[0].cpu().numpy().astype(np.int64)
    np.save(args.out, codes)
    return f"{args.out}: codes {list(codes.shape)} from {samples.shape[0] / rate:.2f} s of audio"


def _bench(args: argparse.Namespace) -> str:
    import torch

    from . import bench

    if args.frames < 1 or min(args.batch) < 1:
        raise ValueError("--frames and --batch must be >= 1")
    result = bench.run(args.device, getattr(torch, args.dtype), args.frames, tuple(args.batch))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return bench.report(result)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:  # soundfile only where installed: `bench` needs none (a bare GPU machine has torch and numpy)
        from soundfile import SoundFileError
    except ImportError:
        SoundFileError = ValueError
    try:
        print({"decode": _decode, "encode": _encode, "bench": _bench}[args.command](args))
    except (ValueError, OSError, SoundFileError, cli.UsageError) as exc:
        if cli.debugging():
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
